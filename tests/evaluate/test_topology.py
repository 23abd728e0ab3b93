"""TMbed's protocol (protsae_cli.evaluate.topology) and `protsae calibrate --segment-decoder` (#17): the decoder a
user's own SAE gets from their topology labels, and the numbers calibrate reports for it."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protsae_cli.call.segments import (CLASSES, ROLE_CONCEPTS, SegmentDecoder, classes_from_roles,
                                       fit_decoder_from_codes, screen_latents, tmbed_classes)
from protsae_cli.errors import InputError
from protsae_cli.evaluate.calibrate import CalibrateOptions, calibrate, decoder_rank
from protsae_cli.evaluate.topology import class_runs, match_segments, tmbed_protocol
from protsae_cli.labels.sources import AnnotationSpec
from protsae_cli.sae.config import ConceptEntry

ROLE_OF = {"H": "helix", "h": "helix", "B": "strand", "b": "strand", "S": "signal", "1": "inside", "2": "outside"}


def _cls(labels: str) -> np.ndarray:
    return tmbed_classes(labels)


# ------------------------------------------------------------------------------------------------ protocol
def test_match_needs_both_ends_within_five_and_is_one_to_one() -> None:
    obs = [(10, 30), (50, 70)]
    assert match_segments(obs, [(15, 35), (50, 76)]) == 1          # 5/5 off matches, a 6 off end does not
    assert match_segments(obs, [(12, 28)]) == 1                     # one prediction matches one helix only
    assert match_segments([(10, 30), (12, 31)], [(11, 30)]) == 1
    assert match_segments(obs, []) == 0


def test_protocol_counts_by_hand() -> None:
    tm = "1" * 9 + "H" * 21 + "2" * 19 + "H" * 21 + "1" * 10          # helices 10-30 and 50-70
    glob = "1" * 80
    sp = "S" * 20 + "1" * 60
    m = tmbed_protocol([
        (_cls(tm), {"helix": [(12, 31), (50, 70)]}),                  # both right: Qok
        (_cls(tm), {"helix": [(10, 30), (44, 70), (75, 79)]}),         # one right, one 6 off, one extra
        (_cls(glob), {"helix": [(3, 20)]}),                            # a false TM call
        (_cls(glob), {"strand": [(3, 9)], "signal": [(1, 15)]}),       # false TM (strand) + false signal
        (_cls(sp), {"signal": [(1, 22)]}),
        (_cls(sp), {}),
    ])
    assert (m["alpha_tm_proteins"], m["observed_helices"], m["predicted_helices"]) == (2, 4, 5)
    assert m["helix_recall_5"] == 0.75 and m["helix_precision_5"] == 0.6 and m["qok"] == 0.5
    assert m["alpha_tm_detected"] == 1.0
    assert (m["globular_proteins"], m["globular_with_tm_call"]) == (4, 0.5)
    assert (m["signal_proteins"], m["signal_recall"], m["signal_precision"]) == (2, 0.5, 0.5)
    assert m["signal_false_rate"] == 0.25


def test_tool_and_library_agree_on_the_protocol() -> None:
    """tools/eval_topology.py (docs/SEGMENTS.md numbers) scores with the library's rules."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import eval_topology as et

    rng = np.random.default_rng(3)
    labels, calls = {}, {}
    for p in range(40):
        lab = "".join(rng.choice(list("12HS"), p=[0.5, 0.2, 0.25, 0.05]) for _ in range(120))
        labels[f"p{p}"] = ("A" * 120, lab)
        calls[f"p{p}"] = {r: sorted({(int(s), int(s) + int(rng.integers(3, 25))) for s in
                                     rng.integers(1, 90, int(rng.integers(0, 4)))})
                          for r in ("helix", "signal")}
        # predicted spans must not overlap (as decoded ones never do)
        calls[f"p{p}"]["helix"] = [h for i, h in enumerate(calls[f"p{p}"]["helix"])
                                   if i == 0 or h[0] > calls[f"p{p}"]["helix"][i - 1][1]]
    tool = et.score(labels, calls)
    lib = tmbed_protocol((tmbed_classes(lab), calls[pid]) for pid, (_, lab) in labels.items())
    for k in ("helix_recall_5", "helix_precision_5", "qok", "globular_with_tm_call", "signal_recall",
              "signal_precision", "alpha_tm_proteins", "observed_helices"):
        assert tool[k] == lib[k], k


