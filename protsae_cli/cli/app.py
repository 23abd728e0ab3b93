"""The `protsae` console script.

Import-light on purpose: torch and friends are imported inside commands, and `--version` is answered before
Typer is even imported, so pipelines can call it cheaply.
"""

from __future__ import annotations

import importlib
import sys

from protsae_cli.runtime import exit_on_signals, exit_status, leave

# (command name, module exporting `command`). Each module only imports typer/stdlib at top level.
COMMANDS: list[tuple[str, str]] = [
    ("annotate", "protsae_cli.cli.annotate"),
    ("train", "protsae_cli.cli.train"),
    ("merge", "protsae_cli.cli.merge"),
    ("steer", "protsae_cli.cli.steer"),
    ("report", "protsae_cli.cli.report"),
    ("export-structure", "protsae_cli.cli.export_structure"),
    ("export-onnx", "protsae_cli.cli.export_onnx"),
    ("eval", "protsae_cli.cli.eval"),
    ("calibrate", "protsae_cli.cli.calibrate"),
    ("label", "protsae_cli.cli.label"),
    ("models", "protsae_cli.cli.models"),
]


def build_app():
    import typer

    from protsae_cli.cli.command import ProtsaeCommand, ProtsaeGroup, root_callback

    app = typer.Typer(
        name="protsae",
        cls=ProtsaeGroup,
        help="Per-residue biological concepts from protein language models (ESM-2) via sparse autoencoders.\n\n"
             "Start with `protsae annotate proteins.fasta -o out/run`: it uses the bundled demo models when no "
             "--model/--sae is given. -v/-q/--log-file also work after the command; `protsae "
             "--install-completion` sets up tab completion for your shell.",
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
        add_completion=True,
        rich_markup_mode="rich",
    )
    app.callback()(root_callback)

    for name, module in COMMANDS:
        mod = importlib.import_module(module)
        app.command(name, help=mod.command.__doc__, cls=ProtsaeCommand)(mod.command)
    return app


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--version"]:
        from protsae_cli import __version__

        print(__version__)
        return
    app = build_app()
    exit_on_signals()
    try:
        app(args=args, prog_name="protsae", standalone_mode=True)
    except BaseException as e:  # noqa: BLE001 - every way out is mapped to one documented exit code below
        code, message, show_traceback = exit_status(e)
        if code is None:
            raise
        if show_traceback:
            import traceback

            traceback.print_exc()
        leave(code, message)
