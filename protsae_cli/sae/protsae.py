"""ProtSAE: a TopK SAE whose first m latents are bound to concepts (METHOD.md §1.3-1.6).

Latent layout: latents 0..m-1 are the *defined* latents, latent c standing for concept c (`cfg.concepts`,
and `NormalForms.class_ids[c]`); latents m..n-1 are free ("unknown") latents trained exactly as in a TopK SAE.

Parameters (beyond the decoder, decoder bias and normalisation shared with `TopKSAE`):

- `W_pred [m, d]`, `b_pred [m]`: the concept predictor, pi = sigmoid(W_pred (x_n - b_dec) + b_pred), trained
  by binary cross-entropy on concept labels and by the ELEmbeddings axiom loss (row c is concept c's ball
  centre). `r_pred [m]` is a learned log-scale.
- `W_unk [n-m, d]`, `b_unk [n-m]`: encoder of the unknown latents. There is deliberately no `W_enc`: the
  defined latents' encoder rows are *derived* from the predictor (exp(r_pred) * sg(W_pred)), so storing a
  full `W_enc` would keep m dead rows that silently disagree with what the model computes. Code that needs
  the effective encoder calls `pre_activations()` (differentiable) or `encoder_affine()` (folded, for the
  fast backends); code that reaches for `sae.W_enc` fails loudly instead of reading stale rows.
- `class_radius [m + m0]`, `zero_emb [m0, d]`, `rel_emb [R + 1, d]`: the rest of the EL embedding. The
  extra relation row is DeepGO-SE's hasFunction slot; W_pred rows are already the hasFunction-translated
  centres (METHOD.md §1.5), so the axiom losses never index it. Radii come from `class_radius`, a dedicated
  parameter, rather than |b_pred|: b_pred is the predictor's decision threshold and is pushed negative for
  rare concepts by BCE; tying it to a ball size would make the BCE and the subclass axioms fight over one
  number. (`radius_source="b_pred"` gives the DeepGO-SE-style coupling for comparison.)

Defined pre-activation, three forms (`defined_bias`):

- "none" (the library default, METHOD.md §1.10): z_def = exp(r_pred) * sg(W_pred) x~. A graded concept score,
  positive wherever W_pred x~ > 0, which for a rare concept (b_pred << 0) includes many residues the predictor
  rejects; `train_protsae.calibrate_thresholds` sets each concept's annotation threshold on validation proteins.
- "pred" (the formula as the paper reads): z_def = exp(r_pred) * (sg(W_pred) x~ + sg(b_pred)), positive exactly
  when pi_c > 0.5, which a rare concept's predictor seldom reaches.
- "calibrated": z_def = exp(r_pred) * (sg(W_pred) x~ - theta_c), with theta_c (buffer `defined_offset`) the cut of
  best validation residue F1, re-fitted before every validation (`train_protsae.calibrate_defined_offsets`). The
  latent is zero where the model does not call the concept and graded where it does, like any SAE latent.
  `protsae train` uses it for residue-level concepts (train_protsae.RESIDUE_RECIPE; docs/RESULTS.md measures all
  three). Forced activation then protects the latent's own calls (z_def > 0) instead of pi > 0.5.

TopK admission (`topk_scope`): "all" is one TopK over all n latents; "unknown" keeps defined latents outside TopK
(code width k + m); "defined_first" admits every active defined latent before any unknown one (L0 <= k), so a call
is never crowded out by the entangled unknown latents at inference, which with plain TopK dropped most calls of
rare concepts. It is still a single selection over affine pre-activations (`sae.priority_topk_relu`: TopK on a key
that lifts positive defined latents above the row maximum), so every fast backend runs it.

The predictor and the EL tables may train at their own learning rate (`predictor_lr`): under the stop-gradient the
predictor is a logistic regression, which needs a much larger step than the dictionary to converge within an
SAE's budget.

Training vs inference (the decision that keeps `annotate` fast):

- *Training* (`forward_train`) adds the forced-activation bias before TopK: for every concept the predictor
  calls (pi_c > 0.5) a defined activation below the reference level is raised to it, so that the decoder
  learns to use defined latents instead of routing around them through the entangled unknown latents. It is
  a training device: it decides which latents the decoder sees and thereby shapes W_dec.
- *Inference* (`encode`, `encode_dense`, `forward`) is plain TopK on the affine pre-activations above. The
  forced bias needs the reference level, a nonlinear function of the unknown activations, so it cannot be
  folded into the (W, b) pair that every fast backend (torch, Triton, ONNX) consumes; with plain TopK,
  `encoder_affine()` (with `priority_latents` for "defined_first") reproduces `encode()` exactly and a ProtSAE
  annotates like any TopK SAE. Forcing only
  lifts magnitudes of latents the predictor calls, so the cost is some TopK admissions at inference (measured
  by `participation`), not different concept scores. `inference_forced=True` applies the forced bias at inference too (for measuring that
  cost); `encoder_affine()` then refuses, as it does for `topk_scope="unknown"`, whose "defined latents
  always kept" rule is not a single TopK over all latents either.

Gradient routing (what makes the defined latents mean their concept):

- reconstruction reaches W_pred/b_pred only if `detach=False` (the "w/o detach" ablation); otherwise it
  changes only r_pred (magnitude), never the direction or threshold;
- the predictor sees x_n - sg(b_dec): b_pred can absorb any constant shift, so letting BCE move the
  decoder bias would only leak annotation pressure into reconstruction;
- the forced bias follows the formula's own autograd with the reference level detached: where a latent is
  forced, its value is the (constant) reference, so neither r_pred nor the unknown encoder is pulled by it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from protsae_cli.sae.el_loss import check_normal_form_ranges, el_losses
from protsae_cli.errors import InputError
from protsae_cli.sae.config import PROTSAE_CHOICES as _CHOICES  # noqa: F401 (tests check the CLI lists them)
from protsae_cli.sae.config import PROTSAE_DEFAULTS, ProtSAEConfig, SAEConfig
from protsae_cli.sae.base import SAE, EncoderOutput, register_arch
from protsae_cli.sae.topk import priority_key, priority_topk_relu, topk_relu






def resolve_protsae_options(cfg: SAEConfig) -> ProtSAEConfig:
    """Defaults filled in and validated, so the checkpoint records every option the model was built with."""
    unknown = set(cfg.protsae) - set(PROTSAE_DEFAULTS)
    if unknown:
        raise InputError(f"unknown ProtSAE option(s): {', '.join(sorted(unknown))}")
    opts = {**PROTSAE_DEFAULTS, **cfg.protsae}
    if opts["n_concepts"] is None:
        opts["n_concepts"] = len(cfg.concepts)
    # Options also come from a downloaded config.json: a value int()/float() cannot read is bad input, not a bug.
    for key in ("n_concepts", "n_zero_classes", "n_relations"):
        try:
            opts[key] = int(opts[key])
        except (TypeError, ValueError):
            raise InputError(f"ProtSAE option {key} must be an integer, got {opts[key]!r}") from None
        if opts[key] < 0:
            raise InputError(f"ProtSAE option {key} must be >= 0, got {opts[key]}")
    for key in ("lambda_annot", "lambda_axiom", "margin"):
        try:
            opts[key] = float(opts[key])
        except (TypeError, ValueError):
            raise InputError(f"ProtSAE option {key} must be a number, got {opts[key]!r}") from None
    if opts["predictor_lr"] is not None:
        try:
            opts["predictor_lr"] = float(opts["predictor_lr"])
        except (TypeError, ValueError):
            raise InputError(f"ProtSAE option predictor_lr must be a number, got {opts['predictor_lr']!r} "
                             "(\"auto\" is resolved by train_protsae.build_protsae)") from None
        if not opts["predictor_lr"] > 0:
            raise InputError(f"ProtSAE option predictor_lr must be > 0, got {opts['predictor_lr']}")
    for key in ("detach", "use_r_pred", "forced_activation", "use_axiom", "inference_forced", "el_standardize"):
        opts[key] = bool(opts[key])
    for key, choices in _CHOICES.items():
        if opts[key] not in choices:
            raise InputError(f"ProtSAE option {key}={opts[key]!r}; expected one of {', '.join(choices)}")
    m, n, k = opts["n_concepts"], cfg.d_sae, cfg.k
    if m < 1:
        raise InputError("ProtSAE needs at least one concept (protsae.n_concepts or cfg.concepts)")
    if m >= n:
        raise InputError(f"ProtSAE needs unknown latents: n_concepts={m} must be < d_sae={n}")
    if opts["defined_bias"] == "calibrated" and opts["label_granularity"] != "residue":
        raise InputError("defined_bias='calibrated' fits each defined latent's cut to residue labels; with "
                         "protein-level labels use 'none' or 'pred'")
    if opts["topk_scope"] in ("unknown", "defined_first") and k > n - m:
        raise InputError(f"topk_scope={opts['topk_scope']!r} needs k={k} <= number of unknown latents {n - m}")
    return ProtSAEConfig(**opts)


def pool_by_protein(values: torch.Tensor, protein_index: torch.Tensor, n_proteins: int,
                    how: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Pool per-token rows [N, C] into per-protein rows [P, C] with segment ops (autograd-safe).

    Returns (pooled [P, C], counts [P]); proteins without tokens get 0 and count 0, so callers mask them
    rather than treating "not in this batch" as a negative.
    """
    idx = protein_index.long()
    counts = torch.bincount(idx, minlength=n_proteins)[:n_proteins]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_proteins):
        raise InputError(f"protein_index must lie in 0..{n_proteins - 1}")
    exp_idx = idx.unsqueeze(-1).expand_as(values)
    if how == "mean":
        pooled = values.new_zeros((n_proteins, values.shape[1])).index_add(0, idx, values)
        pooled = pooled / counts.clamp_min(1).unsqueeze(-1).to(values.dtype)
    elif how == "max":
        pooled = values.new_zeros((n_proteins, values.shape[1])).scatter_reduce(
            0, exp_idx, values, reduce="amax", include_self=False)
    else:
        raise InputError(f"unknown pooling {how!r}; expected mean or max")
    return pooled, counts


