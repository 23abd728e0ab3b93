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
import json
import sys
import time
from pathlib import Path

import numpy as np

from protsae_cli.call.concepts import call_segments
from protsae_cli.errors import InputError
from protsae_cli.call.segments import ROLE_CONCEPTS, RegionCaller, fit_decoder, role_entries, tmbed_classes, write_decoder


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


def cmd_encode(a: argparse.Namespace) -> None:
    from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator
    from protsae_cli.io.fasta import read_fasta
    from protsae_cli.call.segments import role_activations

    ann = Annotator(sae=a.sae, threads=a.threads, call_withheld=True)
    roles, order = role_entries(ann.sae.cfg.concepts)
    latents = [int(roles[r].latent) for r in order]
    opts = AnnotateOptions(input=a.fasta, output_prefix=str(Path(a.out).with_suffix("")), progress=False)
    ids, acts = [], []
    t0 = time.perf_counter()
    for res in ann.iter_results(read_fasta(a.fasta), opts):
        ids.append(res.id)
        acts.append(role_activations(res.idx, res.val, latents))
    np.savez_compressed(a.out, ids=np.array(ids), lengths=np.array([x.shape[0] for x in acts]),
                        acts=np.concatenate(acts), latents=np.array(latents), roles=np.array(order))
    print(f"{a.out}: {len(ids)} proteins, {sum(x.shape[0] for x in acts)} residues, "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)


def load_cache(path: str) -> tuple[list[str], list[np.ndarray], list[int], list[str]]:
    z = np.load(path)
    offs = np.concatenate([[0], np.cumsum(z["lengths"])])
    acts = [z["acts"][offs[i]:offs[i + 1]] for i in range(len(z["ids"]))]
    return [str(x) for x in z["ids"]], acts, [int(x) for x in z["latents"]], [str(x) for x in z["roles"]]


