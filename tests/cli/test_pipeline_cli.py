"""The CLI as a pipeline step sees it: exit codes, stderr-only logs, clean stdout, no prompts, SIGTERM, --devices."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator
from protsae_cli.cli.app import main
from protsae_cli.runtime import is_out_of_memory
from protsae_cli.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_MISSING_WEIGHTS, EXIT_RESOURCES, EXIT_USAGE
from protsae_cli.annotate.workers import WorkerFailed, annotate_multi, parse_devices, worker_shards

PLAIN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
PACKAGE = Path(__file__).resolve().parents[2] / "protsae_cli"


@pytest.fixture(autouse=True)
def _restore_process_state():
    """main() installs a SIGTERM handler and logging handlers; keep them from leaking into other tests."""
    handler = signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    signal.signal(signal.SIGTERM, handler)
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger("protsae").setLevel(logging.NOTSET)


def run_main(args: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(args)
        raise SystemExit(0)  # main returns normally only for the --version fast path
    return int(e.value.code or 0)


def annotate_args(tiny_esm_path, tiny_sae_dir, fasta, prefix, *extra: str) -> list[str]:
    return ["annotate", str(fasta), "--model", str(tiny_esm_path), "--sae", str(tiny_sae_dir), "--device", "cpu",
            "-o", str(prefix), *extra]


# ---------------------------------------------------------------------------------------------------------
# Exit codes
# ---------------------------------------------------------------------------------------------------------

def test_exit_codes_usage_bad_input_missing_weights(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path, torch_home,
                                                    capsys):
    assert run_main(["annotate"]) == EXIT_USAGE
    assert run_main(["annotate", str(small_fasta), "--no-such-option"]) == EXIT_USAGE

    junk = tmp_path / "junk.fa"
    junk.write_text("this is not fasta\n")
    assert run_main(annotate_args(tiny_esm_path, tiny_sae_dir, junk, tmp_path / "j")) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "junk.fa" in err and "Traceback" not in err

    # torch_home: empty cache and PROTSAE_OFFLINE=1, so a named model cannot be found or fetched.
    args = ["annotate", str(small_fasta), "--model", "esm2_t33_650M_UR50D", "--sae", str(tiny_sae_dir),
            "--device", "cpu", "-o", str(tmp_path / "w")]
    assert run_main(args) == EXIT_MISSING_WEIGHTS
    assert "esm2_t33_650M_UR50D" in capsys.readouterr().err
    assert not list(tmp_path.glob("w.*"))


@pytest.mark.parametrize("exc, code", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), EXIT_RESOURCES),
    (RuntimeError("CUDA error: out of memory"), EXIT_RESOURCES),
    (MemoryError("cannot allocate"), EXIT_RESOURCES),
    (RuntimeError("some bug"), EXIT_INTERNAL),
])
def test_out_of_memory_exits_140_and_bugs_exit_1(exc, code, small_fasta, tmp_path, monkeypatch, capsys):
    """OOM that escapes the per-batch fallbacks (e.g. while loading the model) is retryable, not a bug."""
    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(Annotator, "__init__", boom)
    assert run_main(["annotate", str(small_fasta), "-o", str(tmp_path / "o")]) == code
    err = capsys.readouterr().err
    assert ("Traceback" in err) == (code == EXIT_INTERNAL)


def test_is_out_of_memory_recognises_variants():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("CUDA out of memory"))


# ---------------------------------------------------------------------------------------------------------
# Streams and logging
# ---------------------------------------------------------------------------------------------------------

def test_logs_go_to_stderr_plain_and_quiet_silences_them(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path, capsys):
    assert run_main(annotate_args(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path / "a")) == 0
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert lines and all(PLAIN_LINE.match(line) for line in lines), err  # not a TTY: plain timestamped lines
    assert any("INFO protsae.annotate: annotated 3 proteins" in line for line in lines)

    log_file = tmp_path / "run.log"
    assert run_main(["-q", "--log-file", str(log_file),
                     *annotate_args(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path / "b")]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err == ""
    assert "annotated 3 proteins" in log_file.read_text()  # the log file keeps INFO even with -q

    assert run_main(["-v", *annotate_args(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path / "c")]) == 0
    assert logging.getLogger("protsae").getEffectiveLevel() == logging.DEBUG


def test_stdout_carries_only_data(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path, capsys):
    assert run_main(annotate_args(tiny_esm_path, tiny_sae_dir, small_fasta, "-", "--formats", "tsv")) == 0
    out, err = capsys.readouterr()
    rows = out.splitlines()
    assert rows[0].startswith("#protein_id") and len(rows) > 1
    from protsae_cli.io.writers.tsv import TSV_COLUMNS

    assert all(len(r.split("\t")) == len(TSV_COLUMNS) for r in rows)
    assert "annotated 3 proteins" in err


def test_no_prompts_anywhere():
    """A pipeline step has no terminal: nothing in the package may ask a question."""
    pattern = re.compile(r"typer\.prompt|typer\.confirm|click\.prompt|click\.confirm|confirmation_option|"
                         r"prompt\s*=\s*True|(?<![\w.])input\(")
    hits = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_sigterm_leaves_no_partial_files(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path):
    """A workflow engine cancelling the job (SIGTERM) gets exit 143 and no file that looks like an output."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "protsae_cli", *annotate_args(tiny_esm_path, tiny_sae_dir, "-",
                                                                                  out / "run")],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.stdin.write(small_fasta.read_bytes()[:20])  # part of a record: the run now waits for more input
    proc.stdin.flush()
    deadline = time.monotonic() + 90
    # The writers' temps (not the output check's short-lived write probe): the writers are open.
    while not (out.exists() and any(p.name.startswith(".run.") and ".tmp-" in p.name for p in out.iterdir())):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.stdin.close()  # lets the reader thread see EOF and stop
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    proc.stderr.close()
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# --devices
# ---------------------------------------------------------------------------------------------------------

