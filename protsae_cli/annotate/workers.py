"""`annotate --devices 0,1,2,3`: one worker process per GPU on one node, each on a shard, merged at the end.

Processes, not threads or DDP: annotation is embarrassingly parallel, each GPU needs its own copy of the model
anyway, and separate processes keep CUDA contexts, OOM failures and crashes apart. Each worker sees only its own
GPU (`CUDA_VISIBLE_DEVICES`), so nothing it does (a stray allocation on "cuda:0", a library probing devices) can
touch another worker's memory. Workers split the input with the same ordinal rule as `--shard i/n`, so the
merged result equals a single-process run's; under an outer `--shard i/n` (a cluster job that itself has several
GPUs) worker j takes the ordinals of `i/n` that are also `(i + n*j)/(n*m)`.

Worker state lives in `PREFIX.devices/` (options, shard outputs); it is removed after the merge. With
`--resume` each worker checkpoints its chunks there, and workers that had finished are not started again.

A worker is `python -m protsae_cli.annotate.workers SPEC.json`: the full `AnnotateOptions` travel as JSON rather than
being rebuilt as command-line flags, so options without a flag (chunk limits, compression) reach the workers
unchanged.

Workers never outlive the orchestrator. SIGTERM or Ctrl-C to it stops the workers (SIGTERM, then SIGKILL after
10 s) and their temp outputs are removed by their own abort paths. If the orchestrator itself is killed
(``kill -9``, OOM killer), a worker learns it from the kernel: on Linux each worker asks for SIGTERM when its
parent dies (``prctl(PR_SET_PDEATHSIG)``) and then checks that the parent is still the one that started it, which
closes the window in which the parent died before the request was made; elsewhere a watchdog thread polls
``getppid()``. Either way the worker goes through its normal SIGTERM exit, so it stops at the next batch and
leaves no temp files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from collections.abc import Sequence

from protsae_cli.errors import EXIT_INTERNAL, EXIT_RESOURCES, InputError, ProtsaeError

if TYPE_CHECKING:
    from protsae_cli.annotate.options import AnnotateOptions, AnnotateSummary

log = logging.getLogger("protsae.multigpu")

SPEC_FORMAT = "protsae-worker-spec"
WORKER_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the parent adds time and worker name
_LEVEL_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$")
# Options that do not change what a worker computes; everything else must match to reuse finished workers.
_NOT_FINGERPRINTED = {"formats", "progress", "threads", "command", "compression", "device", "resume", "input",
                      "output_prefix"}


class WorkerFailed(ProtsaeError):
    """A worker exited non-zero; the orchestrator exits with the worker's code so retry logic still works."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def parse_devices(spec: str) -> list[str]:
    """'0,1' -> ['cuda:0', 'cuda:1']; 'all' -> every visible GPU; 'cpu,cpu' -> two CPU workers."""
    spec = spec.strip()
    if spec == "all":
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise InputError("--devices all: no CUDA GPU is visible (use --devices cpu,cpu for CPU workers)")
        return [f"cuda:{i}" for i in range(n)]
    out = []
    for item in (x.strip() for x in spec.split(",")):
        if re.fullmatch(r"\d+", item):
            out.append(f"cuda:{item}")
        elif re.fullmatch(r"cuda:\d+", item) or item == "cpu":
            out.append(item)
        else:
            raise InputError(f"--devices: {item!r} is not a GPU ordinal (0, 1, ...), cuda:N or cpu")
    if not out:
        raise InputError("--devices: no devices given")
    return out


def _is_regular_file(path: str) -> bool:
    from protsae_cli.io.fasta import read_fasta

    read_fasta(path)  # raises InputError naming the path (missing, symlink loop, directory, ...)
    return stat.S_ISREG(os.stat(path).st_mode)


def worker_shards(n_workers: int, outer: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The `--shard` of each worker: a partition of the outer shard (or of everything) by ordinal."""
    i, n = outer if outer else (1, 1)
    return [((i - 1) + n * j + 1, n * n_workers) for j in range(n_workers)]


def _worker_env(device: str) -> tuple[dict[str, str], str]:
    """Environment and --device for one worker: a GPU worker sees exactly one GPU, as its cuda:0."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if not device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU worker must not grab GPU memory either
        return env, device
    ordinal = int(device.split(":")[1])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if ordinal >= len(entries):
            raise InputError(f"--devices: GPU {ordinal} is not visible (CUDA_VISIBLE_DEVICES={visible})")
        env["CUDA_VISIBLE_DEVICES"] = entries[ordinal]
    else:
        env["CUDA_VISIBLE_DEVICES"] = str(ordinal)
    return env, "cuda:0"


def _fingerprint(opts: AnnotateOptions) -> dict[str, Any]:
    d = dataclasses.asdict(opts)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(d.items()) if k not in _NOT_FINGERPRINTED}


