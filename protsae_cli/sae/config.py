"""The SAE config that travels with the weights, and the concept table inside it.

The config records everything needed to refuse a wrong pairing (PLM, hook, layer, d_model): a wrong layer
"matmuls fine" and gives silent garbage, so mismatches are errors (`sae.checkpoint.check_compatible`). It is
also data from wherever the user got the SAE, so `from_json_dict` checks values rather than coercing them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from protsae_cli.errors import InputError

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
    def from_dict(cls, d: dict[str, Any]) -> ConceptEntry:
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
        if any(b[0] <= a[0] for a, b in zip(curve, curve[1:], strict=False)):
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
    # Fitted topology decoder for the region concepts (protsae_cli.call.segments, docs/SEGMENTS.md); {} = none.
    segment_decoder: dict[str, Any] = field(default_factory=dict)
    # arch "foreign_topk": what a published SAE computes beyond one affine map + TopK (row_norm, threshold,
    # post_scale, source_format), so `protsae label` can save it in this layout (sae.foreign.ForeignTopKSAE).
    foreign: dict[str, Any] = field(default_factory=dict)
    # Format-independent digest of the PLM's weights (protsae_cli.plm.digest); "" for SAEs that predate it.
    plm_weights_sha256: str = ""

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
                    "d_model": self.d_model,
                    **({"weights_sha256": self.plm_weights_sha256} if self.plm_weights_sha256 else {})},
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
    def from_json_dict(cls, d: dict[str, Any], where: str = "config") -> SAEConfig:
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
            for key in ("name", "sha256", "weights_sha256"):
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
                plm_weights_sha256=plm.get("weights_sha256", ""),
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


# -- ProtSAE (sae/protsae.py) ---------------------------------------------------------------------------------

@dataclass
class ProtSAEConfig:
    """The ProtSAE-specific options (the `protsae` block of config.json): one field per choice the paper and the
    released code leave open, each with its default. Validated by `resolve_protsae_options`."""

    n_concepts: int | None = None
    """m, the defined latents (latent c stands for concept c); None: len(cfg.concepts)."""
    n_zero_classes: int = 0
    """m0: ontology classes in the axioms that are not predicted concepts (ball embeddings only)."""
    n_relations: int = 0
    """|R|: relations in the NF3/NF4 axioms."""
    topk_scope: str = "all"
    """"all": TopK over all n latents; "unknown": defined latents always kept, TopK on the unknown ones (codes
    are k + m wide); "defined_first": active defined latents admitted first, L0 <= k."""
    bias_ref: str = "active_mean"
    """Forced-activation reference level: "active_mean" | "all_mean" | "kth_value" (`ProtSAE._reference_level`)."""
    defined_bias: str = "none"
    """"none": z_def = e^r W x (METHOD.md §1.10); "pred": z_def = e^r (W x + b_pred); "calibrated":
    z_def = e^r (W x - theta), theta fitted on validation F1."""
    predictor_lr: float | None = None
    """Peak learning rate of the predictor and EL embedding (None: the SAE's), same schedule."""
    lambda_annot: float = 10.0
    """Weight of the annotation (BCE) loss: the released code's default 10; the paper (per the AAAI summary) 1."""
    lambda_axiom: float = 1.0
    """Weight of the EL axiom loss (both sources: 1)."""
    margin: float = 0.1
    """EL margin gamma."""
    label_granularity: str = "residue"
    """"residue": labels [N, m]; "protein": labels [P, m] + protein_index [N]."""
    pool: str = "mean"
    """Protein-level pooling of pi for protein labels: "mean" | "max"."""
    detach: bool = True
    """Stop-gradient from reconstruction into W_pred/b_pred (ablation: False)."""
    use_r_pred: bool = True
    """Learned log-scale of the defined latents (ablation: False -> scale 1)."""
    forced_activation: bool = True
    """z_bias during training (ablation: False)."""
    use_axiom: bool = True
    """L_axiom (ablation: False)."""
    inference_forced: bool = False
    """Apply z_bias at inference too (then `encoder_affine` is refused: the fast backends cannot reproduce it)."""
    el_standardize: bool = False
    """DeepGO-SE-style normalisation of centres in the axiom loss."""
    radius_source: str = "param"
    """Ball radii: "param" (|class_radius|) or "b_pred" (|b_pred| for concepts, DeepGO-SE coupling)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The defaults as a plain dict (what a config.json `protsae` block is merged onto).
PROTSAE_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ProtSAEConfig)}


PROTSAE_CHOICES: dict[str, tuple[str, ...]] = {
    "topk_scope": ("all", "unknown", "defined_first"),
    "bias_ref": ("active_mean", "all_mean", "kth_value"),
    "defined_bias": ("pred", "none", "calibrated"),
    "label_granularity": ("residue", "protein"),
    "pool": ("mean", "max"),
    "radius_source": ("param", "b_pred"),
}
