"""Multi-GPU / multi-node plumbing for training: process-group set-up from torchrun's environment and the few
collective operations the trainer needs.

Launch (one node, 4 GPUs)::

    torchrun --standalone --nproc_per_node=4 -m protsae_cli train proteins.fasta -o sae --activation-cache acts

Several nodes (run on every node; HOST is any one node reachable by the others)::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=job42 \\
        -m protsae_cli train proteins.fasta -o sae --activation-cache /shared/acts

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; we pick NCCL when the processes train on CUDA and gloo on CPU.
Everything else (which rank writes, how batches are split) lives in the trainer; this module only knows
about processes.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch

from protsae_cli.errors import InputError

log = logging.getLogger("protsae.distributed")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job. A single process is rank 0 of a world of size 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistEnv()


def torchrun_env() -> dict[str, int] | None:
    """WORLD_SIZE/RANK/LOCAL_RANK when launched by torchrun (or any env:// launcher), else None."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return {"world_size": int(os.environ["WORLD_SIZE"]), "rank": int(os.environ["RANK"]),
                "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}
    except ValueError as e:
        raise InputError(f"malformed torchrun environment ({e})") from e


def init_distributed(device: str = "auto", require: bool = False,
                     timeout_s: float = 1800.0) -> tuple[DistEnv, torch.device]:
    """Join the process group torchrun describes and choose this rank's device.

    `device` is the user's --device: "auto" means CUDA when present. On CUDA each rank takes GPU LOCAL_RANK
    and the backend is NCCL; on CPU the backend is gloo. `require` (from --ddp) turns a missing torchrun
    environment into an error instead of a single-process run.
    """
    from protsae_cli.runtime import resolve_device

    env = torchrun_env()
    if env is None or env["world_size"] <= 1:
        if require and env is None:
            raise InputError("--ddp needs the torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK); launch with "
                             "`torchrun --nproc_per_node=N -m protsae_cli train ...`")
        return SINGLE, resolve_device(device)
    import torch.distributed as dist

    base = resolve_device(device)
    if base.type == "cuda":
        if env["local_rank"] >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {env['local_rank']} but only {torch.cuda.device_count()} GPUs visible")
        dev = torch.device("cuda", env["local_rank"])
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    de = DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=env["local_rank"],
                 backend=backend)
    log.info("rank %d/%d (local %d) on %s, backend %s", de.rank, de.world_size, de.local_rank, dev, backend)
    return de, dev


def shutdown(env: DistEnv) -> None:
    if env.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over ranks, in place and returned (identity for one process)."""
    if env.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def reduce_fired(fired: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """OR of per-rank 'latent fired in this step' masks, so every rank updates identical dead-latent counters.

    Each rank sees only its slice of the global batch; without the OR a latent firing only on rank 1's rows
    would count as dead on rank 0, and AuxK would then differ across ranks (gradients would be averaged over
    inconsistent objectives). MAX over 0/1 is OR; uint8 keeps the message small.
    """
    if not env.enabled:
        return fired
    import torch.distributed as dist

    t = fired.to(torch.uint8)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.bool()


def reduce_tokens_since(tokens_since: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """MIN of per-rank tokens-since-fired counters: a latent is alive if any rank saw it recently.

    The trainer keeps counters identical by construction (`reduce_fired` every step); this is for counters
    that may have drifted (e.g. restored from different files) and is cheap enough to run at every resume.
    """
    if not env.enabled:
        return tokens_since
    import torch.distributed as dist

    dist.all_reduce(tokens_since, op=dist.ReduceOp.MIN)
    return tokens_since

