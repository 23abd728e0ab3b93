"""ProtSAE vs TopK SAE on the stand-in PLM: same hook, same data, same training budget (issue #4).

    python bench/protsae_vs_topk.py prepare      # splits, FASTAs, CB513 labels, activation caches (once)
    python bench/protsae_vs_topk.py train        # TopK, ProtSAE and the METHOD.md §1.9(d) ablations
    python bench/protsae_vs_topk.py calibrate    # annotation thresholds for ProtSAEs trained before calibration
    python bench/protsae_vs_topk.py eval         # protsae_cli.evaluate.pipeline on the cached valid/test activations
    python bench/protsae_vs_topk.py report       # tables (Markdown) from the eval JSON
    python bench/protsae_vs_topk.py ceiling      # converged linear probes per concept (a defined latent's ceiling)
    python bench/protsae_vs_topk.py ship         # install the ProtSAE as protsae_cli/models/default_sae with its model card
    python bench/protsae_vs_topk.py all          # prepare, train, eval, report

The budget (defaults): d_sae 4096, k 32, 400 Adam steps of 2,048 residues (~2 epochs), lr 2e-3 with cosine
decay, seed 0, the same for every variant; ~7-8 min per ProtSAE run on a shared 2-core CPU.

Everything derived from the data folder (--data DIR or $PROTSAE_SHARED_DATA, laid out as docs/METHOD.md §4 says:
FASTAs, label TSVs, activation caches, checkpoints, results) goes to
--work (default /tmp/protsae_vs_topk), never into the repository: CB513 has no licence and must only be read
at run time. Residue-level concepts:

- TMbed (cv/cv_0N_a.fasta, 3-line files): transmembrane helix, transmembrane beta strand, signal peptide,
  cytoplasmic side ("1", inside), extracellular or lumenal side ("2", outside); "U" residues are masked.
  Only splits 0-3 are present (split 4 is withheld), so: cv 0-1 train, cv 2 valid, cv 3 test. Each split
  keeps every protein with a TM or signal-peptide label and a seeded sample of the globular rest (which is
  ~80 % of TMbed and all "inside"), so the annotated concepts are not drowned by one label.
- bindPredict development set: metal, nucleic-acid and small-molecule binding residues; ids_split1-3 train,
  split 4 valid, split 5 test. A bindPredict protein absent from one class file is a negative for that class.
- CB513 (DSSP3 H -> helix, E -> beta strand): evaluation only, never trained on; proteins split half/half
  into valid (selection) and test (report) by a seeded permutation.

Proteins whose exact sequence occurs in the training set are dropped from valid/test/CB513, and proteins
longer than --max-len are skipped (no cropping, so labels and activations always cover the whole protein).
Activations (resid_post@4 of the stand-in PLM, every residue) are collected once and every training run and
evaluation reads the caches.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench.protsae_vs_topk")

HOOK_POINT, LAYER = "resid_post", 4
TMBED_SPLITS = {"train": (0, 1), "valid": (2,), "test": (3,)}
BIND_SPLITS = {"train": (1, 2, 3), "valid": (4,), "test": (5,)}
BIND_CLASSES = ("metal", "nuclear", "small")


# ============================================================================================ data preparation
def _read_tmbed(path: Path) -> list[tuple[str, str, str]]:
    """(id, sequence, labels) of a TMbed 3-line file; the id is the header's first `|` field."""
    lines = [l.strip() for l in path.read_text().splitlines() if l.strip()]
    out = []
    for i in range(0, len(lines), 3):
        out.append((lines[i][1:].split("|", 1)[0].strip(), lines[i + 1], lines[i + 2]))
    return out


def _read_fasta_dict(path: Path) -> dict[str, str]:
    from protsae_cli.io.fasta import ProteinRecord, read_fasta

    return {r.id: r.sequence for r in read_fasta(str(path), skip_invalid=True) if isinstance(r, ProteinRecord)}


def _write_fasta(path: Path, records: list[tuple[str, str, str]]) -> None:
    with open(path, "w") as fh:
        for pid, seq, desc in records:
            fh.write(f">{pid} {desc}\n")
            for s in range(0, len(seq), 80):
                fh.write(seq[s:s + 80] + "\n")