def _prepare_workdir(work: Path, opts: AnnotateOptions, devices: Sequence[str]) -> None:
    """Create or (with --resume) reuse the worker directory, refusing reuse under other settings."""
    fp: dict[str, Any] = {"options": _fingerprint(opts), "workers": len(devices)}
    manifest = work / "manifest.json"
    if work.exists() and not opts.resume:
        shutil.rmtree(work)  # leftovers of an interrupted run without --resume: nothing to reuse
    if opts.resume and manifest.exists():
        old = json.loads(manifest.read_text())
        if old != fp:
            keys = sorted(k for k in set(old.get("options", {})) | set(fp["options"])
                          if old.get("options", {}).get(k) != fp["options"].get(k))
            what = ", ".join(keys) or "number of workers"
            raise InputError(f"{work} holds workers started with other settings ({what}); rerun with the original "
                             f"settings and devices to resume, or delete {work} to start over")
        return
    work.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(fp, indent=1, sort_keys=True) + "\n")


def annotate_multi(opts: AnnotateOptions, devices: Sequence[str]) -> AnnotateSummary:
    """Annotate with one worker process per device and merge their shards into `opts.output_prefix`."""
    from protsae_cli.annotate.options import AnnotateSummary, tally
    from protsae_cli.io.writers import output_paths
    from protsae_cli.io.writers import prepare_output_prefix
    from protsae_cli.logging_setup import current_level
    from protsae_cli.io.merge import merged_provenance, merge_h5
    from protsae_cli.annotate.resume import remove_stale_output_temps
    from protsae_cli.io.writers.h5 import H5Annotations

    if opts.resume and opts.output_prefix == "-":
        raise InputError("--resume needs an output prefix (not -o -)")
    opts = dataclasses.replace(opts, output_prefix=prepare_output_prefix(opts.output_prefix, opts.formats,
                                                                         opts.input))
    paths = output_paths(opts.output_prefix, opts.formats)
    remove_stale_output_temps(opts.output_prefix)  # what an earlier, killed merge left next to the outputs
    t0 = time.perf_counter()
    to_stdout = opts.output_prefix == "-"
    work = Path(tempfile.mkdtemp(prefix="protsae-devices-")) if to_stdout else Path(f"{opts.output_prefix}.devices")
    _prepare_workdir(work, opts, devices)

    source = opts.input
    # Every worker reads the whole input, so anything that can be read only once (stdin, a FIFO, /dev/stdin,
    # <(...)) is spooled to a file once; otherwise the first worker would take the records from the others.
    if source == "-" or not _is_regular_file(source):
        spool = str(work / "input.fasta")
        with open(spool, "wb") as f:
            if source == "-":
                shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
            else:
                with open(source, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 20)
        source = spool

    m = len(devices)
    threads = opts.threads or max(1, (os.cpu_count() or 1) // m)
    shards = worker_shards(m, opts.shard)
    procs: list[tuple[int, str, subprocess.Popen, threading.Thread]] = []
    outputs = [work / f"worker_{j + 1}.h5" for j in range(m)]
    try:
        for j, (device, shard) in enumerate(zip(devices, shards, strict=True)):
            if opts.resume and outputs[j].exists():
                log.info("worker %d/%d (%s) finished in an earlier attempt: reusing %s", j + 1, m, device, outputs[j])
                continue
            env, worker_device = _worker_env(device)
            wopts = dataclasses.replace(opts, input=source, output_prefix=str(work / f"worker_{j + 1}"),
                                        formats=("h5",), shard=shard, device=worker_device, progress=False,
                                        threads=threads, compression="lzf")
            spec = {"format": SPEC_FORMAT, "options": dataclasses.asdict(wopts), "log_level": current_level(),
                    "parent_pid": os.getpid()}
            spec_path = work / f"worker_{j + 1}.json"
            spec_path.write_text(json.dumps(spec, indent=1) + "\n")
            log.info("worker %d/%d on %s: records with ordinal %% %d == %d", j + 1, m, device, shard[1], shard[0] - 1)
            proc = subprocess.Popen([sys.executable, "-m", "protsae_cli.annotate.workers", str(spec_path)], env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            t = threading.Thread(target=_relay, args=(proc.stderr, f"protsae.worker{j + 1}", device), daemon=True)
            t.start()
            procs.append((j, device, proc, t))
        _wait_all(procs, shards)
    except BaseException:
        _stop_all(procs)
        if not opts.resume or to_stdout:
            shutil.rmtree(work, ignore_errors=True)
        raise

    attrs = []
    for p in outputs:
        with H5Annotations(p) as h5:
            attrs.append(h5.attrs)
    shard_attr = f"{opts.shard[0]}/{opts.shard[1]}" if opts.shard else ""
    prov = merged_provenance(attrs, [str(p) for p in outputs], opts.command, shard=shard_attr)
    # Every worker read the whole input, so each recorded the whole input's identity; merged_provenance checks
    # they agree and carries it into the final outputs.
    summary = AnnotateSummary(backend=str(prov.get("backend", "")), device=",".join(devices))
    try:
        merge_h5(outputs, opts.output_prefix, opts.formats, provenance=prov, compression=opts.compression,
                 on_result=lambda res: tally(summary, res))
    except BaseException:
        if not opts.resume or to_stdout:  # with --resume the finished worker outputs are kept for the rerun
            shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    summary.seconds = time.perf_counter() - t0
    summary.outputs = list(paths.values())
    return summary


def _relay(stream: IO[bytes], logger_name: str, device: str) -> None:
    """Re-emit a worker's log lines through our logging, at their level, tagged with the worker's device."""
    wlog = logging.getLogger(logger_name)
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if not line:
            continue
        m = _LEVEL_LINE.match(line)
        if m:
            wlog.log(getattr(logging, m.group(1)), "[%s] %s", device, m.group(2))
        else:  # tracebacks, library prints: rare, and worth seeing
            wlog.warning("[%s] %s", device, line)
    stream.close()


def _wait_all(procs: Sequence[tuple[int, str, subprocess.Popen, threading.Thread]],
              shards: Sequence[tuple[int, int]]) -> None:
    """Wait for every worker; on the first failure stop the others and fail with that worker's exit code."""
    pending = list(procs)
    while pending:
        for item in list(pending):
            j, device, proc, relay = item
            rc = proc.poll()
            if rc is None:
                continue
            relay.join()
            pending.remove(item)
            if rc != 0:
                _stop_all(pending)
                code = 128 - rc if rc < 0 else rc  # killed by signal s -> 128+s, the shell's convention
                meaning = {EXIT_RESOURCES: " (out of resources: retry with more memory)",
                           137: " (killed: out of host memory?)", 3: " (bad input)", 4: " (missing weights)"}
                raise WorkerFailed(f"worker {j + 1} on {device} (shard {shards[j][0]}/{shards[j][1]}) exited with "
                                   f"code {code}{meaning.get(code, '')}; its log lines are above",
                                   code if code > 0 else EXIT_INTERNAL)
        time.sleep(0.05)


def _stop_all(procs: Sequence[tuple[int, str, subprocess.Popen, threading.Thread]]) -> None:
    """SIGTERM (workers clean up their temp files), then SIGKILL whatever is still there after 10 s."""
    for _, _, proc, _ in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 10
    for _, _, proc, relay in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        relay.join(timeout=5)


# ---------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------

def die_with_parent(parent_pid: int | None) -> None:
    """Arrange for SIGTERM to this process when the orchestrator that started it dies, however it dies.

    Without this a ``kill -9`` of the orchestrator leaves its workers computing (and writing temps) until they
    finish their shard. PR_SET_PDEATHSIG fires when the thread that forked us exits; `annotate_multi` starts
    and waits for its workers from one thread, so that is the orchestrator's lifetime. If the parent died
    before the request took effect, we are already orphaned and the signal will never come: check once.
    """
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if parent_pid is None:
        return
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)  # the same clean exit the kernel's signal would have caused
        return
    if not armed:
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="protsae-parent-watchdog", daemon=True).start()


