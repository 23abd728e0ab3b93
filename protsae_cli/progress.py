"""Progress for long work, the same in every command: a bar on a terminal, log lines everywhere else.

Why both: on a terminal a Rich bar redraws in place; in a pipeline stderr is a log file (`2> {log}`,
`.command.err`), where a bar is either invisible or thousands of carriage-return frames. There the user
still needs to know the job is alive and when it ends, so the same counter is written as a plain INFO line
through `logging` every `interval` seconds (30 by default) and once at the end, with done/total, rate and ETA:

    2026-12-07 13:05:01 INFO protsae.progress: annotating: 1,200/5,000 proteins (24%), 40.0 proteins/s,
    ETA 1 min 35 s; 310,112 residues

Off when the caller says so (`--no-progress`) and under `-q` (`logging_setup.is_quiet`). A total is optional:
callers that cannot count without consuming their input (a FIFO, stdin, gzip) pass None and get done and
rate, no ETA. `PROTSAE_PROGRESS_INTERVAL` (seconds) overrides the log interval, e.g. for short CI jobs.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, TextIO
from collections.abc import Callable

log = logging.getLogger("protsae.progress")

#: Seconds between progress log lines when stderr is not a terminal.
DEFAULT_INTERVAL = 30.0
INTERVAL_ENV = "PROTSAE_PROGRESS_INTERVAL"


def format_duration(seconds: float) -> str:
    """'4.2 s', '3 min 5 s', '2 h 10 min': a human reading a log line wants magnitude, not decimals."""
    if not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {(s % 3600) // 60} min"


def _count(n: float) -> str:
    return f"{int(n):,}" if float(n).is_integer() else f"{n:,.1f}"


def _rate(per_second: float, unit: str) -> str:
    if per_second >= 10:
        return f"{per_second:,.0f} {unit}/s"
    if per_second >= 1:
        return f"{per_second:.1f} {unit}/s"
    if per_second >= 0.1:
        return f"{per_second:.2f} {unit}/s"
    return f"{per_second * 60:.2g} {unit}/min"


def interactive(stream: TextIO) -> bool:
    """A terminal that can redraw (not `TERM=dumb`, not a pipe or file)."""
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _interval_from_env(default: float) -> float:
    raw = os.environ.get(INTERVAL_ENV)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        log.warning("ignoring %s=%r (not a number of seconds)", INTERVAL_ENV, raw)
        return default
    return max(value, 0.0)


class Progress:
    """Context manager counting units of work; see the module docstring for what it shows where.

    `advance(n, total=, info=, **counters)`: `n` units done; `total` may change (e.g. when the trainer knows its
    step count); `info` is a short status (the latest loss) shown after the numbers; counters (e.g.
    ``residues=312``) are running sums shown beside the count.
    """

    def __init__(self, label: str, total: int | None = None, *, unit: str = "items", enabled: bool = True,
                 interval: float | None = None, logger: logging.Logger | None = None,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 bar: bool | None = None) -> None:
        from protsae_cli.logging_setup import is_quiet

        self.label, self.total, self.unit = label, total, unit
        self.enabled = bool(enabled) and not is_quiet()
        self.interval = _interval_from_env(DEFAULT_INTERVAL) if interval is None else interval
        self.log = logger or log
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.use_bar = self.enabled and (interactive(self.stream) if bar is None else bar)
        self.done = 0.0
        self._base = 0.0  # work done before this run (a resumed job): counted in done, not in the rate
        self.counters: dict[str, float] = {}
        self.info: str | None = None
        self._p: Any = None  # a rich.progress.Progress while the bar runs (rich is imported lazily)
        self._t0 = self._last = 0.0

    # -- context ------------------------------------------------------------------------------------------------
    def __enter__(self) -> Progress:
        self._t0 = self._last = self.clock()
        if self.use_bar:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._p = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                   TextColumn("{task.fields[extra]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                   console=Console(file=self.stream), transient=False)
            self._p.start()
            self._task = self._p.add_task(self.label, total=self.total, extra="")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
        elif self.enabled and exc_type is None:
            self.log.info("%s", self.line(final=True))

    def __call__(self, n: float = 1, total: int | None = None, info: str | None = None, **counters: float
                 ) -> None:
        """Same as `advance`, so the object itself can be handed to code that takes a progress callback."""
        self.advance(n, total=total, info=info, **counters)

    def start_at(self, done: float) -> None:
        """Work already done before this run (resumed training): shown in the count, left out of the rate."""
        self.done = self._base = float(done)
        if self._p is not None:
            self._p.update(self._task, completed=self.done)

    def advance(self, n: float = 1, *, total: int | None = None, info: str | None = None,
                **counters: float) -> None:
        if not self.enabled:
            return
        self.done += n
        if total:
            self.total = total
        if info is not None:
            self.info = info
        for k, v in counters.items():
            self.counters[k] = self.counters.get(k, 0) + v
        if self._p is not None:
            desc = f"{self.label} {self.info}" if self.info else self.label
            self._p.update(self._task, completed=self.done, total=self.total, description=desc,
                           extra=self._counters_text())
            return
        now = self.clock()
        if now - self._last >= self.interval and not (self.total and self.done >= self.total):  # the end has its line
            self._last = now
            self.log.info("%s", self.line())

    # -- text -----------------------------------------------------------------------------------------------------
    def _counters_text(self) -> str:
        return ", ".join(f"{_count(v)} {k}" for k, v in self.counters.items())

    def line(self, final: bool = False) -> str:
        """The log line: done/total (percent), rate, ETA (or elapsed at the end), counters, info."""
        elapsed = max(self.clock() - self._t0, 0.0)
        rate = (self.done - self._base) / elapsed if elapsed > 0 else 0.0
        count = f"{_count(self.done)}/{_count(self.total)}" if self.total else _count(self.done)
        parts = [f"{count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        if final:
            text = f"{self.label}: done, {parts[0]} in {format_duration(elapsed)}"
            if elapsed > 0 and self.done > self._base:
                text += f" ({_rate(rate, self.unit)})"
        else:
            if elapsed > 0:
                parts.append(_rate(rate, self.unit))
            if self.total and rate > 0:
                parts.append(f"ETA {format_duration(max(self.total - self.done, 0) / rate)}")
            elif not self.total:
                parts.append(f"{format_duration(elapsed)} elapsed")
            text = f"{self.label}: " + ", ".join(parts)
        extra = self._counters_text()
        if extra:
            text += f"; {extra}"
        if self.info:
            text += f"; {self.info}"
        return text


def progress(label: str, total: int | None = None, *, unit: str = "items", enabled: bool = True,
             **kwargs) -> Progress:
    """`with progress("training", total=steps, unit="steps") as p: ... p.advance()` (see `Progress`)."""
    return Progress(label, total, unit=unit, enabled=enabled, **kwargs)
