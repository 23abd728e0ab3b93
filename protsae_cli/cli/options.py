"""Choices and shared option types of the `protsae` commands, declared once.

Why here: every enumerated value is checked by Click while it parses the command line, so a typo exits 2 with
the choices listed before any model is loaded (the library used to find it after minutes of loading, or not
at all). The library keeps its own checks for callers that do not come through the CLI; tests/cli/test_cli_options.py
asserts that these enums list exactly the library's values, so the two cannot drift apart.

Import-light on purpose (typer and the standard library only): `protsae --help` and a rejected option must not
pull in torch. Commands pass `.value` to the library, so library behaviour is the same as with plain strings.

Options that several commands take are `Annotated` types (the huggingface_hub `cli/_cli_utils.py` shape): the
command gives only the default, e.g. ``device: DeviceOpt = "auto"``. Their metavars say what a value is
(``NAME|PATH``, ``DIR``, ``DEVICE``); options without one get the conventional INT/FLOAT/PATH/TEXT or their
choices from `cli/command.py`.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated
from collections.abc import Callable

import typer

MODELS_PANEL, PERF_PANEL, CONCEPTS_PANEL = "Models", "Performance", "Concepts"


class Choice(str, enum.Enum):
    """A str-valued choice: Typer lists the values in --help and in the exit-2 message; `.value` is the plain
    string the library expects."""

    def __str__(self) -> str:  # "float16", not "H5Dtype.FLOAT16", wherever a choice is formatted
        return self.value


def values(choice: type[Choice]) -> tuple[str, ...]:
    return tuple(c.value for c in choice)


# -- annotate / merge --------------------------------------------------------------------------------------

class OutputFormat(Choice):
    H5 = "h5"
    TSV = "tsv"
    GFF3 = "gff3"
    JSONL = "jsonl"


class H5Dtype(Choice):
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class Backend(Choice):
    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"
    ONNX = "onnx"


class LongPolicy(Choice):
    WINDOW = "window"
    TRUNCATE = "truncate"
    ERROR = "error"


class Compression(Choice):
    GZIP = "gzip"
    LZF = "lzf"
    NONE = "none"


# -- train / eval --------------------------------------------------------------------------------------------

class AnnotationFormat(Choice):
    AUTO = "auto"
    SWISSPROT = "swissprot"
    UNIPROT_XML = "uniprot-xml"
    UNIPROT_TSV = "uniprot-tsv"
    TMBED = "tmbed"
    BINDING = "binding"
    GAF = "gaf"
    GO_TSV = "go-tsv"
    GENERIC_TSV = "generic-tsv"


class HookPoint(Choice):
    RESID_POST = "resid_post"
    ATTN_OUT = "attn_out"


class Arch(Choice):
    TOPK = "topk"
    PROTSAE = "protsae"


class LabelGranularity(Choice):
    RESIDUE = "residue"
    PROTEIN = "protein"


class Pool(Choice):
    MEAN = "mean"
    MAX = "max"


class TopkScope(Choice):
    AUTO = "auto"
    DEFINED_FIRST = "defined_first"
    ALL = "all"
    UNKNOWN = "unknown"


class DefinedBias(Choice):
    AUTO = "auto"
    CALIBRATED = "calibrated"
    NONE = "none"
    PRED = "pred"


class BiasRef(Choice):
    ACTIVE_MEAN = "active_mean"
    ALL_MEAN = "all_mean"
    KTH_VALUE = "kth_value"


class LrSchedule(Choice):
    COSINE = "cosine"
    MULTISTEP = "multistep"
    CONSTANT = "constant"


# -- steer ---------------------------------------------------------------------------------------------------

class SteerInit(Choice):
    MASK = "mask"
    RANDOM = "random"


class SteerMode(Choice):
    ADD = "add"
    CLAMP = "clamp"
    MULTIPLY = "multiply"


class EditScope(Choice):
    ALL = "all"
    DESIGNED = "designed"


class Positions(Choice):
    MASKED = "masked"
    ALL = "all"


class MaskStrategy(Choice):
    RANDOM = "random"
    LOW_ACTIVATION = "low-activation"


class Decode(Choice):
    ARGMAX = "argmax"
    ITERATIVE = "iterative"
    GIBBS = "gibbs"
    SAMPLE = "sample"


class Control(Choice):
    RANDOM_LATENT = "random-latent"
    ACTIVITY_MATCHED = "activity-matched"


class PpplPositions(Choice):
    ALL = "all"
    DESIGNED = "designed"


# -- export-structure ----------------------------------------------------------------------------------------

class StructureScale(Choice):
    MAX = "max"
    RAW = "raw"


# -- callbacks for values Click cannot type: comma lists and device specs -------------------------------------

def _listing(choice: type[Choice]) -> str:
    return ", ".join(values(choice))


def split_choices(value: str, choice: type[Choice]) -> list[str]:
    """'h5, tsv' -> ['h5', 'tsv'] (empty items dropped); raises BadParameter naming the first bad item."""
    items = [x.strip() for x in value.split(",") if x.strip()]
    allowed = values(choice)
    for item in items:
        if item not in allowed:
            raise typer.BadParameter(f"{item!r} is not one of {_listing(choice)}")
    if not items:
        raise typer.BadParameter(f"give at least one of {_listing(choice)}")
    return items


def formats_callback(value: str | None) -> str | None:
    """`--formats h5,tsv`: checked item by item, returned as a canonical comma list for the command to split."""
    return None if value is None else ",".join(split_choices(value, OutputFormat))


def controls_callback(value: list[str] | None) -> list[str] | None:
    """`--control` may be repeated and each value may be a comma list; returns the flat list of kinds."""
    if value is None:
        return None
    return [kind for v in value for kind in split_choices(v, Control)]


_GPU_WORD = re.compile(r"gpu(:\d+)?", re.IGNORECASE)


def _gpu_hint(item: str) -> str:
    m = _GPU_WORD.fullmatch(item)
    if not m:
        return ""
    return f" (use cuda{m.group(1) or ''}: GPUs are named cuda or cuda:N)"


def device_callback(value: str) -> str:
    """auto, cpu, cuda or cuda:N, checked without importing torch (whether the GPU exists is the library's)."""
    v = value.strip()
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
        return v
    raise typer.BadParameter(f"{value!r} is not a device; choose auto, cpu, cuda or cuda:N{_gpu_hint(v)}")


def devices_callback(value: str | None) -> str | None:
    """`--devices`: 'all', or a comma list of GPU ordinals, cuda:N and cpu (as multigpu.parse_devices reads)."""
    if value is None or value.strip() == "all":
        return value
    items = [x.strip() for x in value.split(",")]
    for item in items:
        if not re.fullmatch(r"\d+|cuda:\d+|cpu", item):
            what = repr(item) if item else "an empty item"
            raise typer.BadParameter(f"{what} is not a device; give 'all' or a comma list of GPU ordinals "
                                     f"(0,1,...), cuda:N or cpu{_gpu_hint(item)}")
    return value


def open_ends(low: float | None = None,
              high: float | None = None) -> Callable[[float | None], float | None]:
    """Callback for a range with open ends, e.g. a fraction in [0, 1): ``min=0, callback=open_ends(high=1)``.

    Why a callback: Typer's min/max are closed bounds and it does not expose Click's open-interval flags.
    """

    def check(value: float | None) -> float | None:
        if value is not None and low is not None and value <= low:
            raise typer.BadParameter(f"must be greater than {low:g}, got {value:g}")
        if value is not None and high is not None and value >= high:
            raise typer.BadParameter(f"must be less than {high:g}, got {value:g}")
        return value

    return check


# -- option types shared by several commands ---------------------------------------------------------------

_MODEL_HELP = ("ESM-2 by fair-esm name (e.g. esm2_t33_650M_UR50D; looked up in the torch hub cache, downloaded "
               "when online), a checkpoint path, a Hugging Face ESM-2 folder (config.json + model.safetensors) or "
               "hub id in the local HF cache (facebook/esm2_t33_650M_UR50D; never downloaded).")

# annotate, steer: the PLM defaults to the one the SAE was trained on.
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", rich_help_panel=MODELS_PANEL, metavar="NAME|PATH",
    help=_MODEL_HELP + " Default: the SAE's own PLM, or the bundled stand-in.")]

