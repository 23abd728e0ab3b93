"""`protsae train` orchestration: FASTA -> activations (collected, or cached in shards and loaded or streamed)
-> [concept labels] -> TopK SAE or ProtSAE -> selected checkpoint + training log + resumable state.

Proteins are split into train/validation by protein (never by residue), so validation metrics (and the
checkpoint chosen on them) are measured on proteins the SAE never saw.

Output directory::

    config.json, sae.safetensors, README.md   the selected checkpoint (best validation; `load_sae` reads it)
    last/                                     the final weights, when the selected checkpoint is earlier
    training_log.json                         options, per-validation metrics, per-log-step training means
    train_state.pt                            resumable state (--resume OUT), rewritten every --state-every steps
    .activations/                             activation cache of a DDP run without --activation-cache
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from protsae_cli import __version__
from protsae_cli.train.activations import (ActivationCache, ActivationSet, InMemoryRows, ShuffleBufferStream,
                                     collect_activations, write_activation_cache)
from protsae_cli.train.distributed import SINGLE, DistEnv, barrier, init_distributed, shutdown
from protsae_cli.errors import InputError
from protsae_cli.plm.esm_forward import EsmRunner, HookPoint
from protsae_cli.progress import Progress
from protsae_cli.sae.base import SAE
from protsae_cli.sae.checkpoint import build_sae, save_sae
from protsae_cli.sae.config import SAEConfig
from protsae_cli.train.options import ARCHS, TrainConfig, TrainOptions  # noqa: F401 (public here too)
from protsae_cli.train.trainer import STATE_NAME

log = logging.getLogger("protsae.train")





def read_proteins(fasta: str, max_proteins: int | None, seed: int) -> list[tuple[str, str]]:
    """Valid proteins of a FASTA (invalid ones are skipped with a warning), optionally a seeded subsample."""
    from protsae_cli.runtime import read_proteins as read_valid

    prots = [(r.id, r.sequence) for r in read_valid(fasta, skip_invalid=True).records]
    if max_proteins is not None and len(prots) > max_proteins:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(prots), max_proteins, replace=False))
        prots = [prots[i] for i in keep]
    return prots


def split_proteins(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    perm = rng.permutation(n)
    n_val = int(round(n * val_fraction)) if n > 1 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ----------------------------------------------------------------------------------------------- activations
def check_cache(cache: ActivationCache, runner: EsmRunner, hook: HookPoint, opts: TrainOptions) -> None:
    """Refuse a cache made with another PLM, hook or input; a wrong pairing would train on garbage silently."""
    m = cache.meta
    where = cache.dir
    if (m.get("plm_sha256"), m.get("hook_point"), m.get("layer")) != (runner.plm.sha256, hook.point, hook.layer):
        raise InputError(f"activation cache {where} was made with {m.get('plm')} {m.get('hook_point')}@"
                         f"{m.get('layer')}, not {runner.plm.name} {hook}; use another --activation-cache")
    if cache.d_model != runner.plm.d_model:
        raise InputError(f"activation cache {where} has width {cache.d_model}, the PLM {runner.plm.d_model}")
    tpp = m.get("tokens_per_protein")
    if tpp != opts.tokens_per_protein or m.get("seed") != opts.train.seed:
        log.warning("activation cache %s was sampled with tokens_per_protein=%s seed=%s; using it as it is "
                    "(this run asks for %s, seed %s)", where, tpp, m.get("seed"), opts.tokens_per_protein,
                    opts.train.seed)
    if opts.fasta and opts.fasta != "-":
        prots = read_proteins(opts.fasta, opts.max_proteins, opts.train.seed)
        if [p[0] for p in prots] != cache.protein_ids or [p[1] for p in prots] != cache.sequences:
            raise InputError(f"activation cache {where} holds {len(cache.protein_ids)} proteins of "
                             f"{m.get('fasta', 'another input')}, which differ from the {len(prots)} proteins of "
                             f"{opts.fasta} (max_proteins={opts.max_proteins}); use another --activation-cache")


def prepare_activations(opts: TrainOptions, runner: EsmRunner, hook: HookPoint,
                        env: DistEnv = SINGLE) -> ActivationSet | ActivationCache:
    """Collect activations, or reuse a compatible cache. Returns an in-memory set or an open cache.

    Under DDP the ranks collect disjoint proteins into one cache (the given --activation-cache, or
    OUTPUT/.activations) and then all read it; without a cache directory a single process collects in memory.
    """
    cache_dir = opts.activation_cache
    if cache_dir is None and (env.enabled or opts.cache_only):
        if opts.cache_only:
            raise InputError("--cache-only needs --activation-cache DIR")
        cache_dir = str(Path(opts.output) / ".activations")
    if cache_dir is not None and ActivationCache.exists(cache_dir):
        cache = ActivationCache.open(cache_dir)
        check_cache(cache, runner, hook, opts)
        log.info("using activation cache %s (%d rows, %d proteins)", cache_dir, len(cache), len(cache.protein_ids))
        return cache
    prots = read_proteins(opts.fasta, opts.max_proteins, opts.train.seed)
    total_res = sum(min(len(s), 1022) for _, s in prots)
    with Progress("collecting activations", total_res, unit="residues",
                  enabled=opts.progress and env.is_main) as adv:
        if cache_dir is None:
            acts = collect_activations(runner, hook, prots, tokens_per_protein=opts.tokens_per_protein,
                                       seed=opts.train.seed, progress=adv)
            acts.meta["fasta"] = str(opts.fasta)
            return acts
        write_activation_cache(runner, hook, prots, cache_dir, tokens_per_protein=opts.tokens_per_protein,
                               seed=opts.train.seed, rank=env.rank, world_size=env.world_size,
                               barrier=(lambda: barrier(env)) if env.enabled else None, progress=adv,
                               extra_meta={"fasta": str(opts.fasta), "max_proteins": opts.max_proteins})
    return ActivationCache.open(cache_dir)


def get_activations(opts: TrainOptions, runner: EsmRunner, hook: HookPoint) -> ActivationSet:
    """Everything in memory (collected, or the whole cache loaded)."""
    src = prepare_activations(opts, runner, hook)
    return src.load() if isinstance(src, ActivationCache) else src


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def _rows_per_protein(src: ActivationSet | ActivationCache) -> np.ndarray:
    n = len(src.protein_ids)
    if isinstance(src, ActivationSet):
        return np.bincount(src.protein.numpy(), minlength=n)
    counts = np.zeros(n, dtype=np.int64)
    for i in range(src.n_shards):
        counts += np.bincount(src.proteins_of_shard(i), minlength=n)
    return counts


def cap_validation(val_idx: np.ndarray, rows: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Whole validation proteins in a seeded order until `max_rows` rows: evaluation cost stays bounded and
    pooled (per-protein) metrics stay exact."""
    if rows[val_idx].sum() <= max_rows:
        return val_idx
    order = np.random.default_rng(seed + 2).permutation(val_idx)
    keep = order[np.cumsum(rows[order]) <= max_rows]
    return np.sort(keep if len(keep) else order[:1])


