"""The annotate pipeline: FASTA -> windows -> token-budget batches -> ESM-2 to the hook -> SAE codes ->
concept segments -> HDF5/TSV/GFF3, written atomically in input order.

Memory stays bounded whatever the input size: proteins are read as a stream and processed in chunks (sorted
by length inside a chunk for efficient batches, written back in input order).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from protsae_cli import __version__
from protsae_cli.batching import chunked_records, plan_batches, plan_windows
from protsae_cli.errors import InputError
from protsae_cli.esm_forward import EsmRunner, HookPoint
from protsae_cli.fasta import InputIdentity, InvalidRecord, ProteinRecord, read_fasta
from protsae_cli.writers import (DEFAULT_FORMATS, FORMATS, open_writers, output_paths,  # noqa: F401 (re-exported)
                                 prepare_output_prefix)

log = logging.getLogger("protsae.annotate")



#: Default chunk size in residues (see AnnotateOptions.chunk_residues and docs/PIPELINES.md for why).
DEFAULT_CHUNK_RESIDUES = 65_536


@dataclass
class AnnotateOptions:
    input: str
    output_prefix: str
    model: str | None = None
    sae: str | None = None
    formats: tuple[str, ...] = DEFAULT_FORMATS
    device: str = "auto"
    backend: str = "auto"
    toks_per_batch: int = 16384
    long_policy: str = "window"
    window_overlap: int = 256
    max_window: int = 1022
    min_segment_len: int = 1
    merge_gap: int = 0
    decode: str = "viterbi"                   # region concepts: topology Viterbi (docs/SEGMENTS.md) or "none"
    call_withheld: bool = False               # also call concepts below the reliability floors (docs/CALLS.md)
    skip_invalid: bool = False
    check_plm: bool = True
    h5_dtype: str = "float32"  # what scipy.sparse / AnnData read; float16 halves the size but they refuse it
    compression: str | None = "gzip"
    shard: tuple[int, int] | None = None      # (i, n), 1-based i; selects records with index % n == i-1
    progress: bool = True
    threads: int | None = None
    # Chunk limits bound memory and are the unit of --resume checkpoints; --chunk-residues,
    # PROTSAE_CHUNK_RESIDUES and PROTSAE_CHUNK_RECORDS override them (smaller chunks: less lost work per crash,
    # more part files). 65,536 residues = 4 full default batches: ~20 s of the 8M-shaped model on 2 idle CPU
    # cores (docs/PIPELINES.md, "--resume"); GPU chunk overhead is not measured yet (no GPU lent).
    chunk_residues: int = field(default_factory=lambda: _env_int("PROTSAE_CHUNK_RESIDUES", DEFAULT_CHUNK_RESIDUES))
    chunk_records: int = field(default_factory=lambda: _env_int("PROTSAE_CHUNK_RECORDS", 4096))
    resume: bool = False                      # checkpoint finished chunks under PREFIX.parts/ and reuse them
    command: str = field(default_factory=lambda: shlex.join(["protsae", *sys.argv[1:]]))


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        n = int(value)
    except ValueError:
        raise InputError(f"{name}={value!r} is not an integer") from None
    if n < 1:
        raise InputError(f"{name} must be at least 1, got {n}")
    return n


@dataclass
class AnnotateSummary:
    proteins: int = 0
    ok: int = 0
    windowed: int = 0
    truncated: int = 0
    invalid: int = 0
    failed: int = 0
    residues: int = 0
    segments: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    backend: str = ""
    device: str = ""

    @property
    def residues_per_second(self) -> float:
        return self.residues / self.seconds if self.seconds > 0 else 0.0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device} requested but no CUDA GPU is available (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise InputError(f"invalid --device {device!r} ({e})") from e


class _Cancelled(Exception):
    """Raised inside the annotate worker thread when the consumer has gone away."""


#: How long a leaving consumer waits for the worker to finish its current batch.
_JOIN_SECONDS = 30.0


class _Work:
    """One protein in flight: its windows, and per-window codes as they come back."""

    __slots__ = ("record", "windows", "status", "parts", "failed")

    def __init__(self, record: ProteinRecord, windows, status: str) -> None:
        self.record = record
        self.windows = windows
        self.status = status
        self.parts: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(windows)
        self.failed: str = ""


class Annotator:
    """Library entry point: load models once, then annotate any number of inputs."""

    def __init__(self, model: str | None = None, sae: str | None = None, device: str = "auto",
                 backend: str = "auto", check_plm: bool = True, threads: int | None = None,
                 call_withheld: bool = False) -> None:
        from protsae_cli.concepts import CallPolicy, log_calling, select_calls, standardize
        from protsae_cli.encode import get_encoder
        from protsae_cli.models import default_sae_dir
        from protsae_cli.plm import load_plm, recorded_plm_spec
        from protsae_cli.sae import check_compatible, load_sae

        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        sae_path = sae if sae is not None else str(default_sae_dir())
        self.sae, self.sae_sha256 = load_sae(sae_path)
        self.sae_path = sae_path
        cfg = self.sae.cfg
        if model is None and sae is not None:
            # An SAE names the PLM it was trained on: use it unless told otherwise (a name only, never a path).
            model = recorded_plm_spec(cfg.plm_name, f"{sae_path}/config.json")
        self.plm = load_plm(model, self.device)
        check_compatible(cfg, self.plm.name, self.plm.sha256, self.plm.d_model, self.plm.num_layers,
                         strict_checksum=check_plm)
        self.hook = HookPoint(cfg.hook_point, cfg.layer)
        self.runner = EsmRunner(self.plm, self.device)
        self.encoder = get_encoder(backend, self.sae, self.device)
        # Code slots per residue: k, or k + m for a ProtSAE that keeps its m defined latents outside TopK.
        self.code_width = int(getattr(self.sae, "code_width", cfg.k))
        # Concepts below the reliability floors are withheld unless asked for (docs/CALLS.md).
        self.call_policy = CallPolicy(call_withheld=call_withheld)
        self.calling = select_calls(standardize(cfg.concepts), self.call_policy)
        log_calling(self.calling, log)
        self.concepts = self.calling.called

    def provenance(self, opts: AnnotateOptions) -> dict[str, object]:
        from protsae_cli.segments import RegionCaller

        cfg = self.sae.cfg
        # What decoded the region concepts and which hard constraints that imposed (docs/SEGMENTS.md).
        regions = RegionCaller(self.concepts, getattr(cfg, "segment_decoder", None), opts.decode)
        return {
            "format": "protsae-annotations", "format_version": 1, "protsae_version": __version__,
            "command": opts.command, "plm_model": self.plm.name, "plm_sha256": self.plm.sha256,
            "hook_point": cfg.hook_point, "layer": cfg.layer,
            "layer_semantics": "1-based transformer block (fair-esm repr_layers index; HF hidden_states index)",
            "sae_id": Path(self.sae_path).name, "sae_sha256": self.sae_sha256, "d_model": cfg.d_model,
            "d_sae": cfg.d_sae, "k": cfg.k, "sae_arch": cfg.arch, "dtype": opts.h5_dtype,
            "device_type": self.device.type, "backend": self.encoder.name,
            "compute_dtype": "bfloat16" if self.device.type == "cuda" else "float32",
            "long_policy": opts.long_policy, "max_window": opts.max_window, "window_overlap": opts.window_overlap,
            "min_segment_len": opts.min_segment_len, "merge_gap": opts.merge_gap,
            "calling_policy": self.call_policy.describe(), "concepts_withheld": self.calling.withheld_text(),
            "decode": regions.describe(), "decode_constraints": regions.constraints(),
            "coordinate_system": "0-based rows; text outputs 1-based inclusive",
            "shard": f"{opts.shard[0]}/{opts.shard[1]}" if opts.shard else "",
        }

    # -- core: encode one chunk of proteins ---------------------------------------------------------
    def _encode_items(self, items: list[tuple[_Work, int]]) -> None:
        """Run ESM-2 + SAE on a list of (work, window index); on CUDA OOM halve and retry, down to one."""
        seqs = []
        for w, wi in items:
            win = w.windows[wi]
            seqs.append(w.record.sequence[win.start:win.end])
        try:
            tokens = self.runner.tokenizer.batch(seqs)
            if self.device.type == "cuda":
                tokens = tokens.pin_memory()  # lets the host-to-device copy run asynchronously
            acts = self.runner.hook_activations(tokens, self.hook)
            rows = torch.cat([acts[b, 1:len(s) + 1] for b, s in enumerate(seqs)])
            idx, val = self.encoder.encode(rows)
            idx, val = idx.cpu().numpy(), val.cpu().numpy()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if len(items) == 1:
                w, _ = items[0]
                w.failed = (f"protein {w.record.id!r} (record {w.record.index + 1}, {len(w.record.sequence)} "
                            f"residues) ran out of GPU memory even alone")
                log.warning(w.failed)
                return
            half = len(items) // 2
            self._encode_items(items[:half])
            self._encode_items(items[half:])
            return
        off = 0
        for (w, wi), s in zip(items, seqs):
            n = len(s)
            win = w.windows[wi]
            a, b = off + (win.keep_start - win.start), off + (win.keep_end - win.start)
            w.parts[wi] = (idx[a:b], val[a:b])
            off += n

    def _results(self, chunk: list[ProteinRecord | InvalidRecord], opts: AnnotateOptions,
                 stop: "threading.Event | None" = None):
        from protsae_cli.results import ProteinResult
        from protsae_cli.segments import RegionCaller

        call_segments = RegionCaller(self.concepts, getattr(self.sae.cfg, "segment_decoder", None), opts.decode)
        k = self.code_width
        works: list[_Work | InvalidRecord] = []
        items: list[tuple[_Work, int]] = []
        for rec in chunk:
            if isinstance(rec, InvalidRecord):
                works.append(rec)
                continue
            windows, status = plan_windows(len(rec.sequence), opts.long_policy, max_residues=opts.max_window,
                                           overlap=opts.window_overlap, protein_id=rec.id)
            w = _Work(rec, windows, status)
            works.append(w)
            items.extend((w, i) for i in range(len(windows)))
        lengths = [w.windows[i].end - w.windows[i].start for w, i in items]
        for batch in plan_batches(lengths, opts.toks_per_batch):
            if stop is not None and stop.is_set():
                raise _Cancelled  # the consumer left (error, signal): stop at a batch boundary
            self._encode_items([items[i] for i in batch])
        empty_i, empty_v = np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        for w in works:
            if isinstance(w, InvalidRecord):
                yield ProteinResult(index=w.index, id=w.id, description=w.description, sequence="",
                                    status="invalid", status_detail=w.error, idx=empty_i, val=empty_v, segments=[])
                continue
            rec = w.record
            if w.failed or any(p is None for p in w.parts):
                yield ProteinResult(index=rec.index, id=rec.id, description=rec.description, sequence=rec.sequence,
                                    status="failed_oom", status_detail=w.failed or "not encoded",
                                    idx=empty_i, val=empty_v, segments=[])
                continue
            idx = np.concatenate([p[0] for p in w.parts])
            val = np.concatenate([p[1] for p in w.parts])
            segs = call_segments(idx, val, min_segment_len=opts.min_segment_len, merge_gap=opts.merge_gap)
            yield ProteinResult(index=rec.index, id=rec.id, description=rec.description, sequence=rec.sequence,
                                status=w.status, status_detail="", idx=idx, val=val, segments=segs)

    def iter_results(self, records: Iterable[ProteinRecord | InvalidRecord], opts: AnnotateOptions,
                     prefetch: int = 2) -> Iterator:
        """Results in input order. Parsing and model work run in a background thread, so the caller's
        writing (compression, segment formatting) overlaps with the GPU instead of stalling it; at most
        `prefetch` chunks wait in between, which keeps memory bounded."""
        import queue
        import threading

        q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for chunk in chunked_records(records, opts.chunk_residues, opts.chunk_records,
                                             length=lambda r: len(r.sequence) if isinstance(r, ProteinRecord) else 0):
                    if not put(list(self._results(chunk, opts, stop))):
                        return
                put(done)
            except _Cancelled:
                return
            except BaseException as e:  # re-raised in the consumer with its traceback
                put(e)

        t = threading.Thread(target=work, name="protsae-annotate-worker", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            stop.set()
            # The worker stops at its next batch boundary; a thread still inside libtorch when the interpreter
            # shuts down aborts the process ("terminate called without an active exception", exit 134). If it
            # cannot be joined (blocked reading a stdin that never closes, or a very long batch), the CLI ends
            # the process with os._exit after clean-up instead of a normal shutdown (see cli/app.py).
            t.join(timeout=_JOIN_SECONDS)

    def run(self, opts: AnnotateOptions) -> AnnotateSummary:
        opts = dataclasses.replace(opts, output_prefix=prepare_output_prefix(opts.output_prefix, opts.formats,
                                                                             opts.input))
        return self._run_prepared(opts)

    def _run_prepared(self, opts: AnnotateOptions) -> AnnotateSummary:
        """`run` once the output prefix is final (a `-o d/` is expanded once: `d/x` may itself be a directory)."""
        if opts.resume:
            from protsae_cli.resume import run_resumable

            return run_resumable(self, opts)
        from protsae_cli.merge import canonical_result

        paths = output_paths(opts.output_prefix, opts.formats)
        prov = self.provenance(opts)
        cfg = self.sae.cfg
        writers = []
        summary = AnnotateSummary(backend=self.encoder.name, device=str(self.device))
        t0 = time.perf_counter()
        try:
            writers = open_writers(paths, prov, self.concepts, cfg.d_sae, self.code_width, dtype=opts.h5_dtype,
                                   compression=opts.compression)
            identity = InputIdentity()
            records = identity.track(read_fasta(opts.input, skip_invalid=opts.skip_invalid))
            if opts.shard:  # after tracking: every shard records the identity of the whole input
                i, n = opts.shard
                records = (r for r in records if r.index % n == i - 1)
            with _progress(opts.progress, _count_records(opts.input)) as bar:
                for res in self.iter_results(records, opts):
                    res = canonical_result(res)  # what HDF5 keeps, so merged/resumed text outputs match this run's
                    for wr in writers:
                        wr.write(res)
                    _tally(summary, res)
                    bar.advance(1, residues=len(res.sequence))
            for wr in writers:
                wr.set_input_identity(identity.attrs())
                wr.close()
        except BaseException:
            for wr in writers:
                wr.abort()
            raise
        summary.seconds = time.perf_counter() - t0
        summary.outputs = list(paths.values())
        return summary


def _tally(s: AnnotateSummary, res) -> None:
    s.proteins += 1
    s.segments += len(res.segments)
    if res.status in ("ok", "windowed", "truncated"):
        s.residues += res.idx.shape[0]
    if res.status == "ok":
        s.ok += 1
    elif res.status == "windowed":
        s.windowed += 1
    elif res.status == "truncated":
        s.truncated += 1
    elif res.status == "invalid":
        s.invalid += 1
    else:
        s.failed += 1


def _count_records(source: str) -> int | None:
    """Total for the progress bar: cheap for regular files (count '>' lines), unknown for anything else.

    Only a regular file may be read twice: a FIFO, ``/dev/stdin`` or ``<(...)`` would lose what this pass
    reads (it cannot seek back), so those, like stdin and gzip, get no total rather than losing input.
    """
    if source == "-":
        return None
    p = Path(source)
    try:
        if not stat.S_ISREG(os.stat(p).st_mode):
            return None
        with open(p, "rb") as f:
            if f.read(2) == b"\x1f\x8b":
                return None
            f.seek(0)
            n = 0
            for block in iter(lambda: f.read(1 << 22), b""):
                n += block.count(b"\n>")
            f.seek(0)
            return n + (1 if f.read(1) == b">" else 0)
    except OSError:
        return None


def _progress(enabled: bool, total: int | None):
    """Proteins done (residues beside them): a bar on a terminal, periodic log lines in pipelines
    (protsae_cli.progress). `total` is None for inputs that cannot be counted without consuming them."""
    from protsae_cli.progress import Progress

    return Progress("annotating", total, unit="proteins", enabled=enabled)


def annotate(opts: AnnotateOptions) -> AnnotateSummary:
    """Annotate a FASTA with concept calls; see AnnotateOptions for the knobs."""
    # Output paths first: a bad -o fails in seconds, before the models load.
    opts = dataclasses.replace(opts, output_prefix=prepare_output_prefix(opts.output_prefix, opts.formats,
                                                                         opts.input))
    ann = Annotator(opts.model, opts.sae, opts.device, opts.backend, opts.check_plm, opts.threads,
                    call_withheld=opts.call_withheld)
    return ann._run_prepared(opts)
