"""Issue #12 items 6-7: resume that can be relied on, and `--devices` workers that die with their parent.

Everything here runs the real CLI in subprocesses and damages or kills it for real: a flipped byte in a finished
part, temp files of dead and live processes next to the outputs, `kill -9` and SIGTERM of the orchestrator.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator
from protsae_cli.plm.batching import chunked_records
from protsae_cli.io.fasta import read_fasta
from protsae_cli.annotate.resume import temp_owner
from protsae_cli.io.atomic import atomic_path
from tests.annotate.test_merge_resume import gff3_without_command, h5_content

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "proteins.fasta"
CLI = [sys.executable, "-m", "protsae_cli", "annotate"]


def _cli(tiny_esm_path: Path, tiny_sae_dir: Path, *args: str) -> list[str]:
    return [*CLI, *args, "--model", str(tiny_esm_path), "--sae", str(tiny_sae_dir), "--no-progress"]


def _wait_for(what: str, cond, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _dead_pid() -> int:
    """The pid of a process that has certainly exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _running(pid: int) -> bool:
    """True while /proc shows the pid as a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ---------------------------------------------------------------------------------------------------------
# 6. Resume: checksummed parts, --chunk-residues, stale temps
# ---------------------------------------------------------------------------------------------------------

def _flip_data_byte(part: Path) -> None:
    """Flip one byte inside the codes' data block: the file still opens and its protein table still matches."""
    with h5py.File(part, "r") as f:
        info = f["codes/data"].id.get_chunk_info(0)
    at = info.byte_offset + info.size // 2
    with open(part, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x5A]))


def test_corrupt_part_is_recomputed_and_chunk_residues_splits(tiny_esm_path, tiny_sae_dir, tmp_path):
    chunk = 1500
    records = list(read_fasta(str(EXAMPLES)))
    n_chunks = len(list(chunked_records(records, chunk, 4096)))
    # With the pipe held open the parser cannot yet return the last record, and the chunk before it cannot
    # close before it has seen that record: these many chunks are finished when the run waits for more input.
    done = len(list(chunked_records(records[:-1], chunk, 4096))) - 1
    assert n_chunks >= 4 and done >= 3
    prefix = tmp_path / "out" / "run"
    parts = Path(f"{prefix}.parts")
    common = ["--device", "cpu", "--chunk-residues", str(chunk)]
    # Input through a pipe held open, so the kill lands at a known point.
    proc = subprocess.Popen(_cli(tiny_esm_path, tiny_sae_dir, "-", "-o", str(prefix), "--resume", *common),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(EXAMPLES.read_bytes())
        proc.stdin.flush()
        _wait_for(f"{done} checksummed parts", lambda: len(list(parts.glob("chunk_*.h5.sha256"))) == done, proc)
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stderr.close()
    names = sorted(p.name for p in parts.glob("chunk_*.h5"))
    assert names == [f"chunk_{i:06d}.h5" for i in range(done)]  # --chunk-residues made several parts
    assert not prefix.with_suffix(".tsv").exists()

    damaged = parts / "chunk_000001.h5"
    _flip_data_byte(damaged)
    r = subprocess.run(_cli(tiny_esm_path, tiny_sae_dir, str(EXAMPLES), "-o", str(prefix), "--resume", *common),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "WARNING" in line and "recomputing" in line]
    assert len(warnings) == 1 and str(damaged) in warnings[0] and "SHA-256" in warnings[0], r.stderr
    assert not parts.exists()

    clean = tmp_path / "clean"  # in-process (saves a process start): the same code path as the CLI's
    Annotator(str(tiny_esm_path), str(tiny_sae_dir), device="cpu").run(AnnotateOptions(
        input=str(EXAMPLES), output_prefix=str(clean), model=str(tiny_esm_path), sae=str(tiny_sae_dir),
        device="cpu", progress=False, chunk_residues=chunk))
    assert Path(f"{prefix}.tsv").read_bytes() == Path(f"{clean}.tsv").read_bytes()
    assert h5_content(Path(f"{prefix}.h5")) == h5_content(Path(f"{clean}.h5"))
    assert gff3_without_command(Path(f"{prefix}.gff3")) == gff3_without_command(Path(f"{clean}.gff3"))


def test_temp_names_parse_back_to_their_writer():
    """remove_stale_temps reads the pid out of atomic_path's names; the two must not drift apart."""
    assert temp_owner(atomic_path("/x/out/run.h5")) == ("run.h5", os.getpid())
    assert temp_owner(".manifest.json.tmp-123") == ("manifest.json", 123)
    assert temp_owner("run.h5") is None and temp_owner(".run.h5.tmp-abc-12") is None


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tiny_esm_path, tiny_sae_dir, tmp_path):
    prefix = tmp_path / "run"
    dead, live = _dead_pid(), os.getpid()
    stale = [tmp_path / f".run.{ext}.tmp-{dead}-0badf00d" for ext in ("h5", "tsv", "gff3")]
    kept = [tmp_path / f".run.h5.tmp-{live}-1234abcd",          # a writer that is still running
            tmp_path / f".other.tsv.tmp-{dead}-1234abcd",       # another prefix's: not ours to judge
            tmp_path / f".run.x.tsv.tmp-{dead}-1234abcd"]       # prefix run.x, not run
    for p in stale + kept:
        p.write_bytes(b"partial")
    r = subprocess.run(_cli(tiny_esm_path, tiny_sae_dir, str(EXAMPLES), "-o", str(prefix), "--device", "cpu",
                            "--resume", "--formats", "tsv"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in stale if p.exists()] == []
    assert [p.name for p in kept if not p.exists()] == []
    assert Path(f"{prefix}.tsv").exists()


# ---------------------------------------------------------------------------------------------------------
# 7. --devices workers die with their parent
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture()
def long_fasta(tmp_path) -> Path:
    """Far more work than the tests wait for (~1M residues: minutes for two tiny-model CPU workers)."""
    text = EXAMPLES.read_text()
    path = tmp_path / "long.fasta"
    with open(path, "w") as f:
        for i in range(130):
            f.write(text.replace(">", f">r{i}_"))
    return path


def _start_workers(tiny_esm_path, tiny_sae_dir, fasta: Path, prefix: Path, *extra: str):
    """Start `--devices cpu,cpu` and wait until both workers are mid-run (their temp outputs exist)."""
    work = Path(f"{prefix}.devices")
    cmd = _cli(tiny_esm_path, tiny_sae_dir, str(fasta), "-o", str(prefix), "--devices", "cpu,cpu", "--threads", "1",
               "--toks-per-batch", "1024", *extra)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)

    def temps() -> list[Path]:
        return [p for p in work.rglob(".*.tmp-*")] if work.exists() else []

    _wait_for("both workers to start writing",
              lambda: len({temp_owner(p)[1] for p in temps() if temp_owner(p)}) == 2, proc, timeout=90)
    pids = {temp_owner(p)[1] for p in temps() if temp_owner(p)}
    assert os.getpid() not in pids and proc.pid not in pids
    return proc, pids, work, temps


