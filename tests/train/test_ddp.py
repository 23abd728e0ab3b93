"""Multi-process training on CPU with the gloo backend: the dead-latent reductions on their own, and a real
`torchrun --nproc_per_node=2` job checked against a single-process run with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from protsae_cli.train.activations import ActivationCache
from protsae_cli.train.trainer import load_state
from tests.train_helpers import proteins, write_concept_tsv, write_fasta


def _reduce_worker(rank: int, world: int, store: str, results) -> None:
    import torch.distributed as dist

    from protsae_cli.train.distributed import DistEnv, reduce_fired, reduce_tokens_since

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    env = DistEnv(rank=rank, world_size=world, backend="gloo")
    fired = torch.tensor([rank == 0, rank == 1, False, True])
    since = torch.tensor([5, 100, 7, 0]) if rank == 0 else torch.tensor([9, 3, 7, 1])
    results[rank] = (reduce_fired(fired, env).tolist(), reduce_tokens_since(since, env).tolist())
    dist.destroy_process_group()


def test_dead_latent_reductions_agree_across_ranks(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_reduce_worker, args=(2, str(tmp_path / "store"), results), nprocs=2, join=True)
    assert results[0] == results[1] == ([True, True, False, True], [5, 3, 7, 0])


def test_reductions_are_identities_in_one_process():
    from protsae_cli.train.distributed import SINGLE, reduce_fired, reduce_tokens_since

    fired = torch.tensor([True, False])
    assert reduce_fired(fired, SINGLE) is fired
    assert reduce_tokens_since(torch.tensor([3, 4]), SINGLE).tolist() == [3, 4]


def test_torchrun_two_processes_match_one_process(tmp_path, tiny_esm_path):
    prots = proteins(40)
    fasta = write_fasta(tmp_path / "p.fasta", prots)
    tsv = write_concept_tsv(tmp_path / "c.tsv", prots)
    cache = tmp_path / "cache"
    args = [str(fasta), "-m", str(tiny_esm_path), "--layer", "2", "--d-sae", "64", "--k", "4", "--arch", "protsae",
            "-a", str(tsv), "--min-concept-residues", "5", "--tokens-per-protein", "32", "--val-fraction", "0.2",
            "--batch-size", "128", "--max-steps", "16", "--eval-every", "8", "--lr", "0.01", "--device", "cpu",
            "--dead-after-tokens", "300", "--activation-cache", str(cache), "--no-progress", "--save-after", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "protsae_cli",
           "-q", "train", *args, "-o", str(tmp_path / "ddp"), "--ddp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("wrote ") == 1  # one process reports (and writes)

    # Both ranks collected half of the proteins into the shared cache; rank 0 listed the shards.
    c = ActivationCache.open(cache)
    files = sorted(p.name for p in c.shard_files)
    assert files[0].startswith("shard_r0000_") and files[-1].startswith("shard_r0001_")
    assert sorted(set(c.load().protein.tolist())) == list(range(40))

    ddp = tmp_path / "ddp"
    assert sorted(p.name for p in ddp.iterdir()) == ["README.md", "config.json", "sae.safetensors",
                                                     "train_state.pt", "training_log.json"]

    single = tmp_path / "single"
    proc = subprocess.run([sys.executable, "-m", "protsae_cli", "-q", "train", *args, "-o", str(single)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = load_file(str(ddp / "sae.safetensors")), load_file(str(single / "sae.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    sa, sb = load_state(ddp), load_state(single)
    assert sa["world_size"] == 2 and sb["world_size"] == 1
    assert torch.equal(sa["tokens_since"], sb["tokens_since"])  # dead-latent counters agree
    assert (sa["tokens_since"] > 300).any()  # ... and some latent was dead, so AuxK ran
    for ea, eb in zip(sa["evals"], sb["evals"]):
        assert ea["val"]["l_annot"] == pytest.approx(eb["val"]["l_annot"], rel=1e-4)
        assert ea["val"]["nmse"] == pytest.approx(eb["val"]["nmse"], rel=1e-4)
