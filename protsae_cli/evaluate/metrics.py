"""Evaluation metrics for SAEs on protein LM activations, with the definitions of METHOD.md §3.1-3.3.

Three families, each built so evaluation never holds all activations or a dense token x latent matrix:

- reconstruction and sparsity (`ReconstructionStats`, streaming, float64 accumulators, exact FVU through
  Chan's parallel variance merge) and LM-fidelity ratios (`loss_recovered`, `kl_score`);
- concept alignment by the InterPLM protocol (`concept_counts` -> `ConceptCounts`, selection on valid and
  report on test, ProtSAE's defined-latent and top-10 relevance F1). Counts are sparse matrix products
  ((a > tau) as CSR [tokens, latents]) x (labels [tokens, concepts]), so 1e5 residues x 4096 latents x 20
  concepts x 5 thresholds takes seconds;
- protein-level probing with DeepGO-SE's definitions (`propagate_scores`, `fmax`, `smin`, `aupr_deepgo`,
  `auc_per_term`, `probe_metrics`).

Inputs may be numpy arrays or torch tensors (moved to CPU). Sparse codes follow the encode backends'
convention: (idx int [N, k], val float [N, k]) with idx -1 / val 0 in empty slots.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

from protsae_cli.evaluate.options import DEFAULT_THRESHOLDS  # noqa: F401 (defined with eval's options)

DEEPGO_THRESHOLDS: np.ndarray = np.arange(101) / 100.0


def _np(a: Any, dtype: Any = None) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


# ================================================================================ reconstruction

class ReconstructionStats:
    """Streaming reconstruction, sparsity and firing statistics over an evaluation token set.

    `update(x, x_hat, z_idx, z_val=None, protein_index=None)` once per batch, `result()` at the end.
    Means and per-dimension variances are merged with Chan's formula in float64, so FVU is the exact
    Σ‖x - x_hat‖² / Σ‖x - x̄‖² over all tokens (x̄ the global mean), not an average of per-batch ratios,
    which would use each batch's own mean and overstate the variance explained on small batches.
    """

    def __init__(self, d_sae: int | None = None, dense_threshold: float = 0.5, hist_step: float = 0.25):
        self.d_sae = d_sae
        self.dense_threshold = dense_threshold
        self.hist_step = hist_step
        self.n = 0
        self.sse = 0.0
        self.sse_dim: np.ndarray | None = None
        self.x_mean: np.ndarray | None = None
        self.x_m2: np.ndarray | None = None
        self.r_mean: np.ndarray | None = None
        self.r_m2: np.ndarray | None = None
        self.cos_sum = 0.0
        self.l2_ratio_sum = 0.0
        self.l0_hist = np.zeros(1, dtype=np.int64)
        self.fire_counts = np.zeros(d_sae or 0, dtype=np.int64)
        self.protein_l0: dict[int, list[int]] = {}
        self.has_codes = False

    @staticmethod
    def _merge(n_a: int, mean_a: np.ndarray | None, m2_a: np.ndarray | None,
               block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_b = block.shape[0]
        mean_b = block.mean(0)
        m2_b = ((block - mean_b) ** 2).sum(0)
        if mean_a is None or n_a == 0:
            return mean_b, m2_b
        n = n_a + n_b
        delta = mean_b - mean_a
        return mean_a + delta * (n_b / n), m2_a + m2_b + delta ** 2 * (n_a * n_b / n)

    def update(self, x: Any, x_hat: Any, z_idx: Any = None, z_val: Any = None, protein_index: Any = None) -> None:
        x = _np(x, np.float64)
        x_hat = _np(x_hat, np.float64)
        if x.shape != x_hat.shape or x.ndim != 2:
            raise ValueError(f"x and x_hat must both be [N, d]; got {x.shape} and {x_hat.shape}")
        if x.shape[0] == 0:
            return
        r = x - x_hat
        sq = (r ** 2).sum(1)
        self.sse += float(sq.sum())
        self.sse_dim = (r ** 2).sum(0) if self.sse_dim is None else self.sse_dim + (r ** 2).sum(0)
        self.x_mean, self.x_m2 = self._merge(self.n, self.x_mean, self.x_m2, x)
        self.r_mean, self.r_m2 = self._merge(self.n, self.r_mean, self.r_m2, r)
        nx = np.linalg.norm(x, axis=1)
        nxh = np.linalg.norm(x_hat, axis=1)
        self.cos_sum += float(((x * x_hat).sum(1) / np.maximum(nx * nxh, 1e-12)).sum())
        self.l2_ratio_sum += float((nxh / np.maximum(nx, 1e-12)).sum())
        self.n += x.shape[0]
        if z_idx is not None:
            self._update_codes(_np(z_idx), None if z_val is None else _np(z_val, np.float64), protein_index)

    def _update_codes(self, idx: np.ndarray, val: np.ndarray | None, protein_index: Any) -> None:
        self.has_codes = True
        fired = idx >= 0
        if val is not None:
            fired &= val > 0
        l0 = fired.sum(1)
        hist = np.bincount(l0)
        if hist.size > self.l0_hist.size:
            self.l0_hist = np.pad(self.l0_hist, (0, hist.size - self.l0_hist.size))
        self.l0_hist[: hist.size] += hist
        lat = idx[fired]
        size = max(self.d_sae or 0, int(lat.max()) + 1 if lat.size else 0, self.fire_counts.size)
        if size > self.fire_counts.size:
            self.fire_counts = np.pad(self.fire_counts, (0, size - self.fire_counts.size))
        self.fire_counts += np.bincount(lat, minlength=self.fire_counts.size)
        if protein_index is not None:
            pidx = _np(protein_index).astype(np.int64)
            uniq, inv = np.unique(pidx, return_inverse=True)
            sums = np.bincount(inv, weights=l0)
            cnts = np.bincount(inv)
            for p, s, c in zip(uniq.tolist(), sums.tolist(), cnts.tolist(), strict=True):
                acc = self.protein_l0.setdefault(p, [0, 0])
                acc[0] += int(s)
                acc[1] += int(c)

    def firing_frequency(self) -> np.ndarray:
        """Fraction of evaluated tokens on which each latent is non-zero."""
        return self.fire_counts / max(self.n, 1)

    def result(self) -> dict[str, Any]:
        """JSON-ready metrics. FVU is ProtSAE's normalised MSE; `variance_explained_interplm` removes the mean
        residual first (1 - Σ_j Var(x_j - x_hat_j) / Σ_j Var(x_j)), so a constant offset costs nothing there."""
        if self.n == 0:
            raise ValueError("no tokens were evaluated")
        # update() sets these before it counts any token, so n > 0 means they are arrays.
        assert self.sse_dim is not None and self.x_m2 is not None and self.r_m2 is not None
        n, d = self.n, self.sse_dim.size
        sst = float(self.x_m2.sum())
        fvu = self.sse / sst if sst > 0 else math.nan
        per_dim = self.sse_dim / n
        out: dict[str, Any] = {
            "n_tokens": n,
            "d_model": d,
            "mse_per_token": self.sse / n,
            "mse_per_element": self.sse / (n * d),
            "mse_per_dim": {"mean": float(per_dim.mean()), "std": float(per_dim.std()), "max": float(per_dim.max())},
            "fvu": fvu,
            "fve": 1.0 - fvu,
            "variance_explained_interplm": 1.0 - float(self.r_m2.sum()) / sst if sst > 0 else math.nan,
            "cosine_mean": self.cos_sum / n,
            "l2_ratio_mean": self.l2_ratio_sum / n,
        }
        if self.has_codes:
            out.update(self._code_result())
        return out

    def _code_result(self) -> dict[str, Any]:
        n = self.n
        values = np.arange(self.l0_hist.size)
        cum = np.cumsum(self.l0_hist)
        lo = int(np.searchsorted(cum, (n - 1) // 2, side="right"))
        hi = int(np.searchsorted(cum, n // 2, side="right"))
        freq = self.firing_frequency()
        d_sae = freq.size
        dead = int((self.fire_counts == 0).sum())
        dense = int((freq > self.dense_threshold).sum())
        alive = freq[freq > 0]
        lo_edge = min(-1.0, math.floor(math.log10(1.0 / n) / self.hist_step) * self.hist_step)
        edges = np.arange(lo_edge, self.hist_step / 2, self.hist_step)
        if edges[-1] < 0:
            edges = np.append(edges, 0.0)
        counts, edges = np.histogram(np.log10(alive), bins=edges) if alive.size else (np.zeros(edges.size - 1,
                                                                                               np.int64), edges)
        per_protein = None
        if self.protein_l0:
            per_protein = float(np.mean([s / c for s, c in self.protein_l0.values()]))
        return {
            "l0_mean": float((values * self.l0_hist).sum() / n),
            "l0_median": (float(values[lo]) + float(values[hi])) / 2.0,
            "l0_per_protein_mean": per_protein,
            "d_sae": d_sae,
            "dead": {"count": dead, "fraction": dead / d_sae if d_sae else math.nan, "token_budget": n},
            "dense": {"count": dense, "fraction": dense / d_sae if d_sae else math.nan,
                      "threshold": self.dense_threshold},
            "firing_frequency_log10_hist": {"edges": edges.tolist(), "counts": counts.astype(int).tolist(),
                                            "n_dead_excluded": dead},
        }


# ================================================================================ LM fidelity

def loss_recovered(ce_orig: float, ce_sae: float, ce_ablate: float, floor: float = 0.05) -> dict[str, Any]:
    """Percentage of the ablation's CE damage that the SAE splice recovers (METHOD.md §3.1).

    LR = (CE_ablate - CE_sae) / (CE_ablate - CE_orig) x 100, reported unclipped and clipped to [0, 100]
    (InterPLM). When the ablation barely hurts (headroom below `floor` nats) the ratio divides noise by
    almost nothing, so both values are None ("undefined") rather than a huge number.
    """
    headroom = float(ce_ablate) - float(ce_orig)
    if not headroom >= floor:  # also catches NaN
        return {"unclipped": None, "clipped": None, "headroom": headroom, "defined": False}
    lr = (float(ce_ablate) - float(ce_sae)) / headroom * 100.0
    return {"unclipped": lr, "clipped": min(100.0, max(0.0, lr)), "headroom": headroom, "defined": True}


def kl_score(kl_sae: float, kl_ablate: float, floor: float = 1e-6) -> float | None:
    """SAEBench's 1 - KL_sae / KL_ablate; None when the ablation itself changes the distribution by ~nothing."""
    if not float(kl_ablate) > floor:
        return None
    return 1.0 - float(kl_sae) / float(kl_ablate)


