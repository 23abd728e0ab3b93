"""Train a TopK SAE on hooked ESM-2 activations (Gao et al. recipe, as sparsify/SAELens do it).

Choices and why:
- inputs normalised (per-dimension mean, one scale with E||x_n||^2 = d_model): the biggest lever against dead
  latents and makes learning rates transfer across layers and models;
- b_dec initialised at the geometric median of the (normalised) data: a robust centre, so early latents do not
  spend themselves on the mean;
- decoder rows kept unit-norm (and their gradient made orthogonal to them) so activations carry the scale;
- AuxK loss: the top-k_aux dead latents reconstruct the residual error, which pulls dead latents back to life;
- cosine learning-rate schedule over the whole run with a short warm-up.

The loop itself (DDP, resume, validation and checkpoint selection on validation FVU) is `trainer.fit`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from protsae_cli.train.activations import ActivationSet, Batch, InMemoryRows, ShuffleBufferStream
from protsae_cli.train.distributed import SINGLE, DistEnv
from protsae_cli.sae.config import SAEConfig
from protsae_cli.sae.base import SAE
from protsae_cli.sae.topk import TopKSAE
from protsae_cli.train.trainer import (TrainConfig, aux_rescale, cosine_lr, finish_reconstruction, fit, new_reconstruction_sums,
                                 project_decoder_grad, reconstruction_sums, reduce_sums)

__all__ = ["TrainConfig", "cosine_lr", "geometric_median", "topk_losses", "evaluate", "train_topk", "TopKObjective"]

_project_decoder_grad = project_decoder_grad  # older name, kept for callers


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm, started at the mean."""
    x = x.float()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=-1).clamp_min(eps)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if (m_new - m).norm() < 1e-6 * (m.norm() + eps):
            return m_new
        m = m_new
    return m


def init_centre(sae: SAE, sample: ActivationSet) -> None:
    """Fit input normalisation on a sample, then start b_dec at the normalised data's geometric median."""
    x = sample.acts.float()
    sae.fit_normalization(x)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sae.normalize(x)))


def topk_losses(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor, k_aux: int) -> dict[str, torch.Tensor]:
    """Reconstruction MSE in normalised space, plus AuxK on dead latents. Returns losses and the codes."""
    x_n = sae.normalize(x)
    pre = F.linear(x_n - sae.b_dec, sae.W_enc, sae.b_enc)
    vals, idx = torch.topk(F.relu(pre), sae.k, dim=-1, sorted=False)
    z = torch.zeros_like(pre).scatter(-1, idx, vals)
    x_hat_n = z @ sae.W_dec + sae.b_dec
    err = x_n - x_hat_n
    l_rec = err.pow(2).sum(-1).mean()
    total_var = (x_n - x_n.mean(0)).pow(2).sum(-1).mean()
    out = {"l_rec": l_rec, "fvu": (l_rec / total_var).detach(), "z": z.detach()}
    l_aux = torch.zeros((), device=x.device)
    n_dead = int(dead.sum())  # one host sync, cheaper than an AuxK top-k over all latents when none is dead
    if n_dead > 0:
        ka = min(k_aux, n_dead)
        pre_dead = torch.where(dead[None, :], F.relu(pre), torch.zeros_like(pre))
        av, ai = torch.topk(pre_dead, ka, dim=-1, sorted=False)
        z_aux = torch.zeros_like(pre).scatter(-1, ai, av)
        e_hat = z_aux @ sae.W_dec
        e = err.detach()
        l_aux = (e_hat - e).pow(2).sum(-1).mean() / e.pow(2).sum(-1).mean().clamp_min(1e-8)
    out["l_aux"] = l_aux
    return out


@torch.no_grad()
def evaluate(sae: SAE, acts: torch.Tensor, batch_size: int = 8192, device: str | torch.device = "cpu",
             env: DistEnv = SINGLE) -> dict[str, float]:
    """FVU/FVE in raw activation space, L0, dead fraction over these tokens (summed over ranks under DDP)."""
    was_training = sae.training
    sae.eval()
    sums = new_reconstruction_sums(sae, torch.device(device))
    for s in range(0, acts.shape[0], batch_size):
        reconstruction_sums(sae, acts[s:s + batch_size].to(device).float(), sums)
    reduce_sums(sums, env)
    sae.train(was_training)
    return finish_reconstruction(sums)


