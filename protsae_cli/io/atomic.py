"""Write-to-temp-then-rename, so a failed or interrupted run never leaves a file that looks complete.

Pipelines (Nextflow, Snakemake, make) treat "the output exists" as "the step succeeded". Every protsae output
is therefore written under a hidden temporary name in the destination directory (same filesystem, so the final
``os.replace`` is atomic) and renamed only after it was closed successfully. Temporary names start with ``.``
and contain ``.tmp-`` so that even a temp left behind by ``kill -9`` is recognisably not an output.

Temps still open at interpreter exit (an uncaught ``SystemExit``/``KeyboardInterrupt`` that skipped a
writer's ``abort``) are removed by an ``atexit`` hook. SIGTERM terminates Python without running it unless the
CLI turns the signal into ``SystemExit``, which is the CLI's job, not this module's.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import gzip
import io
import os
import secrets
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, TypeVar, cast

if TYPE_CHECKING:
    from protsae_cli.io.results import ProteinResult

_live_temps: set[Path] = set()
_W = TypeVar("_W", bound="OutputWriter")


def remove_open_temps() -> None:
    """Remove the temps of writers still open: for exits that skip `atexit` (the CLI's os._exit path)."""
    _cleanup_live_temps()


def _cleanup_live_temps() -> None:
    for p in list(_live_temps):
        try:
            p.unlink()
        except OSError:
            pass
        _live_temps.discard(p)


atexit.register(_cleanup_live_temps)


_defer_depth = 0
_deferred: BaseException | None = None


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold the CLI's signal exceptions (Ctrl-C, SIGTERM) until the block ends, then raise the first.

    HDF5 writes through a Python file object (see ``writers.h5``), so a signal handler's exception could be
    raised while HDF5 is in the middle of a write, which leaves HDF5 unable to close the file (a crash at
    exit). Blocks are cheap (a counter) and nest; outside them signals act at once, as usual.
    """
    global _defer_depth, _deferred
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
        if _defer_depth == 0 and _deferred is not None:
            exc, _deferred = _deferred, None
            raise exc


def raise_or_defer(exc: BaseException) -> None:
    """For signal handlers: raise ``exc`` now, or when the current ``signals_deferred`` block ends."""
    global _deferred
    if _defer_depth:
        if _deferred is None:
            _deferred = exc
        return
    raise exc


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (changing it races other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike[str]) -> None:
    """Give a file written by a library that creates it private (safetensors: 0600) the mode the user's
    umask asks for, like any file protsae writes itself: shared model directories must be readable by the
    group when the umask says so."""
    os.chmod(path, 0o666 & ~current_umask())


def atomic_path(final: str | os.PathLike[str]) -> Path:
    """A fresh temporary name next to ``final``: ``.<name>.tmp-<pid>-<random>``.

    Same directory because ``os.replace`` is only atomic within one filesystem; pid and randomness so that
    concurrent runs (shards writing into one directory, a retry racing a zombie) never share a temp.
    """
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_path(path: Path) -> None:
    """Flush file contents, then the directory entry, so a rename after a crash never exposes a hole."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms/filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def named_os_error(e: OSError, path: str | os.PathLike[str]) -> OSError:
    """The same error (same type, errno and reason) naming ``path``, the output the user asked for.

    Buffered writers report ENOSPC/EIO without a file name, and the name they would give is the hidden temp;
    a message must name the output the user knows.
    """
    if e.errno is None:
        return e
    return type(e)(e.errno, e.strerror or str(e), str(path))


class AtomicFile:
    """Owns one temporary path and either renames it to the final name or deletes it.

    Used directly by the HDF5 writer (h5py opens the temp path itself) and through :func:`open_text_output`
    by the text writers. As a context manager it commits on normal exit and discards on any exception,
    including ``KeyboardInterrupt``.
    """

    def __init__(self, final: str | os.PathLike[str], fsync: bool = True):
        self.final = Path(final)
        self.tmp = atomic_path(self.final)
        self.fsync = fsync
        self.done = False
        _live_temps.add(self.tmp)

    def commit(self) -> Path:
        """Rename the (already closed) temp into place; the final file appears complete or not at all."""
        if self.done:
            raise RuntimeError(f"{self.final}: already committed or discarded")
        try:
            if self.fsync:
                _fsync_path(self.tmp)
            os.replace(self.tmp, self.final)
        except BaseException:
            self.discard()
            raise
        self.done = True
        _live_temps.discard(self.tmp)
        if self.fsync:
            _fsync_dir(self.final.parent)
        return self.final

    def discard(self) -> None:
        """Delete the temp if it exists; safe to call more than once and after a failed commit."""
        self.done = True
        _live_temps.discard(self.tmp)
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = True) -> Path:
    """Write a whole small text file (JSON, Markdown, a config) atomically: the parent is created, the text goes
    to a fresh temp beside it, and the rename makes it appear complete or not at all (a crash, Ctrl-C or full
    disk leaves the old file, or none, and no temp). OSError is raised naming ``path``."""
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with AtomicFile(final, fsync=fsync) as af:
            with open(af.tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write(text)
    except OSError as e:
        raise named_os_error(e, final) from e
    return final


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """The temp path a library should write ``path`` to (safetensors ``save_file``, ``torch.save``,
    ``shutil.copyfile``); renamed into place, with the user's umask, when the block ends normally and removed
    when it raises. For files protsae writes with ``open`` itself, `atomic_write_text` or `TextOutput`."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(final, fsync=fsync) as af:
        yield af.tmp
        follow_umask(af.tmp)  # libraries such as safetensors create their files 0600


class TextOutput:
    """A UTF-8, LF-terminated text sink: stdout for ``-``, gzip for ``.gz``, atomic for files.

    Text writers share this so stdout, compression and atomicity behave identically for TSV and GFF3.
    Writing to stdout cannot be undone, so ``abort`` there only flushes what was already written.
    """

    def __init__(self, path: str | os.PathLike[str], fsync: bool = True):
        self.is_stdout = str(path) == "-"
        self.atomic: AtomicFile | None = None
        self.name = "<stdout>" if self.is_stdout else str(path)
        self._raw: IO[bytes] | None = None
        self._file: IO[bytes] | None = None  # the underlying file when _raw is a GzipFile wrapping it
        if self.is_stdout:
            # Look stdout up now (not at import) so redirections installed by the caller are honoured.
            self.stream: IO[str] = sys.stdout
            return
        self.atomic = AtomicFile(path, fsync=fsync)
        raw = open(self.atomic.tmp, "xb")
        try:
            if self.atomic.final.name.endswith(".gz"):
                # mtime=0 keeps the gzip header reproducible between identical runs.
                gz = gzip.GzipFile(filename=self.atomic.final.name[:-3], mode="wb", fileobj=raw, mtime=0)
                self._raw = cast(IO[bytes], gz)  # a binary stream; typeshed does not declare GzipFile an IO[bytes]
                self._file = raw
            else:
                self._raw = raw
            self.stream = io.TextIOWrapper(self._raw, encoding="utf-8", newline="\n", write_through=False)
        except BaseException:
            raw.close()
            self.atomic.discard()
            raise

    def write(self, text: str) -> None:
        if self.is_stdout:
            self.stream.write(text)
            return
        try:
            self.stream.write(text)
        except OSError as e:
            raise named_os_error(e, self.name) from e

    def close(self) -> None:
        """Finish the stream and publish it; on any failure the temp is removed and the error propagates."""
        if self.is_stdout:
            self.stream.flush()
            return
        assert self.atomic is not None
        if self.atomic.done:
            return
        try:
            self.stream.close()  # also closes the GzipFile, which writes the trailer
            if self._file is not None:
                self._file.close()
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise named_os_error(e, self.name) from e
            raise
        try:
            self.atomic.commit()
        except OSError as e:
            raise named_os_error(e, self.name) from e

    def abort(self) -> None:
        if self.is_stdout:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                pass
            return
        assert self.atomic is not None
        if self.atomic.done:
            return
        for f in (self.stream, self._file):
            try:
                if f is not None:
                    f.close()
            except (OSError, ValueError):
                pass
        self.atomic.discard()


class OutputWriter(abc.ABC):
    """Lifecycle shared by the HDF5, TSV and GFF3 writers: write records, then ``close`` or ``abort``.

    As a context manager a writer closes (publishes) on normal exit and aborts (leaves nothing) on any
    exception, so ``with H5Writer(...) as w:`` is all a caller needs for atomic outputs. Subclasses implement
    ``_write``, ``_close`` and ``_abort``; this class enforces that nothing is written after the end and that
    a failure while closing still cleans up.

    The input's identity (``writers.INPUT_IDENTITY_KEYS``: record count and digest, see
    ``fasta.InputIdentity``) is only known once the whole input was read, so writers keep it apart from the
    provenance they write up front and record it when they close: HDF5 root attributes, a ``#key value``
    trailer in GFF3 (the TSV has none: a trailer would be a junk row to pandas and awk). A caller that knows it (annotate after the last record, merge from its inputs)
    calls ``set_input_identity`` before ``close``; identity entries found in the provenance are taken as its
    default, so a merge regenerating text from HDF5 writes them where a direct run does.
    """

    def __init__(self) -> None:
        self._state = "open"  # open -> closed | aborted
        self.input_identity: dict[str, int | str] = {}

    def set_input_identity(self, identity: Mapping[str, int | str]) -> None:
        """Record the whole input's identity (written at ``close``); call before closing."""
        from protsae_cli.io.fasta import INPUT_IDENTITY_KEYS

        self.input_identity = {k: identity[k] for k in INPUT_IDENTITY_KEYS if k in identity}

    @property
    def closed(self) -> bool:
        return self._state != "open"

    def write(self, result: ProteinResult) -> None:
        """Append one protein; proteins are expected in input order (the outputs keep the order given)."""
        if self._state != "open":
            raise ValueError(f"{type(self).__name__}: write after {self._state}")
        try:
            self._write(result)
        except BaseException:
            # A half-written protein would leave the buffers inconsistent; the output cannot be trusted.
            self.abort()
            raise

    # The architecture table names the method write_protein; both spellings are supported.
    write_protein = write

    def close(self) -> None:
        """Finalise and atomically publish the output. Idempotent; a no-op after ``abort``."""
        if self._state != "open":
            return
        try:
            self._close()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"

    def abort(self) -> None:
        """Discard the output (temp removed, final path untouched). A no-op once closed or aborted."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._abort()

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @abc.abstractmethod
    def _write(self, result: ProteinResult) -> None:
        """Append one validated protein to the output."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Flush everything and publish the output."""

    @abc.abstractmethod
    def _abort(self) -> None:
        """Release resources and remove the temporary output; must tolerate a half-finished ``_close``."""


def check_output_dir(output: str) -> None:
    """Fail in seconds on an -o that cannot become a directory, without creating it.

    The directory itself is created only when its first file is complete (the training state or the SAE), so a
    run that fails early (bad input, a batch that does not fit, Ctrl-C while collecting) leaves no empty
    output directory behind.
    """
    from protsae_cli.errors import OutputError

    p = Path(output)
    if p.exists() and not p.is_dir():
        raise OutputError(f"-o {output}: exists and is not a directory")
    parent = p if p.exists() else next((a for a in p.absolute().parents if a.exists()), Path("/"))
    if not parent.is_dir():
        raise OutputError(f"-o {output}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"-o {output}: cannot write in {parent}")
