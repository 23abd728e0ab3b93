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


_COMPLETION_OPTIONS = ("--show-completion", "--install-completion")


def completion_shell_named(args: list[str]) -> tuple[list[str], str | None, bool]:
    """Make `protsae --show-completion bash` (and `--install-completion bash`) use the named shell.

    Why: Typer's options are flags that detect the shell from the parent processes (shellingham) and ignore a
    named one; in a container or a job without a shell above protsae the detection fails and Typer prints
    "Shell  not supported.". A named shell (`zsh`, `--show-completion=zsh`, any case, after root options such
    as `-q`) switches Typer to its mode that takes the shell as the value. Returns the arguments to run, an
    error message (exit 2) for an unknown shell, or for none named where the detected one (if any) has no
    completion script (`sh`, `dash`: a container's usual entrypoint shell), and whether a shell was named (the
    caller then sets `_NAMED_SHELL_ENV` while Typer runs)."""
    commands = {name for name, _ in COMMANDS}
    at = next((i for i, a in enumerate(args) if a in commands or a.split("=", 1)[0] in _COMPLETION_OPTIONS), None)
    if at is None or args[at] in commands:  # a command's own arguments are not the root's completion options
        return args, None, False
    opt, eq, value = args[at].partition("=")
    if not eq and at + 1 < len(args) and not args[at + 1].startswith("-"):
        value = args[at + 1]
        rest = args[at + 2:]
    else:
        rest = args[at + 1:]
    if value:
        shell = value.lower()
        if shell not in COMPLETION_SHELLS:
            return args, f"protsae: {opt}: unknown shell {value!r}; one of {', '.join(COMPLETION_SHELLS)}", False
        return [*args[:at], opt, shell, *rest], None, True
    try:
        import shellingham

        detected = str(shellingham.detect_shell()[0]).lower()
    except Exception:  # noqa: BLE001 - ShellDetectionFailure, or shellingham missing: say how to name it
        detected = ""
    if detected in COMPLETION_SHELLS:
        return args, None, False
    why = (f"the shell running protsae is {detected!r}, which has no completion script" if detected else
           "cannot detect the shell (no shell among this process's parents, e.g. in a container)")
    return args, f"protsae: {opt}: {why}; name it: protsae {opt} {'|'.join(COMPLETION_SHELLS)}", False


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--version"]:
        from protsae_cli import __version__

        print(__version__)
        return
    import os

    args, problem, named_shell = completion_shell_named(list(args))
    if problem:
        leave(2, problem)
        return
    named_shell = named_shell and _NAMED_SHELL_ENV not in os.environ  # ours to set, and to clear afterwards
    if named_shell:
        os.environ[_NAMED_SHELL_ENV] = "1"
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
    finally:
        if named_shell:  # an in-process caller's next main() detects again
            os.environ.pop(_NAMED_SHELL_ENV, None)
