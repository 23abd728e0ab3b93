"""Windows for long proteins, token-budget batches and bounded chunks of a record stream."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protsae_cli.plm.batching import MAX_RESIDUES, Window, chunked_records, plan_batches, plan_windows
from protsae_cli.errors import InputError
from protsae_cli.io.fasta import InvalidRecord, ProteinRecord

# --- plan_windows: examples --------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["window", "truncate", "error"])
@pytest.mark.parametrize("length", [1, 500, MAX_RESIDUES])
def test_short_proteins_get_one_full_window_whatever_the_policy(policy, length):
    assert plan_windows(length, policy) == ([Window(0, length, 0, length)], "ok")


def test_truncate_keeps_the_first_max_residues():
    assert plan_windows(5000, "truncate") == ([Window(0, MAX_RESIDUES, 0, MAX_RESIDUES)], "truncated")


def test_error_policy_names_protein_and_length():
    with pytest.raises(InputError, match=r"protein 'titin' has 34350 residues.*1022"):
        plan_windows(34350, "error", protein_id="titin")


def test_one_residue_too_long_gives_two_windows_from_both_ends():
    windows, status = plan_windows(1023, "window", overlap=256)
    assert status == "windowed"
    assert [(w.start, w.end) for w in windows] == [(0, 1022), (1, 1023)]
    assert windows[0].keep_start == 0 and windows[-1].keep_end == 1023
    assert windows[0].keep_end == windows[1].keep_start


def test_windows_are_evenly_spaced_full_size_and_split_overlaps_in_the_middle():
    windows, _ = plan_windows(3000, "window", max_residues=1000, overlap=200)
    # 3 windows would need gaps of 1000 (> 800 allowed), so 4 windows, starts 0, 667, 1333, 2000
    assert [(w.start, w.end) for w in windows] == [(0, 1000), (667, 1667), (1333, 2333), (2000, 3000)]
    assert [(w.keep_start, w.keep_end) for w in windows] == [(0, 834), (834, 1500), (1500, 2167), (2167, 3000)]


def test_zero_overlap_is_allowed():
    windows, _ = plan_windows(30, "window", max_residues=10, overlap=0)
    assert [(w.start, w.end, w.keep_start, w.keep_end) for w in windows] == [
        (0, 10, 0, 10), (10, 20, 10, 20), (20, 30, 20, 30),
    ]


@pytest.mark.parametrize("overlap", [1022, 2000, -1])
def test_overlap_must_be_non_negative_and_smaller_than_the_window(overlap):
    with pytest.raises(InputError, match="--window-overlap"):
        plan_windows(5000, "window", overlap=overlap)


def test_unknown_policy_and_bad_length_are_rejected():
    with pytest.raises(InputError, match="policy"):
        plan_windows(10, "chop")
    with pytest.raises(ValueError):
        plan_windows(0)


# --- plan_windows: properties ------------------------------------------------------------------------------


def edge_distance(window: Window, residue: int) -> int:
    return min(residue - window.start, window.end - 1 - residue)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), max_residues=st.integers(1, 300), length=st.integers(1, 3000))
def test_window_plan_properties(data, max_residues, length):
    overlap = data.draw(st.integers(0, max_residues - 1), label="overlap")
    windows, status = plan_windows(length, "window", max_residues=max_residues, overlap=overlap)
    assert status == ("ok" if length <= max_residues else "windowed")

    # keep ranges partition [0, length): contiguous, in order, non-empty
    assert windows[0].keep_start == 0 and windows[-1].keep_end == length
    for a, b in zip(windows, windows[1:]):
        assert a.keep_end == b.keep_start
        assert a.start < b.start and a.end < b.end
        assert a.end - b.start >= overlap  # consecutive windows share at least `overlap` residues
    for w in windows:
        assert 0 <= w.start <= w.keep_start < w.keep_end <= w.end <= length
        assert w.end - w.start <= max_residues

    # centrality: the owner window is (one of) the most central windows for each residue
    owner = [i for i, w in enumerate(windows) for _ in range(w.keep_start, w.keep_end)]
    assert len(owner) == length
    for r in range(length):
        best = max(edge_distance(w, r) for w in windows if w.start <= r < w.end)
        assert edge_distance(windows[owner[r]], r) == best


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1023, 40_000), overlap=st.integers(0, 1021))
def test_window_count_is_minimal_for_the_overlap(length, overlap):
    windows, _ = plan_windows(length, "window", overlap=overlap)
    # one window fewer could not cover the protein while keeping every overlap >= `overlap`
    fewer = len(windows) - 1
    assert fewer * MAX_RESIDUES - (fewer - 1) * overlap < length


# --- plan_batches ------------------------------------------------------------------------------------------


def test_batches_sort_longest_first_and_break_ties_by_index():
    assert plan_batches([8, 30, 8, 30, 2], toks_per_batch=64) == [[1, 3], [0, 2, 4]]


def test_an_item_over_budget_runs_alone():
    assert plan_batches([100, 10, 10], toks_per_batch=50) == [[0], [1, 2]]


def test_empty_input_gives_no_batches():
    assert plan_batches([], 100) == []


def test_budget_must_be_positive():
    with pytest.raises(InputError, match="--toks-per-batch"):
        plan_batches([1], 0)


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(0, 2000), max_size=60), budget=st.integers(1, 20_000))
def test_batch_plan_properties(lengths, budget):
    batches = plan_batches(lengths, budget)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert all(batches)
    for b in batches:
        tokens = [lengths[i] + 2 for i in b]
        assert len(b) == 1 or max(tokens) * len(b) <= budget
    ordered = [lengths[i] for i in flat]
    assert ordered == sorted(ordered, reverse=True)  # non-increasing lengths across and within batches
    for a, b in zip(flat, flat[1:]):  # deterministic: equal lengths keep input order
        if lengths[a] == lengths[b]:
            assert a < b
    # greedy: a batch is closed only when the next item would not have fit
    for a, b in zip(batches, batches[1:]):
        assert (lengths[a[0]] + 2) * (len(a) + 1) > budget


# --- chunked_records ---------------------------------------------------------------------------------------


def proteins(lengths):
    return [ProteinRecord(i, f"p{i}", "", "A" * n) for i, n in enumerate(lengths)]


def test_chunks_respect_residue_and_record_limits_and_keep_order():
    recs = proteins([5, 5, 5, 20, 1, 1, 1, 1])
    chunks = list(chunked_records(recs, max_residues=12, max_records=3))
    assert [[r.index for r in c] for c in chunks] == [[0, 1], [2], [3], [4, 5, 6], [7]]


def test_invalid_records_pass_through_without_residues():
    recs = [ProteinRecord(0, "a", "", "AAAA"), InvalidRecord(1, "b", "", "bad"), ProteinRecord(2, "c", "", "CCCC")]
    chunks = list(chunked_records(recs, max_residues=8, max_records=10))
    assert chunks == [recs]


def test_custom_length_function():
    chunks = list(chunked_records(range(10), max_residues=10, max_records=100, length=lambda x: x))
    assert chunks == [[0, 1, 2, 3, 4], [5], [6], [7], [8], [9]]


def test_chunking_is_lazy():
    pulled = []

    def source():
        for i in itertools.count():
            pulled.append(i)
            yield ProteinRecord(i, f"p{i}", "", "M" * 10)

    chunks = chunked_records(source(), max_residues=35, max_records=100)
    assert [r.index for r in next(chunks)] == [0, 1, 2]
    assert len(pulled) == 4  # one record past the chunk, which opens the next one


def test_chunk_limits_must_be_positive():
    with pytest.raises(ValueError):
        list(chunked_records([], max_residues=0, max_records=1))


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 500), max_size=50),
    max_residues=st.integers(1, 1500),
    max_records=st.integers(1, 12),
)
def test_chunk_properties(lengths, max_residues, max_records):
    recs = proteins(lengths)
    chunks = list(chunked_records(iter(recs), max_residues, max_records))
    assert [r for c in chunks for r in c] == recs
    for c in chunks:
        assert c and len(c) <= max_records
        assert len(c) == 1 or sum(len(r.sequence) for r in c) <= max_residues
