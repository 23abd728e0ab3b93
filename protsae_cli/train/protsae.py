"""Train a ProtSAE (METHOD.md §1.3-1.6): TopK SAE whose first m latents are bound to concepts, trained with
L = L_rec + lambda_annot L_annot + lambda_axiom L_axiom (+ AuxK on dead unknown latents).

Python API (what `protsae train --arch protsae` calls)::

    from protsae_cli.train.protsae import train_protsae, prepare_concepts
    labels, nf = prepare_concepts(label_sets, acts.protein_ids, acts.sequences, train_proteins, ontologies)
    sae, hist = train_protsae(train_set, val_set, labels, sae_cfg, TrainConfig(...), normal_forms=nf)
    save_sae(sae, "out")          # hist["evals"]: per-validation metrics; hist["best"]: the selected one

Checkpoint selection follows the released code: among validations at or after `save_after` (default 0.6 of
the run, i.e. epoch 30 of 50), the lexicographically smallest (valid L_annot, valid normalised L_rec).

Validation metrics (`ProtSAEObjective.evaluate`), all on held-out proteins and at inference (plain TopK, no
forced activation, exactly what `protsae annotate` computes):
  l_annot      BCE of the predictor against observed labels (pooled per protein at protein granularity)
  nmse / fvu   fraction of variance unexplained over the validation set (raw activation space)
  fve, l0, dead_fraction, mse_per_token, eval_tokens
  l_axiom      the EL axiom loss of the current predictor
  participation  fraction of (token, concept) pairs the predictor calls whose defined latent is active
  defined_f1 / predictor_f1   mean over concepts of the F1 of "defined latent active" / "pi > 0.5"
                              against residue labels (residue granularity only)
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from protsae_cli.train.activations import ActivationSet, Batch, InMemoryRows, ShuffleBufferStream
from protsae_cli.evaluate.calibrate import ConceptCounts, OperatingPoint, apply_choice
from protsae_cli.labels.concept_labels import ConceptLabels, build_concept_labels, concept_normal_forms, select_concepts
from protsae_cli.train.distributed import SINGLE, DistEnv, all_reduce_sum
from protsae_cli.errors import InputError
from protsae_cli.labels.sets import ProteinLabels, ResidueLabels
from protsae_cli.labels.ontology import NormalForms, Ontology
from protsae_cli.sae.protsae import ProtSAE
from protsae_cli.sae.config import SAEConfig
from protsae_cli.train.topk import as_rows, finish_history, init_centre
from protsae_cli.train.trainer import (TrainConfig, aux_rescale, finish_reconstruction, fit, new_reconstruction_sums,
                                 reconstruction_sums, reduce_sums, shard_for_rank)

SAVE_AFTER_DEFAULT = 0.6  # released code: --save-after-epoch 30 of 50 epochs


def prepare_concepts(label_sets: Sequence[tuple[str, ResidueLabels | ProteinLabels]], protein_ids: Sequence[str],
                     sequences: Sequence[str], train_proteins: Sequence[int], ontologies: Sequence[Ontology] = (),
                     concepts: Sequence[str] | None = None, min_count: int = 10, granularity: str | None = None,
                     ) -> tuple[ConceptLabels, NormalForms]:
    """Choose the concepts (explicit, or frequent enough among the training proteins), index their labels by
    protein ordinal and build the EL normal forms of their ontology neighbourhood (concepts first).

    `granularity` None: residue when any source is residue-level, else protein.
    """
    if granularity is None:
        granularity = "residue" if any(isinstance(l, ResidueLabels) for _, l in label_sets) else "protein"
    chosen = select_concepts(label_sets, protein_ids, train_proteins, ontologies, concepts, min_count, granularity)
    labels = build_concept_labels(label_sets, protein_ids, sequences, chosen, granularity, ontologies)
    return labels, concept_normal_forms(ontologies, chosen)


def defined_activations(idx: torch.Tensor, val: torch.Tensor, m: int) -> torch.Tensor:
    """Dense [N, m] activations of the defined latents (latents 0..m-1) from sparse codes, 0 where TopK did
    not keep them: without a full [N, d_sae] scatter (slot m absorbs every other latent)."""
    dense = torch.zeros((len(idx), m + 1), dtype=torch.float32, device=idx.device)
    dense.scatter_(1, torch.where((idx >= 0) & (idx < m), idx, m), val.float())
    return dense[:, :m]


class ProtSAEObjective(nn.Module):
    """ProtSAE loss for the shared loop (see module docstring); selection on (valid l_annot, valid nmse)."""

    arch = "protsae"
    # rel_emb / zero_emb / class_radius get no gradient when the ontology has no axioms of their kind.
    unused_params = True

    def __init__(self, sae: ProtSAE, labels: ConceptLabels, cfg: TrainConfig) -> None:
        super().__init__()
        if len(labels) != sae.n_concepts:
            raise InputError(f"{len(labels)} concept label columns for a ProtSAE with {sae.n_concepts} concepts")
        self.sae, self.labels, self.cfg = sae, labels, cfg
        self.k_aux = cfg.k_aux or sae.cfg.d_model // 2
        self.env = SINGLE  # set by trainer.fit

    # The concept embedding: the predictor and the EL tables its axiom loss ties it to. With the stop-gradient
    # these see only BCE and the axiom loss, i.e. they are a logistic regression (plus geometry), which needs
    # a far larger step than the dictionary to converge within an SAE's budget (`predictor_lr`).
    PREDICTOR_PARAMS = ("W_pred", "b_pred", "class_radius", "zero_emb", "rel_emb")

    def param_groups(self, lr: float) -> list[dict]:
        """Adam groups: everything at the run's lr, the concept embedding at `predictor_lr` (same schedule)."""
        plr = self.sae.opts.predictor_lr
        named = [(n, q) for n, q in self.sae.named_parameters() if q.requires_grad]
        if plr is None or plr == lr:
            return [{"params": [q for _, q in named]}]
        base = [q for n, q in named if n not in self.PREDICTOR_PARAMS]
        pred = [q for n, q in named if n in self.PREDICTOR_PARAMS]
        return [{"params": base, "lr_scale": 1.0}, {"params": pred, "lr_scale": plr / lr}]

    def init(self, sample: ActivationSet) -> None:
        """Normalisation and b_dec as for TopK, and b_pred at each concept's prior log-odds."""
        init_centre(self.sae, sample)
        self.sae.init_concept_bias(self.labels.prior(sample.protein, sample.position))

    def prepare(self, batch: Batch, device: torch.device, env: DistEnv) -> dict[str, Any]:
        labels, pidx = self.labels.batch(batch.protein, batch.position)
        n_obs = (~torch.isnan(labels)).sum().to(torch.float64)
        # The BCE is a mean over *observed* labels, whose count differs between ranks; weight each rank's
        # mean by n_local * world / n_global so DDP's gradient average is the gradient of the global mean.
        total = all_reduce_sum(n_obs.clone().to(device), env).cpu() if env.enabled else n_obs
        weight = float(n_obs * env.world_size / total) if total > 0 else 0.0
        return {"x": batch.acts.to(device, non_blocking=True).float(), "labels": labels.to(device),
                "protein_index": None if pidx is None else pidx.to(device), "annot_weight": weight}

    def forward(self, x: torch.Tensor, dead: torch.Tensor, labels: torch.Tensor,
                protein_index: torch.Tensor | None, annot_weight: float) -> dict[str, Any]:
        sae = self.sae
        out = sae.forward_train(x, labels, protein_index, dead_mask=dead, aux_k=self.k_aux,
                                aux_coef=self.cfg.auxk_alpha)
        o = sae.opts
        l_aux = out["l_aux"] * aux_rescale(out["l_rec"], dead, self.env)
        loss = out["l_rec"] + o.lambda_annot * annot_weight * out["l_annot"] + self.cfg.auxk_alpha * l_aux
        if o.use_axiom and o.lambda_axiom != 0:
            loss = loss + o.lambda_axiom * out["l_axiom"]
        logs = {k: out[k].detach() for k in ("l_rec", "l_annot", "l_axiom", "l_aux", "nmse", "l0")}
        logs["loss"] = loss.detach()
        logs["participation"] = torch.nan_to_num(out["participation"], nan=1.0)
        return {"loss": loss, "fired": (out["z"] > 0).any(0), "logs": logs}

    @torch.no_grad()
    def evaluate(self, val: ActivationSet, device: torch.device, env: DistEnv, batch_size: int) -> dict:
        sae, m = self.sae, self.sae.n_concepts
        sums = new_reconstruction_sums(sae, device)
        z64 = lambda *s: torch.zeros(s, dtype=torch.float64, device=device)  # noqa: E731
        extra = {"bce": z64(), "n_obs": z64(), "called": z64(), "kept": z64(),
                 "tp_d": z64(m), "fp_d": z64(m), "fn_d": z64(m), "tp_p": z64(m), "fp_p": z64(m), "fn_p": z64(m)}
        protein_level = self.labels.granularity == "protein"
        uniq = torch.unique(val.protein) if protein_level else None  # None exactly when not protein_level
        if uniq is not None:
            P = len(uniq)
            pool_sum, pool_max, pool_n = z64(P, m), torch.full((P, m), -torch.inf, device=device), z64(P)
        for s in range(0, len(val), batch_size):
            x = val.acts[s:s + batch_size].to(device).float()
            idx, values = reconstruction_sums(sae, x, sums)
            x_n = sae.normalize(x)
            logits = sae._concept_logits(x_n)
            defined = defined_activations(idx, values, m) > 0
            called = sae.concept_calls(sae.defined_pre(x_n), logits)
            extra["called"] += called.sum()
            extra["kept"] += (called & defined).sum()
            if uniq is not None:
                loc = torch.searchsorted(uniq, val.protein[s:s + batch_size]).to(device)
                pool_sum.index_add_(0, loc, torch.sigmoid(logits).double())
                pool_max.scatter_reduce_(0, loc[:, None].expand_as(logits), logits, reduce="amax")
                pool_n.index_add_(0, loc, torch.ones(len(x), dtype=torch.float64, device=device))
                continue
            y = self.labels.rows(val.protein[s:s + batch_size], val.position[s:s + batch_size]).to(device)
            obs = ~torch.isnan(y)
            yy = torch.nan_to_num(y)
            bce = F.binary_cross_entropy_with_logits(logits, yy, reduction="none")
            extra["bce"] += (bce * obs).double().sum()
            extra["n_obs"] += obs.sum()
            pos = (yy > 0) & obs
            neg = (yy == 0) & obs
            for pred, tag in ((defined, "d"), (called, "p")):
                extra[f"tp_{tag}"] += (pred & pos).sum(0)
                extra[f"fp_{tag}"] += (pred & neg).sum(0)
                extra[f"fn_{tag}"] += (~pred & pos).sum(0)
        if uniq is not None and len(uniq):
            y = self.labels.proteins(uniq).to(device).double()
            obs = ~torch.isnan(y)
            yy = torch.nan_to_num(y)
            if sae.opts.pool == "max":
                bce = F.binary_cross_entropy_with_logits(pool_max.double(), yy, reduction="none")
            else:
                p = (pool_sum / pool_n.clamp_min(1)[:, None]).clamp(1e-6, 1 - 1e-6)
                bce = -(yy * p.log() + (1 - yy) * (-p).log1p())
            extra["bce"] += (bce * obs).sum()
            extra["n_obs"] += obs.sum()
        reduce_sums(sums, env)
        reduce_sums(extra, env)
        out: dict[str, Any] = finish_reconstruction(sums)  # plus per-concept dicts below
        if not out:
            return out
        out["nmse"] = out["fvu"]
        out["l_annot"] = (extra["bce"] / extra["n_obs"].clamp_min(1)).item()
        out["l_axiom"] = sae.axiom_losses()["total"].item() if sae.opts.use_axiom else 0.0
        out["participation"] = (extra["kept"] / extra["called"]).item() if extra["called"] > 0 else float("nan")
        if not protein_level:
            for tag, name in (("d", "defined_f1"), ("p", "predictor_f1")):
                tp, fp, fn = extra[f"tp_{tag}"], extra[f"fp_{tag}"], extra[f"fn_{tag}"]
                has = (tp + fn) > 0
                f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
                out[name] = f1[has].mean().item() if has.any() else float("nan")
                out[name + "_per_concept"] = dict(zip(self.labels.concepts, f1.tolist(), strict=True))
        return out

    @torch.no_grad()
    def refit(self, val: ActivationSet, device: torch.device, env: DistEnv, batch_size: int) -> dict:
        """Before each validation (the trainer calls this, then `evaluate`): re-fit each defined latent's cut
        (`defined_bias="calibrated"`) to the predictor as it is now, so the metrics, and the checkpoint that
        selection may keep, describe the model with its current cut. Returns metrics to record with the
        validation: the mean validation F1 at the cuts and the per-concept record."""
        if self.sae.opts.defined_bias != "calibrated":
            return {}
        rec = calibrate_defined_offsets(self.sae, val, self.labels, env=env, batch_size=batch_size)
        f1s = [r["valid_f1"] for r in rec["per_concept"].values() if r["valid_f1"] is not None]
        return {"offset_f1": sum(f1s) / len(f1s) if f1s else float("nan"), "offset_per_concept": rec["per_concept"]}

    def selection_key(self, metrics: dict) -> tuple[float, ...]:
        return (metrics["l_annot"], metrics["nmse"])

    def fingerprint(self) -> dict:
        c = self.sae.cfg
        return {"arch": "protsae", "d_model": c.d_model, "d_sae": c.d_sae, "k": c.k,
                "hook": [c.hook_point, c.layer], "plm_sha256": c.plm_sha256, "protsae": dict(c.protsae),
                "concepts": list(self.labels.concepts), "granularity": self.labels.granularity}


