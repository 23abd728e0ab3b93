"""`protsae steer`: options in, one library call (`protsae_cli.steer.pipeline.run_steer`), a summary out."""

from __future__ import annotations

from typing import cast

import typer

from protsae_cli.steer.options import SteerOptions as O  # the defaults live there (import-light)
from protsae_cli.steer.options import SteerSpec as S
from protsae_cli.cli.options import (CheckPlmOpt, Decode, DeviceOpt, EditScope, MaskStrategy, ModelOpt, Positions,
                                     PpplPositions, ProgressOpt, SaeOpt, SteerInit, SteerMode, ThreadsOpt,
                                     controls_callback, open_ends)

IO_PANEL, EDIT_PANEL, POS_PANEL, DEC_PANEL, CTRL_PANEL = (
    "Input/Output", "Edit", "Positions", "Decoding", "Controls and readouts")


#: --strength as the command line writes it, from the SteerSpec default.
_DEFAULT_STRENGTHS = ",".join(f"{s:g}" for s in S.strengths)


def parse_strengths(value: str) -> tuple[float, ...]:
    """Comma-separated strengths so one run can sweep (conditions of an input share masks and draws)."""
    try:
        out = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"expected numbers separated by commas, got {value!r}") from None
    if not out:
        raise typer.BadParameter("give at least one strength")
    return out


