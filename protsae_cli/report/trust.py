"""What the report says a call is worth: concept reliability, heatmap row names, reference-label overlays.

A lane that looks as firm for a concept validated at F1 0.74 as for one at 0.14 misleads (issue #14), so:

* **Reliability on every lane.** Each concept row of the annotation file's /concepts table carries the
  threshold and the precision, recall, F1 and positives measured at it on validation proteins, and the label
  source (docs/CALLS.md). The report prints them under the lane's name and in its tooltip; files written
  before those columns existed, or concepts nobody measured, say "not measured" instead of looking validated.
  Whether a concept was withheld comes from the same numbers and the run's ``concepts_withheld`` attribute.
* **Reference tracks** (``report --annotations``): label files in any format ``eval``/``calibrate`` read,
  loaded by the same loader (:func:`protsae_cli.labels.sources.load_label_sources`) and matched to the file's
  proteins by id, exactly or through a ``|``-separated part as the loaders do. They are drawn as tracks
  under the predicted lanes. A protein of a label file that the annotation file does not hold is listed in a
  warning; a label file none of whose proteins is there is an error, since that is a wrong file, not data.
* **Heatmap rows** name the latent's best concept (highest validated F1) and that F1.

Reading stays torch-free: only numpy, h5py and the label loaders are imported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from protsae_cli.errors import InputError

if TYPE_CHECKING:
    from protsae_cli.labels.sources import AnnotationSpec
    from protsae_cli.report.html import ConceptRow
    from protsae_cli.io.writers.h5 import H5Annotations

log = logging.getLogger("protsae.report")

NOT_MEASURED = "not measured"
#: Proteins of a label file named in the "not in the annotation file" warning before it says "and N more".
WARN_IDS = 10


# ---------------------------------------------------------------------------------------------------------
# Reliability of one concept row
# ---------------------------------------------------------------------------------------------------------

def measured(row: ConceptRow) -> bool:
    """True when precision or F1 was measured (the same test annotate's calling policy uses)."""
    return row.precision is not None or row.f1 is not None


def _num(x: float | None) -> str:
    return "\u2013" if x is None else f"{x:.3f}"


def floor_reason(row: ConceptRow) -> str | None:
    """Why a measured concept is below annotate's default calling floors (concepts.below_floor), or None."""
    from protsae_cli.call.concepts import CallPolicy, below_floor

    return below_floor(row, CallPolicy())  # type: ignore[arg-type]  # duck-typed: reads the same fields


def call_status(row: ConceptRow, call_withheld: bool) -> str:
    """How annotate treated a concept that is in the file's table (withheld ones are not in it)."""
    if not measured(row):
        return f"called; reliability {NOT_MEASURED}"
    why = floor_reason(row)
    if why is None:
        return "called: passes the calling floors"
    how = "because of --call-withheld" if call_withheld else "under a custom calling policy"
    return f"below the default floors ({why}); called {how}"


def short_reliability(row: ConceptRow) -> str:
    """One line under a lane's name: ``P 0.73 · R 0.75 · F1 0.74`` or ``reliability not measured``."""
    if not measured(row):
        return f"reliability {NOT_MEASURED}"
    text = f"P {_num(row.precision)} \u00b7 R {_num(row.recall)} \u00b7 F1 {_num(row.f1)}"
    return text + (" \u00b7 below floor" if floor_reason(row) else "")


def reliability_lines(row: ConceptRow, call_withheld: bool, threshold: bool = True) -> list[str]:
    """Every reliability field of a concept row, for tooltips and the concept table (``threshold=False``
    where the caller already shows the threshold, as a lane's tooltip header does)."""
    how = [f"threshold {row.threshold:.4g}"] if threshold else []
    if row.operating_point:
        how.append(f"operating point {row.operating_point}")
    if row.kind:
        how.append(f"{row.kind} concept")
    lines = [" \u00b7 ".join(how)] if how else []
    if not measured(row):
        lines.append(f"precision / recall / F1: {NOT_MEASURED} (protsae calibrate measures them)")
    else:
        lines.append(f"validation precision {_num(row.precision)} \u00b7 recall {_num(row.recall)} \u00b7 "
                     f"F1 {_num(row.f1)} \u00b7 {row.positives:,} positive residues")
        lines.append(f"labels: {row.label_source or 'not recorded'}")
        if row.validation:
            lines.append(f"validation proteins: {row.validation}")
    lines.append(call_status(row, call_withheld))
    return lines


def best_row(rows: Sequence[ConceptRow]) -> ConceptRow | None:
    """The entry with the highest measured F1 (then the first): whose numbers a shared lane or latent shows."""
    if not rows:
        return None
    return max(rows, key=lambda r: (-1.0 if r.f1 is None else r.f1, -rows.index(r)))


def call_withheld_on(attrs: Mapping[str, Any]) -> bool:
    """Whether the run called withheld concepts anyway (its ``calling_policy`` attribute says so)."""
    return "--call-withheld on" in str(attrs.get("calling_policy", ""))


def withheld_list(attrs: Mapping[str, Any]) -> list[str]:
    """The run's withheld concepts, ``"PSC:0000210 metal binding (precision 0.21 < 0.5)"`` each."""
    text = str(attrs.get("concepts_withheld", "") or "")
    return [part.strip() for part in text.split("; ") if part.strip()]


def heatmap_names(rows: Sequence[ConceptRow], width: int = 40) -> dict[int, tuple[str, str]]:
    """Per latent with a concept: (row label suffix, tooltip). The label names the latent's best concept
    (highest F1) and that F1, the name clipped so the F1 always fits in ``width`` characters with ``L<latent>``."""
    by_latent: dict[int, list[ConceptRow]] = {}
    for r in rows:
        by_latent.setdefault(r.latent, []).append(r)
    out: dict[int, tuple[str, str]] = {}
    for latent, entries in by_latent.items():
        best = best_row(entries)
        assert best is not None
        name = best.name or best.concept_id
        f1 = f" \u00b7 F1 {_num(best.f1)}" if best.f1 is not None else ""
        more = f" +{len(entries) - 1}" if len(entries) > 1 else ""
        room = width - len(f"L{latent} \u00b7 ") - len(f1) - len(more)
        if len(name) > room:
            name = name[:max(1, room - 1)] + "\u2026"
        tip = "; ".join(f"{e.name or e.concept_id} ({e.concept_id}): F1 "
                        f"{_num(e.f1) if e.f1 is not None else NOT_MEASURED}" for e in entries)
        out[latent] = (f"{name}{more}{f1}", tip)
    return out


# ---------------------------------------------------------------------------------------------------------
# Reference labels (report --annotations)
# ---------------------------------------------------------------------------------------------------------

@dataclass
class ProteinReference:
    """One label source's view of one drawn protein."""

    tracks: list[tuple[str, str, list[tuple[int, int]], bool]] = field(default_factory=list)
    # (concept id, name, 1-based inclusive runs, reached only through the ontology)
    masked: list[tuple[int, int]] = field(default_factory=list)
    terms: list[tuple[str, str]] = field(default_factory=list)   # protein-level (GO) labels: (id, name)
    problem: str = ""                                             # why nothing is drawn (length mismatch)


@dataclass
class ReferenceSource:
    """A label source resolved against an annotation file: which of its proteins are which file positions."""

    name: str
    fmt: str
    kind: str                                 # "residue" | "protein"
    labels: Any                               # ResidueLabels | ProteinLabels, keyed by the label file's ids
    names: dict[str, str]
    label_id: dict[str, str]                  # annotation-file id -> label-file id
    matched: int
    unmatched: list[str]

    def for_protein(self, protein_id: str, length: int, table_ids: Sequence[str]) -> ProteinReference | None:
        """The tracks to draw for one protein, or None when this source does not label it.

        Concepts shown: every concept the file labels on the protein, and the ancestors of those (through the
        shipped ontology) that are in the run's concept table, so that a zinc-binding label lines up with a
        metal-binding call. Positions are checked against the protein's length: labels made for another
        sequence of the same id are not drawn, and the card says why.
        """
        pid = self.label_id.get(protein_id)
        if pid is None:
            return None
        if self.kind == "protein":
            terms = sorted(self.labels.labels.get(pid, set()))
            return ProteinReference(terms=[(t, self.names.get(t, "")) for t in terms])
        lab = self.labels
        known = lab.lengths.get(pid)
        per = lab.positions.get(pid, {})
        last = max((int(idx[-1]) + 1 for idx in per.values() if idx.size), default=0)
        if (known is not None and known != length) or last > length:
            what = f"a sequence of {known} residues" if known is not None and known != length else \
                f"residue {last}"
            return ProteinReference(problem=f"{self.name} labels {pid} with {what}, but this protein has {length} "
                                            "residues: labels for a different sequence under the same id? Not drawn")
        direct = {c: idx for c, idx in per.items() if idx.size}
        shown: dict[str, tuple[np.ndarray, bool]] = {c: (idx, False) for c, idx in direct.items()}
        wanted = [c for c in table_ids if c not in direct]
        names = dict(self.names)
        if wanted and direct:
            from protsae_cli.labels.formats import concept_ontology

            onto = concept_ontology()
            names.update({c: onto.name(c) for c in wanted if c in onto and c not in names})
            for c in wanted:
                if c not in onto:
                    continue
                below = [idx for d, idx in direct.items() if d in onto and c in onto.ancestors(d)]
                if below:
                    shown[c] = (np.unique(np.concatenate(below)), True)
        order = [c for c in table_ids if c in shown] + sorted(c for c in shown if c not in table_ids)
        masked = lab.masked.get(pid)
        return ProteinReference(
            tracks=[(c, names.get(c) or c, _runs(shown[c][0]), shown[c][1]) for c in order],
            masked=_runs(masked) if masked is not None else [])


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Sorted 0-based residue indices -> 1-based inclusive runs."""
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [idx.size]))
    return [(int(idx[a]) + 1, int(idx[b - 1]) + 1) for a, b in zip(starts, ends, strict=True)]


def load_references(specs: Sequence[AnnotationSpec], ann: H5Annotations) -> list[ReferenceSource]:
    """Load each source with eval's loader and match its proteins to the annotation file's ids.

    The loader is given no sequence set, so every protein of the file is read under its own id (a label file
    usually covers more proteins than one run); ids are then matched here with the loaders' own rules (exact,
    else an unambiguous ``|``-separated part), and lengths are checked per drawn protein.
    """
    from protsae_cli.labels.formats import _aliases, _IdMatcher
    from protsae_cli.labels.sources import load_label_sources

    if not specs:
        return []
    # The report lists GO terms as given: no propagation, so no advice to pass --ontology either.
    sources = load_label_sources(specs, None, None, propagate=False)
    ids = [str(x) for x in ann.proteins["id"]]
    out = []
    for spec, src in zip(specs, sources, strict=True):
        matcher = _IdMatcher(spec.name, ids, "skip")
        label_ids = src.labels.protein_ids
        label_id: dict[str, str] = {}
        unmatched = []
        for pid in label_ids:
            hit = matcher.lookup(pid, *sorted(_aliases(pid)))  # either side may be the |-joined one
            if hit is None:
                unmatched.append(pid)
            else:
                label_id.setdefault(hit, pid)
        files = ", ".join(spec.paths)
        if not label_id:
            shown = ", ".join(repr(p) for p in label_ids[:5]) or "none"
            raise InputError(f"{files}: none of its {len(label_ids):,} labelled proteins is in {ann.path} (ids "
                             f"such as {shown}); ids are matched exactly or by a |-separated part. Is it the "
                             "label file for these proteins?")
        if unmatched:
            more = f" and {len(unmatched) - WARN_IDS:,} more" if len(unmatched) > WARN_IDS else ""
            log.warning("%s: %d of %d labelled proteins are not in %s and are not drawn: %s%s", files,
                        len(unmatched), len(label_ids), ann.path, ", ".join(unmatched[:WARN_IDS]), more)
        out.append(ReferenceSource(name=spec.name, fmt=src.fmt, kind=src.kind, labels=src.labels,
                                   names=dict(src.names), label_id=label_id, matched=len(label_id),
                                   unmatched=unmatched))
    return out
