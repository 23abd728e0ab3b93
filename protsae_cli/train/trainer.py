"""The training loop both SAE architectures share: schedule, dead-latent bookkeeping, DDP, periodic validation,
checkpoint selection and resumable training state.

What differs between TopK and ProtSAE (the loss, the initialisation, the validation metrics and the rule that
picks the checkpoint) lives in an `Objective` (`train_topk.TopKObjective`, `train_protsae.ProtSAEObjective`).

Decisions and why:

- **Global batches, sliced per rank.** Every rank draws the same global batch (same seed) and trains on its
  contiguous slice; DDP averages the gradients. The computation is then the same at any world size (up to
  floating-point summation order), a 1-GPU and an 8-GPU run with the same `batch_size` are the same
  experiment, and a run may resume on a different number of GPUs. Losses whose normaliser is not the local
  row count (ProtSAE's BCE over *observed* labels) are reweighted with a globally reduced count so the
  averaged gradient is the gradient of the global mean.
- **Dead latents** are counted in tokens since last fired, on identical counters on every rank: each step's
  fired masks are OR-reduced (`distributed.reduce_fired`) before the counters move.
- **Epoch order from (seed, epoch).** Data order is a function of the seed and epoch number only, so a
  resumed run recomputes where it was instead of restoring generator state; resuming at step s continues
  the identical sequence of batches, and on CPU reproduces an uninterrupted run bit for bit (tested).
- **Training state** (model, Adam moments, step, dead-latent counters, eval history, the best checkpoint so
  far, RNG states) is one file written atomically (temporary name, then rename) every `state_every` steps
  and at the end, by rank 0 only. It holds tensors and plain Python values only, so it loads with
  `torch.load(weights_only=True)`.
- **Checkpoint selection** happens on validation metrics computed every `eval_every` steps (default: once
  per epoch) and at the last step; only evaluations at or after `save_after` of the run are eligible (early
  checkpoints win on annotation loss before reconstruction has converged), as in the released ProtSAE code.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from protsae_cli.train.activations import ActivationSet, Batch, InMemoryRows, ShuffleBufferStream
from protsae_cli.train.distributed import SINGLE, DistEnv, all_reduce_sum, reduce_fired, reduce_tokens_since
from protsae_cli.errors import InputError
from protsae_cli.train.options import LR_SCHEDULES, TrainConfig  # noqa: F401 (public here too)

if TYPE_CHECKING:
    from protsae_cli.sae.base import SAE

log = logging.getLogger("protsae.train")

STATE_NAME = "train_state.pt"
STATE_FORMAT = "protsae-train-state"




def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def learning_rate(step: int, total: int, cfg: TrainConfig) -> float:
    warmup = max(1, int(cfg.warmup_frac * total)) if cfg.warmup_frac > 0 else 0
    if cfg.lr_schedule == "cosine":
        return cosine_lr(step, total, cfg.lr, max(1, warmup))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.lr_schedule == "multistep":
        passed = sum(step >= int(round(f * total)) for f in cfg.lr_milestones)
        return cfg.lr * cfg.lr_gamma ** passed
    if cfg.lr_schedule == "constant":
        return cfg.lr
    raise InputError(f"unknown lr schedule {cfg.lr_schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")


def project_decoder_grad(sae: SAE) -> None:
    """Remove the gradient component along each unit-norm decoder row (it would only change the norm)."""
    if sae.W_dec.grad is None:
        return
    with torch.no_grad():
        W, g = sae.W_dec, sae.W_dec.grad
        g -= (g * W).sum(-1, keepdim=True) * W


def aux_rescale(l_rec: torch.Tensor, dead: torch.Tensor, env: DistEnv) -> torch.Tensor | float:
    """Factor turning a rank's AuxK loss into its share of the global-batch AuxK loss.

    AuxK is normalised by the mean squared residual of the batch, and each rank only knows its slice's; the
    slice's mean squared residual is exactly its L_rec, so multiplying by l_rec_local / l_rec_global makes
    the DDP-averaged gradient equal the single-process one. Collective only when some latent is dead (the
    dead mask is identical on all ranks, so all ranks agree on whether to call it)."""
    if not env.enabled or not bool(dead.any()):
        return 1.0
    den = l_rec.detach().clone()
    all_reduce_sum(den, env)
    return l_rec.detach() * env.world_size / den.clamp_min(1e-12)


# ----------------------------------------------------------------------------------------------- validation
def new_reconstruction_sums(sae: SAE, device: torch.device) -> dict[str, torch.Tensor]:
    """Zeroed accumulators; created up front so a rank with no validation rows still joins the reductions."""
    z = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
    return {"sse": z(), "sum_x": z(sae.cfg.d_model), "sum_x2": z(), "n": z(), "l0": z(), "fired": z(sae.cfg.d_sae)}


@torch.no_grad()
def reconstruction_sums(sae: SAE, x: torch.Tensor, sums: dict[str, torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate the additive statistics of FVU/L0/dead latents for one batch (raw activation space).

    Sums, not means, so ranks and batches combine by addition; SST comes from sum x and sum |x|^2 in float64
    (sst = sum|x|^2 - n |mean|^2), which needs no second pass for the mean. Returns the sparse codes.
    """
    idx, val = sae.encode(x)
    # Dense decode (one matmul) instead of gathering k decoder rows per token: same x_hat, several times
    # faster; scatter_add so the padded slots (idx -1 -> column 0, value 0) cannot overwrite a real code.
    z = torch.zeros((x.shape[0], sae.cfg.d_sae), dtype=sae.W_dec.dtype, device=x.device)
    z.scatter_add_(1, idx.clamp_min(0), (val * (idx >= 0)).to(z.dtype))
    x_hat = sae.decode(z)
    xd = x.double()
    sums["sse"] += (x - x_hat).double().pow(2).sum()
    sums["sum_x"] += xd.sum(0)
    sums["sum_x2"] += xd.pow(2).sum()
    sums["n"] += x.shape[0]
    ok = idx >= 0
    sums["l0"] += ok.sum()
    sums["fired"][idx[ok]] = 1.0
    return idx, val


