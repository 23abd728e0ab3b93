"""Concept steering: edit SAE latents at the hook, run the rest of ESM-2, redesign residues, measure against nulls.

Design decisions (docs/METHOD.md §1.8, §3.4), and why:

- **Where the edit lands.** The edit replaces the activation at the SAE's own hook and `EsmRunner` runs the
  remaining blocks and the LM head. Applying the LM head to a mid-network activation (the InterProt notebook
  shortcut) skips layers and measures a different model.
- **Error-preserving by default.** The change applied is decode(z_edited) - decode(z), added to the original
  activation, so the SAE's reconstruction error cancels and an edit of size zero is *exactly* the unsteered
  model. Because decode is affine, that difference is computed as (z_edited - z) @ W_dec * norm_scale on the
  edited latents only: algebraically the same, free of the rounding of two full decodes, and exactly zero
  (not merely close) when z_edited == z; tokens whose code did not change are not written at all, so the
  strength-0 forward is bit-identical to the unedited one. `keep_error=False` is the ProtSAE release's
  replace-by-reconstruction (`decode(z_edited)` replaces the activation at the edited tokens).
- **Operations** on the target latent(s) c, with s the strength and S_c the latent's scale:
  add: z_c <- z_c + s * S_c;  clamp: z_c <- s * S_c;  multiply: z_c <- (1 + s) * z_c. Results are floored at
  0 (SAE codes are non-negative; a negative add strength suppresses). S_c is the latent's maximum activation
  as recorded in the SAE config (`training.latent_stats.max_activation`, one value per latent) when present
  and positive, else the largest latent value at that token (the InterProt "s x max" convention): it makes
  s comparable across latents of different magnitude. multiply only amplifies a latent where it already
  fires; clamp with s = 0 ablates (it is not the identity).
- **Positions.** `positions="masked"`: masked infill of round(mask_ratio * L) positions (at least one), chosen
  at random or where the target latents' mean *pre*-activation is lowest on the input (pre-activations rank
  every residue; post-TopK codes are 0 on most of them); `positions="all"`: nothing is masked, every residue
  is redesigned from the steered logits with the input visible. `edit_scope` says which tokens get the edit:
  every residue (default; the released ProtSAE hook edits the whole hidden state) or only the designed ones.
  BOS/EOS/padding are never edited.
- **Decoding** picks among the 20 standard amino acids only (X/B/U/Z/O and special tokens are never
  generated). argmax: one pass. sample: one pass, softmax at `temperature`. iterative: confidence-ordered
  unmasking over `iterations` passes (each pass fixes the most confident remaining masked positions, argmax);
  with nothing masked it re-predicts every designed position from the current sequence `iterations` times.
  gibbs: start from one sampled pass (or the input when nothing is masked), then `iterations` passes that each
  re-mask a random block of ceil(15 % of the designed positions) and resample it at `temperature`.
- **Common random numbers.** Every condition of one input (unsteered, steered at each strength, controls)
  shares the masks and the random draws (Gumbel noise, Gibbs blocks), and they run as rows of one batch: the
  conditions differ only by the edit, so strength 0 reproduces the unsteered output and control-vs-steered
  differences are not sampling noise. Seeds derive from (seed, input ordinal, purpose), so one protein's
  output does not depend on which other proteins are in the file.
- **From scratch** (`length`/`num`): every position is designed; `init="mask"` starts all-mask (use
  iterative or gibbs decoding: a single pass from an all-mask start has no context), `init="random"` starts
  from uniform random standard residues (seeded) with nothing masked.
- **Readouts** re-encode each generated sequence through PLM + SAE: target activation = mean over residues of
  the mean over the target latents; predicted probability = mean over residues of ProtSAE's pi for the
  primary target concept (none for a plain TopK SAE). Pseudo-perplexity is the masked-marginal one under the
  unsteered model: each scored position masked in turn, PPPL = exp(-mean log p(x_i | x_-i)), softmax over the
  full vocabulary as in ESM's own scoring. Identity and composition change (L1 distance between the
  20-amino-acid composition vectors, 0..2) are measured against the input; from scratch, against the random
  start (`init="random"`) or not at all (`init="mask"`, reported as '-'); identity to the unsteered output of
  the same input and seed is reported for every row.
- **Controls.** random-latent: the same number of latents as the target set, uniform over all other latents.
  activity-matched: for each target latent, one of the 10 latents nearest in (log firing frequency, log mean
  active value) measured on the input proteins. Controls get the same strengths, masks and draws.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from protsae_cli import __version__
from protsae_cli.errors import InputError
from protsae_cli.plm.esm_forward import EsmRunner, HookPoint
from protsae_cli.steer.options import (CONTROLS, CPU_PPPL_MAX_POSITIONS, DECODES, EDIT_SCOPES,  # noqa: F401
                                     INITS, MASK_STRATEGIES, MAX_RESIDUES, MODES, POSITIONS, PPPL_POSITIONS,
                                     SteerOptions, SteerSpec)

log = logging.getLogger("protsae.steer")

AA20 = "ACDEFGHIKLMNPQRSTVWY"
GIBBS_BLOCK_FRACTION = 0.15
ACTIVITY_NEIGHBOURS = 10
PPPL_PROBE_ROWS = 8  # rows of the first, timed pseudo-perplexity batch (the estimate's probe)

TSV_COLUMNS = (
    "id", "source_id", "source_index", "condition", "concept", "latents", "mode", "strength",
    "target_activation", "target_probability", "unsteered_activation", "unsteered_probability",
    "pseudo_perplexity", "unsteered_pseudo_perplexity", "identity_to_input", "identity_to_unsteered",
    "composition_l1", "n_designed", "length",
)






@dataclass
class SteerSummary:
    sources: int
    sequences: int
    concept: str
    latents: list[int]
    outputs: list[str]
    seconds: float
    #: per (condition kind, strength): mean change vs unsteered of target activation / probability, PPPL ratio
    effects: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ concepts
def _norm(text: str) -> str:
    return " ".join(text.strip().lower().split())


def resolve_concept(sae_cfg: Any, concept: str, with_ancestors: bool = False, ontology: Any = None) -> list[int]:
    """Target latents for `concept`: a concept name, concept id, ontology id, `latent:N` or a bare integer.

    All latents whose config entry matches are returned (a TopK SAE may label several latents with one
    concept), the requested concept's own latents first. `with_ancestors` adds the latents of every concept
    entry whose id is an ancestor of the target in `ontology` (is_a and part_of, the target included), the
    ProtSAE release's GO-id behaviour. Unknown concepts raise with the closest names and ids.
    """
    text = concept.strip()
    entries = list(sae_cfg.concepts)
    m = re.fullmatch(r"(?:latent:)?\s*(\d+)", text, flags=re.IGNORECASE)
    if m:
        latent = int(m.group(1))
        if not 0 <= latent < sae_cfg.d_sae:
            raise InputError(f"latent {latent} is out of range: this SAE has latents 0..{sae_cfg.d_sae - 1}")
        primary = [latent]
        matched = [e for e in entries if e.latent == latent]
    else:
        key = _norm(text)
        matched = [e for e in entries if key in (_norm(e.concept_id), _norm(e.ontology_id), _norm(e.name))]
        if not matched and ontology is not None:
            tid = ontology.resolve(text) or ontology.find_by_name(text)
            if tid is not None:
                matched = [e for e in entries if tid in (ontology.resolve(e.concept_id) if e.concept_id else None,
                                                         ontology.resolve(e.ontology_id) if e.ontology_id else None)]
        if not matched:
            raise InputError(_unknown_concept_message(text, entries, sae_cfg.d_sae))
        primary = list(dict.fromkeys(e.latent for e in matched))
    if not with_ancestors:
        return primary
    if ontology is None:
        raise InputError("--with-ancestors needs an ontology (the shipped one or --ontology FILE)")
    ids = {i for e in matched for i in (e.concept_id, e.ontology_id) if i}
    found = {ontology.resolve(i) for i in ids} - {None}
    if not found:
        what = f"latent {primary[0]}" if m else repr(text)
        known = ", ".join(sorted(ids)) or "no concept id"
        raise InputError(f"{what} ({known}) is not a term of the ontology {ontology.source}; ancestors cannot be "
                         "found: pass the ontology these ids come from with --ontology FILE")
    ancestors: set[str] = set()
    for tid in found:
        ancestors |= ontology.ancestors(tid, ("is_a", "part_of"))
    extra = [e.latent for e in entries
             if (e.concept_id and ontology.resolve(e.concept_id) in ancestors)
             or (e.ontology_id and ontology.resolve(e.ontology_id) in ancestors)]
    return list(dict.fromkeys(primary + extra))


def _unknown_concept_message(text: str, entries: list[Any], d_sae: int) -> str:
    if not entries:
        return (f"unknown concept {text!r}: this SAE has no concept labels; steer a latent instead "
                f"(latent:N with N in 0..{d_sae - 1})")
    labels: dict[str, Any] = {}
    for e in entries:
        for key in (e.name, e.concept_id, e.ontology_id):
            if key:
                labels.setdefault(_norm(key), e)
    key = _norm(text)
    close = difflib.get_close_matches(key, list(labels), n=5, cutoff=0.5)
    close += [k for k in labels if key and key in k and k not in close][: max(0, 5 - len(close))]
    seen: list[str] = []
    for k in close:
        e = labels[k]
        item = f"{e.name!r} ({e.concept_id}, latent {e.latent})"
        if item not in seen:
            seen.append(item)
    hint = f"; did you mean: {', '.join(seen)}?" if seen else ""
    return (f"unknown concept {text!r} ({len(entries)} concepts in this SAE){hint} Give a concept name, concept "
            f"or ontology id, or latent:N (0..{d_sae - 1})")


def primary_probability_column(sae: Any, latents: Sequence[int]) -> int | None:
    """Column of ProtSAE's pi for the primary target, or None (plain TopK SAE or an unbound latent)."""
    if not sae.has_concept_predictor or not latents:
        return None
    return latents[0] if 0 <= latents[0] < sae.n_concepts else None


