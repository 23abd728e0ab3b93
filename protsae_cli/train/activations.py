"""Hooked ESM-2 activations for SAE training: sampled residues per protein, kept in memory or cached to disk in
shards (safetensors) that training loads whole or streams back through a shuffle buffer.

Every row keeps where it came from (protein ordinal and 0-based residue position) so residue- and protein-level
concept labels can be attached later without re-running the language model.

Cache layout (a directory)::

    meta.json                      plm, plm_sha256, hook_point, layer, d_model, dtype, tokens_per_protein, seed,
                                   protein_ids, sequences, n_rows, shards: [{"file", "rows"}, ...]
    shard_00000.safetensors ...    acts [rows, d] float16, protein [rows] int64, position [rows] int64

`meta.json` is written last (atomically): a directory without it is an unfinished cache and is rebuilt.
Shards are read through a memory map of the safetensors data section, so a caller asking for rows
[a, b) of a shard pays for those rows only; this is what lets training stream a cache larger than memory.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from protsae_cli.plm.batching import plan_batches
from protsae_cli.errors import InputError
from protsae_cli.plm.esm_forward import EsmRunner, HookPoint

log = logging.getLogger("protsae.activations")

SHARD_ROWS = 262_144
META_NAME = "meta.json"
CACHE_FORMAT = "protsae-activations"


@dataclass
class ActivationSet:
    acts: torch.Tensor            # [N, d] float16 (storage) -- cast per batch when training
    protein: torch.Tensor         # [N] int64 index into protein_ids
    position: torch.Tensor        # [N] int64 0-based residue position
    protein_ids: list[str]
    sequences: list[str]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.acts.shape[0]

    def subset_proteins(self, keep: Iterable[int]) -> ActivationSet:
        """Rows of the given proteins only (protein indices are preserved, so labels still line up)."""
        mask = torch.zeros(len(self.protein_ids), dtype=torch.bool)
        mask[torch.as_tensor(list(keep), dtype=torch.long)] = True
        rows = mask[self.protein]
        return ActivationSet(self.acts[rows], self.protein[rows], self.position[rows], self.protein_ids,
                             self.sequences, dict(self.meta))

    def save(self, out_dir: str | os.PathLike, shard_rows: int = SHARD_ROWS) -> Path:
        """Write shards + meta.json; shards are complete files renamed into place (a crash leaves no half shard)."""
        out = Path(out_dir)
        writer = ShardWriter(out, shard_rows=shard_rows)
        writer.add(self.acts, self.protein, self.position)
        shards = writer.close()
        write_cache_meta(out, self.meta, shards, self.protein_ids, self.sequences)
        return out

    @classmethod
    def load(cls, cache_dir: str | os.PathLike) -> ActivationSet:
        return ActivationCache.open(cache_dir).load()


# ----------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Appends rows and writes a shard each time `shard_rows` are pending, so collecting a cache larger than
    memory holds at most one shard of rows. `prefix` keeps the files of cooperating writers (one per DDP rank)
    apart in one directory."""

    def __init__(self, out_dir: str | os.PathLike, shard_rows: int = SHARD_ROWS, prefix: str = "shard") -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.shard_rows, self.prefix = int(shard_rows), prefix
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._n_pending = 0
        self.shards: list[dict] = []

    def add(self, acts: torch.Tensor, protein: torch.Tensor, position: torch.Tensor) -> None:
        self._pending.append((acts, protein, position))
        self._n_pending += acts.shape[0]
        while self._n_pending >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, n: int) -> None:
        a, p, q = (torch.cat([t[i] for t in self._pending]) for i in range(3))
        self._write(a[:n], p[:n], q[:n])
        rest = (a[n:], p[n:], q[n:])
        self._pending = [rest] if rest[0].shape[0] else []
        self._n_pending = rest[0].shape[0]

    def _write(self, acts: torch.Tensor, protein: torch.Tensor, position: torch.Tensor) -> None:
        from safetensors.torch import save_file

        from protsae_cli.io.atomic import atomic_output

        name = f"{self.prefix}_{len(self.shards):05d}.safetensors"
        with atomic_output(self.out / name, fsync=False) as tmp:  # a cache: rebuilt if a crash loses a shard
            save_file({"acts": acts.contiguous(), "protein": protein.to(torch.int64).contiguous(),
                       "position": position.to(torch.int64).contiguous()}, str(tmp))
        self.shards.append({"file": name, "rows": int(acts.shape[0])})

    def close(self) -> list[dict]:
        if self._n_pending:
            self._flush(self._n_pending)
        return self.shards


