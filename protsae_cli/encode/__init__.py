"""SAE encode backends. Every backend computes TopK(ReLU(x W^T + b)) from `TopKSAE.encoder_affine()` and
returns (idx int64 [N,k], val float32 [N,k]) with the reference's conventions (see docs/ARCHITECTURE.md):
ordered by (value desc, index asc), empty slots idx -1 / val 0.

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


def canonical_order(idx: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Put selected (idx, val) pairs in the reference order: value desc, index asc; empties last as -1/0."""
    val = torch.where(idx >= 0, val, torch.zeros_like(val))
    big = torch.iinfo(torch.int64).max
    key_idx = torch.where(idx >= 0, idx, torch.full_like(idx, big))
    o = key_idx.argsort(dim=-1)
    idx, val = idx.gather(-1, o), val.gather(-1, o)
    o = torch.sort(val, dim=-1, descending=True, stable=True).indices
    idx, val = idx.gather(-1, o), val.gather(-1, o)
    idx = torch.where(val > 0, idx, torch.full_like(idx, -1))
    return idx, torch.clamp_min(val, 0)


def get_encoder(name: str, sae, device: str | torch.device = "cpu", **kwargs) -> Encoder:
    """Pick an encode backend. `auto`: Triton on CUDA when importable, else torch (measured fastest on CPU)."""
    device = torch.device(device)
    if name == "auto":
        name = _auto_backend(device)
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


def _auto_backend(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            return "triton"
        except ImportError:
            return "torch"
    return "torch"