def command(
    concept: str = typer.Option(..., "--concept", "-c", metavar="CONCEPT", rich_help_panel=EDIT_PANEL,
                                show_default=False,
                                help="Concept name, concept id or ontology id from the SAE's concept table, or a "
                                     "latent index (latent:123 or 123)."),
    output: str = typer.Option(..., "--output", "-o", metavar="FASTA", rich_help_panel=IO_PANEL, show_default=False,
                               help="Output FASTA; the per-sequence report is written beside it as OUT.tsv."),
    input: str | None = typer.Option(None, "--input", "-i", metavar="FASTA", rich_help_panel=IO_PANEL,
                                        help="Proteins to redesign (FASTA, .gz or - for stdin; <= 1022 residues)."),
    length: int | None = typer.Option(None, "--length", rich_help_panel=IO_PANEL, min=1, max=1022,
                                         help="Generate from scratch: sequence length (with --num)."),
    num: int | None = typer.Option(None, "--num", rich_help_panel=IO_PANEL, min=1,
                                      help="Generate from scratch: number of sequences (with --length)."),
    init: SteerInit = typer.Option(SteerInit(S.init), "--init", rich_help_panel=IO_PANEL,
                             help="From-scratch start: mask (all positions masked; use --decode iterative or "
                                  "gibbs) or random (seeded uniform residues, all redesigned)."),
    sae: SaeOpt = None,
    model: ModelOpt = None,
    check_plm: CheckPlmOpt = O.check_plm,
    with_ancestors: bool = typer.Option(S.with_ancestors, "--with-ancestors", rich_help_panel=EDIT_PANEL,
                                        help="Also steer the SAE's concepts that are ontology ancestors of the "
                                             "target (is_a, part_of), as the ProtSAE release does for GO ids."),
    ontology: str | None = typer.Option(None, "--ontology", metavar="PATH", rich_help_panel=EDIT_PANEL,
                                           help="OBO file for --with-ancestors and id lookup (default: the "
                                                "shipped residue concept ontology)."),
    mode: SteerMode = typer.Option(SteerMode(S.mode), "--mode", rich_help_panel=EDIT_PANEL,
                             help="add: z += s*S; clamp: z = s*S; multiply: z *= 1+s. S is the latent's recorded "
                                  "max activation, else the token's largest latent value; results floored at 0."),
    strength: str = typer.Option(_DEFAULT_STRENGTHS, "--strength", "-s", metavar="LIST",
                                 rich_help_panel=EDIT_PANEL, callback=parse_strengths,
                                 help="Strength s; a comma-separated list runs a sweep (e.g. 0,0.5,1,2)."),
    replace_with_reconstruction: bool = typer.Option(
        not S.keep_error, "--replace-with-reconstruction", rich_help_panel=EDIT_PANEL,
        help="Replace the activation by decode(z_edited) (ProtSAE release) instead of the error-preserving "
             "x + decode(z_edited) - decode(z)."),
    edit_scope: EditScope = typer.Option(EditScope(S.edit_scope), "--edit-scope", rich_help_panel=EDIT_PANEL,
                                   help="Tokens that get the edit: all (every residue) or designed (only the "
                                        "positions being redesigned)."),
    positions: Positions = typer.Option(Positions(S.positions), "--positions", rich_help_panel=POS_PANEL,
                                  help="masked: infill masked positions; all: no masking, redesign every residue."),
    mask_ratio: float = typer.Option(S.mask_ratio, "--mask-ratio", rich_help_panel=POS_PANEL, max=1,
                                     callback=open_ends(low=0),
                                     help="Fraction of residues to mask, in (0, 1] (at least one residue)."),
    mask_strategy: MaskStrategy = typer.Option(MaskStrategy(S.mask_strategy), "--mask-strategy", rich_help_panel=POS_PANEL,
                                      help="random, or low-activation (where the target latents' pre-activation "
                                           "is lowest on the input)."),
    decode: Decode = typer.Option(Decode(S.decode), "--decode", rich_help_panel=DEC_PANEL,
                               help="argmax (one pass), iterative (confidence-ordered unmasking), gibbs "
                                    "(blocked resampling) or sample (one pass at --temperature)."),
    iterations: int = typer.Option(S.iterations, "--iterations", rich_help_panel=DEC_PANEL, min=1,
                                   help="Forward passes for iterative and gibbs decoding."),
    temperature: float = typer.Option(S.temperature, "--temperature", rich_help_panel=DEC_PANEL, callback=open_ends(low=0),
                                      help="Softmax temperature for sample and gibbs (> 0)."),
    seed: int = typer.Option(S.seed, "--seed", rich_help_panel=DEC_PANEL,
                             help="Seed for masks, sampling and controls; same seed, same output (CPU)."),
    control: list[str] | None = typer.Option(None, "--control", metavar="LIST", rich_help_panel=CTRL_PANEL,
                                                callback=controls_callback,
                                                help="Null conditions with the same settings: random-latent and/or "
                                                     "activity-matched (repeat the option, or separate by commas)."),
    n_controls: int = typer.Option(S.n_controls, "--n-controls", rich_help_panel=CTRL_PANEL, min=1,
                                   help="Control latent sets per input and control kind."),
    pppl: bool = typer.Option(S.pppl, "--pppl/--no-pppl", rich_help_panel=CTRL_PANEL,
                              help="Compute pseudo-perplexity (one forward row per scored position)."),
    pppl_positions: PpplPositions = typer.Option(PpplPositions(S.pppl_positions), "--pppl-positions", rich_help_panel=CTRL_PANEL,
                                       help="Positions scored for pseudo-perplexity: all or designed."),
    pppl_max_positions: int | None = typer.Option(
        None, "--pppl-max-positions", rich_help_panel=CTRL_PANEL, min=0, show_default=False,
        help="Score a seeded random subset of at most this many positions per sequence (same subset for every "
             "condition); 0 = all \\[default: all on a GPU, 32 on CPU, where each position is one forward pass]."),
    device: DeviceOpt = O.device,
    threads: ThreadsOpt = None,
    progress: ProgressOpt = O.progress,
) -> None:
    """Steer ESM-2 toward a concept by editing SAE latents at the hook, and redesign proteins with it.

    Writes OUT.fasta (unsteered, steered, control sequences) and OUT.tsv (readouts per sequence).

    Example (from the repository root; a bundled membrane protein, about 30 s on 2 CPU cores):

    [bold]$ protsae steer -c "transmembrane helix" -i examples/membrane.fasta -s 0.5,1,2 --control random-latent -o out.fa[/bold]
    """
    import shlex
    import sys

    from protsae_cli.logging_setup import is_quiet
    from protsae_cli.steer.pipeline import run_steer

    controls = tuple(dict.fromkeys(control or ()))
    spec = S(
        concept=concept, strengths=cast("tuple[float, ...]", strength),  # parse_strengths (the callback) converted it
         mode=mode.value, with_ancestors=with_ancestors,
        keep_error=not replace_with_reconstruction, positions=positions.value, mask_ratio=mask_ratio,
        mask_strategy=mask_strategy.value, edit_scope=edit_scope.value, decode=decode.value, iterations=iterations,
        temperature=temperature, seed=seed, controls=controls, n_controls=n_controls, init=init.value, pppl=pppl,
        pppl_positions=pppl_positions.value, pppl_max_positions=pppl_max_positions,
    )
    opts = O(spec=spec, output=output, input=input, length=length, num=num, sae=sae, model=model,
             ontology=ontology, device=device, check_plm=check_plm, threads=threads,
             progress=progress and not is_quiet(), command="protsae " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    s = run_steer(opts)
    typer.echo(f"steered {s.sources} inputs toward {s.concept} (latents {', '.join(map(str, s.latents))}): "
               f"{s.sequences} sequences in {s.seconds:.1f} s", err=True)
    for e in s.effects:
        dp = "-" if e["delta_probability"] is None else f"{e['delta_probability']:+.4f}"
        pr = "-" if e["pppl_ratio"] is None else f"{e['pppl_ratio']:.3f}"
        typer.echo(f"  {e['condition']:<28} s={e['strength']:<6g} d_activation={e['delta_activation']:+.4f} "
                   f"d_probability={dp} pppl_ratio={pr}", err=True)
    for p in s.outputs:
        typer.echo(f"wrote {p}", err=True)
