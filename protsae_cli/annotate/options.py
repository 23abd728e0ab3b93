"""The options and summary of an annotate run, and the small helpers its pipeline, `--resume` and the
`--devices` workers share. Separate from pipeline.py so that resume.py and workers.py need not import the
pipeline that calls them (no import cycle)."""

from __future__ import annotations

import os
import shlex
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from protsae_cli.errors import InputError
from protsae_cli.io.writers import DEFAULT_FORMATS


#: Default chunk size in residues (see AnnotateOptions.chunk_residues and docs/PIPELINES.md for why).
DEFAULT_CHUNK_RESIDUES = 65_536


@dataclass
class AnnotateOptions:
    input: str
    output_prefix: str
    model: str | None = None
    sae: str | None = None
    formats: tuple[str, ...] = DEFAULT_FORMATS
    device: str = "auto"
    backend: str = "auto"
    toks_per_batch: int = 16384
    long_policy: str = "window"
    window_overlap: int = 256
    max_window: int = 1022
    min_segment_len: int = 1
    merge_gap: int = 0
    decode: str = "viterbi"                   # region concepts: topology Viterbi (docs/SEGMENTS.md) or "none"
    call_withheld: bool = False               # also call concepts below the reliability floors (docs/CALLS.md)
    skip_invalid: bool = False
    check_plm: bool = True
    h5_dtype: str = "float32"  # what scipy.sparse / AnnData read; float16 halves the size but they refuse it
    compression: str | None = "gzip"
    shard: tuple[int, int] | None = None      # (i, n), 1-based i; selects records with index % n == i-1
    progress: bool = True
    threads: int | None = None
    # Chunk limits bound memory and are the unit of --resume checkpoints; --chunk-residues,
    # PROTSAE_CHUNK_RESIDUES and PROTSAE_CHUNK_RECORDS override them (smaller chunks: less lost work per crash,
    # more part files). 65,536 residues = 4 full default batches: ~20 s of the 8M-shaped model on 2 idle CPU
    # cores (docs/PIPELINES.md, "--resume"); GPU chunk overhead is not measured yet (no GPU lent).
    chunk_residues: int = field(default_factory=lambda: _env_int("PROTSAE_CHUNK_RESIDUES", DEFAULT_CHUNK_RESIDUES))
    chunk_records: int = field(default_factory=lambda: _env_int("PROTSAE_CHUNK_RECORDS", 4096))
    resume: bool = False                      # checkpoint finished chunks under PREFIX.parts/ and reuse them
    command: str = field(default_factory=lambda: shlex.join(["protsae", *sys.argv[1:]]))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        raise InputError(f"{name}={value!r} is not an integer") from None
    if n < 1:
        raise InputError(f"{name} must be at least 1, got {n}")
    return n


@dataclass
class AnnotateSummary:
    proteins: int = 0
    ok: int = 0
    windowed: int = 0
    truncated: int = 0
    invalid: int = 0
    failed: int = 0
    residues: int = 0
    segments: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    backend: str = ""
    device: str = ""

    @property
    def residues_per_second(self) -> float:
        return self.residues / self.seconds if self.seconds > 0 else 0.0


def tally(s: AnnotateSummary, res) -> None:
    s.proteins += 1
    s.segments += len(res.segments)
    if res.status in ("ok", "windowed", "truncated"):
        s.residues += res.idx.shape[0]
    if res.status == "ok":
        s.ok += 1
    elif res.status == "windowed":
        s.windowed += 1
    elif res.status == "truncated":
        s.truncated += 1
    elif res.status == "invalid":
        s.invalid += 1
    else:
        s.failed += 1


def count_records(source: str) -> int | None:
    """Total for the progress bar: cheap for regular files (count '>' lines), unknown for anything else.

    Only a regular file may be read twice: a FIFO, ``/dev/stdin`` or ``<(...)`` would lose what this pass
    reads (it cannot seek back), so those, like stdin and gzip, get no total rather than losing input.
    """
    if source == "-":
        return None
    p = Path(source)
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):
            return None
        with open(p, "rb") as f:
            if f.read(2) == b"\x1f\x8b":
                return None
            f.seek(0)
            n = 0
            for block in iter(lambda: f.read(1 << 22), b""):
                n += block.count(b"\n>")
            f.seek(0)
            return n + (1 if f.read(1) == b">" else 0)
    except OSError:
        return None


def progress_bar(enabled: bool, total: int | None):
    """Proteins done (residues beside them): a bar on a terminal, periodic log lines in pipelines
    (protsae_cli.progress). `total` is None for inputs that cannot be counted without consuming them."""
    from protsae_cli.progress import Progress

    return Progress("annotating", total, unit="proteins", enabled=enabled)
