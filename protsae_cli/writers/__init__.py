"""Output writers: HDF5 (sparse CSR codes + segments + provenance), TSV (segments) and GFF3, all atomic.

Kept free of torch so that `protsae merge` and `report` start fast on CPU-only nodes.
"""

from __future__ import annotations

from collections.abc import Iterable

FORMATS = ("h5", "tsv", "gff3")


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
