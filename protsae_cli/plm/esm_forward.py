"""Run ESM-2 up to a named hook point, or through to the logits with an edit at the hook.

We drive fair-esm's own submodules layer by layer instead of calling `ESM2.forward`, for three reasons:
annotation stops at the hooked layer (the rest of the network is wasted work), `attn_out` lives *inside* a
block where fair-esm offers no hook, and steering/fidelity need to replace the activation at the hook and run
the remaining layers and the LM head (never the LM head on a mid-network activation).

Two attention implementations share the same weights:
- `reference`: fair-esm's own MultiheadAttention module, in fair-esm's (T, B, C) layout: bit-identical to
  `ESM2.forward(..., repr_layers=[L])` (tested).
- `sdpa`: PyTorch scaled_dot_product_attention (FlashAttention/efficient kernels on GPU), batch-first; equal
  to the reference within floating-point tolerance (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from protsae_cli.errors import InputError

HOOK_POINTS = ("resid_post", "attn_out")
Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HookPoint:
    point: str  # "resid_post" | "attn_out"
    layer: int  # 1-based transformer block

    def __post_init__(self) -> None:
        if self.point not in HOOK_POINTS:
            raise InputError(f"unknown hook point {self.point!r}; choose {' or '.join(HOOK_POINTS)}")
        if self.layer < 1:
            raise InputError(f"layer must be >= 1 (1-based block index), got {self.layer}")

    def __str__(self) -> str:
        return f"{self.point}@{self.layer}"


class Tokenizer:
    """Vectorised ESM alphabet tokenizer: BOS + residues + EOS, right-padded (fair-esm's batch converter is
    per-character Python and dominates small-model throughput)."""

    def __init__(self, alphabet) -> None:
        self.alphabet = alphabet
        self.pad, self.bos, self.eos = alphabet.padding_idx, alphabet.cls_idx, alphabet.eos_idx
        self.mask = alphabet.mask_idx
        table = np.full(256, alphabet.unk_idx, dtype=np.int64)
        for tok, i in alphabet.tok_to_idx.items():
            if len(tok) == 1:
                table[ord(tok)] = i
        self.table = table

    def encode_one(self, seq: str) -> np.ndarray:
        return self.table[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]

    def batch(self, seqs: Sequence[str]) -> torch.Tensor:
        T = max(len(s) for s in seqs) + 2
        out = np.full((len(seqs), T), self.pad, dtype=np.int64)
        for i, s in enumerate(seqs):
            out[i, 0] = self.bos
            out[i, 1:len(s) + 1] = self.encode_one(s)
            out[i, len(s) + 1] = self.eos
        return torch.from_numpy(out)


class EsmRunner:
    """Layer-by-layer ESM-2 forward with a hook point. Inputs are token tensors [B, T] with BOS/EOS/padding."""

    def __init__(self, plm, device: str | torch.device = "cpu", attention: str = "auto",
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.plm = plm
        self.model = plm.model
        self.device = torch.device(device)
        if attention == "auto":
            attention = "sdpa"  # measured 3x faster than fair-esm attention even on CPU
        if attention not in ("reference", "sdpa"):
            raise InputError(f"unknown attention implementation {attention!r}")
        self.attention = attention
        if autocast_dtype is None and self.device.type == "cuda":
            autocast_dtype = torch.bfloat16
        self.autocast_dtype = autocast_dtype
        self.tokenizer = Tokenizer(plm.alphabet)

    # -- public API ----------------------------------------------------------------------------------
    def check_hook(self, hook: HookPoint) -> None:
        if hook.layer > self.model.num_layers:
            raise InputError(f"hook {hook} is past the last layer of {self.plm.name} "
                             f"({self.model.num_layers} layers)")

    @torch.no_grad()
    def hook_activations(self, tokens: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        """Activations at the hook, [B, T, d] float32, running only the layers needed."""
        self.check_hook(hook)
        out: dict[str, torch.Tensor] = {}

        def capture(x: torch.Tensor) -> torch.Tensor:
            out["x"] = x
            return x

        self._run(tokens, hook, capture, stop_at_hook=True)
        return out["x"].float()

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, hook: HookPoint | None = None, edit: Edit | None = None) -> torch.Tensor:
        """Full forward to the LM head; `edit` (if given) replaces the activation at `hook` ([B,T,d] -> same)."""
        if hook is not None:
            self.check_hook(hook)
        return self._run(tokens, hook, edit, stop_at_hook=False).float()

    # -- internals -----------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _embed(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """fair-esm's embedding with token-dropout rescaling and zeroed padding (same op order)."""
        m = self.model
        x = m.embed_scale * m.embed_tokens(tokens)
        if m.token_dropout:
            x = x.masked_fill((tokens == m.mask_idx).unsqueeze(-1), 0.0)
            mask_ratio_train = 0.15 * 0.8
            src_lengths = (~padding_mask).sum(-1)
            mask_ratio_observed = (tokens == m.mask_idx).sum(-1).to(x.dtype) / src_lengths
            x = x * (1 - mask_ratio_train) / (1 - mask_ratio_observed)[:, None, None]
        return x * (1 - padding_mask.unsqueeze(-1).type_as(x))

    def _run(self, tokens: torch.Tensor, hook: HookPoint | None, edit: Edit | None, stop_at_hook: bool):
        m = self.model
        tokens = tokens.to(self.device, non_blocking=True)
        padding_mask = tokens.eq(m.padding_idx)
        with self._autocast():
            x = self._embed(tokens, padding_mask)  # [B, T, C]
            ref = self.attention == "reference"
            if ref:
                x = x.transpose(0, 1)  # fair-esm's (T, B, C)
            kpm = padding_mask if padding_mask.any() else None
            n_layers = hook.layer if (stop_at_hook and hook is not None) else m.num_layers
            point = hook.point if hook is not None else None
            for li in range(n_layers):
                layer = m.layers[li]
                here = hook is not None and hook.layer == li + 1
                residual = x
                h = layer.self_attn_layer_norm(x)
                if ref:
                    h, _ = layer.self_attn(query=h, key=h, value=h, key_padding_mask=kpm, need_weights=False)
                else:
                    h = _sdpa_self_attention(layer.self_attn, h, kpm)
                x = residual + h
                if here and point == "attn_out":
                    x = self._apply(x, edit, ref)
                    if stop_at_hook:
                        return x
                residual = x
                h = layer.final_layer_norm(x)
                h = layer.fc2(_gelu(layer.fc1(h)))
                x = residual + h
                if here and point == "resid_post":
                    last = li + 1 == m.num_layers
                    if last:  # fair-esm's repr for the last layer includes the final layer norm
                        x = m.emb_layer_norm_after(x)
                    x = self._apply(x, edit, ref)
                    if stop_at_hook:
                        return x
                    if last:
                        return m.lm_head(x.transpose(0, 1) if ref else x)
            x = m.emb_layer_norm_after(x)
            if ref:
                x = x.transpose(0, 1)
            return m.lm_head(x)

    @staticmethod
    def _apply(x: torch.Tensor, edit: Edit | None, ref: bool) -> torch.Tensor:
        """Call `edit` on batch-first [B, T, C] activations whatever the internal layout."""
        if edit is None:
            return x
        if ref:
            return edit(x.transpose(0, 1)).transpose(0, 1)
        return edit(x)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    # fair-esm's gelu: exact erf form.
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _sdpa_self_attention(mha, h: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """fair-esm MultiheadAttention (rotary, no bias_kv) computed with scaled_dot_product_attention."""
    B, T, C = h.shape
    H = mha.num_heads
    hd = C // H
    q = mha.q_proj(h).view(B, T, H, hd).transpose(1, 2)
    k = mha.k_proj(h).view(B, T, H, hd).transpose(1, 2)
    v = mha.v_proj(h).view(B, T, H, hd).transpose(1, 2)
    if mha.rot_emb is not None:
        q, k = mha.rot_emb(q.reshape(B * H, T, hd), k.reshape(B * H, T, hd))
        q, k = q.view(B, H, T, hd), k.view(B, H, T, hd)
    attn_mask = None
    if key_padding_mask is not None:
        attn_mask = (~key_padding_mask)[:, None, None, :]  # True = attend
    o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask)
    return mha.out_proj(o.transpose(1, 2).reshape(B, T, C))


def residue_rows(acts: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """Strip BOS/EOS/padding: row i of protein b is residue i+1 (the HDF5 row convention)."""
    return [acts[b, 1:n + 1] for b, n in enumerate(lengths)]
