"""Published SAE formats read as protsae SAEs: InterPLM, InterProt, SAELens, sparsify and plm-sae checkpoints.

Each loader converts the foreign weights into protsae's own objects (an `SAEConfig` and a `TopKSAE`, or a
`ForeignTopKSAE` where the format computes something one affine map + TopK cannot: a per-residue input
normalisation, JumpReLU thresholds, a per-latent rescale after TopK). The conventions of every format (which
side is transposed, which bias is subtracted before encoding, the activation, the normalisation) and the
public source each was read from are in docs/FOREIGN_SAES.md.

Nothing here unpickles: `.pt` files are read with `torch.load(weights_only=True)` (a plain state dict of
tensors loads; a pickle that would run code is refused), everything else is safetensors + JSON. Sizes come
from the tensors themselves, so a hostile config cannot make protsae allocate more than the file holds.

What a format does not record (the PLM, the layer, the number of code slots of a ReLU SAE) is given by the
caller: `--sae-plm`, `--sae-layer`, `--sae-k` on the command line, which travel inside the `--sae` value as
``PATH#layer=24,plm=esm2_t33_650M_UR50D,k=64`` (`with_options`), so worker processes, `--resume`
fingerprints and provenance see them too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protsae_cli.errors import CompatibilityError, InputError
from protsae_cli.io.checksum import file_sha256
from protsae_cli.sae.config import SAEConfig
from protsae_cli.sae.base import EncoderOutput, register_arch
from protsae_cli.sae.topk import TopKSAE, topk_relu

log = logging.getLogger("protsae.foreign_sae")

FORMATS = ("interplm", "interprot", "saelens", "sparsify", "plm-sae")
OPTION_SEP = "#"
OPTION_KEYS = ("layer", "plm", "k", "model")

#: ESM-2 width -> fair-esm name (each width is one ESM-2 model).
_ESM2_BY_WIDTH = {320: "esm2_t6_8M_UR50D", 480: "esm2_t12_35M_UR50D", 640: "esm2_t30_150M_UR50D",
                  1280: "esm2_t33_650M_UR50D", 2560: "esm2_t36_3B_UR50D", 5120: "esm2_t48_15B_UR50D"}
#: InterPLM's Hugging Face repositories (Elana/InterPLM-<model>) -> fair-esm name.
_INTERPLM_REPOS = {"esm2-8m": "esm2_t6_8M_UR50D", "esm2-650m": "esm2_t33_650M_UR50D"}
#: InterProt's default k (`SparseAutoencoder(d_model, d_hidden)` in interprot/sae_model.py and its handlers).
INTERPROT_DEFAULT_K = 128
#: plm-sae's AutoEncoder (edithvillegas/plm-sae sae/SAE_methods.py): its whole state dict.
PLM_SAE_KEYS = frozenset({"W_enc", "W_dec", "b_enc", "b_dec"})
#: The SAE that repository publishes (Hugging Face evillegasgarcia/sae_esm2_6_l3): its model card says "layer 3
#: of esm2_t6_8M_UR50D" and its README hooks `esm.encoder.layer.3.output` (0-based module index 3), which is the
#: output of the 4th block: protsae's layer 4 (HF hidden_states[4]).
PLM_SAE_PUBLISHED = re.compile(r"evillegasgarcia(?:/|--)sae_esm2_6_l3(?![\w.-])")
PLM_SAE_PUBLISHED_META = (4, "esm2_t6_8M_UR50D", "esm.encoder.layer.3.output")
ROW_NORMS = ("none", "unit_sqrt_d", "layer_norm")


@dataclass(frozen=True)
class ForeignOptions:
    """What the caller says about a foreign SAE: protsae layer (1-based block), PLM name, code slots."""

    layer: int | None = None
    plm: str | None = None
    k: int | None = None
    model: str | None = None  # the --model given with it: the PLM when the SAE names none and --sae-plm is absent

    def any(self) -> bool:
        return any(v is not None for v in (self.layer, self.plm, self.k, self.model))


def with_options(sae: str, layer: int | None = None, plm: str | None = None, k: int | None = None,
                 model: str | None = None) -> str:
    """The `--sae` value carrying the CLI's --sae-layer/--sae-plm/--sae-k and the --model's name (unchanged
    when none is given). `model` is only a fallback: a PLM the SAE records, or --sae-plm, wins over it."""
    if model is not None:
        model = re.sub(r"[,=#]", "_", Path(model).name.removesuffix(".pt"))
    for flag, value in (("--sae-plm", plm),):
        if value is not None and re.search(r"[,=#]", value):
            raise InputError(f"{flag} {value!r}: a PLM name cannot contain ',', '=' or '{OPTION_SEP}'")
    parts = [f"{key}={v}" for key, v in (("layer", layer), ("plm", plm), ("k", k), ("model", model))
             if v is not None]
    return f"{sae}{OPTION_SEP}{','.join(parts)}" if parts else sae


def from_flags(sae: str, layer: int | None = None, plm: str | None = None, k: int | None = None,
               model: str | None = None) -> str:
    """The `--sae` value a command should load: with the foreign flags folded in (`with_options`) when any is
    given, or when --model is given and `sae` is a published format (its PLM fallback); else `sae` as it is.
    One rule for every command that takes --sae-layer/--sae-plm/--sae-k."""
    if layer or plm or k or (model and detect(sae)):
        return with_options(sae, layer, plm, k, model=model)
    return sae


def split_options(spec: str | os.PathLike[str]) -> tuple[Path, ForeignOptions]:
    """Split ``PATH#layer=L,plm=NAME,k=K`` into the path and its options; a path that exists is taken whole."""
    s = str(spec)
    if OPTION_SEP not in s or Path(s).exists():
        return Path(s), ForeignOptions()
    base, _, tail = s.rpartition(OPTION_SEP)
    values: dict[str, Any] = {}
    for item in filter(None, tail.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in OPTION_KEYS or key in values:
            raise InputError(f"--sae {s!r}: expected PATH{OPTION_SEP}layer=L,plm=NAME,k=K, got {item!r}")
        if key in ("layer", "k"):
            if not value.isdigit() or int(value) < 1:
                raise InputError(f"--sae {s!r}: {key} must be a positive integer, got {value!r}")
            values[key] = int(value)
        else:
            values[key] = value
    return Path(base), ForeignOptions(**values)


# -- detection ------------------------------------------------------------------------------------------------

def detect(spec: str | os.PathLike[str]) -> str | None:
    """The foreign format at `spec` ('interplm-or-interprot' for a .pt state dict, or one of FORMATS), or None
    for a protsae SAE or anything else, which `sae.load_sae` then explains in its own words.

    Decided from file names and headers only (nothing is loaded): a protsae directory has config.json, SAELens
    and sparsify directories cfg.json; a protsae .safetensors embeds its config in the header.
    """
    path, opts = split_options(spec)
    fmt = _detect_path(_hf_snapshot(path))
    if fmt is None and opts.any():
        where = path if path.exists() else f"{path} (not found)"
        raise InputError(f"--sae {where}: --sae-layer/--sae-plm/--sae-k apply to published SAE formats "
                         f"({', '.join(FORMATS)}); a protsae SAE records its own layer, PLM and k")
    return fmt


def _hf_snapshot(p: Path) -> Path:
    """A Hugging Face cache repo folder (models--ORG--NAME) stands for its refs/main snapshot."""
    if p.is_dir() and (p / "snapshots").is_dir() and not (p / "config.json").exists():
        from protsae_cli.plm.hf_esm import snapshot_of

        return snapshot_of(p) or p
    return p


def _detect_path(p: Path) -> str | None:
    if p.is_dir():
        if (p / "cfg.json").is_file():
            if (p / "sae_weights.safetensors").is_file():
                return "saelens"
            if (p / "sae.safetensors").is_file():
                return "sparsify"
        if (p / "config.json").exists():
            return "plm-sae" if _plm_sae_hub_cfg(p) is not None and _plm_sae_weights_in(p) else None
        if _sparsify_layer_dirs(p):
            return "sparsify"
        return None
    if not p.is_file():
        return None
    if p.name in _PLM_SAE_WEIGHTS and _plm_sae_hub_cfg(p.parent) is not None:
        return "plm-sae"  # the weights file of a PyTorchModelHubMixin folder (config.json {"cfg": ...})
    if p.suffix in (".pt", ".pth", ".ckpt"):
        return "interplm-or-interprot"
    if p.suffix == ".safetensors":
        if (p.parent / "cfg.json").is_file() and p.name in ("sae_weights.safetensors", "sae.safetensors"):
            return "saelens" if p.name == "sae_weights.safetensors" else "sparsify"
        keys, meta = _safetensors_header(p)
        if keys is None or "config" in meta:
            return None  # not safetensors, or a protsae file with its config embedded
        if {"encoder.weight", "decoder.weight"} <= keys:
            return "interplm"
        if {"w_enc", "w_dec", "b_pre"} <= keys:
            return "interprot"
        if keys == PLM_SAE_KEYS:
            return "plm-sae"
    return None


#: The weights PyTorchModelHubMixin writes: safetensors in current huggingface_hub, a pickled state dict in old ones.
_PLM_SAE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _plm_sae_hub_cfg(d: Path) -> dict[str, Any] | None:
    """plm-sae's `cfg` dict from a PyTorchModelHubMixin config.json, which stores the __init__ arguments
    (`AutoEncoder(cfg)`, so `{"cfg": {...}}`); None when the folder holds no such config."""
    p = d / "config.json"
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(data, dict) and isinstance(data.get("cfg"), dict) and "format" not in data \
            and "model_type" not in data:
        return data["cfg"]
    return None


def _plm_sae_weights_in(d: Path) -> Path | None:
    return next((d / n for n in _PLM_SAE_WEIGHTS if (d / n).is_file()), None)


def _safetensors_header(p: Path) -> tuple[set[str] | None, dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            return set(f.keys()), dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 (safetensors' own error types: not ours to explain here)
        return None, {}


def _sparsify_layer_dirs(p: Path) -> list[Path]:
    try:
        return sorted(d for d in p.iterdir() if d.is_dir() and (d / "cfg.json").is_file()
                      and (d / "sae.safetensors").is_file())
    except OSError:
        return []


# -- the module ---------------------------------------------------------------------------------------------

@register_arch("foreign_topk")
class ForeignTopKSAE(TopKSAE):
    """TopKSAE plus what some formats compute beyond one affine map + TopK(ReLU):

    - `row_norm`: a per-residue input normalisation applied before everything else ("unit_sqrt_d":
      x / ||x|| * sqrt(d), InterPLM normalize_to_sqrt_d and SAELens constant_norm_rescale; "layer_norm":
      (x - mean) / (std + 1e-5) with the unbiased std, InterProt and SAELens layer_norm);
    - `threshold` [d_sae]: JumpReLU, a latent is active only when its pre-activation exceeds it;
    - `post_scale` [d_sae]: activations divided by it after TopK selection (InterPLM's
      activation_rescale_factor on a TopK SAE, where dividing before would change which latents win).

    None of these fits `encoder_affine()`, so encoding runs here (the torch backend calls `encode`).
    """

    def __init__(self, cfg: SAEConfig, row_norm: str = "none", threshold: bool = False,
                 post_scale: bool = False) -> None:
        super().__init__(cfg)
        if row_norm not in ROW_NORMS:
            raise InputError(f"unknown input normalisation {row_norm!r}")
        self.row_norm = row_norm
        self.threshold: torch.Tensor | None
        self.post_scale: torch.Tensor | None
        if threshold:
            self.register_buffer("threshold", torch.zeros(cfg.d_sae))
        else:
            self.threshold = None
        if post_scale:
            self.register_buffer("post_scale", torch.ones(cfg.d_sae))
        else:
            self.post_scale = None

    @classmethod
    def from_config(cls, cfg: SAEConfig) -> ForeignTopKSAE:
        """The module a protsae directory of arch ``foreign_topk`` describes (written by `protsae label`):
        `cfg.foreign` says which of the non-affine parts it has; their tensors are in the weights file."""
        spec = cfg.foreign
        row_norm = spec.get("row_norm", "none")
        threshold, post_scale = spec.get("threshold", False), spec.get("post_scale", False)
        if row_norm not in ROW_NORMS:
            raise InputError(f"foreign.row_norm must be one of {', '.join(ROW_NORMS)}, got {row_norm!r}")
        if not isinstance(threshold, bool) or not isinstance(post_scale, bool):
            raise InputError(f"foreign.threshold and foreign.post_scale must be true or false, got "
                             f"{threshold!r}, {post_scale!r}")
        sae = cls(cfg, row_norm, threshold, post_scale)
        sae.source_format = str(spec.get("source_format", "foreign"))
        return sae

    def protsae_config(self) -> SAEConfig:
        """This module's config as a protsae directory records it (arch ``foreign_topk``, `from_config` reads
        it back), so a saved copy needs no --sae-layer/--sae-plm/--sae-k."""
        import dataclasses

        return dataclasses.replace(self.cfg, arch="foreign_topk", foreign={
            "row_norm": self.row_norm, "threshold": self.threshold is not None,
            "post_scale": self.post_scale is not None, "source_format": self.source_format})

    @property
    def supports_affine_encode(self) -> bool:
        return self.row_norm == "none" and self.threshold is None and self.post_scale is None

    def backend_refusal(self, backend: str) -> str:
        """Why `backend` (triton, onnx: TopK over affine pre-activations) cannot run this SAE."""
        return (f"the {backend} backend encodes TopK over affine pre-activations; this {self.source_format} SAE "
                f"also needs {self._non_affine_parts()}; use --backend torch or auto")

    source_format = "foreign"

    def _non_affine_parts(self) -> str:
        parts = ([f"a per-residue input normalisation ({self.row_norm})"] if self.row_norm != "none" else []) + \
                (["JumpReLU thresholds"] if self.threshold is not None else []) + \
                (["a per-latent rescale after TopK"] if self.post_scale is not None else [])
        return " and ".join(parts) or "nothing else"

    def _row_normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_n, shift, scale) with x = x_n * scale + shift."""
        if self.row_norm == "unit_sqrt_d":
            norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            scale = norm / math.sqrt(x.shape[-1])
            return x / scale, torch.zeros_like(norm), scale
        if self.row_norm == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            std = xc.std(dim=-1, keepdim=True)
            return xc / (std + 1e-5), mu, std
        one = torch.ones((*x.shape[:-1], 1), dtype=x.dtype, device=x.device)
        return x, torch.zeros_like(one), one

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x_n, _, _ = self._row_normalize(x.float())
        return super().pre_activations(x_n)

    def encoder_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.supports_affine_encode:
            raise InputError(f"this {self.source_format} SAE is not one affine map + TopK (it also needs "
                             f"{self._non_affine_parts()}), which ONNX export and the triton/onnx backends "
                             "require; annotate encodes it with the torch backend")
        return super().encoder_affine()

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        # EncoderOutput (a tuple: `idx, val = ...` unchanged), so `.indices`/`.values` work as for every SAE
        from protsae_cli.sae.topk import canonical_order

        pre = self.pre_activations(x)
        if self.threshold is not None:
            pre = torch.where(pre > self.threshold, pre, torch.zeros((), dtype=pre.dtype, device=pre.device))
        idx, val = topk_relu(pre, self.k)
        if self.post_scale is None:
            return EncoderOutput(idx, val)
        scale = self.post_scale[idx.clamp_min(0)]
        val = torch.where((idx >= 0) & (scale > 0), val / scale.clamp_min(1e-30), torch.zeros_like(val))
        return EncoderOutput(*canonical_order(idx, val))

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        idx, val = self.encode(x)
        z = torch.zeros((*idx.shape[:-1], self.cfg.d_sae), dtype=val.dtype, device=val.device)
        return z.scatter(-1, idx.clamp_min(0), torch.where(idx >= 0, val, torch.zeros_like(val)))

    def _raw_codes(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.post_scale is None else z * self.post_scale

    def _no_row_norm(self, what: str) -> None:
        if self.row_norm != "none":
            raise InputError(f"{what} of this {self.source_format} SAE needs each residue's own input norm "
                             f"({self.row_norm}), which codes alone do not carry; use forward(x)")

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._no_row_norm("decoding")
        return super().decode(self._raw_codes(z))

    def decode_sparse(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        self._no_row_norm("decoding")
        if self.post_scale is not None:
            val = val * self.post_scale[idx.clamp_min(0)]
        return super().decode_sparse(idx, val)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the input's own scale (the per-residue normalisation undone)."""
        x = x.float()
        _, shift, scale = self._row_normalize(x)
        z = self._raw_codes(self.encode_dense(x))
        return (z @ self.W_dec + self.b_dec) * scale + shift


# -- loading ------------------------------------------------------------------------------------------------

@dataclass
class _Converted:
    """Weights in protsae's layout: pre = W_enc (x_n - b_dec) + b_enc; x_hat = W_dec^T z + b_dec."""

    fmt: str
    W_enc: torch.Tensor          # [d_sae, d_model]
    b_enc: torch.Tensor          # [d_sae]
    W_dec: torch.Tensor          # [d_sae, d_model]
    b_dec: torch.Tensor          # [d_model]
    k: int | None                # the format's own k (None: ReLU/JumpReLU, every positive latent)
    arch: str                    # what the source computes, for messages and provenance
    row_norm: str = "none"
    threshold: torch.Tensor | None = None
    post_scale: torch.Tensor | None = None
    layer: int | None = None     # protsae layer from the format's metadata
    hook_point: str = "resid_post"
    plm: str | None = None       # fair-esm name from the format's metadata
    excludes_final_norm: bool = False  # the source hooks a block's module output (no final layer norm)
    where: str = ""              # how layer/PLM were read, for the log


def load(spec: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[TopKSAE, str]:
    """Read a foreign SAE as a protsae module. Returns (module, sha256 of the weights file)."""
    path, opts = split_options(spec)
    path = _hf_snapshot(path)
    fmt = _detect_path(path)
    if fmt is None:
        raise InputError(f"{path}: not a published SAE format protsae reads ({', '.join(FORMATS)})")
    if fmt == "sparsify" and path.is_dir() and not (path / "cfg.json").is_file():
        path = _pick_sparsify_layer(path, opts)
    if fmt == "saelens":
        d = path if path.is_dir() else path.parent
        conv, w_path = _from_saelens(d), d / "sae_weights.safetensors"
    elif fmt == "sparsify":
        d = path if path.is_dir() else path.parent
        conv, w_path = _from_sparsify(d), d / "sae.safetensors"
    elif fmt == "plm-sae":
        w_path = (_plm_sae_weights_in(path) or path) if path.is_dir() else path
        conv = _from_plm_sae(_read_state_dict(w_path), w_path)
    else:
        state = _read_state_dict(path)
        w_path = path
        if {"w_enc", "w_dec", "b_pre"} <= set(state):
            conv = _from_interprot(state, path, opts)
        elif {"encoder.weight", "decoder.weight"} <= set(state):
            conv = _from_interplm(state, path)
        elif set(state) == PLM_SAE_KEYS:
            conv = _from_plm_sae(state, path)
        else:
            raise InputError(f"{path}: neither an InterPLM state dict (encoder.weight, decoder.weight), an "
                             f"InterProt one (w_enc, w_dec, b_pre) nor a plm-sae one (W_enc, W_dec, b_enc, "
                             f"b_dec); it holds {', '.join(sorted(state)[:8])}")
    sae = _build(conv, opts, str(path))
    return sae.to(device).eval(), file_sha256(w_path)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict of tensors: safetensors, or a .pt read with weights_only=True (never unpickled)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except Exception as e:  # safetensors' own error types
            raise InputError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from e
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for anything beyond tensors and plain containers
            raise InputError(f"{path}: not a plain tensor state dict; protsae reads .pt files only with "
                             f"torch.load(weights_only=True) and never unpickles code ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        # A Lightning checkpoint of InterProt's SAEModule: the weights under "sae_model." (their handler).
        state = {k.removeprefix("sae_model."): v for k, v in state["state_dict"].items()}
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return {str(k): v for k, v in state.items()}


def _tensor(state: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    t = state.get(key)
    if t is None:
        raise InputError(f"{where}: missing tensor {key!r}")
    if tuple(t.shape) != shape:
        raise InputError(f"{where}: {key} has shape {tuple(t.shape)}, expected {shape}")
    t = t.detach().float()
    if not torch.isfinite(t).all():
        raise InputError(f"{where}: {key} holds NaN or infinite values")
    return t


def _matrix_shape(state: dict[str, torch.Tensor], key: str, where: str) -> tuple[int, int]:
    t = state.get(key)
    if t is None or t.dim() != 2:
        raise InputError(f"{where}: {key!r} must be a 2-D tensor, got "
                         f"{'nothing' if t is None else tuple(t.shape)}")
    return int(t.shape[0]), int(t.shape[1])


def _from_interplm(state: dict[str, torch.Tensor], path: Path) -> _Converted:
    """ElanaPearl/InterPLM interplm/sae/dictionary.py (dictionary_learning-style state dicts).

    encoder = nn.Linear(d, n): weight [n, d]; decoder = nn.Linear(n, d): weight [d, n] (protsae's W_dec is its
    transpose). ReLUSAE (the published AutoEncoder): f = ReLU(encoder(x - bias)), x_hat = decoder(f) + bias.
    TopKSAE: f = TopK(ReLU(encoder(x - b_dec))), b_dec added after decoding. JumpReLUSAE: f =
    ReLU(pre * (pre > threshold)) with pre = encoder(x) (apply_b_dec_to_input=False), decoder has a bias.
    ReLUSAE_Tied: f = ReLU(encoder(x)), x_hat = decoder(f) (decoder bias). Features are divided by
    `activation_rescale_factor` (normalize_features=True; the published ae_normalized.pt files fold it into
    the weights instead), inputs scaled to norm sqrt(d) first when `normalize_to_sqrt_d` is true.
    """
    where = str(path)
    n, d = _matrix_shape(state, "encoder.weight", where)
    W_enc = _tensor(state, "encoder.weight", (n, d), where)
    b_enc = _tensor(state, "encoder.bias", (n,), where) if "encoder.bias" in state else torch.zeros(n)
    W_dec = _tensor(state, "decoder.weight", (d, n), where).T.contiguous()
    threshold = None
    if "k" in state:
        arch, b_dec, subtract = "InterPLM TopKSAE", _tensor(state, "b_dec", (d,), where), True
        k_t = state["k"]
        if k_t.numel() != 1 or k_t.dtype.is_floating_point:
            raise InputError(f"{where}: 'k' must be one integer, got {tuple(k_t.shape)} {k_t.dtype}")
        k: int | None = int(k_t.item())
    elif "threshold" in state and state["threshold"].numel() == n:
        arch, b_dec, subtract, k = "InterPLM JumpReLUSAE", _tensor(state, "decoder.bias", (d,), where), False, None
        threshold = _tensor(state, "threshold", (n,), where)
    elif "bias" in state:
        arch, b_dec, subtract, k = "InterPLM ReLUSAE", _tensor(state, "bias", (d,), where), True, None
    elif "decoder.bias" in state:
        arch, b_dec, subtract, k = "InterPLM ReLUSAE_Tied", _tensor(state, "decoder.bias", (d,), where), False, None
    else:
        raise InputError(f"{where}: an InterPLM state dict needs a pre-encoder bias ('bias' or 'b_dec') or a "
                         "decoder bias; found none")
    if not subtract:  # pre = W x + b  ==  W (x - b_dec) + (b + W b_dec)
        b_enc = b_enc + W_enc @ b_dec
    sqrt_d = state.get("normalize_to_sqrt_d")
    row_norm = "unit_sqrt_d" if sqrt_d is not None and bool(sqrt_d.reshape(-1)[0]) else "none"
    post_scale = None
    if "activation_rescale_factor" in state:
        s = _tensor(state, "activation_rescale_factor", (n,), where)
        if (s < 0).any():
            raise InputError(f"{where}: activation_rescale_factor has negative entries")
        if not torch.equal(s, torch.ones_like(s)):
            if k is None:  # dense activations: dividing by s > 0 commutes with ReLU and thresholds, fold it
                live = s > 0
                inv = torch.where(live, 1.0 / s.clamp_min(1e-30), torch.zeros_like(s))
                W_enc, b_enc = W_enc * inv[:, None], b_enc * inv
                W_dec = W_dec * s[:, None]
                if threshold is not None:
                    threshold = torch.where(live, threshold * inv, torch.zeros_like(threshold))
            else:  # TopK selects on the unscaled values; the division comes after
                post_scale = s
    layer, plm, how = None, None, []
    if m := re.fullmatch(r"layer_(\d+)", path.parent.name):
        layer = int(m.group(1))
        how.append(f"layer {layer} from the folder {path.parent.name}")
    if m := re.search(r"InterPLM-(esm2-(?:8m|650m))", str(path), flags=re.IGNORECASE):
        plm = _INTERPLM_REPOS[m.group(1).lower()]
        how.append(f"PLM {plm} from {m.group(0)} in the path")
    return _Converted("interplm", W_enc, b_enc, W_dec, b_dec, k, arch, row_norm=row_norm, threshold=threshold,
                      post_scale=post_scale, layer=layer, plm=plm, where="; ".join(how))


def _from_interprot(state: dict[str, torch.Tensor], path: Path, opts: ForeignOptions) -> _Converted:
    """etowahadams/interprot interprot/sae_model.py `SparseAutoencoder`.

    w_enc [d_model, d_hidden] (protsae's W_enc is its transpose), w_dec [d_hidden, d_model], b_enc, b_pre.
    Encoding: LN (x - mean) / (std + 1e-5), unbiased std; minus b_pre; @ w_enc + b_enc; TopK then ReLU (the
    same positive latents as ReLU then TopK). Decoding adds b_pre and undoes the LN. k is not stored:
    InterProt file names carry it (`..._k64_...`), else their default 128; the names also carry the PLM width
    and layer (`esm2_plm1280_l24_sae4096...`, parsed as their handler does).
    """
    where = str(path)
    d, n = _matrix_shape(state, "w_enc", where)
    W_enc = _tensor(state, "w_enc", (d, n), where).T.contiguous()
    W_dec = _tensor(state, "w_dec", (n, d), where)
    b_enc = _tensor(state, "b_enc", (n,), where)
    b_dec = _tensor(state, "b_pre", (d,), where)
    layer, plm, how = None, None, []
    if m := re.search(r"plm(\d+).*?l(\d+).*?sae(\d+)", path.name):
        width, layer, d_hidden = (int(g) for g in m.groups())
        if width != d or d_hidden != n:
            raise InputError(f"{where}: the file name says plm{width}/sae{d_hidden} but the weights are "
                             f"{d} -> {n}")
        plm = _ESM2_BY_WIDTH.get(width)
        how.append(f"layer {layer}, PLM {plm} from the file name")
    named_k = int(m.group(1)) if (m := re.search(r"_k(\d+)", path.name)) else None
    if named_k is not None and opts.k is not None and named_k != opts.k:
        raise CompatibilityError(f"{where}: the file name says k={named_k} but --sae-k {opts.k} was given")
    k = opts.k or named_k
    if k is None:
        k = INTERPROT_DEFAULT_K
        how.append(f"k={k} (InterProt's default; the file name does not say)")
    return _Converted("interprot", W_enc, b_enc, W_dec, b_dec, k, "InterProt SparseAutoencoder (TopK)",
                      row_norm="layer_norm", layer=layer, plm=plm, excludes_final_norm=True,
                      where="; ".join(how))


def _plm_sae_cfg(w_path: Path) -> tuple[dict[str, Any], Path | None]:
    """plm-sae's cfg for a weights file, and where it was read: the PyTorchModelHubMixin config.json beside it
    (`{"cfg": {...}}`), else the `<name>_cfg.json` that `AutoEncoder.save(name)` writes beside `<name>.pt`."""
    hub = _plm_sae_hub_cfg(w_path.parent)
    if hub is not None:
        return hub, w_path.parent / "config.json"
    side = w_path.with_name(f"{w_path.stem}_cfg.json")
    if side.is_file():
        try:
            cfg = json.loads(side.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{side}: cannot read the SAE config ({e})") from e
        if not isinstance(cfg, dict):
            raise InputError(f"{side}: expected a JSON object")
        return cfg, side
    return {}, None


def _from_plm_sae(state: dict[str, torch.Tensor], path: Path) -> _Converted:
    """edithvillegas/plm-sae sae/SAE_methods.py `AutoEncoder` (Neel Nanda's 1L-Sparse-Autoencoder layout), the
    code of "Interpreting and Steering Protein Language Models through Sparse Autoencoders".

    W_enc [act_size, dict_size] (protsae's W_enc is its transpose), W_dec [dict_size, act_size] (protsae's
    layout), b_enc [dict_size], b_dec [act_size]. encode: ReLU((x - b_dec) @ W_enc + b_enc), no input
    normalisation; decode: acts @ W_dec + b_dec. A ReLU SAE: no k (--sae-k). The cfg records act_size and
    dict_size (checked against the tensors) and, as `layer`, the name of the hooked module of transformers'
    EsmForMaskedLM (train_sae matches it against `named_modules()`), e.g. `esm.encoder.layer.3.output`, the
    output of block 4; `model_name` names the ESM-2 when it is one protsae knows.
    """
    where = str(path)
    d, n = _matrix_shape(state, "W_enc", where)
    W_enc = _tensor(state, "W_enc", (d, n), where).T.contiguous()
    W_dec = _tensor(state, "W_dec", (n, d), where)
    b_enc = _tensor(state, "b_enc", (n,), where)
    b_dec = _tensor(state, "b_dec", (d,), where)
    cfg, cfg_where = _plm_sae_cfg(path)
    for key, want in (("act_size", d), ("dict_size", n)):
        if key in cfg and _cfg_int(cfg, key, cfg_where or path) != want:
            raise InputError(f"{cfg_where}: {key} {cfg[key]} does not match the weights' {want} ({path})")
    how: list[str] = []
    layer, point = None, "resid_post"
    hook = cfg.get("layer")
    if isinstance(hook, str):
        layer, point, how = _layer_from_hook(hook, cfg_where)
    elif hook is not None:
        how.append(f"its cfg layer {hook!r} is no module name, so which block it counts from is not recorded")
    plm = _esm2_name(cfg.get("model_name"))
    if plm:
        how.append(f"PLM {plm} from model_name {cfg.get('model_name')!r}")
    if PLM_SAE_PUBLISHED.search(str(path)):
        pub_layer, pub_plm, pub_hook = PLM_SAE_PUBLISHED_META
        src = f"the published evillegasgarcia/sae_esm2_6_l3 (its README hooks {pub_hook})"
        for what, got in (("layer", layer), ("PLM", plm)):
            expect = pub_layer if what == "layer" else pub_plm
            if got is not None and got != expect:
                raise CompatibilityError(f"{where}: its cfg says {what} {got} but it sits in {src}, which is "
                                         f"{what} {expect}")
        layer, plm = pub_layer, pub_plm
        how.append(f"layer {pub_layer} (resid_post), PLM {pub_plm} from {src}")
    return _Converted("plm-sae", W_enc, b_enc, W_dec, b_dec, None, "plm-sae AutoEncoder (ReLU)",
                      layer=layer, hook_point=point, plm=plm, excludes_final_norm=True, where="; ".join(how))


def _read_cfg(d: Path) -> dict[str, Any]:
    p = d / "cfg.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: cannot read the SAE config ({e})") from e
    if not isinstance(cfg, dict):
        raise InputError(f"{p}: expected a JSON object")
    return cfg


def _cfg_int(cfg: dict[str, Any], key: str, where: Path, default: int | None = None) -> int | None:
    v = cfg.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(f"{where}: {key} must be a positive integer, got {v!r}")
    return v


def _from_saelens(d: Path) -> _Converted:
    """jbloomAus/SAELens sae_lens/saes/{sae,standard_sae,topk_sae,jumprelu_sae}.py (cfg.json +
    sae_weights.safetensors).

    W_enc [d_in, d_sae] (transposed to protsae's), b_enc, W_dec [d_sae, d_in] (protsae's layout), b_dec.
    sae_in = norm_in(x) - b_dec * apply_b_dec_to_input; pre = sae_in @ W_enc + b_enc; standard: ReLU;
    topk: TopK(k) then ReLU; jumprelu: ReLU(pre) * (pre > threshold). normalize_activations: none and
    expected_average_only_in are the identity at inference (the scaling factor is folded into the weights),
    constant_norm_rescale scales each row to norm sqrt(d_in), layer_norm is (x - mean) / (std + 1e-5).
    """
    from safetensors.torch import load_file

    where = d / "cfg.json"
    cfg = _read_cfg(d)
    w_path = d / "sae_weights.safetensors"
    try:
        state = load_file(str(w_path))
    except Exception as e:  # safetensors' own error types
        raise InputError(f"{w_path}: cannot read safetensors ({type(e).__name__}: {e})") from e
    arch = cfg.get("architecture")
    if arch is None:  # configs before SAELens named architectures: activation_fn_str says relu or topk
        arch = "topk" if cfg.get("activation_fn_str") == "topk" else "standard"
    if arch not in ("standard", "topk", "jumprelu"):
        raise InputError(f"{where}: SAELens architecture {arch!r} is not supported (standard, topk, jumprelu)")
    for key, ok in (("reshape_activations", ("none", None)), ("hook_head_index", (None,)),
                    ("rescale_acts_by_decoder_norm", (False, None))):
        if cfg.get(key) not in ok:
            raise InputError(f"{where}: {key}={cfg.get(key)!r} is not supported")
    d_in, n = _matrix_shape(state, "W_enc", str(w_path))
    for key, want in (("d_in", d_in), ("d_sae", n)):
        if key in cfg and _cfg_int(cfg, key, where) != want:
            raise InputError(f"{where}: {key} {cfg[key]} does not match the weights' {want} ({w_path})")
    W_enc = _tensor(state, "W_enc", (d_in, n), str(w_path)).T.contiguous()
    W_dec = _tensor(state, "W_dec", (n, d_in), str(w_path))
    b_enc = _tensor(state, "b_enc", (n,), str(w_path))
    b_dec = _tensor(state, "b_dec", (d_in,), str(w_path))
    if "scaling_factor" in state:  # finetuning_scaling_factor: feature_acts * scaling_factor before W_dec
        W_dec = W_dec * _tensor(state, "scaling_factor", (n,), str(w_path))[:, None]
    apply_b_dec = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b_dec, bool):
        raise InputError(f"{where}: apply_b_dec_to_input must be true or false, got {apply_b_dec!r}")
    if not apply_b_dec:
        b_enc = b_enc + W_enc @ b_dec
    norm = cfg.get("normalize_activations", "none") or "none"
    row_norm = {"none": "none", "expected_average_only_in": "none", "constant_norm_rescale": "unit_sqrt_d",
                "layer_norm": "layer_norm"}.get(norm)
    if row_norm is None:
        raise InputError(f"{where}: normalize_activations {norm!r} is not one SAELens defines")
    threshold, k = None, None
    if arch == "jumprelu":
        if "threshold" in state:
            threshold = _tensor(state, "threshold", (n,), str(w_path))
        else:
            threshold = torch.exp(_tensor(state, "log_threshold", (n,), str(w_path)))
    elif arch == "topk":
        kwargs = cfg.get("activation_fn_kwargs")
        kwargs = kwargs if isinstance(kwargs, dict) else {}
        k = _cfg_int(cfg, "k", where) if "k" in cfg else _cfg_int(kwargs, "k", where)
        if k is None:
            raise InputError(f"{where}: a topk SAE config needs k")
    meta = cfg.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    hook_name = meta.get("hook_name") or cfg.get("hook_name")
    model_name = meta.get("model_name") or cfg.get("model_name")
    layer, point, how = _layer_from_hook(hook_name, where)
    plm = _esm2_name(model_name)
    if plm:
        how.append(f"PLM {plm} from model_name {model_name!r}")
    return _Converted("saelens", W_enc, b_enc, W_dec, b_dec, k, f"SAELens {arch}", row_norm=row_norm,
                      threshold=threshold, layer=layer, hook_point=point, plm=plm, excludes_final_norm=True,
                      where="; ".join(how))


def _from_sparsify(d: Path) -> _Converted:
    """EleutherAI/sparsify sparsify/sparse_coder.py (cfg.json + sae.safetensors in a folder named by hookpoint).

    encoder = nn.Linear(d_in, num_latents): weight [num_latents, d_in] (protsae's W_enc layout), bias; W_dec
    [num_latents, d_in]; b_dec. encode: x - b_dec, ReLU(encoder(.)), TopK(k) (fused_encoder.py); decode adds
    b_dec. Transcoders, skip connections and the groupmax activation compute something else and are refused.
    """
    from safetensors.torch import load_file

    where = d / "cfg.json"
    cfg = _read_cfg(d)
    w_path = d / "sae.safetensors"
    for key, ok in (("transcode", (False, None)), ("skip_connection", (False, None)),
                    ("activation", ("topk", None))):
        if cfg.get(key) not in ok:
            raise InputError(f"{where}: {key}={cfg.get(key)!r} is not supported (a plain TopK SAE is)")
    try:
        state = load_file(str(w_path))
    except Exception as e:  # safetensors' own error types
        raise InputError(f"{w_path}: cannot read safetensors ({type(e).__name__}: {e})") from e
    if "W_skip" in state:
        raise InputError(f"{w_path}: has a skip connection (W_skip), which protsae does not compute")
    n, d_in = _matrix_shape(state, "encoder.weight", str(w_path))
    if "d_in" in cfg and _cfg_int(cfg, "d_in", where) != d_in:
        raise InputError(f"{where}: d_in {cfg['d_in']} does not match the weights' {d_in} ({w_path})")
    if cfg.get("num_latents") and _cfg_int(cfg, "num_latents", where) != n:
        raise InputError(f"{where}: num_latents {cfg['num_latents']} does not match the weights' {n}")
    k = _cfg_int(cfg, "k", where)
    if k is None:
        raise InputError(f"{where}: a sparsify config needs k")
    layer, point, how = _layer_from_hook(d.name, f"{d} (folder name)")
    return _Converted("sparsify", _tensor(state, "encoder.weight", (n, d_in), str(w_path)),
                      _tensor(state, "encoder.bias", (n,), str(w_path)),
                      _tensor(state, "W_dec", (n, d_in), str(w_path)), _tensor(state, "b_dec", (d_in,), str(w_path)),
                      k, "sparsify SparseCoder (TopK)", layer=layer, hook_point=point, excludes_final_norm=True,
                      where="; ".join(how))


def _pick_sparsify_layer(root: Path, opts: ForeignOptions) -> Path:
    """A sparsify repository holds one folder per hookpoint (layers.0, layers.1, ...): --sae-layer picks one."""
    dirs = _sparsify_layer_dirs(root)
    by_layer = {}
    for sub in dirs:
        layer, _, _ = _layer_from_hook(sub.name, str(sub))
        if layer is not None:
            by_layer[layer] = sub
    names = ", ".join(s.name for s in dirs)
    if opts.layer is None:
        raise InputError(f"{root} holds sparsify SAEs for several hookpoints ({names}); pass --sae-layer L "
                         f"(protsae's 1-based layer: folder layers.N is layer N+1) or the folder itself")
    if opts.layer not in by_layer:
        raise InputError(f"{root}: no sparsify SAE for layer {opts.layer} (folders: {names}; layers.N is layer "
                         "N+1)")
    return by_layer[opts.layer]


#: Hook names -> (protsae hook point, offset from the 0-based block index to protsae's 1-based layer).
_HOOK_PATTERNS = (
    (re.compile(r"blocks\.(\d+)\.hook_resid_post"), "resid_post", 1),   # TransformerLens: block output
    (re.compile(r"blocks\.(\d+)\.hook_resid_pre"), "resid_post", 0),    # block input = previous block output
    (re.compile(r"blocks\.(\d+)\.hook_resid_mid"), "attn_out", 1),      # after attention + residual
    (re.compile(r"(?:[\w.]*\.)?layers?\.(\d+)(?:\.output)?"), "resid_post", 1),  # module names: (esm.encoder.)layer.N
)


def _layer_from_hook(hook: Any, where: Any) -> tuple[int | None, str, list[str]]:
    """protsae (layer, hook point) from a format's hook name; (None, resid_post) when there is none."""
    if hook is None or hook == "":
        return None, "resid_post", []
    if not isinstance(hook, str):
        raise InputError(f"{where}: hook name must be a string, got {hook!r}")
    for pattern, point, offset in _HOOK_PATTERNS:
        if m := pattern.fullmatch(hook):
            layer = int(m.group(1)) + offset
            if layer < 1:
                raise InputError(f"{where}: hook {hook!r} reads the embeddings (before block 1); protsae hooks "
                                 "transformer blocks 1..N")
            return layer, point, [f"layer {layer} ({point}) from hook {hook!r}"]
    return None, "resid_post", [f"hook {hook!r} not recognised"]


def _esm2_name(model_name: Any) -> str | None:
    from protsae_cli.plm.loading import ESM2_MODELS

    if not isinstance(model_name, str):
        return None
    name = model_name.rsplit("/", 1)[-1]
    return name if name in ESM2_MODELS else None


def _build(conv: _Converted, opts: ForeignOptions, where: str) -> TopKSAE:
    from protsae_cli.plm.loading import ESM2_MODELS

    n, d = conv.W_enc.shape
    layer = _agree("layer", conv.layer, opts.layer, "--sae-layer", where, conv.where)
    plm = _agree("PLM", conv.plm, opts.plm, "--sae-plm", where, conv.where) or opts.model
    if conv.k is not None and opts.k is not None and conv.k != opts.k and conv.fmt != "interprot":
        raise CompatibilityError(f"{where}: this {conv.arch} has k={conv.k}; --sae-k {opts.k} would change what "
                                 "it computes")
    k = conv.k if conv.k is not None else opts.k
    missing = [(what, flag) for what, flag, v in (
        ("the layer", "--sae-layer L (protsae's 1-based ESM-2 block)", layer),
        ("the PLM", "--sae-plm NAME (e.g. esm2_t33_650M_UR50D)", plm),
        ("k", (f"--sae-k N (a {conv.arch} keeps every positive latent; protsae stores the N largest per "
               f"residue, N = d_sae = {n} keeps all)"), k)) if v is None]
    if missing:
        raise InputError(f"{where}: this {conv.arch} does not record {' or '.join(w for w, _ in missing)}"
                         f"{f' ({conv.where})' if conv.where else ''}; pass {', '.join(f for _, f in missing)}")
    assert layer is not None and plm is not None and k is not None
    num_layers = ESM2_MODELS[plm][0] if plm in ESM2_MODELS else 0
    if plm in ESM2_MODELS and ESM2_MODELS[plm][1] != d:
        raise CompatibilityError(f"{where}: {plm} has d_model={ESM2_MODELS[plm][1]} but this SAE reads "
                                 f"d_model={d}")
    if conv.excludes_final_norm and num_layers and layer == num_layers:
        raise CompatibilityError(
            f"{where}: this {conv.arch} hooks the output of the last block ({layer}) before ESM-2's final layer "
            f"norm, but protsae's layer {layer} is fair-esm's representation, after that norm; its codes would "
            "be computed on different activations")
    cfg = SAEConfig(d_model=d, d_sae=n, k=k, hook_point=conv.hook_point, layer=layer, plm_name=plm,
                    plm_num_layers=num_layers, arch="topk",
                    training={"imported_from": conv.fmt, "source_architecture": conv.arch, "source": where})
    affine = conv.row_norm == "none" and conv.threshold is None and conv.post_scale is None
    sae: TopKSAE
    if affine:
        sae = TopKSAE(cfg)
    else:
        sae = ForeignTopKSAE(cfg, conv.row_norm, conv.threshold is not None, conv.post_scale is not None)
        sae.source_format = conv.fmt
    with torch.no_grad():
        sae.W_enc.copy_(conv.W_enc)
        sae.b_enc.copy_(conv.b_enc)
        sae.W_dec.copy_(conv.W_dec)
        sae.b_dec.copy_(conv.b_dec)
        if isinstance(sae, ForeignTopKSAE):
            if sae.threshold is not None and conv.threshold is not None:
                sae.threshold.copy_(conv.threshold)
            if sae.post_scale is not None and conv.post_scale is not None:
                sae.post_scale.copy_(conv.post_scale)
    log.info("read %s as a protsae SAE: %s, d_model %d, d_sae %d, k %d, %s@%d on %s%s", where, conv.arch, d, n, k,
             conv.hook_point, layer, plm, f" ({conv.where})" if conv.where else "")
    return sae


def _agree(what: str, recorded: Any, given: Any, flag: str, where: str, how: str) -> Any:
    """The format's own value, or the flag's; both given and different is a wrong pairing, refused."""
    if recorded is not None and given is not None and recorded != given:
        raise CompatibilityError(f"{where}: records {what} {recorded} ({how}) but {flag} {given} was given")
    return recorded if recorded is not None else given
