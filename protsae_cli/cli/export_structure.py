"""`protsae export-structure`: a concept's activations into a PDB/mmCIF B-factor column (plus .defattr/.pml)."""

from __future__ import annotations

from typing import cast

from pathlib import Path

import typer

from protsae_cli.cli.options import StructureScale

IO_PANEL, SEL_PANEL, MAP_PANEL = "Input/Output", "What to export", "Residue mapping"


def command(
    h5: Path | None = typer.Argument(None, metavar="H5", show_default=False,
                                        help="Annotation file written by `protsae annotate` (PREFIX.h5), as "
                                             "`protsae report H5` takes it."),
    h5_option: Path | None = typer.Option(None, "--h5", rich_help_panel=IO_PANEL, show_default=False,
                                             metavar="H5", help="The same, as an option (older scripts)."),
    pdb: Path = typer.Option(..., "--pdb", rich_help_panel=IO_PANEL, show_default=False,
                             help="Structure to colour: .pdb/.ent or .cif/.mmcif (optionally .gz), e.g. an "
                                  "AlphaFold model."),
    output: Path = typer.Option(..., "--output", "-o", rich_help_panel=IO_PANEL, show_default=False,
                                help="Structure to write; .cif/.mmcif writes mmCIF, anything else PDB."),
    protein: str | None = typer.Option(None, "--protein", rich_help_panel=SEL_PANEL, metavar="ID",
                                          help="Protein id as in the FASTA header (verbatim)."),
    index: int | None = typer.Option(None, "--index", rich_help_panel=SEL_PANEL, min=0,
                                        help="0-based input ordinal of the protein; needed when ids repeat."),
    concept: str = typer.Option(..., "--concept", "-c", rich_help_panel=SEL_PANEL, show_default=False,
                                metavar="CONCEPT",
                                help="Concept id, name or ontology id from the SAE, or latent:N for a raw "
                                     "latent."),
    scale: StructureScale = typer.Option(StructureScale.MAX, "--scale", rich_help_panel=SEL_PANEL,
                              help="max: 100 x activation / this protein's maximum (0-100, like pLDDT); "
                                   "raw: the activation itself (comparable across proteins)."),
    chain: str | None = typer.Option(None, "--chain", rich_help_panel=MAP_PANEL, metavar="ID",
                                        help="Chain to map the protein onto. Default: the best-matching chain."),
    min_identity: float = typer.Option(0.9, "--min-identity", rich_help_panel=MAP_PANEL, min=0, max=1,
                                       help="Refuse when the chain's aligned residues are less identical "
                                            "than this to the protein."),
    force: bool = typer.Option(False, "--force", rich_help_panel=MAP_PANEL,
                               help="Write even below --min-identity."),
    defattr: Path | None = typer.Option(None, "--defattr", rich_help_panel=IO_PANEL,
                                           help="Also write a ChimeraX attribute file (open it, then "
                                                "`color byattribute`)."),
    pml: Path | None = typer.Option(None, "--pml", rich_help_panel=IO_PANEL,
                                       help="Also write a PyMOL script that loads the output and colours it."),
) -> None:
    """Write a concept's per-residue activation into a structure's B-factor column.

    Colour it like pLDDT: PyMOL [bold]spectrum b, white_red[/bold]; ChimeraX [bold]color bfactor palette white:red[/bold].

    Residues are matched to the protein by sequence alignment (offset numbering, insertion codes and gaps are fine); other chains, ligands and waters get 0.

    Example: [bold]protsae export-structure run.h5 --protein P69905 --concept "metal binding site" --pdb AF-P69905-F1-model_v4.pdb -o P69905.pdb --pml P69905.pml[/bold]
    """
    import sys

    from protsae_cli.report.structure import describe, export_structure

    if (h5 is None) == (h5_option is None):
        raise typer.BadParameter("give the annotation file once: as H5 (e.g. `protsae export-structure run.h5 "
                                 "...`) or as --h5", param_hint="H5")
    h5_path: Path = h5 if h5 is not None else cast(Path, h5_option)  # exactly one is given (checked above)

    summary = export_structure(h5_path, pdb, output, concept, protein_id=protein, index=index, chain=chain,
                               scale=scale.value, force=force, min_identity=min_identity, defattr=defattr, pml=pml)
    for line in describe(summary):
        print(line, file=sys.stderr)