def stable_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest per row, sorted, equal values resolved towards the lower index;
    differentiable through the values.

    Why not plain torch.topk: forced activation lifts every called concept of a token to the *same* reference
    level, so exact ties at the admission boundary are common, and torch.topk resolves them differently for
    different batch shapes, which made a DDP run (two half batches) train differently from one process.
    """
    with torch.no_grad():
        v, idx = torch.topk(values, k, dim=-1, sorted=True)
        tied = (values >= v[:, -1:]).sum(-1) > k
        if tied.any():
            rows = tied.nonzero().squeeze(1)
            idx[rows] = torch.sort(values[rows], dim=-1, descending=True, stable=True).indices[:, :k]
    return values.gather(-1, idx), idx


def defined_first_codes(defined: torch.Tensor, unknown: torch.Tensor, k: int) -> torch.Tensor:
    """Dense codes [N, m + u] with every active defined latent admitted before any unknown one, L0 <= k.

    `defined` [N, m] and `unknown` [N, u] are post-ReLU. Each token keeps its active defined latents (the k
    largest if more than k are active) and fills the remaining k - a slots with its largest unknown latents,
    so a concept the model calls is never crowded out of the code by entangled unknown latents: TopK over
    `sae.priority_key`, the key inference uses, with ties towards the lower index; differentiable through the
    kept values.
    """
    act = torch.cat([defined, unknown], -1)
    _, idx = stable_topk(priority_key(act.detach(), defined.shape[-1]), k)
    return torch.zeros_like(act).scatter(-1, idx, act.gather(-1, idx))


@register_arch("protsae")
class ProtSAE(SAE):
    """Semantically guided TopK SAE; see the module docstring for the parameterisation and its reasons.

    Built on `SAE` (decoder, normalisation), not on `TopKSAE`: it has no full `W_enc` (see the module doc)."""

    # Buffers (register_buffer in __init__), declared so type checkers see tensors, not `Tensor | Module`.
    defined_offset: torch.Tensor
    nf1: torch.Tensor
    nf2: torch.Tensor
    nf3: torch.Tensor
    nf4: torch.Tensor

    def __init__(self, cfg: SAEConfig):
        if cfg.arch != "protsae":
            raise InputError(f"ProtSAE needs cfg.arch='protsae', got {cfg.arch!r}")
        self.opts: ProtSAEConfig
        opts = resolve_protsae_options(cfg)
        cfg.protsae = opts.to_dict()
        super().__init__(cfg)
        self.opts = opts
        d, n = cfg.d_model, cfg.d_sae
        m, m0, n_rel = self.n_concepts, opts.n_zero_classes, opts.n_relations  # resolved: an int
        self.W_unk = nn.Parameter(torch.empty(n - m, d))
        self.b_unk = nn.Parameter(torch.zeros(n - m))
        self.W_pred = nn.Parameter(torch.empty(m, d))
        self.b_pred = nn.Parameter(torch.zeros(m))
        self.r_pred = nn.Parameter(torch.zeros(m))
        self.class_radius = nn.Parameter(torch.ones(m + m0))
        self.zero_emb = nn.Parameter(torch.empty(m0, d))
        self.rel_emb = nn.Parameter(torch.zeros(n_rel + 1, d))
        if self.opts.defined_bias == "calibrated":
            # Fitted, not learned: set by `train_protsae.calibrate_defined_offsets` at each validation.
            self.register_buffer("defined_offset", torch.zeros(m))
        for name, cols in (("nf1", 2), ("nf2", 3), ("nf3", 3), ("nf4", 3)):
            # Axioms are training data, re-read from the ontology; they are not part of the checkpoint.
            self.register_buffer(name, torch.empty(0, cols, dtype=torch.long), persistent=False)
        self.reset_parameters()

    # -- sizes and options ---------------------------------------------------------------------------
    @property
    def n_concepts(self) -> int:
        return int(self.opts.n_concepts or 0)

    @property
    def has_concept_predictor(self) -> bool:
        return True

    @property
    def code_width(self) -> int:
        """Slots per row returned by `encode()`: k, or k + m when defined latents bypass TopK."""
        return self.k + (self.n_concepts if self.opts.topk_scope == "unknown" else 0)

    @property
    def supports_affine_encode(self) -> bool:
        """True when `encoder_affine()` + TopK-k reproduces `encode()` (what the fast backends need)."""
        return self.opts.topk_scope != "unknown" and not self.opts.inference_forced

    @property
    def priority_latents(self) -> int:
        """Latents 0..p-1 that TopK admits first when positive (`topk_scope="defined_first"`), else 0: what an
        affine backend needs besides (W, b, k) to reproduce `encode()` (`sae.priority_topk_relu`)."""
        return self.n_concepts if self.opts.topk_scope == "defined_first" else 0

    def reset_parameters(self, seed: int | None = None) -> None:
        """Tied init as TopKSAE (encoder rows = decoder rows, unit norm), including the predictor rows.

        Unit-norm predictor rows on unit-variance-per-dimension inputs give logits of order 1, so BCE starts
        in its linear regime, and a defined latent starts on the same scale as an unknown one (r_pred = 0).
        """
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        m = self.n_concepts
        with torch.no_grad():
            w = torch.randn(self.W_dec.shape, generator=g)
            w /= w.norm(dim=-1, keepdim=True)
            self.W_dec.copy_(w)
            self.W_pred.copy_(w[:m])
            self.W_unk.copy_(w[m:])
            for p in (self.b_unk, self.b_pred, self.r_pred, self.rel_emb):
                p.zero_()
            self.class_radius.fill_(1.0)
            if self.zero_emb.numel():
                ze = torch.randn(self.zero_emb.shape, generator=g)
                self.zero_emb.copy_(ze / ze.norm(dim=-1, keepdim=True))

    @torch.no_grad()
    def init_concept_bias(self, prior: torch.Tensor, eps: float = 1e-4) -> None:
        """Start b_pred at the logit of each concept's label frequency.

        With b_pred = 0 every concept starts at pi = 0.5, so a 1 %-prevalence concept is called on half the
        tokens and forced activation floods TopK until BCE catches up; starting at the prior avoids that.
        """
        p = torch.as_tensor(prior, dtype=torch.float32, device=self.b_pred.device).clamp(eps, 1 - eps)
        self.b_pred.copy_(torch.log(p) - torch.log1p(-p))

    # -- ontology ------------------------------------------------------------------------------------
    def set_normal_forms(self, nf: Any) -> None:
        """Attach the axioms (a `protsae_cli.labels.ontology.NormalForms`) used by the axiom loss.

        Build the model with n_zero_classes = len(nf.class_ids) - m and n_relations = len(nf.relation_ids).

        Checks the class table against the model: the first m class ids must be the defined latents' concepts
        in latent order (a shifted list would silently attach axioms to the wrong latents).
        """
        m, m0, n_rel = self.n_concepts, self.opts.n_zero_classes, self.opts.n_relations
        if len(nf.class_ids) != m + m0:
            raise InputError(f"ontology has {len(nf.class_ids)} classes but the ProtSAE was built for "
                             f"{m} concepts + {m0} zero classes (n_zero_classes counts every non-concept "
                             "class, including classes introduced by normalisation)")
        nf_m = getattr(nf, "n_concepts", 0)
        if nf_m and nf_m != m:
            raise InputError(f"normal forms were built for {nf_m} concepts, the ProtSAE has {m}")
        if len(nf.relation_ids) != n_rel:
            raise InputError(f"ontology has {len(nf.relation_ids)} relations but the ProtSAE was built for {n_rel}")
        for entry in self.cfg.concepts:
            if 0 <= entry.latent < m and nf.class_ids[entry.latent] not in (
                    entry.concept_id, entry.ontology_id, entry.name):
                raise InputError(f"ontology class {nf.class_ids[entry.latent]!r} at position {entry.latent} does "
                                 f"not match the concept bound to latent {entry.latent} ({entry.concept_id!r})")
        dev = self.W_pred.device
        tensors = {}
        for name, cols in (("nf1", 2), ("nf2", 3), ("nf3", 3), ("nf4", 3)):
            t = torch.as_tensor(getattr(nf, name), dtype=torch.long).reshape(-1, cols).to(dev)
            tensors[name] = t
        try:
            check_normal_form_ranges(tensors["nf1"], tensors["nf2"], tensors["nf3"], tensors["nf4"],
                                     m + m0, n_rel)
        except ValueError as e:
            raise InputError(f"normal forms do not fit the ProtSAE's class/relation tables: {e}") from e
        for name, t in tensors.items():
            setattr(self, name, t)

    def class_centres(self) -> torch.Tensor:
        """EL class table [m + m0, d]: predictor rows (concepts) then zero-class embeddings."""
        return torch.cat([self.W_pred, self.zero_emb], 0)

    def class_radii(self) -> torch.Tensor:
        """Raw radius parameters [m + m0] (the loss takes their absolute value)."""
        if self.opts.radius_source == "b_pred":
            return torch.cat([self.b_pred, self.class_radius[self.n_concepts:]], 0)
        return self.class_radius

    def axiom_losses(self) -> dict[str, torch.Tensor]:
        """ELEmbeddings NF1-NF4 losses on the predictor rows ({nf1..nf4, total})."""
        return el_losses(self.class_centres(), self.class_radii(), self.rel_emb,
                         self.nf1, self.nf2, self.nf3, self.nf4, margin=self.opts.margin,
                         standardize=self.opts.el_standardize, validate=False)

    # -- encoder pieces ------------------------------------------------------------------------------
    def _concept_logits(self, x_n: torch.Tensor) -> torch.Tensor:
        return F.linear(x_n - self.b_dec.detach(), self.W_pred, self.b_pred)

    def _defined_scale(self) -> torch.Tensor:
        if self.opts.use_r_pred:
            return torch.exp(self.r_pred)
        return torch.ones_like(self.r_pred)

    def _defined_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Effective defined encoder rows and bias, unscaled: (sg(W_pred), sg(b_pred) | -theta | None)."""
        W: torch.Tensor = self.W_pred
        b: torch.Tensor = self.b_pred
        if self.opts.detach:
            W, b = W.detach(), b.detach()
        how = self.opts.defined_bias
        if how == "calibrated":
            return W, -self.defined_offset
        return W, (b if how == "pred" else None)

    def defined_scores(self, x_n: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Unscaled, unbiased defined scores W_pred (x_n - b_dec) [N, m]: what `defined_offset` is cut on
        (`dtype`: compute in another precision, e.g. float64 for a cut that must not depend on batch shape)."""
        x_c = x_n - self.b_dec
        W: torch.Tensor = self.W_pred
        if dtype is not None:
            x_c, W = x_c.to(dtype), W.to(dtype)
        return F.linear(x_c, W)

    def defined_pre(self, x_n: torch.Tensor) -> torch.Tensor:
        """Defined pre-activations [N, m] from normalised input (no forced bias, before TopK)."""
        W, b = self._defined_weights()
        return F.linear(x_n - self.b_dec, W, b) * self._defined_scale()

    def _pre_parts(self, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(defined pre-activations [N, m], unknown pre-activations [N, n-m]) from normalised input."""
        return self.defined_pre(x_n), F.linear(x_n - self.b_dec, self.W_unk, self.b_unk)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Inference pre-activations [N, n] (defined then unknown), differentiable; no forced bias."""
        return torch.cat(self._pre_parts(self.normalize(x)), -1)

    def encoder_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [n, d], b [n]) with pre_activations(x) = x @ W.T + b, for the TopK fast backends.

        Defined rows are exp(r_pred) * W_pred (bias exp(r_pred) * b_pred), folded with the normalisation and
        b_dec exactly like TopKSAE's rows. Refused when inference is not a single TopK over these
        pre-activations (topk_scope="unknown" or inference_forced=True): a backend would silently compute
        different codes.
        """
        if not self.supports_affine_encode:
            raise InputError(
                "this ProtSAE's inference is not plain TopK over affine pre-activations "
                f"(topk_scope={self.opts.topk_scope!r}, inference_forced={self.opts.inference_forced}); "
                "the fast encode backends cannot run it, use ProtSAE.encode()")
        with torch.no_grad():
            scale = self._defined_scale().unsqueeze(-1)
            W_def = self.W_pred * scale
            _, b = self._defined_weights()
            b_def = b * scale.squeeze(-1) if b is not None else torch.zeros_like(self.b_pred)
            W_full = torch.cat([W_def, self.W_unk], 0)
            b_full = torch.cat([b_def, self.b_unk], 0)
            W = W_full / self.norm_scale
            b = b_full - W_full @ (self.norm_mean / self.norm_scale + self.b_dec)
        return W.detach().clone(), b.detach().clone()

    # -- forced activation and TopK ------------------------------------------------------------------
    @torch.no_grad()
    def _reference_level(self, z_def: torch.Tensor, h_unk: torch.Tensor) -> torch.Tensor:
        """Per-token level [N, 1] that forced defined latents are raised to.

        The reference is taken from the *unforced* TopK (forcing cannot depend on its own outcome):
        "active_mean" = mean of the unknown latents that TopK keeps (METHOD.md §1.10's recommendation);
        "all_mean" = mean of z_unk over all unknown latents, zeros included (the formula read literally);
        "kth_value" = the TopK admission level, the smallest raise that can make a latent compete.
        """
        m, k = self.n_concepts, self.k
        if self.opts.topk_scope != "unknown":
            vals, idx = torch.topk(F.relu(torch.cat([z_def, h_unk], -1)), k, dim=-1)
            unk = (idx >= m) & (vals > 0)
        else:
            vals, _ = torch.topk(F.relu(h_unk), k, dim=-1)
            unk = vals > 0
        how = self.opts.bias_ref
        if how == "kth_value":
            return vals[:, -1:]
        total = (vals * unk).sum(-1, keepdim=True)
        if how == "all_mean":
            return total / h_unk.shape[-1]
        return total / unk.sum(-1, keepdim=True).clamp_min(1)

    def concept_calls(self, z_def: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Where the model calls each concept [N, m] (bool): pi > 0.5 (tested as logit > 0, without sigmoid
        rounding), or with `defined_bias="calibrated"` the defined latent's own cut (z_def > 0), so forced
        activation protects exactly the calls the latent makes."""
        if self.opts.defined_bias == "calibrated":
            return z_def.detach() > 0
        return logits.detach() > 0

    def _force(self, z_def: torch.Tensor, h_unk: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """z_def + 1[called] * ReLU(ref - z_def), with ref detached (see module doc on gradients).

        Written as a select so that a forced latent's value is exactly `ref` (z + (ref - z) can round off it):
        with one active unknown latent ref equals that latent's value, and an exact tie at the TopK boundary is
        then resolved by index (`stable_topk`) instead of by rounding noise that differs between batch shapes.
        The gradient is the formula's: zero where forced, identity elsewhere.
        """
        ref = self._reference_level(z_def.detach(), h_unk.detach())
        forced = self.concept_calls(z_def, logits) & (ref > z_def.detach())
        return torch.where(forced, ref.expand_as(z_def), z_def)

    def _sparsify(self, z_def: torch.Tensor, h_unk: torch.Tensor) -> torch.Tensor:
        """Dense codes [N, n] after TopK over the configured scope (differentiable through kept values)."""
        if self.opts.topk_scope == "all":
            pre = F.relu(torch.cat([z_def, h_unk], -1))
            vals, idx = stable_topk(pre, self.k)
            return torch.zeros_like(pre).scatter(-1, idx, vals)
        unk = F.relu(h_unk)
        if self.opts.topk_scope == "unknown":
            vals, idx = stable_topk(unk, self.k)
            return torch.cat([F.relu(z_def), torch.zeros_like(unk).scatter(-1, idx, vals)], -1)
        return defined_first_codes(F.relu(z_def), unk, self.k)

    def _codes(self, x_n: torch.Tensor, forced: bool) -> dict[str, torch.Tensor]:
        z_def, h_unk = self._pre_parts(x_n)
        logits = self._concept_logits(x_n)
        z_def_in = self._force(z_def, h_unk, logits) if forced else z_def
        return {"z": self._sparsify(z_def_in, h_unk), "logits": logits, "z_def_pre": z_def,
                "z_def_forced": z_def_in, "h_unk": h_unk}

    # -- inference -----------------------------------------------------------------------------------
    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Dense inference codes [N, n] (forced bias only if inference_forced)."""
        return self._codes(self.normalize(x.float()), self.opts.inference_forced)["z"]

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        """Sparse inference codes (idx [N, code_width], val), reference order, idx -1 in empty slots."""
        if self.supports_affine_encode:
            return EncoderOutput(*priority_topk_relu(self.pre_activations(x.float()), self.k, self.priority_latents))
        return EncoderOutput(*topk_relu(self.encode_dense(x), self.code_width))

    def backend_refusal(self, backend: str) -> str:
        return (f"the {backend} backend encodes TopK over affine pre-activations; this ProtSAE keeps its defined "
                f"latents outside TopK (topk_scope={self.opts.topk_scope!r}, inference_forced="
                f"{self.opts.inference_forced}); use --backend torch or auto")

    def concept_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """pi [N, m]: the predictor's probability of each concept at each token (eval, steering)."""
        return torch.sigmoid(self._concept_logits(self.normalize(x.float())))

    # -- training ------------------------------------------------------------------------------------
    def annotation_loss(self, logits: torch.Tensor, labels: torch.Tensor,
                        protein_index: torch.Tensor | None = None) -> torch.Tensor:
        """BCE between pi and concept labels, averaged over observed (row, concept) entries.

        NaN labels mean "not annotated" and are skipped: a protein absent from, say, the TMbed set is not a
        negative for transmembrane helix, and counting it as one would teach the predictor false negatives.
        Residue granularity: labels [N, m]. Protein granularity: labels [P, m] with protein_index [N]; pi is
        pooled over each protein's tokens in the batch (mean of probabilities, or max, computed on logits
        because sigmoid is monotone), and proteins with no token in the batch are skipped.
        """
        labels = labels.to(device=logits.device, dtype=logits.dtype)
        if labels.shape[-1] != self.n_concepts:
            raise InputError(f"labels have {labels.shape[-1]} concepts, the ProtSAE has {self.n_concepts}")
        if self.opts.label_granularity == "residue":
            if labels.shape[0] != logits.shape[0]:
                raise InputError(f"residue labels have {labels.shape[0]} rows for {logits.shape[0]} tokens")
            observed = ~torch.isnan(labels)
            y = torch.nan_to_num(labels)
            per = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        else:
            if protein_index is None:
                raise InputError("protein-level labels need protein_index (token -> protein row)")
            pidx = protein_index.to(logits.device)
            if pidx.shape[0] != logits.shape[0]:
                raise InputError(f"protein_index has {pidx.shape[0]} entries for {logits.shape[0]} tokens")
            if self.opts.pool == "max":
                pooled, counts = pool_by_protein(logits, pidx, labels.shape[0], "max")
                y = torch.nan_to_num(labels)
                per = F.binary_cross_entropy_with_logits(pooled, y, reduction="none")
            else:
                pooled, counts = pool_by_protein(torch.sigmoid(logits), pidx, labels.shape[0], "mean")
                y = torch.nan_to_num(labels)
                eps = 1e-6
                p = pooled.clamp(eps, 1 - eps)
                per = -(y * torch.log(p) + (1 - y) * torch.log1p(-p))
            observed = ~torch.isnan(labels) & (counts > 0).unsqueeze(-1)
        # No host sync: an all-unobserved batch gives exactly 0 (and zero gradient).
        return (per * observed).sum() / observed.sum().clamp_min(1)

    def aux_loss(self, residual: torch.Tensor, h_unk: torch.Tensor, dead_mask: torch.Tensor,
                 aux_k: int) -> torch.Tensor:
        """AuxK (Gao et al.): the top aux_k *dead unknown* latents reconstruct the residual x_n - x_hat_n.

        Defined latents are never revived this way: their direction belongs to the predictor.
        """
        m = self.n_concepts
        dead_unk = dead_mask.to(h_unk.device)[m:]
        n_dead = int(dead_unk.sum())
        if n_dead == 0 or aux_k <= 0:
            return h_unk.sum() * 0.0
        pre = F.relu(h_unk).masked_fill(~dead_unk, 0.0)
        vals, idx = torch.topk(pre, min(aux_k, n_dead), dim=-1, sorted=False)
        z_aux = torch.zeros_like(pre).scatter(-1, idx, vals)
        e_hat = z_aux @ self.W_dec[m:]
        e = residual.detach()
        # Same normalisation as train_topk's AuxK, so the two trainers' aux_coef mean the same thing.
        return (e_hat - e).pow(2).sum(-1).mean() / e.pow(2).sum(-1).mean().clamp_min(1e-8)

    def forward_train(self, x: torch.Tensor, labels: torch.Tensor | None = None,
                      protein_index: torch.Tensor | None = None, *, dead_mask: torch.Tensor | None = None,
                      aux_k: int = 0, aux_coef: float = 1 / 32) -> dict[str, Any]:
        """One training forward: L = L_rec + lambda_annot L_annot + lambda_axiom L_axiom (+ aux_coef L_aux).

        L_rec is the squared error per token (summed over dimensions, averaged over tokens) in normalised space,
        as METHOD.md §1.4 states it; with detach on, L_rec and L_annot update disjoint parameters (r_pred and
        the decoder/unknown encoder vs W_pred/b_pred), so Adam's per-parameter scaling makes their relative
        magnitude matter little. `nmse` is the batch fraction of variance unexplained (the checkpoint monitor).

        Returns a dict: loss, l_rec, l_annot, l_axiom, l_aux, nmse, l0, x_hat (raw space), z [N, n], pi [N, m],
        logits, el (per-NF axiom losses), participation (fraction of predicted (token, concept) pairs whose
        defined latent survives TopK; NaN when the predictor calls nothing).
        """
        x_n = self.normalize(x.float())
        codes = self._codes(x_n, self.opts.forced_activation)
        z, logits = codes["z"], codes["logits"]
        x_hat_n = z @ self.W_dec + self.b_dec
        err = (x_hat_n - x_n).pow(2).sum(-1)
        l_rec = err.mean()
        with torch.no_grad():
            var = (x_n - x_n.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
            nmse = err.mean() / var
            l0 = (z > 0).sum(-1).float().mean()
            called = self.concept_calls(codes["z_def_pre"], logits)
            kept = z[:, :self.n_concepts] > 0
            n_called = called.sum()
            participation = torch.where(n_called > 0, (called & kept).sum() / n_called.clamp_min(1),
                                        torch.full_like(nmse, math.nan))
        zero = x_n.new_zeros(())
        l_annot = self.annotation_loss(logits, labels, protein_index) if labels is not None else zero
        use_axiom = self.opts.use_axiom and self.opts.lambda_axiom != 0
        el = self.axiom_losses() if use_axiom else {k: zero for k in ("nf1", "nf2", "nf3", "nf4", "total")}
        l_axiom = el["total"]
        l_aux = zero
        if dead_mask is not None and aux_k > 0:
            l_aux = self.aux_loss(x_n - x_hat_n, codes["h_unk"], dead_mask, aux_k)
        loss = l_rec + self.opts.lambda_annot * l_annot + self.opts.lambda_axiom * l_axiom \
            + aux_coef * l_aux
        return {
            "loss": loss, "l_rec": l_rec, "l_annot": l_annot, "l_axiom": l_axiom, "l_aux": l_aux,
            "nmse": nmse, "l0": l0, "x_hat": self.denormalize(x_hat_n), "z": z, "pi": torch.sigmoid(logits),
            "logits": logits, "el": {k: v.detach() for k, v in el.items()}, "participation": participation,
        }
