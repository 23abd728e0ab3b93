"""`protsae calibrate`: measure what each concept call is worth on labelled proteins, and choose its threshold.

An SAE's concept table says, per concept, the calling threshold and the residue precision, recall and F1 of
"activation >= threshold" on validation proteins the SAE was not trained on (docs/CALLS.md). `protsae train`
writes it at the end of training; this module rewrites it from the user's own labelled proteins:

1. The labelled proteins are encoded exactly as `protsae annotate` encodes them (same windows, same encoder,
   `Annotator.iter_results`), so the numbers describe the calls annotate will make.
2. Per concept, every labelled residue where the concept's latent is active gives one (activation, label)
   pair; residues where it is not active count as positives missed (recall) and are never calls.
3. The threshold is chosen for an operating point (`--calling`): ``f1`` (default, the best F1), ``precision:P``
   (the lowest threshold whose precision is at least P, i.e. the most recall at that precision) or
   ``recall:R`` (the highest threshold that keeps recall at least R).
4. The score curve, a calibrated P(residue carries the concept | activation), is an isotonic (pool adjacent
   violators) fit of the labels on activation over at most `SCORE_KNOTS` equal-count activation bins; a
   segment's score is its value at the segment's maximum activation.

The fitting functions work on per-concept histograms (`ConceptCounts`), so training, which bins its validation
scores on a grid, and calibration, which keeps every activation, share one implementation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from protsae_cli.errors import InputError
from protsae_cli.evaluate.options import CalibrateOptions, SEGMENT_DECODER_MODES  # noqa: F401 (defaults live there)

log = logging.getLogger("protsae.calibrate")

#: Knots of a score curve: enough to separate weak from strong activations, few enough to read in a config.
SCORE_KNOTS = 20
#: A precision target is only "reached" by a call set of at least this many residues (one lucky call is 100 %).
MIN_CALLS = 10


# ========================================================================================== operating points
@dataclass(frozen=True)
class OperatingPoint:
    """How a threshold is chosen: ``f1`` | ``precision:P`` | ``recall:R`` (P, R in (0, 1])."""

    kind: str = "f1"
    target: float | None = None

    @classmethod
    def parse(cls, text: str) -> OperatingPoint:
        t = text.strip().lower()
        if t in ("f1", "best-f1", "max-f1"):
            return cls("f1")
        name, sep, value = t.partition(":")
        if sep and name in ("precision", "recall"):
            try:
                v = float(value)
            except ValueError:
                v = float("nan")
            if not 0 < v <= 1:
                raise InputError(f"--calling {text!r}: the {name} target must be a number in (0, 1], e.g. "
                                 f"{name}:0.9")
            return cls(name, v)
        raise InputError(f"--calling {text!r}: expected f1, precision:P or recall:R (e.g. precision:0.9)")

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}:{self.target:g}"


@dataclass
class ConceptCounts:
    """Labelled residues of one concept binned by activation: bin j holds activations in [lo[j], lo[j+1]).

    ``pos``/``neg`` count active residues (activation > 0) per bin; ``n_pos`` counts every labelled positive
    residue, active or not, and ``n_residues`` every labelled residue, so recall is over all positives.
    """

    lo: np.ndarray          # float64 [B], ascending
    pos: np.ndarray         # float64 [B]
    neg: np.ndarray         # float64 [B]
    n_pos: int
    n_residues: int

    @classmethod
    def from_values(cls, act: np.ndarray, label: np.ndarray, n_pos: int, n_residues: int) -> ConceptCounts:
        """Exact counts: one bin per distinct activation of the active labelled residues."""
        act = np.asarray(act, np.float32).astype(np.float64)
        label = np.asarray(label, bool)
        if act.shape != label.shape:
            raise ValueError(f"activations {act.shape} and labels {label.shape} differ in shape")
        if act.size and float(act.min()) <= 0:
            raise ValueError("only active residues (activation > 0) are binned")
        lo, inv = np.unique(act, return_inverse=True)
        pos = np.bincount(inv, weights=label.astype(np.float64), minlength=lo.size)
        neg = np.bincount(inv, weights=(~label).astype(np.float64), minlength=lo.size)
        return cls(lo, pos, neg, int(n_pos), int(n_residues))

    @property
    def n_active(self) -> int:
        return int(self.pos.sum() + self.neg.sum())

    def at(self, j: int) -> tuple[float, float]:
        """(true positives, calls) of "activation >= lo[j]"."""
        return float(self.pos[j:].sum()), float(self.pos[j:].sum() + self.neg[j:].sum())

    def metrics_at(self, threshold: float) -> dict[str, Any]:
        """Residue precision/recall/F1 of "activation >= threshold and > 0" (annotate's rule, float32 compare)."""
        t = np.float32(threshold)
        j = int(np.searchsorted(self.lo.astype(np.float32), t, side="left")) if t > 0 else 0
        tp, calls = self.at(j) if j < self.lo.size else (0.0, 0.0)
        return _metrics(tp, calls, self.n_pos)


def _metrics(tp: float, calls: float, n_pos: int) -> dict[str, Any]:
    precision = tp / calls if calls > 0 else None
    recall = tp / n_pos if n_pos > 0 else None
    f1 = 2 * tp / (calls + n_pos) if calls + n_pos > 0 else None
    return {"precision": precision, "recall": recall, "f1": f1, "calls": int(calls), "true_positives": int(tp)}


@dataclass
class Choice:
    """The threshold an operating point chose and the metrics at it."""

    threshold: float
    precision: float | None
    recall: float | None
    f1: float | None
    calls: int
    reached: bool
    note: str = ""


def _target(point: OperatingPoint) -> float:
    """The precision or recall target of `point`; `OperatingPoint.parse` always sets one for those kinds."""
    if point.target is None:
        raise ValueError(f"operating point {point.kind} needs a target in (0, 1], e.g. {point.kind}:0.9")
    return point.target


def choose_threshold(c: ConceptCounts, point: OperatingPoint) -> Choice | None:
    """The threshold for `point`, or None when the latent never fired on a labelled residue or there is no
    positive (nothing to measure). Candidate j calls bins j.. ; j = 0 is "any activation" (threshold 0)."""
    if c.lo.size == 0 or c.n_pos == 0:
        return None
    tp = np.cumsum(c.pos[::-1])[::-1]
    calls = np.cumsum((c.pos + c.neg)[::-1])[::-1]
    precision = tp / np.maximum(calls, 1)
    recall = tp / c.n_pos
    f1 = 2 * tp / (calls + c.n_pos)
    reached, note = True, ""
    if point.kind == "f1":
        j = int(np.argmax(f1))
    elif point.kind == "precision":
        target = _target(point)
        ok = np.flatnonzero((precision >= target) & (calls >= MIN_CALLS))
        if ok.size:
            j = int(ok[0])
        else:
            big = np.flatnonzero(calls >= MIN_CALLS)
            pool = big if big.size else np.arange(c.lo.size)
            j = int(pool[np.argmax(precision[pool])])
            reached = False
            note = (f"precision {target:g} not reached on >= {MIN_CALLS} calls; highest precision "
                    f"{precision[j]:.3g} chosen")
    elif point.kind == "recall":
        target = _target(point)
        ok = np.flatnonzero(recall >= target)
        if ok.size:
            j = int(ok[-1])
        else:
            j, reached = 0, False
            note = f"recall {target:g} not reached even at any activation ({recall[0]:.3g})"
    else:
        raise ValueError(f"unknown operating point {point}")
    m = _metrics(float(tp[j]), float(calls[j]), c.n_pos)
    return Choice(threshold=0.0 if j == 0 else float(np.float32(c.lo[j])), precision=m["precision"],
                  recall=m["recall"], f1=m["f1"], calls=m["calls"], reached=reached, note=note)


def pav(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted isotonic (non-decreasing) regression by pool adjacent violators."""
    vals: list[float] = []
    wts: list[float] = []
    sizes: list[int] = []
    for yi, wi in zip(np.asarray(y, np.float64), np.asarray(w, np.float64), strict=True):
        vals.append(float(yi)); wts.append(float(wi)); sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            wsum = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / wsum if wsum > 0 else min(vals[-2], vals[-1])
            vals[-2:] = [v]; wts[-2:] = [wsum]; sizes[-2:] = [sizes[-2] + sizes[-1]]
    return np.repeat(np.asarray(vals), sizes)


def score_curve(c: ConceptCounts, knots: int = SCORE_KNOTS) -> list[list[float]]:
    """Calibrated P(label | activation) as [[activation, probability], ...]: equal-count groups of adjacent
    bins, their positive rates made non-decreasing by PAV, runs of equal probability joined into one knot."""
    total = c.pos + c.neg
    n = float(total.sum())
    if n == 0:
        return []
    cum = np.cumsum(total)
    # Group g ends at the first bin where the running count reaches (g+1)/knots of all active residues.
    ends = np.unique(np.searchsorted(cum, n * np.arange(1, knots + 1) / knots - 1e-9))
    ends = ends[ends < c.lo.size]
    starts = np.concatenate([[0], ends[:-1] + 1])
    g_pos = np.array([c.pos[s:e + 1].sum() for s, e in zip(starts, ends, strict=True)])
    g_n = np.array([total[s:e + 1].sum() for s, e in zip(starts, ends, strict=True)])
    p = pav(g_pos / np.maximum(g_n, 1), g_n)
    out: list[list[float]] = []
    for s, prob in zip(starts, p, strict=True):
        prob = round(float(prob), 4)
        if out and out[-1][1] == prob:
            continue
        out.append([float(np.float32(c.lo[s])), prob])
    return out


def apply_choice(entry: Any, counts: ConceptCounts, point: OperatingPoint, label_source: str, validation: str,
                 keep_threshold: bool = False) -> dict[str, Any]:
    """Write threshold (unless `keep_threshold`), metrics, provenance and score curve into a ConceptEntry;
    return the record of what changed (before/after on these residues)."""
    before = counts.metrics_at(entry.threshold)
    rec: dict[str, Any] = {"concept": entry.concept_id, "name": entry.name, "latent": entry.latent,
                           "threshold_before": entry.threshold, "before": before, "positives": counts.n_pos,
                           "residues": counts.n_residues, "active_residues": counts.n_active}
    choice: Choice | None
    if keep_threshold:
        choice = Choice(entry.threshold, before["precision"], before["recall"], before["f1"], before["calls"], True,
                        "threshold kept")
    else:
        choice = choose_threshold(counts, point)
    if choice is None:
        rec["skipped"] = ("no labelled positive residue" if counts.n_pos == 0
                          else "the latent is never active on the labelled residues")
        entry.precision, entry.recall, entry.f1 = (0.0, 0.0, 0.0) if counts.n_pos else (None, None, None)
        entry.positives = counts.n_pos
        entry.label_source, entry.validation = label_source, validation
        entry.operating_point, entry.score_curve = str(point), []
        return rec
    entry.threshold = float(choice.threshold)
    entry.precision = _round(choice.precision)
    entry.recall = _round(choice.recall)
    entry.f1 = _round(choice.f1)
    entry.positives = int(counts.n_pos)
    entry.label_source = label_source
    entry.operating_point = "kept" if keep_threshold else str(point)
    entry.validation = validation
    entry.score_curve = score_curve(counts)
    rec.update(threshold=entry.threshold, operating_point=entry.operating_point, reached=choice.reached,
               after={"precision": choice.precision, "recall": choice.recall, "f1": choice.f1,
                      "calls": choice.calls}, score_knots=len(entry.score_curve))
    if choice.note:
        rec["note"] = choice.note
    return rec


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


# ===================================================================================================== driver


def _records(fasta: str) -> tuple[list[Any], dict[str, str]]:
    from protsae_cli.runtime import read_proteins

    records = read_proteins(fasta, skip_invalid=True, unique_ids=True).records  # labels are matched by id
    return records, {r.id: r.sequence for r in records}


def calibrate(opts: CalibrateOptions) -> dict[str, Any]:
    """Measure (and unless `measure_only`, rechoose) every concept's threshold on labelled proteins; write the
    recalibrated SAE to `opts.output`; return the report (also written to `opts.json_out`)."""
    from protsae_cli.annotate.pipeline import Annotator
    from protsae_cli.call.concepts import standardize
    from protsae_cli.labels.sources import load_label_sources

    point = OperatingPoint.parse(opts.calling)
    if not opts.measure_only:
        if not opts.output:
            raise InputError("calibrate needs -o DIR for the recalibrated SAE (or --measure-only)")
        out_dir = Path(opts.output)
        if out_dir.exists() and not out_dir.is_dir():
            raise InputError(f"-o {out_dir}: exists and is not a directory")
    if not opts.annotations:
        raise InputError("calibrate needs residue-level labels: -a FILE (TMbed, binding lists, Swiss-Prot ...)")
    records, seqs = _records(opts.fasta)
    sources = load_label_sources(opts.annotations, seqs, opts.ontologies, opts.propagate, against=opts.fasta)
    for s in sources:
        if s.kind != "residue":
            raise InputError(f"{s.name}: {s.fmt} labels are protein-level; concept thresholds need residue labels")
    from protsae_cli.call.segments import ROLE_CONCEPTS

    topo_src = topology_source(sources)
    mode = opts.segment_decoder
    if mode not in SEGMENT_DECODER_MODES:
        raise InputError(f"--segment-decoder must be one of {', '.join(SEGMENT_DECODER_MODES)}, got {mode!r}")
    if mode == "fit" and opts.measure_only:
        raise InputError("--measure-only writes no SAE, so it fits no decoder; drop --segment-decoder fit")
    if mode == "fit" and topo_src is None:
        raise InputError("--segment-decoder fit needs membrane-span labels (TMbed, or a residue file naming "
                         f"{ROLE_CONCEPTS['helix']} / {ROLE_CONCEPTS['strand']}); none of the -a sources has them")
    ann = Annotator(opts.model, opts.sae, opts.device, "auto", opts.check_plm, opts.threads)
    cfg = ann.sae.cfg
    entries = standardize(cfg.concepts)
    # Each concept is measured against the first source that labels it.
    bound: list[tuple[int, Any]] = []
    for i, e in enumerate(entries):
        srcs = [s for s in sources if e.concept_id in s.concepts]
        if len(srcs) > 1:
            log.warning("concept %s (%s) is labelled by %s; measured against %s", e.concept_id, e.name,
                        ", ".join(s.name for s in srcs), srcs[0].name)
        if srcs:
            bound.append((i, srcs[0]))
        else:
            log.warning("concept %s (%s): none of the labels names it; its table entry is kept as it was",
                        e.concept_id, e.name)
    if not bound:
        raise InputError("none of the SAE's concepts (" + ", ".join(e.concept_id for e in entries[:8])
                         + ") is labelled by the given annotations")
    counts, proteins, topology = collect_counts(ann, records, bound, entries, opts, topo_src)
    rows_out = []
    for i, src in bound:
        e = entries[i]
        validation = f"{Path(opts.fasta).name}: {proteins[i]} proteins, {counts[i].n_residues} labelled residues"
        rec = apply_choice(e, counts[i], point, src.name, validation, keep_threshold=opts.measure_only)
        rec["source"] = src.name
        rec["kind"] = e.kind
        rows_out.append(rec)
    report = {"format": "protsae-calibration", "format_version": 1, "command": opts.command, "sae": opts.sae,
              "fasta": opts.fasta, "operating_point": "kept" if opts.measure_only else str(point),
              "measure_only": opts.measure_only, "per_concept": rows_out}
    _log_table(rows_out, opts.measure_only)
    decoder = cfg.segment_decoder
    if topology:
        assert topo_src is not None
        decoder, report["segment_decoder"] = decoder_step(cfg.segment_decoder, entries, topology, topo_src.name,
                                                          opts, fit=mode != "keep" and not opts.measure_only)
    if not opts.measure_only:
        new_cfg = dataclasses.replace(cfg, concepts=entries, segment_decoder=decoder,
                                      training={**cfg.training, "calibration": {
                                          "command": opts.command, "fasta": opts.fasta,
                                          "labels": [s.name for s in sources], "operating_point": str(point),
                                          "method": "protsae calibrate: residue precision/recall/F1 of activation "
                                                    ">= threshold on these proteins (docs/CALLS.md)"}})
        assert opts.output is not None  # checked at the top: -o is required unless --measure-only
        write_sae_copy(ann.sae_path, new_cfg, opts.output)
        report["output"] = str(opts.output)
    if opts.json_out:
        _write_json(opts.json_out, report)
    return report


def topology_source(sources: Sequence[Any]) -> Any | None:
    """The first residue label source with membrane-span labels (what the topology decoder is fitted and
    measured on), or None."""
    from protsae_cli.call.segments import ROLE_CONCEPTS

    spans = {ROLE_CONCEPTS["helix"], ROLE_CONCEPTS["strand"]}
    return next((s for s in sources if s.kind == "residue" and spans & set(s.labels.concepts)), None)


@dataclass
class TopologyProtein:
    """One labelled protein's codes as annotate encodes them, and its residue classes (``segments.CLASSES``)."""

    id: str
    idx: np.ndarray
    val: np.ndarray
    classes: np.ndarray


def collect_counts(ann: Any, records: Sequence[Any], bound: Sequence[tuple[int, Any]], entries: Sequence[Any],
                   opts: CalibrateOptions, topology: Any | None = None
                   ) -> tuple[dict[int, ConceptCounts], dict[int, int], list[TopologyProtein]]:
    """Encode the labelled proteins as annotate does and bin, per bound concept (entry index -> its label
    source), the activations of its latent on labelled residues. Returns (counts, proteins measured) by entry
    index, and with a ``topology`` source the codes and residue classes of its proteins (for the decoder).
    Memory: one float32 + one bool per active labelled residue and concept; with ``topology``, 12 k bytes per
    residue of its proteins (the top-k codes)."""
    from protsae_cli.annotate.pipeline import AnnotateOptions
    from protsae_cli.call.segments import ROLE_CONCEPTS, classes_from_roles
    from protsae_cli.progress import Progress

    wanted = {pid for _, s in bound for pid in s.labels.protein_ids}
    if topology is not None:
        wanted |= set(topology.labels.protein_ids)
    topo: list[TopologyProtein] = []
    role_ids = list(ROLE_CONCEPTS.values())
    chosen = [r for r in records if r.id in wanted]
    act: dict[int, list[np.ndarray]] = {i: [] for i, _ in bound}
    lab: dict[int, list[np.ndarray]] = {i: [] for i, _ in bound}
    n_pos = {i: 0 for i, _ in bound}
    n_res = {i: 0 for i, _ in bound}
    proteins = {i: 0 for i, _ in bound}
    saved, ann.concepts = ann.concepts, []  # codes only: segments are not needed here
    aopts = AnnotateOptions(input=opts.fasta, output_prefix="-", formats=("tsv",), toks_per_batch=opts.toks_per_batch,
                            long_policy=opts.long_policy, progress=False, command=opts.command)
    by_source: dict[str, list[int]] = {}
    for i, s in bound:
        by_source.setdefault(s.name, []).append(i)
    src_of = {s.name: s for _, s in bound}

    def take(res: Any) -> None:
        """Bin one encoded protein's activations on its labelled residues (and keep its codes for topology)."""
        rows = res.idx.shape[0]
        if rows == 0:
            return
        if topology is not None and res.id in topology.labels.positions:
            full = len(res.sequence)
            y = topology.labels.dense(res.id, full, role_ids)[:rows]
            cls = classes_from_roles({r: y[:, j] for j, r in enumerate(ROLE_CONCEPTS)},
                                     topology.labels.mask(res.id, full)[:rows])
            topo.append(TopologyProtein(res.id, np.asarray(res.idx, np.int64), np.asarray(res.val, np.float32),
                                        cls))
        for name, idxs in by_source.items():
            src = src_of[name]
            if res.id not in src.labels.positions:  # not annotated by this source: unknown, not negative
                continue
            full = len(res.sequence)
            y = src.labels.dense(res.id, full, src.concepts)[:rows]
            keep = src.labels.mask(res.id, full)[:rows]
            for i in idxs:
                e = entries[i]
                col = src.concepts.index(e.concept_id)
                hit = res.idx == e.latent
                a = np.where(hit, res.val, 0.0).max(axis=1) if res.idx.size else np.zeros(rows, np.float32)
                yc = y[:, col].astype(bool)
                on = keep & (a > 0)
                act[i].append(a[on].astype(np.float32))
                lab[i].append(yc[on])
                n_pos[i] += int(yc[keep].sum())
                n_res[i] += int(keep.sum())
                proteins[i] += 1

    try:
        with Progress("calibrating: encoding", len(chosen), unit="proteins", enabled=opts.progress) as bar:
            for res in ann.iter_results(iter(chosen), aopts):
                bar(1, residues=len(res.sequence))
                take(res)
    finally:
        ann.concepts = saved
    counts = {i: ConceptCounts.from_values(np.concatenate(act[i]) if act[i] else np.zeros(0, np.float32),
                                           np.concatenate(lab[i]) if lab[i] else np.zeros(0, bool), n_pos[i],
                                           n_res[i]) for i, _ in bound}
    return counts, proteins, topo


def measure_topology(params: Mapping[str, Any] | None, entries: Sequence[Any],
                     proteins: Sequence[TopologyProtein]) -> dict[str, Any]:
    """TMbed-protocol numbers of the region calls annotate would make with this decoder and concept table
    (the concepts the default reliability floors call; ``params`` None: per-residue calls)."""
    from protsae_cli.call.concepts import CallPolicy, select_calls, standardize
    from protsae_cli.call.segments import RegionCaller, role_entries
    from protsae_cli.evaluate.topology import tmbed_protocol

    called = select_calls(standardize(list(entries)), CallPolicy()).called
    caller = RegionCaller(called, params, "viterbi" if params else "none")
    roles, _ = role_entries(called)
    by_latent = {int(e.latent): r for r, e in roles.items()}

    def calls(p: TopologyProtein) -> dict[str, list[tuple[int, int]]]:
        out: dict[str, list[tuple[int, int]]] = {}
        for seg in caller(p.idx, p.val):
            role = by_latent.get(int(seg.latent))
            if role is not None:
                out.setdefault(role, []).append((seg.start, seg.end))
        return out

    return tmbed_protocol((p.classes, calls(p)) for p in proteins) | {"proteins": len(proteins)}


def decoder_step(old: Mapping[str, Any] | None, entries: Sequence[Any], proteins: Sequence[TopologyProtein],
                 source: str, opts: CalibrateOptions, fit: bool) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Measure the SAE's decoder on the labelled proteins, and with ``fit`` refit it: fitted on the
    even-numbered proteins and scored on the odd-numbered ones beside the old decoder (a validation the user
    can read), then refitted on all of them. Returns (the decoder to store, the report block)."""
    from protsae_cli.call.segments import fit_decoder_from_codes

    block: dict[str, Any] = {"source": source, "protocol": "TMbed (docs/SEGMENTS.md): per-helix recall/precision "
                             "with both ends within 5 residues, Qok, false TM calls on globular proteins"}
    if not fit:
        return _kept(old, entries, proteins, block)
    gate = (old or {}).get("signal_gate")  # same weights (calibrate copies them), so the same latents
    even, odd = list(proteins[0::2]), list(proteins[1::2])
    try:
        half = fit_decoder_from_codes([(p.idx, p.val) for p in even], [p.classes for p in even], entries,
                                      fitted_on=f"{source}: {len(even)} even-numbered proteins", signal_gate=gate)
        new = fit_decoder_from_codes([(p.idx, p.val) for p in proteins], [p.classes for p in proteins], entries,
                                     fitted_on=f"{Path(opts.fasta).name} labelled by {source}: {len(proteins)} "
                                               f"proteins (protsae calibrate)", signal_gate=gate)
    except InputError as e:
        if opts.segment_decoder == "fit":
            raise
        log.warning("topology decoder kept as it was: %s", e)
        return _kept(old, entries, proteins, block)
    block["validation"] = {"rule": "fitted on the even-numbered labelled proteins, scored on the odd-numbered ones",
                           "new": measure_topology(half, entries, odd),
                           "old": measure_topology(old, entries, odd) if old else None}
    v = block["validation"]
    new["selection"] = {"rule": "protsae calibrate: the bundled SAE's chosen variant (extra latents, prior "
                                "weight, membrane gate) refitted on these proteins", "validation": v}
    log.info("topology decoder fitted; on the odd-numbered half (fitted on the even): per-helix recall %.3f, Qok "
             "%.3f, false TM calls on globular proteins %.3f%s", v["new"]["helix_recall_5"], v["new"]["qok"],
             v["new"]["globular_with_tm_call"],
             "" if not old else f"; the SAE's decoder on the same proteins: {v['old']['helix_recall_5']:.3f}, "
                                f"{v['old']['qok']:.3f}, {v['old']['globular_with_tm_call']:.3f}")
    if old and opts.segment_decoder == "auto" and decoder_rank(v["old"]) > decoder_rank(v["new"]):
        log.info("kept the SAE's decoder: it scores better on those proteins (--segment-decoder fit stores the "
                 "new one anyway)")
        block["action"] = "kept (scored better than the refit)"
        return dict(old), block
    if not gate:
        log.info("the fitted decoder has no signal gate (it needs transit-peptide negatives; docs/SEGMENTS.md)")
    block["action"] = "fitted"
    return new, block


def decoder_rank(m: Mapping[str, Any]) -> tuple[bool, float, float, float]:
    """How two decoders are compared on the same proteins, the rule used to choose the bundled SAE's variant
    (docs/SEGMENTS.md): at most 2 % false TM calls on globular proteins first, then Qok, then per-helix recall,
    then fewer false TM calls."""
    return (m["globular_with_tm_call"] <= 0.02, m["qok"], m["helix_recall_5"], -m["globular_with_tm_call"])


def _kept(old: Mapping[str, Any] | None, entries: Sequence[Any], proteins: Sequence[TopologyProtein],
          block: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The decoder as it was, measured on all the labelled proteins."""
    block["action"] = "kept"
    m = block["measured"] = measure_topology(old, entries, proteins)
    log.info("topology (%s) on %d labelled proteins: per-helix recall %.3f, precision %.3f, Qok %.3f, false TM "
             "calls on globular proteins %.3f", "decoder" if old else "per-residue calls", len(proteins),
             m["helix_recall_5"], m["helix_precision_5"], m["qok"], m["globular_with_tm_call"])
    return (dict(old) if old else None), block


def write_sae_copy(src_dir: str, cfg: Any, out: str | os.PathLike) -> Path:
    """`out`/config.json from `cfg` and the weights of `src_dir` byte for byte (same sha256: same model, new
    concept table); the config is written last, by rename, so a half-written directory has no config."""
    from protsae_cli.io.atomic import atomic_output, atomic_write_text
    from protsae_cli.models import default_sae_dir
    from protsae_cli.sae.config import CONFIG_NAME, WEIGHTS_NAME

    src = Path(src_dir) if src_dir else default_sae_dir()
    dst = Path(out)
    try:
        dst.mkdir(parents=True, exist_ok=True)
        if (src / WEIGHTS_NAME).resolve() != (dst / WEIGHTS_NAME).resolve():
            with atomic_output(dst / WEIGHTS_NAME) as tmp:
                shutil.copyfile(src / WEIGHTS_NAME, tmp)
        atomic_write_text(dst / CONFIG_NAME, json.dumps(cfg.to_json_dict(), indent=2) + "\n")
    except OSError as e:
        from protsae_cli.errors import OutputError

        raise OutputError(f"cannot write the recalibrated SAE to {dst}: {e.strerror or e}") from e
    return dst


def _write_json(path: str, obj: Any) -> None:
    from protsae_cli.io.atomic import atomic_write_text

    try:
        atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        from protsae_cli.errors import OutputError

        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _log_table(rows: Sequence[dict[str, Any]], measure_only: bool) -> None:
    for r in rows:
        b = r["before"]
        if "skipped" in r:
            log.info("%s %s: %s", r["concept"], r["name"], r["skipped"])
            continue
        a = r["after"]
        if measure_only:
            log.info("%s %s: threshold %.4g: precision %s recall %s F1 %s (%d positives)", r["concept"], r["name"],
                     r["threshold"], _fmt(a["precision"]), _fmt(a["recall"]), _fmt(a["f1"]), r["positives"])
        else:
            log.info("%s %s: threshold %.4g -> %.4g (%s): precision %s -> %s, recall %s -> %s, F1 %s -> %s "
                     "(%d positives)%s", r["concept"], r["name"], r["threshold_before"], r["threshold"],
                     r["operating_point"], _fmt(b["precision"]), _fmt(a["precision"]), _fmt(b["recall"]),
                     _fmt(a["recall"]), _fmt(b["f1"]), _fmt(a["f1"]), r["positives"],
                     f"; {r['note']}" if r.get("note") else "")
