"""The annotate pipeline: FASTA -> windows -> token-budget batches -> ESM-2 to the hook -> SAE codes ->
concept segments -> HDF5/TSV/GFF3, written atomically in input order.

Memory stays bounded whatever the input size: proteins are read as a stream and processed in chunks (sorted
by length inside a chunk for efficient batches, written back in input order).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from protsae_cli import __version__
from protsae_cli.plm.batching import chunked_records, plan_batches, plan_windows
from protsae_cli.plm.esm_forward import EsmRunner, HookPoint
from protsae_cli.io.fasta import InputIdentity, InvalidRecord, ProteinRecord, read_fasta
from protsae_cli.io.writers import (DEFAULT_FORMATS, FORMATS, open_writers, output_paths,  # noqa: F401 (re-exported)
                                 prepare_output_prefix)

from protsae_cli.annotate.options import (DEFAULT_CHUNK_RESIDUES, AnnotateOptions,  # noqa: F401 (public here too)
                                          AnnotateSummary, count_records, progress_bar, tally)

log = logging.getLogger("protsae.annotate")



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
        from protsae_cli.call.concepts import CallPolicy, log_calling, select_calls, standardize
        from protsae_cli.encode import get_encoder
        from protsae_cli.runtime import check_pairing, open_sae, plm_for_sae, resolve_device

        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        # The SAE stays on the host: the encoder backend places its weights (bf16 on CUDA, fused kernel, ORT).
        self.sae, self.sae_sha256, self.sae_path = open_sae(sae)
        cfg = self.sae.cfg
        self.plm = plm_for_sae(cfg, self.sae_path, model, self.device, given_sae=sae is not None)
        check_pairing(cfg, self.plm, check_plm)
        self.hook = HookPoint(cfg.hook_point, cfg.layer)
        self.runner = EsmRunner(self.plm, self.device)
        self.encoder = get_encoder(backend, self.sae, self.device)
        # Code slots per residue: k, or k + m for a ProtSAE that keeps its m defined latents outside TopK.
        self.code_width = self.sae.code_width
        # Concepts below the reliability floors are withheld unless asked for (docs/CALLS.md).
        self.call_policy = CallPolicy(call_withheld=call_withheld)
        self.calling = select_calls(standardize(cfg.concepts), self.call_policy)
        log_calling(self.calling, log)
        self.concepts = self.calling.called

    def provenance(self, opts: AnnotateOptions) -> dict[str, object]:
        from protsae_cli.call.segments import RegionCaller

        cfg = self.sae.cfg
        # What decoded the region concepts and which hard constraints that imposed (docs/SEGMENTS.md).
        regions = RegionCaller(self.concepts, cfg.segment_decoder, opts.decode)
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
            idx_t, val_t = self.encoder.encode(rows)
            idx, val = idx_t.cpu().numpy(), val_t.cpu().numpy()
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
        for (w, wi), s in zip(items, seqs, strict=True):
            n = len(s)
            win = w.windows[wi]
            a, b = off + (win.keep_start - win.start), off + (win.keep_end - win.start)
            w.parts[wi] = (idx[a:b], val[a:b])
            off += n

    def _results(self, chunk: list[ProteinRecord | InvalidRecord], opts: AnnotateOptions,
                 stop: threading.Event | None = None):
        from protsae_cli.io.results import ProteinResult
        from protsae_cli.call.segments import RegionCaller

        call_segments = RegionCaller(self.concepts, self.sae.cfg.segment_decoder, opts.decode)
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
        for item in works:
            if isinstance(item, InvalidRecord):
                yield ProteinResult(index=item.index, id=item.id, description=item.description, sequence="",
                                    status="invalid", status_detail=item.error, idx=empty_i, val=empty_v,
                                    segments=[])
                continue
            w = item
            rec = w.record
            parts = [p for p in w.parts if p is not None]
            if w.failed or len(parts) != len(w.parts):
                yield ProteinResult(index=rec.index, id=rec.id, description=rec.description, sequence=rec.sequence,
                                    status="failed_oom", status_detail=w.failed or "not encoded",
                                    idx=empty_i, val=empty_v, segments=[])
                continue
            idx = np.concatenate([p[0] for p in parts])
            val = np.concatenate([p[1] for p in parts])
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
            from protsae_cli.annotate.resume import run_resumable

            return run_resumable(self, opts)
        from protsae_cli.io.merge import canonical_result

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
            with progress_bar(opts.progress, count_records(opts.input)) as bar:
                for res in self.iter_results(records, opts):
                    res = canonical_result(res)  # what HDF5 keeps, so merged/resumed text outputs match this run's
                    for wr in writers:
                        wr.write(res)
                    tally(summary, res)
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


def annotate(opts: AnnotateOptions) -> AnnotateSummary:
    """Annotate a FASTA with concept calls; see AnnotateOptions for the knobs."""
    # Output paths first: a bad -o fails in seconds, before the models load.
    opts = dataclasses.replace(opts, output_prefix=prepare_output_prefix(opts.output_prefix, opts.formats,
                                                                         opts.input))
    ann = Annotator(opts.model, opts.sae, opts.device, opts.backend, opts.check_plm, opts.threads,
                    call_withheld=opts.call_withheld)
    return ann._run_prepared(opts)
