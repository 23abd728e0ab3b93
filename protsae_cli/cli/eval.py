"""`protsae eval`: options in, one library call (`protsae_cli.evaluate.pipeline.evaluate`)."""

from __future__ import annotations


import typer

from protsae_cli.evaluate.options import EvalOptions as E  # the defaults live there (import-light)
from protsae_cli.cli.options import (CONCEPTS_PANEL, PERF_PANEL, AnnotationFormatOpt, AnnotationsOpt, CheckPlmOpt,
                                     DeviceOpt, OntologyOpt, PlmOpt, ProgressOpt, PropagateOpt, open_ends)

DATA, CONCEPTS, LM, OUT = "Data", CONCEPTS_PANEL, "Language-model fidelity", "Outputs"


#: --thresholds as the command line writes it, from the EvalOptions default.
_DEFAULT_THRESHOLDS = ",".join(f"{t:g}" for t in E.thresholds)


def command(
    fasta: str = typer.Argument(..., help="Held-out proteins (FASTA, .gz or -); ids must be unique.",
                                show_default=False),
    sae: list[str] = typer.Option(..., "--sae", "-s", metavar="DIR", show_default=False,
                                  help="SAE directory; repeat to compare SAEs at the same hook (e.g. TopK vs ProtSAE)."),
    json_out: str = typer.Option(..., "--json", metavar="PATH",
                                 help="Write the results here (JSON; keys documented in "
                                      "protsae_cli/evaluate/pipeline.py).", rich_help_panel=OUT, show_default=False),
    markdown_out: str | None = typer.Option(None, "--markdown", metavar="PATH", rich_help_panel=OUT,
                                               help="Also write a Markdown summary."),
    plots: str | None = typer.Option(None, "--plots", metavar="DIR", rich_help_panel=OUT,
                                        help="Directory for PNG plots (firing frequency, concept F1, CE)."),
    model: PlmOpt = None,
    annotations: AnnotationsOpt = [],
    annotation_format: AnnotationFormatOpt = [],
    ontology: OntologyOpt = [],
    propagate: PropagateOpt = E.propagate,
    split_by_id: tuple[str, str] | None = typer.Option(None, "--split-by-id", rich_help_panel=DATA,
                                                          metavar="VALID_IDS TEST_IDS",
                                                          help="Two id-list files: selection proteins, report proteins."),
    valid_fraction: float = typer.Option(E.valid_fraction, "--valid-fraction", rich_help_panel=DATA,
                                         callback=open_ends(low=0, high=1),
                                         help="Without --split-by-id: seeded random fraction of proteins for "
                                              "selection, in (0, 1) (the rest is the test split)."),
    seed: int = typer.Option(E.seed, "--seed", rich_help_panel=DATA, help="Seed of the split and of the LM masks."),
    max_residues: int = typer.Option(E.max_residues, "--max-residues", rich_help_panel=DATA, min=1,
                                     help="Longer proteins are evaluated on their first residues only."),
    thresholds: str = typer.Option(_DEFAULT_THRESHOLDS, "--thresholds", metavar="LIST",
                                   rich_help_panel=CONCEPTS,
                                   help="Comma-separated threshold grid on max-normalised activations."),
    lm_proteins: int = typer.Option(E.lm_proteins, "--lm-proteins", rich_help_panel=LM, min=0,
                                    help="Test proteins for the CE splice (0 = skip LM fidelity)."),
    lm_max_len: int = typer.Option(E.lm_max_len, "--lm-max-len", rich_help_panel=LM, min=1,
                                   help="Crop them to this length."),
    mask_fraction: float = typer.Option(E.mask_fraction, "--mask-fraction", rich_help_panel=LM, min=0, max=1,
                                        help="Residues masked for the masked-LM CE."),
    toks_per_batch: int = typer.Option(E.toks_per_batch, "--toks-per-batch", rich_help_panel=PERF_PANEL, min=1,
                                       help="Padded tokens per PLM batch."),
    device: DeviceOpt = E.device,
    check_plm: CheckPlmOpt = not E.no_check_plm,
    progress: ProgressOpt = E.progress,
) -> None:
    """Evaluate SAEs on held-out proteins: reconstruction, LM fidelity, concept alignment, probing.

    Example (from the repository root: the TopK SAE of `protsae train --help`'s example against the bundled demo
    ProtSAE, on the 20 bundled proteins; about a minute on 2 CPU cores):

    [bold]$ protsae eval --sae my_sae --sae protsae_cli/models/default_sae examples/proteins.fasta --lm-proteins 4 --json eval.json --markdown eval.md --plots plots/[/bold]

    With your own held-out labels: [bold]protsae eval --sae topk --sae protsae test.fasta -a tm.3line
    --annotation-format tmbed --valid-fraction 0.5 --json eval.json[/bold]
    """
    from protsae_cli.errors import InputError
    from protsae_cli.evaluate.pipeline import EvalOptions, evaluate
    from protsae_cli.labels.sources import annotation_specs
    from protsae_cli.logging_setup import is_quiet

    specs = annotation_specs(annotations, [f.value for f in annotation_format])
    try:
        grid = tuple(float(t) for t in thresholds.split(",") if t.strip())
    except ValueError as e:
        raise InputError(f"--thresholds: {e}") from e
    split_ids = (split_by_id[0], split_by_id[1]) if split_by_id and all(split_by_id) else None
    opts = EvalOptions(sae=list(sae), fasta=fasta, model=model, annotations=specs, ontologies=list(ontology),
                       propagate=propagate, split_ids=split_ids, valid_fraction=valid_fraction, seed=seed,
                       thresholds=grid, lm_proteins=lm_proteins, lm_max_len=lm_max_len, mask_fraction=mask_fraction,
                       max_residues=max_residues, toks_per_batch=toks_per_batch, device=device,
                       json_out=json_out, markdown_out=markdown_out, plots_dir=plots, no_check_plm=not check_plm,
                       progress=progress and not is_quiet())
    result = evaluate(opts)
    for s in result["saes"]:
        r = result["reconstruction"][s["name"]]
        line = f"{s['name']}: FVE {r['fve']:.3f}, L0 {r.get('l0_mean', float('nan')):.1f}"
        fid = result.get("lm_fidelity")
        if fid:
            lr = fid["unmasked"]["per_sae"][s["name"]]["loss_recovered_zero"]
            line += f", loss recovered {lr['clipped']:.1f} %" if lr["defined"] else ", loss recovered undefined"
        con = result.get("concepts")
        if con:
            c = con["per_sae"][s["name"]]["summary"]
            mb = c["mean_best_test_f1"]
            line += f", mean best test F1 {mb:.3f}" if mb is not None else ""
            line += f" (coverage {c['coverage']}/{c['n_evaluable']})"
        typer.echo(line, err=True)
    typer.echo(f"wrote {json_out}", err=True)
