"""call_segments: hand-made edge cases plus a property test against a per-residue reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protsae_cli.call.concepts import ConceptLookup, call_segments
from protsae_cli.io.results import Segment
from protsae_cli.sae.config import ConceptEntry


def codes(rows: list[dict[int, float]], k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """[rows, k] arrays from {latent: value} per residue, padded like the encoder (-1 / 0)."""
    idx = np.full((len(rows), k), -1, dtype=np.int64)
    val = np.zeros((len(rows), k), dtype=np.float32)
    for r, d in enumerate(rows):
        for s, (lat, v) in enumerate(sorted(d.items(), key=lambda t: -t[1])):
            idx[r, s], val[r, s] = lat, v
    return idx, val


def concept(latent: int, threshold: float = 0.5, cid: str | None = None) -> ConceptEntry:
    return ConceptEntry(latent=latent, concept_id=cid or f"C{latent}", name=f"concept {latent}", threshold=threshold)


def spans(segs: list[Segment]) -> list[tuple[int, int, int]]:
    return [(s.latent, s.start, s.end) for s in segs]


def test_threshold_boundary_is_inclusive_in_float32() -> None:
    # 0.7 is not exactly representable; the float32 activation equal to float32(0.7) must count as on.
    idx, val = codes([{1: 0.7}, {1: 0.69}, {1: 0.7}])
    segs = call_segments(idx, val, [concept(1, 0.7)])
    assert spans(segs) == [(1, 1, 1), (1, 3, 3)]
    assert segs[0].threshold == 0.7


def test_zero_activation_never_on_even_with_zero_threshold() -> None:
    idx = np.array([[1, -1], [1, -1]])
    val = np.array([[0.0, 0.0], [0.2, 0.0]], dtype=np.float32)
    assert spans(call_segments(idx, val, [concept(1, 0.0)])) == [(1, 2, 2)]


@pytest.mark.parametrize("gap,expected", [
    (0, [(1, 1, 2), (1, 4, 4), (1, 7, 7)]),
    (1, [(1, 1, 4), (1, 7, 7)]),
    (2, [(1, 1, 7)]),
])
def test_merge_gap(gap: int, expected: list[tuple[int, int, int]]) -> None:
    on = [1, 1, 0, 1, 0, 0, 1]
    idx, val = codes([{1: 0.9} if o else {2: 0.9} for o in on])
    assert spans(call_segments(idx, val, [concept(1)], merge_gap=gap)) == expected


def test_merged_statistics_cover_on_residues_only() -> None:
    idx, val = codes([{1: 1.0}, {1: 0.1}, {1: 3.0}])
    (seg,) = call_segments(idx, val, [concept(1, 0.5)], merge_gap=1)
    assert (seg.start, seg.end, seg.n_residues) == (1, 3, 3)
    assert seg.max_act == pytest.approx(3.0)
    assert seg.mean_act == pytest.approx(2.0)  # (1 + 3) / 2: the 0.1 residue is bridged, not averaged


def test_min_segment_len_applies_after_merging() -> None:
    idx, val = codes([{1: 1.0}, {}, {1: 1.0}, {}, {}, {}, {1: 1.0}])
    assert spans(call_segments(idx, val, [concept(1)], min_segment_len=2)) == []
    assert spans(call_segments(idx, val, [concept(1)], min_segment_len=3, merge_gap=1)) == [(1, 1, 3)]


def test_multiple_concepts_sorted_by_start_then_latent() -> None:
    idx, val = codes([{5: 1.0}, {5: 1.0, 2: 0.9}, {2: 0.8}, {9: 0.1}])
    segs = call_segments(idx, val, [concept(5), concept(2), concept(9, 0.05)])
    assert spans(segs) == [(5, 1, 2), (2, 2, 3), (9, 4, 4)]


def test_absent_latent_and_empty_inputs() -> None:
    idx, val = codes([{1: 1.0}, {2: 1.0}])
    assert call_segments(idx, val, [concept(7)]) == []
    assert call_segments(idx, val, []) == []
    assert call_segments(np.empty((0, 4), np.int64), np.empty((0, 4), np.float32), [concept(1)]) == []


def test_minus_one_slots_ignored_even_with_nonzero_value() -> None:
    idx = np.array([[-1, 3], [3, -1]])
    val = np.array([[5.0, 0.0], [0.0, 5.0]], dtype=np.float32)
    # Row 1 has latent 3 only in a zero slot, and a -1 slot with a value: nothing is on.
    assert call_segments(idx, val, [concept(3, 0.0)]) == []


def test_same_latent_two_thresholds_gives_two_segment_sets() -> None:
    idx, val = codes([{1: 0.6}, {1: 0.9}, {1: 0.6}])
    segs = call_segments(idx, val, [concept(1, 0.8, "strict"), concept(1, 0.5, "loose"), concept(1, 0.5, "dup")])
    assert [(s.start, s.end, s.threshold) for s in segs] == [(1, 3, 0.5), (2, 2, 0.8)]
    lookup = ConceptLookup([concept(1, 0.8, "strict"), concept(1, 0.5, "loose"), concept(1, 0.5, "dup")])
    assert [c.concept_id for c in lookup.entries(segs[0])] == ["loose", "dup"]
    assert [c.concept_id for c in lookup.entries(segs[1])] == ["strict"]
    assert lookup.entries(Segment(4, 1, 1, 1.0, 1.0, 0.5)) == []


def test_rejects_bad_arguments() -> None:
    idx, val = codes([{1: 1.0}])
    with pytest.raises(ValueError):
        call_segments(idx, val, [concept(1)], min_segment_len=0)
    with pytest.raises(ValueError):
        call_segments(idx, val, [concept(1)], merge_gap=-1)
    with pytest.raises(ValueError):
        call_segments(idx[:, :1], val, [concept(1)])


def reference_segments(idx: np.ndarray, val: np.ndarray, concepts: list[ConceptEntry], min_len: int,
                       gap: int) -> list[tuple[int, int, int, float, float, float]]:
    """Naive per-residue, per-concept implementation of the documented rules."""
    out = set()
    for c in concepts:
        thr = np.float32(c.threshold)
        on = []
        for r in range(idx.shape[0]):
            a = [val[r, s] for s in range(idx.shape[1]) if idx[r, s] == c.latent and val[r, s] > 0]
            on.append(a[0] if a and a[0] >= thr else None)
        runs: list[list[int]] = []
        for r, a in enumerate(on):
            if a is None:
                continue
            if runs and r - runs[-1][-1] - 1 <= gap:
                runs[-1].append(r)
            else:
                runs.append([r])
        for run in runs:
            if run[-1] - run[0] + 1 >= min_len:
                acts = [float(on[r]) for r in run]
                out.add((c.latent, run[0] + 1, run[-1] + 1, max(acts), sum(acts) / len(acts), c.threshold))
    return sorted(out, key=lambda t: (t[1], t[0], np.float32(t[5])))


@st.composite
def cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, list[ConceptEntry], int, int]:
    n_rows = draw(st.integers(0, 30))
    k = draw(st.integers(1, 4))
    values = st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 1.0, 2.5])
    idx = np.full((n_rows, k), -1, dtype=np.int64)
    val = np.zeros((n_rows, k), dtype=np.float32)
    for r in range(n_rows):
        lats = draw(st.lists(st.integers(0, 6), max_size=k, unique=True))
        for s, lat in enumerate(lats):
            idx[r, s] = lat
            val[r, s] = draw(values)
    concepts = draw(st.lists(st.builds(concept, st.integers(0, 7), st.sampled_from([0.0, 0.25, 0.5, 0.7])),
                             max_size=5))
    return idx, val, concepts, draw(st.integers(1, 4)), draw(st.integers(0, 3))


@settings(max_examples=300, deadline=None)
@given(cases())
def test_matches_reference(case: tuple[np.ndarray, np.ndarray, list[ConceptEntry], int, int]) -> None:
    idx, val, concepts, min_len, gap = case
    got = call_segments(idx, val, concepts, min_segment_len=min_len, merge_gap=gap)
    want = reference_segments(idx, val, concepts, min_len, gap)
    assert [(s.latent, s.start, s.end, s.threshold) for s in got] == [w[:3] + (w[5],) for w in want]
    for s, w in zip(got, want):
        assert s.max_act == pytest.approx(w[3], rel=1e-6)
        assert s.mean_act == pytest.approx(w[4], rel=1e-6)


# -- calling policy, segment scores, standard terms (#14) ------------------------------------------------------
def measured(latent: int, precision: float | None, f1: float | None, positives: int = 100, **kw) -> ConceptEntry:
    return ConceptEntry(latent=latent, concept_id=f"C{latent}", name=f"c{latent}", precision=precision, f1=f1,
                        recall=None if f1 is None else 0.5, positives=positives, **kw)


def test_select_calls_withholds_below_the_floors() -> None:
    from protsae_cli.call.concepts import CallPolicy, select_calls

    table = [measured(0, 0.9, 0.8), measured(1, 0.3, 0.4), measured(2, 0.95, 0.05), measured(3, 0.9, 0.8, positives=5),
             measured(4, None, None), measured(5, 0.5, 0.1)]
    sel = select_calls(table)
    assert [e.latent for e in sel.called] == [0, 4, 5]             # at the floor is called
    assert [(e.latent, why.split()[0]) for e, why in sel.withheld] == [(1, "precision"), (2, "F1"), (3, "5")]
    assert [e.latent for e in sel.unmeasured] == [4]
    assert sel.withheld_text().startswith("C1 c1 (precision 0.3 < 0.5); C2 c2 (F1 0.05 < 0.1)")
    forced = select_calls(table, CallPolicy(call_withheld=True))
    assert len(forced.called) == len(table) and [e.latent for e, _ in forced.forced] == [1, 2, 3]
    assert not select_calls(table, CallPolicy(min_precision=0.0, min_f1=0.0, min_positives=0)).withheld


def test_segment_score_reads_the_step_curve() -> None:
    from protsae_cli.call.concepts import segment_score

    e = ConceptEntry(latent=1, concept_id="C", name="c", score_curve=[[0.1, 0.2], [0.5, 0.6], [0.9, 0.95]])
    assert [segment_score(e, a) for a in (0.05, 0.1, 0.49, 0.5, 0.7, 0.9, 3.0)] == [0.2, 0.2, 0.2, 0.6, 0.6, 0.95,
                                                                                   0.95]
    assert segment_score(e, np.float32(0.5)) == 0.6                 # float32 activations meet float knots exactly
    assert segment_score(ConceptEntry(latent=1, concept_id="C", name="c"), 1.0) is None
    assert segment_score(None, 1.0) is None


def test_standardize_fills_standard_ids_and_kind() -> None:
    from protsae_cli.call.concepts import standardize

    table = [ConceptEntry(latent=0, concept_id="PSC:0000101", name="transmembrane helix", ontology_id="PSC:0000101"),
             ConceptEntry(latent=1, concept_id="PSC:0000210", name="metal binding"),
             ConceptEntry(latent=2, concept_id="PSC:T", name="custom", ontology_id="XX:1"),
             ConceptEntry(latent=3, concept_id="PSC:0000120", name="signal peptide", ontology_id="GO:0099999",
                          kind="site")]
    out = standardize(table)
    assert [(e.ontology_id, e.kind) for e in out] == [
        ("SO:0001077", "region"), ("SO:0001656,GO:0046872", "site"), ("XX:1", ""),
        ("SO:0000418,GO:0099999", "site")]                           # a table's own ids and kind are kept
    assert table[0].ontology_id == "PSC:0000101"                     # copies, not edits
