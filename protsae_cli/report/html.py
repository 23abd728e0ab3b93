"""`protsae report`: one self-contained HTML page (plus optional PNGs) describing an annotation file.

Who reads it: a biologist who ran ``protsae annotate`` on a cluster and wants to see, without Python, what the
run was (provenance), which concepts fired where (top concepts, per-protein tracks) and what the raw latents did
(heatmaps, activation histograms). Hence:

* **One file, no network.** CSS, JavaScript, SVG and PNGs are inline (PNG as ``data:`` URIs); nothing is
  fetched, so the page works from a login node, an e-mail attachment or a pipeline's results folder.
* **Scales to big runs.** Run-level statistics are streamed in chunks (segments) or over a bounded prefix of the
  codes (latent histograms; the page says when it sampled). Detailed figures are drawn for a bounded set of
  proteins (the first ``max_proteins`` or the ones asked for); every protein is still listed in a searchable,
  sortable table rendered by a few lines of inline JavaScript from embedded JSON.
* **Data is never markup.** Ids and descriptions are verbatim FASTA headers and may hold ``<``, ``&`` or
  quotes; every data string is HTML-escaped, the embedded JSON escapes ``<``, ``>`` and ``&``, and anchors use
  file positions, never ids.
* **Deterministic.** No timestamps; the same file gives the same bytes (the run's own provenance is shown).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protsae_cli import __version__
from protsae_cli.errors import InputError

from protsae_cli.report.plots import (REF_COLOR, Heatmap, Lane, RefTrack, color_for, colorbar_uri, esc, fmt, histogram_svg,
                               protein_figure)
from protsae_cli.report.trust import (ReferenceSource, best_row, call_withheld_on, floor_reason, heatmap_names,
                                      load_references, measured, reliability_lines, short_reliability,
                                      withheld_list)

if TYPE_CHECKING:
    from protsae_cli.labels.sources import AnnotationSpec
    from protsae_cli.io.writers.h5 import H5Annotations, ProteinInfo

STATUS_ORDER = ("ok", "windowed", "truncated", "failed_oom", "invalid")
SEGMENT_CHUNK = 1 << 20
LATENT_CHUNK = 1 << 22


# ---------------------------------------------------------------------------------------------------------
# Concepts (read without torch: sae.ConceptEntry would import it)
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConceptRow:
    """One row of /concepts, with the reliability measured at its threshold (None/"" where not measured)."""

    latent: int
    concept_id: str
    name: str
    ontology_id: str
    threshold: float
    kind: str = ""
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    positives: int = 0
    label_source: str = ""
    operating_point: str = ""
    validation: str = ""

    @property
    def label(self) -> str:
        if self.name and self.name != self.concept_id:
            return f"{self.name} ({self.concept_id})" if self.concept_id else self.name
        return self.concept_id or f"latent {self.latent}"


def read_concepts(ann: H5Annotations) -> list[ConceptRow]:
    """The concept table as plain records; cheap (no torch), unlike ``H5Annotations.concepts``.

    Reliability columns are read when the file has them (annotate writes them since issue #14); a file
    written before keeps the defaults, which the report shows as "not measured"."""
    from protsae_cli.io.writers.h5 import read_concept_reliability

    g = ann.f["concepts"]
    if "latent" not in g:
        return []
    latents = g["latent"][()]
    thresholds = g["threshold"][()]
    cols = {name: g[name].asstr()[()] for name in ("concept_id", "name", "ontology_id")}
    known = set(ConceptRow.__dataclass_fields__)
    rel = [{k: v for k, v in r.items() if k in known} for r in read_concept_reliability(g)]
    return [ConceptRow(int(lat), str(cid), str(nm), str(ont), float(thr), **extra)
            for lat, cid, nm, ont, thr, extra in zip(latents, cols["concept_id"], cols["name"],
                                                    cols["ontology_id"], thresholds, rel, strict=True)]


def _key_code(latent: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """int64 code of (latent, float32 threshold): segments and concepts meet on exactly these two values."""
    bits = np.asarray(threshold, dtype=np.float32).view(np.uint32).astype(np.int64)
    return np.asarray(latent, dtype=np.int64) * (1 << 32) + bits


@dataclass
class ConceptStats:
    """Run-level numbers of one called concept key (latent, threshold) and the entries bound to it."""

    latent: int
    threshold: float
    entries: list[ConceptRow]
    segments: int = 0
    residues: int = 0
    proteins: int = 0
    max_act: float = 0.0
    top: list[tuple[float, int]] = field(default_factory=list)  # (max activation, protein ordinal), best first
    rank: int = 0

    @property
    def label(self) -> str:
        return " / ".join(dict.fromkeys(e.label for e in self.entries)) or f"latent {self.latent}"

    @property
    def short(self) -> str:
        names = list(dict.fromkeys((e.name or e.concept_id) for e in self.entries))
        return " / ".join(names) or f"latent {self.latent}"

    @property
    def color(self) -> str:
        return color_for(self.rank)


# ---------------------------------------------------------------------------------------------------------
# Run-level scans
# ---------------------------------------------------------------------------------------------------------

class OrdinalMap:
    """Input ordinal -> file position, vectorised (positions equal ordinals only for unsharded runs)."""

    def __init__(self, ordinals: np.ndarray):
        self.ordinals = np.asarray(ordinals, dtype=np.int64)
        n = self.ordinals.size
        self.sorted = bool(n < 2 or np.all(self.ordinals[1:] > self.ordinals[:-1]))
        self.order = None if self.sorted else np.argsort(self.ordinals, kind="stable")

    def positions(self, ordinals: np.ndarray) -> np.ndarray:
        """Positions of ``ordinals``; -1 where the ordinal is not in the file."""
        o = np.asarray(ordinals, dtype=np.int64)
        if self.ordinals.size == 0:
            return np.full(o.shape, -1, np.int64)
        keys = self.ordinals if self.order is None else self.ordinals[self.order]  # order is None iff sorted
        at = np.clip(np.searchsorted(keys, o), 0, keys.size - 1)
        found = keys[at] == o
        pos = at if self.order is None else self.order[at]
        return np.where(found, pos, -1)


def scan_segments(ann: H5Annotations, concepts: Sequence[ConceptRow], omap: OrdinalMap,
                  chunk: int = SEGMENT_CHUNK, top_n: int = 5) -> tuple[list[ConceptStats], np.ndarray, np.ndarray]:
    """Per-concept totals and per-protein segment/concept counts, streamed over /segments in chunks.

    Distinct (concept, protein) pairs are counted per chunk; a protein whose segments straddle a chunk boundary
    is de-duplicated against the previous chunk's last protein, which is exact because the writer stores
    segments grouped by protein.
    """
    keys: dict[int, ConceptStats] = {}
    for c in concepts:
        code = int(_key_code(np.array([c.latent]), np.array([c.threshold]))[0])
        st = keys.get(code)
        if st is None:
            keys[code] = ConceptStats(latent=c.latent, threshold=float(np.float32(c.threshold)), entries=[c])
        elif c not in st.entries:
            st.entries.append(c)
    codes_sorted = np.array(sorted(keys), dtype=np.int64)
    stats = [keys[int(c)] for c in codes_sorted]
    nk = len(stats)
    n_prot = ann.n_proteins
    seg_per_protein = np.zeros(n_prot, np.int64)
    concepts_per_protein = np.zeros(n_prot, np.int64)
    seg_count = np.zeros(nk, np.int64)
    res_count = np.zeros(nk, np.int64)
    prot_count = np.zeros(nk, np.int64)
    max_act = np.zeros(nk, np.float32)
    top: list[dict[int, float]] = [dict() for _ in range(nk)]
    prev_last: tuple[int, set[int]] = (-1, set())

    g = ann.f["segments"]
    total = int(g["start"].shape[0])
    for a in range(0, total, chunk):
        b = min(total, a + chunk)
        pidx = g["protein_index"][a:b].astype(np.int64)
        lat = g["latent"][a:b]
        thr = g["threshold"][a:b]
        span = (g["end"][a:b].astype(np.int64) - g["start"][a:b].astype(np.int64) + 1)
        mx = g["max_act"][a:b].astype(np.float32)
        pos = omap.positions(pidx)
        ok_pos = pos >= 0
        seg_per_protein += np.bincount(pos[ok_pos], minlength=n_prot)[:n_prot]
        if nk == 0:
            continue
        seg_codes = _key_code(lat, thr)
        at = np.clip(np.searchsorted(codes_sorted, seg_codes), 0, nk - 1)
        bound = codes_sorted[at] == seg_codes
        k = at[bound]
        seg_count += np.bincount(k, minlength=nk)
        res_count += np.bincount(k, weights=span[bound], minlength=nk).astype(np.int64)
        np.maximum.at(max_act, k, mx[bound])
        # Distinct (key, protein) pairs in this chunk.
        pairs = np.unique(np.stack([k, pidx[bound]], axis=1), axis=0) if k.size else np.empty((0, 2), np.int64)
        if pairs.size:
            dup = np.zeros(len(pairs), bool)
            if prev_last[0] >= 0:
                same = pairs[:, 1] == prev_last[0]
                dup[same] = np.isin(pairs[same, 0], list(prev_last[1]))
            fresh = pairs[~dup]
            prot_count += np.bincount(fresh[:, 0], minlength=nk)
            fpos = omap.positions(fresh[:, 1])
            concepts_per_protein += np.bincount(fpos[fpos >= 0], minlength=n_prot)[:n_prot]
            last = int(pidx[-1])
            prev_last = (last, set(int(x) for x in pairs[pairs[:, 1] == last, 0]))
        # Top proteins per key: best segment per (key, protein), then the top_n per key.
        order = np.lexsort((-mx[bound], pidx[bound], k))
        kk, pp, mm = k[order], pidx[bound][order], mx[bound][order]
        first = np.ones(kk.size, bool)
        first[1:] = (kk[1:] != kk[:-1]) | (pp[1:] != pp[:-1])
        kk, pp, mm = kk[first], pp[first], mm[first]
        for key_i in np.unique(kk):
            sel = kk == key_i
            cand = np.argsort(-mm[sel], kind="stable")[:top_n]
            best = top[int(key_i)]
            for p_, m_ in zip(pp[sel][cand], mm[sel][cand], strict=True):
                best[int(p_)] = max(best.get(int(p_), 0.0), float(m_))
            if len(best) > 4 * top_n:
                keep = sorted(best.items(), key=lambda t: (-t[1], t[0]))[:top_n]
                top[int(key_i)] = dict(keep)
    for i, st in enumerate(stats):
        st.segments, st.residues, st.proteins = int(seg_count[i]), int(res_count[i]), int(prot_count[i])
        st.max_act = float(max_act[i])
        st.top = [(m, p) for p, m in sorted(top[i].items(), key=lambda t: (-t[1], t[0]))[:top_n]]
    ranked = sorted(stats, key=lambda s: (-s.segments, -s.residues, s.latent, s.threshold))
    for r, st in enumerate(ranked):
        st.rank = r
    return ranked, seg_per_protein, concepts_per_protein


@dataclass
class LatentScan:
    """Per-latent activation counts/maxima over the scanned prefix of /codes, and histograms for a few."""

    counts: np.ndarray
    maxes: np.ndarray
    rows_scanned: int
    rows_total: int
    entries_scanned: int
    hists: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.rows_scanned >= self.rows_total


def scan_latents(ann: H5Annotations, max_entries: int, chunk: int = LATENT_CHUNK) -> LatentScan:
    """How often and how strongly each latent fired, over whole residues up to ``max_entries`` code entries."""
    d = ann.d_sae
    indptr = ann.f["codes/indptr"]
    n_rows = int(indptr.shape[0]) - 1
    nnz = ann.nnz
    if nnz <= max_entries:
        rows, stop = n_rows, nnz
    else:
        ip = indptr[()]
        rows = max(0, int(np.searchsorted(ip, max_entries, "right")) - 1)
        stop = int(ip[rows])
    counts = np.zeros(d, np.int64)
    maxes = np.zeros(d, np.float32)
    data, indices = ann.f["codes/data"], ann.f["codes/indices"]
    for a in range(0, stop, chunk):
        b = min(stop, a + chunk)
        idx = indices[a:b].astype(np.int64)
        val = data[a:b].astype(np.float32)
        counts += np.bincount(idx, minlength=d)[:d]
        np.maximum.at(maxes, idx, val)
    return LatentScan(counts=counts, maxes=maxes, rows_scanned=rows, rows_total=n_rows, entries_scanned=stop)


def latent_histograms(ann: H5Annotations, scan: LatentScan, latents: Sequence[int], bins: int = 30,
                      chunk: int = LATENT_CHUNK) -> None:
    """Second pass over the same prefix: histograms of nonzero activations, bins spanning 0..latent max."""
    if not latents:
        return
    lat = np.array(sorted(set(int(x) for x in latents)), dtype=np.int64)
    hists = {int(l): np.zeros(bins, np.int64) for l in lat}
    edges = {int(l): np.linspace(0.0, float(scan.maxes[l]) or 1.0, bins + 1) for l in lat}
    data, indices = ann.f["codes/data"], ann.f["codes/indices"]
    for a in range(0, scan.entries_scanned, chunk):
        b = min(scan.entries_scanned, a + chunk)
        idx = indices[a:b].astype(np.int64)
        keep = np.isin(idx, lat)
        if not keep.any():
            continue
        idx, val = idx[keep], data[a:b][keep].astype(np.float32)
        for l in np.unique(idx):
            h, _ = np.histogram(val[idx == l], bins=edges[int(l)])
            hists[int(l)] += h
    scan.hists = {l: (hists[l], edges[l]) for l in hists}


# ---------------------------------------------------------------------------------------------------------
# Per-protein views
# ---------------------------------------------------------------------------------------------------------

@dataclass
class ProteinView:
    info: ProteinInfo
    sequence: str
    lanes: list[Lane]
    heat: Heatmap | None
    segments: list[tuple[str, str, int, int, float, float]]  # colour, label, start, end, max, mean
    n_concepts: int
    active_latents: int
    mean_active: float
    lanes_note: str = ""
    slug: str = ""
    refs: list[RefTrack] = field(default_factory=list)          # reference tracks (report --annotations)
    ref_notes: list[str] = field(default_factory=list)          # what a label source says that is not a track
    lane_ids: list[str] = field(default_factory=list)           # concept ids of the lanes, in lane order


def _latent_names(stats: Sequence[ConceptStats]) -> dict[int, str]:
    out: dict[int, list[str]] = {}
    for st in stats:
        for e in st.entries:
            out.setdefault(e.latent, [])
            name = e.name or e.concept_id
            if name and name not in out[e.latent]:
                out[e.latent].append(name)
    return {k: " / ".join(v) for k, v in out.items()}


def build_view(ann: H5Annotations, pos: int, stats_by_key: dict[tuple[int, float], ConceptStats],
               latent_names: dict[int, str], scan: LatentScan | None, top_latents: int, max_lanes: int,
               heat_names: dict[int, tuple[str, str]] | None = None, call_withheld: bool = False) -> ProteinView:
    """Everything the figures need for one protein: lanes per called concept and the top-latent heatmap.

    Each lane carries its concept's reliability (a line under its name, every field in its tooltip); heatmap
    rows are named from ``heat_names`` (best concept and F1, report_trust.heatmap_names) when given, else
    from ``latent_names``."""
    info = ann.protein(pos)
    seq = ann.residues(pos)
    if info.n_rows == 0:
        return ProteinView(info, seq, [], None, [], 0, 0, 0.0)
    codes = ann.codes(pos)
    segs = ann.segments(pos)
    by_key: dict[tuple[int, float], list] = {}
    for s in segs:
        by_key.setdefault((s.latent, float(np.float32(s.threshold))), []).append(s)
    lane_keys = sorted(by_key, key=lambda k: (-max(s.max_act for s in by_key[k]), k))
    note = ""
    if len(lane_keys) > max_lanes:
        note = f"+{len(lane_keys) - max_lanes} more concepts (see segment table)"
    lanes: list[Lane] = []
    seg_rows: list[tuple[str, str, int, int, float, float]] = []
    cols = sorted({k[0] for k in lane_keys[:max_lanes]})
    dense = codes[:, cols].toarray() if cols else np.zeros((codes.shape[0], 0), np.float32)
    col_of = {c: i for i, c in enumerate(cols)}
    for key in lane_keys:
        st = stats_by_key.get(key)
        label = st.short if st else f"latent {key[0]}"
        title = (f"{st.label}\nlatent {key[0]} \u00b7 threshold {fmt(key[1])}" if st else
                 f"latent {key[0]} (no concept entry) \u00b7 threshold {fmt(key[1])}")
        best = best_row(st.entries) if st else None
        rel_note, warn = "", False
        if best is not None and st is not None:  # best is found only when st is
            rel_note = short_reliability(best)
            warn = not measured(best) or floor_reason(best) is not None
            for e in st.entries:  # the header already gives the threshold: from the fields, the rest
                head = f"\n{e.name or e.concept_id} ({e.concept_id}): " if len(st.entries) > 1 else "\n"
                title += head + "\n".join(reliability_lines(e, call_withheld, threshold=False))
        color = st.color if st else "#777777"
        for s in by_key[key]:
            seg_rows.append((color, label, s.start, s.end, s.max_act, s.mean_act))
        if len(lanes) >= max_lanes:
            continue
        prof = dense[:, col_of[key[0]]]
        vmax = float(scan.maxes[key[0]]) if scan is not None and scan.maxes[key[0]] > 0 else float(prof.max())
        vmax = max(vmax, float(prof.max()))
        lanes.append(Lane(label=label, title=title, color=color, profile=prof, vmax=vmax, threshold=key[1],
                          segments=[(s.start, s.end, s.max_act, s.mean_act) for s in by_key[key]],
                          note=rel_note, note_warn=warn))
    seg_rows.sort(key=lambda r: (r[2], r[3], r[1]))

    heat = None
    colmax = np.asarray(codes.max(axis=0).toarray()).ravel() if codes.nnz else np.zeros(codes.shape[1])
    active = np.flatnonzero(colmax > 0)
    if active.size:
        colsum = np.asarray(codes.sum(axis=0)).ravel()
        order = sorted(active.tolist(), key=lambda l: (-colmax[l], -colsum[l], l))[:top_latents]
        values = codes[:, order].toarray().T
        nres = np.asarray((codes[:, order] > 0).sum(axis=0)).ravel()
        labels, titles = [], []
        for j, l in enumerate(order):
            if heat_names is not None:
                nm, concepts_tip = heat_names.get(l, ("", ""))
            else:
                nm, concepts_tip = latent_names.get(l, ""), ""
            labels.append(f"L{l}" + (f" \u00b7 {nm}" if nm else ""))
            titles.append(f"latent {l}" + (f" ({concepts_tip or nm})" if nm else "") +
                          f"\nmax {fmt(float(colmax[l]))} on this protein \u00b7 active on {int(nres[j])} residues")
        heat = Heatmap(values=values, labels=labels, titles=titles, vmax=float(values.max()))
    lane_ids = list(dict.fromkeys(e.concept_id for k in lane_keys if k in stats_by_key
                                  for e in stats_by_key[k].entries))
    return ProteinView(info=info, sequence=seq, lanes=lanes, heat=heat, segments=seg_rows,
                       n_concepts=len(lane_keys), active_latents=int(active.size),
                       mean_active=codes.nnz / max(1, codes.shape[0]), lanes_note=note, lane_ids=lane_ids)


def attach_references(ann: H5Annotations, v: ProteinView, sources: Sequence[ReferenceSource],
                      stats_by_key: dict[tuple[int, float], ConceptStats], table_ids: Sequence[str]) -> None:
    """Reference tracks of every label source that labels this protein, under its predicted lanes.

    A track of a concept the run called has that concept's colour and, in its tooltip, how the calls on this
    protein overlap the labels (residues called / labelled / both), which is the per-protein check a reader
    wants before trusting a lane; other labelled concepts are drawn in grey."""
    info = v.info
    if not sources or info.n_rows == 0:
        return
    order = list(v.lane_ids) + [c for c in table_ids if c not in v.lane_ids]
    color_of = {e.concept_id: st.color for st in stats_by_key.values() for e in st.entries}
    called: dict[str, np.ndarray] = {}
    for s in ann.segments(info.position):
        st = stats_by_key.get((s.latent, float(np.float32(s.threshold))))
        for e in (st.entries if st else []):
            mask = called.setdefault(e.concept_id, np.zeros(info.length, bool))
            mask[s.start - 1:s.end] = True
    for src in sources:
        ref = src.for_protein(info.id, info.length, order)
        if ref is None:
            continue
        if ref.problem:
            v.ref_notes.append(ref.problem)
            continue
        if src.kind == "protein":
            terms = ", ".join(f"{t} {n}".strip() for t, n in ref.terms) or "none"
            v.ref_notes.append(f"Reference terms from {src.name} ({src.fmt}, protein level): {terms}")
            continue
        if not ref.tracks:
            v.ref_notes.append(f"{src.name} ({src.fmt}) annotates this protein with no labelled residue")
            continue
        for cid, name, runs, implied in ref.tracks:
            lab = np.zeros(info.length, bool)
            for a, b in runs:
                lab[a - 1:b] = True
            n = int(lab.sum())
            title = (f"{name} ({cid})\nreference labels from {src.name} ({src.fmt}): {n:,} residues in "
                     f"{len(runs):,} run{'s' if len(runs) != 1 else ''}")
            if implied:
                title += "\nimplied by the file's more specific labels (ontology is_a)"
            if cid in called:
                c, both = int(called[cid].sum()), int((called[cid] & lab).sum())
                title += (f"\ncalled on this protein: {c:,} residues; {both:,} of the {n:,} labelled residues "
                          f"called, {both:,} of the {c:,} called residues labelled")
            elif cid in color_of:
                title += "\nnot called on this protein"
            v.refs.append(RefTrack(label=name + (" (implied)" if implied else ""), title=title,
                                   color=color_of.get(cid, REF_COLOR), source=src.name, spans=runs,
                                   masked=ref.masked))


# ---------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------

def select_positions(ann: H5Annotations, proteins: Sequence[str] | None, max_proteins: int) -> list[int]:
    """Positions to draw: every match of the requested ids (in file order), or the first ``max_proteins``."""
    if proteins:
        import difflib

        wanted: list[str] = []
        for value in proteins:  # "a,b" lists ids, unless the whole value is itself an id
            wanted.extend([value] if ann.find(value) else [v.strip() for v in value.split(",") if v.strip()])
        chosen: list[int] = []
        missing = []
        for pid in wanted:
            hits = ann.find(pid)
            if not hits:
                missing.append(pid)
            chosen.extend(hits)
        if missing:
            ids = [str(x) for x in ann.proteins["id"][:200000]]
            hints = []
            for m in missing:
                close = difflib.get_close_matches(m, ids, n=3, cutoff=0.6)
                hints.append(f"{m!r}" + (f" (close: {', '.join(repr(c) for c in close)})" if close else ""))
            raise InputError(f"{ann.path}: protein id(s) not in this file: {'; '.join(hints)}")
        return sorted(dict.fromkeys(chosen))
    return list(range(min(max(0, max_proteins), ann.n_proteins)))


def slugify(text: str, limit: int = 40) -> str:
    """A file-name-safe fragment of an id (ids are data, never paths: '/' and '..' must not survive)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    return (s[:limit].rstrip("._-") or "protein")


# ---------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------

_CSS = """
:root{--ink:#1d2433;--muted:#6b7280;--line:#e5e7eb;--soft:#f6f7f9;--accent:#2457a6;--card:#fff}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 color:var(--ink);background:#eef1f5}
header{background:#1d2b45;color:#fff;padding:18px 28px 14px}
header h1{margin:0 0 2px;font-size:21px;font-weight:600;letter-spacing:.2px}
header .sub{color:#c8d3e6;font-size:13px;word-break:break-all}
nav{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid var(--line);padding:8px 28px;
 display:flex;gap:18px;font-size:13px}
nav a{color:var(--accent);text-decoration:none;font-weight:500}
main{max-width:1240px;margin:0 auto;padding:18px 20px 60px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 20px;margin:0 0 18px;
 box-shadow:0 1px 2px rgba(0,0,0,.04)}
h2{font-size:17px;margin:0 0 10px;font-weight:600}
h3{font-size:15px;margin:0;font-weight:600;word-break:break-all}
.muted{color:var(--muted)}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(180px,1fr));gap:12px;margin-bottom:12px}
.card{background:var(--soft);border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.card .k{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.4px}
.card .v{font-size:22px;font-weight:600;margin-top:2px;word-break:break-word}
.card .v.t{font-size:14px;line-height:1.3;padding-top:5px;overflow-wrap:anywhere}
.card .d{font-size:12px;color:var(--muted);margin-top:2px;word-break:break-word}
.chips{display:flex;flex-wrap:wrap;gap:6px;margin-top:6px}
.badge{display:inline-block;border-radius:10px;padding:1px 8px;font-size:12px;font-weight:500;
 border:1px solid transparent;white-space:nowrap}
.st-ok{background:#e6f4ea;color:#1e6b35}.st-windowed{background:#e7effc;color:#23508f}
.st-truncated{background:#fff4de;color:#8a5a00}.st-failed_oom{background:#fde8e8;color:#9b1c1c}
.st-invalid{background:#eceff3;color:#4b5563}
.plain{background:var(--soft);color:var(--ink);border-color:var(--line)}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{background:var(--soft);font-weight:600;position:sticky;top:0;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.kv td:first-child{color:var(--muted);white-space:nowrap;width:210px}
.kv td{word-break:break-all}
.bar{height:8px;border-radius:4px;display:inline-block;vertical-align:middle;margin-right:6px;opacity:.85}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.tops{font-size:12px;max-width:300px}
.id{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;overflow-wrap:anywhere}
.code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;white-space:nowrap}
.nw{white-space:nowrap}
details>summary{cursor:pointer;color:var(--accent);margin:6px 0}
.protein{border-top:1px solid var(--line);padding:14px 0 6px}
.protein:first-of-type{border-top:none}
.phead{display:flex;flex-wrap:wrap;align-items:baseline;gap:8px 12px;margin-bottom:4px}
.desc{color:var(--muted);font-size:13px;margin-bottom:8px;word-break:break-word}
.fig{border:1px solid var(--line);border-radius:6px;background:#fff;overflow:hidden}
.fig svg{display:block;max-width:100%;height:auto}
.lblbg{fill:#fbfbfc}
.xh{stroke:#1d2433;stroke-width:1;stroke-opacity:.35;pointer-events:none}
#hovertip{position:fixed;z-index:10;pointer-events:none;background:#1d2433;color:#fff;font:12px ui-monospace,Menlo,Consolas,monospace;padding:2px 6px;border-radius:4px;display:none}
.fig text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif}
.tick{font-size:10px;fill:#6b7280}.axis{font-size:11px;fill:#6b7280;font-style:italic}
.lane{font-size:12px;fill:#1d2433}.hrow{font-size:10px;fill:#374151}
.lnote{font-size:9.5px;fill:#4b5563}.lnote.warn{fill:#9b1c1c}.rlane{font-size:11px;fill:#374151;font-style:italic}
.rb{fill-opacity:.85}.warnb{background:#fde8e8;color:#9b1c1c}td.rel{font-size:12px}
.rule{stroke:#9ca3af;stroke-width:1}.frame{stroke:#d1d5db}
.band{fill:#ffffff}.band2{fill:#f8f9fb}
.thr{stroke:#c4c9d1;stroke-dasharray:3 3;stroke-width:.8}
.sb{fill-opacity:.14;stroke-width:1}.sf{stroke:none}
.seg:hover .sb{fill-opacity:.32}
.pix{image-rendering:pixelated;image-rendering:crisp-edges}
.aa{font:600 10px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;text-anchor:middle}
.aa-acid{fill:#c0392b}.aa-base{fill:#2457a6}.aa-polar{fill:#1e8449}.aa-hyd{fill:#374151}
.aa-special{fill:#b9770e}.aa-other{fill:#8e44ad}
.legend{display:flex;flex-wrap:wrap;gap:14px;align-items:center;font-size:12px;color:var(--muted);margin:8px 0 2px}
.hists{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:10px}
.hist{margin:0;background:var(--soft);border:1px solid var(--line);border-radius:8px;padding:8px}
.hist figcaption{font-size:12px;margin-bottom:4px;word-break:break-word}
.controls{display:flex;flex-wrap:wrap;gap:10px;align-items:center;margin-bottom:8px}
.controls input,.controls select{font:inherit;padding:4px 8px;border:1px solid #cbd2dc;border-radius:6px}
.controls input{width:320px}
.pager button{font:inherit;padding:2px 10px;border:1px solid #cbd2dc;background:#fff;border-radius:6px;cursor:pointer}
.pager button:disabled{opacity:.4;cursor:default}
th.sort{cursor:pointer;user-select:none}th.sort:after{content:" \\2195";color:#b0b7c3}
.jump{display:flex;flex-wrap:wrap;gap:6px;margin:4px 0 10px}
.jump a{font-size:12px;text-decoration:none;color:var(--accent);background:var(--soft);border:1px solid var(--line);
 border-radius:10px;padding:1px 8px;max-width:240px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.note{background:#fff8e6;border:1px solid #f2dfae;border-radius:6px;padding:6px 10px;font-size:13px;margin:8px 0}
footer{color:var(--muted);font-size:12px;text-align:center;margin:20px 0}
"""

_JS = """
(function(){
  var data = JSON.parse(document.getElementById('protein-data').textContent);
  var cols = ['pos','index','id','description','length','status','segments','concepts','detail','card'];
  var rows = data.rows.map(function(r){var o={};cols.forEach(function(c,i){o[c]=r[i];});return o;});
  var q = document.getElementById('pq'), st = document.getElementById('pstatus');
  var body = document.getElementById('ptbody'), info = document.getElementById('pinfo');
  var prev = document.getElementById('pprev'), next = document.getElementById('pnext');
  var page = 0, per = 100, key = 'pos', dir = 1, shown = rows;
  function cell(tr, text, cls){var td=document.createElement('td');td.textContent=text;if(cls)td.className=cls;tr.appendChild(td);return td;}
  function render(){
    var needle = q.value.trim().toLowerCase(), want = st.value;
    shown = rows.filter(function(r){
      if (want && r.status !== want) return false;
      if (!needle) return true;
      return (r.id + ' ' + r.description).toLowerCase().indexOf(needle) >= 0;
    });
    shown.sort(function(a,b){var x=a[key],y=b[key];if(x<y)return -dir;if(x>y)return dir;return a.pos-b.pos;});
    var pages = Math.max(1, Math.ceil(shown.length/per)); if (page >= pages) page = pages-1;
    body.textContent = '';
    shown.slice(page*per, page*per+per).forEach(function(r){
      var tr = document.createElement('tr');
      cell(tr, r.index, 'num');
      var td = cell(tr, '', 'id');
      if (r.card) {var a=document.createElement('a');a.href='#p'+r.pos;a.textContent=r.id;td.appendChild(a);} else td.textContent=r.id;
      cell(tr, r.description);
      cell(tr, r.length, 'num');
      var s = cell(tr, ''); var b=document.createElement('span'); b.className='badge st-'+r.status; b.textContent=r.status; s.appendChild(b);
      cell(tr, r.segments, 'num'); cell(tr, r.concepts, 'num'); cell(tr, r.detail, 'muted');
      body.appendChild(tr);
    });
    info.textContent = shown.length + ' of ' + rows.length + ' proteins' + (data.truncated ? ' (table limited to the first ' + rows.length + ' of ' + data.total + ')' : '') +
      ' \\u00b7 page ' + (page+1) + ' of ' + pages;
    prev.disabled = page === 0; next.disabled = page >= pages-1;
  }
  q.addEventListener('input', function(){page=0;render();});
  st.addEventListener('change', function(){page=0;render();});
  prev.addEventListener('click', function(){page--;render();});
  next.addEventListener('click', function(){page++;render();});
  Array.prototype.forEach.call(document.querySelectorAll('#ptable th[data-k]'), function(th){
    th.addEventListener('click', function(){var k=th.getAttribute('data-k'); if (key===k) dir=-dir; else {key=k;dir=(k==='segments'||k==='concepts'||k==='length')?-1:1;} render();});
  });
  render();
})();
(function(){
  var tip = document.createElement('div'); tip.id = 'hovertip'; document.body.appendChild(tip);
  Array.prototype.forEach.call(document.querySelectorAll('svg.trk'), function(svg){
    var seq = svg.getAttribute('data-seq') || '', len = +svg.getAttribute('data-len') || 1;
    var x0 = +svg.getAttribute('data-x0'), w = +svg.getAttribute('data-w');
    var line = svg.querySelector('line.xh');
    svg.addEventListener('mousemove', function(ev){
      var r = svg.getBoundingClientRect();
      var vx = (ev.clientX - r.left) * (+svg.getAttribute('width')) / r.width - x0;
      var i = Math.floor(vx / w * len);
      if (vx < 0 || i < 0 || i >= len) { tip.style.display = 'none'; line.setAttribute('x1', -10); line.setAttribute('x2', -10); return; }
      var x = (i + 0.5) * w / len; line.setAttribute('x1', x); line.setAttribute('x2', x);
      tip.textContent = (i < seq.length ? seq.charAt(i) : '\u2013') + (i + 1) + (i < seq.length ? '' : ' (not encoded)');
      tip.style.left = (ev.clientX + 12) + 'px'; tip.style.top = (ev.clientY - 26) + 'px'; tip.style.display = 'block';
    });
    svg.addEventListener('mouseleave', function(){ tip.style.display = 'none'; line.setAttribute('x1', -10); line.setAttribute('x2', -10); });
  });
})();
"""


def _json_for_script(obj: Any) -> str:
    """JSON that cannot end its <script> element early (``</script>`` in an id) or be read as markup."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return (s.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _badge(status: str) -> str:
    return f'<span class="badge st-{esc(status)}">{esc(status)}</span>'


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


@dataclass
class ReportSummary:
    output: Path
    proteins_total: int
    proteins_drawn: int
    pngs: list[Path] = field(default_factory=list)
    sampled: bool = False


@dataclass
class _Run:
    ann: H5Annotations
    attrs: dict[str, Any]
    concepts: list[ConceptRow]
    stats: list[ConceptStats]
    seg_per_protein: np.ndarray
    concepts_per_protein: np.ndarray
    scan: LatentScan
    hist_latents: list[int]
    latent_names: dict[int, str]


def _summary_section(run: _Run, h5_name: str) -> str:
    ann, a = run.ann, run.attrs
    status = ann.proteins["status"]
    names = ann.status_names
    counts = ({names[c]: int(n) for c, n in zip(*np.unique(status, return_counts=True), strict=True)}
              if status.size else {})
    lengths = ann.proteins["length"].astype(np.int64)
    encoded = ann.n_rows
    fired = sum(1 for s in run.stats if s.segments > 0)
    chips = "".join(f'<span class="badge st-{esc(s)}">{esc(s)} {counts.get(s, 0):,}</span>'
                    for s in STATUS_ORDER if counts.get(s, 0) or s == "ok")
    chips += "".join(f'<span class="badge plain">{esc(s)} {n:,}</span>' for s, n in counts.items()
                     if s not in STATUS_ORDER)
    hook = f"{a.get('hook_point', '?')}@{a.get('layer', '?')}"
    cards = [
        ("Proteins", f"{ann.n_proteins:,}", f'<div class="chips">{chips}</div>'),
        ("Residues encoded", f"{encoded:,}", f"of {int(lengths.sum()):,} in the input; "
                                             f"median length {int(np.median(lengths)) if lengths.size else 0:,}"),
        ("Concept segments", f"{ann.n_segments:,}", f"{fired:,} of {len(run.stats):,} bound concepts called"),
        ("SAE latents", f"{ann.d_sae:,}", f"k = {ann.k}; {ann.nnz / max(1, encoded):.1f} active per residue "
                                          f"on average"),
        ("Model", esc(a.get("plm_model", "?")), f"hook {esc(hook)} \u00b7 SAE {esc(a.get('sae_id', '?'))}"),
    ]
    html = ['<section id="summary"><h2>Run summary</h2><div class="cards">']
    for k, v, d in cards:
        small = " t" if len(v) > 12 else ""  # model names are long; numbers are short
        html.append(f'<div class="card"><div class="k">{k}</div><div class="v{small}">{v}</div>'
                    f'<div class="d">{d}</div></div>')
    html.append("</div>")
    preferred = ["command", "protsae_version", "plm_model", "plm_sha256", "hook_point", "layer", "layer_semantics",
                 "sae_id", "sae_sha256", "sae_arch", "d_model", "d_sae", "k", "dtype", "device_type", "backend",
                 "long_policy", "max_window", "window_overlap", "min_segment_len", "merge_gap", "shard",
                 "coordinate_system", "format", "format_version"]
    keys = [k for k in preferred if k in a] + sorted(k for k in a if k not in preferred)
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(_attr_text(a[k]))}</td></tr>" for k in keys)
    html.append(f'<details><summary>Provenance ({len(keys)} attributes of {esc(h5_name)})</summary>'
                f'<table class="kv">{rows}</table></details></section>')
    return "".join(html)


def _attr_text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return "" if v is None else str(v)


def _concepts_section(run: _Run, drawn: set[int], top_concepts: int) -> str:
    stats = run.stats
    fired = [s for s in stats if s.segments > 0]
    out = ['<section id="concepts"><h2>Top concepts</h2>']
    if not stats:
        if withheld_list(run.attrs):
            out.append('<p class="muted">Every concept of this SAE was withheld, so no segments were called. '
                       'The latent histograms and per-protein heatmaps below still show what the SAE did.</p>'
                       f"{_withheld_note(run.attrs)}</section>")
            return "".join(out)
        out.append('<p class="muted">This SAE has no concepts bound to latents, so no segments were called. '
                   'The latent histograms and per-protein heatmaps below still show what the SAE did.</p>'
                   "</section>")
        return "".join(out)
    if not fired:
        out.append('<p class="muted">None of the bound concepts was called on any protein.</p>')
    out.append('<p class="muted">Ranked by number of segments, then residues covered. Coordinates are 1-based; '
               '&ldquo;top proteins&rdquo; are those with the strongest segment.</p>')
    max_seg = max((s.segments for s in stats), default=1) or 1
    max_res = max((s.residues for s in stats), default=1) or 1
    omap = OrdinalMap(run.ann.proteins["index"])
    ids = run.ann.proteins["id"]
    withheld_on = call_withheld_on(run.attrs)

    def table(rows: Sequence[ConceptStats]) -> str:
        t = ['<table><thead><tr><th>concept</th><th>id</th><th>ontology</th><th class="num">latent</th>'
             '<th class="num">threshold</th><th>reliability (validation)</th><th>segments</th>'
             '<th>residues covered</th><th class="num">proteins</th>'
             '<th class="num">max act.</th><th>top proteins</th></tr></thead><tbody>']
        for s in rows:
            ids_cell = []
            for m, ordinal in s.top[:3]:
                p = int(omap.positions(np.array([ordinal]))[0])
                name = esc(ids[p]) if p >= 0 else esc(f"#{ordinal}")
                link = f'<a href="#p{p}">{name}</a>' if p in drawn else name
                ids_cell.append(f'<span class="nw"><span class="code">{link}</span> <span class="muted">{fmt(m)}'
                                f'</span></span>')
            cids = "<br>".join(esc(c) for c in dict.fromkeys(e.concept_id for e in s.entries))
            onts = "<br>".join(esc(o) for o in dict.fromkeys(e.ontology_id for e in s.entries if e.ontology_id))
            rel = "<br>".join(_reliability_cell(e, withheld_on) for e in s.entries)
            t.append(
                f'<tr><td><span class="swatch" style="background:{s.color}"></span>{esc(s.short)}</td>'
                f'<td class="code">{cids}</td><td class="code">{onts or "&ndash;"}</td>'
                f'<td class="num">{s.latent}</td><td class="num">{fmt(s.threshold)}</td><td class="rel">{rel}</td>'
                f'<td class="num" style="white-space:nowrap"><span class="bar" style="width:{60 * s.segments / max_seg:.0f}px;'
                f'background:{s.color}"></span>{s.segments:,}</td>'
                f'<td class="num" style="white-space:nowrap"><span class="bar" style="width:{60 * s.residues / max_res:.0f}px;'
                f'background:{s.color}"></span>{s.residues:,}</td>'
                f'<td class="num">{s.proteins:,}</td><td class="num">{fmt(s.max_act)}</td>'
                f'<td class="tops">{", ".join(ids_cell) or "&ndash;"}</td></tr>')
        t.append("</tbody></table>")
        return "".join(t)

    out.append(table(stats[:top_concepts]))
    if len(stats) > top_concepts:
        rest = stats[top_concepts:top_concepts + 5000]
        out.append(f"<details><summary>{len(stats) - top_concepts:,} more concepts</summary>{table(rest)}"
                   "</details>")
    out.append(_withheld_note(run.attrs))
    out.append("</section>")
    return "".join(out)


def _reliability_cell(e: ConceptRow, withheld_on: bool) -> str:
    """Precision/recall/F1/positives at the calling threshold, with the label source and call status on hover."""
    tip = esc("\n".join(reliability_lines(e, withheld_on)))
    if not measured(e):
        return f'<span class="muted" title="{tip}">not measured</span>'
    numbers = short_reliability(e).replace(" \u00b7 below floor", "")
    flag = ' <span class="badge warnb">below floor</span>' if floor_reason(e) else ""
    src = f'<br><span class="muted">labels: {esc(e.label_source)}</span>' if e.label_source else ""
    return (f'<span class="nw" title="{tip}">{esc(numbers)}</span> <span class="muted nw">{e.positives:,} pos.'
            f"</span>{flag}{src}")


def _withheld_note(attrs: dict[str, Any]) -> str:
    """The concepts annotate did not call (below the floors), from the run's ``concepts_withheld``."""
    items = withheld_list(attrs)
    policy = esc(attrs.get("calling_policy", "")) if attrs.get("calling_policy") else ""
    if not items:
        return (f'<p class="muted">No concept was withheld. Calling policy: {policy}</p>' if policy else
                '<p class="muted">This file records no calling policy (written before concepts could be '
                "withheld): every concept of the SAE was called.</p>")
    lis = "".join(f"<li>{esc(x)}</li>" for x in items)
    return (f'<div class="note withheld"><b>Withheld</b> (validated reliability below the calling floors, so not '
            f"called and not drawn; <code>protsae annotate --call-withheld</code> calls them): <ul>{lis}</ul>"
            f'<span class="muted">{policy}</span></div>')


def _latents_section(run: _Run) -> str:
    scan = run.scan
    out = ['<section id="latents"><h2>Latent activations</h2>']
    frac = scan.counts / max(1, scan.rows_scanned)
    sampled = ("" if scan.complete else
               f'<div class="note">Sampled: the first {scan.rows_scanned:,} of {scan.rows_total:,} residues '
               f"({scan.entries_scanned:,} code entries); raise --scan-entries to read more.</div>")
    out.append(f'<p class="muted">Distribution of nonzero activations per latent (log-scaled counts) for the '
               f"concept latents that were called most and the latents active on most residues. "
               f"{int((scan.counts > 0).sum()):,} of {len(scan.counts):,} latents fired at least once; "
               f"{int((scan.counts == 0).sum()):,} never did.</p>{sampled}")
    by_latent: dict[int, ConceptStats] = {}
    for s in run.stats:
        by_latent.setdefault(s.latent, s)
    figs = []
    for l in run.hist_latents:
        counts, edges = scan.hists.get(l, (np.zeros(1), np.array([0.0, 1.0])))
        st = by_latent.get(l)
        name = run.latent_names.get(l, "")
        title = f"latent {l}" + (f" \u00b7 {name}" if name else "")
        sub = f"active on {frac[l]:.2%} of residues \u00b7 max {fmt(float(scan.maxes[l]))}"
        figs.append(histogram_svg(counts, edges, st.color if st else "#6b7280", title, sub))
    out.append(f'<div class="hists">{"".join(figs)}</div>' if figs else
               '<p class="muted">No latent fired in the scanned residues.</p>')
    out.append("</section>")
    return "".join(out)


def _proteins_table(run: _Run, drawn: set[int], table_limit: int) -> str:
    ann = run.ann
    n = ann.n_proteins
    m = min(n, table_limit)
    p = ann.proteins
    names = ann.status_names
    rows = [[i, int(p["index"][i]), str(p["id"][i]), str(p["description"][i]), int(p["length"][i]),
             names[int(p["status"][i])], int(run.seg_per_protein[i]), int(run.concepts_per_protein[i]),
             str(p["status_detail"][i]), 1 if i in drawn else 0] for i in range(m)]
    payload = {"rows": rows, "total": n, "truncated": m < n}
    codes_present = sorted(set(np.unique(p["status"][:m]).tolist()))
    present = [names[c] for c in codes_present if 0 <= c < len(names)]
    opts = "".join(f'<option value="{esc(s)}">{esc(s)}</option>' for s in present)
    return (
        '<section id="proteins"><h2>All proteins</h2>'
        '<div class="controls"><input id="pq" type="search" placeholder="Search id or description\u2026" '
        'aria-label="search proteins"><select id="pstatus" aria-label="status filter"><option value="">any status'
        f'</option>{opts}</select><span class="pager"><button id="pprev" type="button">\u2039 prev</button> '
        '<button id="pnext" type="button">next \u203a</button></span><span id="pinfo" class="muted"></span></div>'
        '<div style="max-height:560px;overflow:auto;border:1px solid var(--line);border-radius:6px">'
        '<table id="ptable"><thead><tr><th class="num sort" data-k="index">#</th><th class="sort" data-k="id">id</th>'
        '<th class="sort" data-k="description">description</th><th class="num sort" data-k="length">length</th>'
        '<th class="sort" data-k="status">status</th><th class="num sort" data-k="segments">segments</th>'
        '<th class="num sort" data-k="concepts">concepts</th><th>note</th></tr></thead><tbody id="ptbody"></tbody>'
        '</table></div><noscript><p class="muted">The table needs JavaScript; the data is embedded in this file.'
        '</p></noscript>'
        f'<script type="application/json" id="protein-data">{_json_for_script(payload)}</script></section>'
    )


def _protein_card(v: ProteinView) -> str:
    info = v.info
    badges = [_badge(info.status), f'<span class="badge plain">{info.length:,} aa</span>',
              f'<span class="badge plain">input #{info.index}</span>']
    if info.n_rows:
        badges += [f'<span class="badge plain">{_plural(len(v.segments), "segment")}</span>',
                   f'<span class="badge plain">{_plural(v.n_concepts, "concept")}</span>',
                   f'<span class="badge plain">{v.active_latents:,} latents active; '
                   f"{v.mean_active:.1f} per residue</span>"]
    out = [f'<div class="protein" id="p{info.position}"><div class="phead"><h3 class="id">{esc(info.id)}</h3>'
           f'{"".join(badges)}</div>']
    if info.description:
        out.append(f'<div class="desc">{esc(info.description)}</div>')
    if info.n_rows == 0:
        detail = esc(info.status_detail) if info.status_detail else "no residues were encoded"
        out.append(f'<div class="note">Not annotated ({esc(info.status)}): {detail}</div></div>')
        return "".join(out)
    if info.status == "truncated":
        out.append(f'<div class="note">Truncated: only residues 1\u2013{info.n_rows:,} of {info.length:,} were '
                   "encoded (hatched area).</div>")
    out.append(protein_figure(v.sequence, info.length, v.lanes, v.heat, v.lanes_note, v.refs))
    for note in v.ref_notes:
        out.append(f'<div class="note refnote">{esc(note)}</div>')
    if v.heat is not None:
        out.append(f'<div class="legend"><span>Heatmap: 0</span><img alt="colour scale" '
                   f'src="{colorbar_uri()}" width="160" height="10">'
                   f"<span>{fmt(v.heat.vmax)} (this protein's maximum; white = inactive)</span></div>")
    if v.segments:
        rows = "".join(f'<tr><td><span class="swatch" style="background:{c}"></span>{esc(lab)}</td>'
                       f'<td class="num">{s}</td><td class="num">{e}</td><td class="num">{e - s + 1}</td>'
                       f'<td class="num">{fmt(mx)}</td><td class="num">{fmt(mn)}</td></tr>'
                       for c, lab, s, e, mx, mn in v.segments)
        out.append(f"<details><summary>{_plural(len(v.segments), 'segment')}</summary><table><thead><tr>"
                   "<th>concept</th>"
                   '<th class="num">start</th><th class="num">end</th><th class="num">length</th>'
                   f'<th class="num">max</th><th class="num">mean</th></tr></thead><tbody>{rows}</tbody></table>'
                   "</details>")
    out.append("</div>")
    return "".join(out)


def _details_section(views: Sequence[ProteinView], n_total: int, requested: bool,
                     references: Sequence[ReferenceSource] = ()) -> str:
    how = ("the proteins you asked for" if requested else
           f"the first {len(views):,} of {n_total:,} proteins (choose others with --proteins or --max-proteins)")
    refs = ""
    if references:
        items = []
        for src in references:
            drawn = sum(1 for v in views if v.info.id in src.label_id)
            left = f"; {len(src.unmatched):,} of its proteins are not in this file" if src.unmatched else ""
            hint = ""
            if drawn < src.matched:  # labelled proteins beyond the drawn ones: say how to draw them
                some = ",".join(list(src.label_id)[:3])
                hint = f" (draw others with <code>--proteins {esc(some)}</code>)"
            items.append(f"<li><b>{esc(src.name)}</b> ({esc(src.fmt)}): labels {src.matched:,} of the file's "
                         f"protein ids, {drawn:,} of them drawn here{hint}{left}</li>")
        refs = (f'<p class="muted"><b>Reference tracks</b> (solid bars under the predicted lanes, hatched where '
                "the source leaves residues unknown): labelled residues from the given label files, matched by "
                "protein id; a concept the run calls keeps its lane colour, and its tooltip compares the calls "
                f"with the labels on that protein.</p><ul class=\"refsrc\">{''.join(items)}</ul>")
    jump = "".join(f'<a href="#p{v.info.position}" title="{esc(v.info.id)}">{esc(v.info.id)}</a>' for v in views)
    cards = "".join(_protein_card(v) for v in views)
    return (f'<section id="details"><h2>Proteins in detail</h2><p class="muted">Concept tracks and latent heatmaps '
            f"for {how}. <b>Tracks</b>: one lane per concept called on the protein; the shaded profile is the "
            "concept latent's activation (scaled to its maximum over the run), boxes are the called segments, the "
            "dashed line is the calling threshold; under the name, the concept's validated precision (P), recall "
            "(R) and F1 at that threshold (docs/CALLS.md; red when below the calling floors or not measured). "
            "<b>Heatmap</b>: the protein's most active latents (rows) along the same residue axis, named by their "
            "best concept and its F1. Hover the figure for the residue under the pointer, a segment or a row label "
            f'for numbers.</p>{refs}<div class="jump">{jump}</div>'
            f'{cards or "<p class=muted>No proteins selected.</p>"}</section>')


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------

def write_report(h5: str | os.PathLike[str], output: str | os.PathLike[str], *, png_dir: str | os.PathLike[str] | None = None,
                 proteins: Sequence[str] | None = None, max_proteins: int = 50, top_latents: int = 24,
                 max_lanes: int = 25, top_concepts: int = 20, hist_latents: int = 12,
                 scan_entries: int = 20_000_000, table_limit: int = 200_000,
                 title: str | None = None, progress: bool = True,
                 annotations: Sequence[AnnotationSpec] = ()) -> ReportSummary:
    """Write the HTML report of ``h5`` to ``output`` (atomically) and, with ``png_dir``, matplotlib PNGs.

    ``progress``: per drawn protein and per PNG, a bar on a terminal or periodic log lines (protsae_cli.progress).
    ``annotations``: label sources (any format eval reads) drawn as reference tracks under the predicted lanes
    of the proteins they label, matched by id (report_trust.load_references).
    """
    from protsae_cli.progress import Progress
    from protsae_cli.io.atomic import TextOutput
    from protsae_cli.io.writers.h5 import H5Annotations

    if max_proteins < 0:
        raise InputError(f"--max-proteins must be >= 0, got {max_proteins}")
    h5 = Path(h5)
    with H5Annotations(h5) as ann:
        positions = select_positions(ann, proteins, max_proteins)
        concepts = read_concepts(ann)
        references = load_references(annotations, ann)
        omap = OrdinalMap(ann.proteins["index"])
        stats, seg_pp, con_pp = scan_segments(ann, concepts, omap)
        scan = scan_latents(ann, scan_entries)
        names = _latent_names(stats)
        chosen: list[int] = []
        for s in stats:
            if s.segments > 0 and s.latent not in chosen and len(chosen) < hist_latents // 2:
                chosen.append(s.latent)
        for l in np.argsort(-scan.counts, kind="stable"):
            if len(chosen) >= hist_latents or scan.counts[l] == 0:
                break
            if int(l) not in chosen:
                chosen.append(int(l))
        latent_histograms(ann, scan, chosen)
        run = _Run(ann, ann.attrs, concepts, stats, seg_pp, con_pp, scan, chosen, names)
        by_key = {(s.latent, s.threshold): s for s in stats}
        heat_names = heatmap_names(concepts)
        withheld_on = call_withheld_on(run.attrs)
        table_ids = list(dict.fromkeys(c.concept_id for c in concepts))
        views = []
        with Progress("drawing proteins", len(positions), unit="proteins", enabled=progress) as bar:
            for p in positions:
                v = build_view(ann, p, by_key, names, scan, top_latents, max_lanes, heat_names, withheld_on)
                attach_references(ann, v, references, by_key, table_ids)
                views.append(v)
                bar.advance()
        drawn = set(positions)
        for v in views:
            v.slug = f"{v.info.index:06d}_{slugify(v.info.id)}"

        page_title = title or f"protsae report \u2014 {h5.name}"
        body = [
            f"<header><h1>{esc(page_title)}</h1><div class=\"sub\">{esc(str(h5))} \u00b7 "
            f"{ann.n_proteins:,} proteins \u00b7 report by protsae {esc(__version__)}</div></header>",
            '<nav><a href="#summary">Summary</a><a href="#concepts">Top concepts</a>'
            '<a href="#latents">Latents</a><a href="#proteins">All proteins</a><a href="#details">Proteins in '
            "detail</a></nav><main>",
            _summary_section(run, h5.name),
            _concepts_section(run, drawn, top_concepts),
            _latents_section(run),
            _proteins_table(run, drawn, table_limit),
            _details_section(views, ann.n_proteins, bool(proteins), references),
            f"<footer>protsae {esc(__version__)} \u00b7 self-contained report: no network access needed"
            "</footer></main>",
        ]
        doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
               f'<meta name="viewport" content="width=device-width,initial-scale=1">'
               f"<title>{esc(page_title)}</title><style>{_CSS}</style></head><body>{''.join(body)}"
               f"<script>{_JS}</script></body></html>\n")

        summary = ReportSummary(output=Path(output), proteins_total=ann.n_proteins, proteins_drawn=len(views),
                                sampled=not scan.complete)
        if png_dir is not None:
            summary.pngs = _write_pngs(Path(png_dir), run, views, progress)

    out = TextOutput(output)
    try:
        out.write(doc)
    except BaseException:
        out.abort()
        raise
    out.close()
    return summary


