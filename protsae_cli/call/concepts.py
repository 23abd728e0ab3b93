"""Turn per-residue top-k codes into concept segments.

Rules (the ones ``--min-segment-len`` and ``--merge-gap`` document):

* A residue is *on* for a concept entry when the entry's latent is among that row's top-k slots with an
  activation ``>= threshold`` and ``> 0``. Both sides are compared in float32, the dtype the encoder produces,
  so a threshold of 0.7 matches an activation of ``float32(0.7)`` instead of missing it by rounding.
* Maximal runs of on-residues form segments. Two runs of the same entry separated by at most ``merge_gap``
  off-residues become one segment; the bridged residues are inside ``start..end`` but do not contribute to
  ``max_act``/``mean_act``, which describe only residues where the concept actually fired (otherwise a merge
  would dilute the mean with activations that were below threshold or absent).
* Segments shorter than ``min_segment_len`` (span, after merging) are dropped, so merging can rescue two short
  runs that together are long enough.
* Entries that share both latent and threshold give identical segments; they are called once, and writers
  expand each segment back to every matching entry (see :class:`ConceptLookup`).

The caller is the annotate hot path (thousands of residues x k=64 x hundreds of concepts per protein), so
everything works on the flat list of non-empty slots: only slots whose latent is some concept's latent are
kept, and runs are found with sorting and ``diff`` rather than Python loops over residues or concepts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from protsae_cli.io.results import Segment

if TYPE_CHECKING:  # sae.py imports torch; readers of finished outputs should not pay for it.
    import logging

    from protsae_cli.sae.config import ConceptEntry


def _concept_keys(concepts: Sequence[ConceptEntry]) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Unique (latent, float32 threshold) keys sorted by latent then threshold.

    Returns the latents, the float32 thresholds used for comparison and the original thresholds (Python
    floats), which are what a segment reports so that it can be matched back to its entries exactly.
    """
    seen: dict[tuple[int, np.float32], float] = {}
    for c in concepts:
        latent = int(c.latent)
        if latent < 0:
            raise ValueError(f"concept {c.concept_id!r}: latent must be >= 0, got {latent}")
        key = (latent, np.float32(c.threshold))
        seen.setdefault(key, float(c.threshold))
    keys = sorted(seen)
    lat = np.fromiter((k[0] for k in keys), dtype=np.int64, count=len(keys))
    thr = np.fromiter((k[1] for k in keys), dtype=np.float32, count=len(keys))
    return lat, thr, [seen[k] for k in keys]