# train, eval: no SAE to take the PLM from (train makes one; eval compares several at one PLM).
PlmOpt = Annotated[str | None, typer.Option(
    "--model", "-m", rich_help_panel=MODELS_PANEL, metavar="NAME|PATH",
    help=_MODEL_HELP + " Default: the bundled stand-in.")]

SaeOpt = Annotated[str | None, typer.Option(
    "--sae", rich_help_panel=MODELS_PANEL, metavar="DIR",
    help="SAE checkpoint directory (config.json + sae.safetensors). Default: the bundled demo SAE.")]

CheckPlmOpt = Annotated[bool, typer.Option(
    "--check-plm/--no-check-plm", rich_help_panel=MODELS_PANEL,
    help="Refuse an SAE trained on other PLM weights: the file checksum must match, or (another file, e.g. "
         "fair-esm .pt vs Hugging Face safetensors) the weights digest the SAE records.")]

DeviceOpt = Annotated[str, typer.Option(
    "--device", callback=device_callback, rich_help_panel=PERF_PANEL, metavar="DEVICE",
    help="auto (CUDA if present), cpu, cuda or cuda:N.")]

ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", min=1, rich_help_panel=PERF_PANEL, help="CPU threads for torch (default: torch's choice).")]

ProgressOpt = Annotated[bool, typer.Option(
    "--progress/--no-progress",
    help="Progress on stderr: a bar on a terminal, else a log line every 30 s (PROTSAE_PROGRESS_INTERVAL); "
         "off under -q.")]

AnnotationsOpt = Annotated[list[str], typer.Option(
    "--annotations", "-a", rich_help_panel=CONCEPTS_PANEL, metavar="PATH",
    help="Concept annotation file (repeat for several sources): Swiss-Prot, UniProt XML/TSV, TMbed, binding "
         "lists, GAF, GO TSV, generic TSV. Comma-join files that form one source (bindPredict "
         "metal,nuclear,small). A protein missing from a file is unlabelled (not negative) for its concepts.")]

CallingOpt = Annotated[str, typer.Option(
    "--calling", metavar="POINT", rich_help_panel=CONCEPTS_PANEL,
    help="Operating point each concept's threshold is chosen for on the validation proteins: f1 (best F1), "
         "precision:P (most recall with precision >= P, e.g. precision:0.9) or recall:R (docs/CALLS.md).")]

OntologyOpt = Annotated[list[str], typer.Option(
    "--ontology", rich_help_panel=CONCEPTS_PANEL, metavar="PATH",
    help="OBO ontology (repeatable): GO (go.obo) for GAF / GO TSV files; for residue files the first other one "
         "\\[default: the shipped residue-concept ontology]. Labels are propagated to ancestor concepts.")]

PropagateOpt = Annotated[bool, typer.Option(
    "--propagate/--no-propagate", rich_help_panel=CONCEPTS_PANEL,
    help="Add ancestor concepts to the labels (zinc binding is metal binding).")]

AnnotationFormatOpt = Annotated[list[AnnotationFormat], typer.Option(
    "--annotation-format", rich_help_panel=CONCEPTS_PANEL,
    help="Format of each --annotations source, in order (one value applies to all); auto guesses it from the "
         "file name and first lines \\[default: auto].")]


# -- global logging options: the root command's, and accepted after any subcommand too (cli/command.py) --------

VerboseOpt = Annotated[int, typer.Option(
    "--verbose", "-v", count=True, show_default=False,
    help="More log detail on stderr: -v debug, -vv also other libraries' messages. A flag: repeat it, no number.")]

QuietOpt = Annotated[int, typer.Option(
    "--quiet", "-q", count=True, show_default=False,
    help="Less on stderr: -q warnings and errors only, -qq errors only.")]

LogFileOpt = Annotated[str | None, typer.Option(
    "--log-file", metavar="PATH", help="Also append the log (INFO and above) to this file.")]


# -- published SAE formats (protsae_cli/sae/foreign.py, docs/FOREIGN_SAES.md): what a checkpoint does not record --

SaeLayerOpt = Annotated[int | None, typer.Option(
    "--sae-layer", min=1, rich_help_panel=MODELS_PANEL, metavar="L",
    help="Layer a published SAE (InterPLM, InterProt, SAELens, sparsify) reads: protsae's 1-based ESM-2 block. "
         "Only for files that do not record it; picks the layer of a multi-layer sparsify folder.")]

SaePlmOpt = Annotated[str | None, typer.Option(
    "--sae-plm", rich_help_panel=MODELS_PANEL, metavar="NAME",
    help="ESM-2 a published SAE was trained on (e.g. esm2_t33_650M_UR50D), for files that do not record it. "
         "Default with --model: that model.")]

SaeKOpt = Annotated[int | None, typer.Option(
    "--sae-k", min=1, rich_help_panel=MODELS_PANEL, metavar="N",
    help="Code slots per residue for a published ReLU/JumpReLU SAE (no k of its own): the N largest "
         "activations are kept; N = d_sae keeps all.")]


class DecodeMode(Choice):
    """How annotate turns region concepts into segments (docs/SEGMENTS.md)."""

    VITERBI = "viterbi"
    NONE = "none"


class SegmentDecoderMode(Choice):
    """What calibrate does with the SAE's topology decoder (evaluate.options.SEGMENT_DECODER_MODES)."""

    AUTO = "auto"
    FIT = "fit"
    KEEP = "keep"
