"""The `protsae` console script.

Import-light on purpose: torch and friends are imported inside commands, and `--version` is answered before
Typer is even imported, so pipelines can call it cheaply.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

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

    def _print_version(value: bool) -> None:
        # An option callback, so `protsae -q --version` answers before Click asks for a command.
        if value:
            from protsae_cli import __version__

            typer.echo(__version__)
            raise typer.Exit()

    @app.callback()
    def _root(
        version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                     callback=_print_version),
        verbose: int = typer.Option(0, "--verbose", "-v", count=True, show_default=False,
                                    help="More log detail on stderr (-v debug; -vv also other libraries)."),
        quiet: int = typer.Option(0, "--quiet", "-q", count=True, show_default=False,
                                  help="Less on stderr: -q warnings and errors only, -qq errors only."),
        log_file: Optional[str] = typer.Option(None, "--log-file", metavar="PATH",
                                               help="Also append the log (INFO and above) to this file."),
    ) -> None:
        from protsae_cli.logging_setup import setup_logging

        setup_logging(verbose=verbose, quiet=quiet, log_file=log_file)

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
    _exit_on_sigterm()
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
    except Exception as e:
        if is_out_of_memory(e):
            from protsae_cli.errors import EXIT_RESOURCES

            first = str(e).splitlines()[0] if str(e) else repr(e)
            print(f"protsae: error: out of GPU memory after all fallbacks ({first}); retry with more GPU memory "
                  "or a smaller --toks-per-batch", file=sys.stderr)
            sys.exit(EXIT_RESOURCES)
        import traceback

        traceback.print_exc()
        print("protsae: internal error (a bug); please report it with the traceback above", file=sys.stderr)
        sys.exit(EXIT_INTERNAL)


def is_out_of_memory(exc: BaseException) -> bool:
    """Device out-of-memory that escaped the per-batch fallbacks (e.g. while loading the model).

    Pipelines retry exit 140 with more resources, so these must not look like bugs (exit 1). Recognised by
    type name and message rather than `isinstance(torch.cuda.OutOfMemoryError)` so this module never imports
    torch, and so older torch versions' plain RuntimeErrors and cuBLAS/MPS variants are caught as well.
    """
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc)
        return any(s in msg for s in ("CUDA out of memory", "CUDA error: out of memory",
                                      "CUBLAS_STATUS_ALLOC_FAILED", "MPS backend out of memory",
                                      "HIP out of memory"))
    return False


def _exit_on_sigterm() -> None:
    """Turn SIGTERM (a workflow engine cancelling the job) into SystemExit(143).

    Python's default is to die without unwinding, which would leave writers' hidden temp files behind; as an
    exception, the writers' abort paths and the atexit clean-up run and the exit status is still 128+15.
    """
    import signal

    def _handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, _handler)
    except ValueError:  # not in the main thread (embedded use): leave the default
        pass
