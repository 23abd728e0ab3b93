"""`protsae models`: what models are on this machine and what pairs with what."""

from __future__ import annotations

from pathlib import Path

import typer


def command(
    models_dir: Path | None = typer.Option(None, "--dir", metavar="DIR", show_default=False,
                                              help="Also list the models under DIR (protsae PLM/SAE folders, HF "
                                                   "ESM-2 folders, fair-esm .pt files, published SAEs). "
                                                   "Default: $PROTSAE_MODELS when set."),
    checksums: bool = typer.Option(False, "--checksums",
                                   help="Hash every weight file (sha256). Without it only files up to 64 MiB are "
                                        "hashed: a 2.5 GB ESM-2 650M file takes seconds. HF cache files show "
                                        "the hub's sha256 from their blob name either way."),
    as_json: bool = typer.Option(False, "--json", help="One JSON list on stdout (full checksums), for scripts."),
) -> None:
    """List the models found locally: bundled, torch hub cache (fair-esm .pt), Hugging Face cache (ESM-2
    snapshots) and a models directory, with size, sha256, and for SAEs the PLM and layer they pair with.

    Nothing is loaded to list it: a fair-esm .pt (a pickle) is described by its file name and size only.

    Example: [bold]protsae models --dir ~/models --checksums[/bold]
    """
    from protsae_cli.models.catalog import (
        list_models,
        models_dir_from_env,
        to_json,
        to_table,
    )

    entries = list_models(models_dir or models_dir_from_env(), checksums=checksums)
    typer.echo(to_json(entries) if as_json else to_table(entries), nl=False)