def concept_label(sae_cfg: Any, latents: Sequence[int], requested: str) -> str:
    for e in sae_cfg.concepts:
        if latents and e.latent == latents[0]:
            return e.concept_id or e.name or requested
    return f"latent:{latents[0]}" if latents else requested


# ------------------------------------------------------------------------------------------------ the edit
def recorded_latent_scale(sae_cfg: Any) -> torch.Tensor | None:
    """Per-latent max activation from `training.latent_stats.max_activation`, when the trainer recorded it."""
    stats = (sae_cfg.training or {}).get("latent_stats") or {}
    values = stats.get("max_activation") if isinstance(stats, dict) else None
    if values is None:
        return None
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.shape != (sae_cfg.d_sae,):
        log.warning("ignoring latent_stats.max_activation: %s values for %s latents", t.numel(), sae_cfg.d_sae)
        return None
    return t


class LatentEdit:
    """The hook edit: per batch row, a set of latents, a strength, and whether the row is edited at all.

    Rows let one forward carry every condition of an input (unsteered, each strength, controls); a row with
    `active=False` is returned untouched, whatever the mode.
    """

    def __init__(self, sae: Any, row_latents: Sequence[Sequence[int]], row_strengths: Sequence[float],
                 mode: str, keep_error: bool = True, where: torch.Tensor | None = None,
                 row_active: Sequence[bool] | None = None, latent_scale: torch.Tensor | None = None,
                 chunk_tokens: int = 2048) -> None:
        if mode not in MODES:
            raise InputError(f"unknown steering mode {mode!r}; choose one of {', '.join(MODES)}")
        if len(row_latents) != len(row_strengths):
            raise ValueError("row_latents and row_strengths must have the same length")
        d_sae = sae.cfg.d_sae
        for lats in row_latents:
            for c in lats:
                if not 0 <= int(c) < d_sae:
                    raise InputError(f"latent {c} is out of range 0..{d_sae - 1}")
        self.sae, self.mode, self.keep_error = sae, mode, keep_error
        self.row_latents = [tuple(int(c) for c in lats) for lats in row_latents]
        self.row_strengths = [float(s) for s in row_strengths]
        self.row_active = list(row_active) if row_active is not None else [True] * len(row_latents)
        self.where = where
        self.latent_scale = latent_scale
        self.chunk_tokens = chunk_tokens

    def _rows(self, B: int) -> tuple[list[tuple[int, ...]], list[float], list[bool]]:
        lats, strengths, active = self.row_latents, self.row_strengths, self.row_active
        if len(lats) == 1 and B != 1:
            return lats * B, strengths * B, active * B
        if len(lats) != B:
            raise ValueError(f"edit has {len(lats)} rows for a batch of {B}")
        return lats, strengths, active

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        lats, strengths, active = self._rows(B)
        dev = x.device
        sae = self.sae
        n = max((len(l) for l in lats), default=0)
        if n == 0 and self.keep_error:
            return x
        idx = torch.zeros(B, max(n, 1), dtype=torch.long)
        valid = torch.zeros(B, max(n, 1), dtype=torch.bool)
        for b, l in enumerate(lats):
            if l:
                idx[b, :len(l)] = torch.tensor(l)
                valid[b, :len(l)] = True
        edit_mask = torch.tensor(active, dtype=torch.bool).unsqueeze(1).expand(B, T)
        if self.where is not None:
            edit_mask = edit_mask & self.where.to("cpu", torch.bool).reshape(B, T)
        flat_sel = edit_mask.reshape(-1).nonzero().squeeze(1)
        if flat_sel.numel() == 0:
            return x
        out = x.clone()  # same strides as x (the reference runner hands us a transposed view)
        idx, valid = idx.to(dev), valid.to(dev)
        s_row = torch.tensor(strengths, dtype=torch.float32, device=dev)
        scale_table = self.latent_scale.to(dev) if self.latent_scale is not None else None
        W_dec = sae.W_dec.float()
        for sel in flat_sel.to(dev).split(self.chunk_tokens):
            b, t = sel // T, sel % T
            xs = x[b, t].float()
            z = sae.encode_dense(xs)
            li, vi = idx[b], valid[b]
            zt = z.gather(1, li)
            if scale_table is not None:
                rec = scale_table[li]
                tok_max = z.max(-1, keepdim=True).values.expand_as(rec)
                scale = torch.where(rec > 0, rec, tok_max)
            else:
                scale = z.max(-1, keepdim=True).values.expand_as(zt)
            s = s_row[b].unsqueeze(1)
            if self.mode == "add":
                ze = zt + s * scale
            elif self.mode == "clamp":
                ze = s * scale
            else:
                ze = zt * (1.0 + s)
            ze = torch.where(vi, ze.clamp_min(0.0), zt)
            dz = ze - zt  # exactly 0 where nothing changed
            delta = torch.einsum("cn,cnd->cd", dz, W_dec[li]) * sae.norm_scale
            if self.keep_error:
                changed = (dz != 0).any(-1)
                if not bool(changed.any()):
                    continue
                new = xs[changed] + delta[changed]
                out[b[changed], t[changed]] = new.to(out.dtype)
            else:
                out[b, t] = (sae.decode(z) + delta).to(out.dtype)
        return out


