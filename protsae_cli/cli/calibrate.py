"""`protsae calibrate`: options in, one library call (`protsae_cli.evaluate.calibrate.calibrate`), a summary out."""

from __future__ import annotations


import typer

from protsae_cli.evaluate.options import CalibrateOptions as C  # the defaults live there (import-light)
from protsae_cli.cli.options import (CONCEPTS_PANEL, PERF_PANEL, AnnotationFormatOpt, AnnotationsOpt, CallingOpt,
                                     CheckPlmOpt, DeviceOpt, ModelOpt, OntologyOpt, ProgressOpt, PropagateOpt,
                                     SegmentDecoderMode, ThreadsOpt)

IO_PANEL = "Input/Output"


def command(
    fasta: str = typer.Argument(..., metavar="FASTA", show_default=False,
                                help="Labelled proteins (FASTA, .gz or -) the SAE was not trained on; ids must be "
                                     "unique and match the labels."),
    sae: str | None = typer.Option(None, "--sae", metavar="DIR", rich_help_panel="Models",
                                      help="SAE to calibrate. Default: the bundled demo SAE."),
    output: str | None = typer.Option(None, "--output", "-o", metavar="DIR", rich_help_panel=IO_PANEL,
                                         help="Write the recalibrated SAE here (its weights, byte for byte, and a "
                                              "new concept table). Required unless --measure-only."),
    annotations: AnnotationsOpt = [],
    annotation_format: AnnotationFormatOpt = [],
    calling: CallingOpt = C.calling,
    measure_only: bool = typer.Option(C.measure_only, "--measure-only", rich_help_panel=CONCEPTS_PANEL,
                                      help="Keep the thresholds and only measure them on these proteins "
                                           "(a held-out check); writes no SAE."),
    segment_decoder: SegmentDecoderMode = typer.Option(
        SegmentDecoderMode(C.segment_decoder), "--segment-decoder", rich_help_panel=CONCEPTS_PANEL,
        help="The topology decoder of region concepts (docs/SEGMENTS.md), when some -a source has membrane-span "
             "labels: fit refits it on them (fitted on the even-numbered proteins and scored on the odd-numbered "
             "ones beside the SAE's decoder, then refitted on all); auto does the same but keeps the SAE's decoder "
             "if that scores better; keep leaves it. Measured (TMbed's protocol) in every case."),
    json_out: str | None = typer.Option(None, "--json", metavar="PATH", rich_help_panel=IO_PANEL,
                                           help="Also write the per-concept report (before/after) as JSON."),
    ontology: OntologyOpt = [],
    propagate: PropagateOpt = C.propagate,
    model: ModelOpt = None,
    check_plm: CheckPlmOpt = C.check_plm,
    device: DeviceOpt = C.device,
    toks_per_batch: int = typer.Option(C.toks_per_batch, "--toks-per-batch", rich_help_panel=PERF_PANEL, min=1,
                                       help="Token budget per ESM-2 batch (padded tokens)."),
    threads: ThreadsOpt = None,
    progress: ProgressOpt = C.progress,
) -> None:
    """Measure each concept's calls on your labelled proteins and choose its threshold (docs/CALLS.md).

    Example: [bold]protsae calibrate --sae my_sae valid.fasta -a tm.fasta --annotation-format tmbed
    --calling precision:0.9 -o my_sae_calibrated[/bold]
    """
    import logging

    from protsae_cli.evaluate.calibrate import CalibrateOptions, calibrate
    from protsae_cli.errors import InputError
    from protsae_cli.labels.sources import annotation_specs
    from protsae_cli.logging_setup import is_quiet

    specs = annotation_specs(annotations, [f.value for f in annotation_format])
    if measure_only and output:
        raise InputError("--measure-only writes no SAE; drop -o (or drop --measure-only to recalibrate)")
    report = calibrate(CalibrateOptions(sae=sae, fasta=fasta, annotations=specs, output=output, model=model,
                                        device=device, calling=calling, measure_only=measure_only,
                                        ontologies=list(ontology), propagate=propagate, toks_per_batch=toks_per_batch,
                                        check_plm=check_plm, threads=threads, json_out=json_out,
                                        segment_decoder=segment_decoder.value,
                                        progress=progress and not is_quiet()))
    log = logging.getLogger("protsae.calibrate")
    n = sum(1 for r in report["per_concept"] if "skipped" not in r)
    log.info(f"{'measured' if measure_only else 'calibrated'} {n} of {len(report['per_concept'])} labelled "
             f"concepts ({report['operating_point']})")
    if report.get("output"):
        log.info(f"wrote {report['output']}")
    if json_out:
        log.info(f"wrote {json_out}")
