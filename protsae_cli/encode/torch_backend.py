"""Reference encode backend: plain torch GEMM -> ReLU -> top-k, in row chunks to bound memory."""

from __future__ import annotations

import torch

from protsae_cli.sae.topk import priority_topk_relu


class TorchEncoder:
    name = "torch"

    def __init__(self, sae, device: torch.device, chunk_rows: int = 8192, dtype: torch.dtype | None = None):
        self.chunk_rows = chunk_rows
        self.device = device
        if not sae.supports_affine_encode:
            # A ProtSAE whose inference is not one TopK over affine pre-activations (topk_scope="unknown":
            # defined latents always kept) runs its own encode(), in fp32; its rows have code_width slots.
            self.k, self.dtype = sae.code_width, torch.float32
            self._encode_chunk = sae.to(device).float().eval().encode
            return
        W, b = sae.encoder_affine()
        # bf16 GEMM on CUDA (fp32 accumulate in cuBLAS); exact fp32 on CPU.
        self.dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.W = W.to(device=device, dtype=self.dtype)
        self.b = b.to(device=device, dtype=torch.float32)
        self.k = sae.cfg.k
        self.priority = sae.priority_latents
        self._encode_chunk = self._affine_topk

    def _affine_topk(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = torch.addmm(self.b, xc.float(), self.W.float().T) if self.dtype == torch.float32 else \
            (xc @ self.W.T).float() + self.b
        return priority_topk_relu(pre, self.k, self.priority)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idxs, vals = [], []
        for s in range(0, x.shape[0], self.chunk_rows):
            i, v = self._encode_chunk(x[s:s + self.chunk_rows].to(self.device, self.dtype))
            idxs.append(i)
            vals.append(v)
        if not idxs:
            return (torch.empty(0, self.k, dtype=torch.int64, device=self.device),
                    torch.empty(0, self.k, dtype=torch.float32, device=self.device))
        return torch.cat(idxs), torch.cat(vals)
