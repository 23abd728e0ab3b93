"""`protsae train`: options in, one library call."""

from __future__ import annotations

import os

import typer

from protsae_cli.sae.config import ProtSAEConfig as P  # the defaults live in these three (import-light)
from protsae_cli.train.options import TrainConfig as C
from protsae_cli.train.options import TrainOptions as T
from protsae_cli.cli.options import (CONCEPTS_PANEL, MODELS_PANEL, AnnotationFormatOpt, AnnotationsOpt, Arch, BiasRef,
                                     DefinedBias, DeviceOpt, HookPoint, LabelGranularity, LrSchedule, OntologyOpt,
                                     PlmOpt, Pool, ProgressOpt, TopkScope, open_ends)

DATA, MODEL, SAE, OPT = "Data", MODELS_PANEL, "SAE", "Optimisation"
LABELS, CONCEPTS, RUN = CONCEPTS_PANEL, "ProtSAE model and losses", "Checkpoints, resume and multi-GPU"


def command(
    fasta: str = typer.Argument(..., help="Training proteins (FASTA, .gz or -).", show_default=False),
    output: str = typer.Option(..., "--output", "-o", metavar="DIR", help="Output SAE directory.", show_default=False),
    model: PlmOpt = None,
    layer: int = typer.Option(T.layer, "--layer", "-l", rich_help_panel=MODEL, min=1,
                              help="1-based transformer block to hook (fair-esm repr_layers index)."),
    hook: HookPoint = typer.Option(HookPoint(T.hook), "--hook", rich_help_panel=MODEL,
                             help="resid_post (block output) or attn_out (after the attention residual add)."),
    arch: Arch = typer.Option(Arch(T.arch), "--arch", rich_help_panel=SAE,
                             help="topk (unsupervised) or protsae (concept-bound latents; needs --annotations)."),
    d_sae: int = typer.Option(T.d_sae, "--d-sae", rich_help_panel=SAE, min=1, help="Number of latents."),
    k: int = typer.Option(T.k, "--k", rich_help_panel=SAE, min=1, help="Active latents per residue (TopK)."),
    tokens_per_protein: int = typer.Option(T.tokens_per_protein, "--tokens-per-protein", rich_help_panel=DATA, min=0,
                                           help="Residues sampled per protein (0 = all; ProtSAE's code: 100)."),
    max_proteins: int | None = typer.Option(None, "--max-proteins", rich_help_panel=DATA, min=1,
                                               help="Use a seeded random subset of this many proteins."),
    val_fraction: float = typer.Option(T.val_fraction, "--valid-fraction", "--val-fraction", rich_help_panel=DATA, min=0,
                                       callback=open_ends(high=1),
                                       help="Fraction of proteins held out for validation and checkpoint "
                                            "selection, in [0, 1)."),
    max_val_tokens: int = typer.Option(T.max_val_tokens, "--max-val-tokens", rich_help_panel=DATA, min=1,
                                       help="Cap on validation rows (whole proteins, seeded)."),
    activation_cache: str | None = typer.Option(None, "--activation-cache", metavar="DIR", rich_help_panel=DATA,
                                                   help="Directory to save activation shards to, or reuse them from."),
    stream: bool | None = typer.Option(None, "--stream/--in-memory", rich_help_panel=DATA, show_default=False,
                                          help="Stream the activation cache through a shuffle buffer, or load it "
                                               "whole \\[default: stream when it exceeds a quarter of RAM]."),
    shuffle_buffer: int = typer.Option(T.shuffle_buffer, "--shuffle-buffer", rich_help_panel=DATA, min=1,
                                       help="Rows held by the streaming shuffle buffer (bounds its memory)."),
    cache_only: bool = typer.Option(T.cache_only, "--cache-only", rich_help_panel=DATA,
                                    help="Write the --activation-cache and stop (build it once, train many)."),
    annotations: AnnotationsOpt = [],
    annotation_format: AnnotationFormatOpt = [],
    ontology: OntologyOpt = [],
    concepts: str | None = typer.Option(None, "--concepts", metavar="LIST", rich_help_panel=LABELS,
                                           help="Comma-separated concept ids or names, in latent order "
                                                "\\[default: all with --min-concept-residues positives]."),
    min_concept_residues: int = typer.Option(T.min_concept_residues, "--min-concept-residues", rich_help_panel=LABELS, min=1,
                                             help="Least positive residues (proteins, at protein granularity) "
                                                  "among training proteins for a concept to get a latent."),
    label_granularity: LabelGranularity | None = typer.Option(
        None, "--label-granularity", rich_help_panel=LABELS,
        help="residue (per-residue BCE) or protein (BCE on pooled probabilities) \\[default: residue when any "
             "source is residue-level]."),
    pool: Pool = typer.Option(Pool(P.pool), "--pool", rich_help_panel=CONCEPTS, help="Protein pooling: mean or max."),
    lambda_annot: float = typer.Option(P.lambda_annot, "--lambda-annot", rich_help_panel=CONCEPTS, min=0,
                                       help="Weight of the concept BCE (released code 10; paper 1)."),
    lambda_axiom: float = typer.Option(P.lambda_axiom, "--lambda-axiom", rich_help_panel=CONCEPTS, min=0,
                                       help="Weight of the ELEmbeddings axiom loss."),
    margin: float = typer.Option(P.margin, "--margin", rich_help_panel=CONCEPTS, min=0, help="EL margin gamma."),
    topk_scope: TopkScope = typer.Option(
        TopkScope.AUTO, "--topk-scope", rich_help_panel=CONCEPTS,
        help="defined_first: a concept the model calls is admitted to TopK before any free latent (L0 <= k); "
             "all: one TopK over all latents (the library default, docs/METHOD.md §1.10); unknown: defined "
             "latents always kept, L0 up to k + concepts, encoded by the torch backend only. auto: defined_first "
             "with residue labels, all with protein labels."),
    defined_bias: DefinedBias = typer.Option(
        DefinedBias.AUTO, "--defined-bias", rich_help_panel=CONCEPTS,
        help="calibrated: a defined latent is zero below a cut fitted to validation F1 at every validation, "
             "graded above it; none: a graded score wherever W x > 0, called above a threshold calibrated at "
             "the end (the library default, docs/METHOD.md §1.10); pred: includes the predictor's bias, positive "
             "where p > 0.5. auto: calibrated with residue labels (and validation proteins), none otherwise."),
    predictor_lr: float | None = typer.Option(
        None, "--predictor-lr", rich_help_panel=CONCEPTS, callback=open_ends(low=0),
        help="Peak learning rate of the concept predictor (a logistic regression under the stop-gradient, "
             "which converges at a far larger step than the dictionary); same schedule as --lr. Default: 0.03 "
             "with residue labels, --lr with protein labels."),
    bias_ref: BiasRef = typer.Option(BiasRef(P.bias_ref), "--bias-ref", rich_help_panel=CONCEPTS,
                                 help="Forced-activation level: active_mean, all_mean or kth_value."),
    no_detach: bool = typer.Option(not P.detach, "--no-detach", rich_help_panel=CONCEPTS,
                                   help="Ablation: let reconstruction gradients move the concept predictor."),
    no_r_pred: bool = typer.Option(not P.use_r_pred, "--no-r-pred", rich_help_panel=CONCEPTS,
                                   help="Ablation: no learned log-scale of defined latents."),
    no_forced_activation: bool = typer.Option(not P.forced_activation, "--no-forced-activation", rich_help_panel=CONCEPTS,
                                              help="Ablation: no forced activation of predicted concepts."),
    no_axiom: bool = typer.Option(not P.use_axiom, "--no-axiom", rich_help_panel=CONCEPTS,
                                  help="Ablation: no ontology axiom loss."),
    epochs: int = typer.Option(C.epochs, "--epochs", rich_help_panel=OPT, min=1),
    max_steps: int | None = typer.Option(None, "--max-steps", rich_help_panel=OPT, min=1,
                                            help="Stop after this many steps (the schedule spans them)."),
    batch_size: int | None = typer.Option(None, "--batch-size", rich_help_panel=OPT, min=1, show_default=False,
                                             help=f"Tokens per step, over all processes \\[default: "
                                                  f"{C.batch_size}, or all training tokens when there are fewer]."),
    lr: float = typer.Option(C.lr, "--lr", rich_help_panel=OPT, callback=open_ends(low=0),
                             help="Peak learning rate (ProtSAE's code: 5e-4)."),
    lr_schedule: LrSchedule = typer.Option(LrSchedule(C.lr_schedule), "--lr-schedule", rich_help_panel=OPT,
                                    help="cosine (with warm-up), multistep (x0.1 after 10% of the run, as "
                                         "ProtSAE's released code) or constant."),
    auxk_alpha: float = typer.Option(C.auxk_alpha, "--auxk-alpha", rich_help_panel=OPT, min=0,
                                     help="Weight of the AuxK loss."),
    dead_after_tokens: int = typer.Option(C.dead_after_tokens, "--dead-after-tokens", rich_help_panel=OPT, min=1,
                                          help="A latent silent for this many tokens is dead (AuxK revives it)."),
    seed: int = typer.Option(C.seed, "--seed", rich_help_panel=OPT,
                             help="Seeds residue sampling, the train/validation split, initialisation and order."),
    device: DeviceOpt = T.device,
    eval_every: int | None = typer.Option(None, "--eval-every", rich_help_panel=RUN, min=1,
                                             help="Validate every N steps \\[default: once per epoch]."),
    save_after: float | None = typer.Option(
        None, "--save-after", rich_help_panel=RUN, min=0, max=1,
        help="Fraction of the run before which checkpoints cannot be selected \\[default: 0.6 for protsae, as the "
             "released code's epoch 30 of 50; 0 for topk]."),
    state_every: int = typer.Option(C.state_every, "--state-every", rich_help_panel=RUN, min=1,
                                    help="Write the resumable training state every N steps (and at the end)."),
    resume: str | None = typer.Option(None, "--resume", metavar="PATH", rich_help_panel=RUN,
                                         help="Continue from an output directory's train_state.pt (or that file)."),
    stop_at_step: int | None = typer.Option(None, "--stop-at-step", rich_help_panel=RUN, min=1,
                                               help="Stop resumably after this step (e.g. before a job time limit)."),
    ddp: bool = typer.Option(T.ddp, "--ddp", rich_help_panel=RUN,
                             help="Require a torchrun launch (DDP is used whenever torchrun starts >1 process)."),
    progress: ProgressOpt = T.progress,
) -> None:
    """Train a TopK sparse autoencoder, or a ProtSAE with concept-bound latents, on ESM-2 activations of a FASTA.

    Example (from the repository root; the 20 bundled proteins: about 20 s on 2 CPU cores, the batch lowered
    to the ~1,200 tokens they give):

    [bold]$ protsae train examples/proteins.fasta --layer 4 --d-sae 4096 --k 32 -o my_sae[/bold]

    With your own label files: [bold]protsae train YOUR.fasta --arch protsae -a YOUR.3line -a YOUR_binding.tsv
    -o my_protsae[/bold]

    Multi-GPU: [bold]torchrun --standalone --nproc_per_node=4 -m protsae_cli train ... --activation-cache acts[/bold];
    several nodes: add --nnodes=N --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB on every node
    (the cache and output directory on a shared file system). --batch-size is the global batch.
    """
    from protsae_cli.logging_setup import is_quiet
    from protsae_cli.train.pipeline import train_sae

    protsae = {}
    if arch is Arch.PROTSAE:
        protsae = {"pool": pool.value, "lambda_annot": lambda_annot, "lambda_axiom": lambda_axiom, "margin": margin,
                   "topk_scope": topk_scope.value, "defined_bias": defined_bias.value, "bias_ref": bias_ref.value,
                   "predictor_lr": "auto" if predictor_lr is None else predictor_lr,
                   "detach": not no_detach,
                   "use_r_pred": not no_r_pred, "forced_activation": not no_forced_activation,
                   "use_axiom": not no_axiom}
    opts = T(
        fasta=fasta, output=output, model=model, layer=layer, hook=hook.value, arch=arch.value, d_sae=d_sae, k=k,
        tokens_per_protein=tokens_per_protein or None, max_proteins=max_proteins, val_fraction=val_fraction,
        max_val_tokens=max_val_tokens, activation_cache=activation_cache, stream=stream,
        shuffle_buffer=shuffle_buffer, cache_only=cache_only, device=device, ddp=ddp, resume=resume,
        annotations=list(annotations), annotation_formats=[f.value for f in annotation_format],
        ontologies=list(ontology or []),
        concepts=[c.strip() for c in concepts.split(",") if c.strip()] if concepts else None,
        min_concept_residues=min_concept_residues,
        label_granularity=label_granularity.value if label_granularity else None, protsae=protsae,
        progress=progress and not is_quiet(), auto_batch=batch_size is None,
        train=C(d_sae=d_sae, k=k, lr=lr, batch_size=C.batch_size if batch_size is None else batch_size, epochs=epochs,
                max_steps=max_steps,
                          lr_schedule=lr_schedule.value, auxk_alpha=auxk_alpha, dead_after_tokens=dead_after_tokens,
                          seed=seed, eval_every=eval_every, save_after=save_after, state_every=state_every,
                          stop_at=stop_at_step),
    )
    out = train_sae(opts)
    if os.environ.get("RANK", "0") == "0":  # one line per job, not per DDP process
        typer.echo(f"wrote {out}", err=True)