def make_edit(sae: Any, latents: Sequence[int], mode: str, strength: float, keep_error: bool = True,
              where: torch.Tensor | None = None, latent_scale: torch.Tensor | None | str = "auto") -> LatentEdit:
    """An `EsmRunner.logits(..., edit=)` callable steering `latents` by `strength` on every batch row.

    `where` [B, T] limits the edit to some tokens; `latent_scale="auto"` uses the SAE config's recorded
    per-latent maxima when present (see the module docstring for the operations).
    """
    scale = recorded_latent_scale(sae.cfg) if isinstance(latent_scale, str) else latent_scale
    return LatentEdit(sae, [tuple(latents)], [strength], mode, keep_error, where=where, latent_scale=scale)


# ------------------------------------------------------------------------------------------------ randomness
def derived_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, ordinal, purpose): independent streams that do not depend on batch layout."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def torch_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(*parts))


def _gumbel(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=gen).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class SteerInput:
    """One protein to redesign (or one from-scratch start). `scratch` marks starts that are not real input."""

    index: int
    id: str
    sequence: str
    scratch: bool = False


def scratch_inputs(length: int, num: int, init: str, seed: int) -> list[SteerInput]:
    """From-scratch starts: all-mask placeholders or seeded uniform random standard residues."""
    if not 1 <= length <= MAX_RESIDUES:
        raise InputError(f"--length must be in 1..{MAX_RESIDUES}, got {length}")
    if num < 1:
        raise InputError(f"--num must be >= 1, got {num}")
    out = []
    for i in range(num):
        if init == "random":
            g = torch_generator(seed, i, 3)
            seq = "".join(AA20[j] for j in torch.randint(0, 20, (length,), generator=g).tolist())
        else:
            seq = "X" * length  # never seen by the model: every position is masked
        out.append(SteerInput(i, f"gen{i + 1}", seq, scratch=True))
    return out


def choose_mask_positions(length: int, spec: SteerSpec, gen: torch.Generator,
                          target_pre: torch.Tensor | None = None) -> torch.Tensor:
    """0-based residue positions to mask: round(ratio * L) (at least 1), sorted.

    low-activation ranks residues by the target latents' mean pre-activation `target_pre` [L] (lowest first,
    ties to the earlier residue); random draws a seeded permutation.
    """
    n = max(1, min(length, int(round(spec.mask_ratio * length))))
    if spec.mask_strategy == "low-activation":
        if target_pre is None:
            raise ValueError("low-activation masking needs the target pre-activations")
        order = torch.sort(target_pre.float().cpu(), stable=True).indices
        return order[:n].sort().values
    return torch.randperm(length, generator=gen)[:n].sort().values


