#!/usr/bin/env python
"""TMbed-protocol evaluation of region calls, and fitting of the SAE's segment decoder (docs/SEGMENTS.md).

Three steps, so the slow one (ESM-2 + SAE) runs once per split:

    python tools/eval_topology.py encode FASTA OUT.npz [--sae DIR]        # role-concept activations per protein
    python tools/eval_topology.py fit CACHE.npz LABELS.fasta [--sae DIR] [--write]   # fit, optionally store
    python tools/eval_topology.py eval CACHE.npz LABELS.fasta [--sae DIR] [--json OUT.json]

LABELS is a TMbed 3-line file (``>ID|...``, sequence, per-residue labels). The protocol (Bernhofer & Rost 2022):
a predicted TM helix is correct when both ends are within 5 residues of an observed helix (one-to-one); per-helix
recall and precision over the alpha-helical TM proteins; Qok = share of those proteins whose helices are all
correct with no extra; false TM calls = share of globular proteins (no TM label) with at least one TM call;
signal peptides per protein (any S label vs any signal-peptide call).

``eval`` scores ``--decode none`` with the README's ``--merge-gap 3 --min-segment-len 3`` (per-residue calls as
``concepts.call_segments`` makes them, from the same activations) and ``--decode viterbi``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

from protsae_cli.errors import InputError
from protsae_cli.evaluate.topology import tmbed_protocol
from protsae_cli.call.segments import (RegionCaller, SegmentDecoder, fit_boundary_shift, fit_decoder, gate_features,
                                       role_entries, tmbed_classes, write_decoder)


def read_tmbed(path: str) -> dict[str, tuple[str, str]]:
    """id -> (sequence, labels) of a TMbed 3-line file."""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if len(lines) % 3:
        raise InputError(f"{path}: {len(lines)} non-empty lines, not a TMbed 3-line file")
    out = {}
    for i in range(0, len(lines), 3):
        pid = lines[i][1:].split("|")[0].split()[0]
        seq, lab = lines[i + 1], lines[i + 2]
        if len(seq) != len(lab):
            raise InputError(f"{path}: protein {pid!r} has {len(seq)} residues but {len(lab)} labels")
        out[pid] = (seq, lab)
    return out


def _sae_dir(arg: str | None) -> str:
    from protsae_cli.models import default_sae_dir

    return arg or str(default_sae_dir())


def _load_cfg(sae: str):
    from protsae_cli.sae.checkpoint import load_sae

    return load_sae(sae)[0].cfg


#: N-terminal rows whose full codes the cache keeps (signal and transit peptides are within the first ~70).
NTERM_ROWS = 70


def cmd_encode(a: argparse.Namespace) -> None:
    from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator
    from protsae_cli.io.fasta import read_fasta
    from protsae_cli.call.segments import role_activations

    ann = Annotator(sae=a.sae, threads=a.threads, call_withheld=True)
    roles, order = role_entries(ann.sae.cfg.concepts)
    latents = [int(roles[r].latent) for r in order]
    opts = AnnotateOptions(input=a.fasta, output_prefix=str(Path(a.out).with_suffix("")), progress=False)
    ids, descs, acts, n_idx, n_val, f_idx, f_val = [], [], [], [], [], [], []
    t0 = time.perf_counter()
    w = ann.code_width
    for res in ann.iter_results(read_fasta(a.fasta), opts):
        ids.append(res.id)
        descs.append(res.description)
        acts.append(role_activations(res.idx, res.val, latents))
        # The full top-k codes of the N-terminal rows, for the signal-peptide gate (transit peptides).
        i = np.full((NTERM_ROWS, w), -1, np.int16)
        v = np.zeros((NTERM_ROWS, w), np.float16)
        n = min(NTERM_ROWS, res.idx.shape[0])
        i[:n], v[:n] = res.idx[:n], res.val[:n]
        n_idx.append(i)
        n_val.append(v)
        if a.full_codes:
            f_idx.append(res.idx.astype(np.int16))
            f_val.append(res.val.astype(np.float16))
    extra = {"full_idx": np.concatenate(f_idx), "full_val": np.concatenate(f_val)} if a.full_codes else {}
    np.savez_compressed(a.out, ids=np.array(ids), descriptions=np.array(descs), **extra,
                        lengths=np.array([x.shape[0] for x in acts]), acts=np.concatenate(acts),
                        latents=np.array(latents), roles=np.array(order), nterm_idx=np.stack(n_idx),
                        nterm_val=np.stack(n_val))
    print(f"{a.out}: {len(ids)} proteins, {sum(x.shape[0] for x in acts)} residues, "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)


def load_cache(path: str) -> tuple[list[str], list[np.ndarray], list[int], list[str]]:
    """(protein ids, role activations per protein, role latents, role names); a TMbed header id
    ``ID|KINGDOM|SPTYPE|n`` is cut to ``ID``, as in the label file."""
    z = np.load(path)
    offs = np.concatenate([[0], np.cumsum(z["lengths"])])
    flat = z["acts"]  # read once: each z[...] of an .npz decompresses the whole array again
    acts = [flat[offs[i]:offs[i + 1]] for i in range(len(z["ids"]))]
    return [_pid(str(x)) for x in z["ids"]], acts, [int(x) for x in z["latents"]], [str(x) for x in z["roles"]]


def _pid(header_id: str) -> str:
    return header_id.split("|")[0]


def load_nterm(path: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The cache's N-terminal full codes [proteins, NTERM_ROWS, k] (idx -1 past a protein's end) and the
    FASTA descriptions (DeepLoc's localisation)."""
    z = np.load(path)
    if "nterm_idx" not in z:
        raise InputError(f"{path}: no N-terminal codes (encoded by an older eval_topology.py); encode it again")
    return z["nterm_idx"].astype(np.int64), z["nterm_val"].astype(np.float32), [str(x) for x in z["descriptions"]]


