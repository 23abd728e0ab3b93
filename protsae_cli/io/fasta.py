"""Streaming, validating protein FASTA reader.

The reader sits in front of a model that silently maps anything it does not know to ``<unk>``, so a gap, a
digit or a stray ``*`` would produce plausible-looking but wrong activations. Every record is therefore
checked against the ESM-2 alphabet here, and each failure names the protein, its record number and the
1-based residue position (and, when raised, the file, line and column) so the user can fix the input.

Records are yielded one at a time: memory is bounded by the largest single record, never by the number of
records, so proteome-scale inputs and pipes (``-``) work. Biopython's ``SimpleFastaParser`` does the
record grouping; a thin line filter in front of it adds what it does not do (it silently skips text before
the first ``>``, drops internal spaces and cannot say on which line anything happened).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import gzip
import hashlib
import io
import os
import re
import stat
import sys
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import IO, TextIO, Union, cast
from collections.abc import Iterator

from protsae_cli.errors import InputError

__all__ = [
    "ESM_ALPHABET",
    "InputIdentity",
    "InvalidRecord",
    "ProteinRecord",
    "Source",
    "describe_source",
    "open_text",
    "read_fasta",
]

# ESM-2's residue tokens: the 20 standard amino acids plus X (unknown), B (D/N), U (Sec), Z (E/Q), O (Pyl).
ESM_ALPHABET = "ACDEFGHIKLMNPQRSTVWYXBUZO"

Source = Union[str, "os.PathLike[str]", IO[str], IO[bytes]]

_INVALID_RESIDUE = re.compile("[^" + ESM_ALPHABET + ESM_ALPHABET.lower() + "]")
_WHITESPACE = re.compile(r"\s")
# NUL never occurs in text; lone surrogates are how ``surrogateescape`` hands us bytes that are not UTF-8.
_NOT_TEXT = re.compile("[\x00\udc80-\udcff]")
# Whitespace inside a sequence line is replaced by this before Biopython sees the line, because Biopython
# deletes spaces (which would hide the error and shift every later position). A tab is itself whitespace,
# so the validator reports it as such, at the right position.
_WS_MARK = "\t"

_COMPRESSED_MAGIC = (
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"PK\x03\x04", "zip"),
)
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class ProteinRecord:
    """A validated protein; ``index`` (not ``id``, which may repeat) is its identity everywhere downstream."""

    index: int
    id: str
    description: str
    sequence: str


@dataclass(frozen=True)
class InvalidRecord:
    """A record that failed validation, kept so outputs can report it instead of silently dropping it."""

    index: int
    id: str
    description: str
    error: str


#: Provenance entries that identify the whole input (`InputIdentity`); every writer records them when it closes.
INPUT_IDENTITY_KEYS: tuple[str, ...] = ("input_records", "input_sha256")


class InputIdentity:
    """Record count and digest of a whole input, computed while it is read (never by a second pass).

    ``protsae merge`` must know that its shards were cut from the same FASTA: shards of different inputs have
    disjoint-looking ordinals and would merge into a file that looks complete and means nothing. Every shard
    reads the whole input (it filters by ordinal after parsing), so each can record the same identity: the
    number of records and the SHA-256 of one line ``ordinal<TAB>id<TAB>md5(sequence)`` per record, invalid
    records included (their md5 is empty). Descriptions and line wrapping do not count, so re-wrapping a FASTA
    does not change its identity but editing, adding, dropping or reordering a protein does.
    """

    def __init__(self) -> None:
        self.records = 0
        self._sha = hashlib.sha256()
        self.complete = False

    def add(self, record: ProteinRecord | InvalidRecord) -> None:
        md5 = hashlib.md5(record.sequence.encode("ascii")).hexdigest() if isinstance(record, ProteinRecord) else ""
        self.add_fields(record.index, record.id, md5)

    def add_fields(self, index: int, protein_id: str, md5: str) -> None:
        """One record by its stored fields (a merge rebuilding the identity of renumbered pieces)."""
        self._sha.update(f"{index}\t{protein_id}\t{md5}\n".encode("utf-8", "surrogateescape"))
        self.records += 1

    def track(self, records: Iterator[ProteinRecord | InvalidRecord]) -> Iterator[ProteinRecord | InvalidRecord]:
        """Pass records through, adding each; ``complete`` once the input was read to its end."""
        for record in records:
            self.add(record)
            yield record
        self.complete = True

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def attrs(self) -> dict[str, int | str]:
        """The provenance entries every output records (see ``writers.INPUT_IDENTITY_KEYS``)."""
        if not self.complete:
            raise RuntimeError("the input identity is only known once the whole input was read")
        return {"input_records": self.records, "input_sha256": self.sha256}


def _is_stdin(source: object) -> bool:
    # Typer may hand us Path("-"), so compare the file-system spelling, not the type.
    return isinstance(source, (str, os.PathLike)) and os.fspath(source) == "-"


def describe_source(source: Source) -> str:
    """The name error messages use for ``source``, so every message points at something the user typed."""
    if _is_stdin(source):
        return "<stdin>"
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else "<stream>"


def _peek(binary: IO[bytes], n: int, stack: contextlib.ExitStack) -> tuple[IO[bytes], bytes]:
    """Look at the first bytes without consuming them, so pipes can be sniffed for gzip too."""
    if hasattr(binary, "peek"):
        return binary, binary.peek(n)[:n]
    if binary.seekable():
        where = binary.tell()
        head = binary.read(n)
        binary.seek(where)
        return binary, head
    reader = io.BufferedReader(binary)  # type: ignore[type-var]  # any readable binary stream works; typeshed asks for a RawIOBase
    stack.callback(reader.detach)  # so that collecting the reader never closes a stream we do not own
    return reader, reader.peek(n)[:n]


def _decompressing(binary: IO[bytes], name: str, stack: contextlib.ExitStack) -> IO[bytes]:
    """Undo gzip when the magic bytes say so: suffixes lie (``.gz`` files that are plain, and vice versa)."""
    binary, head = _peek(binary, 6, stack)
    if head.startswith(_GZIP_MAGIC):
        return cast(IO[bytes], stack.enter_context(gzip.GzipFile(fileobj=binary, mode="rb")))
    for magic, kind in _COMPRESSED_MAGIC:
        if head.startswith(magic):
            raise InputError(
                f"{name}, line 1: the input is {kind}-compressed; protsae reads plain or gzip-compressed FASTA "
                f"(decompress it first, or recompress with gzip)"
            )
    return binary


@contextlib.contextmanager
def open_text(source: Source, errors: str = "strict") -> Iterator[TextIO]:
    """Open ``source`` as UTF-8 text with universal newlines, decompressing gzip when the content is gzip.

    ``source`` is a path, ``"-"`` for standard input, or an open stream (a text stream is used as is; a binary
    one is sniffed for gzip). Streams we did not open are never closed, so ``-`` leaves ``sys.stdin`` usable.
    ``errors`` is the codec error handler: ``read_fasta`` passes ``"surrogateescape"`` so that it, not the
    codec, reports undecodable bytes, with an exact line and column.
    """
    name = describe_source(source)
    with contextlib.ExitStack() as stack:
        binary: IO[bytes]
        if _is_stdin(source):
            buffer = getattr(sys.stdin, "buffer", None)
            if buffer is None:  # already a text stream (e.g. replaced in tests or by an embedding program)
                yield sys.stdin
                return
            binary = buffer
        elif isinstance(source, (str, os.PathLike)):
            try:
                binary = stack.enter_context(open(source, "rb"))
            except OSError as exc:
                raise InputError(f"cannot open {name}: {_os_reason(exc)}") from None
        elif isinstance(source, (io.RawIOBase, io.BufferedIOBase)) or "b" in str(getattr(source, "mode", "")):
            binary = source  # type: ignore[assignment]
        else:
            yield source  # type: ignore[misc]
            return
        binary = _decompressing(binary, name, stack)
        text = io.TextIOWrapper(binary, encoding="utf-8", errors=errors, newline=None)
        try:
            yield text
        finally:
            # Detach so that closing (or collecting) the wrapper never closes a stream we do not own;
            # the ExitStack closes the ones we do.
            with contextlib.suppress(ValueError):
                text.detach()


@dataclass
class _Layout:
    """Where one record's residues came from, to turn a residue position into a line and column."""

    header_line: int
    line_numbers: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # residue offset at which each sequence line starts
    length: int = 0

    def add(self, line_number: int, n_chars: int) -> None:
        self.line_numbers.append(line_number)
        self.offsets.append(self.length)
        self.length += n_chars

    def locate(self, position: int) -> tuple[int, int]:
        """(line, 1-based column) of the 0-based residue ``position``."""
        i = bisect.bisect_right(self.offsets, position) - 1
        if i < 0:
            return self.header_line, 1
        return self.line_numbers[i], position - self.offsets[i] + 1


