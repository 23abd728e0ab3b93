"""The `protsae` console script.

Import-light on purpose: torch and friends are imported inside commands, and `--version` is answered before
Typer is even imported, so pipelines can call it cheaply.
"""

from __future__ import annotations

import importlib
import sys

# (command name, module exporting `command`). Each module only imports typer/stdlib at top level.
COMMANDS: list[tuple[str, str]] = [
    ("annotate", "protsae_cli.cli.annotate"),
    ("train", "protsae_cli.cli.train"),
]


def build_app():
    import typer

    app = typer.Typer(
        name="protsae",
        help="Per-residue biological concepts from protein language models (ESM-2) via sparse autoencoders.\n\n"
             "Start with `protsae annotate proteins.fasta -o out/run`: it uses the bundled demo models when no "
             "--model/--sae is given.",
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
        add_completion=False,
        rich_markup_mode="rich",
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
    ) -> None:
        if version:
            from protsae_cli import __version__

            typer.echo(__version__)
            raise typer.Exit()

    for name, module in COMMANDS:
        mod = importlib.import_module(module)
        app.command(name, help=mod.command.__doc__)(mod.command)
    return app


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--version"]:
        from protsae_cli import __version__

        print(__version__)
        return
    from protsae_cli.errors import EXIT_INTERNAL, ProtsaeError

    app = build_app()
    try:
        app(args=args, prog_name="protsae")
    except ProtsaeError as e:
        print(f"protsae: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("protsae: interrupted", file=sys.stderr)
        sys.exit(130)
    except MemoryError as e:
        from protsae_cli.errors import EXIT_RESOURCES

        print(f"protsae: error: out of host memory ({e})", file=sys.stderr)
        sys.exit(EXIT_RESOURCES)
    except Exception:
        import traceback

        traceback.print_exc()
        print("protsae: internal error (a bug); please report it with the traceback above", file=sys.stderr)
        sys.exit(EXIT_INTERNAL)