def call_segments(idx: np.ndarray, val: np.ndarray, concepts: Sequence[ConceptEntry],
                  min_segment_len: int = 1, merge_gap: int = 0) -> list[Segment]:
    """Concept segments of one protein from its top-k codes.

    ``idx``/``val`` are ``[rows, k]`` (``-1`` marks an empty slot); row ``r`` is residue ``r + 1``. Returns
    segments in 1-based inclusive coordinates sorted by start, then latent, then threshold.
    """
    if min_segment_len < 1:
        raise ValueError(f"min_segment_len must be >= 1, got {min_segment_len}")
    if merge_gap < 0:
        raise ValueError(f"merge_gap must be >= 0, got {merge_gap}")
    idx = np.asarray(idx)
    val = np.asarray(val, dtype=np.float32)
    if idx.shape != val.shape or idx.ndim != 2:
        raise ValueError(f"idx {idx.shape} and val {val.shape} must both be [rows, k]")
    if not concepts or idx.size == 0:
        return []
    key_lat, key_thr, key_thr_orig = _concept_keys(concepts)
    n_rows, k = idx.shape

    # Flat non-empty slots whose latent belongs to at least one concept key.
    lat = idx.reshape(-1).astype(np.int64, copy=False)
    v = val.reshape(-1)
    uniq_lat, first_key, keys_per_lat = np.unique(key_lat, return_index=True, return_counts=True)
    pos = np.searchsorted(uniq_lat, lat)
    pos_c = np.minimum(pos, uniq_lat.size - 1)
    hit = (lat >= 0) & (v > 0) & (uniq_lat[pos_c] == lat)
    slot = np.flatnonzero(hit)
    if slot.size == 0:
        return []
    row = slot // k
    v = v[slot]
    pos = pos_c[slot]

    # A latent bound to several thresholds yields one candidate (slot, key) pair per key.
    n_keys = keys_per_lat[pos]
    if np.any(n_keys > 1):
        rep = np.repeat(np.arange(slot.size), n_keys)
        within = np.arange(rep.size) - np.repeat(np.cumsum(n_keys) - n_keys, n_keys)
        key = first_key[pos][rep] + within
        row, v = row[rep], v[rep]
    else:
        key = first_key[pos]
    on = v >= key_thr[key]
    key, row, v = key[on], row[on], v[on]
    if key.size == 0:
        return []

    # Sort by (key, row); a well-formed top-k row never repeats a latent, but if one did the repeat must not
    # start a zero-length "run", so exact duplicates keep only their first occurrence.
    code = key.astype(np.int64) * n_rows + row
    order = np.argsort(code, kind="stable")
    code, key, row, v = code[order], key[order], row[order], v[order]
    if code.size > 1:
        keep = np.empty(code.size, dtype=bool)
        keep[0] = True
        np.not_equal(code[1:], code[:-1], out=keep[1:])
        if not keep.all():
            key, row, v = key[keep], row[keep], v[keep]

    # A new segment starts where the key changes or the gap to the previous on-residue is too wide.
    brk = np.empty(key.size, dtype=bool)
    brk[0] = True
    np.logical_or(key[1:] != key[:-1], (row[1:] - row[:-1]) > merge_gap + 1, out=brk[1:])
    starts = np.flatnonzero(brk)
    ends = np.append(starts[1:], key.size) - 1
    seg_key = key[starts]
    seg_start = row[starts]
    seg_end = row[ends]
    seg_max = np.maximum.reduceat(v, starts)
    seg_mean = np.add.reduceat(v.astype(np.float64), starts) / (ends - starts + 1)

    keep = (seg_end - seg_start + 1) >= min_segment_len
    seg_key, seg_start, seg_end = seg_key[keep], seg_start[keep], seg_end[keep]
    seg_max, seg_mean = seg_max[keep], seg_mean[keep]
    # Keys are already ordered by (latent, threshold), so the key number is a valid tie-breaker.
    order = np.lexsort((seg_key, seg_start))
    return [
        Segment(latent=int(key_lat[kk]), start=int(s) + 1, end=int(e) + 1, max_act=float(mx),
                mean_act=float(mn), threshold=key_thr_orig[kk])
        for kk, s, e, mx, mn in zip(seg_key[order].tolist(), seg_start[order], seg_end[order], seg_max[order],
                                    seg_mean[order], strict=True)
    ]


class ConceptLookup:
    """Map a segment back to the concept entries it was called for.

    Segments carry (latent, threshold), not a concept, because the HDF5 segments table has no concept column
    and several entries may share one latent. Matching is on the float32 threshold so that segments read back
    from HDF5 (float32 thresholds) match as well as freshly called ones.
    """

    def __init__(self, concepts: Sequence[ConceptEntry]):
        self.concepts = list(concepts)
        self._by_key: dict[tuple[int, np.float32], list[ConceptEntry]] = {}
        self._by_latent: dict[int, list[ConceptEntry]] = {}
        for c in self.concepts:
            self._by_key.setdefault((int(c.latent), np.float32(c.threshold)), []).append(c)
            self._by_latent.setdefault(int(c.latent), []).append(c)

    def entries(self, seg: Segment) -> list[ConceptEntry]:
        """Entries for a segment; by latent alone when no threshold matches (segments from another run).

        Empty when the latent has no concept, and writers then emit the segment without concept fields rather
        than dropping it.
        """
        hit = self._by_key.get((int(seg.latent), np.float32(seg.threshold)))
        if hit is not None:
            return hit
        return self._by_latent.get(int(seg.latent), [])


# ------------------------------------------------------------------------------------------- calling policy
#: Floors below which a measured concept is withheld by default (docs/CALLS.md says why these values).
MIN_PRECISION = 0.5
MIN_F1 = 0.1
MIN_POSITIVES = 20


@dataclass(frozen=True)
class CallPolicy:
    """Which measured concepts annotate calls: validated precision and F1 at or above the floors, on at least
    ``min_positives`` labelled validation residues. A concept nobody measured (precision None) is called
    and reported as unmeasured: withholding it would silence every SAE calibrated before reliability existed."""

    min_precision: float = MIN_PRECISION
    min_f1: float = MIN_F1
    min_positives: int = MIN_POSITIVES
    call_withheld: bool = False

    def describe(self) -> str:
        return (f"withhold concepts with validation precision < {self.min_precision:g}, F1 < {self.min_f1:g} or "
                f"< {self.min_positives} positive residues (docs/CALLS.md); "
                f"--call-withheld {'on: all called' if self.call_withheld else 'off'}")