# ------------------------------------------------------------------------------------------------ controls
@dataclass
class LatentActivity:
    """Firing frequency and mean active value of every latent over the input residues."""

    frequency: torch.Tensor  # [d_sae]
    mean_active: torch.Tensor  # [d_sae]
    residues: int


@torch.no_grad()
def measure_latent_activity(runner: EsmRunner, sae: Any, hook: HookPoint, seqs: Sequence[str],
                            batch_tokens: int = 8192) -> LatentActivity:
    d_sae = sae.cfg.d_sae
    fired = torch.zeros(d_sae, dtype=torch.float64)
    total = torch.zeros(d_sae, dtype=torch.float64)
    n = 0
    for batch in _length_batches(list(seqs), batch_tokens):
        tokens = runner.tokenizer.batch(batch)
        acts = runner.hook_activations(tokens, hook)
        for b, s in enumerate(batch):
            z = sae.encode_dense(acts[b, 1:len(s) + 1]).cpu().double()
            fired += (z > 0).sum(0)
            total += z.sum(0)
            n += len(s)
    freq = (fired / max(n, 1)).float()
    mean_active = (total / fired.clamp_min(1)).float()
    return LatentActivity(freq, mean_active, n)


def choose_control_latents(kind: str, targets: Sequence[int], d_sae: int, rng: np.random.Generator,
                           activity: LatentActivity | None = None) -> tuple[int, ...]:
    """A control latent set of the target set's size, never containing a target latent."""
    excluded = set(targets)
    pool = np.array([j for j in range(d_sae) if j not in excluded])
    if len(pool) < len(targets):
        raise InputError(f"not enough non-target latents ({len(pool)}) for a control of {len(targets)} latents")
    if kind == "random-latent":
        return tuple(int(j) for j in rng.choice(pool, size=len(targets), replace=False))
    if activity is None:
        raise InputError("activity-matched controls need latent activity measured on input proteins (--input)")
    eps = 1e-6
    lf = torch.log10(activity.frequency.double() + eps)
    la = torch.log10(activity.mean_active.double() + eps)
    chosen: list[int] = []
    for t in targets:
        dist = (lf - lf[t]).abs() + (la - la[t]).abs()
        cand = [int(j) for j in torch.argsort(dist, stable=True).tolist() if j not in excluded and j not in chosen]
        near = cand[:ACTIVITY_NEIGHBOURS]
        chosen.append(int(near[int(rng.integers(len(near)))]))
    return tuple(chosen)


# ------------------------------------------------------------------------------------------------ generation
@dataclass
class RowPlan:
    """One condition of one input: which latents are edited, how strongly, and the label it is reported as."""

    condition: str
    latents: tuple[int, ...]
    strength: float
    active: bool
    tag: str


@dataclass
class Generated:
    id: str
    source_index: int
    source_id: str
    condition: str
    latents: tuple[int, ...]
    strength: float
    sequence: str
    input_sequence: str | None
    designed: tuple[int, ...]
    pppl_positions: tuple[int, ...]


def plan_rows(spec: SteerSpec, targets: Sequence[int], control_sets: Sequence[tuple[str, tuple[int, ...]]]
              ) -> list[RowPlan]:
    rows = [RowPlan("unsteered", (), 0.0, False, "unsteered")]
    for s in spec.strengths:
        rows.append(RowPlan("steered", tuple(targets), s, True, f"steered_s{s:g}"))
        for j, (kind, lats) in enumerate(control_sets):
            lat_txt = "+".join(str(c) for c in lats)
            rows.append(RowPlan(f"control:{kind}:{lat_txt}", lats, s, True, f"ctrl{j + 1}-{kind}-{lat_txt}_s{s:g}"))
    return rows


def _aa_token_ids(runner: EsmRunner) -> torch.Tensor:
    return torch.tensor([runner.plm.alphabet.get_idx(a) for a in AA20], dtype=torch.long)


def _target_pre_activations(runner: EsmRunner, sae: Any, hook: HookPoint, seq: str,
                            targets: Sequence[int]) -> torch.Tensor:
    acts = runner.hook_activations(runner.tokenizer.batch([seq]), hook)[0, 1:len(seq) + 1]
    with torch.no_grad():
        return sae.pre_activations(acts.float())[:, list(targets)].mean(-1).cpu()


