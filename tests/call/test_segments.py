"""The topology decoder (protsae_cli.call.segments): consistency of decoded paths on any scores, agreement with a
plain Viterbi, recovery of planted topologies, config round trip, and annotate's --decode none being exactly the
per-residue calls."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from protsae_cli.call.concepts import call_segments
from protsae_cli.errors import InputError
from protsae_cli.sae.config import ConceptEntry
from protsae_cli.call.segments import (CLASSES, ROLE_CONCEPTS, RegionCaller, SegmentDecoder, fit_decoder, role_entries,
                                  tmbed_classes, write_decoder)

ROLE_COL = {"helix": 0, "strand": 1, "signal": 2, "inside": 3, "outside": 4}
LABEL_COL = {"H": 0, "h": 0, "B": 1, "b": 1, "S": 2, "1": 3, "2": 4}


def _entries(with_strand: bool = True) -> list[ConceptEntry]:
    return [ConceptEntry(latent=i, concept_id=c, name=r, kind="region", threshold=0.1)
            for i, (r, c) in enumerate(ROLE_CONCEPTS.items()) if with_strand or r != "strand"]


def _synthetic(n: int, seed: int, strands: bool = True, noise: float = 0.05, max_len: int = 300):
    """TMbed-style label strings and activations [L, 5] that fire on the labelled role 80 % of the time."""
    rng = np.random.default_rng(seed)
    labels, acts = [], []
    for p in range(n):
        L = int(rng.integers(90, max_len))
        kind = p % 4
        if kind == 0:
            y = ("S" * 22 + "1" * L)[:L] if p % 8 == 0 else "1" * L
        else:
            span = "B" if (strands and kind == 3) else "H"
            side = "1"
            y = ""
            if p % 3 == 0:
                y, side = "S" * int(rng.integers(18, 28)), "2"
            while len(y) < L - 45:
                y += side * int(rng.integers(4, 30))
                y += span * (int(rng.integers(18, 26)) if span == "H" else int(rng.integers(8, 12)))
                side = "2" if side == "1" else "1"
            y = (y + side * L)[:L]
        a = np.zeros((L, 5), np.float32)
        for i, ch in enumerate(y):
            if rng.random() < 0.8:
                a[i, LABEL_COL[ch]] = rng.random() * 2 + 0.2
            if rng.random() < noise:
                a[i, rng.integers(5)] = rng.random()
        labels.append(y)
        acts.append(a)
    return labels, acts


@pytest.fixture(scope="module")
def params() -> dict:
    labels, acts = _synthetic(160, seed=0)
    roles, order = role_entries(_entries())
    return fit_decoder(acts, [tmbed_classes(y) for y in labels], roles, order, fitted_on="synthetic")


@pytest.fixture(scope="module")
def decoder(params) -> SegmentDecoder:
    return SegmentDecoder(params)


def _letters(dec: SegmentDecoder, cls: np.ndarray) -> str:
    return "".join(dec.classes[c] for c in cls)


def _check_topology(dec: SegmentDecoder, path: str) -> None:
    """What any decoded path must satisfy, whatever the scores."""
    import re

    runs = [(m.group(0)[0], m.start(), m.end()) for m in re.finditer(r"(.)\1*", path)]
    spans = [r for r in runs if r[0] in "HB"]
    sides = [r for r in runs if r[0] in "IO"]
    if "G" in path:  # globular path: nothing but an optional N-terminal signal peptide
        assert not spans and not sides, path
    if sides or spans:
        assert spans or not sides, f"sides without a span: {path}"
        assert "G" not in path
    for c, s, e in runs:
        if c == "S":
            assert s == 0, f"signal peptide not at the N-terminus: {path}"
            d = dec.durations["S"]
            assert d.min <= e - s <= d.max
        if c in "HB":
            d = dec.durations[c]
            assert d.min <= e - s <= d.max or e - s == d.max, (c, e - s, path)
    # Sides alternate across every span: the side before a span differs from the side after it.
    letters = [c for c, _, _ in runs if c in "IOHB"]
    for i, c in enumerate(letters):
        if c in "HB" and 0 < i < len(letters) - 1:
            assert {letters[i - 1], letters[i + 1]} == {"I", "O"}, path
    # Two side runs are always separated by a span (a run boundary I|O with nothing between cannot exist).
    assert "IO" not in path and "OI" not in path


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrays(np.float32, st.tuples(st.integers(1, 160), st.just(5)),
              elements=st.one_of(st.just(0.0), st.floats(0, 8, width=32))))
def test_any_scores_decode_to_a_consistent_topology(decoder, acts):
    _check_topology(decoder, _letters(decoder, decoder.decode(acts)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrays(np.float32, st.tuples(st.integers(1, 120), st.just(5)),
              elements=st.one_of(st.just(0.0), st.floats(0, 8, width=32))))
def test_segments_from_any_scores_have_sides_only_with_spans(decoder, acts):
    entries = _entries()
    caller = RegionCaller(entries, decoder.params, "viterbi")
    idx = np.where(acts > 0, np.arange(5)[None, :], -1)
    segs = caller(idx, acts)
    lat = {s.latent for s in segs}
    if not lat & {0, 1}:
        assert not lat & {3, 4}
    assert all(s.start == 1 for s in segs if s.latent == 2)
    assert all(1 <= s.start <= s.end <= acts.shape[0] for s in segs)


def _plain_viterbi(dec: SegmentDecoder, acts: np.ndarray) -> float:
    """Best path score by a loop over states and predecessors (no vectorisation)."""
    E = dec.class_scores(acts)[:, dec.state_class]
    delta = dec.log_start + E[0]
    for t in range(1, acts.shape[0]):
        new = np.full(dec.n_states, -np.inf)
        for s in range(dec.n_states):
            for j in range(dec.pred.shape[1]):
                new[s] = max(new[s], delta[dec.pred[s, j]] + dec.logT[s, j])
        delta = new + E[t]
    return float(np.max(delta + dec.end_mask))


def _path_score(dec: SegmentDecoder, acts: np.ndarray, cls: np.ndarray) -> float:
    """Score of the decoded class path, re-derived by finding a state path with these classes (brute force
    over the predecessor table, keeping the best score per state)."""
    E = dec.class_scores(acts)[:, dec.state_class]
    ok = dec.state_class[None, :] == cls[:, None]
    delta = np.where(ok[0], dec.log_start + E[0], -np.inf)
    for t in range(1, acts.shape[0]):
        cand = (delta[dec.pred] + dec.logT).max(1)
        delta = np.where(ok[t], cand + E[t], -np.inf)
    return float(np.max(delta + dec.end_mask))


def test_vectorised_viterbi_finds_the_best_path(decoder):
    rng = np.random.default_rng(3)
    for L in (1, 7, 40, 90):
        acts = (rng.random((L, 5)) * (rng.random((L, 5)) < 0.4) * 3).astype(np.float32)
        best = _plain_viterbi(decoder, acts)
        cls = decoder.decode(acts)
        assert _path_score(decoder, acts, cls) == pytest.approx(best, rel=1e-9, abs=1e-6)


def test_planted_topologies_are_recovered(decoder):
    labels, acts = _synthetic(40, seed=11)
    hits = total = 0
    for y, a in zip(labels, acts):
        got = _letters(decoder, decoder.decode(a))
        want = "".join(CLASSES[c] for c in tmbed_classes(y))
        hits += sum(g == w for g, w in zip(got, want))
        total += len(y)
    assert hits / total > 0.9


def test_none_mode_is_exactly_the_per_residue_calls(params):
    rng = np.random.default_rng(5)
    entries = _entries() + [ConceptEntry(latent=9, concept_id="PSC:0000210", name="metal", kind="site")]
    for _ in range(20):
        L = int(rng.integers(1, 80))
        idx = rng.integers(-1, 12, size=(L, 4))
        val = (rng.random((L, 4)) * (idx >= 0)).astype(np.float32)
        for gap, mlen in ((0, 1), (3, 3)):
            want = call_segments(idx, val, entries, min_segment_len=mlen, merge_gap=gap)
            assert RegionCaller(entries, params, "none")(idx, val, mlen, gap) == want
            assert RegionCaller(entries, {}, "viterbi")(idx, val, mlen, gap) == want
            # Sites stay per residue under viterbi too.
            vit = RegionCaller(entries, params, "viterbi")(idx, val, mlen, gap)
            assert [s for s in vit if s.latent == 9] == [s for s in want if s.latent == 9]


def test_soluble_scores_give_no_spans_and_no_sides(decoder):
    acts = np.zeros((200, 5), np.float32)
    acts[:, 3] = 1.5  # "inside" everywhere, as the SAE fires on soluble proteins (TMbed labels them inside)
    assert set(_letters(decoder, decoder.decode(acts))) == {"G"}


def test_withheld_strand_concept_is_not_emitted(params):
    entries = _entries(with_strand=False)
    labels, acts = _synthetic(12, seed=2)
    caller = RegionCaller(entries, params, "viterbi")
    for a in acts:
        idx = np.where(a > 0, np.arange(5)[None, :], -1)
        assert all(s.latent != 1 for s in caller(idx, a))


def test_malformed_decoder_is_refused_naming_the_field(params):
    bad = json.loads(json.dumps(params))
    bad["durations"]["H"]["max"] = bad["durations"]["H"]["min"] - 1
    with pytest.raises(InputError, match="duration H"):
        SegmentDecoder(bad, where="cfg.json")
    bad = json.loads(json.dumps(params))
    bad["emission"]["coef"] = bad["emission"]["coef"][:-1]
    with pytest.raises(InputError, match="cfg.json: emission shapes"):
        SegmentDecoder(bad, where="cfg.json")
    with pytest.raises(InputError, match="--decode"):
        RegionCaller(_entries(), params, "hmm")


def test_decoder_round_trips_through_the_sae_config(tiny_sae_dir, tmp_path, params):
    from protsae_cli.sae.checkpoint import load_sae

    d = tmp_path / "sae"
    shutil.copytree(tiny_sae_dir, d)
    weights = (d / "sae.safetensors").read_bytes()
    write_decoder(d, params)
    sae, _ = load_sae(d)
    assert sae.cfg.segment_decoder == json.loads(json.dumps(params))
    assert (d / "sae.safetensors").read_bytes() == weights
    cfg = json.loads((d / "config.json").read_text())
    cfg["segment_decoder"] = []
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="segment_decoder"):
        load_sae(d)


def _role_sae(tiny_sae_dir, tmp_path, params, name):
    """The tiny SAE with the five role concepts on latents 0-4 and a site concept; optionally a decoder."""
    from protsae_cli.sae.config import CONFIG_NAME

    d = tmp_path / name / "sae"   # same directory name: provenance records it (sae_id)
    shutil.copytree(tiny_sae_dir, d)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["concepts"] = [dict(latent=i, concept_id=c, name=r, kind="region", threshold=0.0)
                       for i, (r, c) in enumerate(ROLE_CONCEPTS.items())] + \
                      [dict(latent=7, concept_id="PSC:0000210", name="metal binding", kind="site", threshold=0.0)]
    if params is not None:
        cfg["segment_decoder"] = params
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    return d


def test_annotate_decode_none_is_byte_equal_to_per_residue_calls(tiny_esm_path, tiny_sae_dir, small_fasta,
                                                                   tmp_path, params):
    from protsae_cli.annotate.pipeline import AnnotateOptions, annotate
    from protsae_cli.io.writers.h5 import H5Annotations

    with_dec = _role_sae(tiny_sae_dir, tmp_path, params, "with")
    without = _role_sae(tiny_sae_dir, tmp_path, None, "without")
    out = {}
    for tag, sae, decode in (("none", with_dec, "none"), ("old", without, "viterbi"), ("vit", with_dec, "viterbi")):
        opts = AnnotateOptions(input=str(small_fasta), output_prefix=str(tmp_path / tag), model=str(tiny_esm_path),
                               sae=str(sae), device="cpu", progress=False, decode=decode, merge_gap=3,
                               min_segment_len=3, formats=("h5", "tsv", "gff3"), command="protsae annotate x")
        annotate(opts)
        out[tag] = {ext: (tmp_path / f"{tag}.{ext}").read_bytes() for ext in ("tsv", "gff3")}
    assert out["none"] == out["old"]
    # And those calls are call_segments over the HDF5 codes, concept by concept.
    from protsae_cli.sae.checkpoint import load_sae

    concepts = load_sae(without)[0].cfg.concepts
    with H5Annotations(tmp_path / "none.h5") as h5, H5Annotations(tmp_path / "vit.h5") as hv:
        for i in range(h5.n_proteins):
            idx, val = h5.codes_topk(i)
            got = [(s.latent, s.start, s.end) for s in h5.segments(i)]
            assert got == [(s.latent, s.start, s.end)
                           for s in call_segments(idx, val, concepts, min_segment_len=3, merge_gap=3)]
            vit = hv.segments(i)
            assert all(s.start == 1 for s in vit if s.latent == 2)
            if not any(s.latent in (0, 1) for s in vit):
                assert not any(s.latent in (3, 4) for s in vit)
