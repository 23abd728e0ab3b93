"""Calibration (#14): operating points, score curves, `protsae calibrate` end to end, withheld concepts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from protsae_cli.evaluate.calibrate import (MIN_CALLS, CalibrateOptions, ConceptCounts, OperatingPoint, calibrate,
                                   choose_threshold, pav, score_curve)
from protsae_cli.errors import InputError
from protsae_cli.labels.sources import AnnotationSpec


def brute(act: np.ndarray, y: np.ndarray, n_pos: int, t: float) -> tuple[float, float, float, int]:
    """(precision, recall, F1, calls) of "act >= t and act > 0" over active residues, recall over n_pos."""
    call = (act >= np.float32(t)) & (act > 0)
    tp = int((call & y).sum())
    calls = int(call.sum())
    p = tp / calls if calls else 0.0
    r = tp / n_pos
    return p, r, 2 * tp / (calls + n_pos), calls


def random_counts(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray, int, ConceptCounts]:
    rng = np.random.default_rng(seed)
    act = rng.gamma(2.0, 0.5, n).astype(np.float32) + np.float32(1e-3)
    y = rng.random(n) < 1 / (1 + np.exp(-(act - 1.0) * 3))   # positives more likely at high activation
    n_pos = int(y.sum()) + 25                                  # some positives never activate the latent
    return act, y, n_pos, ConceptCounts.from_values(act, y, n_pos, n + 500)


def test_operating_point_parsing() -> None:
    assert OperatingPoint.parse("f1") == OperatingPoint("f1")
    assert OperatingPoint.parse("precision:0.9") == OperatingPoint("precision", 0.9)
    assert str(OperatingPoint.parse("Recall:0.5")) == "recall:0.5"
    for bad in ("precision", "precision:1.5", "precision:x", "accuracy:0.9", "recall:0"):
        with pytest.raises(InputError, match="--calling"):
            OperatingPoint.parse(bad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_f1_threshold_matches_brute_force(seed: int) -> None:
    act, y, n_pos, c = random_counts(seed)
    ch = choose_threshold(c, OperatingPoint("f1"))
    cands = [0.0] + sorted(set(act.tolist()))
    best = max(brute(act, y, n_pos, t)[2] for t in cands)
    assert ch.f1 == pytest.approx(best)
    p, r, f1, calls = brute(act, y, n_pos, ch.threshold)
    assert (ch.precision, ch.recall, ch.f1, ch.calls) == (pytest.approx(p), pytest.approx(r), pytest.approx(f1),
                                                          calls)
    assert c.metrics_at(ch.threshold)["f1"] == pytest.approx(f1)


@pytest.mark.parametrize("target", [0.6, 0.8, 0.95])
def test_precision_operating_point_is_the_lowest_threshold_reaching_it(target: float) -> None:
    act, y, n_pos, c = random_counts(3, n=2000)
    ch = choose_threshold(c, OperatingPoint("precision", target))
    ok = [t for t in sorted(set(act.tolist()))
          if brute(act, y, n_pos, t)[3] >= MIN_CALLS and brute(act, y, n_pos, t)[0] >= target]
    if ok:
        assert ch.reached and ch.threshold == pytest.approx(ok[0])
        assert ch.precision >= target and ch.calls >= MIN_CALLS
    else:
        assert not ch.reached and "not reached" in ch.note


def test_recall_operating_point_and_unreachable_targets() -> None:
    act, y, n_pos, c = random_counts(4)
    ch = choose_threshold(c, OperatingPoint("recall", 0.3))
    assert ch.recall >= 0.3
    above = [t for t in sorted(set(act.tolist())) if t > ch.threshold]
    assert brute(act, y, n_pos, above[0])[1] < 0.3          # the next threshold up would lose the target
    # Recall 0.99 is out of reach: 25 positives never activate the latent.
    miss = choose_threshold(c, OperatingPoint("recall", 0.99))
    assert not miss.reached and miss.threshold == 0.0
    # Precision 1.0 on >= MIN_CALLS calls is out of reach once the strongest residue is a negative: flagged,
    # and the highest precision among thresholds with enough calls is chosen instead.
    y2 = y.copy()
    y2[np.argmax(act)] = False
    c2 = ConceptCounts.from_values(act, y2, n_pos, act.size)
    ch = choose_threshold(c2, OperatingPoint("precision", 1.0))
    best = max(brute(act, y2, n_pos, t)[0] for t in set(act.tolist()) if brute(act, y2, n_pos, t)[3] >= MIN_CALLS)
    assert not ch.reached and "not reached" in ch.note and ch.precision == pytest.approx(best)
    empty = ConceptCounts.from_values(np.zeros(0, np.float32), np.zeros(0, bool), 10, 100)
    assert choose_threshold(empty, OperatingPoint("f1")) is None


def test_pav_is_the_isotonic_fit() -> None:
    y = np.array([0.2, 0.1, 0.5, 0.4, 0.9, 0.3])
    w = np.array([1, 1, 2, 2, 1, 3], float)
    fit = pav(y, w)
    assert np.all(np.diff(fit) >= -1e-12)
    assert fit[0] == pytest.approx(0.15) and fit[-1] == pytest.approx((0.9 + 0.9) / 4)
    assert (fit * w).sum() == pytest.approx((y * w).sum())   # PAV keeps the weighted mean


def test_score_curve_is_monotone_and_calibrated() -> None:
    act, y, n_pos, c = random_counts(5, n=5000)
    curve = score_curve(c)
    assert 2 <= len(curve) <= 20
    xs, ps = [a for a, _ in curve], [p for _, p in curve]
    assert xs == sorted(xs) and ps == sorted(ps) and all(0 <= p <= 1 for p in ps)
    assert xs[0] == pytest.approx(float(act.min()))
    # Residues at or above the last knot are positives about as often as the curve says.
    top = act >= np.float32(xs[-1])
    assert y[top].mean() == pytest.approx(ps[-1], abs=0.05)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_plm, tiny_esm_path) -> dict:
    """A tiny SAE with metal binding on latent 3, proteins, and two label files made from its own codes:
    'good' labels follow the latent (high precision), 'noise' labels do not."""
    from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator
    from protsae_cli.io.fasta import read_fasta
    from protsae_cli.sae.checkpoint import save_sae
    from protsae_cli.sae.config import ConceptEntry, SAEConfig
    from protsae_cli.sae.topk import TopKSAE
    from tests.conftest import TINY_DIM

    d = tmp_path_factory.mktemp("cal")
    cfg = SAEConfig(d_model=TINY_DIM, d_sae=64, k=8, hook_point="resid_post", layer=2, plm_name=tiny_plm.name,
                    plm_sha256=tiny_plm.sha256, plm_num_layers=tiny_plm.num_layers,
                    concepts=[ConceptEntry(latent=3, concept_id="PSC:0000210", name="metal binding", threshold=0.0)])
    sae = TopKSAE(cfg)
    sae.reset_parameters(seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    sae_dir = save_sae(sae, d / "sae")
    rng = np.random.default_rng(0)
    aa = list("ACDEFGHIKLMNPQRSTVWY")
    fasta = d / "p.fasta"
    fasta.write_text("".join(f">prot{i}\n{''.join(rng.choice(aa, int(rng.integers(40, 90))))}\n" for i in range(24)))
    ann = Annotator(str(tiny_esm_path), str(sae_dir), device="cpu")
    results = ann.iter_results(read_fasta(fasta), AnnotateOptions(input=str(fasta), output_prefix="-", progress=False))
    return {"sae": sae_dir, "fasta": fasta, "codes": {r.id: (r.idx, r.val) for r in results}}


def _act(codes: tuple[np.ndarray, np.ndarray], latent: int = 3) -> np.ndarray:
    idx, val = codes
    return np.where(idx == latent, val, 0).max(axis=1)


def _write_labels(path: Path, labelled: dict, pick) -> tuple[np.ndarray, np.ndarray, int]:
    lines, acts, ys, n_pos = [], [], [], 0
    for pid, codes in labelled["codes"].items():
        a = _act(codes)
        y = pick(a)
        lines.append(f"{pid}\t{','.join(str(i + 1) for i in np.flatnonzero(y))}")
        acts.append(a[a > 0]); ys.append(y[a > 0]); n_pos += int(y.sum())
    path.write_text("\n".join(lines) + "\n")
    return np.concatenate(acts), np.concatenate(ys), n_pos


def _opts(labelled: dict, labels: Path, **kw) -> CalibrateOptions:
    return CalibrateOptions(sae=str(labelled["sae"]), fasta=str(labelled["fasta"]), model=kw.pop("model"),
                            annotations=[AnnotationSpec([str(labels)], "binding")], device="cpu", **kw)


def test_calibrate_end_to_end(labelled: dict, tiny_esm_path: Path, tmp_path: Path) -> None:
    from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator
    from protsae_cli.sae.checkpoint import load_sae
    from protsae_cli.io.checksum import file_sha256

    rng = np.random.default_rng(1)
    labels = tmp_path / "binding_residues_2.5_metal.txt"
    # Positives: strongly active residues (plus a few inactive ones): a threshold above 0 should pay off.
    act, y, n_pos = _write_labels(labels, labelled, lambda a: (a > np.quantile(a[a > 0], 0.5) if (a > 0).any()
                                                               else np.zeros(a.shape, bool)) | (rng.random(a.size) < 0.02))
    out = tmp_path / "calibrated"
    rep = calibrate(_opts(labelled, labels, model=str(tiny_esm_path), output=str(out),
                          json_out=str(tmp_path / "r.json")))
    sae, sha = load_sae(out)
    assert sha == file_sha256(labelled["sae"] / "sae.safetensors")       # same weights, new table
    e = sae.cfg.concepts[0]
    p, r, f1, _ = brute(act, y, n_pos, e.threshold)
    assert (e.precision, e.recall, e.f1) == (pytest.approx(p, abs=1e-4), pytest.approx(r, abs=1e-4),
                                             pytest.approx(f1, abs=1e-4))
    assert e.f1 == pytest.approx(max(brute(act, y, n_pos, t)[2] for t in [0.0, *sorted(set(act.tolist()))]), abs=1e-4)
    assert e.threshold > 0 and e.positives == n_pos and e.operating_point == "f1"
    assert e.label_source == labels.name and e.kind == "site" and e.ontology_id == "SO:0001656,GO:0046872"
    assert e.score_curve and all(b[1] >= a[1] for a, b in zip(e.score_curve, e.score_curve[1:]))
    assert json.loads((tmp_path / "r.json").read_text())["per_concept"][0]["after"]["f1"] == pytest.approx(e.f1, abs=1e-4)
    assert rep["per_concept"][0]["before"]["f1"] == pytest.approx(brute(act, y, n_pos, 0.0)[2])

    # Measuring the calibrated SAE on the same proteins reproduces its numbers and writes nothing.
    before = (out / "config.json").read_text()
    again = calibrate(CalibrateOptions(sae=str(out), fasta=str(labelled["fasta"]), model=str(tiny_esm_path),
                                       annotations=[AnnotationSpec([str(labels)], "binding")], device="cpu",
                                       measure_only=True))
    assert (out / "config.json").read_text() == before and again["per_concept"][0]["threshold"] == e.threshold
    assert again["per_concept"][0]["after"]["precision"] == pytest.approx(e.precision, abs=1e-4)

    # annotate carries the reliability into TSV, GFF3 and the HDF5 concept table.
    prefix = tmp_path / "run"
    Annotator(str(tiny_esm_path), str(out), device="cpu").run(AnnotateOptions(
        input=str(labelled["fasta"]), output_prefix=str(prefix), progress=False))
    rows = [line.split("\t") for line in prefix.with_suffix(".tsv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    assert header[-4:] == ["concept_precision", "concept_recall", "concept_f1", "score"]
    assert rows and all(float(r[-4]) == pytest.approx(e.precision, abs=5e-4) for r in rows)
    assert all(float(r[header.index("max_act")]) >= e.threshold * 0.999 for r in rows)
    assert all(0 <= float(r[-1]) <= 1 for r in rows)
    assert {r[header.index("ontology_id")] for r in rows} == {"SO:0001656,GO:0046872"}
    gff = prefix.with_suffix(".gff3").read_text()
    assert "\tmetal_binding_site\t" in gff and "Dbxref=GO:0046872" in gff and "concept_precision=" in gff
    from protsae_cli.io.writers.h5 import H5Annotations

    with H5Annotations(prefix.with_suffix(".h5")) as h5:
        (c,) = h5.concepts
    assert (c.precision, c.f1, c.positives, c.kind) == (pytest.approx(e.precision, abs=1e-6),
                                                         pytest.approx(e.f1, abs=1e-6), e.positives, "site")
    assert c.score_curve == [pytest.approx(p, abs=1e-6) for p in e.score_curve]


def test_unreliable_concept_is_withheld_unless_asked(labelled: dict, tiny_esm_path: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator
    from protsae_cli.io.writers.h5 import H5Annotations

    rng = np.random.default_rng(2)
    labels = tmp_path / "binding_residues_2.5_metal.txt"
    _write_labels(labels, labelled, lambda a: rng.random(a.size) < 0.05)   # labels unrelated to the latent
    out = tmp_path / "noisy"
    calibrate(_opts(labelled, labels, model=str(tiny_esm_path), output=str(out), calling="precision:0.9"))
    cfg = json.loads((out / "config.json").read_text())["concepts"][0]
    assert cfg["precision"] < 0.5 and cfg["operating_point"] == "precision:0.9"
    prefix = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="protsae.annotate"):
        Annotator(str(tiny_esm_path), str(out), device="cpu").run(AnnotateOptions(
            input=str(labelled["fasta"]), output_prefix=str(prefix), progress=False))
    assert any("withheld" in r.getMessage() and "PSC:0000210 metal binding (latent" in r.getMessage()
               for r in caplog.records)
    assert len(prefix.with_suffix(".tsv").read_text().splitlines()) == 1          # header only
    with H5Annotations(prefix.with_suffix(".h5")) as h5:
        assert "PSC:0000210 metal binding (precision" in h5.attrs["concepts_withheld"]
        assert h5.n_segments == 0
    forced = tmp_path / "forced"
    Annotator(str(tiny_esm_path), str(out), device="cpu", call_withheld=True).run(AnnotateOptions(
        input=str(labelled["fasta"]), output_prefix=str(forced), progress=False))
    assert len(forced.with_suffix(".tsv").read_text().splitlines()) > 1


def test_calibrate_refuses_what_it_cannot_measure(labelled: dict, tiny_esm_path: Path, tmp_path: Path) -> None:
    other = tmp_path / "binding_residues_2.5_nuclear.txt"           # labels nucleic-acid binding only
    other.write_text("prot0\t1,2,3\n")
    with pytest.raises(InputError, match="none of the SAE's concepts"):
        calibrate(_opts(labelled, other, model=str(tiny_esm_path), output=str(tmp_path / "x")))
    with pytest.raises(InputError, match="-o DIR"):
        calibrate(_opts(labelled, other, model=str(tiny_esm_path)))
    dup = tmp_path / "dup.fasta"
    dup.write_text(">a\nMKV\n>a\nMKL\n")
    with pytest.raises(InputError, match="occurs twice"):
        calibrate(CalibrateOptions(sae=str(labelled["sae"]), fasta=str(dup), model=str(tiny_esm_path),
                                   annotations=[AnnotationSpec([str(other)], "binding")], output=str(tmp_path / "y")))


def test_training_writes_the_reliability_at_its_threshold() -> None:
    """`train_protsae.calibrate_thresholds` (what `protsae train` runs) fills precision/recall/F1/positives and
    a score curve for the threshold it chose, measured like annotate's rule on the validation rows."""
    from protsae_cli.train.activations import ActivationSet
    from protsae_cli.sae.config import ConceptEntry
    from protsae_cli.train.protsae import calibrate_thresholds
    from tests.train.test_train_protsae import _Labels, _OneLatentSAE

    g = torch.Generator().manual_seed(0)
    n = 3000
    score = torch.rand(n, generator=g)
    y = ((score + 0.3 * torch.rand(n, generator=g)) > 0.8).float()
    x = torch.stack([score * 2.0, torch.zeros(n)], 1)
    val = ActivationSet(x, torch.zeros(n, dtype=torch.long), torch.arange(n), ["P"], ["M" * n], {})
    sae = _OneLatentSAE([ConceptEntry(latent=0, concept_id="C:1", name="c", source="labels.tsv")])
    calibrate_thresholds(sae, val, _Labels(y), batch_size=500, bins=100)
    e = sae.cfg.concepts[0]
    z = val.acts[:, 0].numpy()
    p, r, f1, _ = brute(z, y.numpy() == 1, int(y.sum()), e.threshold)
    assert e.threshold > 0 and (e.precision, e.recall, e.f1) == (pytest.approx(p, abs=1e-4),
                                                                  pytest.approx(r, abs=1e-4),
                                                                  pytest.approx(f1, abs=1e-4))
    assert e.positives == int(y.sum()) and e.operating_point == "f1" and e.label_source == "labels.tsv"
    assert "1 proteins" in e.validation and e.score_curve[-1][1] > e.score_curve[0][1]
    e.check()  # what config.json readers will accept
