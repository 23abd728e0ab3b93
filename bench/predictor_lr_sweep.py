"""Diagnostic behind ProtSAE's `predictor_lr`: how far Adam gets a concept predictor in an SAE's budget.

Under the stop-gradient, ProtSAE's concept predictor sigmoid(W (x~) + b) only ever sees the BCE on concept labels,
i.e. it is a logistic regression trained by Adam for as many steps as the SAE. This script trains exactly that,
alone, on the cached activations of `bench/protsae_vs_topk.py prepare` (normalised like the given SAE: its
normalisation and b_dec), at several peak learning rates with the SAE's batch size, step count and cosine decay,
and reports per concept the test F1 at a cut chosen on the validation proteins (400 quantiles of the score), with
the given SAE's own predictor as a reference row.

    python bench/predictor_lr_sweep.py --sae /tmp/pvt_long/saes/protsae_v1 --lrs 2e-3,1e-2,2e-2,5e-2 --steps 1200
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protsae_vs_topk as B  # noqa: E402  (the comparison's splits, labels and concepts)


def best_cut_f1(score_v: torch.Tensor, y_v: torch.Tensor, score_t: torch.Tensor, y_t: torch.Tensor,
                n_cuts: int = 400) -> list[float]:
    """Per concept: the cut of best validation F1 among `n_cuts` score quantiles, and the test F1 at it."""
    g = torch.Generator().manual_seed(0)
    out = []
    for j in range(score_v.shape[1]):
        ok_v, ok_t = ~torch.isnan(y_v[:, j]), ~torch.isnan(y_t[:, j])
        s, y = score_v[ok_v, j], y_v[ok_v, j] > 0
        sample = s[torch.randperm(len(s), generator=g)[:200_000]]
        cuts = torch.quantile(sample, torch.linspace(0.5, 0.9995, n_cuts))
        f1 = [(2 * ((s > c) & y).sum() / ((s > c).sum() + y.sum())).item() for c in cuts]
        c = cuts[int(np.argmax(f1))]
        s2, y2 = score_t[ok_t, j], y_t[ok_t, j] > 0
        out.append((2 * ((s2 > c) & y2).sum() / ((s2 > c).sum() + y2.sum())).item())
    return out


def train_predictor(x: torch.Tensor, y: torch.Tensor, lr: float, steps: int, batch: int, seed: int):
    """Adam on the masked BCE, unit-norm random init and prior-logit bias as ProtSAE starts, cosine decay."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(y.shape[1], x.shape[1], generator=g)
    W = (W / W.norm(dim=1, keepdim=True)).requires_grad_()
    prior = torch.nanmean(y, 0).clamp(1e-4, 1 - 1e-4)
    b = (prior.log() - (-prior).log1p()).clone().requires_grad_()
    opt = torch.optim.Adam([W, b], lr=lr)
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * s / steps))
        i = torch.randint(0, len(x), (batch,), generator=g)
        yy = y[i]
        ok = ~torch.isnan(yy)
        loss = (F.binary_cross_entropy_with_logits(x[i] @ W.T + b, torch.nan_to_num(yy), reduction="none") * ok).sum() \
            / ok.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return W.detach(), b.detach()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", required=True, help="a ProtSAE of the comparison (normalisation and reference row)")
    p.add_argument("--data", default=os.environ.get("PROTSAE_SHARED_DATA"),
                   help="the data folder of docs/METHOD.md §4 (default $PROTSAE_SHARED_DATA)")
    p.add_argument("--work", default="/tmp/protsae_vs_topk", help="the comparison's work dir (activation caches)")
    p.add_argument("--lrs", default="2e-3,1e-2,2e-2,5e-2")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--seeds", default="0,1")
    a = p.parse_args()
    if a.data is None:
        p.error("--data DIR or $PROTSAE_SHARED_DATA is needed: the data folder of docs/METHOD.md §4")
    from protsae_cli.sae.checkpoint import load_sae

    torch.set_num_threads(2)
    splits, names = B.probe_splits(Path(a.data), Path(a.work))
    sae, _ = load_sae(a.sae)
    with torch.no_grad():  # the predictor's input: x~ = normalised activations minus b_dec
        (xtr, ytr), (xva, yva), (xte, yte) = ((sae.normalize(x) - sae.b_dec, y) for x, y in splits)
    print("| predictor | " + " | ".join(names) + " | mean |")
    print("|---|" + "---|" * (len(names) + 1))
    with torch.no_grad():
        ref = best_cut_f1(xva @ sae.W_pred.T + sae.b_pred, yva, xte @ sae.W_pred.T + sae.b_pred, yte)
    print(f"| {a.sae} | " + " | ".join(f"{v:.3f}" for v in ref) + f" | {np.mean(ref):.3f} |", flush=True)
    for lr in (float(v) for v in a.lrs.split(",")):
        for seed in (int(v) for v in a.seeds.split(",")):
            W, b = train_predictor(xtr, ytr, lr, a.steps, a.batch_size, seed)
            r = best_cut_f1(xva @ W.T + b, yva, xte @ W.T + b, yte)
            print(f"| Adam lr {lr:g}, {a.steps} steps, seed {seed} | " + " | ".join(f"{v:.3f}" for v in r)
                  + f" | {np.mean(r):.3f} |", flush=True)


if __name__ == "__main__":
    main()
