"""TopK sparse autoencoder: the module, its config, checkpoint I/O and pairing checks.

The config travels with the weights and records everything needed to refuse a wrong pairing (PLM, hook,
layer, d_model): a wrong layer "matmuls fine" and gives silent garbage, so mismatches are errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from protsae_cli.errors import CompatibilityError, InputError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "sae.safetensors"
FORMAT = "protsae-sae"
FORMAT_VERSION = 1
HOOK_POINTS = ("resid_post", "attn_out")


CONCEPT_KINDS = ("", "region", "site")


@dataclass
class ConceptEntry:
    """One concept bound to (or labelled onto) a latent, with the threshold used to call it.

    The reliability fields say what a call is worth (docs/CALLS.md): measured at `threshold` on labelled
    validation proteins the SAE was not trained on, by `protsae train` or `protsae calibrate`. They stay
    None / empty for a concept nobody measured, and annotate then calls it without a reliability.
    """

    latent: int
    concept_id: str
    name: str
    ontology_id: str = ""
    threshold: float = 0.0
    source: str = ""
    # -- reliability (docs/CALLS.md) ---------------------------------------------------------------------
    kind: str = ""                    # "region" (spans: membrane, topology sides, signal peptide) | "site"
    precision: float | None = None    # residue precision of "activation >= threshold" on validation proteins
    recall: float | None = None       # residue recall, same residues
    f1: float | None = None
    positives: int = 0                # labelled positive residues among the validation residues
    label_source: str = ""            # the labels these numbers were measured against (file names)
    operating_point: str = ""         # how `threshold` was chosen: "f1", "precision:0.9", "recall:0.5"
    validation: str = ""              # which proteins: e.g. "3 files, 1507 proteins, 402113 residues"
    # Calibrated P(residue carries the concept | activation): [[activation, probability], ...] with ascending
    # activations; a segment's score is the probability at its max activation (concepts.segment_score).
    score_curve: list[list[float]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConceptEntry":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def check(self) -> None:
        """Refuse reliability fields of the wrong type or range (a config is data, see from_json_dict)."""
        where = f"concept {self.concept_id!r}"
        if not _is_number(self.threshold):
            raise InputError(f"{where}: threshold must be a number, got {self.threshold!r}")
        if self.kind not in CONCEPT_KINDS:
            raise InputError(f"{where}: kind must be 'region' or 'site', got {self.kind!r}")
        for name in ("precision", "recall", "f1"):
            v = getattr(self, name)
            if v is not None and not (_is_number(v) and 0.0 <= v <= 1.0):
                raise InputError(f"{where}: {name} must be null or a number in [0, 1], got {v!r}")
        if isinstance(self.positives, bool) or not isinstance(self.positives, int) or self.positives < 0:
            raise InputError(f"{where}: positives must be an integer >= 0, got {self.positives!r}")
        for name in ("label_source", "operating_point", "validation", "source", "ontology_id", "name"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{where}: {name} must be a string, got {getattr(self, name)!r}")
        curve = self.score_curve
        if not isinstance(curve, list) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and _is_number(p[0]) and _is_number(p[1])
                and 0.0 <= p[1] <= 1.0 for p in curve):
            raise InputError(f"{where}: score_curve must be a list of [activation, probability in 0..1] pairs")
        if any(b[0] <= a[0] for a, b in zip(curve, curve[1:])):
            raise InputError(f"{where}: score_curve activations must be strictly ascending")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


@dataclass
class SAEConfig:
    d_model: int
    d_sae: int
    k: int
    hook_point: str = "resid_post"
    layer: int = 4
    plm_name: str = ""
    plm_sha256: str = ""
    plm_num_layers: int = 0
    arch: str = "topk"
    concepts: list[ConceptEntry] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    protsae: dict[str, Any] = field(default_factory=dict)
    # Fitted topology decoder for the region concepts (protsae_cli.segments, docs/SEGMENTS.md); {} = none.
    segment_decoder: dict[str, Any] = field(default_factory=dict)
    # arch "foreign_topk": what a published SAE computes beyond one affine map + TopK (row_norm, threshold,
    # post_scale, source_format), so `protsae label` can save it in this layout (foreign_sae.ForeignTopKSAE).
    foreign: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hook_point not in HOOK_POINTS:
            raise InputError(f"unknown hook point {self.hook_point!r}; expected one of {', '.join(HOOK_POINTS)}")
        if self.d_model < 1 or self.d_sae < 1 or self.layer < 1:
            raise InputError(f"d_model, d_sae and layer must be positive, got d_model={self.d_model}, "
                             f"d_sae={self.d_sae}, layer={self.layer}")
        if not 0 < self.k <= self.d_sae:
            raise InputError(f"k must be in 1..d_sae ({self.d_sae}), got {self.k}")

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            "d_model": self.d_model,
            "d_sae": self.d_sae,
            "k": self.k,
            "plm": {"name": self.plm_name, "sha256": self.plm_sha256, "num_layers": self.plm_num_layers,
                    "d_model": self.d_model},
            "hook": {"point": self.hook_point, "layer": self.layer,
                     "layer_semantics": "1-based transformer block (fair-esm repr_layers index)"},
            "normalization": {"kind": "mean_scale"},
            "concepts": [dataclasses.asdict(c) for c in self.concepts],
            "training": self.training,
            "protsae": self.protsae,
            **({"segment_decoder": self.segment_decoder} if self.segment_decoder else {}),
            **({"foreign": self.foreign} if self.foreign else {}),
        }

    @classmethod
    def from_json_dict(cls, d: dict[str, Any], where: str = "config") -> "SAEConfig":
        """Parse and bound a config read from a file; every message starts with `where` (the file).

        A config is data from wherever the user got the SAE, so values are checked, not coerced: `int()` would
        read 32.5 as 32 and "32" as 32, hiding an edited file, and an out-of-range concept latent would only
        fail later, far from its cause.
        """
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            fmt = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise InputError(f"{where}: not a protsae SAE config (format={fmt!r})")
        try:
            if _config_int(d.get("format_version", 0), "format_version", 0) > FORMAT_VERSION:
                raise InputError(f"format_version {d['format_version']} is newer than this protsae supports")
            plm, hook = d.get("plm", {}), d["hook"]
            if not isinstance(plm, dict) or not isinstance(hook, dict):
                raise InputError("'plm' and 'hook' must be JSON objects")
            for key in ("name", "sha256"):
                if not isinstance(plm.get(key, ""), str):
                    raise InputError(f"plm {key} must be a string, got {plm[key]!r}")
            for key, kind in (("concepts", list), ("training", dict), ("protsae", dict), ("segment_decoder", dict),
                              ("foreign", dict)):
                if not isinstance(d.get(key, kind()), kind):
                    raise InputError(f"{key!r} must be a JSON {'array' if kind is list else 'object'}")
            cfg = cls(
                d_model=_config_int(d["d_model"], "d_model", 1), d_sae=_config_int(d["d_sae"], "d_sae", 1),
                k=_config_int(d["k"], "k", 1), hook_point=hook["point"],
                layer=_config_int(hook["layer"], "hook layer", 1),
                plm_name=plm.get("name", ""), plm_sha256=plm.get("sha256", ""),
                plm_num_layers=_config_int(plm.get("num_layers", 0), "plm num_layers", 0),
                arch=d.get("arch", "topk"),
                concepts=[ConceptEntry.from_dict(c) for c in d.get("concepts", [])],
                training=d.get("training", {}), protsae=d.get("protsae", {}),
                segment_decoder=d.get("segment_decoder", {}), foreign=d.get("foreign", {}),
            )
            for c in cfg.concepts:
                c.check()
                if isinstance(c.latent, bool) or not isinstance(c.latent, int) or not 0 <= c.latent < cfg.d_sae:
                    raise InputError(f"concept {c.concept_id!r} is bound to latent {c.latent!r}, outside "
                                     f"0..{cfg.d_sae - 1} (d_sae={cfg.d_sae})")
            return cfg
        except InputError as e:
            raise InputError(f"{where}: {e}") from e
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"{where}: malformed SAE config ({e!r})") from e


def _config_int(value: Any, what: str, minimum: int) -> int:
    """A JSON integer >= minimum, or InputError (bool is an int to Python, never to a config)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


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
    from protsae_cli.encode import canonical_order

    return canonical_order(idx, val)


