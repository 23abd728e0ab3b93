"""`protsae annotate`: options in, one library call, a summary out."""

from __future__ import annotations

from typing import cast

import typer

from protsae_cli.annotate.options import DEFAULT_CHUNK_RESIDUES
from protsae_cli.annotate.options import AnnotateOptions as A  # the defaults live there (import-light)
from protsae_cli.cli.options import (PERF_PANEL, Backend, CheckPlmOpt, DecodeMode, DeviceOpt, H5Dtype, LongPolicy,
                                     ModelOpt, ProgressOpt, SaeKOpt, SaeLayerOpt, SaeOpt, SaePlmOpt, ThreadsOpt,
                                     devices_callback, formats_callback)

IO_PANEL, CALL_PANEL = "Input/Output", "Concept calling"


def parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise typer.BadParameter("expected i/n, e.g. 1/8") from None
    if not 1 <= i <= n:
        raise typer.BadParameter(f"shard index must be in 1..{n}, got {i}")
    return i, n


def command(
    fasta: str = typer.Argument(..., metavar="FASTA", show_default=False,
                                help="Protein FASTA: a path, a .gz path, or - for stdin."),
    output: str = typer.Option("protsae_out", "--output", "-o", rich_help_panel=IO_PANEL, metavar="PREFIX",
                               help="Output prefix: writes PREFIX.h5, PREFIX.tsv, PREFIX.gff3. "
                                    "'-' writes the TSV to stdout (with --formats tsv)."),
    formats: str = typer.Option(",".join(A.formats), "--formats", rich_help_panel=IO_PANEL, callback=formats_callback,
                                metavar="FORMATS",
                                help="Comma-separated subset of h5,tsv,gff3,jsonl (jsonl: one JSON object per "
                                     "protein, proteins without calls included)."),
    skip_invalid: bool = typer.Option(A.skip_invalid, "--skip-invalid", rich_help_panel=IO_PANEL,
                                      help="Record invalid proteins (status 'invalid') instead of stopping."),
    h5_dtype: H5Dtype = typer.Option(H5Dtype(A.h5_dtype), "--h5-dtype", rich_help_panel=IO_PANEL,
                                     help="Storage type of activations in HDF5. float32 is what scipy.sparse and "
                                          "AnnData read; float16 makes the file about 40 % smaller, but only h5py "
                                          "and protsae read its codes."),
    model: ModelOpt = None,
    sae: SaeOpt = None,
    sae_layer: SaeLayerOpt = None,
    sae_plm: SaePlmOpt = None,
    sae_k: SaeKOpt = None,
    check_plm: CheckPlmOpt = A.check_plm,
    long_policy: LongPolicy = typer.Option(LongPolicy(A.long_policy), "--long-policy", rich_help_panel=CALL_PANEL,
                                    help="Proteins over 1022 residues: window (overlapping windows, each residue "
                                         "from the window where it is most central), truncate, or error."),
    window_overlap: int = typer.Option(A.window_overlap, "--window-overlap", rich_help_panel=CALL_PANEL, min=0,
                                       help="Minimum overlap between windows, in residues."),
    min_segment_len: int = typer.Option(A.min_segment_len, "--min-segment-len", rich_help_panel=CALL_PANEL, min=1,
                                        help="Drop concept segments shorter than this (after merging)."),
    merge_gap: int = typer.Option(A.merge_gap, "--merge-gap", rich_help_panel=CALL_PANEL, min=0,
                                  help="Merge segments of one concept separated by at most this many residues."),
    decode: DecodeMode = typer.Option(DecodeMode(A.decode), "--decode", rich_help_panel=CALL_PANEL,
                                      help="Region concepts (membrane spans, sides, signal peptide): viterbi decodes "
                                           "one consistent topology per protein with the SAE's fitted state model "
                                           "(docs/SEGMENTS.md); none calls them per residue like sites. Sites "
                                           "always stay per residue."),
    call_withheld: bool = typer.Option(A.call_withheld, "--call-withheld", rich_help_panel=CALL_PANEL,
                                       help="Also call concepts whose validated precision or F1 is below the "
                                            "floor (withheld by default; see docs/CALLS.md)."),
    device: DeviceOpt = A.device,
    backend: Backend = typer.Option(Backend(A.backend), "--backend", rich_help_panel=PERF_PANEL,
                                    help="SAE encode backend: auto, torch, triton or onnx."),
    toks_per_batch: int = typer.Option(A.toks_per_batch, "--toks-per-batch", rich_help_panel=PERF_PANEL, min=1,
                                       help="Token budget per ESM-2 batch (padded tokens); halved on GPU OOM."),
    threads: ThreadsOpt = None,
    shard: str | None = typer.Option(None, "--shard", rich_help_panel=PERF_PANEL, callback=parse_shard,
                                        metavar="I/N",
                                        help="Process only shard i of n (records with ordinal % n == i-1)."),
    progress: ProgressOpt = A.progress,
    resume: bool = typer.Option(A.resume, "--resume", rich_help_panel=IO_PANEL,
                                help="Checkpoint finished chunks in PREFIX.parts/ and, when rerun after a crash or "
                                     "kill, skip the chunks already done. Settings must match the first attempt."),
    chunk_residues: int | None = typer.Option(None, "--chunk-residues", min=1, rich_help_panel=IO_PANEL,
                                                 help="Residues per chunk, the unit of --resume checkpoints (a kill "
                                                      "loses at most the chunk in flight). Default "
                                                      f"{DEFAULT_CHUNK_RESIDUES}, or "
                                                      "$PROTSAE_CHUNK_RESIDUES.", show_default=False),
    devices: str | None = typer.Option(None, "--devices", rich_help_panel=PERF_PANEL, callback=devices_callback,
                                          metavar="DEVICES",
                                          help="Run one worker process per device over shards of the input and "
                                               "merge at the end: GPU ordinals '0,1,2,3', 'all' visible GPUs, or "
                                               "'cpu,cpu'. Replaces --device."),
) -> None:
    """Annotate proteins with per-residue concepts: FASTA -> ESM-2 -> SAE -> HDF5/TSV/GFF3.

    Example: [bold]protsae annotate proteins.fasta -o out/run[/bold]
    """
    import logging

    from protsae_cli.annotate.pipeline import AnnotateOptions, annotate
    from protsae_cli.logging_setup import is_quiet

    if devices is not None and device != "auto":
        raise typer.BadParameter("give either --device or --devices, not both", param_hint="--devices")
    if sae and (sae_layer or sae_plm or sae_k or model):  # published formats: docs/FOREIGN_SAES.md
        from protsae_cli.sae.foreign import from_flags

        sae = from_flags(sae, sae_layer, sae_plm, sae_k, model)
    opts = AnnotateOptions(
        input=fasta, output_prefix=output, model=model, sae=str(sae) if sae else None,
        formats=tuple(formats.split(",")), device=device, backend=backend.value,
        toks_per_batch=toks_per_batch, long_policy=long_policy.value, window_overlap=window_overlap,
        min_segment_len=min_segment_len, merge_gap=merge_gap, decode=decode.value, call_withheld=call_withheld,
        skip_invalid=skip_invalid, check_plm=check_plm,
        h5_dtype=h5_dtype.value, shard=cast("tuple[int, int] | None", shard),  # parse_shard converted it
        progress=progress and not is_quiet(), threads=threads, resume=resume,
    )
    if chunk_residues is not None:  # else the env var / built-in default of AnnotateOptions applies
        opts.chunk_residues = chunk_residues
    if devices is not None:
        from protsae_cli.annotate.workers import annotate_multi, parse_devices

        s = annotate_multi(opts, parse_devices(devices))
    else:
        s = annotate(opts)
    # Through logging (stderr), so -q silences it and --log-file keeps it.
    log = logging.getLogger("protsae.annotate")
    log.info(f"annotated {s.proteins} proteins ({s.residues} residues) in {s.seconds:.1f} s "
             f"({s.residues_per_second:,.0f} residues/s, {s.backend} on {s.device}): {s.ok} ok, {s.windowed} "
             f"windowed, {s.truncated} truncated, {s.invalid} invalid, {s.failed} failed; {s.segments} concept "
             "segments")
    for p in s.outputs:
        if p != "-":
            log.info(f"wrote {p}")