def write_cache_meta(out_dir: Path, meta: dict, shards: list[dict], protein_ids: list[str],
                     sequences: list[str]) -> None:
    """meta.json last and atomically: its presence is what marks the cache complete."""
    full = dict(meta, format=CACHE_FORMAT, n_rows=sum(s["rows"] for s in shards), n_shards=len(shards),
                shards=shards, protein_ids=list(protein_ids), sequences=list(sequences))
    from protsae_cli.io.atomic import atomic_write_text

    atomic_write_text(out_dir / META_NAME, json.dumps(full))


# ----------------------------------------------------------------------------------------------- reading
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64, "I32": np.int32, "BF16": np.uint16}


class _MappedShard:
    """A safetensors file's tensors as numpy memory maps (no copy until rows are indexed)."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        self.arrays: dict[str, np.ndarray] = {}
        self.bf16: set[str] = set()
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise InputError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            a, b = info["data_offsets"]
            arr = raw[8 + n + a: 8 + n + b].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
            self.arrays[name] = arr
            if info["dtype"] == "BF16":
                self.bf16.add(name)

    def tensor(self, name: str, index) -> torch.Tensor:
        t = torch.from_numpy(np.array(self.arrays[name][index]))  # a copy: never alias the file map
        return t.view(torch.bfloat16) if name in self.bf16 else t


class ActivationCache:
    """An on-disk activation cache: metadata plus random access to row ranges of its shards.

    Every read of activation rows goes through `read` / `gather`, which count the rows they hand out
    (`rows_read`), so callers and tests can check how much was ever materialised at once.
    """

    def __init__(self, directory: Path, meta: dict) -> None:
        self.dir = directory
        self.protein_ids: list[str] = meta.pop("protein_ids")
        self.sequences: list[str] = meta.pop("sequences")
        shards = meta.get("shards")
        if shards is None:  # caches written before shard lists were recorded
            shards = [{"file": f"shard_{i:05d}.safetensors", "rows": None} for i in range(meta["n_shards"])]
        self.meta = meta
        self.shard_files = [directory / s["file"] for s in shards]
        for p in self.shard_files:
            if not p.exists():
                raise InputError(f"activation cache {directory}: shard {p.name} listed in {META_NAME} is missing")
        self._open: OrderedDict[int, _MappedShard] = OrderedDict()
        self.shard_rows = [int(s["rows"]) if s.get("rows") is not None else
                           int(self._shard(i).arrays["protein"].shape[0]) for i, s in enumerate(shards)]
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_rows)]).astype(np.int64)
        first = self._shard(0).arrays["acts"] if self.shard_files else None
        self.d_model = int(first.shape[1]) if first is not None else int(meta.get("d_model", 0))
        self.rows_read = 0

    @classmethod
    def open(cls, cache_dir: str | os.PathLike) -> ActivationCache:
        d = Path(cache_dir)
        try:
            meta = json.loads((d / META_NAME).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{d}: not an activation cache ({META_NAME} unreadable: {e})") from e
        for key in ("protein_ids", "sequences"):
            if key not in meta:
                raise InputError(f"{d / META_NAME}: not an activation cache (no {key!r})")
        # Paired by position (one sequence per protein id): lists of different lengths mean a damaged cache.
        ids, seqs = meta["protein_ids"], meta["sequences"]
        n_ids, n_seqs = (len(v) if isinstance(v, list) else "not a list" for v in (ids, seqs))
        if n_ids != n_seqs or isinstance(n_ids, str):
            raise InputError(f"{d / META_NAME}: protein_ids ({n_ids}) and sequences ({n_seqs}) must be lists of the "
                             "same length; the cache is damaged: delete it or use another --activation-cache")
        return cls(d, meta)

    @staticmethod
    def exists(cache_dir: str | os.PathLike) -> bool:
        return (Path(cache_dir) / META_NAME).exists()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_shards(self) -> int:
        return len(self.shard_files)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.shard_files)

    def _shard(self, i: int) -> _MappedShard:
        # A few maps stay open: streaming walks shards in random order and thousands of open maps would
        # exhaust file descriptors on big caches.
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        m = _MappedShard(self.shard_files[i])
        self._open[i] = m
        if len(self._open) > 8:
            self._open.popitem(last=False)
        return m

    def proteins_of_shard(self, i: int) -> np.ndarray:
        """Protein index of every row of shard i (small: 8 bytes per row)."""
        return np.asarray(self._shard(i).arrays["protein"])

    def read(self, shard: int, start: int, stop: int, rows: np.ndarray | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows [start, stop) of a shard, or only `rows` (absolute row numbers within the shard) among them."""
        m = self._shard(shard)
        index = slice(start, stop) if rows is None else rows
        acts = m.tensor("acts", index)
        self.rows_read += acts.shape[0]
        return acts, m.tensor("protein", index), m.tensor("position", index)

    def gather(self, global_rows: np.ndarray) -> torch.Tensor:
        """Activation rows by global row number, in the given order (reads only those rows)."""
        out = torch.empty((len(global_rows), self.d_model), dtype=self._dtype())
        shard_of = np.searchsorted(self.offsets, global_rows, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            local = global_rows[sel] - self.offsets[s]
            order = np.argsort(local, kind="stable")
            acts, _, _ = self.read(int(s), 0, 0, rows=local[order])
            out[torch.from_numpy(sel[order])] = acts
        return out

    def _dtype(self) -> torch.dtype:
        m = self._shard(0)
        return torch.bfloat16 if "acts" in m.bf16 else torch.from_numpy(m.arrays["acts"][:0].copy()).dtype

    def load(self, proteins: np.ndarray | None = None) -> ActivationSet:
        """The cache in memory, optionally only the rows of some proteins (a boolean mask over proteins)."""
        parts = []
        for i in range(self.n_shards):
            shard_prot = self.proteins_of_shard(i)
            if proteins is None:
                parts.append(self.read(i, 0, self.shard_rows[i]))
            else:
                rows = np.nonzero(proteins[shard_prot])[0]
                if len(rows):
                    parts.append(self.read(i, 0, 0, rows=rows))
        if parts:
            acts, prot, pos = (torch.cat([p[j] for p in parts]) for j in range(3))
        else:
            acts = torch.empty((0, self.d_model), dtype=self._dtype() if self.n_shards else torch.float16)
            prot = pos = torch.empty(0, dtype=torch.long)
        return ActivationSet(acts, prot, pos, self.protein_ids, self.sequences, dict(self.meta))


# ----------------------------------------------------------------------------------------------- collecting
def _protein_rng(seed: int, index: int) -> np.random.Generator:
    """One generator per protein: the crop and the sampled residues of protein i do not depend on which other
    proteins were collected with it (so cooperating DDP ranks and single runs sample identically)."""
    return np.random.default_rng([int(seed), int(index)])


def iter_collected(runner: EsmRunner, hook: HookPoint, proteins: Sequence[tuple[str, str]],
                   indices: Sequence[int] | None = None, tokens_per_protein: int | None = 64,
                   max_residues: int = 1022, toks_per_batch: int = 16384, seed: int = 0,
                   progress: Callable[[int], None] | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(acts, protein, position) per PLM batch for the proteins at `indices` (default: all).

    Proteins longer than `max_residues` are cropped to a random window of that length (ESM-2 was trained on
    crops), which keeps training activations in the model's regime.
    """
    order = list(range(len(proteins))) if indices is None else [int(i) for i in indices]
    crops: list[tuple[int, str, np.random.Generator]] = []
    for i in order:
        seq = proteins[i][1]
        rng = _protein_rng(seed, i)
        if len(seq) > max_residues:
            s = int(rng.integers(0, len(seq) - max_residues + 1))
            crops.append((s, seq[s:s + max_residues], rng))
        else:
            crops.append((0, seq, rng))
    for batch in plan_batches([len(c[1]) for c in crops], toks_per_batch):
        seqs = [crops[j][1] for j in batch]
        h = runner.hook_activations(runner.tokenizer.batch(seqs), hook)
        acts, prot, pos = [], [], []
        for b, j in enumerate(batch):
            n = len(seqs[b])
            sel = np.arange(n)
            if tokens_per_protein is not None and n > tokens_per_protein:
                sel = np.sort(crops[j][2].choice(n, tokens_per_protein, replace=False))
            st = torch.from_numpy(sel)
            acts.append(h[b, 1 + st].to("cpu", torch.float16))
            prot.append(torch.full((len(sel),), order[j], dtype=torch.long))
            pos.append(st + crops[j][0])
        if progress is not None:
            progress(sum(len(s) for s in seqs))
        yield torch.cat(acts), torch.cat(prot), torch.cat(pos)


def cache_meta(runner: EsmRunner, hook: HookPoint, tokens_per_protein: int | None, seed: int) -> dict:
    """What a cache must match to be reused: the PLM (by checksum), the hook and the sampling."""
    return {"plm": runner.plm.name, "plm_sha256": runner.plm.sha256, "hook_point": hook.point, "layer": hook.layer,
            "d_model": runner.plm.d_model, "dtype": "float16", "tokens_per_protein": tokens_per_protein,
            "seed": seed}


def collect_activations(runner: EsmRunner, hook: HookPoint, proteins: Sequence[tuple[str, str]],
                        tokens_per_protein: int | None = 64, max_residues: int = 1022, toks_per_batch: int = 16384,
                        seed: int = 0, progress=None) -> ActivationSet:
    """Run the PLM over (id, sequence) pairs and keep `tokens_per_protein` random residues each (None: all)."""
    parts = list(iter_collected(runner, hook, proteins, None, tokens_per_protein, max_residues, toks_per_batch,
                                seed, progress))
    if not parts:
        raise InputError("no activations collected: the input has no valid proteins")
    acts, prot, pos = (torch.cat([p[j] for p in parts]) for j in range(3))
    return ActivationSet(acts, prot, pos, [p[0] for p in proteins], [p[1] for p in proteins],
                         cache_meta(runner, hook, tokens_per_protein, seed))


def write_activation_cache(runner: EsmRunner, hook: HookPoint, proteins: Sequence[tuple[str, str]],
                           out_dir: str | os.PathLike, tokens_per_protein: int | None = 64, seed: int = 0,
                           rank: int = 0, world_size: int = 1, barrier: Callable[[], None] | None = None,
                           shard_rows: int = SHARD_ROWS, toks_per_batch: int = 16384, progress=None,
                           extra_meta: dict | None = None) -> Path:
    """Collect straight to disk, holding at most one shard of rows in memory.

    With `world_size > 1` every rank collects the proteins with index % world_size == rank into its own shard
    files, and after `barrier()` rank 0 lists them (in rank order) in meta.json. The directory must then be
    visible to all ranks (one node, or a shared file system).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "shard" if world_size == 1 else f"shard_r{rank:04d}"
    for stale in out.glob(f"{prefix}_*.safetensors*"):  # an interrupted earlier attempt
        stale.unlink()
    writer = ShardWriter(out, shard_rows=shard_rows, prefix=prefix)
    mine = [i for i in range(len(proteins)) if i % world_size == rank]
    for acts, prot, pos in iter_collected(runner, hook, proteins, mine, tokens_per_protein,
                                          toks_per_batch=toks_per_batch, seed=seed, progress=progress):
        writer.add(acts, prot, pos)
    (out / f"{prefix}.done.json").write_text(json.dumps(writer.close()))
    if barrier is not None:
        barrier()
    if rank == 0:
        shards: list[dict] = []
        for r in range(world_size):
            p = "shard" if world_size == 1 else f"shard_r{r:04d}"
            shards += json.loads((out / f"{p}.done.json").read_text())
        if not shards or sum(s["rows"] for s in shards) == 0:
            raise InputError("no activations collected: the input has no valid proteins")
        meta = dict(cache_meta(runner, hook, tokens_per_protein, seed), **(extra_meta or {}))
        write_cache_meta(out, meta, shards, [p[0] for p in proteins], [p[1] for p in proteins])
        for r in range(world_size):
            p = "shard" if world_size == 1 else f"shard_r{r:04d}"
            (out / f"{p}.done.json").unlink(missing_ok=True)
    if barrier is not None:
        barrier()
    return out


# ----------------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """One training step's rows for this process (its slice of the global batch)."""

    acts: torch.Tensor      # [b, d] storage dtype
    protein: torch.Tensor   # [b] int64
    position: torch.Tensor  # [b] int64


def _local_slice(n: int, rank: int, world_size: int) -> slice:
    per = n // world_size
    return slice(rank * per, (rank + 1) * per)


class InMemoryRows:
    """Training rows held in memory; epoch e visits them in a permutation drawn from (seed, e).

    Deriving each epoch's order from (seed, epoch) alone is what makes resuming exact: a resumed run rebuilds
    the permutation and skips the batches already done, with no generator state to carry.
    Every rank draws the same global batch and keeps its contiguous slice, so training is the same
    computation at any world size (and a run can resume on a different number of GPUs).
    """

    def __init__(self, data: ActivationSet, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.data, self.batch_size, self.seed = data, int(batch_size), int(seed)
        self.rank, self.world_size = rank, world_size

    @property
    def n_rows(self) -> int:
        return len(self.data)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_rows // self.batch_size

    def fingerprint(self) -> dict:
        d = self.data
        h = torch.stack([d.protein.sum(), (d.position * (d.protein + 1)).sum()]).tolist()
        return {"kind": "memory", "rows": self.n_rows, "proteins_positions": h}

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        perm = torch.randperm(self.n_rows, generator=g)
        loc = _local_slice(self.batch_size, self.rank, self.world_size)
        for s in range(skip * self.batch_size, self.n_rows - self.batch_size + 1, self.batch_size):
            rows = perm[s:s + self.batch_size][loc]
            yield Batch(self.data.acts[rows], self.data.protein[rows], self.data.position[rows])

    def sample(self, n: int) -> ActivationSet:
        """A seeded subset of rows (normalisation fit, label priors, train metrics)."""
        g = torch.Generator().manual_seed(self.seed)
        rows = torch.randperm(self.n_rows, generator=g)[:n]
        d = self.data
        return ActivationSet(d.acts[rows], d.protein[rows], d.position[rows], d.protein_ids, d.sequences, d.meta)


class ShuffleBufferStream:
    """Training rows streamed from an `ActivationCache` through a shuffle buffer of `buffer_rows` rows.

    Memory does not grow with the cache: the buffer is the only place rows live, and the cache is read in
    pieces no larger than the buffer's free space. Each epoch walks the shards' row blocks in a random order
    (drawn from (seed, epoch)), reads them sequentially into the buffer and draws each batch uniformly from
    what the buffer holds, so the order is random at block scale and local mixing comes from the buffer.

    Rows whose protein is not in `proteins` (the validation proteins) are dropped as they are read.
    Resuming at batch j of an epoch replays the buffer's bookkeeping on row numbers only (reading the small
    protein column, not activations) and then gathers the activations of the rows the buffer holds at that
    point, so it costs one buffer of reads, not the j batches.
    """

    def __init__(self, cache: ActivationCache, proteins: np.ndarray, batch_size: int, buffer_rows: int,
                 seed: int, rank: int = 0, world_size: int = 1, block_rows: int | None = None) -> None:
        if buffer_rows < batch_size:
            raise InputError(f"shuffle buffer ({buffer_rows} rows) must hold at least one batch ({batch_size})")
        self.cache, self.mask = cache, np.asarray(proteins, dtype=bool)
        self.batch_size, self.buffer_rows, self.seed = int(batch_size), int(buffer_rows), int(seed)
        self.rank, self.world_size = rank, world_size
        self.block_rows = int(block_rows or max(1, buffer_rows // 8))
        self.peak_rows = 0  # most rows ever resident in the buffer (for the memory-bound test)
        self.n_rows = int(sum(self.mask[cache.proteins_of_shard(i)].sum() for i in range(cache.n_shards)))

    @property
    def steps_per_epoch(self) -> int:
        return self.n_rows // self.batch_size

    def fingerprint(self) -> dict:
        return {"kind": "stream", "rows": self.n_rows, "cache_rows": len(self.cache),
                "shards": self.cache.shard_rows, "buffer_rows": self.buffer_rows, "block_rows": self.block_rows}

    def _blocks(self, rng: np.random.Generator) -> list[tuple[int, int, int]]:
        blocks = [(i, s, min(s + self.block_rows, n)) for i, n in enumerate(self.cache.shard_rows)
                  for s in range(0, n, self.block_rows)]
        return [blocks[j] for j in rng.permutation(len(blocks))]

    def epoch(self, epoch: int, skip: int = 0, full: bool = False) -> Iterator[Batch]:
        """Batches of one epoch from batch `skip` on; `full` yields whole global batches instead of this rank's
        slice (for samples every rank must agree on)."""
        rng = np.random.default_rng([self.seed, int(epoch) + 1, 7])  # epoch -1: the init sample
        blocks = self._blocks(rng)
        cap, bs = self.buffer_rows, self.batch_size
        d = self.cache.d_model
        ids = np.empty(cap, dtype=np.int64)          # global row number of each buffered row
        prot = np.empty(cap, dtype=np.int64)
        pos = np.empty(cap, dtype=np.int64)
        acts: torch.Tensor | None = None             # allocated once activations are needed
        n = 0
        bi, cursor = 0, blocks[0][1] if blocks else 0
        emitted = 0
        loc = slice(0, bs) if full else _local_slice(bs, self.rank, self.world_size)
        while True:
            replaying = emitted < skip
            # Fill: read pieces no larger than the free space, so buffer + piece never exceeds `cap` rows.
            while n < cap and bi < len(blocks):
                shard, _, stop = blocks[bi]
                take = min(stop - cursor, cap - n)
                p_all = self.cache.proteins_of_shard(shard)[cursor:cursor + take]
                keep = np.nonzero(self.mask[p_all])[0]
                k = len(keep)
                if k:
                    rows = cursor + keep
                    ids[n:n + k] = self.cache.offsets[shard] + rows
                    prot[n:n + k] = p_all[keep]
                    if not replaying:
                        a, _, q = (self.cache.read(shard, cursor, cursor + take) if k == take
                                   else self.cache.read(shard, 0, 0, rows=rows))
                        acts = acts if acts is not None else torch.empty((cap, d), dtype=a.dtype)
                        acts[n:n + k] = a
                        pos[n:n + k] = q.numpy()
                    n += k
                    self.peak_rows = max(self.peak_rows, n)
                cursor += take
                if cursor >= stop:
                    bi += 1
                    cursor = blocks[bi][1] if bi < len(blocks) else 0
            if n < bs:
                return
            pick = rng.choice(n, bs, replace=False)
            if not replaying:
                # Rows reach the buffer only through the fill above (which allocates `acts` when not replaying)
                # or the end-of-replay materialisation, so with n >= bs rows buffered `acts` exists.
                assert acts is not None
                mine = torch.from_numpy(pick[loc])
                yield Batch(acts[mine].clone(), torch.from_numpy(prot[pick[loc]].copy()),
                            torch.from_numpy(pos[pick[loc]].copy()))
            # Remove the picked rows: fill holes below n - bs with the unpicked rows of the tail.
            tail = np.zeros(bs, dtype=bool)
            holes = pick[pick < n - bs]
            tail[pick[pick >= n - bs] - (n - bs)] = True
            movers = (n - bs) + np.nonzero(~tail)[0]
            ids[holes], prot[holes], pos[holes] = ids[movers], prot[movers], pos[movers]
            if acts is not None and not replaying:
                acts[torch.from_numpy(holes)] = acts[torch.from_numpy(movers)]
            n -= bs
            emitted += 1
            if emitted == skip and skip > 0:
                # Replay done: materialise what the buffer holds now, exactly as an uninterrupted run has it.
                a = self.cache.gather(ids[:n])
                acts = torch.empty((cap, d), dtype=a.dtype)
                acts[:n] = a
                pos[:n] = self._positions(ids[:n])

    def _positions(self, global_rows: np.ndarray) -> np.ndarray:
        out = np.empty(len(global_rows), dtype=np.int64)
        shard_of = np.searchsorted(self.cache.offsets, global_rows, side="right") - 1
        for s in np.unique(shard_of):
            sel = np.nonzero(shard_of == s)[0]
            out[sel] = np.asarray(self.cache._shard(int(s)).arrays["position"])[global_rows[sel]
                                                                                 - self.cache.offsets[s]]
        return out

    def sample(self, n: int) -> ActivationSet:
        """The first n rows of a seeded pass (epoch -1): a uniform-enough sample without loading the cache."""
        parts, got = [], 0
        for b in self.epoch(-1, full=True):
            parts.append(b)
            got += len(b.acts)
            if got >= n:
                break
        c = self.cache
        if not parts:
            return ActivationSet(torch.empty((0, c.d_model)), torch.empty(0, dtype=torch.long),
                                 torch.empty(0, dtype=torch.long), c.protein_ids, c.sequences, c.meta)
        acts, prot, pos = (torch.cat([getattr(p, f) for p in parts])[:n] for f in ("acts", "protein", "position"))
        return ActivationSet(acts, prot, pos, c.protein_ids, c.sequences, c.meta)
