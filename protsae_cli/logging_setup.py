"""Logging for the CLI: messages to stderr (data never), terse on a terminal, timestamped in pipelines.

Workflow engines capture stderr into per-job log files (`2> {log}` in Snakemake, `.command.err` in
Nextflow), so every line there should say when and from where it came: the plain format carries a timestamp,
level and logger name. On an interactive terminal a Rich handler is nicer to read. The level is chosen once,
from `-v`/`-q`, by the root command's callback; library code only ever calls `logging.getLogger("protsae...")`.

Only the `protsae` logger follows `-v`/`-q` at INFO/DEBUG; third-party libraries stay at WARNING unless `-vv`,
because their INFO chatter (h5py, urllib3, snakemake) is not what a protsae user asked to see.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_protsae_handler"  # set on handlers we install, so reconfiguring replaces them instead of stacking

_level = logging.INFO


def level_for(verbose: int = 0, quiet: int = 0) -> int:
    """-q: warnings and errors only; -qq: errors only; -v: debug; the default is INFO (progress summaries)."""
    if quiet >= 2:
        return logging.ERROR
    if quiet == 1:
        return logging.WARNING
    if verbose >= 1:
        return logging.DEBUG
    return logging.INFO


def remove_handlers() -> None:
    """Take off (and close) the handlers `setup_logging` installed; other handlers stay."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _MARK, False):
            root.removeHandler(h)
            if isinstance(h, logging.FileHandler):
                h.close()


def setup_logging(verbose: int = 0, quiet: int = 0, log_file: str | None = None,
                  stream: TextIO | None = None) -> int:
    """Install the stderr handler (and optionally a file handler) and return the chosen level.

    Safe to call more than once (tests invoke the CLI repeatedly in one process): handlers installed by an
    earlier call are removed first, so messages are never duplicated and never written to a stale stream.
    The log file always receives INFO and above, even with `-q`, so a quiet pipeline still keeps a full record.
    """
    global _level
    level = level_for(verbose, quiet)
    _level = level
    stream = stream if stream is not None else sys.stderr
    remove_handlers()
    root = logging.getLogger()

    console: logging.Handler
    if _interactive(stream):
        from rich.console import Console
        from rich.logging import RichHandler

        console = RichHandler(console=Console(file=stream), show_path=False, rich_tracebacks=False,
                              log_time_format="%H:%M:%S")
        console.setFormatter(logging.Formatter("%(message)s"))
    else:
        console = logging.StreamHandler(stream)
        console.setFormatter(logging.Formatter(PLAIN_FORMAT))
    console.setLevel(level)
    setattr(console, _MARK, True)
    root.addHandler(console)

    file_level = min(level, logging.INFO)
    if log_file:
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter(PLAIN_FORMAT))
        fh.setLevel(file_level)
        setattr(fh, _MARK, True)
        root.addHandler(fh)

    # Handlers filter by their own level; the loggers must let through the most verbose of them.
    logging.getLogger("protsae").setLevel(min(level, file_level) if log_file else level)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    logging.captureWarnings(True)  # e.g. the HDF5 writer's float16 overflow warning lands in the log too
    return level


def current_level() -> int:
    """The console level chosen by the last `setup_logging` call (INFO before any)."""
    return _level


def is_quiet() -> bool:
    """True under `-q`: commands then also drop their progress bars and summaries."""
    return _level > logging.INFO


def _interactive(stream: TextIO) -> bool:
    """Rich output only for a real terminal; `TERM=dumb` and pipes (CI, workflow logs) get plain lines."""
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
