"""Triton encode backend: the fused GEMM + ReLU + top-k kernel (`protsae_cli.encode.topk_kernel`).

Meant for CUDA, in bf16 (fp32 accumulate). On a CPU the kernel can only run in Triton's interpreter, which is
orders of magnitude slower than the torch backend; it is allowed only when TRITON_INTERPRET=1 says the caller
wants exactly that (the tests do), so nobody ends up there by accident.
Triton is imported when an encoder is built, never when this module is imported.
"""

from __future__ import annotations

import os

import torch

from protsae_cli.encode import merge_priority
from protsae_cli.errors import InputError


class TritonUnavailableError(InputError):
    """The kernel cannot run here (no triton, compile failure on this Triton/GPU, failed self-check): a
    caller choosing a backend automatically can catch this and fall back to torch."""


class TritonEncoder:
    name = "triton"

    def __init__(self, sae, device: torch.device | str, chunk_rows: int = 65536, dtype: torch.dtype | None = None,
                 config=None):
        """`config`: an optional `protsae_cli.encode.topk_kernel.KernelConfig` (bench/encode.py picks one);
        `chunk_rows` bounds the int64/fp32 output and the kernel's scratch per launch."""
        device = torch.device(device)
        if device.type == "cuda":
            dtype = dtype or torch.bfloat16
        elif os.environ.get("TRITON_INTERPRET") == "1":
            dtype = dtype or torch.float32
            if dtype == torch.bfloat16:
                raise InputError("the Triton interpreter cannot compute in bf16; use --backend torch on CPU")
        else:
            raise InputError(f"--backend triton needs a CUDA device (got {device}); use --backend torch on CPU "
                             "(TRITON_INTERPRET=1 runs the kernel in Triton's slow CPU interpreter, for testing)")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise InputError(f"the Triton backend computes in bf16, fp16 or fp32, not {dtype}")
        try:
            from protsae_cli.encode import topk_kernel as tk
        except ImportError as e:
            raise TritonUnavailableError(f"--backend triton needs the `triton` package ({e}); install "
                                         "protsae[gpu] or use --backend torch") from e
        k = int(sae.cfg.k)
        if k > tk.MAX_K:
            raise InputError(f"the Triton kernel supports k <= {tk.MAX_K}; this SAE has k={k}: use --backend torch")
        if chunk_rows < 1:
            raise InputError(f"chunk_rows must be positive, got {chunk_rows}")
        W, b = sae.encoder_affine()
        # Priority latents (ProtSAE defined_first) are a few rows: a small GEMM beside the kernel, which runs
        # plain top-k over the rest; `merge_priority` combines the two exactly.
        p = sae.priority_latents
        self._tk = tk
        self.device = device
        self.dtype = dtype
        self.d_model = int(W.shape[1])
        self.priority = p
        self.W_pri = W[:p].to(device=device, dtype=dtype).contiguous()
        self.b_pri = b[:p].to(device=device, dtype=torch.float32).contiguous()
        self.W = W[p:].to(device=device, dtype=dtype).contiguous()
        self.b = b[p:].to(device=device, dtype=torch.float32).contiguous()
        self.k = k
        self.chunk_rows = int(chunk_rows)
        self.config = config
        if device.type == "cuda":
            self._self_check()

    def _self_check(self) -> None:
        """Compile and verify on a few rows now, so that a Triton release or GPU the kernel does not work
        with fails here with a clear message instead of in the middle of a run."""
        tk = self._tk
        g = torch.Generator(device="cpu").manual_seed(0)
        probe = torch.randn(96, self.W.shape[1], generator=g).to(self.device, self.dtype)
        try:
            idx, val = tk.topk_encode(probe, self.W, self.b, self.k, self.config)
            pre = torch.addmm(self.b, probe.float(), self.W.float().T)
            problems = tk.check_topk(idx, val, pre, self.k, atol=1e-3, rtol=1e-3)
        except Exception as e:  # compile errors come in many types (triton, ptxas, driver)
            raise TritonUnavailableError(f"the Triton kernel does not run on this GPU/Triton ({type(e).__name__}: "
                                         f"{str(e)[:300]}); use --backend torch") from e
        if problems:
            raise TritonUnavailableError(f"the Triton kernel's self-check failed ({problems[0]}); use --backend "
                                         "torch and please report this")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx int64 [N, k], val float32 [N, k]) on the encoder's device, already in the canonical order
        (the kernel emits value desc / index asc with -1 / 0 padding, so no re-sort is needed)."""
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise InputError(f"expected activations [N, {self.d_model}], got {tuple(x.shape)}")
        idxs, vals = [], []
        for s in range(0, x.shape[0], self.chunk_rows):
            xc = x[s:s + self.chunk_rows].to(device=self.device, dtype=self.dtype)
            i, v = self._tk.topk_encode(xc, self.W, self.b, self.k, self.config)
            if self.priority:
                pri = torch.relu((xc @ self.W_pri.T).float() + self.b_pri)
                i, v = merge_priority(pri, torch.where(i >= 0, i + self.priority, i), v, self.k)
            idxs.append(i)
            vals.append(v)
        if not idxs:
            return (torch.empty(0, self.k, dtype=torch.int64, device=self.device),
                    torch.empty(0, self.k, dtype=torch.float32, device=self.device))
        if len(idxs) == 1:
            return idxs[0], vals[0]
        return torch.cat(idxs), torch.cat(vals)