def _codes(acts: np.ndarray, latents: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Top-k-shaped codes holding only the role latents (enough for call_segments and the decoder)."""
    idx = np.where(acts > 0, np.asarray(latents)[None, :], -1)
    return idx.astype(np.int64), np.where(acts > 0, acts, 0).astype(np.float32)


def cmd_fit(a: argparse.Namespace) -> None:
    cfg = _load_cfg(_sae_dir(a.sae))
    ids, acts, latents, order = load_cache(a.cache)
    labels = read_tmbed(a.labels)
    roles, cfg_order = role_entries(cfg.concepts)
    if cfg_order != order:
        raise InputError(f"{a.cache}: cached roles {order} differ from the SAE's {cfg_order}")
    X, Y = [], []
    for pid, x in zip(ids, acts):
        if pid in labels:
            X.append(x)
            Y.append(tmbed_classes(labels[pid][1]))
    t0 = time.perf_counter()
    params = fit_decoder(X, Y, roles, order, fitted_on=a.fitted_on or f"{Path(a.labels).name}: {len(X)} proteins")
    print(json.dumps({k: params[k] for k in ("classes", "durations", "transitions", "counts")}, indent=1)
          if a.verbose else f"fitted on {len(X)} proteins in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
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


def _match(obs: list[tuple[int, int]], pred: list[tuple[int, int]], tol: int = 5) -> int:
    """One-to-one matches with both ends within tol (greedy in sequence order; spans do not overlap)."""
    used = [False] * len(pred)
    n = 0
    for s, e in obs:
        for j, (ps, pe) in enumerate(pred):
            if not used[j] and abs(ps - s) <= tol and abs(pe - e) <= tol:
                used[j] = True
                n += 1
                break
    return n


def score(labels: dict[str, tuple[str, str]], calls: dict[str, dict[str, list[tuple[int, int]]]]) -> dict:
    """TMbed-protocol numbers from per-protein calls {role: [(start, end), ...]}."""
    n_obs = n_pred = n_ok = n_alpha = n_match = 0
    alpha_detected = glob = glob_fp = 0
    sp_pos = sp_tp = sp_pred = sp_fp_neg = sp_neg = 0
    sides_without_span = no_span = 0
    len_obs, len_pred = [], []
    for pid, (_, lab) in labels.items():
        c = calls.get(pid)
        if c is None:
            continue
        helices = c.get("helix", [])
        strands = c.get("strand", [])
        obs = _runs_of(lab, "Hh")
        beta = bool(_runs_of(lab, "Bb"))
        if obs and not beta:
            n_alpha += 1
            m = _match(obs, helices)
            n_obs += len(obs)
            n_pred += len(helices)
            n_match += m
            n_ok += int(m == len(obs) == len(helices))
            alpha_detected += int(bool(helices))
            len_obs += [e - s + 1 for s, e in obs]
            len_pred += [e - s + 1 for s, e in helices]
        elif not obs and not beta:
            glob += 1
            glob_fp += int(bool(helices or strands))
        has_sp = "S" in lab
        called_sp = bool(c.get("signal"))
        sp_pos += has_sp
        sp_tp += has_sp and called_sp
        sp_pred += called_sp
        sp_neg += not has_sp
        sp_fp_neg += (not has_sp) and called_sp
        if not helices and not strands:
            no_span += 1
            sides_without_span += bool(c.get("inside") or c.get("outside"))
    rec = n_match / n_obs if n_obs else 0.0
    prec = n_match / n_pred if n_pred else 0.0
    return {
        "alpha_tm_proteins": n_alpha, "observed_helices": n_obs, "predicted_helices": n_pred,
        "helix_recall_5": round(rec, 4), "helix_precision_5": round(prec, 4),
        "qok": round(n_ok / n_alpha, 4) if n_alpha else 0.0,
        "alpha_tm_detected": round(alpha_detected / n_alpha, 4) if n_alpha else 0.0,
        "globular_proteins": glob, "globular_with_tm_call": round(glob_fp / glob, 4) if glob else 0.0,
        "signal_proteins": sp_pos,
        "signal_recall": round(sp_tp / sp_pos, 4) if sp_pos else 0.0,
        "signal_precision": round(sp_tp / sp_pred, 4) if sp_pred else 0.0,
        "signal_false_rate": round(sp_fp_neg / sp_neg, 4) if sp_neg else 0.0,
        "mean_helix_length_observed": round(float(np.mean(len_obs)), 2) if len_obs else 0.0,
        "mean_helix_length_predicted": round(float(np.mean(len_pred)), 2) if len_pred else 0.0,
        "proteins_without_span_with_side_calls": round(sides_without_span / no_span, 4) if no_span else 0.0,
    }


def calls_for(acts: list[np.ndarray], ids: list[str], latents: list[int], order: list[str], cfg,
              decode: str, merge_gap: int, min_len: int) -> tuple[dict, float]:
    """Per-protein role calls as annotate makes them (concept table thresholds, no reliability withholding,
    so a withheld concept is scored too), and the seconds the calling took."""
    roles, _ = role_entries(cfg.concepts)
    entries = [roles[r] for r in order]
    by_latent = {int(e.latent): r for r, e in zip(order, entries)}
    caller = RegionCaller(entries, cfg.segment_decoder, decode)
    out = {}
    t0 = time.perf_counter()
    for pid, x in zip(ids, acts):
        idx, val = _codes(x, latents)
        segs = caller(idx, val, min_segment_len=min_len, merge_gap=merge_gap)
        c: dict[str, list[tuple[int, int]]] = {}
        for s in segs:
            c.setdefault(by_latent[s.latent], []).append((s.start, s.end))
        out[pid] = c
    return out, time.perf_counter() - t0


def cmd_eval(a: argparse.Namespace) -> None:
    cfg = _load_cfg(_sae_dir(a.sae))
    if a.decoder:
        cfg.segment_decoder = json.loads(Path(a.decoder).read_text())
    ids, acts, latents, order = load_cache(a.cache)
    labels = read_tmbed(a.labels)
    res = {"cache": a.cache, "labels": a.labels, "proteins": len(ids),
           "residues": int(sum(x.shape[0] for x in acts))}
    for name, decode, gap, mlen in (("none_gap3_min3", "none", 3, 3), ("none_raw", "none", 0, 1),
                                    ("viterbi", "viterbi", 0, 1)):
        calls, sec = calls_for(acts, ids, latents, order, cfg, decode, gap, mlen)
        res[name] = score(labels, calls) | {"calling_seconds": round(sec, 2)}
    if a.without_strand:
        roles, _ = role_entries(cfg.concepts)
        calls, sec = calls_for(acts, ids, latents, order, cfg, "viterbi", 0, 1)
        for c in calls.values():
            c.pop("strand", None)
        res["viterbi_without_strand_calls"] = score(labels, calls)
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
    f = sub.add_parser("fit")
    f.add_argument("cache")
    f.add_argument("labels")
    f.add_argument("--sae")
    f.add_argument("--write", action="store_true", help="store the fit in the SAE's config.json")
    f.add_argument("--out", help="also write the decoder JSON here")
    f.add_argument("--fitted-on", default="")
    f.add_argument("-v", "--verbose", action="store_true")
    v = sub.add_parser("eval")
    v.add_argument("cache")
    v.add_argument("labels")
    v.add_argument("--sae")
    v.add_argument("--decoder", help="decoder JSON to use instead of the SAE's")
    v.add_argument("--json")
    v.add_argument("--without-strand", action="store_true")
    a = p.parse_args(argv)
    {"encode": cmd_encode, "fit": cmd_fit, "eval": cmd_eval}[a.cmd](a)


if __name__ == "__main__":
    main()