# ------------------------------------------------------------------------------------------------ classes
@settings(max_examples=80, deadline=None)
@given(st.text(alphabet="12HhBbSU", min_size=1, max_size=60))
def test_classes_from_role_tracks_follow_the_tmbed_rule(labels: str) -> None:
    """Labels of any format that name the role concepts give the classes TMbed's letters give."""
    tracks = {r: np.array([ROLE_OF.get(c) == r for c in labels]) for r in ROLE_CONCEPTS}
    known = np.array([c != "U" for c in labels])
    np.testing.assert_array_equal(classes_from_roles(tracks, known), tmbed_classes(labels))


# ------------------------------------------------------------------------------------------------ fitting
def _codes_from_acts(acts: np.ndarray, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-acts, axis=1)[:, :k]
    val = np.take_along_axis(acts, order, 1)
    return np.where(val > 0, order, -1).astype(np.int64), np.maximum(val, 0).astype(np.float32)


def _synthetic_codes(n: int, seed: int, d: int = 12):
    """Topology labels and top-k codes: latents 0-4 are the roles (fire on their class 70 % of the time),
    latent 9 fires on helix residues the role latent missed (a useful 'extra' latent), the rest is noise."""
    rng = np.random.default_rng(seed)
    labels, codes = [], []
    for p in range(n):
        L = int(rng.integers(80, 200))
        if p % 3 == 0:
            y = "1" * L
        else:
            y, side = "", "1"
            while len(y) < L - 40:
                y += side * int(rng.integers(5, 25)) + "H" * int(rng.integers(17, 25))
                side = "2" if side == "1" else "1"
            y = (y + side * L)[:L]
        a = rng.random((L, d)).astype(np.float32) * 0.3 * (rng.random((L, d)) < 0.1)
        col = {"H": 0, "1": 3, "2": 4}
        for i, ch in enumerate(y):
            if rng.random() < 0.7:
                a[i, col[ch]] = 1.0 + rng.random()
            elif ch == "H":
                a[i, 9] = 1.0 + rng.random()
        labels.append(tmbed_classes(y))
        codes.append(_codes_from_acts(a))
    return labels, codes


def _role_entries() -> list[ConceptEntry]:
    return [ConceptEntry(latent=i, concept_id=c, name=r, kind="region", threshold=0.1)
            for i, (r, c) in enumerate(ROLE_CONCEPTS.items())]


def test_screening_finds_the_latent_that_knows_the_helices() -> None:
    labels, codes = _synthetic_codes(60, seed=1)
    chosen = screen_latents(codes, labels, exclude=[0, 1, 2, 3, 4], n=3)
    assert 9 in chosen and not set(chosen) & {0, 1, 2, 3, 4} and len(chosen) <= 3
    assert screen_latents(codes, labels, exclude=[], n=0) == []


def test_fit_from_codes_gives_a_loadable_decoder_that_reads_the_extra_latent() -> None:
    labels, codes = _synthetic_codes(90, seed=2)
    params = fit_decoder_from_codes(codes, labels, _role_entries(), fitted_on="synthetic", extra_latents=2)
    dec = SegmentDecoder(params)
    assert 9 in dec.extra_latents and params["membrane_gate"]["min_span_confidence"] == 0.4
    assert "signal_gate" not in params and params["fitted_on"] == "synthetic"
    test_labels, test_codes = _synthetic_codes(30, seed=5)
    as_classes = np.array([CLASSES.index(c) for c in dec.classes])   # decoder class index -> CLASSES index
    m = tmbed_protocol((y, {"helix": class_runs(as_classes[dec.decode_protein(i, v)], "H")})
                       for y, (i, v) in zip(test_labels, test_codes, strict=True))
    assert m["helix_recall_5"] > 0.8 and m["globular_with_tm_call"] == 0.0
    with pytest.raises(InputError, match="too few labelled segments.*0 TM helices"):
        fit_decoder_from_codes(codes[::3], labels[::3], _role_entries())      # the soluble proteins only
    with pytest.raises(InputError, match="none of the region concepts"):
        fit_decoder_from_codes(codes, labels, [ConceptEntry(latent=7, concept_id="PSC:0000210", name="metal")])


def test_decoders_are_ranked_by_the_selection_rule() -> None:
    base = {"globular_with_tm_call": 0.01, "qok": 0.2, "helix_recall_5": 0.5}
    assert decoder_rank(base) > decoder_rank(base | {"globular_with_tm_call": 0.03, "qok": 0.9})
    assert decoder_rank(base | {"qok": 0.3}) > decoder_rank(base | {"helix_recall_5": 0.9})
    assert decoder_rank(base | {"helix_recall_5": 0.6}) > decoder_rank(base)


