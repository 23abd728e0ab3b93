"""Train a ProtSAE (METHOD.md §1.3-1.6): TopK SAE whose first m latents are bound to concepts, trained with
L = L_rec + lambda_annot L_annot + lambda_axiom L_axiom (+ AuxK on dead unknown latents).

Python API (what `protsae train --arch protsae` calls)::

    from protsae_cli.train_protsae import train_protsae, prepare_concepts
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

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from protsae_cli.activations import ActivationSet, Batch, InMemoryRows, ShuffleBufferStream
from protsae_cli.concept_labels import ConceptLabels, build_concept_labels, concept_normal_forms, select_concepts
from protsae_cli.distributed import SINGLE, DistEnv, all_reduce_sum
from protsae_cli.errors import InputError
from protsae_cli.labels import ProteinLabels, ResidueLabels
from protsae_cli.ontology import NormalForms, Ontology
from protsae_cli.protsae_model import ProtSAE
from protsae_cli.sae import SAEConfig
from protsae_cli.train_topk import as_rows, finish_history, init_centre
from protsae_cli.trainer import (TrainConfig, aux_rescale, finish_reconstruction, fit, new_reconstruction_sums,
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
        loss = out["l_rec"] + o["lambda_annot"] * annot_weight * out["l_annot"] + self.cfg.auxk_alpha * l_aux
        if o["use_axiom"] and o["lambda_axiom"] != 0:
            loss = loss + o["lambda_axiom"] * out["l_axiom"]
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
        uniq = torch.unique(val.protein) if protein_level else None
        if protein_level:
            P = len(uniq)
            pool_sum, pool_max, pool_n = z64(P, m), torch.full((P, m), -torch.inf, device=device), z64(P)
        for s in range(0, len(val), batch_size):
            x = val.acts[s:s + batch_size].to(device).float()
            idx, values = reconstruction_sums(sae, x, sums)
            logits = sae._concept_logits(sae.normalize(x))
            defined = defined_activations(idx, values, m) > 0
            called = logits > 0
            extra["called"] += called.sum()
            extra["kept"] += (called & defined).sum()
            if protein_level:
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
        if protein_level and len(uniq):
            y = self.labels.proteins(uniq).to(device).double()
            obs = ~torch.isnan(y)
            yy = torch.nan_to_num(y)
            if sae.opts["pool"] == "max":
                bce = F.binary_cross_entropy_with_logits(pool_max.double(), yy, reduction="none")
            else:
                p = (pool_sum / pool_n.clamp_min(1)[:, None]).clamp(1e-6, 1 - 1e-6)
                bce = -(yy * p.log() + (1 - yy) * (-p).log1p())
            extra["bce"] += (bce * obs).sum()
            extra["n_obs"] += obs.sum()
        reduce_sums(sums, env)
        reduce_sums(extra, env)
        out = finish_reconstruction(sums)
        if not out:
            return out
        out["nmse"] = out["fvu"]
        out["l_annot"] = (extra["bce"] / extra["n_obs"].clamp_min(1)).item()
        out["l_axiom"] = sae.axiom_losses()["total"].item() if sae.opts["use_axiom"] else 0.0
        out["participation"] = (extra["kept"] / extra["called"]).item() if extra["called"] > 0 else float("nan")
        if not protein_level:
            for tag, name in (("d", "defined_f1"), ("p", "predictor_f1")):
                tp, fp, fn = extra[f"tp_{tag}"], extra[f"fp_{tag}"], extra[f"fn_{tag}"]
                has = (tp + fn) > 0
                f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
                out[name] = f1[has].mean().item() if has.any() else float("nan")
                out[name + "_per_concept"] = dict(zip(self.labels.concepts, f1.tolist()))
        return out

    def selection_key(self, metrics: dict) -> tuple[float, ...]:
        return (metrics["l_annot"], metrics["nmse"])

    def fingerprint(self) -> dict:
        c = self.sae.cfg
        return {"arch": "protsae", "d_model": c.d_model, "d_sae": c.d_sae, "k": c.k,
                "hook": [c.hook_point, c.layer], "plm_sha256": c.plm_sha256, "protsae": dict(c.protsae),
                "concepts": list(self.labels.concepts), "granularity": self.labels.granularity}


def build_protsae(sae_cfg: SAEConfig, labels: ConceptLabels, normal_forms: NormalForms | None,
                  seed: int) -> ProtSAE:
    """The ProtSAE for these concepts: latent c <-> labels.concepts[c], zero-class/relation tables sized from
    the normal forms, concept entries recorded in the config (what `annotate` names segments after)."""
    m = len(labels)
    sae_cfg.arch = "protsae"
    if not sae_cfg.concepts:
        sae_cfg.concepts = labels.concept_entries()
    elif [e.concept_id for e in sae_cfg.concepts[:m]] != labels.concepts:
        raise InputError("sae_cfg.concepts do not list the label concepts in latent order")
    opts = dict(sae_cfg.protsae)
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
    sae = build_protsae(sae_cfg, labels, normal_forms, cfg.seed)
    rows = as_rows(train, cfg, env)
    objective = ProtSAEObjective(sae, labels, cfg)
    res = fit(objective, rows, val, cfg, env=env, device=device or cfg.device, state_dir=state_dir, resume=resume,
              progress=progress, save_after_default=SAVE_AFTER_DEFAULT)
    hist = finish_history(sae, res, rows, val, cfg, objective, env)
    sae.cfg.training["concept_labels"] = labels.describe()
    if val is not None:
        sae.cfg.training["threshold_calibration"] = calibrate_thresholds(
            sae, shard_for_rank(val, env), labels, env=env, batch_size=cfg.eval_batch_size)
    return sae.cpu(), hist


CALIBRATION_BINS = 200


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
    such. Histogram counts make this two passes with O(m x bins) memory, and sum across DDP ranks.
    Protein-level labels, and concepts without a positive validation residue, keep their threshold (0: any
    nonzero activation), and the record says why.
    """
    m = sae.n_concepts
    dev = next(sae.parameters()).device  # where training left it
    out: dict = {"method": f"max residue F1 of the defined latent on validation proteins, {bins}-step grid "
                           "from 0 to the latent's validation maximum", "per_concept": {}}
    if labels.granularity != "residue":
        out["skipped"] = "protein-level labels: no residue labels to calibrate against; thresholds kept at 0"
        return out

    def defined_codes(s: int) -> torch.Tensor:
        return defined_activations(*sae.encode(val.acts[s:s + batch_size].to(dev).float()), m)

    vmax = torch.zeros(m, dtype=torch.float64, device=dev)
    for s in range(0, len(val), batch_size):
        vmax = torch.maximum(vmax, defined_codes(s).max(0).values.double())
    if env.enabled:
        import torch.distributed as dist

        dist.all_reduce(vmax, op=dist.ReduceOp.MAX)
    # counts[c, 0] = residues with activation 0; counts[c, 1 + j] = activation in [j, j+1) * vmax / bins.
    pos = torch.zeros((m, bins + 1), dtype=torch.float64, device=dev)
    neg = torch.zeros_like(pos)
    scale = torch.where(vmax > 0, bins / vmax, torch.zeros_like(vmax))
    for s in range(0, len(val), batch_size):
        z = defined_codes(s).double()
        y = labels.rows(val.protein[s:s + batch_size], val.position[s:s + batch_size]).to(dev)
        b = torch.where(z > 0, 1 + (z * scale).floor().clamp_max(bins - 1), torch.zeros_like(z)).long()
        for counts, mask in ((pos, y == 1), (neg, y == 0)):  # NaN (unobserved) is neither
            counts.scatter_add_(1, b.T, mask.T.double())
    all_reduce_sum(pos, env)
    all_reduce_sum(neg, env)
    # Calling "activation >= j * vmax / bins and > 0" keeps bins 1 + j.. (j = 0: every nonzero residue).
    tp = pos[:, 1:].flip(1).cumsum(1).flip(1)
    fp = neg[:, 1:].flip(1).cumsum(1).flip(1)
    n_pos = pos.sum(1, keepdim=True)
    f1 = 2 * tp / (tp + fp + n_pos).clamp_min(1)
    for c, entry in enumerate(sae.cfg.concepts[:m]):
        rec: dict = {"positives": int(n_pos[c].item()), "validation_max": float(vmax[c].item())}
        if n_pos[c] == 0 or vmax[c] == 0:
            rec.update(threshold=float(entry.threshold), valid_f1=None,
                       kept="no positive validation residue" if n_pos[c] == 0 else "latent never active")
        else:
            j = int(torch.argmax(f1[c]).item())
            entry.threshold = float(j * vmax[c].item() / bins)
            rec.update(threshold=entry.threshold, valid_f1=float(f1[c, j].item()))
        out["per_concept"][entry.concept_id] = rec
    return out
