"""`annotate --resume`: checkpoint each finished chunk, so a crash or `kill -9` only costs the chunk in flight.

Layout, next to the outputs::

    PREFIX.parts/
        manifest.json        the settings the parts were made with (refused if the new run's differ)
        .lock                held (flock) by the run using the directory; released by the kernel on kill -9
        chunk_000000.h5      one HDF5 per finished chunk, renamed into place only when complete
        chunk_000000.h5.sha256   its SHA-256 (``sha256sum -c`` format), written after the part is in place
        chunk_000001.h5 ...

Why chunks: the annotate pipeline already cuts the input into chunks (`chunked_records`) whose boundaries
depend only on the record stream and the chunk limits, so a rerun over the same input recomputes the same
boundaries and can skip chunk *n* if its part exists. Batch composition (and hence the last bits of the
activations) depends on the chunk, so recomputing whole chunks with the same settings is also what makes the
resumed output equal an uninterrupted run's.

Each part stores ordinals, ids and sequence checksums, so a rerun checks that a skipped chunk really holds the
proteins it is skipping (a different FASTA under the same prefix is refused, not silently mixed in). A part is
only reused if its bytes still match the SHA-256 recorded when it was written: HDF5 opens happily with a flipped
byte in a data block, and the protein table check would not see it, so without the checksum a damaged disk or a
half-synced copy would be merged silently. A part that fails the check (or has no checksum because the run was
killed between the two renames) is recomputed with a warning naming it. At the end the parts are merged
(`protsae_cli.io.merge`) into the requested outputs, atomically, and the directory removed.

Temp files (``.NAME.tmp-PID-RANDOM``, see `protsae_cli.io.atomic.atomic_path`) that a killed run left next to
the outputs or in the parts directory are removed by the next run, but only those whose writer pid is no longer
running on this machine (`remove_stale_temps`): a temp of a live process is never touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Iterable, Sequence

from protsae_cli.errors import InputError
from protsae_cli.io.fasta import InputIdentity, InvalidRecord, ProteinRecord
from protsae_cli.io.results import seq_md5

if TYPE_CHECKING:
    from protsae_cli.annotate.options import AnnotateOptions, AnnotateSummary
    from protsae_cli.annotate.pipeline import Annotator

log = logging.getLogger("protsae.resume")

PARTS_FORMAT = "protsae-annotate-parts"
PARTS_VERSION = 2  # 2: every part has a .sha256 sidecar that is verified before reuse
MANIFEST = "manifest.json"
CHECKSUM_SUFFIX = ".sha256"
# The inverse of `protsae_cli.io.atomic.atomic_path` (``.<final>.tmp-<pid>-<hex>``), plus the manifest's
# ``.<final>.tmp-<pid>``; tests/annotate/test_faults_resume_workers.py checks that the two stay in step.
_TEMP_NAME = re.compile(r"^\.(?P<final>.+)\.tmp-(?P<pid>\d+)(?:-[0-9a-f]+)?$")
# Provenance keys that decide what a part contains (models, numerics, calling options).
_PROVENANCE_KEYS = ("protsae_version", "plm_model", "plm_sha256", "hook_point", "layer", "sae_sha256", "d_sae",
                    "k", "device_type", "backend", "compute_dtype", "long_policy", "max_window", "window_overlap",
                    "min_segment_len", "merge_gap", "dtype", "shard")
# Options that decide chunk boundaries and batch composition, hence which proteins a part holds and the exact
# numbers in it. Output formats, compression, threads and progress do not: they may change between attempts.
_OPTION_KEYS = ("toks_per_batch", "skip_invalid", "chunk_residues", "chunk_records")


def parts_dir(output_prefix: str) -> Path:
    return Path(f"{output_prefix}.parts")


# -- stale temp files ---------------------------------------------------------------------------------------
def temp_owner(path: str | os.PathLike[str]) -> tuple[str, int] | None:
    """(final name, writer pid) of a protsae temp file name, or None for any other name."""
    m = _TEMP_NAME.match(Path(path).name)
    return (m.group("final"), int(m.group("pid"))) if m else None


def pid_alive(pid: int) -> bool:
    """True unless ``pid`` certainly does not exist on this machine (no such process).

    Errs on the side of "alive": a pid of another user (EPERM), a zombie or a reused pid all count as alive,
    because keeping a stale temp costs some disk while deleting a live writer's temp would break its run.
    """
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, belongs to someone else
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike[str], finals: Iterable[str] | None = None) -> list[Path]:
    """Delete temps in ``directory`` whose writer is dead; only those of ``finals`` (file names) if given.

    A ``kill -9`` (or a crash in native code) leaves ``.NAME.tmp-PID-*`` behind; nothing else ever removes it.
    The pid in the name says who wrote it, so a later run can tell a leftover from a temp another run is still
    writing. Limitation: pids are per machine (and per pid namespace); two runs on different hosts writing one
    prefix on a shared filesystem cannot tell each other apart (and would clobber each other's outputs anyway).
    """
    wanted = set(finals) if finals is not None else None
    removed: list[Path] = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:  # missing or unreadable directory: nothing of ours there
        return removed
    for p in entries:
        owner = temp_owner(p)
        if owner is None or (wanted is not None and owner[0] not in wanted):
            continue
        if owner[1] == os.getpid() or pid_alive(owner[1]):
            continue
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("%s: cannot remove this stale temp file (%s)", p, e)
            continue
        log.info("removed %s, left by process %d, which is no longer running", p, owner[1])
        removed.append(p)
    return removed


def remove_stale_output_temps(output_prefix: str) -> list[Path]:
    """The temps of this prefix's outputs (any format, as an earlier run may have written other formats)."""
    from protsae_cli.io.writers import FORMATS, output_paths

    if output_prefix == "-":
        return []
    finals = [Path(p).name for p in output_paths(output_prefix, FORMATS).values()]
    return remove_stale_temps(Path(output_prefix).parent, finals)


# -- part checksums -----------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(provenance: dict[str, Any], opts: AnnotateOptions) -> dict[str, Any]:
    """What must be equal for parts of an earlier attempt to be reused (JSON-comparable values)."""
    fp: dict[str, Any] = {k: _jsonable(provenance.get(k, "")) for k in _PROVENANCE_KEYS}
    fp.update({k: _jsonable(getattr(opts, k)) for k in _OPTION_KEYS})
    return fp


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if hasattr(v, "item"):
        return v.item()
    return v


class PartStore:
    """The parts directory of one output prefix: manifest check, lock, part paths, verification, clean-up."""

    def __init__(self, output_prefix: str, fp: dict[str, Any], source: str) -> None:
        self.dir = parts_dir(output_prefix)
        self.fp = fp
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None
        self._lock()
        try:
            self._check_manifest(source)
            remove_stale_temps(self.dir)
        except BaseException:
            self.release()
            raise

    # -- directory-level ------------------------------------------------------------------------------------
    def _lock(self) -> None:
        """One run per parts directory: two resuming runs would race on the final merge and clean-up."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks; concurrent resumes are the user's responsibility
            return
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(f"{self.dir}: another protsae run is using this parts directory; wait for it or "
                             "choose another output prefix") from None
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check_manifest(self, source: str) -> None:
        path = self.dir / MANIFEST
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise InputError(f"{path}: unreadable ({e}); delete {self.dir} to start over") from e
            if old.get("format") != PARTS_FORMAT or old.get("version") != PARTS_VERSION:
                raise InputError(f"{path}: not a protsae parts manifest this version can resume; delete {self.dir} "
                                 "to start over")
            old_fp = old.get("fingerprint", {})
            diff = [f"{k}: {old_fp.get(k)!r} -> {self.fp.get(k)!r}" for k in sorted(set(old_fp) | set(self.fp))
                    if old_fp.get(k) != self.fp.get(k)]
            if diff:
                raise InputError(f"{self.dir} holds chunks made with other settings ({'; '.join(diff)}); rerun with "
                                 f"the original settings to resume, or delete {self.dir} to start over")
            return
        data = {"format": PARTS_FORMAT, "version": PARTS_VERSION, "fingerprint": self.fp, "input": source,
                "note": "checkpoint of 'protsae annotate --resume'; removed when the run completes"}
        from protsae_cli.io.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")

    def finish(self) -> None:
        """Delete the directory once the final outputs are in place (nothing left to resume)."""
        self.release()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- parts ----------------------------------------------------------------------------------------------
    def path(self, n: int) -> Path:
        return self.dir / f"chunk_{n:06d}.h5"

    def checksum_path(self, n: int) -> Path:
        return self.dir / f"chunk_{n:06d}.h5{CHECKSUM_SUFFIX}"

    def parts(self) -> list[Path]:
        """Parts that are complete: in place and with their checksum written."""
        done = [p for p in self.dir.glob("chunk_*.h5") if p.with_name(p.name + CHECKSUM_SUFFIX).exists()]
        return sorted(done, key=lambda q: int(q.stem.split("_")[1]))

    def seal(self, n: int) -> None:
        """Record part ``n``'s SHA-256 once it is in place; until then the part does not count as finished."""
        from protsae_cli.io.atomic import TextOutput

        out = TextOutput(self.checksum_path(n))
        try:
            out.write(f"{file_sha256(self.path(n))}  {self.path(n).name}\n")
        except BaseException:
            out.abort()
            raise
        out.close()

    def _discard(self, n: int, why: str) -> bool:
        log.warning("%s: %s; recomputing that chunk", self.path(n), why)
        for p in (self.path(n), self.checksum_path(n)):
            p.unlink(missing_ok=True)
        return False

    def _verified(self, n: int) -> bool:
        """True if part ``n``'s bytes match the checksum written with it; otherwise it is deleted (warning)."""
        p, c = self.path(n), self.checksum_path(n)
        try:
            recorded = c.read_text().split()
        except FileNotFoundError:
            return self._discard(n, "no checksum (the earlier run was stopped while saving this part)")
        except (OSError, UnicodeDecodeError) as e:
            return self._discard(n, f"unreadable checksum file {c} ({e})")
        try:
            actual = file_sha256(p)
        except OSError as e:
            return self._discard(n, f"unreadable part ({e})")
        if not recorded or recorded[0].lower() != actual:
            want = recorded[0] if recorded else "nothing"
            return self._discard(n, f"damaged part: SHA-256 is {actual}, {c.name} recorded {want}")
        return True

    def reusable(self, n: int, chunk: Sequence[ProteinRecord | InvalidRecord]) -> bool:
        """True if part ``n`` exists intact and holds exactly these proteins; a damaged part is deleted and redone.

        A part that passes its checksum but holds other proteins means the input changed under the same prefix:
        that is refused, because silently recomputing would hide that the earlier parts may be from another
        input too.
        """
        from protsae_cli.io.writers.h5 import H5Annotations

        p = self.path(n)
        if not p.exists():
            self.checksum_path(n).unlink(missing_ok=True)  # a sidecar without its part is meaningless
            return False
        if not self._verified(n):
            return False
        try:
            with H5Annotations(p) as h5:
                index = [int(x) for x in h5.proteins["index"]]
                ids = [str(x) for x in h5.proteins["id"]]
                md5s = [str(x) for x in h5.proteins["seq_md5"]]
        except Exception as e:  # intact bytes but unreadable: written by something else; cheap to redo
            return self._discard(n, f"unreadable part ({e})")
        want_index = [r.index for r in chunk]
        want_ids = [r.id for r in chunk]
        want_md5 = [seq_md5(r.sequence) if isinstance(r, ProteinRecord) else "" for r in chunk]
        if index != want_index or ids != want_ids or md5s != want_md5:
            # strict=False: part and input may hold different numbers of records; past the shorter one the
            # default names the first record that only one of them has.
            pairs = zip(index, want_index, ids, want_ids, md5s, want_md5, strict=False)
            j = next((i for i, (a, b, c, d, e, f) in enumerate(pairs) if a != b or c != d or e != f),
                     min(len(index), len(want_index)))
            have = f"record {index[j] + 1} {ids[j]!r}" if j < len(index) else "no record"
            want = f"record {want_index[j] + 1} {want_ids[j]!r}" if j < len(want_index) else "no record"
            raise InputError(f"{p} does not match the input ({have} saved, {want} in the input, or its sequence "
                             f"changed): the input is not the one the parts were made from; delete {self.dir} to "
                             "start over")
        return True


def run_resumable(ann: Annotator, opts: AnnotateOptions) -> AnnotateSummary:
    """The body of `Annotator.run` under `--resume` (see the module docstring)."""
    from protsae_cli.annotate.options import AnnotateSummary, count_records, progress_bar, tally
    from protsae_cli.io.writers import output_paths
    from protsae_cli.plm.batching import chunked_records
    from protsae_cli.io.fasta import read_fasta
    from protsae_cli.io.merge import canonical_result, merge_h5
    from protsae_cli.io.writers.h5 import H5Writer

    if opts.output_prefix == "-":
        raise InputError("--resume needs an output prefix to keep its checkpoints next to; it cannot resume "
                         "output written to stdout (-o -)")
    paths = output_paths(opts.output_prefix, opts.formats)
    for p in paths.values():
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    prov = ann.provenance(opts)
    cfg = ann.sae.cfg
    remove_stale_output_temps(opts.output_prefix)
    store = PartStore(opts.output_prefix, fingerprint(prov, opts), opts.input)
    summary = AnnotateSummary(backend=ann.encoder.name, device=str(ann.device))
    t0 = time.perf_counter()
    reused = computed = 0
    try:
        identity = InputIdentity()
        records = identity.track(read_fasta(opts.input, skip_invalid=opts.skip_invalid))
        if opts.shard:  # after tracking: the identity is the whole input's
            i, n = opts.shard
            records = (r for r in records if r.index % n == i - 1)
        chunks = chunked_records(records, opts.chunk_residues, opts.chunk_records,
                                 length=lambda r: len(r.sequence) if isinstance(r, ProteinRecord) else 0)
        n_chunks = 0
        with progress_bar(opts.progress, count_records(opts.input)) as bar:
            for n, chunk in enumerate(chunks):
                n_chunks = n + 1
                if store.reusable(n, chunk):
                    reused += 1
                else:
                    # Parts are temporary and only read back by protsae, so lzf: much faster than gzip.
                    with H5Writer(store.path(n), prov, ann.concepts, cfg.d_sae, ann.code_width, dtype=opts.h5_dtype,
                                  compression="lzf") as w:
                        for res in ann.iter_results(chunk, opts):
                            w.write(canonical_result(res))
                    store.seal(n)
                    computed += 1
                for r in chunk:
                    bar.advance(1, residues=len(r.sequence) if isinstance(r, ProteinRecord) else 0)
        if reused:
            log.info("resumed: reused %d finished chunks from %s, computed %d", reused, store.dir, computed)
        # Parts see one chunk each; the final outputs record the whole input's identity, known only now.
        prov = {**prov, **identity.attrs()}
        # Only this input's chunks: a part numbered beyond them is left over from a longer input.
        merge_h5([store.path(n) for n in range(n_chunks)], opts.output_prefix, opts.formats, provenance=prov,
                 compression=opts.compression, on_result=lambda res: tally(summary, res))
    except BaseException:
        done = len(store.parts())
        if done:
            log.warning("%d finished chunks are kept in %s; rerun the same command with --resume to continue",
                        done, store.dir)
        store.release()
        raise
    store.finish()
    summary.seconds = time.perf_counter() - t0
    summary.outputs = list(paths.values())
    return summary