@torch.no_grad()
def decode_rows(runner: EsmRunner, sae: Any, hook: HookPoint, seq: str, designed: torch.Tensor, masked: bool,
                rows: Sequence[RowPlan], spec: SteerSpec, gen: torch.Generator,
                latent_scale: torch.Tensor | None) -> list[str]:
    """Redesign `designed` (0-based residues) of `seq` under every row's edit at once; returns one sequence
    per row. All rows share `gen`'s draws (common random numbers)."""
    R, L = len(rows), len(seq)
    aa_ids = _aa_token_ids(runner)
    tok = runner.tokenizer.batch([seq]).repeat(R, 1)
    pos = designed.long() + 1  # token positions (BOS at 0)
    mask_id = runner.tokenizer.mask
    if masked:
        tok[:, pos] = mask_id
    where = torch.zeros(R, L + 2, dtype=torch.bool)
    if spec.edit_scope == "designed":
        where[:, pos] = True
    else:
        where[:, 1:L + 1] = True
    edit = LatentEdit(sae, [r.latents for r in rows], [r.strength for r in rows], spec.mode, spec.keep_error,
                      where=where, row_active=[r.active for r in rows], latent_scale=latent_scale)

    def aa_logits(t: torch.Tensor) -> torch.Tensor:
        return runner.logits(t, hook, edit)[..., aa_ids.to(runner.device)].float().cpu()  # [R, T, 20]

    def pick(logits: torch.Tensor, sample: bool) -> torch.Tensor:
        if not sample:
            return logits.argmax(-1)
        g = _gumbel(tuple(logits.shape[-2:]), gen)  # one draw per (position, residue), shared by all rows
        return (logits / spec.temperature + g).argmax(-1)

    n = len(pos)
    if spec.decode in ("argmax", "sample"):
        lg = aa_logits(tok)[:, pos]
        tok[:, pos] = aa_ids[pick(lg, spec.decode == "sample")]
    elif spec.decode == "iterative":
        if masked:
            still = torch.zeros(R, L + 2, dtype=torch.bool)
            still[:, pos] = True
            rounds = min(spec.iterations, n)
            for r in range(rounds):
                remaining = int(still[0].sum())
                k = math.ceil(remaining / (rounds - r))
                probs = torch.softmax(aa_logits(tok), -1)
                conf, choice = probs.max(-1)
                conf = conf.masked_fill(~still, -1.0)
                top = conf.topk(k, dim=1).indices  # [R, k]
                tok.scatter_(1, top, aa_ids[choice.gather(1, top)])
                still.scatter_(1, top, False)
        else:
            for _ in range(spec.iterations):
                tok[:, pos] = aa_ids[aa_logits(tok)[:, pos].argmax(-1)]
    else:  # gibbs
        if masked:
            tok[:, pos] = aa_ids[pick(aa_logits(tok)[:, pos], True)]
        block = max(1, math.ceil(GIBBS_BLOCK_FRACTION * n))
        for _ in range(spec.iterations):
            sub = pos[torch.randperm(n, generator=gen)[:block]]
            tok[:, sub] = mask_id
            tok[:, sub] = aa_ids[pick(aa_logits(tok)[:, sub], True)]
    alphabet = runner.plm.alphabet
    return ["".join(alphabet.get_tok(int(i)) for i in tok[r, 1:L + 1]) for r in range(R)]


def steer_sequences(runner: EsmRunner, sae: Any, hook: HookPoint, inputs: Sequence[SteerInput], spec: SteerSpec,
                    targets: Sequence[int], activity: LatentActivity | None = None,
                    progress: Callable[[int, int], None] | None = None) -> list[Generated]:
    """Generate the unsteered, steered (each strength) and control sequences for every input, in input order."""
    spec.validate()
    if not targets:
        raise InputError("no target latents to steer")
    latent_scale = recorded_latent_scale(sae.cfg)
    out: list[Generated] = []
    for i, inp in enumerate(inputs):
        L = len(inp.sequence)
        if L > MAX_RESIDUES:
            raise InputError(f"protein {inp.id!r} has {L} residues; steering works on whole sequences of at most "
                             f"{MAX_RESIDUES} residues (crop it first)")
        mask_gen = torch_generator(spec.seed, inp.index, 0)
        dec_gen = torch_generator(spec.seed, inp.index, 1)
        # Controls are drawn per target too, so an evaluation over concepts pools different random latents.
        ctrl_rng = np.random.default_rng(derived_seed(spec.seed, inp.index, 2, *targets))
        pppl_gen = torch_generator(spec.seed, inp.index, 4)
        if inp.scratch:
            designed = torch.arange(L)
            masked = spec.init == "mask"
        elif spec.positions == "all":
            designed, masked = torch.arange(L), False
        else:
            pre = _target_pre_activations(runner, sae, hook, inp.sequence, targets) \
                if spec.mask_strategy == "low-activation" else None
            designed, masked = choose_mask_positions(L, spec, mask_gen, pre), True
        controls = [(kind, choose_control_latents(kind, targets, sae.cfg.d_sae, ctrl_rng, activity))
                    for kind in spec.controls for _ in range(spec.n_controls)]
        rows = plan_rows(spec, targets, controls)
        seqs = decode_rows(runner, sae, hook, inp.sequence, designed, masked, rows, spec, dec_gen, latent_scale)
        score_pos = designed if spec.pppl_positions == "designed" else torch.arange(L)
        if spec.pppl_max_positions and len(score_pos) > spec.pppl_max_positions:
            score_pos = score_pos[torch.randperm(len(score_pos), generator=pppl_gen)[:spec.pppl_max_positions]]
        score_t = tuple(int(p) for p in score_pos.sort().values)
        for row, s in zip(rows, seqs, strict=True):
            out.append(Generated(
                id=f"{inp.id}__{row.tag}", source_index=inp.index, source_id=inp.id, condition=row.condition,
                latents=row.latents, strength=row.strength, sequence=s,
                input_sequence=None if (inp.scratch and spec.init == "mask") else inp.sequence,
                designed=tuple(int(p) for p in designed), pppl_positions=score_t))
        if progress is not None:
            progress(i + 1, len(inputs))
    return out


