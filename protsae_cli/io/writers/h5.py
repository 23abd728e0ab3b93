"""The HDF5 annotation file: sparse CSR codes over all residues, per-protein table, segments, concepts.

Layout (docs/ARCHITECTURE.md is the contract; this module is its only writer)::

    /                      provenance attrs (+ format, format_version, coordinate_system, d_sae, k)
    /proteins/{index, id, description, length, seq_md5, row_offset (n+1), status, status_detail}
    /residues/aa           one S1 per encoded row
    /codes/{data, indices, indptr}   CSR [N rows, d_sae]; attrs encoding-type/encoding-version/shape (AnnData)
    /segments/{protein_index, latent, start, end, max_act, mean_act, threshold}
    /concepts/{latent, concept_id, name, ontology_id, threshold, kind, precision, recall, f1, positives,
               label_source, operating_point, validation, score_activation, score_probability}

Why this shape: one flat CSR matrix scales to millions of proteins where one group per protein does not (HDF5
object overhead), and ``anndata.experimental.sparse_dataset(f["codes"])`` or any CSR-aware reader opens it
without protsae. Ids are data (vlen UTF-8), never object names, so any header is stored verbatim and duplicates
are fine.

Writer choices:

* Streaming: every dataset is 1-D, chunked and resizable; records are buffered and appended every
  ``flush_rows`` residue rows / ``flush_proteins`` proteins, so memory is bounded by the buffer, not the input.
* CSR rows hold only real entries (top-k slots with ``idx >= 0`` and a nonzero value), sorted by latent index
  ascending within a row (canonical CSR, what scipy and AnnData expect). The encoder's value order is not kept;
  :meth:`H5Annotations.codes_topk` restores it (value desc, latent asc).
* Values are float32 by default, because scipy.sparse (and so AnnData's ``read_elem``) refuses float16 CSR
  data. ``dtype="float16"`` makes files about 40 % smaller (activations need no more than ~3 digits) for
  readers that use h5py directly; values beyond float16's range (65504) then become inf, with one warning.
* gzip level 4 + shuffle by default because every HDF5 build (R, Julia, MATLAB, C) reads gzip; ``lzf`` is
  faster but needs h5py/a plugin to read; ``None`` disables compression (partial chunks then cost full size).
* Chunks: ~256K elements for the residue- and entry-level arrays, smaller ones for per-protein and segment
  arrays, whose elements are bigger (vlen strings) and fewer.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from protsae_cli import __version__
from protsae_cli.errors import InputError
from protsae_cli.io.results import STATUS_CODES, STATUS_NAMES, ProteinResult, Segment
from protsae_cli.io.writers import split_identity
from protsae_cli.io.atomic import AtomicFile, OutputWriter, named_os_error, signals_deferred

if TYPE_CHECKING:
    import scipy.sparse

    from protsae_cli.sae.config import ConceptEntry

FORMAT = "protsae-annotations"
FORMAT_VERSION = 1
COORDINATE_SYSTEM = "0-based rows; text outputs 1-based inclusive"
CSR_ENCODING = {"encoding-type": "csr_matrix", "encoding-version": "0.1.0"}
SEGMENT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("protein_index", "int64"), ("latent", "int32"), ("start", "int32"), ("end", "int32"),
    ("max_act", "float32"), ("mean_act", "float32"), ("threshold", "float32"),
)
_SEGMENT_RECORD = np.dtype(list(SEGMENT_COLUMNS))
_STR = h5py.string_dtype("utf-8")
#: Text columns of /concepts beyond concept_id/name/ontology_id (reliability provenance, docs/CALLS.md).
CONCEPT_TEXT_COLUMNS = ("kind", "label_source", "operating_point", "validation")


def read_concept_reliability(g: h5py.Group) -> list[dict[str, Any]]:
    """Per concept row, the reliability fields of a /concepts group as ConceptEntry values (None for NaN);
    empty dicts for files written before the columns existed."""
    n = int(g["latent"].shape[0])
    if "precision" not in g:
        return [{} for _ in range(n)]
    text = {name: g[name].asstr()[()] for name in CONCEPT_TEXT_COLUMNS if name in g}
    num = {name: g[name][()] for name in ("precision", "recall", "f1")}
    pos = g["positives"][()]
    acts, probs = g["score_activation"][()], g["score_probability"][()]
    out = []
    for i in range(n):
        rec: dict[str, Any] = {name: str(col[i]) for name, col in text.items()}
        rec.update({name: None if np.isnan(col[i]) else float(col[i]) for name, col in num.items()})
        rec["positives"] = int(pos[i])
        ok = ~np.isnan(acts[i])
        rec["score_curve"] = [[float(a), float(p)] for a, p in zip(acts[i][ok], probs[i][ok], strict=True)]
        out.append(rec)
    return out
_FP16_MAX = float(np.finfo(np.float16).max)


def _check_table_columns(f: h5py.File, group: str, path: str | os.PathLike[str]) -> None:
    """Refuse a table group (/concepts, /segments) whose columns differ in length: readers pair them up row by
    row, so a damaged or hand-edited file would otherwise lose or misattribute rows."""
    g = f.get(group)
    if not isinstance(g, h5py.Group):
        return
    shapes = {name: ds.shape for name, ds in g.items() if isinstance(ds, h5py.Dataset) and ds.shape}
    odd = len({s[0] for s in shapes.values()}) > 1
    if group == "concepts" and "score_activation" in shapes and "score_probability" in shapes:
        odd = odd or shapes["score_activation"] != shapes["score_probability"]
    if odd:
        have = ", ".join(f"{name} {'x'.join(map(str, s))}" for name, s in sorted(shapes.items()))
        raise InputError(f"{path}: the /{group} columns have different lengths ({have}); the file is damaged or "
                         "was not written by protsae")


def index_dtype(d_sae: int) -> np.dtype:
    """uint16 covers every latent of a dictionary up to 65535 wide and halves the index column."""
    return np.dtype(np.uint16) if d_sae <= 65535 else np.dtype(np.uint32)


def _attr_value(v: Any) -> Any:
    """HDF5-storable form of a provenance value; None becomes "" so every documented key can be present."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    return v


