"""`protsae train` orchestration: FASTA -> activations (collected or from a shard cache) -> SAE -> checkpoint.

Proteins are split into train/validation by protein (never by residue), so validation metrics are measured on
proteins the SAE never saw.
"""

from __future__ import annotations

import logging
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from protsae_cli import __version__
from protsae_cli.activations import ActivationSet, collect_activations
from protsae_cli.errors import InputError
from protsae_cli.esm_forward import EsmRunner, HookPoint
from protsae_cli.fasta import ProteinRecord, read_fasta
from protsae_cli.sae import SAEConfig, save_sae
from protsae_cli.train_topk import TrainConfig, train_topk

log = logging.getLogger("protsae.train")


@dataclass
class TrainOptions:
    fasta: str
    output: str
    model: str | None = None
    layer: int = 4
    hook: str = "resid_post"
    arch: str = "topk"
    d_sae: int = 4096
    k: int = 32
    tokens_per_protein: int | None = 64
    max_proteins: int | None = None
    val_fraction: float = 0.05
    activation_cache: str | None = None
    device: str = "auto"
    train: TrainConfig = field(default_factory=TrainConfig)
    progress: bool = True
    command: str = field(default_factory=lambda: shlex.join(["protsae", *sys.argv[1:]]))


def read_proteins(fasta: str, max_proteins: int | None, seed: int) -> list[tuple[str, str]]:
    """Valid proteins of a FASTA (invalid ones are skipped with a warning), optionally a seeded subsample."""
    recs = [r for r in read_fasta(fasta, skip_invalid=True)]
    bad = [r for r in recs if not isinstance(r, ProteinRecord)]
    if bad:
        log.warning("skipped %d invalid records (first: %s)", len(bad), bad[0].error)
    prots = [(r.id, r.sequence) for r in recs if isinstance(r, ProteinRecord)]
    if not prots:
        raise InputError(f"{fasta}: no valid protein sequences")
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


def get_activations(opts: TrainOptions, runner: EsmRunner, hook: HookPoint) -> ActivationSet:
    """Collect activations, or reuse a compatible cache (same PLM checksum, hook and sampling)."""
    cache = Path(opts.activation_cache) if opts.activation_cache else None
    if cache is not None and (cache / "meta.json").exists():
        acts = ActivationSet.load(cache)
        m = acts.meta
        if (m.get("plm_sha256"), m.get("hook_point"), m.get("layer")) != (runner.plm.sha256, hook.point, hook.layer):
            raise InputError(f"activation cache {cache} was made with {m.get('plm')} {m.get('hook_point')}@"
                             f"{m.get('layer')}, not {runner.plm.name} {hook}; use another --activation-cache")
        log.info("loaded %d cached activations from %s", len(acts), cache)
        return acts
    prots = read_proteins(opts.fasta, opts.max_proteins, opts.train.seed)
    total_res = sum(min(len(s), 1022) for _, s in prots)
    with _bar(opts.progress, "activations", total_res) as adv:
        acts = collect_activations(runner, hook, prots, tokens_per_protein=opts.tokens_per_protein,
                                   seed=opts.train.seed, progress=adv)
    acts.meta["fasta"] = str(opts.fasta)
    if cache is not None:
        acts.save(cache)
    return acts


class _bar:
    """Rich progress on stderr when interactive; a no-op callable otherwise."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled, self.label, self.total = enabled and sys.stderr.isatty(), label, total

    def __enter__(self):
        if not self.enabled:
            return lambda *a, **k: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=Console(stderr=True))
        self.p.start()
        task = self.p.add_task(self.label, total=self.total)
        def advance(n: int = 1, total: int | None = None) -> None:
            self.p.update(task, advance=n, total=total or self.total or None)

        return advance

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.p.stop()


def train_sae(opts: TrainOptions) -> Path:
    """Train an SAE as the options say and save it to opts.output; returns the directory."""
    from protsae_cli.annotate import resolve_device
    from protsae_cli.plm import load_plm

    device = resolve_device(opts.device)
    opts.train.device = str(device)
    plm = load_plm(opts.model, device)
    hook = HookPoint(opts.hook, opts.layer)
    runner = EsmRunner(plm, device)
    runner.check_hook(hook)
    acts = get_activations(opts, runner, hook)
    train_idx, val_idx = split_proteins(len(acts.protein_ids), opts.val_fraction, opts.train.seed)
    train_set, val_set = acts.subset_proteins(train_idx), acts.subset_proteins(val_idx)
    cfg = SAEConfig(d_model=plm.d_model, d_sae=opts.d_sae, k=opts.k, hook_point=hook.point, layer=hook.layer,
                    plm_name=plm.name, plm_sha256=plm.sha256, plm_num_layers=plm.num_layers, arch=opts.arch)
    cfg.training.update({"command": opts.command, "protsae_version": __version__, "fasta": str(opts.fasta),
                         "n_proteins": len(acts.protein_ids), "n_train_proteins": len(train_idx),
                         "n_val_proteins": len(val_idx), "tokens_per_protein": opts.tokens_per_protein})
    if opts.arch != "topk":
        raise InputError(f"--arch {opts.arch}: use the ProtSAE trainer (protsae train --arch protsae "
                         f"--annotations ...)")
    with _bar(opts.progress, "training", opts.train.max_steps or 0) as adv:
        sae, hist = train_topk(train_set, val_set, cfg, opts.train, progress=lambda s, t, m: adv(1, total=t))
    out = save_sae(sae, opts.output, card=model_card(sae.cfg))
    log.info("saved SAE to %s (val %s)", out, hist["metrics"].get("val"))
    return out


def model_card(cfg: SAEConfig) -> str:
    """A short Markdown card: what the SAE is, how it was trained, how good it is."""
    t = cfg.training
    m = t.get("metrics", {})
    lines = [f"# protsae SAE: {cfg.arch}, {cfg.plm_name} {cfg.hook_point}@{cfg.layer}", "",
             f"- d_model {cfg.d_model}, d_sae {cfg.d_sae}, k {cfg.k}",
             f"- PLM {cfg.plm_name} (sha256 {cfg.plm_sha256})",
             f"- trained with protsae {t.get('protsae_version')} on {t.get('fasta')}: "
             f"{t.get('n_train_proteins')} training / {t.get('n_val_proteins')} validation proteins, "
             f"{t.get('train_tokens')} training tokens, {t.get('steps')} steps",
             f"- command: `{t.get('command')}`", ""]
    for split in ("train", "val"):
        if split in m:
            v = m[split]
            lines.append(f"- {split}: FVE {v['fve']:.3f}, L0 {v['l0']:.1f}, dead latents "
                         f"{100 * v['dead_fraction']:.1f}% over {v['eval_tokens']} tokens")
    if cfg.concepts:
        lines += ["", f"Concept-bound latents: {len(cfg.concepts)} (see config.json `concepts`)."]
    return "\n".join(lines) + "\n"