# ------------------------------------------------------------------------------------------------ readouts
def _length_batches(seqs: list[str], batch_tokens: int) -> list[list[str]]:
    """Consecutive batches of similar total size (callers pass same-length groups; order is kept)."""
    out: list[list[str]] = []
    cur: list[str] = []
    for s in seqs:
        if cur and (len(cur) + 1) * (max(len(s), max(len(c) for c in cur)) + 2) > batch_tokens:
            out.append(cur)
            cur = []
        cur.append(s)
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def pseudo_perplexity(runner: EsmRunner, seqs: Sequence[str], positions: Sequence[Sequence[int]] | None = None,
                      batch_tokens: int = 16384, progress: Callable[[int, int], None] | None = None,
                      probe_rows: int = 0) -> list[float]:
    """Masked-marginal pseudo-perplexity of each sequence under the plain (unedited) model.

    Each scored position (default: all residues; else `positions[i]`, 0-based) is masked in its own row and
    the rows are batched; PPPL = exp(-mean_i log p(x_i | x_-i)), softmax over the full vocabulary.
    `progress(rows, tokens)` is called after each batch with the rows and tokens it held; `probe_rows` > 0
    makes the first batch that small, so a caller can time it and estimate the rest early.
    """
    jobs: list[tuple[int, int]] = []  # (sequence, 0-based position)
    for i, s in enumerate(seqs):
        ps = range(len(s)) if positions is None else positions[i]
        jobs.extend((i, int(p)) for p in ps)
    total = np.zeros(len(seqs))
    count = np.zeros(len(seqs))
    # Group by sequence length so no row carries padding (padding would change nothing, but costs time).
    by_len: dict[int, list[tuple[int, int]]] = {}
    for j in jobs:
        by_len.setdefault(len(seqs[j[0]]), []).append(j)
    mask_id = runner.tokenizer.mask
    for L, items in by_len.items():
        rows_per = max(1, batch_tokens // (L + 2))
        starts = list(range(0, len(items), rows_per))
        if probe_rows > 0 and 0 < probe_rows < rows_per and len(items) > probe_rows:
            starts = [0] + list(range(probe_rows, len(items), rows_per))
            probe_rows = 0
        for start, end in zip(starts, starts[1:] + [len(items)], strict=True):
            chunk = items[start:end]
            tok = runner.tokenizer.batch([seqs[i] for i, _ in chunk])
            r = torch.arange(len(chunk))
            p = torch.tensor([q + 1 for _, q in chunk])
            true = tok[r, p].clone()
            tok[r, p] = mask_id
            logp = torch.log_softmax(runner.logits(tok).float(), -1).cpu()
            lp = logp[r, p, true].double().numpy()
            for (i, _), v in zip(chunk, lp, strict=True):
                total[i] += v
                count[i] += 1
            if progress is not None:
                progress(len(chunk), len(chunk) * (L + 2))
    return [float(math.exp(-t / c)) if c else float("nan") for t, c in zip(total, count, strict=True)]


class Scorer:
    """Re-encoding and pseudo-perplexity with per-sequence caches (the unsteered output of an input recurs in
    every concept of an evaluation, and weak edits often reproduce it)."""

    def __init__(self, runner: EsmRunner, sae: Any, hook: HookPoint, batch_tokens: int = 16384) -> None:
        self.runner, self.sae, self.hook, self.batch_tokens = runner, sae, hook, batch_tokens
        self._codes: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._pppl: dict[tuple[str, tuple[int, ...]], float] = {}
        self.has_pi = sae.has_concept_predictor

    @torch.no_grad()
    def _encode(self, seqs: Sequence[str]) -> None:
        todo = list(dict.fromkeys(s for s in seqs if s not in self._codes))
        for batch in _length_batches(sorted(todo, key=len), self.batch_tokens):
            acts = self.runner.hook_activations(self.runner.tokenizer.batch(batch), self.hook)
            for b, s in enumerate(batch):
                x = acts[b, 1:len(s) + 1].float()
                zmean = self.sae.encode_dense(x).mean(0).cpu()
                pimean = self.sae.concept_probabilities(x).mean(0).cpu() if self.has_pi else None
                self._codes[s] = (zmean, pimean)

    def readout(self, seqs: Sequence[str], latents: Sequence[int], prob_col: int | None
                ) -> list[tuple[float, float | None]]:
        """(mean target activation, mean predicted probability or None) per sequence."""
        self._encode(seqs)
        out = []
        for s in seqs:
            zmean, pimean = self._codes[s]
            act = float(zmean[list(latents)].mean())
            prob = float(pimean[prob_col]) if (pimean is not None and prob_col is not None) else None
            out.append((act, prob))
        return out

    def pppl(self, seqs: Sequence[str], positions: Sequence[tuple[int, ...]], show_progress: bool = False
             ) -> list[float]:
        keys = [(s, tuple(p)) for s, p in zip(seqs, positions, strict=True)]
        todo = list(dict.fromkeys(k for k in keys if k not in self._pppl))
        if todo:
            with PpplProgress(todo, str(self.runner.device), show_progress) as cb:
                vals = pseudo_perplexity(self.runner, [k[0] for k in todo], [k[1] for k in todo], self.batch_tokens,
                                         progress=cb, probe_rows=PPPL_PROBE_ROWS)
            self._pppl.update(zip(todo, vals, strict=True))
        return [self._pppl[k] for k in keys]


class PpplProgress:
    """Progress of pseudo-perplexity scoring, with an estimate of the whole after its first batch.

    Why: scoring is one forward pass per scored position and dominates a steer run on CPU; the first batch
    (a few dozen rows, seconds) is the timed probe, and cost is taken as proportional to tokens (rows x
    (length + 2)), so the estimate holds across sequence lengths. The estimate is logged even with
    progress off, unless -q.
    """

    def __init__(self, todo: Sequence[tuple[str, tuple[int, ...]]], device: str, show: bool,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        from protsae_cli.progress import Progress

        self.rows = sum(len(p) for _, p in todo)
        self.tokens = sum(len(p) * (len(s) + 2) for s, p in todo)
        self.n, self.device, self.clock = len(todo), device, clock
        counts = sorted({len(p) for _, p in todo})
        self.positions = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        self.bar = Progress("scoring pseudo-perplexity", self.rows, unit="positions", enabled=show)
        self.estimate: float | None = None
        self._t0 = 0.0
        self._tokens_done = 0

    def __enter__(self) -> PpplProgress:
        self.bar.__enter__()
        self._t0 = self.clock()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, rows: int, tokens: int) -> None:
        self._tokens_done += tokens
        if self.estimate is None:
            from protsae_cli.progress import format_duration

            probe = self.clock() - self._t0
            self.estimate = probe * self.tokens / max(self._tokens_done, 1)
            log.info("scoring %d candidates x %s positions (%d forward rows): about %s on %s (probe: %d rows in "
                     "%s); --pppl-max-positions or --no-pppl makes it shorter", self.n, self.positions, self.rows,
                     format_duration(self.estimate), self.device, rows, format_duration(probe))
        self.bar.advance(rows)


def composition(seq: str) -> np.ndarray:
    """Fractions of the 20 standard amino acids (non-standard residues count in the length only)."""
    v = np.zeros(20)
    for ch in seq:
        j = AA20.find(ch)
        if j >= 0:
            v[j] += 1
    return v / max(len(seq), 1)


def identity(a: str, b: str) -> float:
    if len(a) != len(b) or not a:
        raise ValueError("identity is defined here for equal-length, non-empty sequences")
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def score_generated(scorer: Scorer, generated: Sequence[Generated], targets: Sequence[int], prob_col: int | None,
                    concept: str, spec: SteerSpec, show_progress: bool = False) -> list[dict[str, Any]]:
    """One report row per generated sequence (the TSV columns), each compared with its input's unsteered row."""
    seqs = [g.sequence for g in generated]
    reads = scorer.readout(seqs, targets, prob_col)
    pppls = scorer.pppl(seqs, [g.pppl_positions for g in generated], show_progress) if spec.pppl \
        else [None] * len(seqs)
    base: dict[int, int] = {g.source_index: i for i, g in enumerate(generated) if g.condition == "unsteered"}
    rows = []
    for i, g in enumerate(generated):
        u = base[g.source_index]
        rows.append({
            "id": g.id, "source_id": g.source_id, "source_index": g.source_index, "condition": g.condition,
            "concept": concept, "latents": "+".join(str(c) for c in g.latents) or None,
            "mode": None if g.condition == "unsteered" else spec.mode,
            "strength": None if g.condition == "unsteered" else g.strength,
            "target_activation": reads[i][0], "target_probability": reads[i][1],
            "unsteered_activation": reads[u][0], "unsteered_probability": reads[u][1],
            "pseudo_perplexity": pppls[i], "unsteered_pseudo_perplexity": pppls[u],
            "identity_to_input": identity(g.sequence, g.input_sequence) if g.input_sequence else None,
            "identity_to_unsteered": identity(g.sequence, generated[u].sequence),
            "composition_l1": float(np.abs(composition(g.sequence) - composition(g.input_sequence)).sum())
            if g.input_sequence else None,
            "n_designed": len(g.designed), "length": len(g.sequence),
        })
    return rows


def summarize_effects(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean change vs unsteered per (condition kind, strength): activation, probability, PPPL ratio."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        if r["condition"] == "unsteered":
            continue
        kind = r["condition"] if r["condition"] == "steered" else ":".join(r["condition"].split(":")[:2])
        groups.setdefault((kind, float(r["strength"])), []).append(r)
    out = []
    for (kind, s), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0] != "steered", kv[0][0])):
        def mean(key: str, rs: list[dict[str, Any]] = rs) -> float | None:
            vals = [r[key] for r in rs if r[key] is not None]
            return float(np.mean(vals)) if vals else None

        act, uact = mean("target_activation"), mean("unsteered_activation")
        prob, uprob = mean("target_probability"), mean("unsteered_probability")
        pp, upp = mean("pseudo_perplexity"), mean("unsteered_pseudo_perplexity")
        out.append({
            "condition": kind, "strength": s, "n": len(rs),
            # Rows without unsteered values (None) have nothing to compare with: no delta, not a TypeError.
            "delta_activation": None if (act is None or uact is None) else act - uact,
            "delta_probability": None if (prob is None or uprob is None) else prob - uprob,
            "pppl_ratio": None if (pp is None or not upp) else pp / upp,
            "identity_to_unsteered": mean("identity_to_unsteered"),
        })
    return out