@dataclass
class CallSelection:
    called: list[ConceptEntry]
    withheld: list[tuple[ConceptEntry, str]]     # (entry, why), withheld by the policy
    forced: list[tuple[ConceptEntry, str]]       # below a floor but called because of --call-withheld
    unmeasured: list[ConceptEntry]               # called without a measured reliability

    def withheld_text(self) -> str:
        """One line for provenance/logs: ``PSC:0000210 metal binding (precision 0.21 < 0.5); ...``."""
        return "; ".join(f"{e.concept_id} {e.name} ({why})" for e, why in self.withheld)


def below_floor(entry: ConceptEntry, policy: CallPolicy) -> str | None:
    """Why a measured concept falls below the policy's floors, or None (also None when it was never measured)."""
    if entry.precision is None and entry.f1 is None:
        return None
    if entry.positives < policy.min_positives:
        return f"{entry.positives} validation positives < {policy.min_positives}"
    if entry.precision is not None and entry.precision < policy.min_precision:
        return f"precision {entry.precision:.3g} < {policy.min_precision:g}"
    if entry.f1 is not None and entry.f1 < policy.min_f1:
        return f"F1 {entry.f1:.3g} < {policy.min_f1:g}"
    return None


def select_calls(concepts: Sequence[ConceptEntry], policy: CallPolicy = CallPolicy()) -> CallSelection:
    """Split an SAE's concept table into what annotate calls and what it withholds, and why."""
    sel = CallSelection([], [], [], [])
    for e in concepts:
        why = below_floor(e, policy)
        if why is None:
            sel.called.append(e)
            if e.precision is None and e.f1 is None:
                sel.unmeasured.append(e)
        elif policy.call_withheld:
            sel.called.append(e)
            sel.forced.append((e, why))
        else:
            sel.withheld.append((e, why))
    return sel


def standardize(concepts: Sequence[ConceptEntry]) -> list[ConceptEntry]:
    """Copies whose ``ontology_id`` holds the concept's standard SO/GO ids and whose ``kind`` is filled in,
    from the shipped ontology's xrefs when the table leaves them empty or as a copy of the concept id (SAEs
    trained before the xrefs existed); ids a table states itself are kept first."""
    from protsae_cli.labels.ontology import concept_terms

    out = []
    for e in concepts:
        ont = e.ontology_id if e.ontology_id != e.concept_id else ""
        terms = concept_terms(e.concept_id, ont)
        std = ",".join(terms.ontology_terms)
        out.append(dataclasses.replace(e, ontology_id=std or e.ontology_id, kind=e.kind or terms.kind,
                                       score_curve=[list(p) for p in e.score_curve]))
    return out


def segment_score(entry: ConceptEntry | None, max_act: float) -> float | None:
    """A segment's score: the calibrated probability that a residue with the segment's peak activation carries
    the concept, read off the entry's ``score_curve`` (a non-decreasing step function of activation fitted on
    validation residues, docs/CALLS.md). None when the concept has no curve."""
    curve = entry.score_curve if entry is not None else None
    if not curve:
        return None
    x = float(np.float32(max_act))
    j = -1
    for i, (a, _) in enumerate(curve):   # curves have at most ~20 knots
        if float(np.float32(a)) <= x:
            j = i
        else:
            break
    p = curve[max(j, 0)][1]
    return float(p) if math.isfinite(p) else None


def log_calling(sel: CallSelection, log: logging.Logger) -> None:
    """Say what annotate withholds and why, in one line per run (a warning: -qq silences it, --log-file keeps it;
    the same list is in every output's provenance, `concepts_withheld`)."""
    if sel.withheld:
        log.warning("withheld %d concept%s below the reliability floors on validation proteins (docs/CALLS.md; "
                    "--call-withheld calls them): %s", len(sel.withheld), "" if len(sel.withheld) == 1 else "s",
                    "; ".join(f"{e.concept_id} {e.name} (latent {e.latent}: {why})" for e, why in sel.withheld))
    for e, why in sel.forced:
        log.warning("calling concept %s %s below the floor (%s) because of --call-withheld", e.concept_id, e.name, why)
    if sel.unmeasured:
        log.info("%d concept(s) have no measured reliability (protsae calibrate measures them): %s",
                 len(sel.unmeasured), ", ".join(e.concept_id for e in sel.unmeasured[:10]))