def prepare(args: argparse.Namespace) -> None:
    """Splits by protein, FASTAs, CB513 labels as a generic TSV, and the activation caches."""
    from protsae_cli.train.activations import collect_activations
    from protsae_cli.plm.esm_forward import EsmRunner, HookPoint
    from protsae_cli.plm.loading import load_plm

    data, work = Path(args.data), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    sets: dict[str, list[tuple[str, str, str]]] = {"train": [], "valid": [], "test": []}
    stats: dict[str, dict] = {}
    # TMbed: every TM / signal-peptide protein, a seeded sample of the globular ones.
    for split, cvs in TMBED_SPLITS.items():
        for cv in cvs:
            recs = [r for r in _read_tmbed(data / "tmbed" / "cv" / f"cv_{cv:02d}_a.fasta") if len(r[1]) <= args.max_len]
            special = [r for r in recs if set(r[2]) & set("HhBbS")]
            glob = [r for r in recs if not set(r[2]) & set("HhBbS")]
            pick = rng.choice(len(glob), min(args.globular_per_split, len(glob)), replace=False)
            chosen = special + [glob[i] for i in sorted(pick)]
            sets[split] += [(pid, seq, f"tmbed cv_{cv:02d}") for pid, seq, _ in chosen]
            stats[f"tmbed_cv{cv}"] = {"split": split, "tm_or_sp": len(special), "globular": len(pick)}
    # bindPredict development set.
    bp = _read_fasta_dict(data / "bindpredict" / "development_set" / "all.fasta")
    tm_ids = {pid for recs in sets.values() for pid, _, _ in recs}
    for split, parts in BIND_SPLITS.items():
        for part in parts:
            ids = (data / "bindpredict" / "development_set" / f"ids_split{part}.txt").read_text().split()
            keep = [i for i in ids if i in bp and len(bp[i]) <= args.max_len and i not in tm_ids]
            sets[split] += [(i, bp[i], f"bindpredict split{part}") for i in keep]
            stats[f"bindpredict_split{part}"] = {"split": split, "proteins": len(keep)}
    # CB513: evaluation only.
    cb = []
    with open(data / "cb513" / "CB513.csv") as fh:
        for n, row in enumerate(csv.DictReader(fh)):
            seq, ss = row["input"].strip(), row["dssp3"].strip()
            if len(seq) <= args.max_len and len(seq) == len(ss):
                cb.append((f"cb513_{n:04d}", seq, ss))
    # No training sequence may reappear in evaluation.
    train_seqs = {seq for _, seq, _ in sets["train"]}
    dropped = {}
    for split in ("valid", "test"):
        before = len(sets[split])
        sets[split] = [r for r in sets[split] if r[1] not in train_seqs]
        dropped[split] = before - len(sets[split])
    before = len(cb)
    cb = [r for r in cb if r[1] not in train_seqs]
    dropped["cb513"] = before - len(cb)
    perm = rng.permutation(len(cb))
    cb_valid = {cb[i][0] for i in perm[: len(cb) // 2]}
    for split, recs in sets.items():
        ids = [r[0] for r in recs]
        if len(set(ids)) != len(ids):
            raise SystemExit(f"duplicate protein ids in the {split} set")
        _write_fasta(work / f"{split}.fasta", recs)
    _write_fasta(work / "cb513.fasta", [(pid, seq, "cb513 " + ("valid" if pid in cb_valid else "test"))
                                        for pid, seq, _ in cb])
    with open(work / "cb513_ss.tsv", "w") as fh:
        fh.write("#id\tstart\tend\tconcept\tname\n")
        for pid, seq, ss in cb:
            for letter, concept, name in (("H", "PSC:0000401", "helix"), ("E", "PSC:0000402", "beta strand")):
                start = None
                for i, c in enumerate(ss + "-"):
                    if c == letter and start is None:
                        start = i
                    elif c != letter and start is not None:
                        fh.write(f"{pid}\t{start + 1}\t{i}\t{concept}\t{name}\n")
                        start = None
    (work / "valid_ids.txt").write_text("\n".join([r[0] for r in sets["valid"]] + sorted(cb_valid)) + "\n")
    (work / "test_ids.txt").write_text("\n".join([r[0] for r in sets["test"]] +
                                                 sorted({r[0] for r in cb} - cb_valid)) + "\n")
    plm = load_plm(None)
    runner = EsmRunner(plm, "cpu")
    hook = HookPoint(HOOK_POINT, LAYER)
    timings = {}
    for name in ("train", "valid", "test", "cb513"):
        recs = [(pid, seq) for pid, seq in _read_fasta_dict(work / f"{name}.fasta").items()]
        t0 = time.perf_counter()
        acts = collect_activations(runner, hook, recs, tokens_per_protein=None, max_residues=args.max_len,
                                   toks_per_batch=args.toks_per_batch, seed=args.seed)
        acts.meta["fasta"] = str(work / f"{name}.fasta")
        acts.save(work / "cache" / name)
        timings[name] = {"proteins": len(recs), "tokens": len(acts), "seconds": time.perf_counter() - t0}
        log.info("cached %s: %d proteins, %d tokens in %.0f s", name, len(recs), len(acts), timings[name]["seconds"])
    manifest = {"data": str(data), "seed": args.seed, "max_len": args.max_len,
                "globular_per_split": args.globular_per_split, "sources": stats, "dropped_as_train_duplicates": dropped,
                "sets": {k: len(v) for k, v in sets.items()}, "cb513": {"valid": len(cb_valid),
                                                                       "test": len(cb) - len(cb_valid)},
                "plm": plm.name, "plm_sha256": plm.sha256, "hook": f"{HOOK_POINT}@{LAYER}", "caching": timings}
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps(manifest, indent=2))


# ================================================================================================ training
# The comparison and METHOD.md §1.9(d)'s ablations; every ProtSAE variant changes one switch of the full model.
# The full model is `train_protsae.RESIDUE_RECIPE`, what `protsae train` uses for residue-level concepts:
# - defined_bias "calibrated": z_def = exp(r) (W x~ - theta), zero below a cut fitted to validation F1 at every
#   validation (between METHOD.md §1.10's "none", a graded score positive wherever W x~ > 0, and the paper's
#   b_pred, positive only where p > 0.5, which rare concepts never reach);
# - topk_scope "defined_first": a called concept is admitted to TopK before any free latent (L0 <= k);
# - predictor_lr 3e-2: the predictor, a logistic regression under the stop-gradient, at its own peak lr.
FULL = {"defined_bias": "calibrated", "topk_scope": "defined_first", "predictor_lr": 3e-2}
# The full model of the first comparison (kept to reproduce the earlier tables): METHOD.md §1.10's defaults.
V1 = {"defined_bias": "none", "topk_scope": "all", "predictor_lr": None}
VARIANTS: dict[str, dict] = {
    "topk": {"arch": "topk"},
    "protsae": {"arch": "protsae", "protsae": dict(FULL)},
    "protsae_no_detach": {"arch": "protsae", "protsae": {**FULL, "detach": False}},
    "protsae_no_axiom": {"arch": "protsae", "protsae": {**FULL, "use_axiom": False}},
    "protsae_no_zbias": {"arch": "protsae", "protsae": {**FULL, "forced_activation": False}},
    "protsae_no_rpred": {"arch": "protsae", "protsae": {**FULL, "use_r_pred": False}},
    # One switch of the recipe at a time.
    "protsae_same_lr": {"arch": "protsae", "protsae": {**FULL, "predictor_lr": None}},
    "protsae_scope_all": {"arch": "protsae", "protsae": {**FULL, "topk_scope": "all"}},
    # The defined latent as the paper's formula reads: z_def = exp(r) (W x~ + b_pred), positive only where p > 0.5.
    "protsae_bias_pred": {"arch": "protsae", "protsae": {**FULL, "defined_bias": "pred"}},
    # Defined latents outside TopK (always reported) and TopK over the unknown latents with k - m slots, so L0
    # stays at most k.
    "protsae_scope_unknown": {"arch": "protsae", "k_minus_concepts": True,
                              "protsae": {**FULL, "topk_scope": "unknown"}},
    # The first comparison's full model (METHOD.md §1.10's defaults), and its own one-switch variants.
    "protsae_v1": {"arch": "protsae", "protsae": dict(V1)},
    "protsae_v1_bias_pred": {"arch": "protsae", "protsae": {**V1, "defined_bias": "pred"}},
}
# The annotation vocabulary itself (no propagated parents): TMbed topology and signal peptides, bindPredict classes.
CONCEPTS = ["PSC:0000101", "PSC:0000102", "PSC:0000120", "PSC:0000111", "PSC:0000112",
            "PSC:0000210", "PSC:0000240", "PSC:0000230"]


def _concat_sets(parts: list) -> "ActivationSet":
    """One ActivationSet over several caches: protein indices offset so each cache keeps its own proteins."""
    from protsae_cli.train.activations import ActivationSet

    acts, prot, pos, ids, seqs = [], [], [], [], []
    for a in parts:
        acts.append(a.acts)
        prot.append(a.protein + len(ids))
        pos.append(a.position)
        ids += list(a.protein_ids)
        seqs += list(a.sequences)
    return ActivationSet(torch.cat(acts), torch.cat(prot), torch.cat(pos), ids, seqs, dict(parts[0].meta))


def _label_sets(data: Path, sequences: dict[str, str], tmbed_cvs: tuple[int, ...], bind: bool = True):
    """(name, labels) per source, each source's files merged: a bindPredict protein missing from the metal list
    is a metal *negative* (the development set lists every protein's binding residues per class), which the
    library's one-source-per-file reading would turn into "not observed"."""
    from protsae_cli.labels.formats import load_annotations

    out = []
    tm = None
    for cv in tmbed_cvs:
        lab = load_annotations(data / "tmbed" / "cv" / f"cv_{cv:02d}_a.fasta", "tmbed", sequences=sequences,
                               unknown_ids="skip")
        tm = lab if tm is None else tm.merge(lab)
    out.append(("tmbed", tm))
    if bind:
        bp = None
        for cls in BIND_CLASSES:
            lab = load_annotations(data / "bindpredict" / "development_set" / f"binding_residues_2.5_{cls}.txt",
                                   "binding", sequences=sequences, unknown_ids="skip")
            bp = lab if bp is None else bp.merge(lab)
        out.append(("bindpredict", bp))
    return out


def train_config(args: argparse.Namespace):
    from protsae_cli.train.trainer import TrainConfig

    return TrainConfig(d_sae=args.d_sae, k=args.k, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                       max_steps=args.max_steps,
                       seed=args.seed, device="cpu", eval_every=args.eval_every, save_after=args.save_after,
                       state_every=None, log_every=10, eval_batch_size=8192)


def train(args: argparse.Namespace) -> None:
    """Every variant from the same cached activations, with the same TrainConfig (the budget)."""
    from protsae_cli.plm.loading import load_plm
    from protsae_cli.sae.checkpoint import save_sae
    from protsae_cli.sae.config import SAEConfig
    from protsae_cli.train.pipeline import model_card
    from protsae_cli.train.protsae import train_protsae
    from protsae_cli.train.topk import train_topk

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    train_set, sel_set, labels, nf, train_idx, sel_idx = _training_data(args)
    plm = load_plm(None)
    only = args.only.split(",") if args.only else list(VARIANTS)
    summary = {}
    for name in only:
        v = VARIANTS[name]
        k = args.k - len(CONCEPTS) if v.get("k_minus_concepts") else args.k
        cfg = SAEConfig(d_model=plm.d_model, d_sae=args.d_sae, k=k, hook_point=HOOK_POINT, layer=LAYER,
                        plm_name=plm.name, plm_sha256=plm.sha256, plm_num_layers=plm.num_layers, arch=v["arch"],
                        protsae=dict(v.get("protsae", {})))
        cfg.training.update({"command": "python " + shlex.join(["bench/protsae_vs_topk.py", *sys.argv[1:]]),
                             "variant": name, "fasta": str(work / "train.fasta"),
                             "n_train_proteins": len(train_idx), "n_val_proteins": len(sel_idx),
                             "tokens_per_protein": None, "activation_cache": str(work / "cache" / "train")})
        tc = train_config(args)
        t0 = time.perf_counter()
        log.info("training %s", name)
        if v["arch"] == "topk":
            sae, hist = train_topk(train_set, sel_set, cfg, tc)
        else:
            sae, hist = train_protsae(train_set, sel_set, labels, cfg, tc, normal_forms=nf)
        secs = time.perf_counter() - t0
        out = work / "saes" / name
        save_sae(sae, out, card=model_card(sae.cfg))
        (out / "history.json").write_text(json.dumps({k: hist[k] for k in ("history", "evals", "best", "metrics")},
                                                     indent=1, default=float))
        summary[name] = {"seconds": secs, "steps": hist["step"], "selected_step": sae.cfg.training["selected_step"],
                         "val": hist["metrics"].get("val")}
        log.info("%s: %d steps in %.0f s, selected step %s, val %s", name, hist["step"], secs,
                 summary[name]["selected_step"], summary[name]["val"])
    old = json.loads((work / "train_summary.json").read_text()) if (work / "train_summary.json").exists() else {}
    old.update(summary)
    (work / "train_summary.json").write_text(json.dumps(old, indent=1, default=float))


def _training_data(args: argparse.Namespace):
    """(train set, checkpoint-selection set, concept labels, normal forms, train / selection protein indices)."""
    from protsae_cli.train.activations import ActivationSet
    from protsae_cli.labels.formats import concept_ontology
    from protsae_cli.train.protsae import prepare_concepts

    data, work = Path(args.data), Path(args.work)
    tr, va = ActivationSet.load(work / "cache" / "train"), ActivationSet.load(work / "cache" / "valid")
    both = _concat_sets([tr, va])
    n_tr = len(tr.protein_ids)
    train_idx = list(range(n_tr))
    # Checkpoint selection on every third validation protein: enough tokens for a stable FVU / BCE, a third of
    # the cost at each of the evaluations.
    sel_idx = list(range(n_tr, len(both.protein_ids), 3))
    train_set, sel_set = both.subset_proteins(train_idx), both.subset_proteins(sel_idx)
    seqs = dict(zip(both.protein_ids, both.sequences))
    label_sets = _label_sets(data, seqs, TMBED_SPLITS["train"] + TMBED_SPLITS["valid"])
    labels, nf = prepare_concepts(label_sets, both.protein_ids, both.sequences, train_idx, [concept_ontology()],
                                  concepts=CONCEPTS, granularity="residue")
    return train_set, sel_set, labels, nf, train_idx, sel_idx


def calibrate(args: argparse.Namespace) -> None:
    """Annotation thresholds for ProtSAE checkpoints trained before `train_protsae` calibrated them: the same
    `calibrate_thresholds` call on the same checkpoint-selection proteins that training now makes at its end."""
    from protsae_cli.sae.checkpoint import load_sae, save_sae
    from protsae_cli.train.pipeline import model_card
    from protsae_cli.train.protsae import calibrate_thresholds

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    _, sel_set, labels, _, _, _ = _training_data(args)
    for name in (args.only.split(",") if args.only else list(VARIANTS)):
        d = work / "saes" / name
        if not d.exists() or VARIANTS[name]["arch"] != "protsae":
            continue
        sae, _ = load_sae(d)
        if "threshold_calibration" in sae.cfg.training:
            continue
        cal = calibrate_thresholds(sae, sel_set, labels, batch_size=8192)
        cal["applied_by"] = "python " + shlex.join(["bench/protsae_vs_topk.py", *sys.argv[1:]]) + " (after training)"
        sae.cfg.training["threshold_calibration"] = cal
        save_sae(sae, d, card=model_card(sae.cfg))
        log.info("%s: thresholds %s", name, {c: round(r["threshold"], 4) for c, r in cal["per_concept"].items()})


# ================================================================================================== evaluation
def evaluate(args: argparse.Namespace) -> None:
    """protsae_cli.evaluate.pipeline on the cached valid/test/CB513 activations, LM fidelity on sampled test proteins."""
    from protsae_cli.train.activations import ActivationSet
    from protsae_cli.plm.esm_forward import EsmRunner, HookPoint
    from protsae_cli.evaluate.pipeline import (AnnotationSpec, _jsonable, assign_splits, cached_activation_batches,
                                      evaluate_activations, lm_fidelity, load_label_sources, sae_summary,
                                      write_outputs)
    from protsae_cli.plm.loading import load_plm
    from protsae_cli.sae.checkpoint import load_sae

    torch.set_num_threads(args.threads)
    data, work = Path(args.data), Path(args.work)
    names = [n for n in (args.only.split(",") if args.only else list(VARIANTS)) if (work / "saes" / n).exists()]
    loaded = [load_sae(work / "saes" / n) for n in names]
    saes = [s for s, _ in loaded]
    parts = [ActivationSet.load(work / "cache" / n) for n in ("valid", "test", "cb513")]
    both = _concat_sets(parts)
    ids, seqs = both.protein_ids, both.sequences
    split, split_info = assign_splits(ids, (str(work / "valid_ids.txt"), str(work / "test_ids.txt")), 0.5,
                                      args.seed)
    tm = [str(data / "tmbed" / "cv" / f"cv_{cv:02d}_a.fasta") for cv in TMBED_SPLITS["valid"] + TMBED_SPLITS["test"]]
    bind = [str(data / "bindpredict" / "development_set" / f"binding_residues_2.5_{c}.txt") for c in BIND_CLASSES]
    specs = [AnnotationSpec(tm, "tmbed"), AnnotationSpec(bind, "binding"),
             AnnotationSpec([str(work / "cb513_ss.tsv")], "generic-tsv")]
    sources = load_label_sources(specs, dict(zip(ids, seqs)), None, propagate=False)
    sources[0].name, sources[1].name, sources[2].name = "TMbed", "bindPredict", "CB513"
    lengths = [len(s) for s in seqs]
    t0 = time.perf_counter()
    grid = tuple(float(t) for t in args.thresholds.split(","))
    main = evaluate_activations(saes, names, ids, lengths, cached_activation_batches(both), sources, split,
                                thresholds=grid, workdir=str(work))
    t_main = time.perf_counter() - t0
    mean_act = main.pop("mean_activation")
    plm = load_plm(None)
    runner = EsmRunner(plm, "cpu")
    fid, t_lm = None, 0.0
    if args.lm_proteins > 0:
        rng = np.random.default_rng(args.seed)
        test_pool = [i for i, pid in enumerate(ids) if split[i] == "test" and not pid.startswith("cb513_")]
        lm_idx = sorted(rng.choice(test_pool, min(args.lm_proteins, len(test_pool)), replace=False).tolist())
        lm_seqs = [seqs[i][:args.lm_max_len] for i in lm_idx]
        t0 = time.perf_counter()
        fid = lm_fidelity(runner, HookPoint(HOOK_POINT, LAYER), saes, names, lm_seqs, mean_act,
                          toks_per_batch=args.toks_per_batch, mask_fraction=0.15, seed=args.seed)
        fid.update(max_len=args.lm_max_len, attention=runner.attention,
                   proteins=f"{len(lm_seqs)} test proteins (TMbed + bindPredict) sampled with seed {args.seed}")
        t_lm = time.perf_counter() - t0
    result = {"format": "protsae-eval", "format_version": 1, "command": "python " + shlex.join(
        ["bench/protsae_vs_topk.py", *sys.argv[1:]]), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": "cpu", "plm": {"name": plm.name, "sha256": plm.sha256}, "hook": f"{HOOK_POINT}@{LAYER}",
        "data": {"fasta": "valid.fasta + test.fasta + cb513.fasta (activation caches)", "n_proteins": len(ids),
                 "n_invalid": 0, "n_cropped": 0, "max_residues": args.max_len, "n_tokens": int(sum(lengths)),
                 "split": split_info},
        "saes": [sae_summary(n, str(work / "saes" / n), sha, s) for n, (s, sha) in zip(names, loaded)],
        **main, **({"lm_fidelity": fid} if fid else {}), "timing_seconds": {"activations_pass": t_main, "lm_fidelity": t_lm}}
    result = _jsonable(result)
    tag = args.out_name
    write_outputs(result, str(work / f"{tag}.json"), str(work / f"{tag}.md"), str(work / f"{tag}_plots"))
    log.info("eval written to %s (%.0f s concepts/reconstruction, %.0f s LM)", work / f"{tag}.json", t_main, t_lm)


# ====================================================================================================== report
def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _f(v, d: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def source_summary(rows: list[dict], sources: tuple[str, ...]) -> dict:
    ev = [r for r in rows if r["evaluable"] and r["source"] in sources]
    f1 = [r["test_f1"] for r in ev]
    bound = [r for r in ev if r["defined_latent"] is not None]
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"n": len(ev), "mean_best_test_f1": mean(f1), "coverage": sum(f > 0.5 for f in f1),
            "top10_mean_f1": mean([r["top10_mean_f1"] for r in ev]),
            "defined_test_f1": mean([r["defined_test_f1"] for r in bound]) if bound else None,
            "pi_test_f1": mean([r["pi_test_f1"] for r in bound if r["pi_test_f1"] is not None]) if bound else None,
            "participation": mean([r["participation_predicted"] for r in bound
                                   if r["participation_predicted"] is not None]) if bound else None}


def report(args: argparse.Namespace) -> None:
    """Markdown tables from eval.json (pasted into docs/RESULTS.md with the commentary)."""
    work = Path(args.work)
    res = json.loads((work / f"{args.out_name}.json").read_text())
    man = json.loads((work / "manifest.json").read_text())
    tsum = json.loads((work / "train_summary.json").read_text())
    names = [s["name"] for s in res["saes"]]
    con, fid = res["concepts"]["per_sae"], res["lm_fidelity"]
    trained = ("TMbed", "bindPredict")
    L = [f"commit {_git_commit()}, {time.strftime('%Y-%m-%d')}, {platform.node()} "
         f"({os.cpu_count()} CPUs visible, {platform.processor() or platform.machine()})", "",
         "| SAE | train s (steps, selected) | FVE | L0 | dead | LR zero (unmasked) | LR mean (unmasked) | "
         "LR zero (masked) | KL score | argmax agr. | mean best test F1 (8 trained concepts) | coverage | "
         "CB513 best F1 (2, eval only) | defined-latent F1 | pi F1 | participation |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = {}
    for n in names:
        rec = res["reconstruction"][n]
        u, m = fid["unmasked"]["per_sae"][n], fid["masked"]["per_sae"][n]
        s_tr = source_summary(con[n]["per_concept"], trained)
        s_cb = source_summary(con[n]["per_concept"], ("CB513",))
        t = tsum.get(n, {})
        s_all = source_summary(con[n]["per_concept"], trained + ("CB513",))
        rows[n] = {"fve": rec["fve"], "lr": u["loss_recovered_zero"]["unclipped"], "f1": s_tr["mean_best_test_f1"],
                   "f1_all": s_all["mean_best_test_f1"], "lr_masked": m["loss_recovered_zero"]["unclipped"]}
        L.append(f"| {n} | {t.get('seconds', 0):.0f} ({t.get('steps')}, {t.get('selected_step')}) | {_f(rec['fve'])} | "
                 f"{_f(rec['l0_mean'], 1)} | {rec['dead']['count']} | {_f(u['loss_recovered_zero']['unclipped'], 1)} | "
                 f"{_f(u['loss_recovered_mean']['unclipped'], 1)} | {_f(m['loss_recovered_zero']['unclipped'], 1)} | "
                 f"{_f(u['kl_score_zero'])} | {_f(u['argmax_agreement'])} | {_f(s_tr['mean_best_test_f1'])} | "
                 f"{s_tr['coverage']}/{s_tr['n']} | {_f(s_cb['mean_best_test_f1'])} | {_f(s_tr['defined_test_f1'])} | "
                 f"{_f(s_tr['pi_test_f1'])} | {_f(s_tr['participation'])} |")
    u = fid["unmasked"]
    L += ["", f"CE (nats) on {fid['n_proteins']} test proteins ≤ {fid['max_len']} residues: unmasked original "
          f"{u['ce_orig']:.3f}, mean-ablation {u['ce_mean']:.3f}, zero-ablation {u['ce_zero']:.3f}; masked "
          f"original {fid['masked']['ce_orig']:.3f}, zero-ablation {fid['masked']['ce_zero']:.3f}. Identity splice "
          f"max |Δlogit| {fid['identity_splice']['max_abs_logit_diff']}.", ""]
    if "topk" in rows and "protsae" in rows:
        a, b = rows["protsae"], rows["topk"]
        L += [f"Targets (ProtSAE vs TopK): mean best test F1 ratio {a['f1_all'] / b['f1_all']:.2f} over all "
              f"{s_all['n']} evaluated concepts ({a['f1'] / b['f1']:.2f} over the {s_tr['n']} with training labels; "
              f"target ≥ 1.30); FVE difference {a['fve'] - b['fve']:+.4f} (target within ±0.02); masked-LM loss "
              f"recovered difference {a['lr_masked'] - b['lr_masked']:+.1f} points, unmasked {a['lr'] - b['lr']:+.1f} "
              "(target within ±2).", ""]
    L += ["Per concept (test F1 of the latent chosen on validation; ProtSAE: defined latent after the slash):", "",
          "| source | concept | test residues (+) | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    npos = {(s["name"], c["id"]): c["test_positives"] for s in res["concepts"]["sources"] for c in s["concepts"]}
    keyed = {n: {(r["source"], r["concept"]): r for r in con[n]["per_concept"]} for n in names}
    for key, r0 in keyed[names[0]].items():
        cells = []
        for n in names:
            r = keyed[n][key]
            c = _f(r["test_f1"])
            if r["defined_latent"] is not None:
                c += f" / {_f(r['defined_test_f1'])}"
            cells.append(c)
        L.append(f"| {key[0]} | {r0['name']} | {npos.get(key)} | " + " | ".join(cells) + " |")
    L += ["", "Data: " + json.dumps(man["sets"]) + f", CB513 {man['cb513']}; dropped as exact duplicates of training "
          f"sequences: {man['dropped_as_train_duplicates']}. Activation caching: " +
          ", ".join(f"{k} {v['tokens']} tokens in {v['seconds']:.0f} s" for k, v in man["caching"].items()) + ".",
          f"Evaluation: {res['timing_seconds']['activations_pass']:.0f} s for the cached pass (all SAEs), "
          f"{res['timing_seconds']['lm_fidelity']:.0f} s for LM fidelity."]
    text = "\n".join(L) + "\n"
    (work / f"{args.out_name}_report.md").write_text(text)
    print(text)


# ===================================================================================================== ceiling
def probe_splits(data: Path, work: Path) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """[(activations [N, d] float32, concept labels [N, 8] with NaN unobserved)] for the train, valid and test
    caches, and the concept names: what a probe trained beside the SAEs sees (`ceiling`,
    `bench/predictor_lr_sweep.py`)."""
    from protsae_cli.train.activations import ActivationSet
    from protsae_cli.labels.concept_labels import build_concept_labels

    sets = [ActivationSet.load(work / "cache" / n) for n in ("train", "valid", "test")]
    both = _concat_sets(sets)
    seqs = dict(zip(both.protein_ids, both.sequences))
    lab = build_concept_labels(_label_sets(data, seqs, TMBED_SPLITS["train"] + TMBED_SPLITS["valid"]
                                           + TMBED_SPLITS["test"]), both.protein_ids, both.sequences, CONCEPTS)
    out, lo = [], 0
    for part in sets:
        m = (both.protein >= lo) & (both.protein < lo + len(part.protein_ids))
        out.append((both.acts[m].float(), lab.rows(both.protein[m], both.position[m])))
        lo += len(part.protein_ids)
    return out, [lab.names[j] for j in range(len(CONCEPTS))]


def ceiling(args: argparse.Namespace) -> None:
    """What a converged linear probe on the same activations reaches per concept: the ceiling of a defined latent
    (whose predictor is a linear probe trained for only the SAE's few hundred steps) at p > 0.5, and with a
    threshold chosen on validation proteins. Same splits, same labels; logistic regression, L-BFGS, tiny L2."""
    torch.set_num_threads(args.threads)
    [(xtr, ytr), (xva, yva), (xte, yte)], names = probe_splits(Path(args.data), Path(args.work))
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xva, xte = ((x - mu) / sd for x in (xtr, xva, xte))

    def f1(pred: torch.Tensor, y: torch.Tensor) -> float:
        ok = ~torch.isnan(y)
        p, t = pred[ok], y[ok] > 0
        tp = int((p & t).sum())
        den = int(p.sum()) + int(t.sum())
        return 2 * tp / den if den else 0.0

    out = {}
    grid = np.linspace(0.02, 0.98, 49)
    for j, c in enumerate(CONCEPTS):
        ok = ~torch.isnan(ytr[:, j])
        X, y = xtr[ok], ytr[ok, j]
        w = torch.zeros(X.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y) + 1e-4 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            pv, pt = torch.sigmoid(xva @ w + b), torch.sigmoid(xte @ w + b)
        g = float(grid[int(np.argmax([f1(pv > t, yva[:, j]) for t in grid]))])
        out[c] = {"name": names[j], "test_f1_at_0.5": f1(pt > 0.5, yte[:, j]), "valid_threshold": g,
                  "test_f1_at_valid_threshold": f1(pt > g, yte[:, j])}
        log.info("%s %s: %s", c, names[j], out[c])
    (Path(args.work) / "ceiling.json").write_text(json.dumps(out, indent=1))


# ======================================================================================================== ship
def ship(args: argparse.Namespace) -> None:
    """Install the chosen variant as protsae_cli/models/default_sae with a model card built from the measured evaluation."""
    from protsae_cli.sae.checkpoint import load_sae, save_sae

    work = Path(args.work)
    name = args.ship
    res = json.loads((work / f"{args.out_name}.json").read_text())
    man = json.loads((work / "manifest.json").read_text())
    sae, _ = load_sae(work / "saes" / name)
    t = sae.cfg.training
    # Provenance that points into a scratch directory is replaced by what it was.
    t["activation_cache"] = f"stand-in PLM {HOOK_POINT}@{LAYER}, every residue of the training proteins"
    t["fasta"] = "TMbed cv_00+cv_01 (all TM / signal-peptide proteins + 150 globular each) + bindPredict splits 1-3"
    t["eval"] = {"json_format": "protsae-eval v1", "command": res["command"], "commit": _git_commit()}
    # Annotation thresholds: calibrated by train_protsae on the checkpoint-selection proteins (a third of the
    # validation split), recorded in training["threshold_calibration"]; none may be left uncalibrated.
    cal = t.get("threshold_calibration", {}).get("per_concept", {})
    missing = [e.concept_id for e in sae.cfg.concepts if cal.get(e.concept_id, {}).get("valid_f1") is None]
    if missing:
        raise SystemExit(f"{name}: no calibrated annotation threshold for {', '.join(missing)}; retrain it")
    card = model_card_text(name, sae, res, man)
    dest = REPO / "protsae_cli" / "models" / "default_sae"
    save_sae(sae, dest, card=card)
    log.info("installed %s as %s", name, dest)


def model_card_text(name: str, sae, res: dict, man: dict) -> str:
    cfg, t = sae.cfg, sae.cfg.training
    rec = res["reconstruction"][name]
    con = res["concepts"]["per_sae"][name]
    fid = res.get("lm_fidelity")
    rows = {(r["source"], r["concept"]): r for r in con["per_concept"]}
    tc = t.get("train_config", {})
    L = [f"# Default SAE: ProtSAE on the stand-in PLM ({cfg.plm_name}, {cfg.hook_point}@{cfg.layer})", "",
         "**A demonstration model.** It was trained on a small stand-in protein language model (ESM-2 8M shape, "
         "trained from scratch by the protsae team; see `protsae_cli/models/standin_plm`), not on ESM-2. It exists so that "
         "`protsae annotate proteins.fasta -o out/run` works offline with no flags and calls concepts with real "
         "names; its calls are weak evidence. For real work, train an SAE on a real ESM-2 "
         "(`protsae train --model esm2_t33_650M_UR50D --arch protsae --annotations ...`).", "",
         "## What it is", "",
         f"- A ProtSAE (semantically guided TopK SAE): d_model {cfg.d_model}, {cfg.d_sae} latents, k = {cfg.k}. "
         f"Latents 0-{len(cfg.concepts) - 1} are *defined* latents bound to the concepts below ("
         + {"pred": "the latent is positive exactly when the built-in concept predictor says p > 0.5 and it "
                    "survives TopK",
            "calibrated": "the latent is exp(r) (W_pred x - theta): zero below its cut theta, fitted to the best "
                          "validation F1 during training, and graded above it"
                          + (", and admitted to the code before any unsupervised latent"
                             if cfg.protsae.get("topk_scope") == "defined_first" else "")}.get(
             cfg.protsae.get("defined_bias"), "the latent is a graded concept score, exp(r) W_pred x, called above "
                                              "the threshold listed below when it survives TopK")
         + f"); the other {cfg.d_sae - len(cfg.concepts)} latents are unsupervised, as in a TopK SAE.",
         f"- Hook: {cfg.hook_point}@{cfg.layer} (output of transformer block {cfg.layer} of 6); PLM sha256 "
         f"{cfg.plm_sha256}.",
         f"- Options: {json.dumps({k: v for k, v in cfg.protsae.items() if k in ('lambda_annot', 'lambda_axiom', 'topk_scope', 'bias_ref', 'defined_bias', 'predictor_lr', 'detach', 'forced_activation', 'use_r_pred', 'use_axiom')})}.",
         "- Concept ids are from the shipped residue concept ontology `protsae_cli/models/residue_concepts.obo` (PSC), with "
         "their GO / SO cross-references there.", "",
         "Annotate threshold: the activation at or above which `protsae annotate` calls the concept, calibrated "
         "by `train_protsae.calibrate_thresholds` (what `protsae train` runs at its end"
         + (f"; here applied after training by `{t['threshold_calibration']['applied_by'].split(' (')[0]}`"
            if t.get("threshold_calibration", {}).get("applied_by") else "")
         + ") to the best residue F1 on the checkpoint-selection validation proteins (that F1 in the next "
         "column). Test "
         "F1: the defined latent at the threshold the InterPLM protocol picks on validation proteins, and the "
         "built-in predictor at p > 0.5, on held-out test proteins.", "",
         "| latent | concept | id | ontology id | annotate threshold | validation F1 at it | "
         "test F1 (defined latent) | test F1 (predictor p > 0.5) |", "|---|---|---|---|---|---|---|---|"]
    cal = t.get("threshold_calibration", {}).get("per_concept", {})
    for e in cfg.concepts:
        r = next((v for (src, c), v in rows.items() if c == e.concept_id), None)
        L.append(f"| {e.latent} | {e.name} | {e.concept_id} | {e.ontology_id or '–'} | {e.threshold:.3g} | "
                 f"{_f(cal.get(e.concept_id, {}).get('valid_f1'))} | "
                 f"{_f(r['defined_test_f1']) if r else '–'} | {_f(r['pi_test_f1']) if r else '–'} |")
    L += ["", "## Data", "",
          "- TMbed (Apache-2.0) cross-validation splits 0-1 for training (every protein with a transmembrane or "
          "signal-peptide label, plus 150 sampled globular proteins per split), split 2 for validation, split 3 "
          "for test: transmembrane helix, transmembrane beta strand, signal peptide, cytoplasmic side (TMbed "
          "'inside', which TMbed also uses for every residue of a soluble protein), extracellular or lumenal side.",
          "- bindPredict development set (MIT): splits 1-3 training, 4 validation, 5 test: metal, nucleic-acid and "
          "small-molecule binding residues.",
          f"- {man['sets']['train']} training proteins, {t.get('train_tokens')} training residues (every residue "
          "of each protein, activations collected once).", "",
          "## Training", "",
          f"- `{t.get('command')}` (repository `bench/protsae_vs_topk.py`; `--work` is a scratch directory "
          f"holding the activation caches), evaluation commit {t['eval']['commit']}.",
          f"- {t.get('steps')} steps of {tc.get('batch_size')} residues, Adam lr {tc.get('lr')} with cosine "
          f"decay" + (f" (concept predictor {cfg.protsae['predictor_lr']})" if cfg.protsae.get("predictor_lr")
                      else "") + f", seed {tc.get('seed')}; checkpoint from step {t.get('selected_step')} (smallest validation "
          f"concept BCE among the last 40 % of the run); {t.get('seconds', 0):.0f} s on a shared 2-core CPU.", "",
          "## Measured quality (held-out proteins; `protsae eval`, see docs/RESULTS.md)", "",
          f"- Reconstruction over {rec['n_tokens']} validation + test + CB513 residues: FVE {rec['fve']:.3f}, "
          f"L0 {rec['l0_mean']:.1f}, dead latents {rec['dead']['count']} of {rec['d_sae']}, dense "
          f"{rec['dense']['count']}."]
    if fid:
        u, m = fid["unmasked"], fid["masked"]
        L.append(f"- Spliced into the PLM ({fid['n_proteins']} test proteins): CE {u['per_sae'][name]['ce']:.3f} vs "
                 f"{u['ce_orig']:.3f} original and {u['ce_zero']:.3f} zero-ablated, loss recovered "
                 f"{u['per_sae'][name]['loss_recovered_zero']['unclipped']:.1f} %; masked-LM loss recovered "
                 f"{m['per_sae'][name]['loss_recovered_zero']['unclipped']:.1f} %.")
    summ = source_summary(con["per_concept"], ("TMbed", "bindPredict"))
    L += [f"- Concepts (InterPLM protocol, best latent and threshold chosen on validation proteins, F1 on test "
          f"proteins): mean best F1 {_f(summ['mean_best_test_f1'])} over the {summ['n']} training concepts, "
          f"defined latents alone {_f(summ['defined_test_f1'])}.",
          "- Known weaknesses: " + (", ".join(f"{r['name']} (test F1 {_f(r['defined_test_f1'])})"
                                              for r in con["per_concept"] if r["defined_latent"] is not None
                                              and (r["defined_test_f1"] or 0) < 0.3) or "none below F1 0.3")
          + " are called with low precision or recall on this small model; 'cytoplasmic side' follows TMbed's "
          "convention and covers soluble proteins entirely.", ""]
    return "\n".join(L)


# ==================================================================================================== main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("prepare", "train", "calibrate", "eval", "report", "ceiling", "ship", "all"))
    p.add_argument("--data", default=os.environ.get("PROTSAE_SHARED_DATA"),
                   help="the data folder of docs/METHOD.md §4 (default $PROTSAE_SHARED_DATA)")
    p.add_argument("--work", default=os.environ.get("PROTSAE_BENCH_WORK", "/tmp/protsae_vs_topk"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=1000)
    p.add_argument("--globular-per-split", type=int, default=150)
    p.add_argument("--toks-per-batch", type=int, default=8192)
    p.add_argument("--only", default="", help="comma-separated variants (default: all)")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=80)
    p.add_argument("--save-after", type=float, default=0.6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lm-proteins", type=int, default=48)
    p.add_argument("--lm-max-len", type=int, default=400)
    p.add_argument("--thresholds", default="0,0.15,0.5,0.6,0.8",
                   help="eval: concept threshold grid on max-normalised activations (default: InterPLM's)")
    p.add_argument("--out-name", default="eval", help="eval/report file stem in --work")
    p.add_argument("--ship", default="protsae", help="variant installed as protsae_cli/models/default_sae by the ship stage")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    stages = ("prepare", "train", "eval", "report") if args.stage == "all" else (args.stage,)
    if args.data is None and set(stages) & {"prepare", "train", "calibrate", "eval", "ceiling"}:
        p.error("--data DIR or $PROTSAE_SHARED_DATA is needed: the data folder of docs/METHOD.md §4")
    run = {"prepare": prepare, "train": train, "calibrate": calibrate, "eval": evaluate, "report": report,
           "ceiling": ceiling, "ship": ship}
    for st in stages:
        run[st](args)


if __name__ == "__main__":
    main()
