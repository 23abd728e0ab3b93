"""The options of `protsae train`: what to train on (TrainOptions) and how (TrainConfig), with every default.

Why a module of its own: the CLI reads its defaults from here (they live once), and the CLI must not import
torch to show `--help` or to reject a bad option, so this module imports nothing heavy.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

LR_SCHEDULES = ("cosine", "multistep", "constant")


@dataclass
class TrainConfig:
    d_sae: int = 4096
    k: int = 32
    lr: float = 4e-4
    batch_size: int = 4096              # global: tokens per step over all ranks
    epochs: int = 5
    max_steps: int | None = None
    warmup_frac: float = 0.05
    lr_schedule: str = "cosine"         # cosine | multistep (released ProtSAE: x0.1 after 5 of 50 epochs) | constant
    lr_milestones: tuple[float, ...] = (0.1,)  # multistep: fractions of the run where lr *= lr_gamma
    lr_gamma: float = 0.1
    auxk_alpha: float = 1 / 32
    k_aux: int | None = None            # default: d_model // 2
    dead_after_tokens: int = 2_000_000  # a latent unseen for this many tokens counts as dead
    seed: int = 0
    device: str = "cpu"
    log_every: int = 50
    eval_every: int | None = None       # steps between validations; None: once per epoch
    save_after: float | None = None     # fraction of the run before which evals cannot be selected;
                                        # None: 0.6 for ProtSAE (30 of 50 epochs, released code), 0 for TopK
    state_every: int | None = 1000      # steps between resumable training states (and always at the end)
    stop_at: int | None = None          # stop (resumably) after this step; the schedule still spans the run
    eval_batch_size: int = 8192
    init_rows: int = 65_536             # rows for the normalisation / b_dec / concept-prior fit
    extra: dict = field(default_factory=dict)


ARCHS = ("topk", "protsae")


@dataclass
class TrainOptions:
    fasta: str
    output: str
    model: str | None = None
    layer: int = 4
    hook: str = "resid_post"
    arch: str = "topk"
    d_sae: int = 4096
    k: int = 32
    tokens_per_protein: int | None = 64
    max_proteins: int | None = None
    val_fraction: float = 0.05
    max_val_tokens: int = 262_144        # validation rows kept (whole proteins, seeded) -- bounds eval cost
    activation_cache: str | None = None
    stream: bool | None = None           # stream the cache through a shuffle buffer; None: when it is big
    shuffle_buffer: int = 262_144        # rows held by the streaming shuffle buffer
    cache_only: bool = False             # write the activation cache and stop
    device: str = "auto"
    ddp: bool = False                    # require a torchrun environment
    resume: str | None = None
    # ProtSAE
    annotations: list[str] = field(default_factory=list)
    annotation_formats: list[str] = field(default_factory=list)
    ontologies: list[str] = field(default_factory=list)    # OBO files; default: the shipped PSC ontology
    concepts: list[str] | None = None
    min_concept_residues: int = 10
    label_granularity: str | None = None                   # residue | protein; None: from the sources
    protsae: dict = field(default_factory=dict)            # ProtSAE model options (protsae_model.PROTSAE_DEFAULTS)
    train: TrainConfig = field(default_factory=TrainConfig)
    progress: bool = True
    auto_batch: bool = False             # --batch-size not given: lower it to the training rows when fewer
    command: str = field(default_factory=lambda: shlex.join(["protsae", *sys.argv[1:]]))