def split_data(opts: TrainOptions, src: ActivationSet | ActivationCache, env: DistEnv):
    """(training rows source, validation set, train protein indices, val protein indices)."""
    cfg = opts.train
    n = len(src.protein_ids)
    train_idx, val_idx = split_proteins(n, opts.val_fraction, cfg.seed)
    rows_per_protein = _rows_per_protein(src)
    val_idx = cap_validation(val_idx, rows_per_protein, opts.max_val_tokens, cfg.seed)
    fit_batch_to_data(opts, int(rows_per_protein[train_idx].sum()), len(train_idx), env)
    in_train = np.zeros(n, dtype=bool)
    in_train[train_idx] = True
    in_val = np.zeros(n, dtype=bool)
    in_val[val_idx] = True
    if isinstance(src, ActivationCache):
        stream = opts.stream
        if stream is None:
            stream = src.nbytes > _memory_bytes() // (4 * max(1, env.world_size))
        val = src.load(proteins=in_val) if len(val_idx) else None
        if stream:
            log.info("streaming %s through a %d-row shuffle buffer", src.dir, opts.shuffle_buffer)
            rows: ShuffleBufferStream | InMemoryRows = ShuffleBufferStream(src, in_train, cfg.batch_size, opts.shuffle_buffer, cfg.seed,
                                       env.rank, env.world_size)
            return rows, val, train_idx, val_idx
        src = src.load()
    elif opts.stream:
        raise InputError("--stream needs --activation-cache (a cache on disk to stream from)")
    rows = InMemoryRows(src.subset_proteins(train_idx), cfg.batch_size, cfg.seed, env.rank, env.world_size)
    val = src.subset_proteins(val_idx) if len(val_idx) else None
    return rows, val, train_idx, val_idx


