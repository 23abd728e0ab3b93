"""The Click command classes behind `protsae`: help in the shape of the tools users know, and the global
logging options accepted after the subcommand as well.

Why: Typer's own help names Python types (`<bool>` after a flag, `<int range>`, `<list[str]>`, `{fasta}` in the
usage line), which reads like a traceback, not like `samtools` or `git`. Here every parameter without an
explicit metavar gets the conventional one once, when the command is built:

- flags and counted flags (`--resume`, `-v`) show no value at all;
- choices are listed, ``[float16|float32]``;
- numbers show ``INT`` / ``FLOAT`` (their range stays beside it, ``[x>=1]``), paths ``PATH``, other text
  ``TEXT``;
- positional arguments are named by their metavar (``FASTA``), in capitals, without a type column and, in the
  usage line, without braces: ``protsae annotate [OPTIONS] FASTA``.

Commands give their own metavar where a word says more (``PREFIX``, ``DIR``, ``NAME|PATH``); the shared ones
are in `cli/options.py`.

`-v`/`-q`/`--log-file` are the root command's options; users also type them after the subcommand
(``protsae annotate x.fa -v``), so every subcommand takes them too and the two places add up (``protsae -v
annotate x.fa -v`` is ``-vv``). A number after ``-v`` (``protsae -v 2``) is the usual confusion with a valued
option: the usage error says to repeat the flag instead.

Import-light: typer and the standard library only (see app.py).
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Any, get_args, get_origin

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from protsae_cli.cli.options import LogFileOpt, QuietOpt, VerboseOpt

#: ctx.meta keys where the root callback leaves its -v/-q/--log-file for the subcommand to add to.
META_VERBOSE, META_QUIET, META_LOG_FILE = "protsae.verbose", "protsae.quiet", "protsae.log_file"

#: Function parameter names of the per-subcommand logging options (not the command's own keyword names).
_LOGGING_PARAMS = ("global_verbose", "global_quiet", "global_log_file")

_COUNT_FLAG = re.compile(r"-[vq]+|--verbose|--quiet")
_COUNT_HINT = "-v and -q take no number: repeat them instead (-vv, -qq)"
_MAX_CHOICES_WIDTH = 40  # wider choice lists go into the help text (the type column would wrap mid-word)


def _scalar_metavar(annotation: Any) -> str:
    if isinstance(annotation, type):
        if issubclass(annotation, bool):
            return ""
        if issubclass(annotation, int):
            return "INT"
        if issubclass(annotation, float):
            return "FLOAT"
        if issubclass(annotation, PurePath):
            return "PATH"
    return "TEXT"


def metavar_for(param: Any) -> str | None:
    """The conventional metavar for a parameter Typer built, or None to leave Typer's own display.

    Reads the type Typer recorded for the parameter (`type_descriptor`); a Typer without it (older releases,
    whose help already prints Click's TEXT/INTEGER) is left alone.
    """
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    desc = getattr(param, "type_descriptor", None)
    if desc is None:
        return _click_type_metavar(param)
    choices = getattr(desc, "choices", None)
    if choices:
        words = [str(getattr(c, "value", c)) for c in choices]
        listed = "[" + "|".join(words) + "]"
        if len(listed) <= _MAX_CHOICES_WIDTH:
            return listed
        # Too wide for the type column: a word there, the choices at the end of the help text.
        param.help = f"{(param.help or '').rstrip()} Choices: {', '.join(words)}.".lstrip()
        return (param.name or "value").split("_")[-1].upper()
    annotation = desc.annotation
    if get_origin(annotation) is list and len(get_args(annotation)) == 1:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is tuple:
        return " ".join(_scalar_metavar(a) for a in get_args(annotation))
    if getattr(desc, "is_path", False):
        return "PATH"
    return _scalar_metavar(annotation)


def _click_type_metavar(param: Any) -> str | None:
    """The same words from a Click parameter type (Typer releases that keep Click's types, before 0.29)."""
    t = getattr(param, "type", None)
    name = str(getattr(t, "name", "")).lower()
    choices = getattr(t, "choices", None)
    if choices:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in choices) + "]"
    for word, metavar in (("integer", "INT"), ("float", "FLOAT"), ("path", "PATH"), ("filename", "PATH"),
                          ("text", "TEXT")):
        if name.startswith(word):
            return metavar
    return None


class _Argument(TyperArgument):
    """A positional argument shown by its name alone (the name is its metavar, e.g. FASTA)."""

    def display_type_rich(self, ctx: Any) -> str | None:  # no `<str>` column beside FASTA
        return None

    def _usage_display_name(self) -> str:  # `FASTA`, `[FASTA]`, `SHARD...`: Click's usage, not `{fasta}`
        name = self.display_name_raw
        if self.nargs != 1 and not name.endswith("..."):
            name += "..."
        return name if self.required else f"[{name}]"


def _finish(params: list[Any]) -> None:
    """Give every parameter its help metavar (once; an explicit one is kept)."""
    for p in params:
        if getattr(p, "_protsae_done", False):
            continue
        p._protsae_done = True
        if isinstance(p, TyperArgument):
            if type(p) is TyperArgument:
                p.__class__ = _Argument  # same fields, two display methods differ
            if p.metavar is None:
                p.metavar = (p.name or "").upper() + ("..." if p.nargs != 1 else "")
            continue
        if p.metavar is None:
            mv = metavar_for(p)
            if mv is not None:
                p.metavar = mv


def _count_hint(exc: Exception, args: list[str]) -> None:
    """Append the -vv hint to a usage error when a number follows -v/-q on the command line."""
    if any(_COUNT_FLAG.fullmatch(a) and b.isdigit() for a, b in zip(args, args[1:], strict=False)):
        exc.message = f"{exc.message.rstrip('.')}; {_COUNT_HINT}"  # type: ignore[attr-defined]


def _logging_template(global_verbose: VerboseOpt = 0, global_quiet: QuietOpt = 0,
                      global_log_file: LogFileOpt = None) -> None:
    """Never called: Typer reads its signature to build each subcommand's copy of the logging options."""


def _logging_params() -> list[Any]:
    """Fresh -v/-q/--log-file parameters for one subcommand, built by Typer from the shared option types."""
    holder = typer.Typer(add_completion=False)
    holder.command()(_logging_template)
    return list(typer.main.get_command(holder).params)


def _print_version(value: bool) -> None:
    # An option callback, so `protsae -q --version` answers before Click asks for a command.
    if value:
        from protsae_cli import __version__

        typer.echo(__version__)
        raise typer.Exit()


def root_callback(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = 0,
    log_file: LogFileOpt = None,
) -> None:
    """The root command's options: logging is set up here, and again by a subcommand given its own."""
    from protsae_cli.logging_setup import setup_logging

    ctx.meta.update({META_VERBOSE: verbose, META_QUIET: quiet, META_LOG_FILE: log_file})
    setup_logging(verbose=verbose, quiet=quiet, log_file=log_file)


class ProtsaeCommand(TyperCommand):
    """A subcommand: conventional metavars, and the global logging options accepted after its name."""

    def __init__(self, *args: Any, params: list[Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, params=[*(params or []), *_logging_params()], **kwargs)

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        _finish(params)
        return params

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        given = list(args)
        try:
            return super().parse_args(ctx, args)
        except Exception as e:  # Click's UsageError family (it carries .message); anything else passes
            if hasattr(e, "message"):
                _count_hint(e, given)
            raise

    def invoke(self, ctx: Any) -> Any:
        verbose, quiet, log_file = (ctx.params.pop(name, None) for name in _LOGGING_PARAMS)
        verbose, quiet = verbose or 0, quiet or 0
        if verbose or quiet or log_file:
            from protsae_cli.logging_setup import setup_logging

            setup_logging(verbose=ctx.meta.get(META_VERBOSE, 0) + verbose,
                          quiet=ctx.meta.get(META_QUIET, 0) + quiet,
                          log_file=log_file or ctx.meta.get(META_LOG_FILE))
        return super().invoke(ctx)


class ProtsaeGroup(TyperGroup):
    """The root command: conventional metavars (its flags, --help and the completion options included)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        _finish(params)
        return params

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except Exception as e:
            if hasattr(e, "message") and args and args[0].isdigit():
                e.message = f"{e.message.rstrip('.')}; {_COUNT_HINT}"
            raise