class TopKSAE(nn.Module):
    """z = TopK(ReLU(W_enc (x_n - b_dec) + b_enc)), x_hat = W_dec^T z + b_dec, with x_n the normalised input."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.d_model, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(n, d))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(torch.empty(n, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("norm_mean", torch.zeros(d))
        self.register_buffer("norm_scale", torch.ones(()))
        self.reset_parameters()

    @property
    def k(self) -> int:
        return self.cfg.k

    def reset_parameters(self, seed: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            w = torch.randn(self.W_dec.shape, generator=g)
            w /= w.norm(dim=-1, keepdim=True)
            self.W_dec.copy_(w)
            self.W_enc.copy_(w)  # tied init (Gao et al.): encoder starts as the decoder's transpose

    # -- normalisation -------------------------------------------------------------------------------
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

    # -- forward pieces -------------------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.normalize(x) - self.b_dec, self.W_enc, self.b_enc)

    def encoder_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) with pre = x @ W.T + b on raw activations: what every fast backend consumes."""
        with torch.no_grad():
            W = self.W_enc / self.norm_scale
            b = self.b_enc - self.W_enc @ (self.norm_mean / self.norm_scale + self.b_dec)
        return W.detach().clone(), b.detach().clone()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse codes as (idx [N,k], val [N,k]); idx -1 marks empty slots."""
        return topk_relu(self.pre_activations(x), self.k)

    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Dense codes [N, d_sae] (differentiable through the kept values; used in training)."""
        pre = F.relu(self.pre_activations(x))
        vals, idx = torch.topk(pre, self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals)

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
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)


