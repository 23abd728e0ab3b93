"""The `protsae` console script.

Import-light on purpose: torch and friends are imported inside commands, and `--version` is answered before
Typer is even imported, so pipelines can call it cheaply.
"""

from __future__ import annotations

import errno
import importlib
import sys

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
    _exit_on_sigterm()
    try:
        app(args=args, prog_name="protsae", standalone_mode=True)
    except BaseException as e:  # noqa: BLE001 - every way out is mapped to one documented exit code below
        code, message, show_traceback = exit_status(e)
        if code is None:
            raise
        if show_traceback:
            import traceback

            traceback.print_exc()
        _leave(code, message)


def exit_status(exc: BaseException) -> tuple[int | None, str | None, bool]:
    """(exit code, one-line message or None, print the traceback?) for an exception leaving a command.

    The one place that maps failure classes to the exit codes documented in README.md; None for a normal
    SystemExit that carries a message instead of a code (it is re-raised as it is).
    """
    from protsae_cli.errors import (EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OUTPUT,
                                    EXIT_RESOURCES, ProtsaeError)

    if isinstance(exc, _Terminated):
        return exc.code, "protsae: terminated", False
    if isinstance(exc, SystemExit):
        # Typer turns Ctrl-C into Exit(130) and a closed stdout into exit 1; its usage errors are already printed. Other codes pass through.
        if exc.code == EXIT_INTERRUPTED or isinstance(exc.__context__, KeyboardInterrupt):
            return EXIT_INTERRUPTED, "protsae: interrupted", False
        if isinstance(exc.__context__, BrokenPipeError):  # Click turns EPIPE into a bare exit 1
            return EXIT_BROKEN_PIPE, None, False
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0, None, False
        return None, None, False
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "protsae: interrupted", False
    if isinstance(exc, BrokenPipeError):  # the reader of our stdout went away (`| head`): not an error
        return EXIT_BROKEN_PIPE, None, False
    if isinstance(exc, ProtsaeError):
        return exc.exit_code, f"protsae: error: {exc}", False
    if isinstance(exc, MemoryError):
        return EXIT_RESOURCES, f"protsae: error: out of host memory ({exc})", False
    if is_out_of_memory(exc):
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        return (EXIT_RESOURCES, f"protsae: error: out of GPU memory after all fallbacks ({first}); retry with "
                "more GPU memory or a smaller --toks-per-batch", False)
    if isinstance(exc, OSError) and exc.errno in _OUTPUT_ERRNOS:
        where = f" {exc.filename}" if exc.filename else ""
        return EXIT_OUTPUT, f"protsae: error: cannot write{where}: {exc.strerror or exc}", False
    return EXIT_INTERNAL, "protsae: internal error (a bug); please report it with the traceback above", True


def _leave(code: int, message: str | None) -> None:
    """Print the message and exit; with os._exit when a worker thread is still running native code.

    A thread left inside libtorch or onnxruntime when the interpreter finalises aborts the whole process
    (`terminate called without an active exception`, exit 134) and loses the exit code; the writers' temp files
    are already removed by their abort paths by the time we get here, so skipping finalisation loses nothing.
    """
    import os
    import threading

    if message:
        try:
            print(message, file=sys.stderr)
        except (BrokenPipeError, OSError):
            pass
    if code == 141:
        _silence_stdout()
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    if others:
        import logging

        from protsae_cli.writers.atomic import remove_open_temps

        remove_open_temps()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush of a closed pipe raises nothing."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


#: errno values that mean "this output cannot be written here" (the machine's problem, not a bug).
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EFBIG,
                  errno.EDQUOT, errno.EIO}


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


class _Terminated(SystemExit):
    """SIGTERM as an exception: it unwinds through the writers' abort paths like Ctrl-C does."""


def _exit_on_sigterm() -> None:
    """Turn SIGTERM (a workflow engine cancelling the job) into SystemExit(143).

    Python's default is to die without unwinding, which would leave writers' hidden temp files behind; as an
    exception, the writers' abort paths and the atexit clean-up run and the exit status is still 128+15.
    """
    import signal

    from protsae_cli.writers.atomic import raise_or_defer

    def _handler(signum: int, frame: object) -> None:
        # Deferred while HDF5 is inside a write (writers.atomic.signals_deferred), raised right after it.
        raise_or_defer(_Terminated(128 + signum))

    def _interrupt(signum: int, frame: object) -> None:
        raise_or_defer(KeyboardInterrupt())

    try:
        signal.signal(signal.SIGTERM, _handler)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when the parent ignores it
            signal.signal(signal.SIGINT, _interrupt)
    except ValueError:  # not in the main thread (embedded use): leave the default
        pass
