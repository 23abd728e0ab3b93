"""Signals and a closed stdout end a run with the documented code and message, never a C++ abort.

Before the fix, SIGINT/SIGTERM while ESM-2 ran in the annotate worker thread ended in `terminate called without
an active exception` (exit 134): the interpreter shut down with that thread still inside libtorch.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "proteins.fasta"


def _big_fasta(path: Path, copies: int = 15) -> Path:
    text = EXAMPLE.read_text()
    with open(path, "w") as f:
        n = 0
        for _ in range(copies):
            for line in text.splitlines():
                if line.startswith(">"):
                    n += 1
                    line = f">p{n}"
                f.write(line + "\n")
    return path


def _start(tmp_path: Path, *extra: str) -> subprocess.Popen:
    fasta = _big_fasta(tmp_path / "big.fa")
    return subprocess.Popen([sys.executable, "-m", "protsae_cli", "annotate", str(fasta), "-o",
                             str(tmp_path / "out" / "run"), "--device", "cpu", "--threads", "1", *extra],
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _wait_until_computing(p: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    # The writers create their temp files right before the first batch runs.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.exists() and any(out.iterdir()):
            time.sleep(1.0)  # well inside the model's forward passes
            return
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        time.sleep(0.1)
    pytest.fail("annotate never started writing")


@pytest.mark.parametrize(("signum", "code", "message"), [(signal.SIGINT, 130, "protsae: interrupted"),
                                                         (signal.SIGTERM, 143, "protsae: terminated")])
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_signal_mid_run(tmp_path: Path, signum: int, code: int, message: str, backend: str) -> None:
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    p = _start(tmp_path, "--backend", backend)
    _wait_until_computing(p, tmp_path / "out")
    p.send_signal(signum)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert message in err
    assert "terminate called" not in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == [], "temp or partial outputs left behind"


def test_closed_stdout_is_quiet(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-m", "protsae_cli", "annotate", str(EXAMPLE), "-o", "-", "--formats",
                          "tsv", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    assert p.stdout is not None
    p.stdout.readline()
    p.stdout.close()  # what `| head -1` does
    err = p.stderr.read() if p.stderr else ""
    p.wait(timeout=120)
    assert p.returncode in (0, 141), err
    assert "Traceback" not in err and "error" not in err.lower()