def _codes(acts: np.ndarray, latents: list[int], nterm: tuple[np.ndarray, np.ndarray] | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k-shaped codes holding only the role latents (enough for call_segments and the decoder); with
    ``nterm``, the first rows are the protein's full codes instead (what the signal gate reads)."""
    idx = np.where(acts > 0, np.asarray(latents)[None, :], -1).astype(np.int64)
    val = np.where(acts > 0, acts, 0).astype(np.float32)
    if nterm is None:
        return idx, val
    ni, nv = nterm
    n = min(ni.shape[0], idx.shape[0])
    w = max(ni.shape[1], idx.shape[1])
    I = np.full((idx.shape[0], w), -1, np.int64)
    V = np.zeros((idx.shape[0], w), np.float32)
    I[:, :idx.shape[1]], V[:, :idx.shape[1]] = idx, val
    I[:n, :] = -1
    V[:n, :] = 0
    I[:n, :ni.shape[1]], V[:n, :ni.shape[1]] = ni[:n], nv[:n]
    return I, V


def _subset(ids: list[str], which: str) -> set[str]:
    """Proteins of a parity half (by position in the cache): how split 2 is divided for choosing variants."""
    if which == "all":
        return set(ids)
    r = {"even": 0, "odd": 1}[which]
    return {pid for i, pid in enumerate(ids) if i % 2 == r}


def load_full(path: str) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Every residue's full top-k codes per protein, when the cache was encoded with --full-codes."""
    z = np.load(path)
    if "full_idx" not in z:
        return None
    offs = np.concatenate([[0], np.cumsum(z["lengths"])])
    fi, fv = z["full_idx"].astype(np.int64), z["full_val"].astype(np.float32)
    return [(fi[offs[i]:offs[i + 1]], fv[offs[i]:offs[i + 1]]) for i in range(len(offs) - 1)]


def screen_latents(full, ids, labels, subset: set[str], exclude: list[int], n: int) -> list[int]:
    """``segments.screen_latents`` on the cached proteins in ``subset`` that have labels."""
    from protsae_cli.call.segments import screen_latents as screen

    keep = [i for i, pid in enumerate(ids) if pid in labels and pid in subset]
    return screen([full[i] for i in keep], [tmbed_classes(labels[ids[i]][1]) for i in keep], exclude, n)


def with_extra(acts: list[np.ndarray], full, extra: list[int]) -> list[np.ndarray]:
    from protsae_cli.call.segments import role_activations

    if not extra:
        return acts
    return [np.concatenate([a, role_activations(fi, fv, extra)], axis=1) for a, (fi, fv) in zip(acts, full)]


def fit_params(ids, acts, labels, cfg, order, subset: set[str], fitted_on: str, context=(), duration_q=(1.0, 99.0),
               penalties=None, full=None, n_extra: int = 0) -> dict:
    """The decoder fitted on the cached proteins in ``subset`` that have labels; with ``full`` codes and
    ``n_extra``, the emission also reads that many screened SAE latents."""
    roles, cfg_order = role_entries(cfg.concepts)
    if cfg_order != order:
        raise InputError(f"cached roles {order} differ from the SAE's {cfg_order}")
    extra: list[int] = []
    if n_extra:
        if full is None:
            raise InputError("--extra-latents needs a cache encoded with --full-codes")
        extra = screen_latents(full, ids, labels, subset, [int(roles[r].latent) for r in order], n_extra)
        acts = with_extra(acts, full, extra)
    X, Y = [], []
    for pid, x in zip(ids, acts):
        if pid in labels and pid in subset:
            X.append(x)
            Y.append(tmbed_classes(labels[pid][1]))
    return fit_decoder(X, Y, roles, order, fitted_on=fitted_on or f"{len(X)} proteins", context=context,
                       duration_q=duration_q, penalties=penalties, extra_latents=extra,
                       max_residues=200_000 if extra else 400_000)


def cmd_fit(a: argparse.Namespace) -> None:
    cfg = _load_cfg(_sae_dir(a.sae))
    ids, acts, latents, order = load_cache(a.cache)
    labels = read_tmbed(a.labels)
    t0 = time.perf_counter()
    sub = _subset(ids, a.subset)
    n = sum(1 for pid in ids if pid in labels and pid in sub)
    params = fit_params(ids, acts, labels, cfg, order, sub,
                        a.fitted_on or f"{Path(a.labels).name}: {n} proteins", context=a.context,
                        duration_q=tuple(a.duration_q), penalties={"membrane": a.membrane_penalty,
                                                                   "span": a.span_penalty,
                                                                   "strand": a.strand_penalty},
                        full=load_full(a.cache) if a.extra_latents else None, n_extra=a.extra_latents)
    params["emission"]["prior_weight"] = a.prior_weight
    params["emission"]["loop_globular_offset"] = a.loop_globular_offset
    params["membrane_gate"] = {"min_span_confidence": a.min_span_confidence}
    if a.gate:
        params["signal_gate"] = json.loads(Path(a.gate).read_text())
    if a.boundary_shift:
        full = load_full(a.cache)
        if full is None:
            raise InputError("--boundary-shift needs a cache encoded with --full-codes")
        rows = [i for i, pid in enumerate(ids) if pid in labels and pid in sub]
        params |= fit_boundary_shift(params, [full[i] for i in rows], [tmbed_classes(labels[ids[i]][1]) for i in rows])
    if a.selection:
        params["selection"] = json.loads(Path(a.selection).read_text())
    SegmentDecoder(params, where="fitted decoder")  # refuse to store what annotate could not load
    print(json.dumps({k: params[k] for k in ("classes", "durations", "transitions", "counts")}, indent=1)
          if a.verbose else f"fitted on {n} proteins in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if a.write:
        print(f"wrote {write_decoder(_sae_dir(a.sae), params)}", file=sys.stderr)
    if a.out:
        Path(a.out).write_text(json.dumps(params, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- metrics
def _runs_of(lab: str, chars: str) -> list[tuple[int, int]]:
    """1-based inclusive runs of residues whose label is in chars."""
    m = np.frombuffer(lab.encode(), dtype=np.uint8)
    on = np.isin(m, np.frombuffer(chars.encode(), dtype=np.uint8))
    if not on.any():
        return []
    d = np.diff(np.concatenate([[0], on.astype(np.int8), [0]]))
    return [(int(s) + 1, int(e)) for s, e in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1))]


#: TMbed label letters of each role's residues.
ROLE_LABELS = {"helix": "Hh", "strand": "Bb", "signal": "S", "inside": "1", "outside": "2"}


def score(labels: dict[str, tuple[str, str]], calls: dict[str, dict[str, list[tuple[int, int]]]]) -> dict:
    """TMbed-protocol numbers from per-protein calls {role: [(start, end), ...]} (the library's
    ``evaluate.topology.tmbed_protocol``, what ``protsae calibrate`` reports), plus helix lengths, side calls on
    proteins without a span, and residue precision/recall per role."""
    scored = [(pid, lab, calls[pid]) for pid, (_, lab) in labels.items() if pid in calls]
    protocol = tmbed_protocol((tmbed_classes(lab), c) for _, lab, c in scored)
    sides_without_span = no_span = 0
    len_obs, len_pred = [], []
    res_counts: dict[str, list[int]] = {}
    for _, lab, c in scored:
        helices = c.get("helix", [])
        strands = c.get("strand", [])
        obs = _runs_of(lab, "Hh")
        beta = bool(_runs_of(lab, "Bb"))
        if obs and not beta:
            len_obs += [e - s + 1 for s, e in obs]
            len_pred += [e - s + 1 for s, e in helices]
        if not helices and not strands:
            no_span += 1
            sides_without_span += bool(c.get("inside") or c.get("outside"))
        # Residue-level counts per role: against TMbed's labels as they are, and for the sides also against
        # membrane-protein sides only (TMbed labels every residue of a soluble protein "inside").
        n = len(lab)
        membrane = bool(obs) or beta
        for role, chars in ROLE_LABELS.items():
            called = np.zeros(n, bool)
            for s_, e_ in c.get(role, []):
                called[s_ - 1:e_] = True
            truth = np.isin(np.frombuffer(lab.encode(), np.uint8), np.frombuffer(chars.encode(), np.uint8))
            known = np.frombuffer(lab.encode(), np.uint8) != ord("U")
            for key, t in ((role, truth), (role + "_membrane_proteins_only", truth & membrane)):
                if key.endswith("_membrane_proteins_only") and role not in ("inside", "outside"):
                    continue
                r = res_counts.setdefault(key, [0, 0, 0])
                r[0] += int((called & t & known).sum())
                r[1] += int((called & known).sum())
                r[2] += int((t & known).sum())
    return dict(protocol) | {
        "mean_helix_length_observed": round(float(np.mean(len_obs)), 2) if len_obs else 0.0,
        "mean_helix_length_predicted": round(float(np.mean(len_pred)), 2) if len_pred else 0.0,
        "median_helix_length_observed": float(np.median(len_obs)) if len_obs else 0.0,
        "median_helix_length_predicted": float(np.median(len_pred)) if len_pred else 0.0,
        "proteins_without_span": no_span,
        "proteins_without_span_with_side_calls": round(sides_without_span / no_span, 4) if no_span else 0.0,
        "residue_precision_recall": {k: {"precision": round(tp / pc, 4) if pc else None,
                                         "recall": round(tp / pos, 4) if pos else None, "positives": pos}
                                     for k, (tp, pc, pos) in res_counts.items()},
    }


def calls_for(acts: list[np.ndarray], ids: list[str], latents: list[int], order: list[str], cfg,
              decode: str, merge_gap: int, min_len: int, decoder: dict | None = None,
              nterm: tuple[np.ndarray, np.ndarray] | None = None, keep: set[str] | None = None,
              called_only: bool = False, full=None) -> tuple[dict, float]:
    """Per-protein role calls as annotate makes them (concept table thresholds; no reliability withholding, so
    a withheld concept is scored too, unless ``called_only``), and the seconds the calling took. ``decoder``
    replaces the SAE's; ``nterm`` (the cache's N-terminal full codes) lets a signal gate see them; ``full``
    (every residue's full codes) is what annotate sees, needed by a decoder with extra latents."""
    from protsae_cli.call.concepts import CallPolicy, select_calls, standardize

    roles, _ = role_entries(cfg.concepts)
    if called_only:  # what annotate calls by default: the concepts above the reliability floors
        called_ids = {(c.concept_id, int(c.latent)) for c in select_calls(standardize(list(cfg.concepts)),
                                                                          CallPolicy()).called}
        entries = [roles[r] for r in order if (roles[r].concept_id, int(roles[r].latent)) in called_ids]
    else:
        entries = [roles[r] for r in order]
    by_latent = {int(e.latent): r for r, e in zip(order, [roles[r] for r in order])}
    caller = RegionCaller(entries, cfg.segment_decoder if decoder is None else decoder, decode)
    out = {}
    t0 = time.perf_counter()
    for i, (pid, x) in enumerate(zip(ids, acts)):
        if keep is not None and pid not in keep:
            continue
        if full is not None:
            idx, val = full[i]
        else:
            idx, val = _codes(x, latents, None if nterm is None else (nterm[0][i], nterm[1][i]))
        segs = caller(idx, val, min_segment_len=min_len, merge_gap=merge_gap)
        c: dict[str, list[tuple[int, int]]] = {}
        for s in segs:
            c.setdefault(by_latent[s.latent], []).append((s.start, s.end))
        out[pid] = c
    return out, time.perf_counter() - t0


def _nterm_or_none(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    z = np.load(path)
    return (z["nterm_idx"].astype(np.int64), z["nterm_val"].astype(np.float32)) if "nterm_idx" in z else None


def cmd_eval(a: argparse.Namespace) -> None:
    cfg = _load_cfg(_sae_dir(a.sae))
    decoder = json.loads(Path(a.decoder).read_text()) if a.decoder else None
    ids, acts, latents, order = load_cache(a.cache)
    nterm = _nterm_or_none(a.cache)
    full = load_full(a.cache)
    labels = read_tmbed(a.labels)
    keep = _subset(ids, a.subset)
    labels = {k: v for k, v in labels.items() if k in keep}
    res = {"cache": a.cache, "labels": a.labels, "subset": a.subset, "proteins": len(labels),
           "residues": int(sum(len(v[0]) for v in labels.values()))}
    runs = [("none_gap3_min3", "none", 3, 3, False), ("none_raw", "none", 0, 1, False),
            ("none_gap3_min3_default_calls", "none", 3, 3, True),
            ("viterbi", "viterbi", 0, 1, False), ("default_calls", "viterbi", 0, 1, True)]
    for name, decode, gap, mlen, called_only in runs:
        calls, sec = calls_for(acts, ids, latents, order, cfg, decode, gap, mlen, decoder=decoder, nterm=nterm,
                               keep=keep, called_only=called_only, full=full)
        res[name] = score(labels, calls) | {"calling_seconds": round(sec, 2)}
    if a.without_gate:
        dec = dict(decoder if decoder is not None else cfg.segment_decoder)
        dec.pop("signal_gate", None)
        calls, sec = calls_for(acts, ids, latents, order, cfg, "viterbi", 0, 1, decoder=dec, keep=keep, full=full)
        res["viterbi_without_gate"] = score(labels, calls) | {"calling_seconds": round(sec, 2)}
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


#: The variants ``select`` tries (fit on the even half of the fitting split, scored on the odd half).
CONTEXTS = ((), (4,), (4, 12))
DURATION_QS = ((1.0, 99.0),)
PRIOR_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
MEMBRANE_PENALTIES = (0.0,)
SPAN_PENALTIES = (0.0, -3.0)
STRAND_PENALTIES = (0.0, -12.0)


def cmd_select(a: argparse.Namespace) -> None:
    """Choose emission context, duration range and penalties on validation proteins: fit on the even half of
    the cache, score the odd half with TMbed's protocol; the best variant is the one with the highest Qok among
    those with at most 2 % false TM calls on globular proteins (ties: per-helix recall, then fewer false calls)."""
    cfg = _load_cfg(_sae_dir(a.sae))
    ids, acts, latents, order = load_cache(a.cache)
    labels = read_tmbed(a.labels)
    even, odd = _subset(ids, "even"), _subset(ids, "odd")
    odd_labels = {k: v for k, v in labels.items() if k in odd}
    full = load_full(a.cache) if a.extra_latents else None
    rows = []
    t0 = time.perf_counter()
    contexts = CONTEXTS if not a.contexts else ((),) if a.contexts == "none" else tuple(
        tuple(int(w) for w in part.split(",") if w) for part in a.contexts.split(";"))
    for ctx in contexts:
        for dq in DURATION_QS:
            base = fit_params(ids, acts, labels, cfg, order, even, "select: even half", context=ctx, duration_q=dq,
                              full=full, n_extra=a.extra_latents)
            grid = (a.prior_weights or PRIOR_WEIGHTS, MEMBRANE_PENALTIES, a.span_penalties or SPAN_PENALTIES,
                    a.strand_penalties or STRAND_PENALTIES)
            for pw, pm, ps, pb, mg in itertools.product(*grid, a.min_span_confidence or (0.0,)):
                dec = dict(base, penalties={"membrane": pm, "span": ps, "strand": pb},
                           emission=dict(base["emission"], prior_weight=pw),
                           membrane_gate={"min_span_confidence": mg})
                calls, _ = calls_for(acts, ids, latents, order, cfg, "viterbi", 0, 1, decoder=dec, keep=odd,
                                     full=full)
                sc = score(odd_labels, calls)
                row = {"extra_latents": a.extra_latents, "context": list(ctx), "duration_q": list(dq), "prior_weight": pw, "membrane": pm, "span": ps,
                       "strand": pb, "min_span_confidence": mg,
                       **{k: sc[k] for k in ("helix_recall_5", "helix_precision_5", "qok",
                                             "globular_with_tm_call", "signal_recall", "signal_precision",
                                             "mean_helix_length_predicted")}}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    ok = [r for r in rows if r["globular_with_tm_call"] <= 0.02] or rows
    best = max(ok, key=lambda r: (r["qok"], r["helix_recall_5"], -r["globular_with_tm_call"]))
    out = {"rule": "fit on the even half of the fitting split, scored on the odd half; best Qok among variants "
                   "with <= 2 % false TM calls on globular proteins (ties: per-helix recall, then fewer false TM calls)",
           "cache": a.cache, "labels": Path(a.labels).name, "chosen": best, "variants": len(rows),
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out | {"all": rows}, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- signal gate
def read_fasta_seqs(path: str) -> dict[str, str]:
    """id (first word, TMbed ids cut at '|') -> sequence of a FASTA or TMbed 3-line file."""
    out: dict[str, str] = {}
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if lines and lines[0].startswith(">") and len(lines) % 3 == 0 and all(
            lines[i].startswith(">") for i in range(0, len(lines), 3)) and not lines[1].startswith(">") \
            and set(lines[2]) <= set("HhBbS12U"):
        return {k: v[0] for k, v in read_tmbed(path).items()}
    cur = None
    for ln in lines:
        if ln.startswith(">"):
            cur = _pid(ln[1:].split()[0])
            out[cur] = ""
        elif cur is not None:
            out[cur] += ln
    return out


def _excluded(paths: list[str]) -> set[str]:
    seqs: set[str] = set()
    for p in paths or []:
        seqs |= set(read_fasta_seqs(p).values())
    return seqs


TRANSIT = ("Mitochondrion", "Plastid")


def _gate_matrix(nterm_idx: np.ndarray, nterm_val: np.ndarray, rows: list[int], window: int,
                 d_sae: int) -> np.ndarray:
    """[len(rows), d_sae] mean activation of every latent over the first ``window`` residues."""
    X = np.zeros((len(rows), d_sae))
    for j, i in enumerate(rows):
        X[j] = gate_features(nterm_idx[i], nterm_val[i], np.arange(d_sae), window)
    return X


def _fit_gate_weights(X: np.ndarray, y: np.ndarray, n_latents: int, l2: float = 1e-2
                      ) -> tuple[np.ndarray, np.ndarray, float]:
    """Balanced L2 logistic regression on standardised features; keep the ``n_latents`` largest |weights| and
    refit on those. Returns (latents, coef on raw features, intercept)."""
    import torch

    def fit(Z: np.ndarray) -> tuple[np.ndarray, float]:
        Zt = torch.as_tensor(Z)
        yt = torch.as_tensor(y, dtype=torch.float64)
        w_pos = 0.5 / max(y.mean(), 1e-9)
        w_neg = 0.5 / max(1 - y.mean(), 1e-9)
        sw = torch.where(yt > 0, w_pos, w_neg)
        W = torch.zeros(Z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = (sw * torch.nn.functional.binary_cross_entropy_with_logits(Zt @ W + b, yt, reduction="none")
                    ).mean() + l2 * (W ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return W.detach().numpy(), float(b.detach())

    mu, sd = X.mean(0), X.std(0)
    live = sd > 1e-8
    Z = np.zeros_like(X)
    Z[:, live] = (X[:, live] - mu[live]) / sd[live]
    w, _ = fit(Z)
    lat = np.argsort(-np.abs(w) * live)[:n_latents]
    lat = np.sort(lat[live[lat]])
    w2, b2 = fit(Z[:, lat])
    coef = w2 / sd[lat]
    return lat, coef, b2 - float((w2 * mu[lat] / sd[lat]).sum())


def _gate_data(a: argparse.Namespace):
    """Gate training proteins: TMbed fitting-split proteins (signal peptide or not) and DeepLoc proteins of
    the mitochondrion / plastid (negatives: transit peptides), minus any sequence in --exclude."""
    excl = _excluded(a.exclude)
    tm_ids, tm_acts, _, _ = load_cache(a.tmbed_cache)
    ti, tv, _ = load_nterm(a.tmbed_cache)
    labels = read_tmbed(a.tmbed_labels)
    dl_ids, _, _, _ = load_cache(a.deeploc_cache)
    di, dv, ddesc = load_nterm(a.deeploc_cache)
    dseq = read_fasta_seqs(a.deeploc_fasta)
    idx_parts, val_parts, y, src = [], [], [], []
    for i, pid in enumerate(tm_ids):
        if pid in labels and labels[pid][0] not in excl:
            idx_parts.append(ti[i]); val_parts.append(tv[i]); y.append(int("S" in labels[pid][1])); src.append("tmbed")
    for i, pid in enumerate(dl_ids):
        loc = ddesc[i].split("-")[0]
        if loc in TRANSIT and dseq.get(pid) not in excl:
            idx_parts.append(di[i]); val_parts.append(dv[i]); y.append(0); src.append(loc)
    return np.stack(idx_parts), np.stack(val_parts), np.array(y), src


def cmd_gate(a: argparse.Namespace) -> None:
    """Fit the signal gate; its window and threshold are chosen on the odd half after fitting on the even half
    (the threshold keeps >= --keep of the odd half's signal peptides), then it is refitted on all of it."""
    cfg = _load_cfg(_sae_dir(a.sae))
    I, V, y, src = _gate_data(a)
    n = len(y)
    even = np.arange(n) % 2 == 0
    t0 = time.perf_counter()
    trials = []
    for window in (20, 35, 50, 70):
        X = _gate_matrix(I, V, list(range(n)), window, cfg.d_sae)
        lat, coef, b = _fit_gate_weights(X[even], y[even], a.latents)
        p = 1 / (1 + np.exp(-(X[~even][:, lat] @ coef + b)))
        pos = np.sort(p[y[~even] == 1])
        thr = float(pos[int(np.floor((1 - a.keep) * len(pos)))]) if len(pos) else 0.5
        neg = p[y[~even] == 0]
        tr_src = np.array(src)[~even]
        transit = np.isin(tr_src, TRANSIT)
        trials.append({"window": window, "threshold": round(thr, 4),
                       "signal_kept": round(float((pos >= thr).mean()), 4),
                       "transit_passed": round(float((p[transit] >= thr).mean()), 4) if transit.any() else None,
                       "tmbed_nonsignal_passed": round(float((neg[~transit[y[~even] == 0]] >= thr).mean()), 4)})
        print(json.dumps(trials[-1]), file=sys.stderr)
    best = min(trials, key=lambda t: (t["transit_passed"], t["tmbed_nonsignal_passed"]))
    X = _gate_matrix(I, V, list(range(n)), best["window"], cfg.d_sae)
    lat, coef, b = _fit_gate_weights(X, y, a.latents)
    gate = {"method": "logistic regression on the mean activation of the listed latents over the first window "
                      "residues; a decoded signal peptide is kept only if P >= threshold",
            "window": int(best["window"]), "latents": [int(x) for x in lat], "coef": [round(float(c), 6) for c in coef],
            "intercept": round(b, 6), "threshold": best["threshold"],
            "fitted_on": f"{Path(a.tmbed_labels).name} ({int((np.array(src) == 'tmbed').sum())} proteins, "
                         f"{int(y.sum())} with a signal peptide) + {Path(a.deeploc_fasta).name} mitochondrion/plastid "
                         f"({int(np.isin(src, TRANSIT).sum())} proteins, negatives)",
            "selection": {"rule": f"window with the fewest transit peptides passing on the odd half at the threshold "
                                  f"that keeps {a.keep:.0%} of its signal peptides (fit on the even half)",
                          "trials": trials}}
    Path(a.out).write_text(json.dumps(gate, indent=1) + "\n")
    print(f"{a.out}: window {gate['window']}, {len(lat)} latents, threshold {gate['threshold']} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)


def cmd_deeploc(a: argparse.Namespace) -> None:
    """Share of DeepLoc proteins per localisation with a signal-peptide call: --decode none (raw and the
    README's smoothing), the decoder without its gate, and with it; --exclude drops sequences seen in fitting."""
    cfg = _load_cfg(_sae_dir(a.sae))
    decoder = json.loads(Path(a.decoder).read_text()) if a.decoder else dict(cfg.segment_decoder)
    ids, acts, latents, order = load_cache(a.cache)
    I, V, desc = load_nterm(a.cache)
    seqs = read_fasta_seqs(a.fasta)
    excl = _excluded(a.exclude)
    keep = {pid for pid in ids if seqs.get(pid) not in excl}
    loc = {pid: d.split()[0].split("-")[0] for pid, d in zip(ids, desc)}
    no_gate = {k: v for k, v in decoder.items() if k != "signal_gate"}
    res: dict = {"cache": a.cache, "proteins": len(keep), "excluded": len(ids) - len(keep)}
    for name, decode, gap, mlen, dec in (("none_raw", "none", 0, 1, None), ("none_gap3_min3", "none", 3, 3, None),
                                         ("viterbi_without_gate", "viterbi", 0, 1, no_gate),
                                         ("viterbi", "viterbi", 0, 1, decoder)):
        calls, _ = calls_for(acts, ids, latents, order, cfg, decode, gap, mlen, decoder=dec, nterm=(I, V), keep=keep)
        per: dict[str, list[int]] = {}
        for pid, c in calls.items():
            r = per.setdefault(loc[pid], [0, 0])
            r[0] += 1
            r[1] += bool(c.get("signal"))
        res[name] = {k: {"proteins": n, "with_signal_call": m, "rate": round(m / n, 4)}
                     for k, (n, m) in sorted(per.items())}
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode")
    e.add_argument("fasta")
    e.add_argument("out")
    e.add_argument("--sae")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--full-codes", action="store_true", help="also keep every residue's full top-k codes")
    f = sub.add_parser("fit")
    f.add_argument("cache")
    f.add_argument("labels")
    f.add_argument("--sae")
    f.add_argument("--write", action="store_true", help="store the fit in the SAE's config.json")
    f.add_argument("--out", help="also write the decoder JSON here")
    f.add_argument("--fitted-on", default="")
    f.add_argument("-v", "--verbose", action="store_true")
    f.add_argument("--subset", choices=("all", "even", "odd"), default="all")
    f.add_argument("--context", type=int, nargs="*", default=[], help="emission context half-widths")
    f.add_argument("--duration-q", type=float, nargs=2, default=[1.0, 99.0], metavar=("LO", "HI"))
    f.add_argument("--membrane-penalty", type=float, default=0.0)
    f.add_argument("--span-penalty", type=float, default=0.0)
    f.add_argument("--strand-penalty", type=float, default=0.0)
    f.add_argument("--prior-weight", type=float, default=1.0)
    f.add_argument("--min-span-confidence", type=float, default=0.0, help="membrane gate (0 = off)")
    f.add_argument("--loop-globular-offset", type=float, default=None,
                   help="loop residues score at least the globular score plus this (default: off)")
    f.add_argument("--extra-latents", type=int, default=0, help="screened SAE latents the emission also reads "
                                                                  "(needs a cache encoded with --full-codes)")
    f.add_argument("--gate", help="signal gate JSON (from the gate step) to store with the decoder")
    f.add_argument("--boundary-shift", action="store_true",
                   help="measure the decoded helix ends' offset on these proteins and correct it (needs --full-codes)")
    f.add_argument("--selection", help="selection JSON (from the select step) to record with the decoder")
    v = sub.add_parser("eval")
    v.add_argument("cache")
    v.add_argument("labels")
    v.add_argument("--sae")
    v.add_argument("--decoder", help="decoder JSON to use instead of the SAE's")
    v.add_argument("--json")
    v.add_argument("--subset", choices=("all", "even", "odd"), default="all")
    v.add_argument("--without-gate", action="store_true")
    c = sub.add_parser("select")
    c.add_argument("cache")
    c.add_argument("labels")
    c.add_argument("--sae")
    c.add_argument("--json")
    c.add_argument("--extra-latents", type=int, default=0)
    c.add_argument("--prior-weights", type=float, nargs="*", default=None)
    c.add_argument("--min-span-confidence", type=float, nargs="*", default=None)
    c.add_argument("--span-penalties", type=float, nargs="*", default=None)
    c.add_argument("--strand-penalties", type=float, nargs="*", default=None)
    c.add_argument("--contexts", default="", help="override: ';'-separated half-width lists, e.g. '4;4,12', or 'none'")
    g = sub.add_parser("gate")
    g.add_argument("tmbed_cache")
    g.add_argument("tmbed_labels")
    g.add_argument("deeploc_cache")
    g.add_argument("deeploc_fasta")
    g.add_argument("out")
    g.add_argument("--sae")
    g.add_argument("--exclude", nargs="*", default=[], help="FASTA/TMbed files whose sequences are left out")
    g.add_argument("--latents", type=int, default=48)
    g.add_argument("--keep", type=float, default=0.95)
    d = sub.add_parser("deeploc")
    d.add_argument("cache")
    d.add_argument("fasta")
    d.add_argument("--sae")
    d.add_argument("--decoder")
    d.add_argument("--exclude", nargs="*", default=[])
    d.add_argument("--json")
    a = p.parse_args(argv)
    {"encode": cmd_encode, "fit": cmd_fit, "eval": cmd_eval, "select": cmd_select, "gate": cmd_gate,
     "deeploc": cmd_deeploc}[a.cmd](a)


if __name__ == "__main__":
    main()
