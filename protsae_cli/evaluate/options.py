"""The options of `protsae eval`, `calibrate` and `label`: one dataclass per command, with every default.

Why a module of its own: the CLI reads its defaults from here (they live once), and the CLI must not import
torch to show `--help` or to reject a bad option, so this module imports nothing heavy.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protsae_cli.labels.sources import AnnotationSpec

#: The activation thresholds eval scores every latent at (the InterPLM protocol's grid, METHOD.md §3.3).
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.0, 0.15, 0.5, 0.6, 0.8)
#: Latents per concept that `label`'s validation part chooses among (docs/LABEL.md: 1 did best held out).
DEFAULT_CANDIDATES = 1


@dataclass
class EvalOptions:
    sae: list[str]
    fasta: str
    model: str | None = None
    annotations: list[AnnotationSpec] = field(default_factory=list)  # labels.sources.annotation_specs
    ontologies: list[str] = field(default_factory=list)  # --ontology (repeatable; labels.sources rules)
    propagate: bool = True
    split_ids: tuple[str, str] | None = None
    valid_fraction: float = 0.5
    seed: int = 0
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
    lm_proteins: int = 64
    lm_max_len: int = 512
    mask_fraction: float = 0.15
    max_residues: int = 1022
    toks_per_batch: int = 8192
    device: str = "auto"
    attention: str = "auto"
    dense_threshold: float = 0.5
    json_out: str | None = None
    markdown_out: str | None = None
    plots_dir: str | None = None
    no_check_plm: bool = False
    command: str = field(default_factory=lambda: shlex.join(["protsae", *sys.argv[1:]]))
    progress: bool = True  # a bar on a terminal, periodic log lines otherwise (protsae_cli.progress)


@dataclass
class CalibrateOptions:
    sae: str | None                        # None: the bundled default SAE
    fasta: str
    annotations: list[Any]                 # labels.sources.AnnotationSpec
    output: str | None = None              # new SAE directory; None with measure_only
    model: str | None = None
    device: str = "auto"
    calling: str = "f1"
    measure_only: bool = False
    ontologies: list[str] = field(default_factory=list)  # --ontology (repeatable; labels.sources rules)
    propagate: bool = True
    toks_per_batch: int = 16384
    long_policy: str = "window"
    check_plm: bool = True
    threads: int | None = None
    json_out: str | None = None
    segment_decoder: str = "auto"          # auto | fit | keep (SEGMENT_DECODER_MODES; docs/SEGMENTS.md)
    progress: bool = True                  # encoding the labelled proteins: a bar, or log lines (protsae_cli.progress)
    command: str = field(default_factory=lambda: shlex.join(["protsae", *sys.argv[1:]]))


#: What calibrate does with the SAE's topology decoder: ``fit`` it on the labelled proteins (they must carry
#: membrane-span labels), ``keep`` it as it is, or ``auto``: fit when some label source has spans, else keep.
SEGMENT_DECODER_MODES = ("auto", "fit", "keep")


@dataclass
class LabelOptions:
    """What `label_sae` needs; `annotations` are `labels.sources.AnnotationSpec`s (one per label source)."""

    sae: str                                   # any --sae annotate accepts (foreign formats as PATH#layer=...)
    fasta: str
    annotations: list[Any]
    output: str
    model: str | None = None
    device: str = "auto"
    calling: str = "f1"
    valid_fraction: float = 0.5                # share of labelled proteins in the validation part
    seed: int = 0
    candidates: int = DEFAULT_CANDIDATES
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS
    ontologies: list[str] = field(default_factory=list)  # --ontology (repeatable; labels.sources rules)
    propagate: bool = True
    toks_per_batch: int = 16384
    long_policy: str = "window"
    check_plm: bool = True
    threads: int | None = None
    force: bool = False
    json_out: str | None = None
    progress: bool = True
    command: str = field(default_factory=lambda: shlex.join(["protsae", *sys.argv[1:]]))