def test_parse_devices_and_worker_shards():
    assert parse_devices("0,1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices("cuda:3") == ["cuda:3"]
    with pytest.raises(Exception, match="not a GPU ordinal"):
        parse_devices("gpu0")
    assert worker_shards(2, None) == [(1, 2), (2, 2)]
    # Inside an outer --shard 2/4, two workers split exactly the ordinals of shard 2/4.
    assert worker_shards(2, (2, 4)) == [(2, 8), (6, 8)]
    outer = {x for x in range(64) if x % 4 == 1}
    inner = {x for i, n in worker_shards(2, (2, 4)) for x in range(64) if x % n == i - 1}
    assert inner == outer


def test_devices_cpu_workers_equal_single_run(annotator_for_cli, tiny_esm_path, tiny_sae_dir, tmp_path):
    from tests.annotate.test_merge_resume import assert_same_outputs, write_fasta

    fa = write_fasta(tmp_path / "in.fasta", n=14, long_at=None)
    # One protein per batch and the same CPU thread count as this process: otherwise float reductions run in
    # another order and the last bits differ (see docs/PIPELINES.md, "What equal means").
    common = dict(input=str(fa), model=str(tiny_esm_path), sae=str(tiny_sae_dir), progress=False, skip_invalid=True,
                  toks_per_batch=1, threads=torch.get_num_threads(), command="protsae annotate (test)")
    annotator_for_cli.run(AnnotateOptions(output_prefix=str(tmp_path / "one"), device="cpu", **common))
    s = annotate_multi(AnnotateOptions(output_prefix=str(tmp_path / "two"), **common), ["cpu", "cpu"])
    assert s.proteins == 14 and s.invalid == 1
    assert_same_outputs(tmp_path / "two", tmp_path / "one")
    assert not (tmp_path / "two.devices").exists()

    bad = tmp_path / "badinput.fasta"
    bad.write_text(">x\nMKV\nnot fasta at all\n>y\nMK1\n")
    with pytest.raises(WorkerFailed) as e:
        annotate_multi(AnnotateOptions(output_prefix=str(tmp_path / "bad"), **{**common, "input": str(bad),
                                                                                 "skip_invalid": False}),
                       ["cpu"])  # one worker is enough to see its exit code come through
    assert e.value.exit_code == EXIT_BAD_INPUT
    assert not list(tmp_path.glob("bad.*"))


@pytest.fixture(scope="module")
def annotator_for_cli(tiny_esm_path, tiny_sae_dir) -> Annotator:
    return Annotator(str(tiny_esm_path), str(tiny_sae_dir), device="cpu")


def test_devices_refuses_device_too(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path):
    args = annotate_args(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path / "x", "--devices", "cpu,cpu")
    assert run_main(args) == EXIT_USAGE
    assert os.listdir(tmp_path) == ["small.fasta"]


def test_devices_resume_refuses_other_settings(tmp_path):
    """Finished workers are reused under --resume only if they were started with the same settings."""
    from protsae_cli.errors import InputError
    from protsae_cli.annotate.workers import _prepare_workdir

    work = tmp_path / "run.devices"
    opts = AnnotateOptions(input="in.fa", output_prefix=str(tmp_path / "run"), resume=True)
    _prepare_workdir(work, opts, ["cuda:0", "cuda:1"])
    (work / "worker_1.h5").write_bytes(b"finished earlier")
    _prepare_workdir(work, opts, ["cuda:0", "cuda:1"])  # same settings: kept
    assert (work / "worker_1.h5").exists()
    with pytest.raises(InputError, match="toks_per_batch"):
        _prepare_workdir(work, AnnotateOptions(input="in.fa", output_prefix=str(tmp_path / "run"), resume=True,
                                               toks_per_batch=8), ["cuda:0", "cuda:1"])
    with pytest.raises(InputError, match="number of workers"):
        _prepare_workdir(work, opts, ["cuda:0"])
    _prepare_workdir(work, AnnotateOptions(input="in.fa", output_prefix=str(tmp_path / "run")), ["cuda:0"])
    assert not (work / "worker_1.h5").exists()  # without --resume, leftovers are discarded
