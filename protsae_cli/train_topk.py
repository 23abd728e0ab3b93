"""Train a TopK SAE on hooked ESM-2 activations (Gao et al. recipe, as sparsify/SAELens do it).

Choices and why:
- inputs normalised (per-dimension mean, one scale with E||x_n||^2 = d_model): the biggest lever against dead
  latents and makes learning rates transfer across layers and models;
- b_dec initialised at the geometric median of the (normalised) data: a robust centre, so early latents do not
  spend themselves on the mean;
- decoder rows kept unit-norm (and their gradient made orthogonal to them) so activations carry the scale;
- AuxK loss: the top-k_aux dead latents reconstruct the residual error, which pulls dead latents back to life;
- cosine learning-rate schedule over the whole run with a short warm-up.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from protsae_cli.activations import ActivationSet, iter_batches
from protsae_cli.sae import SAEConfig, TopKSAE


@dataclass
class TrainConfig:
    d_sae: int = 4096
    k: int = 32
    lr: float = 4e-4
    batch_size: int = 4096
    epochs: int = 5
    max_steps: int | None = None
    warmup_frac: float = 0.05
    auxk_alpha: float = 1 / 32
    k_aux: int | None = None          # default: d_model // 2
    dead_after_tokens: int = 2_000_000  # a latent unseen for this many tokens counts as dead
    seed: int = 0
    device: str = "cpu"
    log_every: int = 50
    extra: dict = field(default_factory=dict)


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


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def topk_losses(sae: TopKSAE, x: torch.Tensor, dead: torch.Tensor, k_aux: int) -> dict[str, torch.Tensor]:
    """Reconstruction MSE in normalised space, plus AuxK on dead latents. Returns losses and the fired mask."""
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
    n_dead = int(dead.sum())
    if n_dead > 0:
        ka = min(k_aux, n_dead)
        pre_dead = torch.where(dead[None, :], F.relu(pre), torch.zeros_like(pre))
        av, ai = torch.topk(pre_dead, ka, dim=-1, sorted=False)
        z_aux = torch.zeros_like(pre).scatter(-1, ai, av)
        e_hat = z_aux @ sae.W_dec
        l_aux = (e_hat - err.detach()).pow(2).sum(-1).mean() / err.detach().pow(2).sum(-1).mean().clamp_min(1e-8)
    out["l_aux"] = l_aux
    return out


def _project_decoder_grad(sae: TopKSAE) -> None:
    """Remove the gradient component along each unit-norm decoder row (it would only change the norm)."""
    if sae.W_dec.grad is None:
        return
    with torch.no_grad():
        W, g = sae.W_dec, sae.W_dec.grad
        g -= (g * W).sum(-1, keepdim=True) * W


@torch.no_grad()
def evaluate(sae: TopKSAE, acts: torch.Tensor, batch_size: int = 8192, device: str = "cpu") -> dict[str, float]:
    """FVU/FVE in raw activation space, L0, dead fraction over these tokens."""
    sae.eval()
    n = acts.shape[0]
    if n == 0:
        return {}
    mean = acts.float().mean(0).to(device)
    sse = sst = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=device)
    for s in range(0, n, batch_size):
        x = acts[s:s + batch_size].to(device).float()
        idx, val = sae.encode(x)
        x_hat = sae.decode_sparse(idx, val)
        sse += (x - x_hat).pow(2).sum().item()
        sst += (x - mean).pow(2).sum().item()
        l0 += (idx >= 0).sum().item()
        fired[idx[idx >= 0]] = True
    sae.train()
    fvu = sse / max(sst, 1e-12)
    return {"fvu": fvu, "fve": 1 - fvu, "mse_per_token": sse / n, "l0": l0 / n,
            "dead_fraction": 1 - fired.float().mean().item(), "eval_tokens": n}


def train_topk(train: ActivationSet, val: ActivationSet | None, sae_cfg: SAEConfig, cfg: TrainConfig,
               progress: Callable[[int, int, dict], None] | None = None) -> tuple[TopKSAE, dict]:
    """Train and return (sae, history). The SAE's config gets the training provenance and final metrics."""
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    sae = TopKSAE(sae_cfg)
    sae.reset_parameters(seed=cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    sample = train.acts[torch.randperm(len(train), generator=g)[:65536]].float()
    sae.fit_normalization(sample)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sae.normalize(sample)))
    sae.to(device).train()
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"only {len(train)} training tokens for batch size {cfg.batch_size}")
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_frac * total))
    k_aux = cfg.k_aux or sae_cfg.d_model // 2
    tokens_since = torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=device)
    history: list[dict] = []
    step = 0
    t0 = time.perf_counter()
    while step < total:
        for rows in iter_batches(len(train), cfg.batch_size, g):
            if step >= total:
                break
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, cfg.lr, warmup)
            x = train.acts[rows].to(device).float()
            dead = tokens_since > cfg.dead_after_tokens
            out = topk_losses(sae, x, dead, k_aux)
            loss = out["l_rec"] + cfg.auxk_alpha * out["l_aux"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _project_decoder_grad(sae)
            opt.step()
            sae.normalize_decoder()
            fired = (out["z"] > 0).any(0)
            tokens_since += x.shape[0]
            tokens_since[fired] = 0
            step += 1
            if step % cfg.log_every == 0 or step == total:
                rec = {"step": step, "loss": loss.item(), "fvu": out["fvu"].item(), "l_aux": out["l_aux"].item(),
                       "dead_fraction": dead.float().mean().item(), "lr": opt.param_groups[0]["lr"],
                       "seconds": time.perf_counter() - t0}
                history.append(rec)
            if progress is not None:
                progress(step, total, {"fvu": out["fvu"].item()})
    sae.eval()
    metrics = {"train": evaluate(sae, train.acts[:200_000], device=device)}
    if val is not None and len(val):
        metrics["val"] = evaluate(sae, val.acts, device=device)
    sae.cfg.training.update({
        "train_config": asdict(cfg), "steps": step, "train_tokens": len(train),
        "val_tokens": len(val) if val is not None else 0, "seconds": time.perf_counter() - t0,
        "metrics": metrics, "history_tail": history[-5:],
    })
    return sae.cpu(), {"history": history, "metrics": metrics}