def mean_kl(logits_ref: Any, logits_other: Any, mask: Any = None) -> float:
    """mean_t KL(p_ref,t || p_other,t) over positions (mask: bool [...], True = counted); torch tensors."""
    import torch

    lp = torch.log_softmax(torch.as_tensor(logits_ref).double(), -1)
    lq = torch.log_softmax(torch.as_tensor(logits_other).double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    if mask is not None:
        kl = kl[torch.as_tensor(mask, dtype=torch.bool)]
    return float(kl.mean()) if kl.numel() else math.nan


def argmax_agreement(logits_ref: Any, logits_other: Any, mask: Any = None) -> float:
    """Fraction of positions with the same argmax token (VG&A's sequence agreement)."""
    import torch

    same = torch.as_tensor(logits_ref).argmax(-1) == torch.as_tensor(logits_other).argmax(-1)
    if mask is not None:
        same = same[torch.as_tensor(mask, dtype=torch.bool)]
    return float(same.float().mean()) if same.numel() else math.nan


# ================================================================================ concept alignment

def latent_max(idx: Any, val: Any, d_sae: int, out: np.ndarray | None = None) -> np.ndarray:
    """Running per-latent maximum activation over a reference set (call per batch, passing `out` back)."""
    idx = _np(idx).astype(np.int64)
    val = _np(val, np.float64)
    ok = idx >= 0
    m = np.zeros(d_sae, np.float64) if out is None else out
    if ok.any():
        np.maximum.at(m, idx[ok], val[ok])
    return m


def normalisation_scales(max_act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scales, alive): divide by the reference maximum; latents that never fired get scale 1 and alive False."""
    max_act = np.asarray(max_act, np.float64)
    alive = max_act > 0
    return np.where(alive, max_act, 1.0), alive


@dataclass
class ConceptCounts:
    """Additive confusion counts per (threshold, latent, concept) for one split.

    Counts from several `concept_counts` calls on the same split add up (`+`) as long as the same scales
    were used and no annotated instance is split across calls (cut batches at protein boundaries).
    """

    thresholds: np.ndarray                 # [T]
    tp: np.ndarray                         # [T, L, C] tokens with a > tau and label 1
    fired: np.ndarray                      # [T, L]    tokens with a > tau
    positives: np.ndarray                  # [C]       tokens with label 1
    alive: np.ndarray                      # [L]       latent fired on the reference set
    n_tokens: int
    inst_hits: np.ndarray | None = None    # [T, L, C] instances with >= 1 residue a > tau
    n_instances: np.ndarray | None = None  # [C]

    def __add__(self, other: ConceptCounts) -> ConceptCounts:
        if not np.array_equal(self.thresholds, other.thresholds) or self.tp.shape != other.tp.shape:
            raise ValueError("ConceptCounts with different thresholds or shapes cannot be added")
        inst = None
        if self.inst_hits is not None and other.inst_hits is not None:
            # concept_counts sets inst_hits and n_instances together.
            assert self.n_instances is not None and other.n_instances is not None
            inst = (self.inst_hits + other.inst_hits, self.n_instances + other.n_instances)
        return ConceptCounts(self.thresholds, self.tp + other.tp, self.fired + other.fired,
                             self.positives + other.positives, self.alive & other.alive,
                             self.n_tokens + other.n_tokens, *(inst or (None, None)))

    @property
    def fp(self) -> np.ndarray:
        return self.fired[:, :, None] - self.tp

    def precision(self) -> np.ndarray:
        """[T, L, C]; 0 where the latent never passes the threshold."""
        fired = np.broadcast_to(self.fired[:, :, None], self.tp.shape)
        return np.divide(self.tp, fired, out=np.zeros(self.tp.shape), where=fired > 0)

    def recall(self, kind: str = "residue") -> np.ndarray:
        """[T, L, C]: residue recall TP / P, or instance recall (instances hit / instances)."""
        if kind == "residue":
            num, den = self.tp, self.positives
        elif kind == "instance":
            if self.inst_hits is None or self.n_instances is None:
                raise ValueError("instance recall needs instance_ids when counting")
            num, den = self.inst_hits, self.n_instances
        else:
            raise ValueError(f"unknown recall kind {kind!r}; expected residue or instance")
        den = np.broadcast_to(den[None, None, :], num.shape)
        return np.divide(num, den, out=np.zeros(num.shape), where=den > 0)

    def f1(self, kind: str = "residue") -> np.ndarray:
        """[T, L, C] F1 = 2PR / (P + R), 0 where P + R = 0."""
        p, r = self.precision(), self.recall(kind)
        s = p + r
        return np.divide(2 * p * r, s, out=np.zeros(s.shape), where=s > 0)

    def n_positive(self, kind: str = "residue") -> np.ndarray:
        """Per-concept positives behind the recall denominator (tokens, or instances)."""
        if kind == "residue":
            return self.positives
        if self.n_instances is None:
            raise ValueError("instance recall needs instance_ids when counting")
        return self.n_instances


def _binary_csr(mask: np.ndarray, cols: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """CSR [N, n_cols] with a 1 at (row, cols[row, j]) wherever mask[row, j]; columns distinct per row."""
    counts = mask.sum(1)
    indptr = np.zeros(mask.shape[0] + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    sel = cols[mask]
    return sp.csr_matrix((np.ones(sel.size, np.float64), sel, indptr), shape=(mask.shape[0], n_cols))


def concept_counts(idx: Any, val: Any, labels: Any, scales: np.ndarray,
                   thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS, instance_ids: Any = None,
                   alive: np.ndarray | None = None) -> ConceptCounts:
    """Confusion counts of (a > tau) against concept labels for every (threshold, latent, concept).

    Args:
        idx, val: sparse codes [N, k] (idx -1 = empty slot).
        labels: bool [N, C] residue labels.
        scales: [L] per-latent normalisers from the reference set (`normalisation_scales`); a = val / scale.
        thresholds: the tau grid (InterPLM default 0, 0.15, 0.5, 0.6, 0.8); "active" means a > tau.
        instance_ids: optional int [N, C]; the annotated instance (region, site) of concept c that residue t
            belongs to, -1 if none. Ids only need to be distinct within a concept.
        alive: [L] latents eligible for selection (default: scale came from a latent that fired).
    """
    idx = _np(idx).astype(np.int64)
    val = _np(val, np.float64)
    y = _np(labels).astype(bool)
    scales = np.asarray(scales, np.float64)
    thr = np.asarray(thresholds, np.float64)
    n_tok, n_lat, n_con = idx.shape[0], scales.size, y.shape[1]
    if y.shape[0] != n_tok:
        raise ValueError(f"labels have {y.shape[0]} rows for {n_tok} code rows")
    valid = (idx >= 0) & (val > 0)
    safe = np.where(valid, idx, 0)
    if valid.any() and int(safe.max()) >= n_lat:
        raise ValueError(f"latent index {int(safe.max())} >= number of scales {n_lat}")
    a = np.where(valid, val / scales[safe], -np.inf)
    # Only rows with some positive label contribute TP; restricting the product to them keeps it cheap.
    pos_rows = np.flatnonzero(y.any(1))
    y_pos = sp.csr_matrix(y[pos_rows].astype(np.float64))
    inst_cols = None
    if instance_ids is not None:
        inst = _np(instance_ids).astype(np.int64)
        if inst.shape != y.shape:
            raise ValueError(f"instance_ids must be [N, C] like labels; got {inst.shape}")
        r_i, c_i = np.nonzero(inst >= 0)
        keys = np.stack([c_i, inst[r_i, c_i]], 1)
        uniq, col = np.unique(keys, axis=0, return_inverse=True)
        col = col.reshape(-1)
        inst_concept = uniq[:, 0]
        n_inst_cols = uniq.shape[0]
        # One (residue, concept) pair names one instance, so every entry is a single membership.
        membership = sp.csr_matrix((np.ones(r_i.size), (r_i, col)), shape=(n_tok, n_inst_cols))
        n_instances = np.bincount(inst_concept, minlength=n_con).astype(np.int64)
        inst_cols = (membership, inst_concept)

    tp = np.zeros((thr.size, n_lat, n_con), np.int64)
    fired = np.zeros((thr.size, n_lat), np.int64)
    hits = np.zeros((thr.size, n_lat, n_con), np.int64) if inst_cols is not None else None
    for j, tau in enumerate(thr):
        act = a > tau
        fired[j] = np.bincount(safe[act], minlength=n_lat)
        if pos_rows.size:
            A_pos = _binary_csr(act[pos_rows], safe[pos_rows], n_lat)
            tp[j] = np.rint((A_pos.T @ y_pos).toarray()).astype(np.int64)
        if inst_cols is not None:
            assert hits is not None  # allocated above exactly when inst_cols is set
            membership, inst_concept = inst_cols
            A = _binary_csr(act, safe, n_lat)
            H = (A.T @ membership).tocoo()
            hit = H.data > 0
            key = H.row[hit].astype(np.int64) * n_con + inst_concept[H.col[hit]]
            hits[j] = np.bincount(key, minlength=n_lat * n_con).reshape(n_lat, n_con)
    return ConceptCounts(
        thresholds=thr, tp=tp, fired=fired, positives=y.sum(0).astype(np.int64),
        alive=np.ones(n_lat, bool) if alive is None else np.asarray(alive, bool), n_tokens=n_tok,
        inst_hits=hits, n_instances=n_instances if inst_cols is not None else None,
    )


def _best_threshold(f1_valid: np.ndarray) -> np.ndarray:
    """[L, C] index of the best threshold on valid (first, i.e. lowest tau, among ties)."""
    return np.argmax(f1_valid, axis=0)


def _take_tau(table: np.ndarray, tau_idx: np.ndarray) -> np.ndarray:
    """table [T, L, C] gathered at tau_idx [L, C] -> [L, C]."""
    return np.take_along_axis(table, tau_idx[None], axis=0)[0]


@dataclass
class ConceptSelection:
    """Per-concept best (latent, threshold) chosen on valid, with its test scores, plus the summary."""

    latent: np.ndarray          # [C] chosen latent (-1: concept not evaluable)
    threshold: np.ndarray       # [C] chosen tau (NaN if none)
    valid_f1: np.ndarray        # [C]
    test_f1: np.ndarray         # [C] NaN where the concept has no positives in valid or test
    test_precision: np.ndarray  # [C]
    test_recall: np.ndarray     # [C]
    summary: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, concept_names: Sequence[str] | None = None) -> dict[str, Any]:
        names = list(concept_names) if concept_names is not None else [str(i) for i in range(self.latent.size)]
        rows = []
        for c, name in enumerate(names):
            rows.append({"concept": name, "latent": int(self.latent[c]),
                         "threshold": _f(self.threshold[c]), "valid_f1": _f(self.valid_f1[c]),
                         "test_f1": _f(self.test_f1[c]), "test_precision": _f(self.test_precision[c]),
                         "test_recall": _f(self.test_recall[c])})
        return {"summary": self.summary, "per_concept": rows}


def _f(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def _candidate_mask(valid: ConceptCounts, candidate_latents: Iterable[int] | None) -> np.ndarray:
    mask = valid.alive.copy()
    if candidate_latents is not None:
        keep = np.zeros_like(mask)
        keep[np.asarray(list(candidate_latents), np.int64)] = True
        mask &= keep
    return mask


def select_best_on_valid_and_report_test(valid: ConceptCounts, test: ConceptCounts, recall: str = "residue",
                                         candidate_latents: Iterable[int] | None = None,
                                         f1_cut: float = 0.5) -> ConceptSelection:
    """InterPLM selection: per concept, argmax of valid F1 over (alive candidate latent, tau); report test.

    Summary: `coverage` = #concepts with test F1 > f1_cut; `mean_best_test_f1` over evaluable concepts
    (positives in both splits); `n_latents_f1_gt` = #latents with test F1 > f1_cut for some concept, each
    (latent, concept) pair scored at its own valid-chosen tau, so no test labels pick anything.
    Ties go to the lowest latent index, then the lowest threshold.
    """
    if not np.array_equal(valid.thresholds, test.thresholds):
        raise ValueError("valid and test counts use different threshold grids")
    f1v, f1t = valid.f1(recall), test.f1(recall)
    pt, rt = test.precision(), test.recall(recall)
    cand = _candidate_mask(valid, candidate_latents)
    n_t, n_l, n_c = f1v.shape
    masked = np.where(cand[None, :, None], f1v, -np.inf)
    flat = masked.transpose(1, 0, 2).reshape(n_l * n_t, n_c)  # latent-major: ties -> lowest latent, then tau
    best = np.argmax(flat, axis=0)
    lat, tau_i = best // n_t, best % n_t
    cols = np.arange(n_c)
    evaluable = (valid.n_positive(recall) > 0) & (test.n_positive(recall) > 0) & cand.any()
    nan = np.full(n_c, np.nan)
    sel = ConceptSelection(
        latent=np.where(evaluable, lat, -1),
        threshold=np.where(evaluable, valid.thresholds[tau_i], np.nan),
        valid_f1=np.where(evaluable, flat[best, cols], nan),
        test_f1=np.where(evaluable, f1t[tau_i, lat, cols], nan),
        test_precision=np.where(evaluable, pt[tau_i, lat, cols], nan),
        test_recall=np.where(evaluable, rt[tau_i, lat, cols], nan),
    )
    # Latents participating in a good pair: each pair at its own valid-best tau.
    tau_pair = _best_threshold(np.where(cand[None, :, None], f1v, -np.inf))
    pair_test = _take_tau(f1t, tau_pair)
    pair_ok = (pair_test > f1_cut) & cand[:, None] & evaluable[None, :]
    ev = sel.test_f1[evaluable]
    sel.summary = {
        "recall": recall,
        "n_concepts": int(n_c),
        "n_evaluable": int(evaluable.sum()),
        "coverage": int((ev > f1_cut).sum()),
        "f1_cut": f1_cut,
        "mean_best_test_f1": float(ev.mean()) if ev.size else None,
        "n_latents_f1_gt": int(pair_ok.any(1).sum()),
    }
    return sel


def defined_latent_f1(valid: ConceptCounts, test: ConceptCounts, n_concepts: int | None = None,
                      recall: str = "residue") -> dict[str, Any]:
    """ProtSAE's defined-latent F1: latent c against concept c, tau chosen on valid, F1 reported on test.

    Needs the concept columns in latent order (column c = the concept bound to latent c).
    """
    m = n_concepts if n_concepts is not None else valid.tp.shape[2]
    f1v, f1t = valid.f1(recall), test.f1(recall)
    c = np.arange(m)
    diag_v = f1v[:, c, c]  # [T, m]
    tau_i = np.argmax(diag_v, axis=0)
    test_f1 = f1t[tau_i, c, c].astype(np.float64)
    evaluable = (valid.n_positive(recall)[:m] > 0) & (test.n_positive(recall)[:m] > 0)
    test_f1 = np.where(evaluable, test_f1, np.nan)
    ev = test_f1[evaluable]
    return {"threshold": valid.thresholds[tau_i], "valid_f1": diag_v[tau_i, c], "test_f1": test_f1,
            "mean_test_f1": float(ev.mean()) if ev.size else None, "n_evaluable": int(evaluable.sum())}


def top_relevance_f1(valid: ConceptCounts, test: ConceptCounts, top: int = 10, recall: str = "residue",
                     candidate_latents: Iterable[int] | None = None) -> dict[str, Any]:
    """Top-k relevance F1 (METHOD.md §3.2 (ii)): rank latents per concept by best-tau valid F1, take the top
    `top`, score each on test at its valid-best tau; per concept the mean and max over those, then averaged
    over evaluable concepts."""
    f1v, f1t = valid.f1(recall), test.f1(recall)
    cand = _candidate_mask(valid, candidate_latents)
    masked = np.where(cand[None, :, None], f1v, -np.inf)
    tau_pair = _best_threshold(masked)                    # [L, C]
    relevance = _take_tau(masked, tau_pair)               # [L, C]
    pair_test = _take_tau(f1t, tau_pair)                  # [L, C]
    n_top = min(top, int(cand.sum()))
    # Stable sort on -relevance: ties keep the lower latent index first.
    order = np.argsort(-relevance, axis=0, kind="stable")[:n_top]  # [top, C]
    top_test = np.take_along_axis(pair_test, order, axis=0)
    evaluable = (valid.n_positive(recall) > 0) & (test.n_positive(recall) > 0) & (n_top > 0)
    mean_c = np.where(evaluable, top_test.mean(0) if n_top else np.nan, np.nan)
    max_c = np.where(evaluable, top_test.max(0) if n_top else np.nan, np.nan)
    return {"top": n_top, "latents": order.T, "mean_f1": mean_c, "max_f1": max_c,
            "mean_of_mean_f1": float(np.nanmean(mean_c)) if evaluable.any() else None,
            "mean_of_max_f1": float(np.nanmean(max_c)) if evaluable.any() else None}


def binary_f1(pred: Any, labels: Any) -> dict[str, np.ndarray]:
    """Per-column precision, recall, F1 of bool predictions [N, C] (e.g. pi > 0.5, or max-pooled per protein)."""
    p = _np(pred).astype(bool)
    y = _np(labels).astype(bool)
    tp = (p & y).sum(0).astype(np.float64)
    n_pred, n_pos = p.sum(0), y.sum(0)
    prec = np.divide(tp, n_pred, out=np.zeros_like(tp), where=n_pred > 0)
    rec = np.divide(tp, n_pos, out=np.zeros_like(tp), where=n_pos > 0)
    s = prec + rec
    return {"precision": prec, "recall": rec, "f1": np.divide(2 * prec * rec, s, out=np.zeros_like(s), where=s > 0)}


# ================================================================================ protein-level probing

def _descendant_lists(ancestors: Any, n_terms: int) -> list[np.ndarray]:
    """desc[g] = terms f having g among their ancestors, plus g itself."""
    desc: list[list[int]] = [[g] for g in range(n_terms)]
    if isinstance(ancestors, np.ndarray) or hasattr(ancestors, "detach"):
        A = _np(ancestors).astype(bool)
        if A.shape != (n_terms, n_terms):
            raise ValueError(f"ancestor matrix must be [{n_terms}, {n_terms}], got {A.shape}")
        fs, gs = np.nonzero(A)
        for f, g in zip(fs.tolist(), gs.tolist(), strict=True):
            if f != g:
                desc[g].append(f)
    else:
        items = ancestors.items() if isinstance(ancestors, Mapping) else enumerate(ancestors)
        for f, ancs in items:
            for g in ancs:
                if g != f:
                    desc[int(g)].append(int(f))
    return [np.unique(np.asarray(d, np.int64)) for d in desc]


def propagate_scores(scores: Any, ancestors: Any) -> np.ndarray:
    """Each term's score becomes the max over itself and its descendants (DeepGO-SE), so a prediction of a
    specific term implies at least that confidence for every ancestor.

    `ancestors`: bool matrix [F, F] with A[f, g] = g is an ancestor of f, or a mapping / sequence
    f -> iterable of ancestor indices (the term itself is always included). Works on bool labels too.
    """
    s = _np(scores)
    out = np.empty_like(s)
    for g, d in enumerate(_descendant_lists(ancestors, s.shape[1])):
        out[:, g] = s[:, d].max(1)
    return out


def information_content(labels: Any, parents: Mapping[int, Iterable[int]] | Sequence[Iterable[int]]) -> np.ndarray:
    """IC(f) = log2(min_{p in parents(f)} count(p) / count(f)), counts over the given propagated annotations.

    DeepGO computes the counts on train+valid+test annotations. A term without parents (root) or without
    annotations has IC 0.
    """
    y = _np(labels).astype(bool)
    cnt = y.sum(0).astype(np.float64)
    ic = np.zeros(y.shape[1])
    items = parents.items() if isinstance(parents, Mapping) else enumerate(parents)
    for f, ps in items:
        ps = [int(p) for p in ps]
        if not ps or cnt[f] == 0:
            continue
        min_n = min(cnt[p] for p in ps)
        if min_n > 0:
            ic[f] = math.log2(min_n / cnt[f])
    return ic


def protein_centric_curves(labels: Any, scores: Any, thresholds: Sequence[float] | None = None,
                           ic: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """DeepGO's per-threshold precision, recall (and ru, mi, S with IC) over proteins.

    Proteins without any true term are skipped entirely (as DeepGO's evaluate_annotations does); precision
    averages over the remaining proteins with at least one predicted term (0 when there are none), recall over
    all remaining proteins; ru and mi average over all remaining proteins. Predicted set: s >= t.
    """
    y = _np(labels).astype(bool)
    s = _np(scores, np.float64)
    thr = DEEPGO_THRESHOLDS if thresholds is None else np.asarray(thresholds, np.float64)
    keep = y.any(1)
    y, s = y[keep], s[keep]
    n = y.shape[0]
    n_true = y.sum(1)
    pr, rc, ru, mi = (np.zeros(thr.size) for _ in range(4))
    for j, t in enumerate(thr):
        pred = s >= t
        tp = (pred & y).sum(1)
        n_pred = pred.sum(1)
        has = n_pred > 0
        pr[j] = (tp[has] / n_pred[has]).mean() if has.any() else 0.0
        rc[j] = (tp / n_true).mean() if n else 0.0
        if ic is not None:
            ru[j] = ((~pred & y) @ ic).sum() / n if n else 0.0
            mi[j] = ((pred & ~y) @ ic).sum() / n if n else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(pr + rc > 0, 2 * pr * rc / (pr + rc), 0.0)
    out = {"thresholds": thr, "precision": pr, "recall": rc, "f": f, "n_proteins": np.asarray(n)}
    if ic is not None:
        out.update(ru=ru, mi=mi, s=np.sqrt(ru ** 2 + mi ** 2))
    return out


def fmax(labels: Any, scores: Any, thresholds: Sequence[float] | None = None) -> dict[str, float]:
    """Fmax = max_t 2 pr rc / (pr + rc) (first threshold among ties)."""
    c = protein_centric_curves(labels, scores, thresholds)
    j = int(np.argmax(c["f"]))
    return {"fmax": float(c["f"][j]), "threshold": float(c["thresholds"][j]),
            "precision": float(c["precision"][j]), "recall": float(c["recall"][j])}


def smin(labels: Any, scores: Any, ic: np.ndarray, thresholds: Sequence[float] | None = None) -> dict[str, float]:
    """Smin = min_t sqrt(ru(t)^2 + mi(t)^2), IC-weighted remaining uncertainty and misinformation."""
    c = protein_centric_curves(labels, scores, thresholds, ic=np.asarray(ic, np.float64))
    j = int(np.argmin(c["s"]))
    return {"smin": float(c["s"][j]), "threshold": float(c["thresholds"][j]),
            "ru": float(c["ru"][j]), "mi": float(c["mi"][j])}


def aupr_deepgo(labels: Any, scores: Any, thresholds: Sequence[float] | None = None) -> float:
    """Trapezoidal area under the protein-centric (recall, precision) points of the threshold grid, sorted by
    recall. Points with equal recall keep threshold order (stable sort); DeepGO's plain argsort leaves that
    order unspecified, which can change the area where the curve steps."""
    c = protein_centric_curves(labels, scores, thresholds)
    o = np.argsort(c["recall"], kind="stable")
    return float(np.trapezoid(c["precision"][o], c["recall"][o]))


def auc_per_term(labels: Any, scores: Any) -> dict[str, Any]:
    """Mean per-term ROC AUC over terms with at least one positive and one negative protein.

    Mann-Whitney form with average ranks for ties (equal to sklearn's roc_auc_score per column).
    """
    y = _np(labels).astype(bool)
    s = _np(scores, np.float64)
    n_pos = y.sum(0)
    n_neg = y.shape[0] - n_pos
    ok = (n_pos > 0) & (n_neg > 0)
    auc = np.full(y.shape[1], np.nan)
    if ok.any():
        ranks = rankdata(s[:, ok], axis=0)
        pos_rank_sum = (ranks * y[:, ok]).sum(0)
        auc[ok] = (pos_rank_sum - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return {"auc": float(auc[ok].mean()) if ok.any() else None, "per_term": auc, "n_terms": int(ok.sum())}


def probe_metrics(labels: Any, scores: Any, ancestors: Any = None, exclude_terms: Iterable[int] = (),
                  ic: np.ndarray | None = None, thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """Fmax, Smin (when IC is given), AUPR and AUC for protein x term scores, DeepGO-SE style.

    Scores are propagated over `ancestors` first (labels should already be propagated); `exclude_terms`
    (the namespace roots) are dropped afterwards, as DeepGO does.
    """
    s = _np(scores, np.float64)
    y = _np(labels).astype(bool)
    if ancestors is not None:
        s = propagate_scores(s, ancestors)
    keep = np.ones(s.shape[1], bool)
    keep[np.asarray(list(exclude_terms), np.int64)] = False
    s, y = s[:, keep], y[:, keep]
    out: dict[str, Any] = {"fmax": fmax(y, s, thresholds), "aupr": aupr_deepgo(y, s, thresholds),
                           "auc": {k: v for k, v in auc_per_term(y, s).items() if k != "per_term"}}
    if ic is not None:
        out["smin"] = smin(y, s, np.asarray(ic, np.float64)[keep], thresholds)
    return out