def fit_batch_to_data(opts: TrainOptions, n_rows: int, n_proteins: int, env: DistEnv = SINGLE) -> None:
    """A batch no larger than the training rows, decided before anything is written.

    Why: the default batch (4096 tokens) needs more residues than a small FASTA has (the bundled 20 proteins
    give ~1,200 at 64 per protein), and a run with zero steps per epoch cannot train. Without an explicit
    --batch-size the batch is lowered to what the data holds (a multiple of the process count), and a log
    line says so; an explicit --batch-size that does not fit is an error naming the options that change it.
    """
    cfg = opts.train
    if n_rows >= cfg.batch_size:
        return
    fitted = n_rows - n_rows % env.world_size
    more = ("--tokens-per-protein 0 (every residue), " if opts.tokens_per_protein else "") + "more proteins"
    if not opts.auto_batch or fitted < env.world_size:
        raise InputError(f"{opts.fasta}: only {n_rows} training tokens ({n_proteins} proteins) for batch size "
                         f"{cfg.batch_size}; lower --batch-size to at most {max(fitted, 1)}, or give {more}")
    log.info("only %d training tokens (%d proteins): batch size lowered from %d to %d; set --batch-size to "
             "choose it, or give %s", n_rows, n_proteins, cfg.batch_size, fitted, more)
    cfg.batch_size = fitted


# ----------------------------------------------------------------------------------------------- progress
def _train_progress(adv: Progress):
    """The trainer's (step, total, metrics) callback as progress: one step each, the latest losses as info."""
    def cb(step: int, total: int, metrics: dict) -> None:
        info = None
        if metrics:
            keys = [k for k in ("loss", "fvu", "nmse", "l_annot") if k in metrics]
            info = " ".join(f"{k} {metrics[k]:.4g}" for k in keys)
        if adv.done == 0 and step > 1:  # resumed: the steps before it are not this run's rate
            adv.start_at(step - 1)
        adv.advance(step - adv.done, total=total, info=info)
    return cb


# ----------------------------------------------------------------------------------------------- the command
def _load_ontologies(paths: list[str]):
    from protsae_cli.labels.sources import load_ontologies

    return load_ontologies(paths)


def train_sae(opts: TrainOptions) -> Path:
    """Train an SAE as the options say and save it to opts.output; returns the directory.

    Under torchrun (WORLD_SIZE/RANK set) this is one rank of a DDP job: see `protsae_cli.train.distributed`.
    """
    if opts.arch not in ARCHS:
        raise InputError(f"unknown --arch {opts.arch!r}; expected one of {', '.join(ARCHS)}")
    if opts.arch == "protsae" and not opts.annotations and not opts.cache_only:
        raise InputError("--arch protsae needs concept labels: --annotations FILE [--annotation-format F]")
    if opts.arch == "topk" and opts.annotations:
        raise InputError("--annotations is for --arch protsae (a TopK SAE trains without labels)")
    env, device = init_distributed(opts.device, require=opts.ddp)
    if not env.is_main:
        logging.getLogger("protsae").setLevel(logging.WARNING)
    try:
        return _train(opts, env, device)
    finally:
        shutdown(env)