def finish_reconstruction(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    n = sums["n"].item()
    if n == 0:
        return {}
    mean = sums["sum_x"] / n
    sst = (sums["sum_x2"] - n * mean.pow(2).sum()).item()
    sse = sums["sse"].item()
    fvu = sse / max(sst, 1e-12)
    return {"fvu": fvu, "fve": 1 - fvu, "mse_per_token": sse / n, "l0": sums["l0"].item() / n,
            "dead_fraction": 1 - (sums["fired"] > 0).double().mean().item(), "eval_tokens": int(n)}


def reduce_sums(sums: dict[str, torch.Tensor], env: DistEnv) -> None:
    """Combine per-rank statistics: sums add; 0/1 masks (fired) are summed too, so '> 0' reads as OR."""
    for k in sorted(sums):
        all_reduce_sum(sums[k], env)


def shard_for_rank(val: ActivationSet, env: DistEnv) -> ActivationSet:
    """This rank's validation rows: whole proteins (protein % world == rank), so pooled metrics stay exact.
    A rank may get none; it still takes part in the reductions."""
    if not env.enabled:
        return val
    keep = [i for i in range(len(val.protein_ids)) if i % env.world_size == env.rank]
    return val.subset_proteins(keep)


class Objective(Protocol):
    """What an architecture contributes to the shared loop."""

    arch: str
    env: DistEnv  # set by fit before training (the loss reads it, e.g. for the dead-latent rescale)

    @property
    def sae(self) -> SAE: ...  # read-only in the protocol, so an objective may hold a TopKSAE or a ProtSAE

    def init(self, sample: ActivationSet) -> None: ...
    def prepare(self, batch: Batch, device: torch.device, env: DistEnv) -> dict[str, Any]: ...
    def __call__(self, **inputs) -> dict[str, Any]: ...
    def evaluate(self, val: ActivationSet, device: torch.device, env: DistEnv, batch_size: int) -> dict: ...
    def selection_key(self, metrics: dict) -> tuple[float, ...]: ...
    def fingerprint(self) -> dict: ...


# ----------------------------------------------------------------------------------------------- state
def resolve_state_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / STATE_NAME
    if not p.exists():
        raise InputError(f"--resume {path}: no training state found (expected {STATE_NAME} in an output directory "
                         "of an earlier `protsae train`, or the file itself)")
    return p


def load_state(path: str | os.PathLike) -> dict:
    p = resolve_state_path(path)
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several error types for corrupt or foreign files
        raise InputError(f"{p}: not a readable training state ({e})") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise InputError(f"{p}: not a protsae training state")
    return state


def _rng_state() -> dict:
    # numpy's stubs pick the legacy=False (dict) overload for a bare call; the default legacy=True returns the
    # tuple for the global (MT19937) state, which is what _set_rng_state reads back.
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]]}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = s["python"]
    random.setstate((p[1], tuple(p[0]), p[2]))


