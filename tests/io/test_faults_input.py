"""Inputs that can be read only once (FIFOs, /dev/stdin, process substitution) must lose nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from protsae_cli.errors import InputError
from protsae_cli.io.fasta import read_fasta

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "proteins.fasta"


def _annotate_tsv(input_arg: str, out: Path, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protsae_cli", "-q", "annotate", input_arg, "-o", str(out),
                           "--formats", "tsv", "--device", "cpu", "--backend", "torch"],
                          stdin=stdin, capture_output=True, text=True, timeout=300)


def _body(tsv: Path) -> list[str]:
    # The provenance header names the command (and so the input path); the rows must be identical.
    return [line for line in tsv.read_text().splitlines() if not line.startswith("#")]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_fifo_and_dev_stdin_give_the_same_rows_as_the_file(tmp_path: Path) -> None:
    ref = _annotate_tsv(str(EXAMPLE), tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    expected = _body(tmp_path / "ref.tsv")
    assert len({row.split("\t")[0] for row in expected}) > 5

    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    data = EXAMPLE.read_bytes()

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    via_fifo = _annotate_tsv(str(fifo), tmp_path / "fifo")
    writer.join(timeout=10)
    assert via_fifo.returncode == 0, via_fifo.stderr
    assert _body(tmp_path / "fifo.tsv") == expected

    with open(EXAMPLE, "rb") as stdin:
        via_dev = _annotate_tsv("/dev/stdin", tmp_path / "dev", stdin=stdin)
    assert via_dev.returncode == 0, via_dev.stderr
    assert _body(tmp_path / "dev.tsv") == expected


def test_progress_count_never_reads_a_fifo(tmp_path: Path) -> None:
    from protsae_cli.annotate.options import count_records

    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    # Opening a FIFO for reading would block without a writer: returning at all proves it was not opened.
    assert count_records(str(fifo)) is None
    assert count_records(str(EXAMPLE)) == 20


def test_symlink_loop_is_named(tmp_path: Path) -> None:
    loop = tmp_path / "loop.fa"
    os.symlink(loop, loop)
    with pytest.raises(InputError, match="symlink loop"):
        read_fasta(str(loop))
    with pytest.raises(InputError, match="no such file"):
        read_fasta(str(tmp_path / "missing.fa"))
