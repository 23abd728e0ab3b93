"""`protsae merge`: shard outputs in, one output set (ordered by input ordinal) out."""

from __future__ import annotations

import logging

import typer

from protsae_cli.cli.options import Compression, formats_callback


def command(
    output: str = typer.Argument(..., metavar="PREFIX", show_default=False,
                                 help="Output prefix: writes PREFIX.h5/.tsv/.gff3 ('-' sends TSV to stdout)."),
    inputs: list[str] = typer.Argument(..., metavar="SHARD...", show_default=False,
                                       help="Shard outputs, all of one kind: .h5 files (preferred: TSV and GFF3 "
                                            "are regenerated from them), or .tsv[.gz], or .gff3[.gz] files."),
    formats: str | None = typer.Option(None, "--formats", callback=formats_callback, metavar="FORMATS",
                                          help="Comma-separated subset of h5,tsv,gff3,jsonl to write. Default: "
                                               "h5,tsv,gff3 for HDF5 shards; the input kind for TSV/GFF3 shards."),
    renumber: bool = typer.Option(False, "--renumber",
                                  help="The HDF5 inputs are consecutive pieces of one FASTA given in order (e.g. "
                                       "Nextflow splitFasta chunks, each numbered from 0): offset their ordinals "
                                       "instead of refusing them as overlapping."),
    compression: Compression = typer.Option(Compression.GZIP, "--compression", case_sensitive=False,
                                            help="HDF5 compression."),
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="Merge even when some --shard i/n outputs are missing (the merged "
                                            "file records which shards it holds). Without it a missing shard is "
                                            "an error naming the missing shard numbers."),
) -> None:
    """Merge shard outputs (from --shard i/n runs, --devices workers or split inputs) into one output set.

    Shards must come from the same input (HDF5 and GFF3 shards record the record count and a digest of the
    whole FASTA) and the same models and settings (PLM and SAE checksums, hook, layer, k, calling options): a
    mismatch is refused and both files named; a missing shard is an error unless --allow-partial. Proteins are
    ordered by input ordinal; an ordinal present in two shards is refused. The merge holds exactly what the shards hold; it matches an
    unsharded run up to float rounding from different batch-mates (bit for bit with --toks-per-batch 1).

    Example: [bold]protsae merge out/all out/shard_*.h5[/bold]
    """
    from protsae_cli.logging_setup import is_quiet
    from protsae_cli.io.merge import merge_files

    fmts = tuple(formats.split(",")) if formats else None
    comp = None if compression is Compression.NONE else compression.value
    summary = merge_files(inputs, output, formats=fmts, renumber=renumber, compression=comp,
                          allow_partial=allow_partial)
    if not is_quiet():
        log = logging.getLogger("protsae.merge")
        log.info("merged %d files: %d proteins, %d segments", len(inputs), summary.proteins, summary.segments)
        for p in summary.outputs:
            if p != "-":
                log.info("wrote %s", p)
