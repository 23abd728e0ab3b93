"""#16.5: every runnable example in `protsae train|label|eval|steer|report --help` runs as printed and exits 0.

Runnable examples are the help lines that start with "$ " (they run from the repository root on the bundled
files; lines without "$ " are templates with the user's own files). They run in the order of the commands
below, because they chain: label and eval read the SAE train's example writes, report reads what its annotate line
writes. The working directory is a temporary one that sees the repository's examples/ and protsae_cli/ (the
bundled models), as the repository root does, so the tree stays clean. Stderr is not a terminal here, so each long step must also
log progress lines (#16.6).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from protsae_cli.cli.app import build_app

ROOT = Path(__file__).resolve().parents[2]
ORDER = ("train", "label", "eval", "steer", "report")
# What each example leaves behind, relative to its working directory.
PRODUCES = {"train": ["my_sae/config.json", "my_sae/sae.safetensors"],
            "label": ["my_sae_labelled/config.json", "my_sae_labelled/label_report.json"],
            "eval": ["eval.json", "eval.md", "plots"],
            "steer": ["out.fa", "out.tsv"],
            "report": ["out/run.h5", "run.html", "figures/top_concepts.png"]}


def help_examples(command: str) -> list[str]:
    res = CliRunner().invoke(build_app(), [command, "--help"], env={"COLUMNS": "400", "TERM": "dumb"})
    assert res.exit_code == 0, res.output
    lines = [ln.strip(" │") for ln in res.output.splitlines()]
    return [ln[2:].strip() for ln in lines if ln.startswith("$ ")]


def test_every_command_shows_a_runnable_example():
    for command in ORDER:
        examples = help_examples(command)
        assert examples and all(e.startswith("protsae ") for e in examples), (command, examples)
        assert any(shlex.split(e)[1] == command for e in examples), (command, examples)


def _argv(example: str) -> list[str]:
    words = shlex.split(example)
    exe = shutil.which("protsae")
    # The console script when it is installed beside this interpreter, else the same entry point by module.
    if exe and Path(exe).parent == Path(sys.executable).parent:
        return [exe, *words[1:]]
    return [sys.executable, "-m", "protsae_cli", *words[1:]]


@pytest.mark.slow
def test_help_examples_run_as_written(tmp_path):
    for name in ("examples", "protsae_cli"):  # examples may name the bundled models by their repository path
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    env = {**os.environ, "PROTSAE_PROGRESS_INTERVAL": "10", "COLUMNS": "200"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    timings = {}
    for command in ORDER:
        for example in help_examples(command):
            t0 = time.perf_counter()
            res = subprocess.run(_argv(example), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                                 stdin=subprocess.DEVNULL)
            timings[example] = time.perf_counter() - t0
            assert res.returncode == 0, f"{example}\n{res.stderr[-3000:]}"
            if shlex.split(example)[1] in ("train", "label", "eval", "steer", "annotate"):
                assert "protsae.progress:" in res.stderr and ": done, " in res.stderr, (example, res.stderr[-2000:])
        for rel in PRODUCES[command]:
            assert (tmp_path / rel).exists(), (command, rel)
    print("\n".join(f"{t:6.1f} s  {e}" for e, t in timings.items()))
