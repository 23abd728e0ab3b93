"""`protsae train`: options in, one library call."""

from __future__ import annotations

from typing import Optional

import typer

DATA, MODEL, SAE, OPT = "Data", "Language model", "SAE", "Optimisation"


def command(
    fasta: str = typer.Argument(..., help="Training proteins (FASTA, .gz or -).", show_default=False),
    output: str = typer.Option(..., "--output", "-o", help="Output SAE directory.", show_default=False),
    model: Optional[str] = typer.Option(None, "--model", "-m", rich_help_panel=MODEL,
                                        help="ESM-2 fair-esm name or checkpoint path (default: bundled stand-in)."),
    layer: int = typer.Option(4, "--layer", "-l", rich_help_panel=MODEL,
                              help="1-based transformer block to hook (fair-esm repr_layers index)."),
    hook: str = typer.Option("resid_post", "--hook", rich_help_panel=MODEL,
                             help="resid_post (block output) or attn_out (after the attention residual add)."),
    arch: str = typer.Option("topk", "--arch", rich_help_panel=SAE, help="topk (ProtSAE: see --help of later "
                             "versions)."),
    d_sae: int = typer.Option(4096, "--d-sae", rich_help_panel=SAE, help="Number of latents."),
    k: int = typer.Option(32, "--k", rich_help_panel=SAE, help="Active latents per residue (TopK)."),
    tokens_per_protein: int = typer.Option(64, "--tokens-per-protein", rich_help_panel=DATA,
                                           help="Residues sampled per protein (0 = all)."),
    max_proteins: Optional[int] = typer.Option(None, "--max-proteins", rich_help_panel=DATA,
                                               help="Use a seeded random subset of this many proteins."),
    val_fraction: float = typer.Option(0.05, "--val-fraction", rich_help_panel=DATA,
                                       help="Fraction of proteins held out for validation metrics."),
    activation_cache: Optional[str] = typer.Option(None, "--activation-cache", rich_help_panel=DATA,
                                                   help="Directory to save activation shards to, or reuse them from."),
    epochs: int = typer.Option(5, "--epochs", rich_help_panel=OPT),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", rich_help_panel=OPT,
                                            help="Stop after this many steps (the cosine schedule spans them)."),
    batch_size: int = typer.Option(4096, "--batch-size", rich_help_panel=OPT, help="Tokens per step."),
    lr: float = typer.Option(4e-4, "--lr", rich_help_panel=OPT),
    auxk_alpha: float = typer.Option(1 / 32, "--auxk-alpha", rich_help_panel=OPT, help="Weight of the AuxK loss."),
    seed: int = typer.Option(0, "--seed", rich_help_panel=OPT),
    device: str = typer.Option("auto", "--device", rich_help_panel=OPT, help="auto, cpu, cuda or cuda:N."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr (terminal only)."),
) -> None:
    """Train a TopK sparse autoencoder on ESM-2 activations of a FASTA.

    Example: [bold]protsae train proteins.fasta --layer 4 --d-sae 4096 --k 32 -o my_sae[/bold]
    """
    from protsae_cli.train import TrainOptions, train_sae
    from protsae_cli.train_topk import TrainConfig

    opts = TrainOptions(
        fasta=fasta, output=output, model=model, layer=layer, hook=hook, arch=arch, d_sae=d_sae, k=k,
        tokens_per_protein=tokens_per_protein or None, max_proteins=max_proteins, val_fraction=val_fraction,
        activation_cache=activation_cache, device=device, progress=progress,
        train=TrainConfig(d_sae=d_sae, k=k, lr=lr, batch_size=batch_size, epochs=epochs, max_steps=max_steps,
                          auxk_alpha=auxk_alpha, seed=seed),
    )
    out = train_sae(opts)
    typer.echo(f"wrote {out}", err=True)
