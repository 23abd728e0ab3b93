"""Collect hooked ESM-2 activations for SAE training: sampled residues per protein, kept in memory or cached
to disk in shards (safetensors) that training streams back.

Every row keeps where it came from (protein ordinal and 0-based residue position) so residue- and protein-level
concept labels can be attached later without re-running the language model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from protsae_cli.batching import plan_batches
from protsae_cli.errors import InputError
from protsae_cli.esm_forward import EsmRunner, HookPoint

SHARD_ROWS = 262_144


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

    def subset_proteins(self, keep: Sequence[int]) -> "ActivationSet":
        """Rows of the given proteins only (protein indices are preserved, so labels still line up)."""
        mask = torch.zeros(len(self.protein_ids), dtype=torch.bool)
        mask[torch.as_tensor(list(keep), dtype=torch.long)] = True
        rows = mask[self.protein]
        return ActivationSet(self.acts[rows], self.protein[rows], self.position[rows], self.protein_ids,
                             self.sequences, dict(self.meta))

    def save(self, out_dir: str | os.PathLike, shard_rows: int = SHARD_ROWS) -> Path:
        """Write shards + meta.json; shards are complete files renamed into place (a crash leaves no half shard)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        n_shards = 0
        for s in range(0, max(len(self), 1), shard_rows):
            name = f"shard_{n_shards:05d}.safetensors"
            tmp = out / (name + ".tmp")
            save_file({"acts": self.acts[s:s + shard_rows].contiguous(),
                       "protein": self.protein[s:s + shard_rows].contiguous(),
                       "position": self.position[s:s + shard_rows].contiguous()}, str(tmp))
            os.replace(tmp, out / name)
            n_shards += 1
        meta = dict(self.meta, n_rows=len(self), n_shards=n_shards, protein_ids=self.protein_ids,
                    sequences=self.sequences)
        tmp = out / "meta.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, out / "meta.json")
        return out

    @classmethod
    def load(cls, cache_dir: str | os.PathLike) -> "ActivationSet":
        from safetensors.torch import load_file

        d = Path(cache_dir)
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InputError(f"{d}: not an activation cache (meta.json unreadable: {e})") from e
        parts = [load_file(str(d / f"shard_{i:05d}.safetensors")) for i in range(meta["n_shards"])]
        ids, seqs = meta.pop("protein_ids"), meta.pop("sequences")
        return cls(torch.cat([p["acts"] for p in parts]), torch.cat([p["protein"] for p in parts]),
                   torch.cat([p["position"] for p in parts]), ids, seqs, meta)


def collect_activations(runner: EsmRunner, hook: HookPoint, proteins: Sequence[tuple[str, str]],
                        tokens_per_protein: int | None = 64, max_residues: int = 1022, toks_per_batch: int = 16384,
                        seed: int = 0, progress=None) -> ActivationSet:
    """Run the PLM over (id, sequence) pairs and keep `tokens_per_protein` random residues each (None: all).

    Proteins longer than `max_residues` are cropped to a random window of that length (ESM-2 was trained on
    crops), which keeps training activations in the model's regime.
    """
    rng = np.random.default_rng(seed)
    crops = []
    for pid, seq in proteins:
        if len(seq) > max_residues:
            s = int(rng.integers(0, len(seq) - max_residues + 1))
            crops.append((s, seq[s:s + max_residues]))
        else:
            crops.append((0, seq))
    acts, prot, pos = [], [], []
    for batch in plan_batches([len(c[1]) for c in crops], toks_per_batch):
        seqs = [crops[i][1] for i in batch]
        h = runner.hook_activations(runner.tokenizer.batch(seqs), hook)
        for b, i in enumerate(batch):
            n = len(seqs[b])
            sel = np.arange(n)
            if tokens_per_protein is not None and n > tokens_per_protein:
                sel = np.sort(rng.choice(n, tokens_per_protein, replace=False))
            st = torch.from_numpy(sel)
            acts.append(h[b, 1 + st].to("cpu", torch.float16))
            prot.append(torch.full((len(sel),), i, dtype=torch.long))
            pos.append(st + crops[i][0])
        if progress is not None:
            progress(sum(len(seqs[b]) for b in range(len(batch))))
    if not acts:
        raise InputError("no activations collected: the input has no valid proteins")
    meta = {"plm": runner.plm.name, "plm_sha256": runner.plm.sha256, "hook_point": hook.point, "layer": hook.layer,
            "tokens_per_protein": tokens_per_protein, "seed": seed}
    return ActivationSet(torch.cat(acts), torch.cat(prot), torch.cat(pos), [p[0] for p in proteins],
                         [p[1] for p in proteins], meta)


def iter_batches(n_rows: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled row indices in batches (one epoch); the last partial batch is dropped to keep steps uniform."""
    perm = torch.randperm(n_rows, generator=generator)
    for s in range(0, n_rows - batch_size + 1, batch_size):
        yield perm[s:s + batch_size]
