"""`protsae report`: an annotation HDF5 in, one self-contained HTML page (and optional PNGs) out."""

from __future__ import annotations

from pathlib import Path

import typer

from protsae_cli.cli.options import AnnotationFormatOpt, AnnotationsOpt, ProgressOpt

IO_PANEL, SEL_PANEL, FIG_PANEL = "Input/Output", "Which proteins", "Figures"


def command(
    h5: Path = typer.Argument(..., help="Annotation file written by `protsae annotate` (PREFIX.h5).",
                              show_default=False),
    output: Path | None = typer.Option(None, "--output", "-o", rich_help_panel=IO_PANEL,
                                          help="HTML file to write. Default: PREFIX.report.html next to the h5."),
    png_dir: Path | None = typer.Option(None, "--png-dir", rich_help_panel=IO_PANEL,
                                           help="Also write matplotlib PNGs (tracks, heatmaps, top concepts, "
                                                "histograms) into this directory."),
    proteins: list[str] | None = typer.Option(None, "--proteins", "-p", metavar="IDS", rich_help_panel=SEL_PANEL,
                                                 help="Draw these protein ids (comma-separated, or repeat the "
                                                      "option; an id containing a comma is matched whole "
                                                      "first). Every protein with a matching id is drawn."),
    max_proteins: int = typer.Option(50, "--max-proteins", rich_help_panel=SEL_PANEL, min=0,
                                     help="Without --proteins: draw the first N proteins. All proteins are "
                                          "always listed in the searchable table."),
    top_latents: int = typer.Option(24, "--top-latents", rich_help_panel=FIG_PANEL, min=0,
                                    help="Rows of each protein's latent heatmap (most active latents first)."),
    max_lanes: int = typer.Option(25, "--max-lanes", rich_help_panel=FIG_PANEL, min=0,
                                  help="Most concept lanes drawn per protein (strongest first)."),
    scan_entries: int = typer.Option(20_000_000, "--scan-entries", rich_help_panel=FIG_PANEL, min=0,
                                     help="Latent histograms read at most this many code entries (whole "
                                          "residues from the start of the file); the page says when it sampled."),
    table_limit: int = typer.Option(200_000, "--table-limit", rich_help_panel=SEL_PANEL, min=0,
                                    help="Most proteins listed in the searchable table (bounds the page size; "
                                         "~70 bytes per protein)."),
    title: str | None = typer.Option(None, "--title", rich_help_panel=FIG_PANEL, help="Page title."),
    annotations: AnnotationsOpt = [],
    annotation_format: AnnotationFormatOpt = [],
    progress: ProgressOpt = True,
) -> None:
    """Write a self-contained HTML report (no network needed) of an annotation file.

    Run summary, top concepts with their validated reliability, latent histograms, a searchable table of all proteins, and concept tracks with a latent heatmap for the first proteins (or --proteins). With --annotations, the labels of those files are drawn as reference tracks under each protein's predicted lanes (matched by protein id).

    Example (from the repository root: annotate the bundled proteins, then report on them; about 20 s and 10 s on 2 CPU cores):

    [bold]$ protsae annotate examples/proteins.fasta -o out/run[/bold]

    [bold]$ protsae report out/run.h5 -o run.html --png-dir figures/ --max-proteins 5[/bold]
    """
    import sys

    from protsae_cli.logging_setup import is_quiet
    from protsae_cli.report.html import write_report

    from protsae_cli.labels.sources import annotation_specs  # the same -a / --annotation-format pairing as eval

    specs = annotation_specs(annotations, [f.value for f in annotation_format])

    out = output if output is not None else h5.with_name(
        (h5.name[:-3] if h5.name.endswith(".h5") else h5.name) + ".report.html")
    summary = write_report(h5, out, png_dir=png_dir, proteins=proteins or None, max_proteins=max_proteins,
                           top_latents=top_latents, max_lanes=max_lanes, scan_entries=scan_entries,
                           table_limit=table_limit, title=title, progress=progress and not is_quiet(),
                           annotations=specs)
    print(f"protsae report: wrote {summary.output} ({summary.proteins_drawn} of {summary.proteins_total} "
          f"proteins drawn{'; latent histograms sampled' if summary.sampled else ''})", file=sys.stderr)
    if summary.pngs:
        print(f"protsae report: wrote {len(summary.pngs)} PNGs to {png_dir}", file=sys.stderr)