# What "auto" resolves to for residue-level concepts: the combination measured best on the stand-in PLM
# (docs/RESULTS.md, "ProtSAE vs TopK"). Protein-level labels get METHOD.md §1.10's defaults instead (cutting a
# defined latent needs residue labels, and the rest is unmeasured there).
RESIDUE_RECIPE: dict[str, Any] = {"defined_bias": "calibrated", "topk_scope": "defined_first", "predictor_lr": 3e-2}


def resolve_recipe(opts: dict[str, Any], granularity: str, has_validation: bool = True) -> dict[str, Any]:
    """Options given as "auto" (what `protsae train` passes by default) resolved for this label granularity.

    The calibrated cut is fitted on validation proteins, so without any the recipe falls back to METHOD.md's
    defaults, and an explicit "calibrated" is refused rather than trained with every cut left at 0.
    """
    from protsae_cli.sae.protsae import PROTSAE_DEFAULTS

    if opts.get("defined_bias") == "calibrated" and not has_validation:
        raise InputError("defined_bias='calibrated' fits each defined latent's cut on validation proteins and "
                         "this run has none: give validation proteins (--val-fraction > 0) or choose "
                         "--defined-bias none or pred")
    use_recipe = granularity == "residue" and has_validation
    out = dict(opts)
    for key, value in RESIDUE_RECIPE.items():
        if out.get(key) == "auto":
            out[key] = value if use_recipe else PROTSAE_DEFAULTS[key]
    # Admitting defined latents first only makes sense when they are sparse calls, not graded scores that are
    # positive on most residues (defined_bias "none" would fill TopK with them).
    if opts.get("topk_scope") == "auto" and out.get("topk_scope") == "defined_first" \
            and out.get("defined_bias", PROTSAE_DEFAULTS["defined_bias"]) == "none":
        out["topk_scope"] = PROTSAE_DEFAULTS["topk_scope"]
    return out