class TopKObjective(nn.Module):
    """TopK SAE loss for the shared loop: normalised MSE + auxk_alpha * AuxK; selection on validation FVU."""

    arch = "topk"
    unused_params = False

    def __init__(self, sae: TopKSAE, cfg: TrainConfig) -> None:
        super().__init__()
        self.sae, self.cfg = sae, cfg
        self.k_aux = cfg.k_aux or sae.cfg.d_model // 2
        self.env = SINGLE  # set by trainer.fit

    def init(self, sample: ActivationSet) -> None:
        init_centre(self.sae, sample)

    def prepare(self, batch: Batch, device: torch.device, env: DistEnv) -> dict[str, Any]:
        return {"x": batch.acts.to(device, non_blocking=True).float()}

    def forward(self, x: torch.Tensor, dead: torch.Tensor) -> dict[str, Any]:
        out = topk_losses(self.sae, x, dead, self.k_aux)
        l_aux = out["l_aux"] * aux_rescale(out["l_rec"], dead, self.env)
        loss = out["l_rec"] + self.cfg.auxk_alpha * l_aux
        return {"loss": loss, "fired": (out["z"] > 0).any(0),
                "logs": {"loss": loss.detach(), "fvu": out["fvu"], "l_aux": out["l_aux"].detach()}}

    def evaluate(self, val: ActivationSet, device: torch.device, env: DistEnv, batch_size: int) -> dict:
        return evaluate(self.sae, val.acts, batch_size, device, env)

    def selection_key(self, metrics: dict) -> tuple[float, ...]:
        return (metrics["fvu"],)

    def fingerprint(self) -> dict:
        c = self.sae.cfg
        return {"arch": "topk", "d_model": c.d_model, "d_sae": c.d_sae, "k": c.k, "hook": [c.hook_point, c.layer],
                "plm_sha256": c.plm_sha256}


def as_rows(train: ActivationSet | InMemoryRows | ShuffleBufferStream, cfg: TrainConfig,
            env: DistEnv) -> InMemoryRows | ShuffleBufferStream:
    if isinstance(train, ActivationSet):
        return InMemoryRows(train, cfg.batch_size, cfg.seed, env.rank, env.world_size)
    return train


def train_topk(train: ActivationSet | InMemoryRows | ShuffleBufferStream, val: ActivationSet | None,
               sae_cfg: SAEConfig, cfg: TrainConfig, progress: Callable[[int, int, dict], None] | None = None, *,
               env: DistEnv = SINGLE, device: str | torch.device | None = None, state_dir: str | None = None,
               resume: str | None = None) -> tuple[TopKSAE, dict]:
    """Train and return (sae, history). The SAE is the checkpoint with the smallest validation FVU among the
    evaluations after `cfg.save_after` of the run (the last one without validation data); its config gets the
    training provenance and metrics. `history` also holds the final weights (`last_state`)."""
    torch.manual_seed(cfg.seed)
    sae = TopKSAE(sae_cfg)
    sae.reset_parameters(seed=cfg.seed)
    rows = as_rows(train, cfg, env)
    objective = TopKObjective(sae, cfg)
    res = fit(objective, rows, val, cfg, env=env, device=device or cfg.device, state_dir=state_dir, resume=resume,
              progress=progress, save_after_default=0.0)
    return sae.cpu(), finish_history(sae, res, rows, val, cfg, objective, env)


def finish_history(sae: SAE, res, rows, val: ActivationSet | None, cfg: TrainConfig, objective,
                   env: DistEnv) -> dict:
    """Final metrics of the selected checkpoint, provenance into its config, and the history dict."""
    device = next(sae.parameters()).device
    metrics: dict[str, Any] = {}
    if not res.stopped:
        # A sample of training rows (informational: the gap to validation shows overfitting).
        metrics["train"] = objective.evaluate(rows.sample(min(cfg.init_rows, 16_384)), device, SINGLE,
                                              cfg.eval_batch_size)
        if res.best:
            metrics["val"] = res.best["metrics"]
        elif res.evals and "val" in res.evals[-1]:
            metrics["val"] = res.evals[-1]["val"]
        if res.evals and "val" in res.evals[-1]:
            metrics["val_last"] = res.evals[-1]["val"]
    sae.cfg.training.update({
        "train_config": {**asdict(cfg), "lr_milestones": list(cfg.lr_milestones)}, "steps": res.step,
        "total_steps": res.total_steps, "train_tokens": rows.n_rows,
        "val_tokens": len(val) if val is not None else 0, "seconds": res.seconds, "world_size": env.world_size,
        "selected_step": res.best.get("step", res.step), "metrics": metrics, "history_tail": res.history[-5:],
    })
    return {"history": res.history, "evals": res.evals, "metrics": metrics, "best": res.best,
            "last_state": res.last_state, "stopped": res.stopped, "step": res.step,
            "total_steps": res.total_steps, "seconds": res.seconds}