# ------------------------------------------------------------------------------------------------ calibrate
@pytest.fixture(scope="module")
def topo(tmp_path_factory, tiny_esm_path, tiny_sae_dir) -> dict:
    """The tiny SAE with the five role concepts on latents 0-4, proteins, and TMbed labels that follow latent 0
    (membrane proteins: helices where it fires, sides alternating between them; every third protein soluble)."""
    from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator
    from protsae_cli.io.fasta import read_fasta
    from protsae_cli.sae.config import CONFIG_NAME

    d = tmp_path_factory.mktemp("topo")
    sae = d / "sae"
    shutil.copytree(tiny_sae_dir, sae)
    cfg = json.loads((sae / CONFIG_NAME).read_text())
    cfg["concepts"] = [dict(latent=i, concept_id=c, name=r, kind="region", threshold=0.0)
                       for i, (r, c) in enumerate(ROLE_CONCEPTS.items())]
    (sae / CONFIG_NAME).write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    aa = list("ACDEFGHIKLMNPQRSTVWY")
    fasta = d / "p.fasta"
    fasta.write_text("".join(f">tp{i}\n{''.join(rng.choice(aa, int(rng.integers(60, 140))))}\n" for i in range(48)))
    ann = Annotator(str(tiny_esm_path), str(sae), device="cpu")
    recs = []
    for r in ann.iter_results(read_fasta(fasta), AnnotateOptions(input=str(fasta), output_prefix="-",
                                                                 progress=False)):
        on = (r.idx == 0).any(1)
        if int(r.id[2:]) % 3 == 0 or not on.any():
            lab = "1" * len(on)
        else:
            lab, side, prev = [], "1", False
            for x in on:
                if x:
                    lab.append("H")
                elif prev:
                    side = "2" if side == "1" else "1"
                    lab.append(side)
                else:
                    lab.append(side)
                prev = bool(x)
            lab = "".join(lab)
        recs.append(f">{r.id}|EUKARYA|NO_SP|0\n{r.sequence}\n{lab}\n")
    labels = d / "topology_tmbed.fasta"
    labels.write_text("".join(recs))
    return {"sae": sae, "fasta": fasta, "labels": labels}


def _cal(topo: dict, esm: Path, **kw) -> dict:
    return calibrate(CalibrateOptions(sae=str(kw.pop("sae", topo["sae"])), fasta=str(topo["fasta"]), model=str(esm),
                                      annotations=[AnnotationSpec([str(topo["labels"])], "tmbed")], device="cpu",
                                      **kw))


def _annotate_scores(esm: Path, sae: Path, topo: dict, prefix: Path) -> dict:
    """TMbed-protocol numbers of what `protsae annotate` writes with this SAE (its TSV), on the labels."""
    from protsae_cli.annotate.pipeline import AnnotateOptions, annotate

    annotate(AnnotateOptions(input=str(topo["fasta"]), output_prefix=str(prefix), model=str(esm), sae=str(sae),
                             device="cpu", progress=False, formats=("tsv",), command="protsae annotate x"))
    rows = [ln.split("\t") for ln in prefix.with_suffix(".tsv").read_text().splitlines()]
    h, rows = rows[0], rows[1:]
    role = {c: r for r, c in ROLE_CONCEPTS.items()}
    calls: dict[str, dict[str, list]] = {}
    for r in rows:
        calls.setdefault(r[h.index("#protein_id")], {}).setdefault(role[r[h.index("concept_id")]], []).append(
            (int(r[h.index("start")]), int(r[h.index("end")])))
    lines = topo["labels"].read_text().splitlines()
    truth = {lines[i][1:].split("|")[0]: tmbed_classes(lines[i + 2]) for i in range(0, len(lines), 3)}
    return tmbed_protocol((y, calls.get(pid, {})) for pid, y in truth.items())