def build_protsae(sae_cfg: SAEConfig, labels: ConceptLabels, normal_forms: NormalForms | None,
                  seed: int, has_validation: bool = True) -> ProtSAE:
    """The ProtSAE for these concepts: latent c <-> labels.concepts[c], zero-class/relation tables sized from
    the normal forms, concept entries recorded in the config (what `annotate` names segments after); options
    given as "auto" resolved by `resolve_recipe`."""
    m = len(labels)
    sae_cfg.arch = "protsae"
    if not sae_cfg.concepts:
        sae_cfg.concepts = labels.concept_entries()
    elif [e.concept_id for e in sae_cfg.concepts[:m]] != labels.concepts:
        raise InputError("sae_cfg.concepts do not list the label concepts in latent order")
    opts = resolve_recipe(sae_cfg.protsae, labels.granularity, has_validation)
    opts.update(n_concepts=m, label_granularity=labels.granularity)
    if normal_forms is not None:
        if list(normal_forms.class_ids[:m]) != list(labels.concepts):
            raise InputError("normal forms must list the concepts first, in latent order")
        opts.update(n_zero_classes=len(normal_forms.class_ids) - m, n_relations=len(normal_forms.relation_ids))
    else:
        opts.update(n_zero_classes=0, n_relations=0)
    sae_cfg.protsae = opts
    sae = ProtSAE(sae_cfg)
    sae.reset_parameters(seed)
    if normal_forms is not None:
        sae.set_normal_forms(normal_forms)
    return sae


