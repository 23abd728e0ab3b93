"""Metrics on hand-computed toy cases (METHOD.md §3.1-3.3), plus brute-force cross-checks of the sparse paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protsae_cli.evaluate.metrics import (
    ReconstructionStats,
    argmax_agreement,
    auc_per_term,
    aupr_deepgo,
    binary_f1,
    concept_counts,
    defined_latent_f1,
    fmax,
    information_content,
    kl_score,
    latent_max,
    loss_recovered,
    mean_kl,
    normalisation_scales,
    probe_metrics,
    propagate_scores,
    select_best_on_valid_and_report_test,
    smin,
    top_relevance_f1,
)

# -- reconstruction ------------------------------------------------------------------------------------

X = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
XH = np.array([[1.0, 1.0], [3.0, 3.0], [4.0, 0.0]])
IDX = np.array([[0, 1], [0, -1], [0, 2]])
VAL = np.array([[1.0, 0.5], [2.0, 0.0], [1.0, 0.1]])


def test_reconstruction_toy_by_hand():
    st = ReconstructionStats(d_sae=4)
    st.update(X, XH, IDX, VAL, protein_index=[0, 0, 1])
    r = st.result()
    assert r["n_tokens"] == 3
    assert r["mse_per_token"] == pytest.approx(1.0)          # residual² sums 1, 1, 1
    assert r["mse_per_element"] == pytest.approx(0.5)
    assert r["fvu"] == pytest.approx(3 / 16)                  # Σ‖x - x̄‖² = 4 + 4 + 8 with x̄ = (3, 2)
    assert r["fve"] == pytest.approx(13 / 16)
    assert r["variance_explained_interplm"] == pytest.approx(1 - (4 / 9) / (16 / 3))
    cos = [3 / math.sqrt(10), 21 / (5 * math.sqrt(18)), 1.0]
    assert r["cosine_mean"] == pytest.approx(np.mean(cos))
    assert r["l2_ratio_mean"] == pytest.approx(np.mean([math.sqrt(2 / 5), math.sqrt(18) / 5, 0.8]))
    assert r["mse_per_dim"]["mean"] == pytest.approx(0.5)
    assert r["mse_per_dim"]["max"] == pytest.approx(2 / 3)
    assert r["l0_mean"] == pytest.approx(5 / 3)
    assert r["l0_median"] == 2
    assert r["l0_per_protein_mean"] == pytest.approx((1.5 + 2) / 2)
    assert r["dead"] == {"count": 1, "fraction": 0.25, "token_budget": 3}
    assert r["dense"]["count"] == 1                           # latent 0 fires on every token
    hist = r["firing_frequency_log10_hist"]
    assert sum(hist["counts"]) == 3 and hist["edges"][-1] == pytest.approx(0.0)


def test_reconstruction_streaming_equals_one_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(257, 6)) * 3 + 10
    xh = x + rng.normal(size=x.shape)
    one = ReconstructionStats()
    one.update(x, xh)
    many = ReconstructionStats()
    for s in range(0, 257, 50):
        many.update(torch.tensor(x[s:s + 50]), torch.tensor(xh[s:s + 50]))
    a, b = one.result(), many.result()
    for key in ("fvu", "variance_explained_interplm", "mse_per_token", "cosine_mean", "l2_ratio_mean"):
        assert a[key] == pytest.approx(b[key], rel=1e-10)
    # exact definition, computed densely
    assert a["fvu"] == pytest.approx(((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-12)


def test_l0_median_even_count():
    st = ReconstructionStats(d_sae=3)
    st.update(np.ones((4, 2)), np.ones((4, 2)), np.array([[0, -1, -1], [0, 1, -1], [0, 1, 2], [0, 1, 2]]))
    assert st.result()["l0_median"] == 2.5


# -- LM fidelity -------------------------------------------------------------------------------------

def test_loss_recovered_identity_zero_and_clipping():
    assert loss_recovered(2.0, 2.0, 5.0)["clipped"] == pytest.approx(100.0)   # identity splice
    assert loss_recovered(2.0, 5.0, 5.0)["clipped"] == pytest.approx(0.0)     # SAE as bad as zero ablation
    half = loss_recovered(2.0, 3.5, 5.0)
    assert half["unclipped"] == pytest.approx(50.0) and half["headroom"] == pytest.approx(3.0)
    better = loss_recovered(2.0, 1.7, 5.0)
    assert better["unclipped"] == pytest.approx(110.0) and better["clipped"] == 100.0
    worse = loss_recovered(2.0, 6.5, 5.0)
    assert worse["unclipped"] == pytest.approx(-50.0) and worse["clipped"] == 0.0


def test_loss_recovered_headroom_guard():
    r = loss_recovered(2.0, 2.01, 2.03, floor=0.05)
    assert r["defined"] is False and r["clipped"] is None and r["unclipped"] is None
    assert loss_recovered(2.0, 2.0, float("nan"))["defined"] is False


def test_kl_helpers():
    assert kl_score(0.1, 2.0) == pytest.approx(0.95)
    assert kl_score(0.1, 0.0) is None
    logits = torch.randn(3, 5, 7)
    assert mean_kl(logits, logits) == pytest.approx(0.0, abs=1e-12)
    p = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[0.0, math.log(3.0)]])  # p = (.5, .5), q = (.25, .75)
    assert mean_kl(p, q) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert argmax_agreement(logits, logits) == 1.0


# -- concept alignment ---------------------------------------------------------------------------------

def planted():
    """10 residues, 3 latents (latent 2 dead), 2 concepts. See the expected values in the tests."""
    idx = np.full((10, 2), -1)
    val = np.zeros((10, 2))
    for t, v in zip([0, 1, 2, 5], [1.0, 0.5, 0.2, 0.1]):
        idx[t, 0], val[t, 0] = 0, v
    for t, v in zip([6, 7, 8], [2.0, 2.0, 1.0]):
        idx[t, 1], val[t, 1] = 1, v
    y = np.zeros((10, 2), bool)
    y[0:4, 0] = True
    y[6:8, 1] = True
    inst = np.full((10, 2), -1)
    inst[0:2, 0], inst[2:4, 0] = 7, 9        # two instances of concept 0
    inst[6:8, 1] = 7                          # one instance of concept 1 (ids are per concept)
    return idx, val, y, inst


def test_concept_counts_and_f1_by_hand():
    idx, val, y, inst = planted()
    scales, alive = normalisation_scales(latent_max(idx, val, 3))
    assert scales.tolist() == [1.0, 2.0, 1.0] and alive.tolist() == [True, True, False]
    cc = concept_counts(idx, val, y, scales, instance_ids=inst, alive=alive)
    f1 = cc.f1()
    # latent 0 / concept 0: tau 0 -> TP 3 FP 1 (P .75 R .75); tau .15 -> TP 3 FP 0; tau .5 -> only a=1 (> .5)
    assert f1[:, 0, 0] == pytest.approx([0.75, 6 / 7, 0.4, 0.4, 0.4])
    # latent 1 / concept 1: a = 1, 1, .5 -> tau 0, .15: P 2/3 R 1; tau >= .5: P 1 R 1
    assert f1[:, 1, 1] == pytest.approx([0.8, 0.8, 1.0, 1.0, 1.0])
    assert cc.tp[0, 0, 0] == 3 and cc.fp[0, 0, 0] == 1 and cc.positives.tolist() == [4, 2]
    assert cc.n_instances.tolist() == [2, 1]
    fi = cc.f1("instance")
    # tau .5: latent 0 fires on residue 0 only -> 1 of 2 instances; precision 1 -> F1 2/3
    assert fi[2, 0, 0] == pytest.approx(2 / 3)
    assert fi[1, 0, 0] == pytest.approx(1.0)


def test_selection_on_valid_reported_on_test():
    idx, val, y, inst = planted()
    scales, alive = normalisation_scales(latent_max(idx, val, 3))
    valid = concept_counts(idx, val, y, scales, alive=alive)
    # Test split: latent 0 now also fires (a = .3) on a negative residue; latent 1 misses one positive.
    tidx, tval = idx.copy(), val.copy()
    tidx[4, 0], tval[4, 0] = 0, 0.3
    tidx[7, 1], tval[7, 1] = -1, 0.0
    test = concept_counts(tidx, tval, y, scales, alive=alive)
    sel = select_best_on_valid_and_report_test(valid, test)
    assert sel.latent.tolist() == [0, 1]
    assert sel.threshold.tolist() == [0.15, 0.5]                # lowest tau among valid ties
    assert sel.valid_f1 == pytest.approx([6 / 7, 1.0])
    # concept 0 at tau .15 on test: TP 3, FP 1 (the .3) -> P .75, R .75; concept 1 at tau .5: P 1, R .5
    assert sel.test_f1 == pytest.approx([0.75, 2 / 3])
    assert sel.summary["coverage"] == 2
    assert sel.summary["mean_best_test_f1"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert sel.summary["n_latents_f1_gt"] == 2
    d = sel.as_dict(["helix", "site"])
    assert d["per_concept"][1]["concept"] == "site" and d["per_concept"][1]["latent"] == 1
    # Dead latent 2 is never chosen even where everything ties at 0.
    only_dead = select_best_on_valid_and_report_test(valid, test, candidate_latents=[2])
    assert only_dead.latent.tolist() == [-1, -1] and only_dead.summary["n_evaluable"] == 0


def test_defined_latent_and_top_relevance_f1():
    idx, val, y, _ = planted()
    scales, alive = normalisation_scales(latent_max(idx, val, 3))
    cc = concept_counts(idx, val, y, scales, alive=alive)
    d = defined_latent_f1(cc, cc, n_concepts=2)
    assert d["test_f1"] == pytest.approx([6 / 7, 1.0])
    assert d["threshold"].tolist() == [0.15, 0.5]
    top = top_relevance_f1(cc, cc, top=10)
    assert top["top"] == 2                                    # only alive latents rank
    # concept 0: latent 0 at 6/7, latent 1 never overlaps (0); concept 1: latent 1 at 1.0, latent 0 at 0
    assert top["max_f1"] == pytest.approx([6 / 7, 1.0])
    assert top["mean_f1"] == pytest.approx([3 / 7, 0.5])
    assert top["latents"][0].tolist() == [0, 1] and top["latents"][1].tolist() == [1, 0]


def test_sparse_counts_match_dense_brute_force():
    rng = np.random.default_rng(3)
    n, k, L, C = 300, 5, 12, 3
    idx = np.stack([rng.choice(L, k, replace=False) for _ in range(n)])
    val = rng.random((n, k)) * (rng.random((n, k)) > 0.2)
    idx = np.where(val > 0, idx, -1)
    y = rng.random((n, C)) < 0.3
    inst = np.where(y, rng.integers(0, 6, (n, C)), -1)
    thr = (0.0, 0.15, 0.5, 0.6, 0.8)
    mx = np.zeros(L)
    for s in range(0, n, 64):  # streaming reference maximum
        mx = latent_max(idx[s:s + 64], val[s:s + 64], L, out=mx)
    scales, alive = normalisation_scales(mx)
    cc = concept_counts(idx[:150], val[:150], y[:150], scales, thr, inst[:150], alive) + \
        concept_counts(idx[150:], val[150:], y[150:], scales, thr, inst[150:], alive)
    dense = np.zeros((n, L))
    for t in range(n):
        for j in range(k):
            if idx[t, j] >= 0:
                dense[t, idx[t, j]] = val[t, j] / scales[idx[t, j]]
    for ti, tau in enumerate(thr):
        act = dense > tau
        assert np.array_equal(cc.fired[ti], act.sum(0))
        assert np.array_equal(cc.tp[ti], act.T.astype(int) @ y.astype(int))
    # Instance hits are only additive when no instance straddles a cut, so check them on one call.
    whole = concept_counts(idx, val, y, scales, thr, inst, alive)
    for ti, tau in enumerate(thr):
        act = dense > tau
        for lat in range(L):
            for c in range(C):
                ids = set(inst[act[:, lat] & (inst[:, c] >= 0), c].tolist())
                assert whole.inst_hits[ti, lat, c] == len(ids)
    assert whole.n_instances.tolist() == [len(set(inst[inst[:, c] >= 0, c])) for c in range(C)]


def test_concept_counts_scale_quickly():
    import time

    rng = np.random.default_rng(0)
    n, k, L, C = 100_000, 32, 4096, 20
    idx = rng.integers(0, L, (n, k))
    idx = np.sort(idx, 1)
    idx[:, 1:][idx[:, 1:] == idx[:, :-1]] = -1  # drop duplicate latents within a row
    val = rng.random((n, k)).astype(np.float32)
    y = rng.random((n, C)) < 0.05
    t0 = time.perf_counter()
    scales, alive = normalisation_scales(latent_max(idx, val, L))
    cc = concept_counts(idx, val, y, scales, alive=alive)
    select_best_on_valid_and_report_test(cc, cc)
    assert time.perf_counter() - t0 < 15.0
    assert cc.tp.shape == (5, L, C)


def test_binary_f1():
    r = binary_f1(np.array([[1, 0], [1, 1], [0, 0]]), np.array([[1, 0], [0, 1], [0, 0]]))
    assert r["precision"].tolist() == [0.5, 1.0] and r["recall"].tolist() == [1.0, 1.0]
    assert r["f1"] == pytest.approx([2 / 3, 1.0])


# -- protein-level probing: 3 proteins, terms R (root) > A > B, R > C -------------------------------------

ANC = {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 3]}
PARENTS = {0: [], 1: [0], 2: [1], 3: [0]}
LABELS = np.array([[1, 1, 1, 0],    # p0: A, B
                   [1, 0, 0, 1],    # p1: C
                   [1, 1, 0, 0]],   # p2: A
                  bool)
RAW = np.array([[0.0, 0.3, 0.8, 0.65],
                [0.0, 0.2, 0.0, 0.6],
                [0.0, 0.35, 0.0, 0.4]])
# After propagation (A = max(A, B), R = max of all) and dropping R, the scores on A, B, C are
# p0 .8 .8 .65 | p1 .2 0 .6 | p2 .35 0 .4.  Per-threshold precision / recall (worked by hand):
#   t=0 4/9,1 | .01-.20 5/9,1 | .21-.35 13/18,1 | .36-.40 5/9,2/3 | .41-.60 5/6,2/3 | .61-.65 2/3,1/3
#   .66-.80 1,1/3 | .81-1 0,0


def test_propagation_matrix_and_mapping_agree():
    s = propagate_scores(RAW, ANC)
    assert s[:, 0].tolist() == [0.8, 0.6, 0.4]
    assert s[:, 1].tolist() == [0.8, 0.2, 0.35]
    A = np.zeros((4, 4), bool)
    for f, ancs in ANC.items():
        A[f, ancs] = True
    assert np.array_equal(propagate_scores(RAW, A), s)
    assert np.array_equal(propagate_scores(LABELS, ANC), LABELS)  # labels already closed upwards


def test_fmax_aupr_auc_smin_by_hand():
    s = propagate_scores(RAW, ANC)[:, 1:]
    y = LABELS[:, 1:]
    f = fmax(y, s)
    assert f["fmax"] == pytest.approx(26 / 31)
    assert f["threshold"] == pytest.approx(0.21)
    assert f["precision"] == pytest.approx(13 / 18) and f["recall"] == pytest.approx(1.0)
    assert aupr_deepgo(y, s) == pytest.approx(7 / 12)
    auc = auc_per_term(y, s)
    assert auc["per_term"] == pytest.approx([1.0, 1.0, 0.5])
    assert auc["auc"] == pytest.approx(2.5 / 3) and auc["n_terms"] == 3
    ic = information_content(LABELS, PARENTS)
    assert ic == pytest.approx([0.0, math.log2(1.5), 1.0, math.log2(3)])
    sm = smin(y, s, ic[1:])
    # best at t in (.40, .60]: p0 wrongly predicts C, p2 misses A
    assert sm["smin"] == pytest.approx(math.hypot(math.log2(3), math.log2(1.5)) / 3)
    assert sm["threshold"] == pytest.approx(0.41)
    full = probe_metrics(LABELS, RAW, ancestors=ANC, exclude_terms=[0], ic=ic)
    assert full["fmax"]["fmax"] == pytest.approx(26 / 31)
    assert full["aupr"] == pytest.approx(7 / 12)
    assert full["auc"]["auc"] == pytest.approx(2.5 / 3)
    assert full["smin"]["smin"] == pytest.approx(sm["smin"])


def test_auc_skips_terms_without_both_classes_and_handles_ties():
    y = np.array([[1, 1, 0], [0, 1, 0], [1, 1, 0], [0, 1, 0]], bool)
    s = np.array([[0.5, 0.1, 0.2], [0.5, 0.2, 0.3], [0.9, 0.3, 0.1], [0.1, 0.4, 0.0]])
    r = auc_per_term(y, s)
    assert r["n_terms"] == 1
    # positives .5, .9 vs negatives .5, .1: pairs (.5,.5) tie = .5, (.5,.1) 1, (.9,.5) 1, (.9,.1) 1 -> 3.5/4
    assert r["auc"] == pytest.approx(3.5 / 4)


def test_proteins_without_annotations_are_skipped():
    y = np.array([[1, 0], [0, 0]], bool)
    s = np.array([[0.9, 0.1], [0.9, 0.9]])
    assert fmax(y, s)["fmax"] == pytest.approx(1.0)
