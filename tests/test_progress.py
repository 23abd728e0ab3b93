"""The shared progress helper: periodic log lines (done/total, rate, ETA) when stderr is not a terminal, a final
line, nothing under --no-progress or -q, and a Rich bar (not log lines) on a terminal."""

from __future__ import annotations

import io
import logging

import pytest

from protsae_cli import logging_setup
from protsae_cli.progress import Progress, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def _info_level():
    logging_setup.setup_logging(stream=io.StringIO())
    yield
    logging_setup.remove_handlers()


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "protsae.progress"]


def test_log_lines_every_interval_with_rate_and_eta(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="protsae.progress")
    with Progress("annotating", 100, unit="proteins", interval=30, clock=clock, stream=io.StringIO()) as p:
        for _ in range(10):  # 10 proteins in 20 s: below the interval, no line yet
            clock.t += 2
            p.advance(1, residues=50)
        assert _lines(caplog) == []
        clock.t += 10  # 30 s since the start: one line
        p.advance(10, residues=500)
        assert _lines(caplog) == ["annotating: 20/100 proteins (20%), 0.67 proteins/s, ETA 2 min 0 s; "
                                  "1,000 residues"]
        clock.t += 29
        p.advance(1)
        assert len(_lines(caplog)) == 1  # 29 s after the last line: still one
        clock.t += 1
        p.advance(1)
        assert len(_lines(caplog)) == 2
        p.advance(78)
        clock.t += 10
    final = _lines(caplog)[-1]
    assert final == "annotating: done, 100/100 proteins (100%) in 1 min 10 s (1.4 proteins/s); 1,000 residues"


def test_unknown_total_has_no_eta(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="protsae.progress")
    with Progress("reading", None, unit="proteins", interval=5, clock=clock, stream=io.StringIO()) as p:
        clock.t += 5
        p.advance(50)
    first, final = _lines(caplog)
    assert first == "reading: 50 proteins, 10 proteins/s, 5.0 s elapsed"
    assert "ETA" not in first and "%" not in first
    assert final == "reading: done, 50 proteins in 5.0 s (10 proteins/s)"


def test_total_and_info_can_change(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="protsae.progress")
    with Progress("training", None, unit="steps", interval=0, clock=clock, stream=io.StringIO()) as p:
        clock.t += 4
        p(1, total=8, info="loss 0.5")
    assert _lines(caplog)[0] == "training: 1/8 steps (12%), 0.25 steps/s, ETA 28 s; loss 0.5"


def test_no_lines_on_error(caplog):
    caplog.set_level(logging.INFO, logger="protsae.progress")
    with pytest.raises(RuntimeError):
        with Progress("x", 3, interval=1e9, stream=io.StringIO()) as p:
            p.advance(1)
            raise RuntimeError("boom")
    assert _lines(caplog) == []  # a "done" line after a failure would be a lie


def test_disabled_and_quiet_are_silent(caplog):
    clock = FakeClock()
    caplog.set_level(logging.DEBUG, logger="protsae.progress")
    with Progress("x", 3, enabled=False, interval=0, clock=clock, stream=io.StringIO()) as p:
        clock.t += 1
        p.advance(3)
    logging_setup.setup_logging(quiet=1, stream=io.StringIO())
    with Progress("y", 3, interval=0, clock=clock, stream=io.StringIO()) as p:
        clock.t += 1
        p.advance(3)
    assert _lines(caplog) == []


def test_interval_from_environment(monkeypatch, caplog):
    monkeypatch.setenv("PROTSAE_PROGRESS_INTERVAL", "2")
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="protsae.progress")
    with Progress("x", 10, interval=None, clock=clock, stream=io.StringIO()) as p:
        assert p.interval == 2
        clock.t += 2
        p.advance(1)
    assert len(_lines(caplog)) == 2


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_bar_not_log_lines(monkeypatch, caplog):
    monkeypatch.delenv("TERM", raising=False)
    caplog.set_level(logging.INFO, logger="protsae.progress")
    out = _Tty()
    with Progress("annotating", 4, unit="proteins", interval=0, stream=out) as p:
        assert p.use_bar
        for _ in range(4):
            p.advance(1, residues=10)
    assert _lines(caplog) == []
    assert "annotating" in out.getvalue() and "4/4" in out.getvalue()


def test_format_duration():
    assert format_duration(4.24) == "4.2 s"
    assert format_duration(59.6) == "1 min 0 s"
    assert format_duration(185) == "3 min 5 s"
    assert format_duration(7830) == "2 h 10 min"
    assert format_duration(float("inf")) == "unknown"


def test_annotate_progress_on_a_fifo_has_no_precount_and_logs_without_eta(tmp_path, caplog):
    """A FIFO is not read twice for a total (it would lose the input): the counter runs without one."""
    import os

    from protsae_cli.annotate.options import count_records, progress_bar

    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    assert count_records(str(fifo)) is None  # returns at once: opening a FIFO with no writer would block
    regular = tmp_path / "in.fasta"
    regular.write_text(">a\nMK\n>b\nMKV\n")
    assert count_records(str(regular)) == 2
    caplog.set_level(logging.INFO, logger="protsae.progress")
    clock = FakeClock()
    with progress_bar(True, None) as p:
        p.clock, p.interval, p._t0, p._last = clock, 10, clock.t, clock.t
        clock.t += 10
        p.advance(1, residues=300)
    first = _lines(caplog)[0]
    assert first.startswith("annotating: 1 proteins, ") and "ETA" not in first and "300 residues" in first


def test_resumed_work_counts_but_is_not_in_the_rate(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="protsae.progress")
    with Progress("training", 100, unit="steps", interval=10, clock=clock, stream=io.StringIO()) as p:
        p.start_at(60)
        clock.t += 10
        p.advance(10)
    assert _lines(caplog)[0] == "training: 70/100 steps (70%), 1.0 steps/s, ETA 30 s"