def train_protsae(train: ActivationSet | InMemoryRows | ShuffleBufferStream, val: ActivationSet | None,
                  labels: ConceptLabels, sae_cfg: SAEConfig, cfg: TrainConfig, *,
                  normal_forms: NormalForms | None = None, progress: Callable[[int, int, dict], None] | None = None,
                  env: DistEnv = SINGLE, device: str | torch.device | None = None, state_dir: str | None = None,
                  resume: str | None = None) -> tuple[ProtSAE, dict]:
    """Train a ProtSAE and return (selected checkpoint, history).

    `train`/`val` share one protein index space with `labels` (`ActivationSet.subset_proteins` keeps it).
    `sae_cfg.protsae` carries the model options (lambda_annot, lambda_axiom, margin, topk_scope, pool,
    ablation switches...; see `protsae_model.PROTSAE_DEFAULTS`); the concept count, granularity and EL table
    sizes are filled in here. `state_dir` receives `train_state.pt` (resumable with `resume=`).
    history: {"history": per-log-step training means, "evals": per-validation records, "best": selected eval,
    "metrics": {"train", "val", "val_last"}, "last_state": final weights, "stopped", "step", ...}.
    """
    torch.manual_seed(cfg.seed)
    sae = build_protsae(sae_cfg, labels, normal_forms, cfg.seed, has_validation=val is not None and len(val) > 0)
    rows = as_rows(train, cfg, env)
    objective = ProtSAEObjective(sae, labels, cfg)
    res = fit(objective, rows, val, cfg, env=env, device=device or cfg.device, state_dir=state_dir, resume=resume,
              progress=progress, save_after_default=SAVE_AFTER_DEFAULT)
    hist = finish_history(sae, res, rows, val, cfg, objective, env)
    sae.cfg.training["concept_labels"] = labels.describe()
    best = (hist.get("best") or {}).get("metrics") or {}
    if "offset_per_concept" in best:
        sae.cfg.training["defined_offset_calibration"] = {
            "method": "cut of each defined latent re-fitted at every validation: max residue F1 of W_pred x~ >= "
                      f"theta on the validation proteins ({OFFSET_BINS}-step grid over the score's range)",
            "selected_step": hist["best"].get("step"), "per_concept": best["offset_per_concept"]}
    if val is not None:
        sae.cfg.training["threshold_calibration"] = calibrate_thresholds(
            sae, shard_for_rank(val, env), labels, env=env, batch_size=cfg.eval_batch_size)
    return sae.cpu(), hist


