"""Segment table as TSV: one row per (concept, segment), InterProScan-style but with a ``#`` header line.

Users parse these files by column position (R, ``cut``, pandas), so the column order is fixed here and in
docs/ARCHITECTURE.md, new columns are only ever appended, cells never contain tabs or line breaks, and missing
values are always ``-``. ``ontology_id`` holds the concept's standard SO/GO ids (``concept_id`` is the PSC id);
``concept_precision``/``concept_recall``/``concept_f1`` are the concept's validated reliability at its
threshold and ``score`` the segment's calibrated probability (docs/CALLS.md), ``-`` where not measured. Rows are
written as proteins arrive (input order), then by start, then latent, so memory does not depend on the
number of proteins and two runs over the same input give the same file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from protsae_cli.call.concepts import ConceptLookup, segment_score
from protsae_cli.io.results import ProteinResult, Segment
from protsae_cli.io.atomic import OutputWriter, TextOutput

if TYPE_CHECKING:
    from protsae_cli.sae.config import ConceptEntry

TSV_COLUMNS: tuple[str, ...] = (
    "protein_id", "protein_index", "length", "seq_md5", "latent", "concept_id", "concept_name", "ontology_id",
    "start", "end", "max_act", "mean_act", "threshold", "hook", "layer", "plm",
    # Appended, never inserted, so scripts that cut the columns above by position keep working.
    "concept_precision", "concept_recall", "concept_f1", "score",
)
MISSING = "-"

_CELL_BREAKS = str.maketrans({"\t": " ", "\n": " ", "\r": " "})


def format_float(x: float | None) -> str:
    """``%.4g``: four significant digits are plenty for activations and keep files small and diff-able."""
    if x is None:
        return MISSING
    return f"{float(x):.4g}"


def cell(value: object) -> str:
    """A text cell: empty/None becomes ``-``; tabs and line breaks become spaces so rows stay rows."""
    if value is None:
        return MISSING
    s = str(value)
    if not s:
        return MISSING
    return s.translate(_CELL_BREAKS)


def format_metric(x: float | None) -> str:
    """Precision/recall/F1/score cells: three decimals (``-`` when not measured)."""
    return MISSING if x is None else f"{float(x):.3f}"


def reliability_cells(entry: ConceptEntry | None, max_act: float) -> tuple[str, str, str, str]:
    """(precision, recall, F1, score) cells of one segment of `entry`."""
    if entry is None:
        return (MISSING,) * 4
    return (format_metric(getattr(entry, "precision", None)), format_metric(getattr(entry, "recall", None)),
            format_metric(getattr(entry, "f1", None)),
            format_metric(segment_score(entry, max_act) if getattr(entry, "score_curve", None) else None))


def sorted_segments(segments: Sequence[Segment]) -> list[Segment]:
    """Segments in output order (start, latent, threshold) whatever order the caller built them in."""
    return sorted(segments, key=lambda s: (s.start, s.latent, s.threshold))


class TSVWriter(OutputWriter):
    """Streaming segment TSV (``path`` may be ``-`` for stdout, ``*.gz`` for gzip).

    ``d_sae`` and ``k`` are accepted so all writers share one constructor shape; the TSV does not store codes.
    A segment whose (latent, threshold) matches several concept entries gets one row per entry; a segment
    whose latent has no entry gets one row with ``-`` concept fields rather than disappearing.
    """

    def __init__(self, path: str | os.PathLike[str], provenance: Mapping[str, str | int | float],
                 concepts: Sequence[ConceptEntry], d_sae: int, k: int, *, header: bool = True):
        super().__init__()
        self.path = path
        self.d_sae, self.k = int(d_sae), int(k)
        self.lookup = ConceptLookup(concepts)
        self._hook = cell(provenance.get("hook_point"))
        self._layer = cell(provenance.get("layer"))
        self._plm = cell(provenance.get("plm_model"))
        self.out = TextOutput(path)
        self.n_rows = 0
        if header:
            self.out.write("#" + "\t".join(TSV_COLUMNS) + "\n")

    def _write(self, result: ProteinResult) -> None:
        if not result.segments:
            return
        head = (cell(result.id), str(result.index), str(result.length), cell(result.seq_md5))
        lines = []
        for seg in sorted_segments(result.segments):
            entries: list[ConceptEntry | None] = list(self.lookup.entries(seg)) or [None]
            for c in entries:
                lines.append("\t".join((
                    *head, str(seg.latent),
                    cell(c.concept_id if c else None), cell(c.name if c else None),
                    cell(c.ontology_id if c else None),
                    str(seg.start), str(seg.end), format_float(seg.max_act), format_float(seg.mean_act),
                    format_float(seg.threshold), self._hook, self._layer, self._plm,
                    *reliability_cells(c, seg.max_act),
                )) + "\n")
        self.out.write("".join(lines))
        self.n_rows += len(lines)

    def _close(self) -> None:
        self.out.close()

    def _abort(self) -> None:
        self.out.abort()
