"""Output writers: HDF5 (sparse CSR codes + segments + provenance), TSV (segments) and GFF3, all atomic.

Kept free of torch so that `protsae merge` and `report` start fast on CPU-only nodes.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from protsae_cli.io.fasta import INPUT_IDENTITY_KEYS  # noqa: F401 (writers record it when they close)

# Written when --formats is not given; jsonl (one JSON object per protein) on request.
DEFAULT_FORMATS: tuple[str, ...] = ("h5", "tsv", "gff3")
FORMATS: tuple[str, ...] = (*DEFAULT_FORMATS, "jsonl")


def split_identity(provenance: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(provenance without the input identity, the identity entries): the writers record the two apart."""
    rest = {k: v for k, v in provenance.items() if k not in INPUT_IDENTITY_KEYS}
    return rest, {k: provenance[k] for k in INPUT_IDENTITY_KEYS if k in provenance}


def identity_trailer(identity: Mapping[str, Any]) -> str:
    """The last lines of a GFF3: ``#input_records N`` and ``#input_sha256 HEX`` (comments to every reader)."""
    return "".join(f"#{k} {identity[k]}\n" for k in INPUT_IDENTITY_KEYS if k in identity)


def read_identity_trailer(lines: Iterable[str]) -> dict[str, str]:
    """The identity entries among a GFF3's comment lines (the inverse of ``identity_trailer``)."""
    out = {}
    for line in lines:
        key, _, value = line[1:].rstrip("\n").partition(" ")
        if line.startswith("#") and key in INPUT_IDENTITY_KEYS:
            out[key] = value.strip()
    return out


def open_writers(paths: Mapping[str, str], provenance: Mapping[str, Any], concepts: Any, d_sae: int, k: int, *,
                 dtype: str = "float32", compression: str | None = "gzip") -> list[Any]:
    """One writer per output path (``output_paths``), in format order; all or none are open on return.

    The one place that knows which class writes which format, so annotate, resume and merge cannot drift.
    """
    from protsae_cli.io.writers.gff3 import GFF3Writer
    from protsae_cli.io.writers.h5 import H5Writer
    from protsae_cli.io.writers.jsonl import JSONLWriter
    from protsae_cli.io.writers.tsv import TSVWriter

    writers: list[Any] = []
    try:
        for fmt in FORMATS:
            if fmt not in paths:
                continue
            if fmt == "h5":
                writers.append(H5Writer(paths[fmt], provenance, concepts, d_sae, k, dtype=dtype,
                                        compression=compression))
            else:
                cls = {"tsv": TSVWriter, "gff3": GFF3Writer, "jsonl": JSONLWriter}[fmt]
                writers.append(cls(paths[fmt], provenance, concepts, d_sae, k))
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return writers


def output_paths(prefix: str, formats: Iterable[str]) -> dict[str, str]:
    """`-o out/run` -> out/run.h5, out/run.tsv, out/run.gff3, out/run.jsonl (a `-` prefix sends TSV to stdout)."""
    from protsae_cli.errors import InputError

    paths = {}
    for f in formats:
        if f not in FORMATS:
            raise InputError(f"unknown output format {f!r}; choose from {', '.join(FORMATS)}")
        if prefix == "-":
            if f != "tsv":
                raise InputError("-o - writes TSV to stdout; use --formats tsv with it")
            paths[f] = "-"
        else:
            paths[f] = f"{prefix}.{f}"
    return paths


_FASTA_SUFFIXES = {".fasta", ".fa", ".faa", ".fas", ".fsa", ".fna", ".pep", ".seq", ".txt"}


def prefix_for_directory(directory: str, input_path: str | None) -> str:
    """``-o out/`` (or an existing directory): ``out/<input stem>``, the convention of tools like esm-extract.

    Only a named regular input has a stem worth using; for stdin or a pipe the user must name the prefix.
    """
    name = Path(input_path).name if input_path and input_path != "-" else ""
    regular = False
    if name and input_path:
        try:
            regular = stat.S_ISREG(os.stat(input_path).st_mode)
        except OSError:
            regular = False
    if not regular:
        from protsae_cli.errors import OutputError

        raise OutputError(f"-o {directory}: a directory, and the input has no file name to name the outputs "
                          f"after; give a prefix such as {os.path.join(directory, 'run')}")
    stem = name[:-3] if name.endswith(".gz") else name
    root, ext = os.path.splitext(stem)
    if ext.lower() in _FASTA_SUFFIXES and root:
        stem = root
    return os.path.join(directory, stem)


def prepare_output_prefix(prefix: str, formats: Iterable[str], input_path: str | None = None) -> str:
    """Check, before any model is loaded, that every output of ``prefix`` can be written; return the prefix.

    A bad ``-o`` must fail in seconds, not after the compute: the parent directories are created (a component
    that is a file is named), each output path must not be a directory, and the directory must accept a new
    file (probed by creating and removing one: permission bits say nothing on read-only or full filesystems,
    and root ignores them). A prefix that is a directory (``d/`` or an existing ``d``) writes ``d/<input
    stem>.*`` instead of hidden ``d/.h5`` files. Raises ``OutputError`` (exit 5) naming the path and the cause.
    """
    from protsae_cli.errors import OutputError

    formats = tuple(formats)
    if prefix == "-":
        output_paths(prefix, formats)  # only TSV may go to stdout
        return prefix
    if not prefix:
        raise OutputError("-o: the output prefix is empty")
    try:  # a name too long, a directory we may not search: the OS's reason, named, not a traceback
        if prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
            directory = prefix.rstrip("/" + os.sep) or prefix
            if not os.path.isdir(directory):
                _make_parents(Path(directory) / "x")
            prefix = prefix_for_directory(directory, input_path)
        paths = output_paths(prefix, formats)
        for path in paths.values():
            p = Path(path)
            _make_parents(p)
            if p.is_dir():
                raise OutputError(f"{p} is a directory, so the output cannot be written there; choose another -o "
                                  "prefix or remove the directory")
    except OSError as e:
        raise OutputError(f"{e.filename or prefix}: cannot write outputs there ({e.strerror or e})") from None
    parent = Path(next(iter(paths.values()))).parent
    _probe_directory(parent)
    return prefix


def _probe_directory(parent: Path) -> None:
    """Create and remove a file in ``parent``: the only reliable test that outputs can be written there."""
    from protsae_cli.errors import OutputError

    probe = parent / f".protsae-write-probe.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            try:
                os.close(fd)
            finally:
                os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{parent}: cannot write outputs there ({e.strerror or e})") from None


def _make_parents(path: Path) -> None:
    """Create ``path``'s parent directories, naming the component that is a file when one is in the way."""
    from protsae_cli.errors import OutputError

    parent = path.parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise OutputError(f"{path}: cannot create the output there: {ancestor} is a file, not a directory")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{parent}: cannot create the output directory ({e.strerror or e})") from None
