"""The per-protein record that every writer consumes and the HDF5 reader produces.

One record type for the whole output side means the annotate pipeline, the three writers and the readers used
by ``merge``/``report``/``export-structure`` cannot drift apart: a field added here is seen by all of them.
Records are checked on construction, because a malformed record (rows that do not match the sequence, an
unknown status) would otherwise surface much later as a corrupt HDF5 file or silently shifted coordinates.

Deliberately free of torch and h5py imports so readers of finished outputs stay light.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

STATUS_NAMES: tuple[str, ...] = ("ok", "truncated", "windowed", "failed_oom", "invalid")
STATUS_CODES: dict[str, int] = {name: code for code, name in enumerate(STATUS_NAMES)}


def seq_md5(sequence: str) -> str:
    """MD5 hex digest of a sequence, or ``""`` when there is no sequence.

    An empty sequence only occurs for invalid records, whose residues are unknown; a digest of ``""`` there
    would look like a real checksum and could be joined against other empty records, so it stays empty.
    """
    if not sequence:
        return ""
    return hashlib.md5(sequence.encode("utf-8")).hexdigest()


@dataclass
class Segment:
    """A run of residues on which one concept (latent at a threshold) is on.

    Coordinates are 1-based inclusive (text-output convention), so a segment can be written out unchanged.
    ``max_act``/``mean_act`` are over the residues that were actually on; residues bridged by ``merge_gap``
    count towards the span (``end - start + 1``) but not towards the statistics.
    """

    latent: int
    start: int
    end: int
    max_act: float
    mean_act: float
    threshold: float

    @property
    def n_residues(self) -> int:
        return self.end - self.start + 1


@dataclass
class ProteinResult:
    """Everything the writers need to know about one input protein.

    ``idx``/``val`` are the encoder's top-k output for the residues that were encoded ([rows, k]; ``-1``/``0``
    in empty slots). ``rows == len(sequence)`` for ``ok``/``windowed``, ``rows <= len(sequence)`` for
    ``truncated``, and ``rows == 0`` for ``failed_oom``/``invalid`` (which are recorded, never dropped).

    ``length`` and ``seq_md5`` default to being derived from ``sequence`` once, at construction. The HDF5
    reader sets them explicitly because for a truncated protein it only has the encoded residues, yet the
    file still knows the full length and checksum.
    """

    index: int
    id: str
    description: str
    sequence: str
    status: str
    status_detail: str
    idx: np.ndarray
    val: np.ndarray
    segments: list[Segment] = field(default_factory=list)
    length: int = -1
    seq_md5: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUS_CODES:
            raise ValueError(f"protein {self.index} ({self.id!r}): unknown status {self.status!r}; "
                             f"expected one of {', '.join(STATUS_NAMES)}")
        self.idx = np.asarray(self.idx, dtype=np.int64)
        self.val = np.asarray(self.val, dtype=np.float32)
        if self.idx.ndim == 1 and self.idx.size == 0:
            self.idx = self.idx.reshape(0, 0)
        if self.val.ndim == 1 and self.val.size == 0:
            self.val = self.val.reshape(0, 0)
        if self.idx.ndim != 2 or self.idx.shape != self.val.shape:
            raise ValueError(f"protein {self.index} ({self.id!r}): idx {self.idx.shape} and val {self.val.shape} "
                             "must both be [rows, k]")
        if self.length < 0:
            self.length = len(self.sequence)
        if self.seq_md5 is None:
            self.seq_md5 = seq_md5(self.sequence)
        rows = self.idx.shape[0]
        if self.status in ("ok", "windowed") and rows != self.length:
            raise ValueError(f"protein {self.index} ({self.id!r}): status {self.status} needs one row per residue "
                             f"({self.length}), got {rows}")
        if self.status == "truncated" and rows > self.length:
            raise ValueError(f"protein {self.index} ({self.id!r}): truncated to {rows} rows but only "
                             f"{self.length} residues")
        if self.status in ("failed_oom", "invalid") and rows != 0:
            raise ValueError(f"protein {self.index} ({self.id!r}): status {self.status} must carry no rows, "
                             f"got {rows}")

    @property
    def n_rows(self) -> int:
        """Residues actually encoded (the HDF5 row count), which differs from ``length`` when truncated."""
        return int(self.idx.shape[0])

    @property
    def status_code(self) -> int:
        return STATUS_CODES[self.status]

    @classmethod
    def without_codes(cls, index: int, id: str, description: str, sequence: str, status: str,
                      status_detail: str, k: int = 0) -> ProteinResult:
        """A record for a protein that produced no codes (invalid input, out of memory).

        Exists so callers do not each hand-build empty [0, k] arrays with the right dtypes.
        """
        return cls(index=index, id=id, description=description, sequence=sequence, status=status,
                   status_detail=status_detail, idx=np.empty((0, k), dtype=np.int64),
                   val=np.empty((0, k), dtype=np.float32), segments=[])
