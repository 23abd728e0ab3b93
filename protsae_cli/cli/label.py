"""`protsae label`: options in, one library call (`protsae_cli.evaluate.label.label_sae`), a summary out."""

from __future__ import annotations


import typer

from protsae_cli.evaluate.options import LabelOptions as L  # the defaults live there (import-light)
from protsae_cli.cli.options import (CONCEPTS_PANEL, PERF_PANEL, AnnotationFormatOpt, AnnotationsOpt, CallingOpt,
                                     CheckPlmOpt, DeviceOpt, ModelOpt, OntologyOpt, ProgressOpt, PropagateOpt, SaeKOpt,
                                     SaeLayerOpt, SaePlmOpt, ThreadsOpt, open_ends)

IO_PANEL = "Input/Output"


def command(
    fasta: str = typer.Argument(..., metavar="FASTA", show_default=False,
                                help="Labelled proteins (FASTA, .gz or -); ids must be unique and match the labels. "
                                     "Split by protein into association and validation parts."),
    sae: str = typer.Option(..., "--sae", metavar="PATH", rich_help_panel="Models", show_default=False,
                            help="SAE to label: a protsae directory, or a published InterPLM, InterProt, SAELens "
                                 "or sparsify checkpoint (docs/FOREIGN_SAES.md)."),
    output: str = typer.Option(..., "--output", "-o", metavar="DIR", rich_help_panel=IO_PANEL, show_default=False,
                               help="Write the labelled SAE here: a protsae SAE directory (same weights, in "
                                    "protsae's layout) with the new concept table, and label_report.json."),
    force: bool = typer.Option(L.force, "--force", rich_help_panel=IO_PANEL,
                               help="Replace -o DIR if it exists and is not empty."),
    annotations: AnnotationsOpt = [],
    annotation_format: AnnotationFormatOpt = [],
    calling: CallingOpt = L.calling,
    valid_fraction: float = typer.Option(L.valid_fraction, "--valid-fraction", rich_help_panel=CONCEPTS_PANEL,
                                         callback=open_ends(low=0, high=1),
                                         help="Share of the labelled proteins in the validation part (thresholds "
                                              "and the reported precision/recall/F1); the rest associate latents."),
    seed: int = typer.Option(L.seed, "--seed", rich_help_panel=CONCEPTS_PANEL, help="Seeds the protein split."),
    candidates: int = typer.Option(L.candidates, "--candidates", min=1, rich_help_panel=CONCEPTS_PANEL,
                                   help="Latents per concept, ranked by association F1, that the validation part "
                                        "chooses among; 1 keeps the association's best (docs/LABEL.md: more did "
                                        "worse on held-out proteins)."),
    json_out: str | None = typer.Option(None, "--json", metavar="PATH", rich_help_panel=IO_PANEL,
                                           help="Also write the per-concept report (candidates, choices) here."),
    ontology: OntologyOpt = [],
    propagate: PropagateOpt = L.propagate,
    model: ModelOpt = None,
    sae_layer: SaeLayerOpt = None,
    sae_plm: SaePlmOpt = None,
    sae_k: SaeKOpt = None,
    check_plm: CheckPlmOpt = L.check_plm,
    device: DeviceOpt = L.device,
    toks_per_batch: int = typer.Option(L.toks_per_batch, "--toks-per-batch", rich_help_panel=PERF_PANEL, min=1,
                                       help="Token budget per ESM-2 batch (padded tokens)."),
    threads: ThreadsOpt = None,
    progress: ProgressOpt = L.progress,
) -> None:
    """Name the concepts of any SAE from your labelled proteins: latents associated on one part, thresholds and
    reliability chosen on the other; annotate then calls them (docs/LABEL.md).

    Example (from the repository root, on the SAE `protsae train --help`'s example writes and 36 bundled TMbed-labelled
    proteins):

    [bold]$ protsae label --sae my_sae examples/tm_labelled.fasta -a examples/tm_labelled.3line --annotation-format tmbed -o my_sae_labelled[/bold]

    A published SAE: [bold]protsae label --sae ae_normalized.pt --sae-layer 24 --sae-plm esm2_t33_650M_UR50D --sae-k 64 labelled.fasta -a labelled.3line -o interplm_l24_labelled[/bold],
    then [bold]protsae annotate proteins.fasta --sae interplm_l24_labelled -o out/run[/bold]
    """
    import logging

    from protsae_cli.evaluate.label import LabelOptions, label_sae
    from protsae_cli.labels.sources import annotation_specs
    from protsae_cli.logging_setup import is_quiet

    specs = annotation_specs(annotations, [f.value for f in annotation_format])
    from protsae_cli.sae.foreign import from_flags

    sae = from_flags(sae, sae_layer, sae_plm, sae_k, model)
    report = label_sae(LabelOptions(sae=sae, fasta=fasta, annotations=specs, output=output, model=model,
                                    device=device, calling=calling, valid_fraction=valid_fraction, seed=seed,
                                    candidates=candidates, ontologies=list(ontology), propagate=propagate,
                                    toks_per_batch=toks_per_batch, check_plm=check_plm, threads=threads,
                                    force=force, json_out=json_out, progress=progress and not is_quiet()))
    log = logging.getLogger("protsae.label")
    rows = report["per_concept"]
    named = [r for r in rows if "latent" in r]
    withheld = [r for r in named if r.get("withheld")]
    log.info(f"labelled {len(named)} of {len(rows)} concepts ({report['operating_point']}); {len(withheld)} "
             "below the calling floors (withheld by annotate unless --call-withheld)")
    log.info(f"wrote {report['output']}")
    if json_out:
        log.info(f"wrote {json_out}")