# ------------------------------------------------------------------------------------------------ outputs
def report_path(output: str) -> Path:
    """OUT.tsv beside OUT.fasta (the FASTA suffix replaced; appended when there is none)."""
    p = Path(output)
    if p.suffix.lower() in (".fasta", ".fa", ".faa", ".fas"):
        return p.with_suffix(".tsv")
    return p.with_name(p.name + ".tsv")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_outputs(output: str, generated: Sequence[Generated], rows: Sequence[dict[str, Any]],
                  provenance: dict[str, Any], spec: SteerSpec) -> list[str]:
    """FASTA (60 residues per line) and the TSV report, each written to a temp and renamed on success."""
    from protsae_cli.io.atomic import TextOutput

    if output == "-":
        raise InputError("-o must be a file path: the TSV report is written beside it")
    fasta_path, tsv_path = Path(output), report_path(output)
    fasta_path.parent.mkdir(parents=True, exist_ok=True)
    fa, tsv = TextOutput(fasta_path), TextOutput(tsv_path)
    try:
        for g in generated:
            desc = f"condition={g.condition}"
            if g.condition != "unsteered":
                desc += f" mode={spec.mode} strength={g.strength:g}"
            fa.write(f">{g.id} {desc} source={g.source_id}\n")
            for k in range(0, len(g.sequence), 60):
                fa.write(g.sequence[k:k + 60] + "\n")
        for key, value in provenance.items():
            tsv.write(f"# {key}: {value}\n")
        tsv.write("\t".join(TSV_COLUMNS) + "\n")
        for r in rows:
            tsv.write("\t".join(_fmt(r[c]) for c in TSV_COLUMNS) + "\n")
        fa.close()
        tsv.close()
    except BaseException:
        fa.abort()
        tsv.abort()
        raise
    return [str(fasta_path), str(tsv_path)]