def _write_pngs(png_dir: Path, run: _Run, views: Sequence[ProteinView], progress: bool = True) -> list[Path]:
    from protsae_cli.progress import Progress

    drawn = [v for v in views if v.info.n_rows]
    n = 2 + sum(1 + (v.heat is not None) for v in drawn)
    with Progress("writing PNGs", n, unit="PNGs", enabled=progress) as bar:
        return _draw_pngs(png_dir, run, drawn, bar)


def _draw_pngs(png_dir: Path, run: _Run, views: Sequence[ProteinView], bar: Any) -> list[Path]:
    from protsae_cli.report import plots

    png_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    top = [s for s in run.stats if s.segments > 0][:25]
    written.append(plots.concepts_png(png_dir / "top_concepts.png", [s.short for s in top],
                                      [s.segments for s in top], [s.residues for s in top],
                                      [s.color for s in top], "Top concepts"))
    bar.advance()
    by_latent = {s.latent: s for s in reversed(run.stats)}
    panels = []
    for l in run.hist_latents:
        counts, edges = run.scan.hists.get(l, (np.zeros(1), np.array([0.0, 1.0])))
        name = run.latent_names.get(l, "")
        panels.append((f"latent {l}" + (f" \u00b7 {name}" if name else ""), counts, edges,
                       by_latent[l].color if l in by_latent else "#6b7280"))
    if panels:
        written.append(plots.histograms_png(png_dir / "latent_histograms.png", panels,
                                            "Nonzero activations per latent"))
    bar.advance()
    for v in views:
        head = f"{v.info.id}  ({v.info.length} aa, {v.info.status})"
        written.append(plots.tracks_png(png_dir / f"{v.slug}.tracks.png", head, v.sequence, v.info.length,
                                        v.lanes, v.refs))
        bar.advance()
        if v.heat is not None:
            written.append(plots.heatmap_png(png_dir / f"{v.slug}.heatmap.png", head + " \u2014 most active latents",
                                             v.heat, v.info.length))
            bar.advance()
    return written