def _atomic_save(obj: Any, path: Path) -> None:
    from protsae_cli.io.atomic import atomic_output

    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def _cpu_state(sae: SAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in sae.state_dict().items()}


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb and not (isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple))
                               and list(va) == list(vb)):
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


# ----------------------------------------------------------------------------------------------- the loop
@dataclass
class FitResult:
    sae: SAE                       # the selected checkpoint (rank 0), else the last weights
    last_state: dict[str, torch.Tensor]  # the final weights (CPU)
    step: int
    total_steps: int
    stopped: bool                        # stopped at cfg.stop_at before the end (resumable)
    history: list[dict]
    evals: list[dict]
    best: dict                           # {"step", "metrics", "key"} or {} (no validation: last)
    seconds: float
    train_metrics: dict = field(default_factory=dict)


def fit(objective: Objective, train: InMemoryRows | ShuffleBufferStream, val: ActivationSet | None,
        cfg: TrainConfig, *, env: DistEnv = SINGLE, device: torch.device | str = "cpu",
        state_dir: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
        progress: Callable[[int, int, dict], None] | None = None, save_after_default: float = 0.0,
        data_fingerprint: dict | None = None) -> FitResult:
    """Train `objective.sae` on `train` and select a checkpoint on `val`; see the module docstring."""
    device = torch.device(device)
    sae = objective.sae
    if cfg.batch_size % env.world_size:
        raise InputError(f"batch size {cfg.batch_size} must be a multiple of the number of processes "
                         f"({env.world_size}): it is the global batch, split evenly over ranks")
    spe = train.steps_per_epoch
    if spe == 0:
        raise InputError(f"only {train.n_rows} training tokens for batch size {cfg.batch_size}; lower --batch-size "
                         "or give more training tokens")
    total = cfg.max_steps or spe * cfg.epochs
    eval_every = cfg.eval_every or spe
    save_after = save_after_default if cfg.save_after is None else cfg.save_after
    eligible_from = int(math.ceil(save_after * total))
    fingerprint = {"objective": objective.fingerprint(), "data": dict(train.fingerprint(), **(data_fingerprint or {})),
                   "train": {k: v for k, v in asdict(cfg).items()
                             if k not in ("device", "log_every", "state_every", "stop_at", "eval_batch_size",
                                          "extra")}}
    fingerprint["train"]["lr_milestones"] = list(cfg.lr_milestones)
    state_path = Path(state_dir) / STATE_NAME if state_dir is not None else None

    history: list[dict] = []
    evals: list[dict] = []
    best: dict = {}
    best_state: dict[str, torch.Tensor] | None = None
    step, elapsed = 0, 0.0
    tokens_since = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    resumed = load_state(resume) if resume is not None else None
    if resumed is not None:
        diffs = _diff(resumed["fingerprint"], fingerprint)
        if diffs:
            raise InputError("cannot resume: this run differs from the saved one in " + "; ".join(diffs[:8])
                             + ("" if len(diffs) <= 8 else f" (+{len(diffs) - 8} more)"))
        missing, unexpected = sae.load_state_dict(resumed["model"], strict=False)
        if missing or unexpected:
            raise InputError(f"cannot resume: saved weights do not fit the model ({missing or unexpected})")
        step, elapsed = int(resumed["step"]), float(resumed["seconds"])
        tokens_since = resumed["tokens_since"].clone()
        history, evals = list(resumed["history"]), list(resumed["evals"])
        best = dict(resumed["best"])
        best_state = resumed.get("best_model") if env.is_main else None
        _set_rng_state(resumed["rng"])
        log.info("resuming at step %d of %d", step, total)
    else:
        objective.init(train.sample(cfg.init_rows))
    sae.to(device).train()
    tokens_since = reduce_tokens_since(tokens_since.to(device), env)
    # An objective may give parameter groups their own peak lr ("lr_scale" x the run's schedule), e.g. ProtSAE's
    # concept predictor, a logistic regression that converges at a far larger step than the dictionary.
    groups: list[dict[str, Any]] = objective.param_groups(cfg.lr) if hasattr(objective, "param_groups") else \
        [{"params": [p for p in sae.parameters() if p.requires_grad]}]
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    opt = torch.optim.Adam(groups, lr=cfg.lr, betas=(0.9, 0.999))
    if resumed is not None:
        opt.load_state_dict(resumed["optimizer"])
    model: nn.Module = objective  # type: ignore[assignment]
    objective.env = env
    if env.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Buffers (normalisation) are fitted identically on every rank from the same sample and never change;
        # syncing them every forward would be wasted traffic.
        import inspect

        sync: dict[str, Any] = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False})
        model = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=getattr(objective, "unused_params", False), **sync)
    val_local = shard_for_rank(val, env) if val is not None and len(val) else None

    def save_state(final: bool) -> None:
        if state_path is None or not env.is_main:
            return
        _atomic_save({"format": STATE_FORMAT, "version": 1, "step": step, "total_steps": total, "final": final,
                      "fingerprint": fingerprint, "sae_config": sae.cfg.to_json_dict(), "model": _cpu_state(sae),
                      "optimizer": opt.state_dict(), "tokens_since": tokens_since.cpu(), "history": history,
                      "evals": evals, "best": best, "best_model": best_state, "rng": _rng_state(),
                      "seconds": elapsed + time.perf_counter() - t0, "world_size": env.world_size}, state_path)

    def run_eval() -> None:
        nonlocal best, best_state
        rec = {"step": step, "epoch": step / spe, "lr": opt.param_groups[0]["lr"],
               "seconds": elapsed + time.perf_counter() - t0}
        if val_local is not None:
            sae.eval()
            # `refit` (optional) updates fitted, non-learned state on validation data before it is measured.
            fitted = objective.refit(val_local, device, env, cfg.eval_batch_size) \
                if hasattr(objective, "refit") else {}
            rec["val"] = {**objective.evaluate(val_local, device, env, cfg.eval_batch_size), **fitted}
            sae.train()
            if step >= eligible_from:
                key = list(objective.selection_key(rec["val"]))
                if not best or key < best["key"]:
                    best = {"step": step, "key": key, "metrics": rec["val"]}
                    best_state = _cpu_state(sae) if env.is_main else None
        evals.append(rec)
        if env.is_main and "val" in rec:
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in rec["val"].items()
                                                  if isinstance(v, float)))

    t0 = time.perf_counter()
    run: dict[str, torch.Tensor] = {}
    n_run = 0
    stopped = False
    while step < total and not stopped:
        epoch, skip = divmod(step, spe)
        for batch in train.epoch(epoch, skip):
            lr = learning_rate(step, total, cfg)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            inputs = objective.prepare(batch, device, env)
            dead = tokens_since > cfg.dead_after_tokens
            out = model(dead=dead, **inputs)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            project_decoder_grad(sae)
            opt.step()
            sae.normalize_decoder()
            fired = reduce_fired(out["fired"], env)
            tokens_since += cfg.batch_size
            tokens_since[fired] = 0
            step += 1
            for k, v in out["logs"].items():
                run[k] = run.get(k, 0.0) + v.detach().float()
            run["dead_fraction"] = run.get("dead_fraction", 0.0) + dead.float().mean()
            n_run += 1
            shown: dict = {}
            if step % cfg.log_every == 0 or step == total:
                means = torch.stack([run[k] / n_run for k in sorted(run)])
                all_reduce_sum(means, env)
                shown = {k: v / env.world_size for k, v in zip(sorted(run), means.tolist(), strict=True)}
                history.append({"step": step, **shown, "lr": opt.param_groups[0]["lr"],
                                "seconds": elapsed + time.perf_counter() - t0})
                run, n_run = {}, 0
            if step % eval_every == 0 or step == total:
                run_eval()
            if progress is not None:
                progress(step, total, shown)
            if step == total or (cfg.state_every and step % cfg.state_every == 0) or step == cfg.stop_at:
                save_state(final=step == total)
            if cfg.stop_at is not None and step >= cfg.stop_at and step < total:
                stopped = True
                break
            if step >= total:
                break
    seconds = elapsed + time.perf_counter() - t0
    last_state = _cpu_state(sae)
    if not stopped and best_state is not None:
        sae.load_state_dict(best_state)
    sae.eval()
    return FitResult(sae=sae, last_state=last_state, step=step, total_steps=total, stopped=stopped, history=history,
                     evals=evals, best=best, seconds=seconds)
