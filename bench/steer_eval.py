"""Recorded steering evaluation: steered vs random-latent control vs unsteered, over concepts and strengths.

For each concept and strength, every input protein is redesigned (masked infill, same masks and draws for all
conditions) unsteered, steered toward the concept, and steered along a random non-target latent set of the
same size with the same strength (one fresh set per protein, so a concept's control pools n_proteins random
latents). Reported per (concept, strength), means over proteins:

- d_prob  steered: re-encoded predicted probability of the concept (ProtSAE pi, mean over residues), steered
  minus unsteered; d_prob control: the same for the random-latent control. `ratio` = d_prob steered /
  |d_prob control| and a paired bootstrap 95% interval of (d_prob steered - d_prob control) over proteins.
- d_act: the same differences for the target latent activation (the only readout for a plain TopK SAE).
- pppl ratio: mean pseudo-perplexity of steered outputs / of unsteered outputs, under the unsteered model,
  scored on (a seeded subset of) the designed positions: the positions steering rewrote, where a loss of
  naturalness shows first (unchanged positions would dilute the ratio).
- meets target: d_prob steered >= 2 |d_prob control| (and > 0) and pppl ratio <= 1.2 (issue #5), on means;
  `CI > 0` says whether the paired bootstrap interval of (steered - control) excludes zero.
- composition L1 vs unsteered: L1 distance between the 20-amino-acid composition of the steered and the
  unsteered output (0..2), because a falling PPPL can mean a drift to low-complexity, repetitive residues.

Concepts: --concepts, else the SAE's concept entries in config order (ProtSAE: defined latents), skipping those
whose unsteered mean probability on the inputs is already >= 0.9 (no room to rise); a SAE without concept
labels falls back to its most frequently firing latents on the inputs.

Run (CPU, a few minutes at the defaults):
    python bench/steer_eval.py --fasta $PROTSAE_SHARED_DATA/tmbed/cv/cv_00_s.fasta --out bench/steer_eval.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protsae_cli.steer import pipeline as st  # noqa: E402
from protsae_cli.io.fasta import read_fasta  # noqa: E402


def pick_proteins(fasta: str, n: int, min_len: int, max_len: int) -> list[st.SteerInput]:
    """The first n proteins of the file within the length window (input order, so the set is fixed)."""
    out: list[st.SteerInput] = []
    for rec in read_fasta(fasta):
        if min_len <= len(rec.sequence) <= max_len:
            out.append(st.SteerInput(len(out), rec.id, rec.sequence))
            if len(out) == n:
                break
    if not out:
        raise SystemExit(f"no protein of {min_len}..{max_len} residues in {fasta}")
    return out


def baseline_probabilities(scorer: st.Scorer, seqs: list[str], n_concepts: int) -> list[float]:
    reads = [scorer.readout(seqs, [c], c) for c in range(n_concepts)]
    return [float(np.mean([p for _, p in r])) for r in reads]


def choose_concepts(m: st.SteerModels, scorer: st.Scorer, inputs: list[st.SteerInput], wanted: list[str] | None,
                    n: int) -> tuple[list[tuple[str, list[int]]], dict[str, Any]]:
    cfg = m.sae.cfg
    seqs = [i.sequence for i in inputs]
    notes: dict[str, Any] = {}
    if wanted:
        return [(c, st.resolve_concept(cfg, c)) for c in wanted], notes
    n_def = getattr(m.sae, "n_concepts", None)
    if cfg.concepts:
        entries = [e for e in cfg.concepts if n_def is None or e.latent < n_def]
        if n_def is not None:
            base = baseline_probabilities(scorer, seqs, n_def)
            notes["baseline_probability"] = {e.concept_id: round(base[e.latent], 4) for e in entries}
            skipped = [e.concept_id for e in entries if base[e.latent] >= 0.9]
            notes["skipped_saturated"] = skipped
            entries = [e for e in entries if base[e.latent] < 0.9]
        chosen: list[tuple[str, list[int]]] = []
        for e in entries:
            if all(e.concept_id != c for c, _ in chosen):
                chosen.append((e.concept_id, st.resolve_concept(cfg, e.concept_id)))
            if len(chosen) == n:
                break
        return chosen, notes
    act = st.measure_latent_activity(m.runner, m.sae, m.hook, seqs)
    top = torch.argsort(act.frequency, descending=True, stable=True)[:n].tolist()
    notes["fallback"] = "no concept labels: most frequently firing latents on the inputs"
    return [(f"latent:{j}", [j]) for j in top], notes


def paired_bootstrap(diff: np.ndarray, seed: int, reps: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(reps, len(diff)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    m = st.load_models(args.sae, args.model, "cpu")
    inputs = pick_proteins(args.fasta, args.n_proteins, args.min_len, args.max_len)
    scorer = st.Scorer(m.runner, m.sae, m.hook)
    concepts, notes = choose_concepts(m, scorer, inputs, args.concepts.split(",") if args.concepts else None,
                                      args.n_concepts)
    strengths = tuple(float(s) for s in args.strengths.split(","))
    table: list[dict[str, Any]] = []
    for concept, targets in concepts:
        prob_col = st.primary_probability_column(m.sae, targets)
        spec = st.SteerSpec(concept=concept, strengths=strengths, mode=args.mode, mask_ratio=args.mask_ratio,
                            mask_strategy=args.mask_strategy, decode=args.decode, iterations=args.iterations,
                            seed=args.seed, controls=("random-latent",), pppl_positions="designed",
                            pppl_max_positions=args.pppl_max_positions)
        t1 = time.perf_counter()
        gen = st.steer_sequences(m.runner, m.sae, m.hook, inputs, spec, targets)
        rows = st.score_generated(scorer, gen, targets, prob_col, concept, spec)
        for s in strengths:
            steer = {r["source_index"]: r for r in rows if r["condition"] == "steered" and r["strength"] == s}
            ctrl = {r["source_index"]: r for r in rows
                    if r["condition"].startswith("control:") and r["strength"] == s}
            idx = sorted(steer)

            def d(rs: dict[int, dict[str, Any]], key: str, base: str) -> np.ndarray | None:
                if rs[idx[0]][key] is None:
                    return None
                return np.array([rs[i][key] - rs[i][base] for i in idx])

            dps, dpc = d(steer, "target_probability", "unsteered_probability"), \
                d(ctrl, "target_probability", "unsteered_probability")
            das, dac = d(steer, "target_activation", "unsteered_activation"), \
                d(ctrl, "target_activation", "unsteered_activation")
            pp_s = np.mean([steer[i]["pseudo_perplexity"] for i in idx])
            pp_c = np.mean([ctrl[i]["pseudo_perplexity"] for i in idx])
            pp_u = np.mean([steer[i]["unsteered_pseudo_perplexity"] for i in idx])
            unsteered = {g.source_index: g.sequence for g in gen if g.condition == "unsteered"}
            steered_seq = {g.source_index: g.sequence for g in gen if g.condition == "steered" and g.strength == s}
            comp = np.mean([np.abs(st.composition(steered_seq[i]) - st.composition(unsteered[i])).sum()
                            for i in idx])
            entry: dict[str, Any] = {
                "concept": concept, "latents": targets, "strength": s, "n": len(idx),
                "d_act_steered": float(das.mean()), "d_act_control": float(dac.mean()),
                "pppl_unsteered": float(pp_u), "pppl_ratio_steered": float(pp_s / pp_u),
                "pppl_ratio_control": float(pp_c / pp_u),
                "identity_to_unsteered": float(np.mean([steer[i]["identity_to_unsteered"] for i in idx])),
                "composition_l1_vs_unsteered": float(comp),
            }
            if dps is not None:
                lo, hi = paired_bootstrap(dps - dpc, args.seed)
                entry.update({
                    "d_prob_steered": float(dps.mean()), "d_prob_control": float(dpc.mean()),
                    "ratio": float(dps.mean() / abs(dpc.mean())) if dpc.mean() != 0 else float("inf"),
                    "diff_ci95": [lo, hi], "ci_excludes_zero": bool(lo > 0),
                    "meets_target": bool(dps.mean() > 0 and dps.mean() >= 2 * abs(dpc.mean())
                                         and pp_s / pp_u <= 1.2),
                })
            table.append(entry)
        print(f"[{concept}] {len(gen)} sequences in {time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True)
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "sae": f"{m.sae_path} (arch {m.sae.cfg.arch}, d_sae {m.sae.cfg.d_sae}, k {m.sae.cfg.k}, hook {m.hook}, "
               f"sha256 {m.sae_sha256[:12]})",
        "plm": f"{m.runner.plm.name} (sha256 {m.runner.plm.sha256[:12]})",
        "proteins": f"{len(inputs)} from {args.fasta} ({args.min_len}..{args.max_len} residues, first in file order)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "latent_scale": "recorded max_activation" if st.recorded_latent_scale(m.sae.cfg) is not None
        else "token max latent value",
        "notes": notes, "table": table, "seconds": round(time.perf_counter() - t0, 1),
    }


def markdown(result: dict[str, Any]) -> str:
    has_prob = any("d_prob_steered" in r for r in result["table"])
    head = ["concept", "s"]
    head += ["Δπ steered", "Δπ control", "ratio", "95% CI (Δπ s − c)"] if has_prob else []
    head += ["Δact steered", "Δact control", "PPPL ratio steered", "PPPL ratio control", "identity to unsteered",
             "composition L1 vs unsteered"]
    head += ["meets target", "CI > 0"] if has_prob else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["table"]:
        cells = [r["concept"], f"{r['strength']:g}"]
        if has_prob:
            cells += [f"{r['d_prob_steered']:+.4f}", f"{r['d_prob_control']:+.4f}", f"{r['ratio']:.2f}",
                      f"[{r['diff_ci95'][0]:+.4f}, {r['diff_ci95'][1]:+.4f}]"]
        cells += [f"{r['d_act_steered']:+.4f}", f"{r['d_act_control']:+.4f}", f"{r['pppl_ratio_steered']:.3f}",
                  f"{r['pppl_ratio_control']:.3f}", f"{r['identity_to_unsteered']:.3f}",
                  f"{r['composition_l1_vs_unsteered']:.3f}"]
        if has_prob:
            cells += ["yes" if r["meets_target"] else "no", "yes" if r["ci_excludes_zero"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fasta", required=True, help="input proteins (e.g. a TMbed CV split, sequences only)")
    ap.add_argument("--sae", default=None, help="SAE directory (default: protsae_cli/models/default_sae)")
    ap.add_argument("--model", default=None, help="PLM (default: the SAE's, or the bundled stand-in)")
    ap.add_argument("--n-proteins", type=int, default=20)
    ap.add_argument("--min-len", type=int, default=50)
    ap.add_argument("--max-len", type=int, default=100)
    ap.add_argument("--concepts", default=None, help="comma-separated concepts (default: see module doc)")
    ap.add_argument("--n-concepts", type=int, default=5)
    ap.add_argument("--strengths", default="0.5,1,2")
    ap.add_argument("--mode", default="add", choices=st.MODES)
    ap.add_argument("--mask-ratio", type=float, default=0.5)
    ap.add_argument("--mask-strategy", default="random", choices=st.MASK_STRATEGIES)
    ap.add_argument("--decode", default="argmax", choices=st.DECODES)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--pppl-max-positions", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the result as JSON here (and a .md table beside it)")
    args = ap.parse_args(argv)
    result = evaluate(args)
    md = markdown(result)
    print(md)
    print(f"\n{result['date']}; {result['sae']}; {result['plm']}; {result['proteins']}; "
          f"{result['seconds']} s", file=sys.stderr)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