class _CheckedLines:
    """The line stream Biopython parses: checks text-level problems and remembers line numbers.

    Biopython yields a record only after reading the next header, so at most two layouts are pending.
    """

    def __init__(self, stream: TextIO, name: str) -> None:
        self._stream = stream
        self._name = name
        self.line_number = 0
        self.layouts: deque[_Layout] = deque()

    def _fail(self, line_number: int, message: str) -> InputError:
        return InputError(f"{self._name}, line {line_number}: {message}")

    def __iter__(self) -> Iterator[str]:
        lines = iter(self._stream)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                raise self._fail(self.line_number + 1, f"not valid UTF-8 text ({exc.reason})") from None
            except (OSError, EOFError, zlib.error) as exc:  # truncated or corrupt gzip, I/O errors
                raise self._fail(self.line_number + 1, f"cannot read the input: {exc}") from None
            self.line_number += 1
            line = raw.rstrip()  # \n, \r\n and trailing blanks are line wrapping, not content
            if self.line_number == 1 and line.startswith("\ufeff"):
                line = line[1:]  # UTF-8 byte-order mark written by some Windows editors
            bad = _NOT_TEXT.search(line)
            if bad is not None:
                col = bad.start() + 1
                if not self.layouts and not line.startswith(">"):
                    raise self._fail(
                        self.line_number,
                        f"binary or non-UTF-8 data at column {col} before any FASTA header; "
                        f"the input does not look like FASTA",
                    )
                if bad.group() == "\x00":
                    raise self._fail(self.line_number, f"NUL byte at column {col}: this is a binary file, not FASTA")
                byte = ord(bad.group()) - 0xDC00
                raise self._fail(
                    self.line_number,
                    f"byte 0x{byte:02x} at column {col} is not valid UTF-8; FASTA input must be UTF-8 "
                    f"(convert it, e.g. with iconv -f latin1 -t utf-8)",
                )
            if line.startswith(">"):
                self.layouts.append(_Layout(self.line_number))
                yield line + "\n"
                continue
            if not line:
                continue  # blank lines are harmless anywhere
            if not self.layouts:
                raise self._fail(
                    self.line_number,
                    f"expected a FASTA header starting with '>' but found {line[:40]!r}; "
                    f"the input does not look like FASTA",
                )
            if _WHITESPACE.search(line):
                line = _WHITESPACE.sub(_WS_MARK, line)
            self.layouts[-1].add(self.line_number, len(line))
            yield line + "\n"