def _train(opts: TrainOptions, env: DistEnv, device: torch.device) -> Path:
    from protsae_cli.plm.loading import load_plm

    opts.train.device = str(device)
    out_dir = Path(opts.output)
    if env.is_main and not opts.cache_only:
        from protsae_cli.io.atomic import check_output_dir

        check_output_dir(opts.output)  # created by its first complete file, not now
    plm = load_plm(opts.model, device)
    hook = HookPoint(opts.hook, opts.layer)
    runner = EsmRunner(plm, device)
    runner.check_hook(hook)
    src = prepare_activations(opts, runner, hook, env)
    if opts.cache_only:
        assert opts.activation_cache is not None  # prepare_activations refuses --cache-only without it
        log.info("activation cache written to %s", opts.activation_cache)
        return Path(opts.activation_cache)
    cfg = SAEConfig(d_model=plm.d_model, d_sae=opts.d_sae, k=opts.k, hook_point=hook.point, layer=hook.layer,
                    plm_name=plm.name, plm_sha256=plm.sha256, plm_num_layers=plm.num_layers, arch=opts.arch,
                    plm_weights_sha256=plm.weights_sha256,  # lets another file of the same weights pair with it
                    protsae=dict(opts.protsae) if opts.arch == "protsae" else {})
    del runner, plm  # the PLM is not needed for training; give its memory back
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows, val, train_idx, val_idx = split_data(opts, src, env)
    cfg.training.update({"command": opts.command, "protsae_version": __version__, "fasta": str(opts.fasta),
                         "n_proteins": len(src.protein_ids), "n_train_proteins": len(train_idx),
                         "n_val_proteins": len(val_idx), "tokens_per_protein": opts.tokens_per_protein,
                         "activation_cache": opts.activation_cache})
    resume = opts.resume
    if resume is not None and Path(resume).is_dir() and not (Path(resume) / STATE_NAME).exists():
        raise InputError(f"--resume {resume}: no {STATE_NAME} there")
    with Progress("training", opts.train.max_steps, unit="steps", enabled=opts.progress and env.is_main) as adv:
        kw = dict(env=env, device=device, state_dir=str(out_dir), resume=resume, progress=_train_progress(adv))
        sae: SAE
        if opts.arch == "protsae":
            from protsae_cli.labels.concept_labels import check_unique_sequences
            from protsae_cli.labels.sources import annotation_specs, load_label_sources
            from protsae_cli.train.protsae import prepare_concepts, train_protsae

            ontologies = _load_ontologies(opts.ontologies)
            seqs = check_unique_sequences(src.protein_ids, src.sequences)
            sources = load_label_sources(annotation_specs(opts.annotations, opts.annotation_formats), seqs,
                                         ontologies, against="the training FASTA")
            label_sets = [(",".join(s.paths), s.labels) for s in sources]
            labels, nf = prepare_concepts(label_sets, src.protein_ids, src.sequences, train_idx, ontologies,
                                          opts.concepts, opts.min_concept_residues, opts.label_granularity)
            log.info("ProtSAE concepts (%s-level): %s", labels.granularity,
                     ", ".join(f"{c} {n}" for c, n in zip(labels.concepts, labels.names, strict=True)))
            sae, hist = train_protsae(rows, val, labels, cfg, opts.train, normal_forms=nf, **kw)
        else:
            from protsae_cli.train.topk import train_topk

            sae, hist = train_topk(rows, val, cfg, opts.train, **kw)
    if not env.is_main:
        return out_dir
    if hist["stopped"]:
        log.info("stopped at step %d of %d; continue with --resume %s", hist["step"], hist["total_steps"], out_dir)
        return out_dir
    write_outputs(out_dir, sae, hist, opts)
    return out_dir