class H5Writer(OutputWriter):
    """Streaming writer of the annotation file; see the module docstring for layout and choices.

    ``provenance`` becomes the root attributes (the documented keys: command, plm_model, hook_point, layer, ...);
    ``format``, ``format_version``, ``coordinate_system``, ``d_sae`` and ``k`` are always set by the writer.
    """

    def __init__(self, path: str | os.PathLike[str], provenance: Mapping[str, Any],
                 concepts: Sequence[ConceptEntry], d_sae: int, k: int, *, dtype: str = "float32",
                 compression: str | None = "gzip", compression_level: int = 4, shuffle: bool = True,
                 chunk_elems: int = 1 << 18, flush_rows: int = 1 << 18, flush_proteins: int = 1 << 14):
        super().__init__()
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        if compression not in ("gzip", "lzf", None):
            raise ValueError(f"compression must be 'gzip', 'lzf' or None, got {compression!r}")
        if d_sae < 1 or not 0 < k <= d_sae:
            raise ValueError(f"need d_sae >= 1 and 0 < k <= d_sae, got d_sae={d_sae}, k={k}")
        self.path = Path(path)
        self.d_sae, self.k = int(d_sae), int(k)
        self.value_dtype = np.dtype(dtype)
        self.index_dtype = index_dtype(self.d_sae)
        self.flush_rows, self.flush_proteins = int(flush_rows), int(flush_proteins)
        self._filters: dict[str, Any] = {}
        if compression == "gzip":
            self._filters = {"compression": "gzip", "compression_opts": int(compression_level)}
        elif compression == "lzf":
            self._filters = {"compression": "lzf"}
        self._shuffle = bool(shuffle and compression)
        self._big_chunk = int(chunk_elems)
        self._protein_chunk = max(1, min(self._big_chunk, 1 << 14))
        self._segment_chunk = max(1, min(self._big_chunk, 1 << 16))
        self._warned_overflow = False

        self.n_proteins = 0
        self.n_rows = 0
        self.nnz = 0
        self.n_segments = 0
        self._reset_buffers()

        provenance, identity = split_identity(provenance)
        self.set_input_identity(identity)
        self.atomic = AtomicFile(self.path)
        try:
            with signals_deferred():
                self._sink = _DiscardableFile(self.atomic.tmp, self.path)
                self.f = h5py.File(self._sink, "w")
                self._create_layout(provenance, concepts)
            self._sink.raise_failure()
        except BaseException:
            self._abort()
            raise

    # -- layout ---------------------------------------------------------------------------------------------
    def _dataset(self, group: h5py.Group, name: str, dtype: Any, chunk: int, numeric: bool = True) -> h5py.Dataset:
        return group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,),
                                    shuffle=self._shuffle and numeric, **self._filters)

    def _create_layout(self, provenance: Mapping[str, Any], concepts: Sequence[ConceptEntry]) -> None:
        f = self.f
        attrs: dict[str, Any] = {"protsae_version": __version__, "shard": ""}
        attrs.update({str(k): _attr_value(v) for k, v in provenance.items()})
        attrs.update(format=FORMAT, format_version=FORMAT_VERSION, coordinate_system=COORDINATE_SYSTEM,
                     d_sae=self.d_sae, k=self.k)
        for key, value in attrs.items():
            f.attrs[key] = value

        pc = self._protein_chunk
        p = f.create_group("proteins")
        self.ds: dict[str, h5py.Dataset] = {
            "index": self._dataset(p, "index", np.int64, pc),
            "id": self._dataset(p, "id", _STR, pc, numeric=False),
            "description": self._dataset(p, "description", _STR, pc, numeric=False),
            "length": self._dataset(p, "length", np.int32, pc),
            "seq_md5": self._dataset(p, "seq_md5", "S32", pc, numeric=False),
            "row_offset": self._dataset(p, "row_offset", np.int64, pc),
            "status": self._dataset(p, "status", np.int8, pc),
            "status_detail": self._dataset(p, "status_detail", _STR, pc, numeric=False),
        }
        self.ds["status"].attrs["status_names"] = list(STATUS_NAMES)
        r = f.create_group("residues")
        self.ds["aa"] = self._dataset(r, "aa", "S1", self._big_chunk, numeric=False)
        c = f.create_group("codes")
        for key, value in CSR_ENCODING.items():
            c.attrs[key] = value
        c.attrs["shape"] = np.array([0, self.d_sae], dtype=np.int64)
        self.ds["data"] = self._dataset(c, "data", self.value_dtype, self._big_chunk)
        self.ds["indices"] = self._dataset(c, "indices", self.index_dtype, self._big_chunk)
        self.ds["indptr"] = self._dataset(c, "indptr", np.int64, self._big_chunk)
        s = f.create_group("segments")
        for name, dt in SEGMENT_COLUMNS:
            self.ds["seg_" + name] = self._dataset(s, name, dt, self._segment_chunk)
        # The leading zero of the two offset arrays: every later append is one end offset per protein/row.
        self._append("row_offset", np.zeros(1, np.int64))
        self._append("indptr", np.zeros(1, np.int64))

        g = f.create_group("concepts")
        g.create_dataset("latent", data=np.array([c_.latent for c_ in concepts], dtype=np.int32))
        for name in ("concept_id", "name", "ontology_id"):
            g.create_dataset(name, data=np.array([str(getattr(c_, name)) for c_ in concepts], dtype=object),
                             dtype=_STR)
        g.create_dataset("threshold", data=np.array([c_.threshold for c_ in concepts], dtype=np.float32))
        # Reliability (docs/CALLS.md): NaN / "" where not measured; score curves NaN-padded to one width.
        for name in CONCEPT_TEXT_COLUMNS:
            g.create_dataset(name, data=np.array([str(getattr(c_, name, "") or "") for c_ in concepts],
                                                 dtype=object), dtype=_STR)
        for name in ("precision", "recall", "f1"):
            g.create_dataset(name, data=np.array([np.nan if getattr(c_, name, None) is None else getattr(c_, name)
                                                  for c_ in concepts], dtype=np.float32))
        g.create_dataset("positives", data=np.array([int(getattr(c_, "positives", 0) or 0) for c_ in concepts],
                                                    dtype=np.int64))
        curves = [list(getattr(c_, "score_curve", None) or []) for c_ in concepts]
        width = max([1, *(len(cv) for cv in curves)])
        table = np.full((len(concepts), width, 2), np.nan, dtype=np.float32)
        for i, cv in enumerate(curves):
            if cv:
                table[i, :len(cv)] = np.asarray(cv, dtype=np.float32)
        g.create_dataset("score_activation", data=table[:, :, 0])
        g.create_dataset("score_probability", data=table[:, :, 1])

    def _append(self, name: str, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        ds = self.ds[name]
        n = ds.shape[0]
        ds.resize((n + len(values),))
        ds[n:] = values

    # -- buffering ------------------------------------------------------------------------------------------
    def _reset_buffers(self) -> None:
        self._b_prot: dict[str, list[Any]] = {k: [] for k in
                                              ("index", "id", "description", "length", "seq_md5", "row_offset",
                                               "status", "status_detail")}
        self._b_aa: list[bytes] = []
        self._b_data: list[np.ndarray] = []
        self._b_indices: list[np.ndarray] = []
        self._b_indptr: list[np.ndarray] = []
        self._b_seg: list[np.ndarray] = []
        self._b_n_seg = 0
        self._b_rows = 0

    def _csr_rows(self, result: ProteinResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(data, indices, per-row counts) of one protein, entries sorted by latent within each row."""
        idx, val = result.idx, result.val
        if idx.shape[0] == 0:
            return (np.empty(0, self.value_dtype), np.empty(0, self.index_dtype), np.empty(0, np.int64))
        if idx.shape[1] > self.k:
            raise ValueError(f"protein {result.index} ({result.id!r}): {idx.shape[1]} code slots per row, "
                             f"more than k={self.k}")
        present = (idx >= 0) & (val != 0)
        if present.any() and int(idx[present].max()) >= self.d_sae:
            raise ValueError(f"protein {result.index} ({result.id!r}): latent {int(idx[present].max())} "
                             f"out of range for d_sae={self.d_sae}")
        key = np.where(present, idx, self.d_sae)
        order = np.argsort(key, axis=1, kind="stable")
        key = np.take_along_axis(key, order, axis=1)
        if key.shape[1] > 1 and np.any((key[:, 1:] == key[:, :-1]) & (key[:, 1:] < self.d_sae)):
            raise ValueError(f"protein {result.index} ({result.id!r}): a latent appears twice in one row")
        keep = key < self.d_sae
        vals = np.take_along_axis(val, order, axis=1)[keep]
        if self.value_dtype == np.float16 and not self._warned_overflow and vals.size \
                and float(np.abs(vals).max()) > _FP16_MAX:
            self._warned_overflow = True
            warnings.warn(f"{self.path}: activations above {_FP16_MAX:g} are stored as inf in float16; "
                          "write float32 codes to keep them", RuntimeWarning, stacklevel=4)
        with np.errstate(over="ignore"):
            data = vals.astype(self.value_dtype)
        return data, key[keep].astype(self.index_dtype), keep.sum(axis=1, dtype=np.int64)

    def _write(self, result: ProteinResult) -> None:
        rows = result.n_rows
        data, indices, counts = self._csr_rows(result)
        try:
            aa = result.sequence[:rows].encode("ascii")
        except UnicodeEncodeError as e:
            raise ValueError(f"protein {result.index} ({result.id!r}): non-ASCII residue in sequence") from e
        segs = sorted(result.segments, key=lambda s: (s.start, s.latent, s.threshold))
        for s in segs:
            if not 1 <= s.start <= s.end <= rows:
                raise ValueError(f"protein {result.index} ({result.id!r}): segment {s.start}-{s.end} outside "
                                 f"the {rows} encoded residues")

        b = self._b_prot
        b["index"].append(result.index)
        b["id"].append(result.id)
        b["description"].append(result.description)
        b["length"].append(result.length)
        b["seq_md5"].append((result.seq_md5 or "").encode("ascii"))
        b["row_offset"].append(self.n_rows + rows)
        b["status"].append(STATUS_CODES[result.status])
        b["status_detail"].append(result.status_detail)
        if rows:
            self._b_aa.append(aa)
            self._b_data.append(data)
            self._b_indices.append(indices)
            self._b_indptr.append(self.nnz + np.cumsum(counts))
        if segs:
            self._b_seg.append(np.array(
                [(result.index, s.latent, s.start, s.end, s.max_act, s.mean_act, s.threshold) for s in segs],
                dtype=_SEGMENT_RECORD))
            self._b_n_seg += len(segs)

        self.n_proteins += 1
        self.n_rows += rows
        self.nnz += int(data.size)
        self.n_segments += len(segs)
        self._b_rows += rows
        if (self._b_rows >= self.flush_rows or len(b["index"]) >= self.flush_proteins
                or self._b_n_seg >= self.flush_rows):
            self._flush()

    def _flush(self) -> None:
        with signals_deferred():  # HDF5 calls back into Python here: a signal's exception waits until it returns
            self._flush_buffers()
        self._sink.raise_failure()

    def _flush_buffers(self) -> None:
        b = self._b_prot
        if b["index"]:
            self._append("index", np.asarray(b["index"], np.int64))
            self._append("id", np.array(b["id"], dtype=object))
            self._append("description", np.array(b["description"], dtype=object))
            self._append("length", np.asarray(b["length"], np.int32))
            self._append("seq_md5", np.array(b["seq_md5"], dtype="S32"))
            self._append("row_offset", np.asarray(b["row_offset"], np.int64))
            self._append("status", np.asarray(b["status"], np.int8))
            self._append("status_detail", np.array(b["status_detail"], dtype=object))
        if self._b_aa:
            self._append("aa", np.frombuffer(b"".join(self._b_aa), dtype="S1"))
            self._append("data", np.concatenate(self._b_data))
            self._append("indices", np.concatenate(self._b_indices))
            self._append("indptr", np.concatenate(self._b_indptr))
        if self._b_seg:
            table = np.concatenate(self._b_seg)
            for name, _ in SEGMENT_COLUMNS:
                self._append("seg_" + name, table[name])
        self._reset_buffers()

    def _close(self) -> None:
        self._flush()
        with signals_deferred():
            self.f["codes"].attrs["shape"] = np.array([self.n_rows, self.d_sae], dtype=np.int64)
            for key, value in self.input_identity.items():
                self.f.attrs[key] = _attr_value(value)
            self.f.close()
        self._sink.raise_failure()
        self._sink.close()
        try:
            self.atomic.commit()
        except OSError as e:
            raise named_os_error(e, self.path) from e

    def _abort(self) -> None:
        with signals_deferred():  # a second Ctrl-C must not stop the clean-up half way
            sink = getattr(self, "_sink", None)
            if sink is not None:
                sink.discard = True  # HDF5's last flushes go nowhere: the file is deleted below anyway
            f = getattr(self, "f", None)
            if f is not None:
                try:
                    f.close()
                except Exception:  # an abort must always get as far as deleting the temp
                    pass
            if sink is not None:
                sink.close()
            self.atomic.discard()


class _DiscardableFile(io.RawIOBase):
    """The file HDF5 writes through (h5py's file-object driver) instead of its own POSIX driver.

    Why: when a write fails (disk full, quota, EIO), HDF5 is left with dirty metadata it can never flush, and
    closing the file, or the library shutting down at exit, crashes the process (a segfault, exit 139, after
    the error message) whichever driver reported the failure. So HDF5 never sees one: the first exception in
    a callback (a failed write, or a signal's exception raised while Python ran the callback) is remembered,
    it and every later write are dropped (reported as done), and the writer raises the remembered exception
    (an ``OSError`` names the output) right after the HDF5 call that hit it; the abort that follows then
    closes the file normally before the temp is deleted. The CLI also defers its signal exceptions while
    HDF5 runs (`atomic.signals_deferred`), so a Ctrl-C lands between HDF5 calls, not inside one.
    """

    def __init__(self, tmp: Path, final: Path) -> None:
        super().__init__()
        self._f = open(tmp, "x+b", buffering=0)  # noqa: SIM115 (HDF5 buffers; closed by close())
        self._final = final
        self.discard = False
        self.failure: BaseException | None = None

    def raise_failure(self) -> None:
        """Raise the exception HDF5 was shielded from, if there was one."""
        if self.failure is not None:
            raise self.failure

    def _fail(self, e: BaseException) -> None:
        if self.failure is None:
            self.failure = named_os_error(e, self._final) if isinstance(e, OSError) else e
        self.discard = True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return self._f.seek(offset, whence)
        except BaseException as e:  # noqa: B036 (HDF5 must never see an exception; see the class docstring)
            self._fail(e)
            return offset

    def tell(self) -> int:
        try:
            return self._f.tell()
        except BaseException as e:  # noqa: B036
            self._fail(e)
            return 0

    def readinto(self, buffer: Any) -> int:
        try:
            return self._f.readinto(buffer)
        except BaseException as e:  # noqa: B036
            self._fail(e)
            return 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.discard:
            return len(view)
        done = 0
        try:
            while done < len(view):  # unbuffered: a write may be short (the last bytes before a full disk)
                done += self._f.write(view[done:])
        except BaseException as e:  # noqa: B036
            self._fail(e)
            return len(view)
        return done

    def truncate(self, size: int | None = None) -> int:
        if self.discard:
            return self._f.tell() if size is None else size
        try:
            return self._f.truncate(size)
        except BaseException as e:  # noqa: B036
            self._fail(e)
            return 0 if size is None else size

    def flush(self) -> None:
        if self.discard or self._f.closed:
            return
        try:
            self._f.flush()
        except BaseException as e:  # noqa: B036
            self._fail(e)

    def close(self) -> None:
        if not self._f.closed:
            try:
                self.flush()
            finally:
                try:
                    self._f.close()
                except OSError:
                    if not self.discard:
                        raise
        super().close()


# ---------------------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------------------

@dataclass
class ProteinInfo:
    """One row of /proteins, with its position in the file and its residue-row range."""

    position: int
    index: int
    id: str
    description: str
    length: int
    seq_md5: str
    status: str
    status_detail: str
    row_start: int
    row_stop: int

    @property
    def n_rows(self) -> int:
        return self.row_stop - self.row_start


class ProteinTable:
    """Column access to /proteins: ``table["id"]`` reads (and caches) a whole column.

    Whole-column reads are what report/merge need (filtering, joins); single proteins go through
    :meth:`H5Annotations.protein`, which reads scalars only. String columns come back as ``str`` object arrays,
    ``status`` as int8 codes (``status_names`` maps them).
    """

    columns = ("index", "id", "description", "length", "seq_md5", "row_offset", "status", "status_detail")

    def __init__(self, group: h5py.Group):
        self._g = group
        self._cache: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self._g["index"].shape[0])

    def __getitem__(self, column: str) -> np.ndarray:
        if column not in self.columns:
            raise KeyError(f"no protein column {column!r}; columns: {', '.join(self.columns)}")
        if column not in self._cache:
            ds = self._g[column]
            if column in ("id", "description", "status_detail"):
                arr = ds.asstr()[()]
            elif column == "seq_md5":
                arr = np.array([x.decode("ascii") for x in ds[()]], dtype=object)
            else:
                arr = ds[()]
            self._cache[column] = np.asarray(arr)
        return self._cache[column]


class H5Annotations:
    """Read-only view of an annotation file written by :class:`H5Writer`.

    Proteins are addressed by their *position* in the file (0..n_proteins-1), which equals the input ordinal
    for an unsharded run; ``proteins["index"]`` holds the input ordinals. Reads are lazy, so opening a file
    with millions of proteins is cheap; :meth:`iter_results` streams in blocks for whole-file passes.
    """

    def __init__(self, path: str | os.PathLike[str], *, locking: bool | None = None):
        self.path = Path(path)
        kwargs = {} if locking is None else {"locking": locking}
        try:
            self.f = h5py.File(self.path, "r", **kwargs)
        except OSError as e:
            raise InputError(f"{self.path}: cannot open as HDF5 ({e})") from e
        fmt = self.f.attrs.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != FORMAT:
            self.f.close()
            raise InputError(f"{self.path}: not a protsae annotation file (format={fmt!r})")
        version = int(self.f.attrs.get("format_version", 0))
        if version > FORMAT_VERSION:
            self.f.close()
            raise InputError(f"{self.path}: format_version {version} is newer than this protsae reads "
                             f"({FORMAT_VERSION}); upgrade protsae")
        try:
            for group in ("concepts", "segments"):  # their columns are read row by row (zip strict)
                _check_table_columns(self.f, group, self.path)
        except InputError:
            self.f.close()
            raise
        self.proteins = ProteinTable(self.f["proteins"])
        names = self.f["proteins/status"].attrs.get("status_names", STATUS_NAMES)
        self.status_names: tuple[str, ...] = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        self._seg_index: tuple[np.ndarray, np.ndarray | None] | None = None

    # -- file-level -----------------------------------------------------------------------------------------
    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> H5Annotations:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n_proteins

    @property
    def n_proteins(self) -> int:
        return len(self.proteins)

    @property
    def n_rows(self) -> int:
        return int(self.f["codes/indptr"].shape[0]) - 1

    @property
    def nnz(self) -> int:
        return int(self.f["codes/data"].shape[0])

    @property
    def n_segments(self) -> int:
        return int(self.f["segments/start"].shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.f.attrs["d_sae"])

    @property
    def k(self) -> int:
        return int(self.f.attrs["k"])

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes as plain Python values (str, int, float, lists), for provenance checks and reports."""
        out: dict[str, Any] = {}
        for key, v in self.f.attrs.items():
            if isinstance(v, bytes):
                v = v.decode("utf-8")
            elif isinstance(v, np.ndarray):
                v = [x.decode("utf-8") if isinstance(x, bytes) else x for x in v.tolist()]
            elif isinstance(v, np.generic):
                v = v.item()
            out[key] = v
        return out

    @property
    def concepts(self) -> list[ConceptEntry]:
        from protsae_cli.sae.config import ConceptEntry

        g = self.f["concepts"]
        cols = {name: g[name].asstr()[()] for name in ("concept_id", "name", "ontology_id")}
        out = [ConceptEntry(latent=int(lat), concept_id=cid, name=name, ontology_id=ont, threshold=float(thr))
               for lat, cid, name, ont, thr in zip(g["latent"][()], cols["concept_id"], cols["name"],
                                                   cols["ontology_id"], g["threshold"][()], strict=True)]
        for e, rel in zip(out, read_concept_reliability(g), strict=True):
            for key, value in rel.items():
                setattr(e, key, value)
        return out

    # -- one protein ----------------------------------------------------------------------------------------
    def _check(self, i: int) -> int:
        n = self.n_proteins
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"protein position {i} out of range (file has {n} proteins)")
        return i

    def row_range(self, i: int) -> tuple[int, int]:
        """Residue rows [start, stop) of the protein at position ``i``."""
        i = self._check(i)
        lo, hi = self.f["proteins/row_offset"][i:i + 2]
        return int(lo), int(hi)

    def protein(self, i: int) -> ProteinInfo:
        i = self._check(i)
        g = self.f["proteins"]
        lo, hi = self.row_range(i)
        return ProteinInfo(
            position=i, index=int(g["index"][i]), id=g["id"].asstr()[i], description=g["description"].asstr()[i],
            length=int(g["length"][i]), seq_md5=g["seq_md5"][i].decode("ascii"),
            status=self.status_names[int(g["status"][i])], status_detail=g["status_detail"].asstr()[i],
            row_start=lo, row_stop=hi,
        )

    def find(self, protein_id: str) -> list[int]:
        """Positions of every protein with this id (ids may repeat)."""
        return [int(p) for p in np.flatnonzero(self.proteins["id"] == protein_id)]

    def residues(self, i: int) -> str:
        """The encoded residues (all of them unless the protein was truncated)."""
        lo, hi = self.row_range(i)
        return self.f["residues/aa"][lo:hi].tobytes().decode("ascii")

    def _csr_slice(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(data float32, indices int64, indptr relative to the slice) for rows [lo, hi)."""
        indptr = self.f["codes/indptr"][lo:hi + 1].astype(np.int64)
        a, b = (int(indptr[0]), int(indptr[-1])) if indptr.size else (0, 0)
        data = self.f["codes/data"][a:b].astype(np.float32)
        indices = self.f["codes/indices"][a:b].astype(np.int64)
        return data, indices, indptr - a

    def codes(self, i: int) -> scipy.sparse.csr_matrix:
        """Codes of protein ``i`` as CSR [rows_i, d_sae] float32, where rows_i = encoded residues.

        rows_i (not the full length) because a truncated protein's tail was never encoded: zero rows there would
        read as "no concept active", which is not what happened.
        """
        import scipy.sparse

        lo, hi = self.row_range(i)
        data, indices, indptr = self._csr_slice(lo, hi)
        return scipy.sparse.csr_matrix((data, indices, indptr), shape=(hi - lo, self.d_sae))

    def codes_topk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Codes of protein ``i`` in the encoder's shape: (idx int64 [rows, k], val float32 [rows, k]).

        Slots are ordered by value descending, then latent ascending (the reference encoder's order), with
        ``-1``/``0`` padding, so a record read back compares directly with a freshly encoded one.
        """
        lo, hi = self.row_range(i)
        return _topk_from_csr(*self._csr_slice(lo, hi), self.k)

    def _segment_index(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Sorted protein_index of all segments, plus the sort order when the table is not already sorted."""
        if self._seg_index is None:
            pidx = self.f["segments/protein_index"][()]
            if pidx.size < 2 or bool(np.all(pidx[1:] >= pidx[:-1])):
                self._seg_index = (pidx, None)
            else:
                order = np.argsort(pidx, kind="stable")
                self._seg_index = (pidx[order], order)
        return self._seg_index

    def _segments_rows(self, rows: slice | np.ndarray) -> list[Segment]:
        g = self.f["segments"]
        cols = {name: g[name][rows] for name, _ in SEGMENT_COLUMNS}
        return [Segment(latent=int(lat), start=int(s), end=int(e), max_act=float(mx), mean_act=float(mn),
                        threshold=float(t))
                for lat, s, e, mx, mn, t in zip(cols["latent"], cols["start"], cols["end"], cols["max_act"],
                                                cols["mean_act"], cols["threshold"], strict=True)]

    def segments(self, i: int) -> list[Segment]:
        """Segments of protein ``i`` (matched on its input ordinal), in stored order: start, then latent."""
        i = self._check(i)
        target = int(self.f["proteins/index"][i])
        pidx, order = self._segment_index()
        a = int(np.searchsorted(pidx, target, "left"))
        b = int(np.searchsorted(pidx, target, "right"))
        if a == b:
            return []
        return self._segments_rows(slice(a, b) if order is None else np.sort(order[a:b]))

    def segment_table(self) -> dict[str, np.ndarray]:
        """The whole /segments table as columns (for reports and TSV/GFF3 export from an existing file)."""
        g = self.f["segments"]
        return {name: g[name][()] for name, _ in SEGMENT_COLUMNS}

    # -- whole file -----------------------------------------------------------------------------------------
    def iter_results(self, start: int = 0, stop: int | None = None, *, block_rows: int = 1 << 18,
                     block_proteins: int = 4096) -> Iterator[ProteinResult]:
        """Stream proteins ``[start, stop)`` as :class:`ProteinResult` records, reading in blocks.

        Each record carries the encoded residues as ``sequence`` and the file's ``length``/``seq_md5`` (which
        for a truncated protein describe the full sequence). Blocks bound memory by ``block_rows`` residue rows
        (a single longer protein is read on its own).
        """
        n = self.n_proteins
        stop = n if stop is None else min(stop, n)
        start = max(0, start)
        if start >= stop:
            return
        k = self.k
        g = self.f["proteins"]
        offsets_ds = g["row_offset"]
        pos = start
        while pos < stop:
            end = min(stop, pos + block_proteins)
            offs = offsets_ds[pos:end + 1].astype(np.int64)
            # Shrink the block to the proteins whose rows fit the budget (always at least one).
            fit = int(np.searchsorted(offs, offs[0] + block_rows, "right")) - 1
            end = pos + max(1, min(fit, end - pos))
            offs = offs[: end - pos + 1]
            lo, hi = int(offs[0]), int(offs[-1])
            index = g["index"][pos:end]
            ids = g["id"].asstr()[pos:end]
            descs = g["description"].asstr()[pos:end]
            lengths = g["length"][pos:end]
            md5s = g["seq_md5"][pos:end]
            statuses = g["status"][pos:end]
            details = g["status_detail"].asstr()[pos:end]
            aa = self.f["residues/aa"][lo:hi].tobytes().decode("ascii")
            idx, val = _topk_from_csr(*self._csr_slice(lo, hi), k)
            segs = self._block_segments(index)
            for j in range(end - pos):
                a, b = int(offs[j] - lo), int(offs[j + 1] - lo)
                yield ProteinResult(
                    index=int(index[j]), id=str(ids[j]), description=str(descs[j]), sequence=aa[a:b],
                    status=self.status_names[int(statuses[j])], status_detail=str(details[j]),
                    idx=idx[a:b], val=val[a:b], segments=segs[j], length=int(lengths[j]),
                    seq_md5=md5s[j].decode("ascii"),
                )
            pos = end

    def _block_segments(self, index: np.ndarray) -> list[list[Segment]]:
        """Segments of a block of proteins; one contiguous read in the usual (sorted) case."""
        pidx, order = self._segment_index()
        if order is None and index.size and bool(np.all(index[1:] > index[:-1])):
            a = int(np.searchsorted(pidx, index[0], "left"))
            b = int(np.searchsorted(pidx, index[-1], "right"))
            block = self._segments_rows(slice(a, b)) if b > a else []
            cuts = np.searchsorted(pidx[a:b], index, "left").tolist() + [b - a]
            return [block[cuts[j]:cuts[j + 1]] for j in range(index.size)]
        out: list[list[Segment]] = []
        for target in index.tolist():
            a = int(np.searchsorted(pidx, target, "left"))
            b = int(np.searchsorted(pidx, target, "right"))
            if a == b:
                out.append([])
            else:
                out.append(self._segments_rows(slice(a, b) if order is None else np.sort(order[a:b])))
        return out


def _topk_from_csr(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense [rows, k] top-k arrays from CSR rows, ordered (value desc, latent asc), padded with -1/0.

    Scatter first, then sort each short row: row-wise argsorts over k slots are far cheaper than one global
    sort over every entry of a block.
    """
    rows = indptr.size - 1 if indptr.size else 0
    counts = np.diff(indptr)
    width = max(k, int(counts.max()) if counts.size else 0)
    idx = np.full((rows, width), -1, dtype=np.int64)
    val = np.zeros((rows, width), dtype=np.float32)
    if data.size == 0:
        return idx, val
    row = np.repeat(np.arange(rows), counts)
    slot = np.arange(data.size) - np.repeat(indptr[:-1], counts)
    idx[row, slot] = indices
    val[row, slot] = data
    # Latent ascending first (files written by H5Writer already are; merged files need not be), then a
    # stable sort on value descending keeps the lower latent first among equal values; padding goes last.
    ascending = np.diff(indices) > 0
    inner = indptr[1:-1]
    inner = inner[(inner > 0) & (inner < data.size)]
    ascending[inner - 1] = True  # a row start may be lower than the previous row's last latent
    if not ascending.all():
        by_latent = np.argsort(np.where(idx >= 0, idx, np.iinfo(np.int64).max), axis=1, kind="stable")
        idx = np.take_along_axis(idx, by_latent, axis=1)
        val = np.take_along_axis(val, by_latent, axis=1)
    by_value = np.argsort(np.where(idx >= 0, -val, np.inf), axis=1, kind="stable")
    return np.take_along_axis(idx, by_value, axis=1), np.take_along_axis(val, by_value, axis=1)
