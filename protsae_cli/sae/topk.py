"""The TopK sparse autoencoder (Gao et al.; as sparsify and SAELens define it) and the reference TopK selection
every encode backend is tested against."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from protsae_cli.sae.base import SAE, EncoderOutput, register_arch
from protsae_cli.sae.config import SAEConfig


def topk_relu(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference selection: top-k of ReLU(pre) per row, ties resolved towards the lower latent index.

    Returns (idx int64 [N,k], val float32 [N,k]) ordered by (value desc, index asc). Slots whose value is
    zero (fewer than k positive pre-activations) carry idx -1 and val 0, so no backend has to agree on an
    order among zeros.
    """
    pre = pre.float()
    vals, idx = torch.topk(pre, k, dim=-1, sorted=True)
    # torch.topk promises nothing about equal values; rows whose k-th value ties with an unselected
    # latent are redone with a stable sort, which keeps the lower index first.
    kth = vals[:, -1:]
    boundary_tie = ((pre >= kth).sum(-1) > k) & (kth.squeeze(-1) > 0)
    if boundary_tie.any():
        rows = boundary_tie.nonzero().squeeze(1)
        sv, si = torch.sort(pre[rows], dim=-1, descending=True, stable=True)
        vals[rows], idx[rows] = sv[:, :k], si[:, :k]
    # Order the selected slots by (value desc, index asc).
    o = idx.argsort(dim=-1)
    idx, vals = idx.gather(-1, o), vals.gather(-1, o)
    o = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    idx, vals = idx.gather(-1, o), vals.gather(-1, o)
    vals = F.relu(vals)
    idx = torch.where(vals > 0, idx, torch.full_like(idx, -1))
    return idx, vals


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


def priority_key(act: torch.Tensor, n_priority: int) -> torch.Tensor:
    """Selection key [N, n] of ProtSAE's `topk_scope="defined_first"`: post-ReLU activations with every positive
    latent among the first `n_priority` lifted above the row's maximum (act + max_j act_j + 1), so TopK over it
    admits those first, and orders by value among them and among the rest. Shared by inference
    (`priority_topk_relu`) and training (`protsae_model.defined_first_codes`) so both select alike."""
    lift = act.amax(-1, keepdim=True) + 1.0
    col = torch.arange(act.shape[-1], device=act.device)
    return torch.where((col < n_priority) & (act > 0), act + lift, act)


def priority_topk_relu(pre: torch.Tensor, k: int, n_priority: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_relu` where the first `n_priority` latents, when positive, are admitted before all others.

    ProtSAE's `topk_scope="defined_first"`: a concept the model calls is never crowded out of the code. The
    selection is plain TopK over `priority_key`; the codes are the activations themselves, in the reference
    order (value desc, index asc), empty slots -1 / 0.
    """
    if n_priority <= 0:
        return topk_relu(pre, k)
    act = F.relu(pre.float())
    idx, _ = topk_relu(priority_key(act, n_priority), k)
    val = torch.where(idx >= 0, act.gather(-1, idx.clamp_min(0)), torch.zeros((), device=act.device))
    return canonical_order(idx, val)


@register_arch("topk")
class TopKSAE(SAE):
    """z = TopK(ReLU(W_enc (x_n - b_dec) + b_enc)), x_hat = W_dec^T z + b_dec, with x_n the normalised input."""

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        d, n = cfg.d_model, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(n, d))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            w = torch.randn(self.W_dec.shape, generator=g)
            w /= w.norm(dim=-1, keepdim=True)
            self.W_dec.copy_(w)
            self.W_enc.copy_(w)  # tied init (Gao et al.): encoder starts as the decoder's transpose

    # -- forward pieces -------------------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.normalize(x) - self.b_dec, self.W_enc, self.b_enc)

    def encoder_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) with pre = x @ W.T + b on raw activations: what every fast backend consumes."""
        with torch.no_grad():
            W = self.W_enc / self.norm_scale
            b = self.b_enc - self.W_enc @ (self.norm_mean / self.norm_scale + self.b_dec)
        return W.detach().clone(), b.detach().clone()

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        """Sparse codes as (idx [N,k], val [N,k]); idx -1 marks empty slots."""
        return EncoderOutput(*topk_relu(self.pre_activations(x), self.k))

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes [N, d_sae] (differentiable through the kept values; used in training)."""
        pre = F.relu(self.pre_activations(x))
        vals, idx = torch.topk(pre, self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals)