def _check_sequence(raw: str) -> tuple[str, str | None, int | None]:
    """Clean a raw sequence: (sequence, error, 0-based position of the error or None)."""
    if raw.endswith("*"):
        raw = raw[:-1]  # one terminal stop codon symbol, as translated CDS files carry
    if not raw:
        return "", "empty sequence", None
    bad = _INVALID_RESIDUE.search(raw)
    if bad is not None:
        pos = bad.start()
        char = bad.group()
        if char == _WS_MARK:
            message = f"whitespace inside a sequence line at position {pos + 1} (only line breaks may split a sequence)"
            return "", message, pos
        return "", f"invalid character {char!r} at position {pos + 1}", pos
    # Validated as ASCII letters first: str.upper() on arbitrary text can change the length ('ß' -> 'SS').
    return raw.upper(), None, None


def read_fasta(source: Source, skip_invalid: bool = False) -> Iterator[ProteinRecord | InvalidRecord]:
    """Stream validated proteins from a FASTA path, ``.gz`` path, ``-`` (stdin) or open stream.

    Per-protein problems raise ``InputError`` (file, line, column, protein id, record number, position),
    unless ``skip_invalid``, in which case an ``InvalidRecord`` takes the protein's place in the stream so that
    indices stay aligned with the input. Problems with the file itself (not FASTA, empty, binary, not UTF-8,
    unreadable) always raise. A missing path raises here, before iteration starts, so a run fails before it
    loads a model.
    """
    if isinstance(source, (str, os.PathLike)) and not _is_stdin(source):
        name = describe_source(source)
        try:
            mode = os.stat(source).st_mode
        except OSError as exc:
            raise InputError(f"cannot open {name}: {_os_reason(exc)}") from None
        if stat.S_ISDIR(mode):
            raise InputError(f"cannot open {name}: it is a directory, not a FASTA file")
    return _iter_fasta(source, skip_invalid)


def _os_reason(exc: OSError) -> str:
    """The cause in words a user acts on; ELOOP in particular is not "no such file"."""
    if exc.errno == errno.ELOOP:
        return "symlink loop (the path resolves to itself)"
    if exc.errno == errno.ENOENT:
        return "no such file"
    if exc.errno == errno.EACCES:
        return "permission denied"
    return exc.strerror or str(exc)


def _iter_fasta(source: Source, skip_invalid: bool) -> Iterator[ProteinRecord | InvalidRecord]:
    from Bio.SeqIO.FastaIO import SimpleFastaParser  # here: the CLI imports this module for its option defaults

    name = describe_source(source)
    with open_text(source, errors="surrogateescape") as stream:
        lines = _CheckedLines(stream, name)
        index = -1
        for index, (title, raw_sequence) in enumerate(SimpleFastaParser(lines)):
            layout = lines.layouts.popleft()
            parts = title.split(None, 1)
            protein_id = parts[0] if parts else ""
            description = parts[1] if len(parts) > 1 else ""
            prefix = f"protein {protein_id!r} (record {index + 1})"
            where = f"line {layout.header_line}"
            error: str | None
            if not protein_id:
                error = "header has no id ('>' must be followed by an identifier)"
            else:
                sequence, error, pos = _check_sequence(raw_sequence)
                if error is None:
                    yield ProteinRecord(index, protein_id, description, sequence)
                    continue
                if pos is not None:
                    line, column = layout.locate(pos)
                    where = f"line {line}, column {column}"
            message = f"{prefix}: {error}"
            if not skip_invalid:
                raise InputError(f"{name}, {where}: {message}")
            yield InvalidRecord(index, protein_id, description, message)
        if index < 0:
            if lines.line_number == 0:
                raise InputError(f"{name}, line 1: the input is empty; expected a FASTA header starting with '>'")
            raise InputError(f"{name}, line {lines.line_number}: no FASTA header ('>') found before the end of input")