def _worker_main(argv: Sequence[str]) -> int:
    """Run one worker from its spec file; returns the exit code, with the same mapping as the CLI."""
    from protsae_cli.runtime import exit_on_signals, exit_status

    exit_on_signals()  # first, so a parent-death SIGTERM arriving from here on unwinds cleanly
    wlog = logging.getLogger("protsae.worker")
    try:
        spec = json.loads(Path(argv[0]).read_text())
        if spec.get("format") != SPEC_FORMAT:
            print(f"ERROR protsae.multigpu: {argv[0]} is not a worker spec", file=sys.stderr)
            return EXIT_INTERNAL
        die_with_parent(spec.get("parent_pid"))
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(WORKER_LOG_FORMAT))
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("protsae").setLevel(int(spec.get("log_level", logging.INFO)))
        logging.captureWarnings(True)
        from protsae_cli.annotate.pipeline import AnnotateOptions, annotate

        o = dict(spec["options"])
        o["formats"] = tuple(o["formats"])
        o["shard"] = tuple(o["shard"]) if o.get("shard") else None
        s = annotate(AnnotateOptions(**o))
        wlog.info("annotated %d proteins (%d residues) in %.1f s", s.proteins, s.residues, s.seconds)
        return 0
    except BaseException as e:  # noqa: BLE001 - mapped to the CLI's exit codes, which the parent reports
        code, message, show_traceback = exit_status(e)
        if code is None:
            raise
        if show_traceback:
            wlog.exception("internal error (a bug); please report it with this traceback")
        elif message:
            wlog.error("%s", message.removeprefix("protsae: error: ").removeprefix("protsae: "))
        return code


if __name__ == "__main__":
    from protsae_cli.runtime import leave

    leave(_worker_main(sys.argv[1:]), None)  # os._exit if a worker thread is still inside native code
