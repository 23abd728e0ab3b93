"""SAE encode backends. Every backend computes TopK(ReLU(x W^T + b)) from `TopKSAE.encoder_affine()` and
returns (idx int64 [N,k], val float32 [N,k]) with the reference's conventions (see docs/ARCHITECTURE.md):
ordered by (value desc, index asc), empty slots idx -1 / val 0. A ProtSAE with `priority_latents` p > 0
(topk_scope="defined_first") admits its first p latents first when positive (`sae.priority_topk_relu`).

`torch` is the reference every other backend is tested against.
"""

from __future__ import annotations

from typing import Protocol

import torch

BACKENDS = ("auto", "torch", "triton", "onnx")


class Encoder(Protocol):
    name: str

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, d_model] activations on any device. Returns (idx, val) on the same device."""
        ...


def merge_priority(pri_val: torch.Tensor, idx: torch.Tensor, val: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of a priority encode from its two halves: `pri_val` [N, p] = ReLU'd activations of latents 0..p-1,
    and (idx, val) [N, k] = the plain top-k of the other latents (their indices already offset by p).

    Why it is exact: the priority selection keeps every positive priority latent (the top k of them if more)
    and fills the remaining slots with the largest other latents, which are all among the other latents'
    top k. So the top-k of the p + k candidates under the priority key is the full selection.
    """
    from protsae_cli.sae.topk import priority_topk_relu

    p = pri_val.shape[-1]
    cand = torch.cat([pri_val.float(), val.float()], -1)
    cand_idx = torch.cat([torch.arange(p, device=idx.device).expand(idx.shape[0], p), idx], -1)
    sel, v = priority_topk_relu(cand, k, p)
    return torch.where(sel >= 0, cand_idx.gather(-1, sel.clamp_min(0)), sel), v


def get_encoder(name: str, sae, device: str | torch.device = "cpu", **kwargs) -> Encoder:
    """Pick an encode backend.

    `auto` follows the benchmarks (docs/KERNEL_NOTES.md): on CPU onnxruntime measured 2.2-2.9x faster than
    torch, so it is used when installed; on CUDA the fused Triton kernel, falling back to torch (with a warning)
    if Triton cannot compile or fails its self-check on this GPU.
    """
    device = torch.device(device)
    if not sae.supports_affine_encode:
        if name not in ("auto", "torch"):
            from protsae_cli.errors import InputError

            raise InputError(sae.backend_refusal(name))  # each architecture says what the backend lacks
        name = "torch"
    if name == "auto":
        return _auto_encoder(sae, device, **kwargs)
    if name == "torch":
        from protsae_cli.encode.torch_backend import TorchEncoder

        return TorchEncoder(sae, device, **kwargs)
    if name == "triton":
        from protsae_cli.encode.triton_backend import TritonEncoder

        return TritonEncoder(sae, device, **kwargs)
    if name == "onnx":
        from protsae_cli.encode.onnx_backend import OnnxEncoder

        return OnnxEncoder(sae, device, **kwargs)
    from protsae_cli.errors import InputError

    raise InputError(f"unknown encode backend {name!r}; choose one of {', '.join(BACKENDS)}")


def _auto_encoder(sae, device: torch.device, **kwargs) -> Encoder:
    import importlib.util
    import logging

    log = logging.getLogger("protsae.encode")
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is not None:
            from protsae_cli.encode.triton_backend import TritonUnavailableError

            try:
                return get_encoder("triton", sae, device, **kwargs)
            except TritonUnavailableError as e:
                log.warning("fused Triton encode unavailable on this GPU (%s); using torch", e)
        return get_encoder("torch", sae, device, **kwargs)
    if importlib.util.find_spec("onnxruntime") is not None:
        return get_encoder("onnx", sae, device, **kwargs)
    return get_encoder("torch", sae, device, **kwargs)