def read_report(path: str | Path) -> list[dict[str, str]]:
    """Parse a steer TSV back into dicts (provenance '#' lines skipped): for tests and downstream scripts."""
    lines = [(no, ln) for no, ln in enumerate(Path(path).read_text().splitlines(), 1) if not ln.startswith("#")]
    header = lines[0][1].split("\t")
    out = []
    for no, ln in lines[1:]:
        if not ln:
            continue
        fields = ln.split("\t")
        if len(fields) != len(header):
            raise InputError(f"{path}:{no}: {len(fields)} tab-separated fields, the header has {len(header)}")
        out.append(dict(zip(header, fields, strict=True)))
    return out


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class SteerModels:
    runner: EsmRunner
    sae: Any
    sae_path: str
    sae_sha256: str
    hook: HookPoint


def load_models(sae: str | None, model: str | None, device: str = "auto", attention: str = "auto",
                check_plm: bool = True) -> SteerModels:
    """SAE (default: the shipped one) and its PLM (the SAE's recorded PLM unless `model` says otherwise)."""
    from protsae_cli.runtime import load_sae_with_plm

    m = load_sae_with_plm(sae, model, device, check_plm)
    runner = EsmRunner(m.plm, m.device, attention=attention)
    return SteerModels(runner, m.sae, m.sae_path, m.sae_sha256, m.hook)


def load_ontology(path: str | None) -> Any:
    from protsae_cli.models import concept_ontology_path
    from protsae_cli.labels.ontology import Ontology

    return Ontology.from_obo(path or concept_ontology_path())


def read_inputs(opts: SteerOptions) -> list[SteerInput]:
    from protsae_cli.io.fasta import ProteinRecord, read_fasta

    if (opts.input is None) == (opts.length is None and opts.num is None):
        raise InputError("give either --input FASTA or --length N --num N (generation from scratch)")
    if opts.input is not None:
        # Without skip_invalid, read_fasta raises on an invalid record instead of yielding an InvalidRecord.
        records = cast("Iterator[ProteinRecord]", read_fasta(opts.input))
        recs = [SteerInput(r.index, r.id, r.sequence) for r in records]
        if not recs:
            raise InputError(f"{opts.input}: no proteins")
        for r in recs:  # before the models load, not after steering the proteins before it
            if len(r.sequence) > MAX_RESIDUES:
                raise InputError(f"{opts.input}: protein {r.id!r} has {len(r.sequence)} residues; steering works "
                                 f"on whole sequences of at most {MAX_RESIDUES} residues (crop it first)")
        return recs
    if opts.length is None or opts.num is None:
        raise InputError("generation from scratch needs both --length and --num")
    return scratch_inputs(opts.length, opts.num, opts.spec.init, opts.spec.seed)


def resolve_pppl_positions(spec: SteerSpec, device: Any) -> SteerSpec:
    """The spec with --pppl-max-positions decided: given, it stands (0: every position); not given, every
    position on a GPU and CPU_PPPL_MAX_POSITIONS seeded positions on CPU (logged; the TSV records the value)."""
    if not spec.pppl or spec.pppl_max_positions is not None:
        return spec
    if torch.device(device).type == "cpu":
        log.info("pseudo-perplexity on CPU: scoring %d seeded positions per sequence (--pppl-max-positions 0 "
                 "scores all, --no-pppl none)", CPU_PPPL_MAX_POSITIONS)
        return dataclasses.replace(spec, pppl_max_positions=CPU_PPPL_MAX_POSITIONS)
    return dataclasses.replace(spec, pppl_max_positions=0)


def run_steer(opts: SteerOptions, progress: Callable[[int, int], None] | None = None) -> SteerSummary:
    """Load, resolve, generate, score, write: the whole `protsae steer` command as a library call."""
    t0 = time.perf_counter()
    spec = opts.spec
    spec.validate()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    inputs = read_inputs(opts)  # before loading models: a bad FASTA fails fast
    m = load_models(opts.sae, opts.model, opts.device, opts.attention, opts.check_plm)
    ontology = None
    if spec.with_ancestors or opts.ontology:
        ontology = load_ontology(opts.ontology)
    targets = resolve_concept(m.sae.cfg, spec.concept, spec.with_ancestors, ontology)
    label = concept_label(m.sae.cfg, targets, spec.concept)
    prob_col = primary_probability_column(m.sae, targets)
    activity = None
    if "activity-matched" in spec.controls:
        if inputs[0].scratch:
            raise InputError("activity-matched controls measure latent activity on input proteins: use --input")
        activity = measure_latent_activity(m.runner, m.sae, m.hook, [i.sequence for i in inputs])
    spec = resolve_pppl_positions(spec, m.runner.device)
    from protsae_cli.progress import Progress

    with Progress("steering", len(inputs), unit="proteins", enabled=opts.progress) as bar:
        def step(done: int, total: int) -> None:
            bar.advance(done - bar.done)
            if progress is not None:
                progress(done, total)

        generated = steer_sequences(m.runner, m.sae, m.hook, inputs, spec, targets, activity, step)
    scorer = Scorer(m.runner, m.sae, m.hook)
    rows = score_generated(scorer, generated, targets, prob_col, label, spec, show_progress=opts.progress)
    provenance = {
        "protsae_version": __version__,
        "command": opts.command or " ".join(shlex.quote(a) for a in sys.argv),
        "plm": f"{m.runner.plm.name} sha256={m.runner.plm.sha256}",
        "sae": f"{m.sae_path} sha256={m.sae_sha256} arch={m.sae.cfg.arch}",
        "hook": str(m.hook),
        "target_latents": "+".join(str(c) for c in targets),
        "latent_scale": "recorded max_activation" if recorded_latent_scale(m.sae.cfg) is not None
        else "token max latent value",
        "spec": json.dumps(asdict(spec), sort_keys=True),
        "columns": "activation/probability: mean over residues, re-encoded from the generated sequence; "
                   "pseudo_perplexity: masked-marginal under the unsteered model",
    }
    outputs = write_outputs(opts.output, generated, rows, provenance, spec)
    return SteerSummary(sources=len(inputs), sequences=len(generated), concept=label, latents=list(targets),
                        outputs=outputs, seconds=time.perf_counter() - t0, effects=summarize_effects(rows))