def test_calibrate_fits_a_decoder_that_annotate_uses_and_measures_it_as_annotate_calls(topo, tiny_esm_path,
                                                                                         tmp_path) -> None:
    from protsae_cli.sae.checkpoint import load_sae

    out = tmp_path / "fitted"
    rep = _cal(topo, tiny_esm_path, output=str(out), segment_decoder="fit", json_out=str(tmp_path / "r.json"))
    block = rep["segment_decoder"]
    assert block["action"] == "fitted" and block["validation"]["old"] is None
    assert block["validation"]["new"]["proteins"] == 24 and block["source"] == topo["labels"].name
    assert json.loads((tmp_path / "r.json").read_text())["segment_decoder"]["action"] == "fitted"
    cfg = load_sae(out)[0].cfg
    dec = cfg.segment_decoder
    assert dec and "protsae calibrate" in dec["fitted_on"] and "48 proteins" in dec["fitted_on"]
    assert dec["selection"]["validation"] == block["validation"]
    # Measuring the calibrated SAE reports exactly what annotate's calls score on the same labels.
    before = (out / "config.json").read_text()
    again = _cal(topo, tiny_esm_path, sae=out, measure_only=True)
    assert again["segment_decoder"]["action"] == "kept"
    measured = again["segment_decoder"]["measured"]
    written = _annotate_scores(tiny_esm_path, out, topo, tmp_path / "run")
    assert written["observed_helices"] > 20 and written["predicted_helices"] > 5 and written["helix_recall_5"] > 0
    for k in ("helix_recall_5", "helix_precision_5", "qok", "globular_with_tm_call", "predicted_helices"):
        assert measured[k] == written[k], k
    assert (out / "config.json").read_text() == before                     # --measure-only writes nothing


def test_keep_and_auto_leave_a_better_decoder_alone(topo, tiny_esm_path, tmp_path, caplog) -> None:
    plain = tmp_path / "plain"          # no decoder, kept: its per-residue calls are measured, none is added
    # A pipeline's logging, not an earlier test's -q (Progress is off under -q, by design).
    from protsae_cli.logging_setup import setup_logging

    setup_logging(stream=io.StringIO())
    caplog.set_level(logging.INFO, logger="protsae.progress")
    rep = _cal(topo, tiny_esm_path, output=str(plain), segment_decoder="keep")
    # Encoding is the long part: a pipeline's log (stderr not a terminal) says how far it got.
    done = [r.getMessage() for r in caplog.records if r.name == "protsae.progress"]
    assert any(m.startswith("calibrating: encoding: done, 48/48 proteins") for m in done), done
    assert rep["segment_decoder"]["action"] == "kept" and rep["segment_decoder"]["measured"]["observed_helices"] > 20
    assert "segment_decoder" not in json.loads((plain / "config.json").read_text())
    first = tmp_path / "first"
    _cal(topo, tiny_esm_path, output=str(first), segment_decoder="fit")
    old = json.loads((first / "config.json").read_text())["segment_decoder"]
    kept = tmp_path / "kept"
    rep = _cal(topo, tiny_esm_path, sae=first, output=str(kept), segment_decoder="keep")
    assert json.loads((kept / "config.json").read_text())["segment_decoder"] == old
    assert rep["segment_decoder"]["action"] == "kept" and "measured" in rep["segment_decoder"]
    # auto refits on the even half and compares on the odd half; the old decoder (fitted on all of these
    # proteins, odd half included) scores at least as well there, so auto keeps it unless it ranks lower.
    auto = tmp_path / "auto"
    rep = _cal(topo, tiny_esm_path, sae=first, output=str(auto))
    v = rep["segment_decoder"]["validation"]
    stored = json.loads((auto / "config.json").read_text())["segment_decoder"]
    if decoder_rank(v["old"]) > decoder_rank(v["new"]):
        assert stored == old and rep["segment_decoder"]["action"].startswith("kept")
    else:
        assert stored != old and rep["segment_decoder"]["action"] == "fitted"


def test_segment_decoder_refusals(topo, tiny_esm_path, tmp_path) -> None:
    with pytest.raises(InputError, match="--measure-only writes no SAE"):
        _cal(topo, tiny_esm_path, measure_only=True, segment_decoder="fit")
    binding = tmp_path / "binding_residues_2.5_metal.txt"
    binding.write_text("tp0\t1,2,3\n")
    with pytest.raises(InputError, match="needs membrane-span labels"):
        calibrate(CalibrateOptions(sae=str(topo["sae"]), fasta=str(topo["fasta"]), model=str(tiny_esm_path),
                                   annotations=[AnnotationSpec([str(binding)], "binding")], device="cpu",
                                   output=str(tmp_path / "x"), segment_decoder="fit"))
    with pytest.raises(InputError, match="--segment-decoder must be one of"):
        _cal(topo, tiny_esm_path, output=str(tmp_path / "y"), segment_decoder="always")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
