"""Output writers: HDF5 (sparse CSR codes + segments + provenance), TSV (segments) and GFF3, all atomic.

Kept free of torch so that `protsae merge` and `report` start fast on CPU-only nodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

FORMATS = ("h5", "tsv", "gff3")
# Provenance entries that identify the whole input (fasta.InputIdentity); written when a writer closes.
INPUT_IDENTITY_KEYS: tuple[str, ...] = ("input_records", "input_sha256")


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


def output_paths(prefix: str, formats: Iterable[str]) -> dict[str, str]:
    """`-o out/run` -> out/run.h5, out/run.tsv, out/run.gff3 (a `-` prefix sends TSV to stdout)."""
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
