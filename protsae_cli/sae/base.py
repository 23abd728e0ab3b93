"""The interface every SAE in protsae implements, its encoder output, and the registry from `arch` to class.

Why a base class: the annotate pipeline, the encode backends, eval and steer need a few capabilities of an SAE
(code width, priority latents, whether one affine map + TopK reproduces its codes, a concept predictor). They
used to probe for them with `getattr(sae, name, default)`, so a new architecture that forgot one silently got
the default. Here each capability is declared once with its default and its meaning; architectures override
what differs. The registry follows SAELens' (`arch` name -> class), so `build_sae(cfg)` needs no if-chain and a
checkpoint names its class by `cfg.arch`.
"""

from __future__ import annotations

import importlib
from typing import ClassVar, NamedTuple, TypeVar
from collections.abc import Callable

import torch
import torch.nn as nn

from protsae_cli.errors import InputError
from protsae_cli.sae.config import SAEConfig


class EncoderOutput(NamedTuple):
    """Sparse codes of a batch of rows, as every SAE's `encode` returns them (a tuple: `idx, val = sae.encode(x)`
    still works).

    Slots are ordered by (value desc, latent index asc); a row with fewer than `code_width` active latents pads
    with index -1 and value 0, so backends never have to agree on an order among zeros.
    """

    indices: torch.Tensor
    """int64 [N, code_width]: latent index per slot, -1 for an empty slot."""
    values: torch.Tensor
    """float32 [N, code_width]: the latent's activation (>= 0), 0 for an empty slot."""


class SAE(nn.Module):
    """Decoder, decoder bias and input normalisation shared by every architecture, plus the capabilities
    callers rely on, with their defaults.

    x_n = (x - norm_mean) / norm_scale is the normalised input; x_hat = denormalize(z W_dec + b_dec).
    Subclasses define the encoder (`pre_activations`, `encode`, `encode_dense`, `encoder_affine`) and their
    initialisation (`reset_parameters`).
    """

    arch: ClassVar[str] = ""
    """The `cfg.arch` value this class is registered under."""
    # Buffers (register_buffer in __init__), declared so type checkers see tensors, not `Tensor | Module`.
    norm_mean: torch.Tensor
    norm_scale: torch.Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_model, cfg.d_sae
        self.W_dec = nn.Parameter(torch.empty(n, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("norm_mean", torch.zeros(d))
        self.register_buffer("norm_scale", torch.ones(()))

    @classmethod
    def from_config(cls, cfg: SAEConfig) -> SAE:
        """The module a checkpoint's config describes (weights not loaded yet): what `build_sae` calls."""
        return cls(cfg)

    # -- capabilities (override where an architecture differs) -------------------------------------------
    @property
    def k(self) -> int:
        """Latents TopK keeps per row."""
        return self.cfg.k

    @property
    def code_width(self) -> int:
        """Slots per row that `encode()` returns (k; a ProtSAE that keeps its m defined latents outside TopK
        returns k + m)."""
        return self.cfg.k

    @property
    def priority_latents(self) -> int:
        """Latents 0..p-1 that TopK admits first when positive (`priority_topk_relu`); 0 for plain TopK. What an
        affine backend needs besides (W, b, k) to reproduce `encode()`."""
        return 0

    @property
    def supports_affine_encode(self) -> bool:
        """True when `encoder_affine()` + (priority) TopK reproduces `encode()`: what the fused Triton kernel,
        ONNX export and the onnx backend need. False sends annotate to the torch backend."""
        return True

    @property
    def n_concepts(self) -> int:
        """Latents bound to concepts by a concept predictor (ProtSAE's defined latents); 0 when none."""
        return 0

    @property
    def has_concept_predictor(self) -> bool:
        """True when `concept_probabilities()` gives P(concept | residue) from a trained predictor."""
        return False

    def concept_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """[N, n_concepts] predictor probabilities; only for SAEs with `has_concept_predictor`."""
        raise NotImplementedError(f"a {self.arch or type(self).__name__} SAE has no concept predictor")

    def backend_refusal(self, backend: str) -> str:
        """Why `backend` (triton, onnx: TopK over affine pre-activations) cannot encode this SAE; asked only
        when `supports_affine_encode` is False."""
        return (f"the {backend} backend encodes TopK over affine pre-activations, which does not reproduce this "
                f"{self.arch or type(self).__name__} SAE's codes; use --backend torch or auto")

    # -- the encoder (each architecture) --------------------------------------------------------------------
    def reset_parameters(self, seed: int | None = None) -> None:
        raise NotImplementedError

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable pre-activations [N, d_sae] of raw (unnormalised) inputs."""
        raise NotImplementedError

    def encoder_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) with pre = x @ W.T + b on raw activations: what every fast backend consumes."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        """Sparse codes of raw inputs [N, d_model]."""
        raise NotImplementedError

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes [N, d_sae] (differentiable through the kept values; used in training)."""
        raise NotImplementedError

    # -- normalisation and decoder (shared) -----------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.norm_mean) / self.norm_scale

    def denormalize(self, x_n: torch.Tensor) -> torch.Tensor:
        return x_n * self.norm_scale + self.norm_mean

    @torch.no_grad()
    def fit_normalization(self, x: torch.Tensor) -> None:
        """Per-dimension mean and one scale so that E||x_n||^2 = d_model (comparable losses across layers)."""
        x = x.float()
        mean = x.mean(0)
        scale = ((x - mean).pow(2).sum(-1).mean() / x.shape[-1]).sqrt().clamp_min(1e-8)
        self.norm_mean.copy_(mean)
        self.norm_scale.copy_(scale)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.denormalize(z @ self.W_dec + self.b_dec)

    def decode_sparse(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        safe = idx.clamp_min(0)
        rows = self.W_dec[safe] * (val * (idx >= 0)).unsqueeze(-1).to(self.W_dec.dtype)
        return self.denormalize(rows.sum(-2) + self.b_dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode_dense(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # type: ignore[misc]  # in place: W_dec stays this Parameter


# -- registry ---------------------------------------------------------------------------------------------

SAE_ARCHS: dict[str, type[SAE]] = {}
"""`cfg.arch` -> class, filled as architecture modules are imported (`register_arch`)."""

#: Where each built-in architecture lives, imported on first use (ProtSAE pulls in the EL loss code).
_ARCH_MODULES = {"topk": "protsae_cli.sae.topk", "protsae": "protsae_cli.sae.protsae",
                 "foreign_topk": "protsae_cli.sae.foreign"}

_S = TypeVar("_S", bound=type[SAE])


def register_arch(name: str) -> Callable[[_S], _S]:
    """Class decorator: make `cfg.arch == name` build this class."""
    def deco(cls: _S) -> _S:
        cls.arch = name
        SAE_ARCHS[name] = cls
        return cls
    return deco


def sae_class(arch: str) -> type[SAE]:
    """The class registered for `arch` (importing a built-in architecture's module on first use)."""
    if arch not in SAE_ARCHS and arch in _ARCH_MODULES:
        importlib.import_module(_ARCH_MODULES[arch])
    try:
        return SAE_ARCHS[arch]
    except KeyError:
        raise InputError(f"unknown SAE architecture {arch!r}; known: {', '.join(sorted(_ARCH_MODULES))}") from None
