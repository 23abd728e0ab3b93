"""`protsae eval`: how good is an SAE (or two, side by side) on held-out proteins.

Three questions, each answered with the definitions of METHOD.md §3 (implemented in `metrics.py`):

1. **Reconstruction and sparsity** over every residue of the evaluation FASTA: MSE, FVU/FVE, InterPLM's variance
   explained, cosine, L0, dead and dense latents (the token budget is the number of evaluated residues).
2. **Language-model fidelity**: the SAE's reconstruction is spliced in at its hook and the PLM runs on to the
   logits; cross-entropy against the original, zero-ablation and mean-ablation (the mean hook activation over
   the evaluated residues), loss recovered (clipped and unclipped, with a headroom guard), KL score and argmax
   agreement; once on the unmasked sequence and once as masked LM (15 % of residues masked with a fixed seed,
   CE at masked positions only). Splices replace residue positions; BOS/EOS/padding keep their original
   activation, since the SAE never saw those tokens in training. An identity splice is run on the first
   batch and must reproduce the original logits exactly (`identity_splice.max_abs_logit_diff == 0`).
3. **Concepts**: residue-level annotations by the InterPLM protocol (activations normalised by each latent's
   maximum over the validation proteins, threshold grid, best (latent, threshold) per concept chosen on the
   validation proteins and reported on the disjoint test proteins: coverage = concepts with test F1 > 0.5, mean
   best test F1); for a ProtSAE also the defined latent's own F1 (threshold chosen on valid), the predictor's
   F1 (pi > 0.5), participation and the top-10 relevance F1. Protein-level (GO-style) annotations are probed:
   a logistic probe on max-pooled latents (and on the mean-pooled PLM activation as the baseline) is fitted
   on the validation proteins and scored on the test proteins with DeepGO-SE's Fmax, AUPR and term-centric
   AUC after ontology propagation; a ProtSAE is also scored zero-shot from its max-pooled pi.

Why the structure: the hook activations are computed once per batch and shared by every SAE being compared;
sparse codes of annotated proteins are spilled to a temporary directory (not held in memory) because the
normalisation scales (a latent's maximum on the validation proteins) are only known after the whole pass;
concept counts are then accumulated protein-chunk by protein-chunk. Memory is bounded by one batch, one
chunk and the per-latent/per-concept count tables, never by the number of proteins.

Annotation sources: each `--annotations` value is one source; several files joined by commas are one source
whose files are merged (bindPredict's metal/nuclear/small lists: a protein in one list is a negative for the
other classes). Concepts of a source are evaluated only on the proteins that source annotates, and masked
residues (TMbed `U`) are dropped. Residue labels are propagated through the ontology (`--ontology`, default the
shipped residue concept ontology) unless `--no-propagate`; ontology roots added by propagation are not
evaluated (they are "any annotated residue").

JSON keys (`format` = "protsae-eval", `format_version` = 1):

- `protsae_version`, `command`, `created` (UTC ISO time), `device`, `plm` {`name`, `sha256`}, `hook` ("point@layer").
- `data`: `fasta`, `n_proteins`, `n_invalid` (records skipped), `n_cropped` (proteins cut to `max_residues`),
  `max_residues`, `n_tokens` (evaluated residues), `split` {`method` ("ids" | "fraction" | "none"), `seed`,
  `n_valid`, `n_test`, `n_unassigned`}.
- `saes`: list of {`name`, `path`, `sha256`, `arch`, `d_sae`, `k`, `n_defined`}. Every per-SAE table below is
  keyed by `name`.
- `reconstruction`: name -> `n_tokens`, `d_model`, `mse_per_token`, `mse_per_element`, `mse_per_dim`
  {mean, std, max}, `fvu`, `fve`, `variance_explained_interplm`, `cosine_mean`, `l2_ratio_mean`, `l0_mean`,
  `l0_median`, `l0_per_protein_mean`, `d_sae`, `dead` {count, fraction, token_budget}, `dense` {count,
  fraction, threshold}, `firing_frequency_log10_hist` {edges, counts, n_dead_excluded}.
- `lm_fidelity` (absent with `--lm-proteins 0`): `n_proteins`, `max_len`, `attention`, `identity_splice`
  {`scope` (first batch, unmasked), `n_tokens`, `max_abs_logit_diff`, `ce_orig`, `ce_identity`, `exact`}, and `unmasked` / `masked`, each with `n_tokens`
  (positions scored), `ce_orig`, `ce_zero`, `ce_mean`, `ppl_orig`, `kl_zero`, `kl_mean`, and `per_sae`:
  name -> `ce`, `delta_ce`, `ppl`, `loss_recovered_zero` and `loss_recovered_mean` {unclipped, clipped
  (percent), headroom (nats), defined}, `kl`, `kl_score_zero`, `kl_score_mean`, `argmax_agreement`;
  `masked` adds `mask_fraction` and `seed`.
- `concepts` (absent without residue-level annotations): `thresholds`, `recall` ("residue"), `f1_cut` (0.5),
  `sources`: list of {`name`, `paths`, `format`, `n_valid_proteins`, `n_test_proteins`, `n_valid_tokens`,
  `n_test_tokens`, `concepts`: [{`id`, `name`, `valid_positives`, `test_positives`}]}, and `per_sae`: name ->
  - `summary`: over all evaluable concepts of all sources: `n_concepts`, `n_evaluable`, `coverage`,
    `mean_best_test_f1`, `mean_best_test_f1_instance` (instance recall), `n_latents_f1_gt` (distinct
    valid-chosen latents with test F1 > 0.5),
    `top10_mean_f1`, `top10_max_f1`, and for a ProtSAE `defined_mean_test_f1`, `pi_mean_test_f1`,
    `participation_predicted`, `participation_positive` (means over bound concepts);
  - `sources`: source name -> the same summary restricted to that source;
  - `per_concept`: rows {`source`, `concept`, `name`, `latent`, `threshold`, `valid_f1`, `test_f1`,
    `test_precision`, `test_recall`, `instance_test_f1`, `top10_mean_f1`, `top10_max_f1`, `defined_latent`
    (null unless a ProtSAE latent is bound to the concept), `defined_threshold`, `defined_valid_f1`,
    `defined_test_f1`, `pi_test_f1`, `participation_predicted` (share of test residues with pi > 0.5 where
    the defined latent is among the active codes), `participation_positive` (share of positive test residues
    where it is active)}.
  Thresholds are on normalised activations (activation / the latent's maximum over validation residues).
- `probing` (absent without protein-level annotations): source name -> `n_terms`, `n_valid_proteins`,
  `n_test_proteins`, `pool`, `plm_mean_pool` (probe on the mean-pooled hook activation), `per_sae`: name ->
  {`probe`, `zero_shot` (ProtSAE only, else null)}; each metrics block is {`fmax` {fmax, threshold,
  precision, recall}, `aupr`, `auc` {auc, n_terms}}.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import torch

from protsae_cli.errors import InputError
from protsae_cli.labels.sources import AnnotationSpec, LabelSource, load_label_sources  # noqa: F401 (EvalOptions)
from protsae_cli.evaluate.metrics import (DEFAULT_THRESHOLDS, ConceptCounts, ReconstructionStats, argmax_agreement,
                                 concept_counts, kl_score, latent_max, loss_recovered, normalisation_scales,
                                 probe_metrics, select_best_on_valid_and_report_test, top_relevance_f1)
from protsae_cli.evaluate.options import EvalOptions  # noqa: F401 (public here too; defaults live there)

log = logging.getLogger("protsae.eval")

FORMAT = "protsae-eval"
FORMAT_VERSION = 1
VALID, TEST = "valid", "test"
# Rows per concept-counting chunk: bounded memory for the dense [rows, concepts] label block and the CSR products.
CHUNK_ROWS = 65_536


# ===================================================================================================== options


# ====================================================================================================== splits
def assign_splits(ids: Sequence[str], split_ids: tuple[str, str] | None, valid_fraction: float,
                  seed: int) -> tuple[list[str | None], dict[str, Any]]:
    """Per protein: "valid", "test" or None. By id lists (a protein in both is an error: no leakage), or a
    seeded random fraction of proteins (never of residues)."""
    n = len(ids)
    if split_ids is not None:
        vp, tp = split_ids
        valid = _read_ids(vp)
        test = _read_ids(tp)
        both = valid & test
        if both:
            raise InputError(f"{len(both)} protein ids are in both {vp} and {tp} (e.g. {sorted(both)[0]}); "
                             "validation and test proteins must be disjoint")
        out = [VALID if i in valid else TEST if i in test else None for i in ids]
        info: dict[str, Any] = {"method": "ids", "valid_ids": vp, "test_ids": tp}
    elif valid_fraction > 0:
        if not 0 < valid_fraction < 1:
            raise InputError(f"--valid-fraction must be in (0, 1), got {valid_fraction}")
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        n_valid = int(round(n * valid_fraction))
        is_valid = np.zeros(n, bool)
        is_valid[perm[:n_valid]] = True
        out = [VALID if v else TEST for v in is_valid]
        info = {"method": "fraction", "valid_fraction": valid_fraction, "seed": seed}
    else:
        out = [None] * n
        info = {"method": "none"}
    info.update(n_valid=out.count(VALID), n_test=out.count(TEST), n_unassigned=out.count(None))
    return out, info


def _read_ids(path: str) -> set[str]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InputError(f"cannot read id list {path}: {e}") from e
    return {line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#")}


# ============================================================================================ activation sources
Batch = tuple[list[int], list[torch.Tensor]]   # (protein indices, per-protein activations [L_i, d])


def plm_activation_batches(runner: Any, hook: Any, sequences: Sequence[str], toks_per_batch: int,
                           max_residues: int, progress: Callable[..., None] | None = None) -> Iterator[Batch]:
    """Hook activations of every protein (cropped to its first `max_residues` residues), batch by batch;
    `progress(n_proteins, residues=n)` after each batch is handed on."""
    lengths = [min(len(s), max_residues) for s in sequences]
    from protsae_cli.plm.batching import plan_batches

    for batch in plan_batches(lengths, toks_per_batch):
        seqs = [sequences[i][:lengths[i]] for i in batch]
        h = runner.hook_activations(runner.tokenizer.batch(seqs), hook)
        yield batch, [h[b, 1:len(s) + 1].float().cpu() for b, s in enumerate(seqs)]
        if progress is not None:
            progress(len(batch), residues=sum(map(len, seqs)))


def cached_activation_batches(acts: Any, protein_order: Sequence[int] | None = None,
                              rows_per_batch: int = 16384) -> Iterator[Batch]:
    """Batches from an `ActivationSet` collected with every residue kept (tokens_per_protein=None).

    Rows are regrouped per protein and ordered by position, so row i of a protein is residue i + 1 as the
    label matrices expect; a protein whose positions are not exactly 0..L-1 is refused (it was subsampled).
    """
    prot = acts.protein.numpy()
    order = np.argsort(prot, kind="stable")
    bounds = np.searchsorted(prot[order], np.arange(len(acts.protein_ids) + 1))
    wanted = range(len(acts.protein_ids)) if protein_order is None else protein_order
    cur_idx: list[int] = []
    cur_x: list[torch.Tensor] = []
    n_rows = 0
    for p in wanted:
        rows = order[bounds[p]:bounds[p + 1]]
        if rows.size == 0:
            continue
        pos = acts.position[rows].numpy()
        o = np.argsort(pos)
        rows, pos = rows[o], pos[o]
        if not np.array_equal(pos, np.arange(rows.size)):
            raise InputError(f"activation cache: protein {acts.protein_ids[p]!r} does not have every residue "
                             "(collect with tokens_per_protein=None for evaluation)")
        cur_idx.append(int(p))
        cur_x.append(acts.acts[torch.from_numpy(rows)].float())
        n_rows += rows.size
        if n_rows >= rows_per_batch:
            yield cur_idx, cur_x
            cur_idx, cur_x, n_rows = [], [], 0
    if cur_idx:
        yield cur_idx, cur_x


# ============================================================================================ code spill (disk)
class _CodeSpill:
    """Sparse codes (and a ProtSAE's pi) of selected proteins on disk, read back by protein.

    float32 values (not float16): thresholds are compared on val / max, and rounding would move residues across
    a threshold.
    """

    def __init__(self, directory: Path, width: int, n_pi: int) -> None:
        self.dir = directory
        self.width, self.n_pi = width, n_pi
        self.f_idx = open(directory / "idx.bin", "wb")
        self.f_val = open(directory / "val.bin", "wb")
        self.f_pi = open(directory / "pi.bin", "wb") if n_pi else None
        self.offsets: dict[int, tuple[int, int]] = {}
        self.rows = 0
        self._mm: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None

    def write(self, protein: int, idx: np.ndarray, val: np.ndarray, pi: np.ndarray | None) -> None:
        n = idx.shape[0]
        self.f_idx.write(np.ascontiguousarray(idx, np.int32).tobytes())
        self.f_val.write(np.ascontiguousarray(val, np.float32).tobytes())
        if self.f_pi is not None and pi is not None:
            self.f_pi.write(np.ascontiguousarray(pi, np.float32).tobytes())
        self.offsets[protein] = (self.rows, n)
        self.rows += n

    def finish(self) -> None:
        for f in (self.f_idx, self.f_val, self.f_pi):
            if f is not None:
                f.close()
        if self.rows:
            idx = np.memmap(self.dir / "idx.bin", np.int32, "r", shape=(self.rows, self.width))
            val = np.memmap(self.dir / "val.bin", np.float32, "r", shape=(self.rows, self.width))
            pi = (np.memmap(self.dir / "pi.bin", np.float32, "r", shape=(self.rows, self.n_pi))
                  if self.n_pi else None)
            self._mm = (idx, val, pi)

    def close(self) -> None:
        """Release files and maps (the temporary directory can then be removed, also on Windows)."""
        for f in (self.f_idx, self.f_val, self.f_pi):
            if f is not None and not f.closed:
                f.close()
        self._mm = None

    def read(self, protein: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        start, n = self.offsets[protein]
        if self._mm is None:
            raise RuntimeError("code spill read before finish() (or after close(), or with no rows written)")
        idx, val, pi = self._mm
        return (np.asarray(idx[start:start + n]), np.asarray(val[start:start + n]),
                None if pi is None else np.asarray(pi[start:start + n]))


# ============================================================================================ SAE bookkeeping
@dataclass
class _SAEState:
    name: str
    sae: Any
    defined: dict[str, int]                  # concept id (and ontology id) -> defined latent
    n_pi: int                                # ProtSAE concepts (0 for TopK)
    stats: ReconstructionStats
    max_valid: np.ndarray
    spill: _CodeSpill | None = None
    pooled: dict[int, np.ndarray] = field(default_factory=dict)   # protein -> max-pooled latents


def _defined_map(sae: Any) -> dict[str, int]:
    """Concept id -> latent for a ProtSAE's defined latents (0..m-1); empty for other SAEs.

    A TopK SAE's `concepts` are post-hoc labels, not bindings; counting them as "defined" would credit a
    label with a training property it never had.
    """
    if not sae.has_concept_predictor:
        return {}
    m = sae.n_concepts
    out: dict[str, int] = {}
    for e in sae.cfg.concepts:
        if 0 <= e.latent < m:
            for key in (e.concept_id, e.ontology_id):
                if key:
                    out.setdefault(key, e.latent)
    return out


def _encode(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    idx, val = sae.encode(x)
    x_hat = sae.decode_sparse(idx, val)
    pi = sae.concept_probabilities(x) if sae.has_concept_predictor else None
    return idx, val, x_hat, pi


def sae_summary(name: str, path: str, sha: str, sae: Any) -> dict[str, Any]:
    cfg = sae.cfg
    return {"name": name, "path": str(path), "sha256": sha, "arch": cfg.arch, "d_sae": cfg.d_sae, "k": cfg.k,
            "n_defined": sae.n_concepts}


def unique_names(paths: Sequence[str]) -> list[str]:
    """Readable, distinct SAE names for tables: the directory name, numbered when two collide."""
    base = [Path(p).name or str(p) for p in paths]
    out = []
    for i, b in enumerate(base):
        out.append(b if base.count(b) == 1 else f"{b}#{i + 1}")
    return out


# ============================================================================================== main pass
@torch.no_grad()
def evaluate_activations(saes: Sequence[Any], names: Sequence[str], protein_ids: Sequence[str],
                         lengths: Sequence[int], batches: Iterable[Batch], sources: Sequence[LabelSource],
                         split: Sequence[str | None], thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                         dense_threshold: float = 0.5, device: str | torch.device = "cpu",
                         workdir: str | None = None, full_lengths: Sequence[int] | None = None) -> dict[str, Any]:
    """Reconstruction, concept and probing results of several SAEs on the same activations.

    `lengths` are the evaluated residues per protein (after cropping), `full_lengths` the sequence lengths (the
    label matrices are built for the whole sequence, then cut); `batches` yield each protein's activations
    once. Returns the JSON blocks `reconstruction`, `concepts`, `probing` and `mean_activation` (the hook mean
    over all evaluated residues, the mean-ablation vector for `lm_fidelity`).
    """
    if len(saes) != len(names):
        raise ValueError("one name per SAE")
    res_sources = [s for s in sources if s.kind == "residue"]
    prot_sources = [s for s in sources if s.kind == "protein"]
    id_pos = {pid: i for i, pid in enumerate(protein_ids)}
    in_res = np.zeros(len(protein_ids), bool)
    for s in res_sources:
        for pid in s.labels.protein_ids:
            if pid in id_pos:
                in_res[id_pos[pid]] = True
    in_prot = np.zeros(len(protein_ids), bool)
    for s in prot_sources:
        for pid in s.labels.protein_ids:
            if pid in id_pos:
                in_prot[id_pos[pid]] = True
    assigned = np.array([s is not None for s in split], bool)
    spill_mask = in_res & assigned
    tmp = tempfile.TemporaryDirectory(prefix="protsae-eval-", dir=workdir)
    states: list[_SAEState] = []
    for i, (name, sae) in enumerate(zip(names, saes, strict=True)):
        sae.eval()
        width = sae.code_width
        n_pi = sae.n_concepts
        spill = None
        if spill_mask.any():
            d = Path(tmp.name) / f"sae{i}"
            d.mkdir()
            spill = _CodeSpill(d, width, n_pi)
        states.append(_SAEState(name, sae, _defined_map(sae), n_pi, ReconstructionStats(sae.cfg.d_sae, dense_threshold),
                                np.zeros(sae.cfg.d_sae, np.float64), spill))
    d_model = saes[0].cfg.d_model
    sum_x = np.zeros(d_model, np.float64)
    n_tok = 0
    plm_pooled: dict[int, np.ndarray] = {}
    try:
        for prot_idx, xs in batches:
            x = torch.cat(xs).to(device).float()
            sizes = [t.shape[0] for t in xs]
            bounds = np.concatenate([[0], np.cumsum(sizes)])
            pidx = np.repeat(np.asarray(prot_idx, np.int64), sizes)
            sum_x += x.double().sum(0).cpu().numpy()
            n_tok += x.shape[0]
            for b, p in enumerate(prot_idx):
                if in_prot[p]:
                    plm_pooled[p] = x[bounds[b]:bounds[b + 1]].mean(0).cpu().numpy()
            valid_rows = np.repeat(np.array([split[p] == VALID for p in prot_idx]), sizes)
            for st in states:
                idx, val, x_hat, pi = _encode(st.sae, x)
                st.stats.update(x, x_hat, idx, val, protein_index=pidx)
                idx_np, val_np = idx.cpu().numpy(), val.cpu().numpy()
                if valid_rows.any():
                    latent_max(idx_np[valid_rows], val_np[valid_rows], st.sae.cfg.d_sae, out=st.max_valid)
                pi_np = pi.cpu().numpy() if pi is not None else None
                for b, p in enumerate(prot_idx):
                    lo, hi = bounds[b], bounds[b + 1]
                    if st.spill is not None and spill_mask[p]:
                        st.spill.write(p, idx_np[lo:hi], val_np[lo:hi], None if pi_np is None else pi_np[lo:hi])
                    if in_prot[p]:
                        st.pooled[p] = _max_pool(idx_np[lo:hi], val_np[lo:hi], st.sae.cfg.d_sae,
                                                 None if pi_np is None else pi_np[lo:hi])
        if n_tok == 0:
            raise InputError("no residues to evaluate")
        for st in states:
            if st.spill is not None:
                st.spill.finish()
        out: dict[str, Any] = {"reconstruction": {st.name: st.stats.result() for st in states},
                               "mean_activation": sum_x / n_tok}
        if res_sources and any(s == VALID for s in split) and any(s == TEST for s in split):
            out["concepts"] = _concept_results(states, res_sources, protein_ids, lengths,
                                               list(full_lengths) if full_lengths is not None else list(lengths),
                                               split, id_pos, np.asarray(thresholds, np.float64))
        elif res_sources:
            log.warning("residue annotations given but no validation/test split: concept alignment skipped")
        if prot_sources:
            out["probing"] = _probing_results(states, prot_sources, protein_ids, split, id_pos, plm_pooled)
        return out
    finally:
        for st in states:
            if st.spill is not None:
                st.spill.close()
        tmp.cleanup()


def _max_pool(idx: np.ndarray, val: np.ndarray, d_sae: int, pi: np.ndarray | None) -> np.ndarray:
    """Per-protein max of every latent (0 when it never fires), with max-pooled pi appended for a ProtSAE."""
    v = np.zeros(d_sae, np.float32)
    ok = idx >= 0
    if ok.any():
        np.maximum.at(v, idx[ok], val[ok])
    if pi is not None:
        v = np.concatenate([v, pi.max(0) if pi.shape[0] else np.zeros(pi.shape[1], np.float32)])
    return v


# ============================================================================================ concept results
def _source_rows(src: LabelSource, pid: str, length: int, full_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels bool [L, C], instance ids int [L, C], keep mask [L]) for one protein's evaluated residues."""
    labels = src.labels
    y = labels.dense(pid, full_length, src.concepts)[:length]
    keep = labels.mask(pid, full_length)[:length]
    inst = np.full(y.shape, -1, np.int64)
    per = labels.instances.get(pid, {})
    col = {c: j for j, c in enumerate(src.concepts)}
    k = 0
    for concept, spans in per.items():
        j = col.get(concept)
        if j is None:
            continue
        for s, e in spans:
            seg = np.arange(s, min(e, length))
            seg = seg[y[seg, j]] if seg.size else seg
            inst[seg, j] = k
            k += 1
    return y, inst, keep


def _concept_results(states: Sequence[_SAEState], sources: Sequence[LabelSource], protein_ids: Sequence[str],
                     lengths: Sequence[int], full_lengths: Sequence[int], split: Sequence[str | None], id_pos: dict[str, int],
                     thresholds: np.ndarray) -> dict[str, Any]:
    src_info = []
    per_sae: dict[str, dict[str, Any]] = {st.name: {"sources": {}, "per_concept": []} for st in states}
    for src in sources:
        members = {sp: [id_pos[p] for p in src.labels.protein_ids if p in id_pos and split[id_pos[p]] == sp]
                   for sp in (VALID, TEST)}
        info = {"name": src.name, "paths": src.paths, "format": src.fmt,
                "n_valid_proteins": len(members[VALID]), "n_test_proteins": len(members[TEST])}
        pos_counts = {sp: np.zeros(len(src.concepts), np.int64) for sp in (VALID, TEST)}
        tok_counts = {VALID: 0, TEST: 0}
        for st in states:
            scales, alive = normalisation_scales(st.max_valid)
            counts: dict[str, ConceptCounts | None] = {VALID: None, TEST: None}
            dl = np.array([st.defined.get(c, -1) for c in src.concepts], np.int64)
            pi_acc = np.zeros((3, len(src.concepts)), np.int64)      # tp, predicted, positives (pi > 0.5, test)
            part_acc = np.zeros((4, len(src.concepts)), np.int64)    # pred&kept, pred, pos&kept, pos (test)
            for sp in (VALID, TEST):
                for chunk in _chunks(members[sp], lengths, CHUNK_ROWS):
                    # Members are residue-labelled proteins in a split: spill_mask gave this SAE a spill.
                    assert st.spill is not None
                    ys, insts, idxs, vals, pis = [], [], [], [], []
                    base = 0
                    for p in chunk:
                        y, inst, keep = _source_rows(src, protein_ids[p], lengths[p], full_lengths[p])
                        idx, val, pi = st.spill.read(p)
                        inst = np.where(inst >= 0, inst + base, -1)
                        base = int(inst.max()) + 1 if (inst >= 0).any() else base
                        ys.append(y[keep]); insts.append(inst[keep]); idxs.append(idx[keep]); vals.append(val[keep])
                        if pi is not None:
                            pis.append(pi[keep])
                    y, inst = np.concatenate(ys), np.concatenate(insts)
                    idx, val = np.concatenate(idxs), np.concatenate(vals)
                    c = concept_counts(idx, val, y, scales, thresholds, instance_ids=inst, alive=alive)
                    prev = counts[sp]
                    counts[sp] = c if prev is None else prev + c
                    if st is states[0]:
                        pos_counts[sp] += y.sum(0)
                        tok_counts[sp] += y.shape[0]
                    if sp == TEST and (dl >= 0).any():
                        pi = np.concatenate(pis) if pis else None
                        _accumulate_defined(dl, y, idx, val, pi, pi_acc, part_acc)
            c_valid, c_test = counts[VALID], counts[TEST]
            if c_valid is None or c_test is None:
                continue
            rows, summ = _source_tables(src, st, c_valid, c_test, dl, pi_acc, part_acc)
            per_sae[st.name]["sources"][src.name] = summ
            per_sae[st.name]["per_concept"].extend(rows)
        info.update(n_valid_tokens=tok_counts[VALID], n_test_tokens=tok_counts[TEST],
                    concepts=[{"id": c, "name": src.names.get(c, c), "valid_positives": int(pos_counts[VALID][j]),
                               "test_positives": int(pos_counts[TEST][j])} for j, c in enumerate(src.concepts)])
        src_info.append(info)
    for st in states:
        per_sae[st.name]["summary"] = _summarise(per_sae[st.name]["per_concept"], st.n_pi > 0)
    return {"thresholds": thresholds.tolist(), "recall": "residue", "f1_cut": 0.5, "sources": src_info,
            "per_sae": per_sae}


def _chunks(members: Sequence[int], lengths: Sequence[int] | Mapping[int, int], max_rows: int) -> Iterator[list[int]]:
    cur: list[int] = []
    rows = 0
    for p in members:
        if cur and rows + lengths[p] > max_rows:
            yield cur
            cur, rows = [], 0
        cur.append(p)
        rows += lengths[p]
    if cur:
        yield cur


def _accumulate_defined(dl: np.ndarray, y: np.ndarray, idx: np.ndarray, val: np.ndarray, pi: np.ndarray | None,
                        pi_acc: np.ndarray, part_acc: np.ndarray) -> None:
    """Predictor F1 (pi > 0.5) and participation of each bound concept's defined latent on test residues."""
    for j in np.flatnonzero(dl >= 0):
        lat = dl[j]
        active = ((idx == lat) & (val > 0)).any(1)
        pos = y[:, j]
        part_acc[2, j] += int((pos & active).sum())
        part_acc[3, j] += int(pos.sum())
        if pi is not None:
            pred = pi[:, lat] > 0.5
            pi_acc[0, j] += int((pred & pos).sum())
            pi_acc[1, j] += int(pred.sum())
            pi_acc[2, j] += int(pos.sum())
            part_acc[0, j] += int((pred & active).sum())
            part_acc[1, j] += int(pred.sum())


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def _f1(tp: float, n_pred: float, n_pos: float) -> float:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_pos if n_pos else 0.0
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _source_tables(src: LabelSource, st: _SAEState, valid: ConceptCounts, test: ConceptCounts, dl: np.ndarray,
                   pi_acc: np.ndarray, part_acc: np.ndarray) -> tuple[list[dict], dict]:
    sel = select_best_on_valid_and_report_test(valid, test, "residue")
    sel_i = select_best_on_valid_and_report_test(valid, test, "instance")
    top = top_relevance_f1(valid, test, top=10, recall="residue")
    f1v, f1t = valid.f1("residue"), test.f1("residue")
    rows = []
    for j, c in enumerate(src.concepts):
        evaluable = bool(sel.latent[j] >= 0)
        row = {"source": src.name, "concept": c, "name": src.names.get(c, c), "latent": int(sel.latent[j]),
               "threshold": _nan_none(sel.threshold[j]), "valid_f1": _nan_none(sel.valid_f1[j]),
               "test_f1": _nan_none(sel.test_f1[j]), "test_precision": _nan_none(sel.test_precision[j]),
               "test_recall": _nan_none(sel.test_recall[j]), "instance_test_f1": _nan_none(sel_i.test_f1[j]),
               "top10_mean_f1": _nan_none(top["mean_f1"][j]), "top10_max_f1": _nan_none(top["max_f1"][j]),
               "defined_latent": None, "defined_threshold": None, "defined_valid_f1": None,
               "defined_test_f1": None, "pi_test_f1": None, "participation_predicted": None,
               "participation_positive": None, "evaluable": evaluable}
        lat = int(dl[j])
        if lat >= 0:
            t = int(np.argmax(f1v[:, lat, j]))
            row.update(defined_latent=lat, defined_threshold=float(valid.thresholds[t]),
                       defined_valid_f1=float(f1v[t, lat, j]),
                       defined_test_f1=float(f1t[t, lat, j]) if evaluable else None,
                       pi_test_f1=_f1(*pi_acc[:, j]) if (st.n_pi and evaluable) else None,
                       participation_predicted=_ratio(part_acc[0, j], part_acc[1, j]),
                       participation_positive=_ratio(part_acc[2, j], part_acc[3, j]))
        rows.append(row)
    return rows, _summarise(rows, st.n_pi > 0)


def _nan_none(v: Any) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def _mean(vals: Iterable[float | None]) -> float | None:
    v = [x for x in vals if x is not None]
    return float(np.mean(v)) if v else None


def _summarise(rows: Sequence[dict], protsae: bool) -> dict[str, Any]:
    ev = [r for r in rows if r["evaluable"]]
    out = {"n_concepts": len(rows), "n_evaluable": len(ev),
           "coverage": sum(1 for r in ev if (r["test_f1"] or 0) > 0.5),
           "mean_best_test_f1": _mean(r["test_f1"] for r in ev),
           "mean_best_test_f1_instance": _mean(r["instance_test_f1"] for r in ev),
           "top10_mean_f1": _mean(r["top10_mean_f1"] for r in ev),
           "top10_max_f1": _mean(r["top10_max_f1"] for r in ev),
           "n_latents_f1_gt": len({r["latent"] for r in ev if (r["test_f1"] or 0) > 0.5})}
    if protsae:
        bound = [r for r in ev if r["defined_latent"] is not None]
        out.update(n_bound=len(bound), defined_mean_test_f1=_mean(r["defined_test_f1"] for r in bound),
                   pi_mean_test_f1=_mean(r["pi_test_f1"] for r in bound),
                   participation_predicted=_mean(r["participation_predicted"] for r in bound),
                   participation_positive=_mean(r["participation_positive"] for r in bound))
    return out


# ============================================================================================= probing results
def _probing_results(states: Sequence[_SAEState], sources: Sequence[LabelSource], protein_ids: Sequence[str],
                     split: Sequence[str | None], id_pos: dict[str, int],
                     plm_pooled: dict[int, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for src in sources:
        members = {sp: [id_pos[p] for p in src.labels.protein_ids if p in id_pos and split[id_pos[p]] == sp
                        and id_pos[p] in plm_pooled] for sp in (VALID, TEST)}
        if not members[VALID] or not members[TEST]:
            log.warning("%s: protein-level probing needs annotated proteins in both valid and test", src.name)
            continue
        terms = src.concepts
        Y = {sp: src.labels.matrix([protein_ids[p] for p in members[sp]], terms) for sp in (VALID, TEST)}
        anc = _ancestor_matrix(src.ontology, terms)
        block: dict[str, Any] = {"n_terms": len(terms), "n_valid_proteins": len(members[VALID]),
                                 "n_test_proteins": len(members[TEST]), "pool": "max (SAE latents), mean (PLM)",
                                 "per_sae": {}}
        feats = {sp: np.stack([plm_pooled[p] for p in members[sp]]) for sp in (VALID, TEST)}
        block["plm_mean_pool"] = _probe_and_score(feats, Y, anc)
        for st in states:
            d_sae = st.sae.cfg.d_sae
            F = {sp: np.stack([st.pooled[p][:d_sae] for p in members[sp]]) for sp in (VALID, TEST)}
            entry: dict[str, Any] = {"probe": _probe_and_score(F, Y, anc), "zero_shot": None}
            cols = [(j, st.defined[t]) for j, t in enumerate(terms) if t in st.defined]
            if st.n_pi and cols:
                pi = np.stack([st.pooled[p][d_sae:] for p in members[TEST]])
                s = np.zeros(Y[TEST].shape, np.float64)
                for j, lat in cols:
                    s[:, j] = pi[:, lat]
                entry["zero_shot"] = _jsonable(probe_metrics(Y[TEST], s, ancestors=anc))
                entry["zero_shot"]["n_terms_bound"] = len(cols)
            block["per_sae"][st.name] = entry
        out[src.name] = block
    return out


def _ancestor_matrix(onto: Any, terms: Sequence[str]) -> np.ndarray | None:
    if onto is None:
        return None
    col = {t: j for j, t in enumerate(terms)}
    A = np.eye(len(terms), dtype=bool)
    for f, t in enumerate(terms):
        if t in onto:
            for a in onto.ancestors(t):
                g = col.get(a)
                if g is not None:
                    A[f, g] = True
    return A


def fit_logistic_probe(X: np.ndarray, Y: np.ndarray, l2: float = 1e-3, iters: int = 100) -> Callable[[np.ndarray], np.ndarray]:
    """Multi-label logistic regression (standardised features, L2, full-batch L-BFGS); returns a scorer.

    A fixed, documented regulariser rather than tuning on valid: the probe is fitted *on* the validation
    proteins and scored on the test proteins, so there is no third split left to tune on.
    """
    Xt = torch.as_tensor(X, dtype=torch.float32)
    Yt = torch.as_tensor(Y, dtype=torch.float32)
    mu, sd = Xt.mean(0), Xt.std(0).clamp_min(1e-6)
    Xs = (Xt - mu) / sd
    W = torch.zeros(Xt.shape[1], Y.shape[1], requires_grad=True)
    prior = Yt.mean(0).clamp(1e-4, 1 - 1e-4)
    b = torch.log(prior / (1 - prior)).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(Xs @ W + b, Yt) + l2 * W.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    W_, b_ = W.detach(), b.detach()

    def score(Xn: np.ndarray) -> np.ndarray:
        Z = (torch.as_tensor(Xn, dtype=torch.float32) - mu) / sd
        return torch.sigmoid(Z @ W_ + b_).numpy()

    return score


def _probe_and_score(feats: dict[str, np.ndarray], Y: dict[str, np.ndarray], anc: np.ndarray | None) -> dict:
    scorer = fit_logistic_probe(feats[VALID], Y[VALID])
    return _jsonable(probe_metrics(Y[TEST], scorer(feats[TEST]), ancestors=anc))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ================================================================================================ LM fidelity
def _residue_mask(lengths: Sequence[int], T: int) -> torch.Tensor:
    pos = torch.arange(T)[None, :]
    n = torch.as_tensor(list(lengths))[:, None]
    return (pos >= 1) & (pos <= n)


def _splice(mask: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit that replaces residue positions by fn(rows) and leaves BOS/EOS/padding untouched."""
    def edit(x: torch.Tensor) -> torch.Tensor:
        m = mask.to(x.device)
        out = x.clone()
        out[m] = fn(x[m].float()).to(x.dtype)
        return out

    return edit


def _reconstruction(sae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """rows -> the SAE's reconstruction decode(encode(rows)), bound to this `sae`."""
    def fn(r: torch.Tensor) -> torch.Tensor:
        return sae.decode_sparse(*sae.encode(r))

    return fn


class _CEAcc:
    """Float64 sums of CE, KL to the original and argmax agreement over scored positions."""

    def __init__(self) -> None:
        self.n = 0
        self.ce = 0.0
        self.kl = 0.0
        self.agree = 0.0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, pos: torch.Tensor,
            ref: torch.Tensor | None) -> None:
        lg = logits[pos].double()
        lp = torch.log_softmax(lg, -1)
        self.ce += float(-lp.gather(-1, targets[pos][:, None]).sum())
        n = int(pos.sum())
        self.n += n
        if ref is not None:
            lr = torch.log_softmax(ref[pos].double(), -1)
            self.kl += float((lr.exp() * (lr - lp)).sum())
            self.agree += argmax_agreement(ref[pos], logits[pos]) * n

    def mean(self, what: str) -> float:
        return getattr(self, what) / self.n if self.n else math.nan


def _exp(v: float) -> float | None:
    """Perplexity; None where exp overflows (a broken model, not a number worth printing)."""
    try:
        return math.exp(v)
    except OverflowError:
        return None


@torch.no_grad()
def lm_fidelity(runner: Any, hook: Any, saes: Sequence[Any], names: Sequence[str], sequences: Sequence[str],
                mean_activation: np.ndarray, toks_per_batch: int = 8192, mask_fraction: float = 0.15,
                seed: int = 0, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """CE with each SAE spliced in at `hook` against original, zero- and mean-ablation (unmasked and masked LM).

    The original, zero and mean forwards are shared by all SAEs. Positions scored: every residue (unmasked), or
    the `mask_fraction` of residues (at least one per protein) replaced by <mask> with `seed` (masked). Loss
    recovered uses the headroom guard of `metrics.loss_recovered` (undefined below 0.05 nats).
    """
    from protsae_cli.plm.batching import plan_batches

    tok = runner.tokenizer
    mu = torch.as_tensor(mean_activation, dtype=torch.float32)
    rng = np.random.default_rng(seed)
    variants = ["orig", "zero", "mean", *[f"sae:{n}" for n in names]]
    acc = {mode: {v: _CEAcc() for v in variants} for mode in ("unmasked", "masked")}
    identity: dict[str, Any] | None = None
    lengths = [len(s) for s in sequences]
    batches = plan_batches(lengths, toks_per_batch)
    # Masks are drawn in input order, so they do not depend on the batching.
    masks = []
    for length in lengths:
        k = max(1, int(round(mask_fraction * length)))
        masks.append(np.sort(rng.choice(length, k, replace=False)) + 1)
    for batch in batches:
        seqs = [sequences[i] for i in batch]
        tokens = tok.batch(seqs)
        res = _residue_mask([len(s) for s in seqs], tokens.shape[1])
        masked_tokens = tokens.clone()
        mpos = torch.zeros_like(res)
        for b, i in enumerate(batch):
            mpos[b, torch.as_tensor(masks[i])] = True
        masked_tokens[mpos] = tok.mask
        for mode, inp, pos in (("unmasked", tokens, res), ("masked", masked_tokens, mpos)):
            orig = runner.logits(inp).cpu()
            a = acc[mode]
            a["orig"].add(orig, tokens, pos, None)
            if identity is None and mode == "unmasked":
                ident = runner.logits(inp, hook, edit=lambda x: x).cpu()
                acc_i = _CEAcc()
                acc_i.add(ident, tokens, pos, None)
                acc_o = _CEAcc()
                acc_o.add(orig, tokens, pos, None)
                identity = {"scope": "first batch, unmasked", "n_tokens": acc_o.n,
                            "max_abs_logit_diff": float((ident - orig).abs().max()),
                            "ce_orig": acc_o.mean("ce"), "ce_identity": acc_i.mean("ce")}
                identity["exact"] = identity["max_abs_logit_diff"] == 0.0
            for v in variants[1:]:
                fn: Callable[[torch.Tensor], torch.Tensor]
                if v == "zero":
                    fn = torch.zeros_like
                elif v == "mean":
                    fn = lambda r: mu.to(r.device).expand_as(r)  # noqa: E731
                else:
                    fn = _reconstruction(saes[names.index(v[4:])])
                lg = runner.logits(inp, hook, edit=_splice(res, fn)).cpu()
                a[v].add(lg, tokens, pos, orig)
        if progress is not None:
            progress(len(batch))
    out: dict[str, Any] = {"n_proteins": len(sequences), "identity_splice": identity}
    for mode in ("unmasked", "masked"):
        a = acc[mode]
        ce_o, ce_z, ce_m = (a[v].mean("ce") for v in ("orig", "zero", "mean"))
        kl_z, kl_m = a["zero"].mean("kl"), a["mean"].mean("kl")
        block: dict[str, Any] = {"n_tokens": a["orig"].n, "ce_orig": ce_o, "ce_zero": ce_z, "ce_mean": ce_m,
                                 "ppl_orig": _exp(ce_o), "kl_zero": kl_z, "kl_mean": kl_m, "per_sae": {}}
        for n in names:
            s = a[f"sae:{n}"]
            ce = s.mean("ce")
            kl = s.mean("kl")
            block["per_sae"][n] = {
                "ce": ce, "delta_ce": ce - ce_o, "ppl": _exp(ce),
                "loss_recovered_zero": loss_recovered(ce_o, ce, ce_z),
                "loss_recovered_mean": loss_recovered(ce_o, ce, ce_m),
                "kl": kl, "kl_score_zero": kl_score(kl, kl_z), "kl_score_mean": kl_score(kl, kl_m),
                "argmax_agreement": s.mean("agree"),
            }
        if mode == "masked":
            block.update(mask_fraction=mask_fraction, seed=seed)
        out[mode] = block
    return out


# ================================================================================================ orchestration
def evaluate(opts: EvalOptions) -> dict[str, Any]:
    """Run the whole evaluation as the options say; writes JSON / Markdown / plots when asked. Returns the JSON."""
    from protsae_cli import __version__
    from protsae_cli.plm.esm_forward import EsmRunner, HookPoint
    from protsae_cli.progress import Progress
    from protsae_cli.runtime import check_pairing, open_sae, plm_for_sae, read_proteins, resolve_device

    if not opts.sae:
        raise InputError("give at least one --sae")
    device = resolve_device(opts.device)
    loaded = [open_sae(p, device) for p in opts.sae]
    saes = [s for s, _, _ in loaded]
    hooks = {(s.cfg.hook_point, s.cfg.layer) for s in saes}
    if len(hooks) != 1:
        raise InputError("all SAEs compared in one evaluation must share a hook point and layer; got "
                         + ", ".join(f"{p}@{l}" for p, l in sorted(hooks)))
    # One PLM for all: --model, else the one the first SAE records; every SAE must pair with it.
    plm = plm_for_sae(saes[0].cfg, loaded[0][2], opts.model, device)
    for s in saes:
        check_pairing(s.cfg, plm, not opts.no_check_plm)
    hook = HookPoint(*hooks.pop())
    runner = EsmRunner(plm, device, attention=opts.attention)
    runner.check_hook(hook)
    names = unique_names(opts.sae)

    # Annotations and split lists are matched by id: ids must be unique (runtime.read_proteins' rule).
    read = read_proteins(opts.fasta, skip_invalid=True, unique_ids=True)
    prots, n_invalid = read.records, read.n_invalid
    ids = [r.id for r in prots]
    seqs = [r.sequence.upper() for r in prots]
    lengths = [min(len(s), opts.max_residues) for s in seqs]
    split, split_info = assign_splits(ids, opts.split_ids, opts.valid_fraction, opts.seed)
    sources = load_label_sources(opts.annotations, dict(zip(ids, seqs, strict=True)), opts.ontologies, opts.propagate,
                                 against=f"{opts.fasta}")

    result: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "protsae_version": __version__,
        "command": opts.command, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "plm": {"name": plm.name, "sha256": plm.sha256}, "hook": str(hook),
        "data": {"fasta": str(opts.fasta), "n_proteins": len(prots), "n_invalid": n_invalid,
                 "n_cropped": sum(len(s) > opts.max_residues for s in seqs), "max_residues": opts.max_residues,
                 "n_tokens": int(sum(lengths)), "split": split_info},
        "saes": [sae_summary(n, p, sha, s)
                 for n, p, (s, sha) in zip(names, opts.sae, ((s, sha) for s, sha, _ in loaded), strict=True)],
    }
    log.info("evaluating %d SAE(s) on %d proteins (%d residues)", len(saes), len(prots), sum(lengths))
    with Progress("encoding", len(prots), unit="proteins", enabled=opts.progress) as bar:
        main = evaluate_activations(
            saes, names, ids, lengths,
            plm_activation_batches(runner, hook, seqs, opts.toks_per_batch, opts.max_residues, progress=bar),
            sources, split, opts.thresholds, opts.dense_threshold, device, full_lengths=[len(s) for s in seqs])
    mean_act = main.pop("mean_activation")
    result.update(main)
    if opts.lm_proteins > 0:
        pool = [i for i, s in enumerate(split) if s == TEST] or list(range(len(prots)))
        chosen = pool[:opts.lm_proteins]
        lm_seqs = [seqs[i][:opts.lm_max_len] for i in chosen]
        log.info("LM fidelity on %d proteins (%d residues)", len(lm_seqs), sum(map(len, lm_seqs)))
        with Progress("LM fidelity", len(lm_seqs), unit="proteins", enabled=opts.progress) as bar:
            fid = lm_fidelity(runner, hook, saes, names, lm_seqs, mean_act, opts.toks_per_batch,
                              opts.mask_fraction, opts.seed, progress=bar)
        fid.update(max_len=opts.lm_max_len, attention=runner.attention,
                   proteins="first test proteins" if split_info["n_test"] else "first proteins")
        result["lm_fidelity"] = fid
    result = _jsonable(result)
    write_outputs(result, opts.json_out, opts.markdown_out, opts.plots_dir)
    return result


def write_outputs(result: dict[str, Any], json_out: str | None, markdown_out: str | None,
                  plots_dir: str | None) -> dict[str, str]:
    """JSON (atomic rename), Markdown and PNGs; returns what was written."""
    written: dict[str, str] = {}
    if json_out:
        _atomic_write(json_out, json.dumps(result, indent=2) + "\n")
        written["json"] = json_out
    if plots_dir:
        written.update(write_plots(result, plots_dir))
    if markdown_out:
        _atomic_write(markdown_out, markdown_summary(result, plots=written))
        written["markdown"] = markdown_out
    return written


def _atomic_write(path: str, text: str) -> None:
    from protsae_cli.io.atomic import atomic_write_text

    atomic_write_text(path, text)


# ================================================================================================== Markdown
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.{digits}f}"
    return str(v)


def _pct(lr: dict | None) -> str:
    if not lr or not lr.get("defined"):
        return "undefined"
    return f"{lr['clipped']:.1f} % ({lr['unclipped']:.1f})"


def markdown_summary(result: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    """A human-readable report of the JSON (the JSON stays the source of truth)."""
    names = [s["name"] for s in result["saes"]]
    d = result["data"]
    L = [f"# protsae eval: {', '.join(names)}", "",
         f"PLM {result['plm']['name']} (sha256 {result['plm']['sha256'][:12]}…), hook {result['hook']}; "
         f"{d['n_proteins']} proteins, {d['n_tokens']} residues ({d['n_cropped']} cropped to {d['max_residues']}); "
         f"split {d['split']['method']}: {d['split']['n_valid']} valid / {d['split']['n_test']} test proteins. "
         f"Created {result['created']} by `{result['command']}`.", "",
         "## Reconstruction and sparsity", "",
         "| SAE | arch | d_sae | k | FVE | MSE/token | cosine | L0 | dead (of d_sae) | dense (>0.5) |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["saes"]:
        r = result["reconstruction"][s["name"]]
        L.append(f"| {s['name']} | {s['arch']} | {s['d_sae']} | {s['k']} | {_fmt(r['fve'])} | "
                 f"{_fmt(r['mse_per_token'], 4)} | {_fmt(r['cosine_mean'])} | {_fmt(r.get('l0_mean'), 1)} | "
                 f"{r['dead']['count']} ({100 * r['dead']['fraction']:.1f} %) | {r['dense']['count']} |")
    L += ["", f"Dead = never active on the {d['n_tokens']} evaluated residues (the token budget)."]
    fid = result.get("lm_fidelity")
    if fid:
        idt = fid["identity_splice"] or {}
        L += ["", "## Language-model fidelity", "",
              f"{fid['n_proteins']} proteins cropped to {fid['max_len']} residues. Identity splice: max |Δlogit| = "
              f"{_fmt(idt.get('max_abs_logit_diff'), 2)} ({'exact' if idt.get('exact') else 'NOT exact'}).", ""]
        for mode in ("unmasked", "masked"):
            b = fid[mode]
            extra = f", {100 * b['mask_fraction']:.0f} % masked, seed {b['seed']}" if mode == "masked" else ""
            L += [f"**{mode}** ({b['n_tokens']} positions{extra}): CE original {_fmt(b['ce_orig'])}, "
                  f"mean-ablation {_fmt(b['ce_mean'])}, zero-ablation {_fmt(b['ce_zero'])}.", "",
                  "| SAE | CE | ΔCE | loss recovered vs zero | loss recovered vs mean | KL | KL score (zero) | "
                  "argmax agreement |", "|---|---|---|---|---|---|---|---|"]
            for n in names:
                s = b["per_sae"][n]
                L.append(f"| {n} | {_fmt(s['ce'])} | {_fmt(s['delta_ce'])} | {_pct(s['loss_recovered_zero'])} | "
                         f"{_pct(s['loss_recovered_mean'])} | {_fmt(s['kl'])} | {_fmt(s['kl_score_zero'])} | "
                         f"{_fmt(s['argmax_agreement'])} |")
            L.append("")
        L.append("Loss recovered: clipped to [0, 100] (unclipped in brackets); 'undefined' when the ablation costs "
                 "less than 0.05 nats.")
    con = result.get("concepts")
    if con:
        L += ["", "## Concept alignment (InterPLM protocol)", "",
              f"Best (latent, threshold) per concept on the validation proteins, reported on the test proteins; "
              f"thresholds {con['thresholds']} on activations normalised by each latent's maximum over validation "
              "residues.", "",
              "| SAE | concepts evaluable | coverage (test F1 > 0.5) | mean best test F1 | (instance recall) | "
              "top-10 mean / max F1 | defined-latent F1 | pi F1 | participation |", "|---|---|---|---|---|---|---|---|---|"]
        for n in names:
            s = con["per_sae"][n]["summary"]
            L.append(f"| {n} | {s['n_evaluable']} | {s['coverage']} | {_fmt(s['mean_best_test_f1'])} | "
                     f"{_fmt(s['mean_best_test_f1_instance'])} | {_fmt(s['top10_mean_f1'])} / {_fmt(s['top10_max_f1'])} | "
                     f"{_fmt(s.get('defined_mean_test_f1'))} | {_fmt(s.get('pi_mean_test_f1'))} | "
                     f"{_fmt(s.get('participation_predicted'))} |")
        L += ["", "Per concept (test F1 of the valid-chosen latent; for a ProtSAE, its defined latent's F1 after the "
              "slash):", "", "| source | concept | test residues (+) | " + " | ".join(names) + " |",
              "|---|---|---|" + "---|" * len(names)]
        by_key: dict[tuple[str, str], dict[str, dict]] = {}
        for n in names:
            for r in con["per_sae"][n]["per_concept"]:
                by_key.setdefault((r["source"], r["concept"]), {})[n] = r
        npos = {(s["name"], c["id"]): c["test_positives"] for s in con["sources"] for c in s["concepts"]}
        for (src, c), rows in by_key.items():
            first = next(iter(rows.values()))
            cells = []
            for n in names:
                r = rows.get(n)
                if r is None:
                    cells.append("–")
                    continue
                cell = _fmt(r["test_f1"])
                if r["defined_latent"] is not None:
                    cell += f" / {_fmt(r['defined_test_f1'])}"
                cells.append(cell)
            L.append(f"| {src} | {first['name']} ({c}) | {npos.get((src, c), '–')} | " + " | ".join(cells) + " |")
    prob = result.get("probing")
    if prob:
        L += ["", "## Protein-level probing (DeepGO-SE metrics, propagated)", ""]
        for src, b in prob.items():
            L += [f"**{src}**: {b['n_terms']} terms, probe fitted on {b['n_valid_proteins']} validation proteins, "
                  f"scored on {b['n_test_proteins']} test proteins.", "",
                  "| features | Fmax | AUPR | AUC |", "|---|---|---|---|",
                  f"| PLM mean-pool | {_fmt(b['plm_mean_pool']['fmax']['fmax'])} | {_fmt(b['plm_mean_pool']['aupr'])} | "
                  f"{_fmt(b['plm_mean_pool']['auc']['auc'])} |"]
            for n, e in b["per_sae"].items():
                for kind in ("probe", "zero_shot"):
                    m = e.get(kind)
                    if m:
                        L.append(f"| {n} ({kind.replace('_', '-')}) | {_fmt(m['fmax']['fmax'])} | {_fmt(m['aupr'])} | "
                                 f"{_fmt(m['auc']['auc'])} |")
            L.append("")
    if plots:
        L += ["", "## Plots", ""]
        for key, path in plots.items():
            if path.endswith(".png"):
                L.append(f"- {key}: `{path}`")
    L += ["", "Keys and definitions: see the docstring of `protsae_cli/evaluate/pipeline.py` (JSON format "
          f"`{FORMAT}` v{FORMAT_VERSION}).", ""]
    return "\n".join(L)


# ===================================================================================================== plots
def write_plots(result: dict[str, Any], out_dir: str) -> dict[str, str]:
    """PNG figures: firing-frequency histogram, per-concept best F1 bars, CE bars. Returns {name: path}."""
    from protsae_cli.io.figures import PALETTE as colours
    from protsae_cli.io.figures import pyplot, save_png

    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [s["name"] for s in result["saes"]]
    written: dict[str, str] = {}

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, n in enumerate(names):
        r = result["reconstruction"][n]
        h = r.get("firing_frequency_log10_hist")
        if not h:
            continue
        edges, counts = np.asarray(h["edges"]), np.asarray(h["counts"])
        ax.stairs(counts, edges, color=colours[i % len(colours)], linewidth=2,
                  label=f"{n}: {r['dead']['count']} dead, {r['dense']['count']} dense of {r['d_sae']}")
    ax.set_xlabel("log10 firing frequency (fraction of evaluated residues)")
    ax.set_ylabel("latents")
    ax.set_title(f"Latent firing frequency ({result['data']['n_tokens']:,} residues; dead latents not shown)")
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    p = out / "firing_frequency.png"
    save_png(fig, p, dpi=130, tight=False)
    written["firing_frequency"] = str(p)

    con = result.get("concepts")
    if con:
        keys: list[tuple[str, str, str]] = []
        table: dict[tuple[str, str], dict[str, dict]] = {}
        for n in names:
            for r in con["per_sae"][n]["per_concept"]:
                if not r["evaluable"]:
                    continue
                k = (r["source"], r["concept"])
                if k not in table:
                    keys.append((r["source"], r["concept"], r["name"]))
                table.setdefault(k, {})[n] = r
        if keys:
            h = 0.8 / len(names)
            fig, ax = plt.subplots(figsize=(8, 0.45 * len(keys) * max(1, len(names) / 2) + 1.5))
            y = np.arange(len(keys))[::-1]
            for i, n in enumerate(names):
                vals = [(table[(s, c)].get(n) or {}).get("test_f1") or 0.0 for s, c, _ in keys]
                ax.barh(y + (len(names) / 2 - i - 0.5) * h, vals, height=h, color=colours[i % len(colours)],
                        label=f"{n} (best latent)")
                dvals = [(table[(s, c)].get(n) or {}).get("defined_test_f1") for s, c, _ in keys]
                if any(v is not None for v in dvals):
                    yy = [y[j] + (len(names) / 2 - i - 0.5) * h for j, v in enumerate(dvals) if v is not None]
                    ax.scatter([v for v in dvals if v is not None], yy, marker="D", s=22, color="black", zorder=3,
                               label=f"{n}: defined latent")
            ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
            ax.set_yticks(y)
            multi = len({src for src, _, _ in keys}) > 1
            ax.set_yticklabels([f"{name} [{src}]" if multi else name for src, _, name in keys], fontsize=9)
            ax.set_xlim(0, 1)
            ax.set_xlabel("test F1 (latent and threshold chosen on validation proteins)")
            ax.set_title("Per-concept best F1" + (" — " + " vs ".join(names) if len(names) > 1 else ""))
            ax.legend(fontsize=8, frameon=False, loc="lower right")
            ax.spines[["top", "right"]].set_visible(False)
            fig.tight_layout()
            p = out / "concept_f1.png"
            save_png(fig, p, dpi=130, tight=False)
            written["concept_f1"] = str(p)

    fid = result.get("lm_fidelity")
    if fid:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
        for ax, mode in zip(axes, ("unmasked", "masked"), strict=True):
            b = fid[mode]
            labels = ["original", *names, "mean-ablation", "zero-ablation"]
            vals = [b["ce_orig"], *[b["per_sae"][n]["ce"] for n in names], b["ce_mean"], b["ce_zero"]]
            cols = ["#444444", *[colours[i % len(colours)] for i in range(len(names))], "#BBBBBB", "#DDDDDD"]
            bars = ax.bar(range(len(vals)), vals, color=cols)
            for j, (bar, v) in enumerate(zip(bars, vals, strict=True)):
                txt = f"{v:.2f}"
                if 0 < j <= len(names):
                    lr = b["per_sae"][names[j - 1]]["loss_recovered_zero"]
                    if lr.get("defined"):
                        txt += f"\nLR {lr['clipped']:.1f}%"
                ax.text(bar.get_x() + bar.get_width() / 2, v, txt, ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(vals)))
            ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
            ax.set_ylabel("cross-entropy (nats)")
            ax.set_ylim(0, max(vals) * 1.2)
            title = "unmasked (all residues)" if mode == "unmasked" else \
                f"masked LM ({100 * b['mask_fraction']:.0f}% masked)"
            ax.set_title(title, fontsize=10)
            ax.spines[["top", "right"]].set_visible(False)
        fig.suptitle(f"LM cross-entropy with the SAE spliced in at {result['hook']} "
                     f"(LR = loss recovered vs zero-ablation)", fontsize=10)
        fig.tight_layout()
        p = out / "lm_ce.png"
        save_png(fig, p, dpi=130, tight=False)
        written["lm_ce"] = str(p)
    return written