CALIBRATION_BINS = 200
OFFSET_BINS = 1000


@torch.no_grad()
def _f1_optimal_cuts(scores: Callable[[int], torch.Tensor], val: ActivationSet, labels: ConceptLabels, m: int,
                     dev: torch.device, env: DistEnv, batch_size: int, bins: int, positive_only: bool,
                     hist_out: dict | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per concept, the cut c maximising the residue F1 of "score >= c" on the validation rows.

    `scores(s)` gives the [B, m] scores of rows s..s+B. Two passes: the score range over rows whose label is
    observed, then per-concept histograms of positives and negatives on a `bins`-step grid over that range
    (O(m x bins) memory, summed across DDP ranks). `positive_only`: a score of 0 is never a call (sparse codes:
    a latent TopK did not keep says nothing), and the range starts at 0.
    Returns (cut [m], best F1 [m], positives [m], range low [m], range high [m]); `hist_out`, when given, also
    receives the per-concept histograms ("pos", "neg" [m, bins]) for the reliability record (calibrate.py).
    """
    inf = torch.full((m,), torch.inf, dtype=torch.float64, device=dev)
    lo, hi = inf.clone(), -inf

    def rows(s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = scores(s).double()
        y = labels.rows(val.protein[s:s + batch_size], val.position[s:s + batch_size]).to(dev)
        ok = ~torch.isnan(y)
        if positive_only:
            ok &= z > 0
        return z, y, ok

    for s in range(0, len(val), batch_size):
        z, _, ok = rows(s)
        lo = torch.minimum(lo, torch.where(ok, z, torch.inf).min(0).values)
        hi = torch.maximum(hi, torch.where(ok, z, -torch.inf).max(0).values)
    if env.enabled:
        import torch.distributed as dist

        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if positive_only:
        lo = torch.zeros_like(lo)
    empty = ~torch.isfinite(hi) | ~(hi > lo)
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    scale = torch.where(empty, 0.0, bins / (hi - lo).clamp_min(1e-300))
    # counts[c, j]: eligible rows with score in [lo + j w, lo + (j+1) w); "score >= lo + j w" keeps bins j..
    pos = torch.zeros((m, bins), dtype=torch.float64, device=dev)
    neg = torch.zeros_like(pos)
    n_pos = torch.zeros(m, dtype=torch.float64, device=dev)
    for s in range(0, len(val), batch_size):
        z, y, ok = rows(s)
        b = ((z - lo) * scale).floor().clamp(0, bins - 1).long()
        for counts, mask in ((pos, (y == 1) & ok), (neg, (y == 0) & ok)):  # NaN (unobserved) is neither
            counts.scatter_add_(1, b.T, mask.T.double())
        n_pos += (y == 1).sum(0).double()
    for t in (pos, neg, n_pos):
        all_reduce_sum(t, env)
    tp = pos.flip(1).cumsum(1).flip(1)
    fp = neg.flip(1).cumsum(1).flip(1)
    f1 = 2 * tp / (tp + fp + n_pos[:, None]).clamp_min(1)
    j = torch.argmax(f1, 1)
    cut = lo + j.double() * (hi - lo) / bins
    if hist_out is not None:
        observed = sum((~torch.isnan(labels.rows(val.protein[s:s + batch_size], val.position[s:s + batch_size])))
                       .sum(0) for s in range(0, len(val), batch_size))
        hist_out.update(pos=pos.cpu(), neg=neg.cpu(), observed=torch.as_tensor(observed).reshape(-1))
    return cut, f1.gather(1, j[:, None]).squeeze(1), n_pos, lo, hi


@torch.no_grad()
def calibrate_thresholds(sae: ProtSAE, val: ActivationSet, labels: ConceptLabels, *, env: DistEnv = SINGLE,
                         batch_size: int = 8192,
                         bins: int = CALIBRATION_BINS) -> dict:
    """Set each concept's annotation threshold to the value that maximises the residue F1 of its defined latent
    on the validation proteins, and return what was chosen (recorded in the checkpoint's provenance).

    Why: with METHOD.md's recommended `defined_bias="none"` a defined latent is a graded score, positive on
    many residues where the concept is merely plausible; `protsae annotate` calls a segment where the latent
    is >= its threshold, so the threshold is what turns the score into a call. The candidates are a
    `bins`-step grid from 0 to the latent's maximum over validation residues, scored on exactly the codes
    `annotate` sees (TopK at inference, no forced activation), so a concept crowded out by TopK is judged as
    such. Protein-level labels, and concepts without a positive validation residue, keep their threshold
    (0: any nonzero activation), and the record says why.
    """
    m = sae.n_concepts
    dev = next(sae.parameters()).device  # where training left it
    out: dict = {"method": f"max residue F1 of the defined latent on validation proteins, {bins}-step grid "
                           "from 0 to the latent's validation maximum", "per_concept": {}}
    if labels.granularity != "residue":
        out["skipped"] = "protein-level labels: no residue labels to calibrate against; thresholds kept at 0"
        return out

    def codes(s: int) -> torch.Tensor:
        return defined_activations(*sae.encode(val.acts[s:s + batch_size].to(dev).float()), m)

    hist: dict = {}
    cut, f1, n_pos, _, vmax = _f1_optimal_cuts(codes, val, labels, m, dev, env, batch_size, bins, True, hist)
    n_prot = int(torch.unique(val.protein).numel()) if len(val) else 0
    for c, entry in enumerate(sae.cfg.concepts[:m]):
        rec: dict = {"positives": int(n_pos[c].item()), "validation_max": float(vmax[c].item())}
        if n_pos[c] == 0 or vmax[c] == 0:
            rec.update(threshold=float(entry.threshold), valid_f1=None,
                       kept="no positive validation residue" if n_pos[c] == 0 else "latent never active")
        else:
            entry.threshold = float(cut[c].item())
            rec.update(threshold=entry.threshold, valid_f1=float(f1[c].item()))
            # The reliability the concept table carries (docs/CALLS.md), from the same validation histograms.
            grid = (vmax[c].item() / bins) * np.arange(bins)
            counts = ConceptCounts(grid, hist["pos"][c].numpy(), hist["neg"][c].numpy(), int(n_pos[c].item()),
                                   int(hist["observed"][c]) if hist["observed"].numel() > c else 0)
            apply_choice(entry, counts, OperatingPoint("f1"), entry.source or "training labels",
                         f"training's validation split: {n_prot} proteins (this process's share under DDP)"
                         if env.enabled else f"training's validation split: {n_prot} proteins")
            entry.threshold = float(cut[c].item())  # the grid cut itself (apply_choice reads it as the same bin)
            rec.update(precision=entry.precision, recall=entry.recall)
        out["per_concept"][entry.concept_id] = rec
    return out


@torch.no_grad()
def calibrate_defined_offsets(sae: ProtSAE, val: ActivationSet, labels: ConceptLabels, *, env: DistEnv = SINGLE,
                              batch_size: int = 8192, bins: int = OFFSET_BINS) -> dict:
    """`defined_bias="calibrated"`: set each defined latent's cut theta_c (z_def = e^r (W x~ - theta)) to the
    score at which "W x~ >= theta" has the best residue F1 on the validation proteins, and return the record.

    Why: a defined latent without the predictor's bias is positive wherever W x~ > 0, a graded score over
    many residues without the concept; with the paper's bias it fires only where pi > 0.5, which a rare
    concept's predictor seldom reaches. The F1-optimal cut lies between the two and differs per concept, so it
    is fitted, on the scores before TopK (a property of the predictor; forced activation then keeps these
    calls in TopK during training). Concepts without a positive validation residue keep their cut.
    """
    m = sae.n_concepts
    dev = sae.defined_offset.device

    def scores(s: int) -> torch.Tensor:
        # In float64: a float32 GEMM's rounding depends on the batch shape, so DDP ranks (other row blocks)
        # would see a score on a bin edge on different sides and fit a different cut than one process.
        return sae.defined_scores(sae.normalize(val.acts[s:s + batch_size].to(dev).float()), torch.float64)

    cut, f1, n_pos, _, _ = _f1_optimal_cuts(scores, val, labels, m, dev, env, batch_size, bins, False)
    out: dict = {"method": f"max residue F1 of W_pred x~ >= theta on validation proteins, {bins}-step grid over "
                           "the score's validation range", "per_concept": {}}
    for c, entry in enumerate(sae.cfg.concepts[:m]):
        rec: dict = {"positives": int(n_pos[c].item())}
        if n_pos[c] > 0:
            sae.defined_offset[c] = cut[c].to(sae.defined_offset.dtype)
            rec["valid_f1"] = float(f1[c].item())
        else:
            rec.update(valid_f1=None, kept="no positive validation residue")
        rec["offset"] = float(sae.defined_offset[c].item())
        out["per_concept"][entry.concept_id] = rec
    return out