def _assert_gone(pids: set[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_running(p) for p in pids):
        if time.monotonic() > deadline:
            alive = [p for p in pids if _running(p)]
            for p in alive:  # do not leave them burning the CPU for the rest of the suite
                os.kill(p, signal.SIGKILL)
            pytest.fail(f"workers {alive} still running {timeout:.0f} s after their parent was stopped")
        time.sleep(0.05)


def test_workers_die_when_the_parent_is_killed_9(tiny_esm_path, tiny_sae_dir, long_fasta, tmp_path):
    prefix = tmp_path / "run"
    proc, pids, work, temps = _start_workers(tiny_esm_path, tiny_sae_dir, long_fasta, prefix)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    _assert_gone(pids)
    assert temps() == []  # the workers' SIGTERM exit removed their temp outputs
    assert not any(Path(f"{prefix}.{ext}").exists() for ext in ("h5", "tsv", "gff3"))


def test_sigterm_to_the_parent_ends_the_workers(tiny_esm_path, tiny_sae_dir, long_fasta, tmp_path):
    """SIGTERM to the parent alone (a workflow engine cancelling the job); SIGINT takes the same path."""
    prefix = tmp_path / "run"
    proc, pids, work, temps = _start_workers(tiny_esm_path, tiny_sae_dir, long_fasta, prefix, "--resume")
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    finally:
        proc.stderr.close()
    assert proc.returncode == 143
    _assert_gone(pids, timeout=2)
    assert temps() == []  # --resume keeps the worker directory, but no temp file in it
    assert work.exists()
    assert not any(Path(f"{prefix}.{ext}").exists() for ext in ("h5", "tsv", "gff3"))
