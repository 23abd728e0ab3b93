"""The annotate benchmark's baselines compute the same codes as `protsae annotate` (issue #18).

A speed-up is only meaningful against a baseline doing the same work: same PLM, hook layer, residue rows, SAE
encode and output. These tests run `bench/annotate.py`'s fair-esm extract-style baseline and `protsae annotate`
on a few real proteins with the shipped models and compare the HDF5 CSR codes each writes, so a baseline that
hooks another layer, keeps BOS/EOS rows, skips the SAE's normalisation or ProtSAE priority, or writes rows out of
order fails here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_annotate", REPO / "bench" / "annotate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


B = _bench_module()


def _codes(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {k: f["codes"][k][:] for k in ("data", "indices", "indptr")}
        out["row_offset"] = f["proteins/row_offset"][:]
        out["id"] = np.array([s.split()[0] for s in f["proteins/id"].asstr()[:]])
    return out


def _assert_same_codes(got: dict[str, np.ndarray], want: dict[str, np.ndarray], max_row_mismatch: float) -> None:
    """Same proteins and rows; per row the same latents (all but `max_row_mismatch` of rows, for TopK-boundary
    near-ties between attention kernels) with values equal to float16 rounding."""
    np.testing.assert_array_equal(got["id"], want["id"])
    np.testing.assert_array_equal(got["row_offset"], want["row_offset"])
    gp, wp = got["indptr"], want["indptr"]
    assert len(gp) == len(wp)
    bad = 0
    for r in range(len(gp) - 1):
        gi, wi = got["indices"][gp[r]:gp[r + 1]], want["indices"][wp[r]:wp[r + 1]]
        if not np.array_equal(gi, wi):
            bad += 1
            continue
        np.testing.assert_allclose(got["data"][gp[r]:gp[r + 1]].astype(np.float32),
                                   want["data"][wp[r]:wp[r + 1]].astype(np.float32), rtol=2e-3, atol=2e-3,
                                   err_msg=f"row {r}")
    assert bad <= max_row_mismatch * (len(gp) - 1), f"{bad} of {len(gp) - 1} rows hold different latents"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """Codes from annotate, the fair baseline and the naive baseline on four example proteins (71-222 residues,
    file order not sorted by length, so a baseline that forgets to restore input order is caught). Budgets:
    the fair run gets several length-sorted batches, the naive run one file-order batch."""
    from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator
    from protsae_cli.models import default_sae_dir

    tmp = tmp_path_factory.mktemp("bench_baseline")
    pairs = [p for p in B._fasta_pairs(REPO / "examples" / "proteins.fasta") if len(p[1]) <= B.TRUNCATION]
    pairs = [pairs[i] for i in (8, 5, 1, 3)]
    fasta = B.write_fasta(pairs, tmp / "in.fa")
    torch.manual_seed(0)
    base = B.ExtractBaseline(None, default_sae_dir(), torch.device("cpu"))
    base.run(fasta, tmp / "fair.h5", 400, "length")
    base.run(fasta, tmp / "naive.h5", 4096, "file")
    Annotator(None, str(default_sae_dir()), device="cpu", backend="torch").run(
        AnnotateOptions(input=str(fasta), output_prefix=str(tmp / "ours"), formats=("h5",), progress=False))
    return {name: _codes(tmp / f"{name}.h5") for name in ("fair", "naive", "ours")}


def test_fair_baseline_codes_equal_annotate(runs) -> None:
    assert len(runs["ours"]["indptr"]) > 500  # the proteins really were encoded
    _assert_same_codes(runs["fair"], runs["ours"], max_row_mismatch=0.005)


def test_naive_baseline_codes_equal_fair(runs) -> None:
    # Same kernels, only batch composition differs: codes equal up to padding-dependent rounding.
    _assert_same_codes(runs["naive"], runs["fair"], max_row_mismatch=0.005)


def test_file_order_batches_is_get_batch_indices_without_the_sort() -> None:
    import esm

    lengths = [300, 10, 700, 50, 50, 1022, 5, 400]
    ds = esm.FastaBatchedDataset([f"p{i}" for i in range(len(lengths))], ["A" * n for n in lengths])
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    sorted_ds = esm.FastaBatchedDataset([f"p{i}" for i in order], ["A" * lengths[i] for i in order])
    for budget in (1024, 2048, 4096):
        assert B.file_order_batches(sorted(lengths), budget) == sorted_ds.get_batch_indices(budget, 1)
        naive = B.file_order_batches(lengths, budget)
        assert [i for b in naive for i in b] == list(range(len(lengths)))  # file order, every protein once
        assert all(len(b) == 1 or max(lengths[i] + 1 for i in b) * len(b) <= budget for b in naive)
    assert ds.get_batch_indices(4096, 1) != B.file_order_batches(lengths, 4096)