# -- checkpoint I/O -----------------------------------------------------------------------------------

def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def build_sae(cfg: SAEConfig) -> nn.Module:
    """Instantiate the module for cfg.arch (ProtSAE registers itself in protsae_cli.protsae_model)."""
    if cfg.arch == "topk":
        return TopKSAE(cfg)
    if cfg.arch == "protsae":
        from protsae_cli.protsae_model import ProtSAE  # noqa: PLC0415 (optional, heavier module)

        return ProtSAE(cfg)
    if cfg.arch == "foreign_topk":  # a published SAE saved by `protsae label` (docs/LABEL.md)
        from protsae_cli.foreign_sae import ForeignTopKSAE  # noqa: PLC0415 (imports this module)

        return ForeignTopKSAE.from_config(cfg)
    raise InputError(f"unknown SAE architecture {cfg.arch!r}")


def save_sae(sae: nn.Module, out_dir: str | os.PathLike, card: str | None = None) -> Path:
    """Write config.json + sae.safetensors atomically (temp names, then rename)."""
    from safetensors.torch import save_file

    from protsae_cli.writers.atomic import follow_umask

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sae.state_dict().items()}
    tmp_w = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp_w), metadata={"format": FORMAT})
    follow_umask(tmp_w)  # safetensors creates its files 0600
    tmp_c = out / (CONFIG_NAME + ".tmp")
    tmp_c.write_text(json.dumps(sae.cfg.to_json_dict(), indent=2, sort_keys=False) + "\n")
    os.replace(tmp_w, out / WEIGHTS_NAME)
    os.replace(tmp_c, out / CONFIG_NAME)
    if card is not None:
        (out / "README.md").write_text(card)
    return out


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, str]:
    """Load an SAE directory (or single .safetensors with embedded config). Returns (module, sha256 of weights)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from protsae_cli import foreign_sae  # noqa: PLC0415 (imports this module)

    if foreign_sae.detect(path) is not None:  # InterPLM, InterProt, SAELens, sparsify (docs/FOREIGN_SAES.md)
        return foreign_sae.load(path, device)
    p = Path(path)
    if p.is_dir():
        cfg_path, w_path = p / CONFIG_NAME, p / WEIGHTS_NAME
        if not cfg_path.exists() or not w_path.exists():
            raise InputError(f"SAE directory {p} must contain {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            cfg_dict = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{cfg_path}: invalid JSON ({e})") from e
        where = str(cfg_path)
    elif p.is_file():
        w_path = p
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types
            raise InputError(f"{p}: not a safetensors file ({e})") from e
        if "config" not in meta:
            raise InputError(f"{p}: safetensors file has no embedded 'config' metadata; pass the SAE directory")
        cfg_dict = json.loads(meta["config"])
        where = str(p)
    else:
        raise InputError(f"SAE not found: {p}")
    cfg = SAEConfig.from_json_dict(cfg_dict, where=where)
    _check_shapes(cfg, w_path, where)
    sae = build_sae(cfg)
    state = load_file(str(w_path))
    missing, unexpected = sae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{w_path}: weights do not match config (missing {missing}, unexpected {unexpected})")
    return sae.to(device).eval(), file_sha256(w_path)


def _check_shapes(cfg: SAEConfig, w_path: Path, where: str) -> None:
    """Compare the config's tensors with the weight file's header before anything is allocated.

    A config is data a user downloaded: a wrong or hostile `d_sae` must be refused with a message, not turned
    into a petabyte allocation. The module is built on the meta device (shapes only, no memory) and its
    state-dict shapes are compared with the safetensors header, which is read without loading any tensor.
    """
    from safetensors import safe_open

    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_sae(cfg).state_dict().items()}
    except InputError as e:  # e.g. a ProtSAE option out of range: the config's fault, named as such
        raise InputError(f"{where}: {e}") from e
    try:
        with safe_open(str(w_path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors' own error types for a truncated or foreign file
        raise InputError(f"{w_path}: cannot read the weights header ({type(e).__name__}: {e})") from e
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {found[k]} (config implies {expected[k]})" for k in sorted(set(expected) & set(found))
             if found[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected)}"] if unexpected else []) + \
                ([f"shape of {', '.join(wrong)}"] if wrong else [])
        raise InputError(f"{where} (d_model={cfg.d_model}, d_sae={cfg.d_sae}) does not match its weights "
                         f"{w_path}: {'; '.join(parts)}")


def check_compatible(cfg: SAEConfig, plm_name: str, plm_sha256: str, plm_d_model: int, plm_num_layers: int,
                     strict_checksum: bool = True) -> None:
    """Refuse an SAE trained on another PLM, width or depth; the message names both sides."""
    if cfg.d_model != plm_d_model:
        raise CompatibilityError(
            f"SAE expects d_model={cfg.d_model} (trained on {cfg.plm_name or 'unknown PLM'}) but PLM "
            f"{plm_name} has d_model={plm_d_model}")
    if not 1 <= cfg.layer <= plm_num_layers:
        raise CompatibilityError(
            f"SAE hooks layer {cfg.layer} but PLM {plm_name} has {plm_num_layers} layers")
    if strict_checksum and cfg.plm_sha256 and plm_sha256 and cfg.plm_sha256 != plm_sha256:
        from protsae_cli.plm import canonical_esm2_name

        other_format = cfg.plm_name != plm_name and canonical_esm2_name(cfg.plm_name) == canonical_esm2_name(plm_name)
        raise CompatibilityError(
            f"SAE was trained on PLM {cfg.plm_name} (sha256 {cfg.plm_sha256[:12]}...) but the loaded PLM is "
            f"{plm_name} (sha256 {plm_sha256[:12]}...); pass --no-check-plm to override"
            + ("; both name one ESM-2 release, but a fair-esm .pt and a Hugging Face safetensors file have different "
               "checksums, so protsae cannot confirm they hold the same weights (docs/MODELS.md §3)"
               if other_format else ""))
