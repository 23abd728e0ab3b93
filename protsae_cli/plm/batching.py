"""Long-protein windows and token-budget batches.

ESM-2 was trained on crops of at most 1024 tokens (1022 residues plus BOS/EOS); beyond that its learned
position handling degrades, so long proteins are cut into overlapping windows. A residue near a window edge
sees context on one side only, so each residue's codes are taken from the window in which it sits most
centrally; the overlaps exist to give every residue such a window.

Batches are packed by padded tokens rather than by count because attention memory grows with the longest
sequence in the batch: a fixed token budget keeps GPU memory flat whatever the length mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar
from collections.abc import Callable, Iterable, Iterator, Sequence

from protsae_cli.errors import InputError

__all__ = [
    "LONG_POLICIES",
    "MAX_RESIDUES",
    "Window",
    "chunked_records",
    "plan_batches",
    "plan_windows",
]

MAX_RESIDUES = 1022  # ESM-2 was trained on crops of 1024 tokens incl. BOS/EOS
LONG_POLICIES = ("window", "truncate", "error")

T = TypeVar("T")


@dataclass(frozen=True)
class Window:
    """One model input: residues ``[start, end)`` go in, codes for ``[keep_start, keep_end)`` come out.

    All ranges are 0-based half-open residue coordinates (BOS/EOS not counted).
    """

    start: int
    end: int
    keep_start: int
    keep_end: int


def plan_windows(
    length: int,
    policy: str = "window",
    max_residues: int = MAX_RESIDUES,
    overlap: int = 256,
    protein_id: str = "",
) -> tuple[list[Window], str]:
    """Plan model inputs for one protein: (windows, status) with status "ok", "windowed" or "truncated".

    Windows all have the full ``max_residues`` (more context is better, and equal sizes make "most central"
    mean "nearest window centre", which keeps each residue's owner window a contiguous run). The fewest
    windows that keep every overlap at least ``overlap`` are spread evenly from the first residue to the
    last, so overlaps are as equal as integer starts allow.
    """
    if policy not in LONG_POLICIES:
        raise InputError(f"unknown long-protein policy {policy!r}; choose one of {', '.join(LONG_POLICIES)}")
    if max_residues < 1:
        raise InputError(f"the window size must be at least 1 residue, got {max_residues}")
    if not 0 <= overlap < max_residues:
        raise InputError(
            f"--window-overlap must be at least 0 and smaller than the window size ({max_residues}), got {overlap}"
        )
    if length < 1:
        raise ValueError(f"protein {protein_id!r}: cannot plan windows for length {length}")

    if length <= max_residues:
        return [Window(0, length, 0, length)], "ok"
    if policy == "error":
        raise InputError(
            f"protein {protein_id!r} has {length} residues, more than the {max_residues} the model accepts; "
            f"use --long-policy window or --long-policy truncate"
        )
    if policy == "truncate":
        return [Window(0, max_residues, 0, max_residues)], "truncated"

    size = max_residues
    step = size - overlap  # the largest start-to-start distance that still leaves `overlap` shared residues
    span = length - size  # distance from the first window's start to the last one's
    gaps = -(-span // step)  # ceil: the fewest gaps of at most `step`
    # Integer round-to-nearest of i * span / gaps. Consecutive differences are at most ceil(span / gaps),
    # which is <= step, and at least 1 because gaps <= span.
    starts = [(2 * i * span + gaps) // (2 * gaps) for i in range(gaps + 1)]
    windows: list[Window] = []
    keep_start = 0
    for i, start in enumerate(starts):
        if i + 1 < len(starts):
            # Residue r is nearer the centre of window i than of window i+1 iff
            # 2r < start_i + start_{i+1} + size - 1; a tie goes to the earlier window.
            keep_end = (start + starts[i + 1] + size - 1) // 2 + 1
        else:
            keep_end = length
        windows.append(Window(start, start + size, keep_start, keep_end))
        keep_start = keep_end
    return windows, "windowed"


def plan_batches(lengths: Sequence[int], toks_per_batch: int) -> list[list[int]]:
    """Group item indices into batches whose padded token count fits ``toks_per_batch``.

    Each item costs ``length + 2`` tokens (BOS/EOS) and a batch costs (its longest item) x (its size), since
    every row is padded to the longest. Sorting longest first means each batch's first item sets its padding,
    and similar lengths end up together, so little of the budget is spent on padding. An item over budget on
    its own still has to run, so it gets a batch to itself (the caller decides what to do on OOM).
    """
    if toks_per_batch < 1:
        raise InputError(f"--toks-per-batch must be at least 1, got {toks_per_batch}")
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"item {i} has negative length {n}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    widest = 0
    for i in order:
        tokens = lengths[i] + 2
        if current and widest * (len(current) + 1) > toks_per_batch:
            batches.append(current)
            current = []
        if not current:
            widest = tokens
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _residue_count(record: object) -> int:
    # Records without a sequence (InvalidRecord) cost no model work but still count towards max_records.
    return len(getattr(record, "sequence", ""))


def chunked_records(
    records: Iterable[T],
    max_residues: int,
    max_records: int,
    length: Callable[[T], int] = _residue_count,
) -> Iterator[list[T]]:
    """Cut a record stream into consecutive, order-preserving chunks of bounded size.

    Sorting by length for batching needs a look-ahead; taking it one chunk at a time gives most of the
    padding savings while memory stays bounded by the chunk, not the input. A chunk closes before a record
    that would push it past ``max_residues`` total residues or ``max_records`` records; a single record
    larger than ``max_residues`` forms a chunk of its own. Records are pulled lazily, at most one past the
    chunk being yielded.
    """
    if max_residues < 1 or max_records < 1:
        raise ValueError(f"chunk limits must be positive, got max_residues={max_residues}, max_records={max_records}")
    chunk: list[T] = []
    residues = 0
    for record in records:
        n = length(record)
        if chunk and (residues + n > max_residues or len(chunk) >= max_records):
            yield chunk
            chunk, residues = [], 0
        chunk.append(record)
        residues += n
    if chunk:
        yield chunk