def write_outputs(out_dir: Path, sae, hist: dict, opts: TrainOptions | None = None) -> None:
    """Selected checkpoint, the last weights when they differ, and training_log.json."""
    save_sae(sae, out_dir, card=model_card(sae.cfg))
    selected = sae.cfg.training.get("selected_step")
    if selected is not None and selected != hist["step"]:
        last_cfg = type(sae.cfg).from_json_dict(sae.cfg.to_json_dict())
        last_cfg.training["selected_step"] = hist["step"]
        last_cfg.training["metrics"] = {"val": hist["metrics"].get("val_last", {})}
        last = build_sae(last_cfg)
        last.load_state_dict(hist["last_state"], strict=False)
        save_sae(last, out_dir / "last", card=model_card(last_cfg))
    log_doc = {"format": "protsae-training-log", "format_version": 1, "arch": sae.cfg.arch,
               "command": sae.cfg.training.get("command"), "train_config": sae.cfg.training.get("train_config"),
               "selection": {"rule": "min (val l_annot, val nmse)" if sae.cfg.arch == "protsae" else "min val fvu",
                             "selected_step": selected, "best": hist["best"]},
               "metrics": hist["metrics"], "evals": hist["evals"], "steps": hist["history"],
               "concepts": [c.concept_id for c in sae.cfg.concepts]}
    from protsae_cli.io.atomic import atomic_write_text

    atomic_write_text(out_dir / "training_log.json", json.dumps(log_doc, indent=1, default=float) + "\n")
    val = hist["metrics"].get("val") or {}
    brief = ", ".join(f"{k} {val[k]:.4g}" for k in ("fve", "l0", "l_annot", "defined_f1") if k in val)
    log.info("saved SAE to %s (checkpoint of step %s%s)", out_dir, selected, f"; validation {brief}" if brief else "")


def model_card(cfg: SAEConfig) -> str:
    """A short Markdown card: what the SAE is, how it was trained, how good it is."""
    t = cfg.training
    m = t.get("metrics", {})
    lines = [f"# protsae SAE: {cfg.arch}, {cfg.plm_name} {cfg.hook_point}@{cfg.layer}", "",
             f"- d_model {cfg.d_model}, d_sae {cfg.d_sae}, k {cfg.k}",
             f"- PLM {cfg.plm_name} (sha256 {cfg.plm_sha256}; weights sha256 {cfg.plm_weights_sha256})",
             f"- trained with protsae {t.get('protsae_version')} on {t.get('fasta')}: "
             f"{t.get('n_train_proteins')} training / {t.get('n_val_proteins')} validation proteins, "
             f"{t.get('train_tokens')} training tokens, {t.get('steps')} steps "
             f"(checkpoint from step {t.get('selected_step')})",
             f"- command: `{t.get('command')}`", ""]
    for split in ("train", "val"):
        if split in m and m[split]:
            v = m[split]
            extra = ""
            if "l_annot" in v:
                extra = f", concept BCE {v['l_annot']:.3f}"
                if v.get("defined_f1") == v.get("defined_f1"):  # not NaN
                    extra += f", defined-latent F1 {v.get('defined_f1', float('nan')):.3f}"
            lines.append(f"- {split}: FVE {v['fve']:.3f}, L0 {v['l0']:.1f}, dead latents "
                         f"{100 * v['dead_fraction']:.1f}% over {v['eval_tokens']} tokens{extra}")
    if cfg.concepts:
        lines += ["", f"Concept-bound latents: {len(cfg.concepts)}", ""]
        lines += [f"- latent {c.latent}: {c.name} ({c.concept_id})" for c in cfg.concepts[:50]]
        if len(cfg.concepts) > 50:
            lines.append(f"- ... ({len(cfg.concepts) - 50} more in config.json `concepts`)")
    return "\n".join(lines) + "\n"
