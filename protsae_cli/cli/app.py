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


#: The shells Typer writes completion scripts for (typer's `Shells`).
COMPLETION_SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")
#: Typer reads this to take the shell as the option's value instead of detecting it (its no-detection mode).
_NAMED_SHELL_ENV = "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION"


def completion_shell_named(args: list[str]) -> str | None:
    """Make `protsae --show-completion bash` (and `--install-completion bash`) use the named shell.

    Why: Typer's options are flags that detect the shell from the parent processes (shellingham) and ignore a
    named one; in a container or a job without a shell above protsae the detection fails and Typer prints
    "Shell  not supported.". A named shell switches Typer to its mode that takes the shell as the value.
    Returns an error message (exit 2) when no shell is named and none can be detected, else None."""
    import os

    if args[:1] not in (["--show-completion"], ["--install-completion"]):
        return None
    if len(args) > 1 and args[1] in COMPLETION_SHELLS:
        os.environ[_NAMED_SHELL_ENV] = "1"
        return None
    if len(args) > 1 and not args[1].startswith("-"):
        return f"protsae: {args[0]}: unknown shell {args[1]!r}; one of {', '.join(COMPLETION_SHELLS)}"
    try:
        import shellingham

        shellingham.detect_shell()
    except Exception:  # noqa: BLE001 - ShellDetectionFailure, or shellingham missing: say how to name it
        return (f"protsae: {args[0]}: cannot detect the shell (no shell among this process's parents, e.g. in a "
                f"container); name it: protsae {args[0]} {'|'.join(COMPLETION_SHELLS)}")
    return None


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--version"]:
        from protsae_cli import __version__

        print(__version__)
        return
    problem = completion_shell_named(args)
    if problem:
        leave(2, problem)
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
