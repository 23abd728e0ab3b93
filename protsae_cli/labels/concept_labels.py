"""Concept labels for ProtSAE training: which concepts the defined latents stand for, and each training row's
label for each of them, looked up per batch from (protein index, 0-based residue position).

Labels are never materialised per row: a row's labels are computed when its batch is drawn, from sorted key
arrays (protein * stride + position) of positive and masked residues. Memory therefore scales with the number
of annotated residues, not with the number of sampled rows, which matters when training streams a large
activation cache.

Missing is not negative. Each concept is *covered* by the annotation sources that annotate it anywhere (TMbed
covers transmembrane helix, a binding-site list covers metal binding). For a row of protein p and a concept c:

- positive if some source covering c marks the residue (or, for protein-level sources, the protein) with c;
- negative if some source covering c annotates p and none marks it;
- NaN (not observed) if no source covering c annotates p, or the residue is masked there (TMbed `U`).

Granularity: with residue granularity, protein-level sources (GO) are broadcast to every residue of the
protein (METHOD.md §1.4 design (a)); with protein granularity, residue sources become protein labels (a
protein is positive when any residue is) and the predictor is trained on pooled probabilities (design (b)).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from protsae_cli.errors import InputError
from protsae_cli.labels.sets import ProteinLabels, ResidueLabels
from protsae_cli.labels.ontology import Ontology
from protsae_cli.sae.config import ConceptEntry

log = logging.getLogger("protsae.concepts")

GRANULARITIES = ("residue", "protein")


def _member(keys: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Vectorised `keys in sorted_set`."""
    if sorted_set.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    i = np.searchsorted(sorted_set, keys)
    i = np.minimum(i, sorted_set.size - 1)
    return sorted_set[i] == keys


@dataclass
class _Source:
    """One annotation file's view, re-indexed by protein ordinal."""

    name: str
    level: str                                   # "residue" | "protein"
    covers: set[str]
    annotated: np.ndarray                        # bool [P]
    residue_keys: dict[str, np.ndarray] = field(default_factory=dict)   # concept -> sorted keys
    masked_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    protein_pos: dict[str, np.ndarray] = field(default_factory=dict)    # concept -> bool [P]

    def residue_view(self, c: str, prot: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        obs = self.annotated[prot]
        if self.level == "protein":
            return obs, obs & self.protein_pos.get(c, np.zeros_like(self.annotated))[prot]
        obs = obs & ~_member(keys, self.masked_keys)
        return obs, obs & _member(keys, self.residue_keys.get(c, np.zeros(0, dtype=np.int64)))

    def protein_view(self, c: str, prot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        obs = self.annotated[prot]
        return obs, obs & self.protein_pos.get(c, np.zeros_like(self.annotated))[prot]


class ConceptLabels:
    """Labels of m concepts (in latent order) for rows of an activation set sharing `protein_ids`' indices."""

    def __init__(self, concepts: Sequence[str], names: Sequence[str], ontology_ids: Sequence[str],
                 sources: list[_Source], n_proteins: int, stride: int, granularity: str = "residue") -> None:
        if granularity not in GRANULARITIES:
            raise InputError(f"label granularity {granularity!r}; expected residue or protein")
        self.concepts, self.names, self.ontology_ids = list(concepts), list(names), list(ontology_ids)
        self.sources, self.n_proteins, self.stride, self.granularity = sources, n_proteins, stride, granularity
        self._covering = {c: [s for s in sources if c in s.covers] for c in self.concepts}

    def __len__(self) -> int:
        return len(self.concepts)

    # -- lookups -------------------------------------------------------------------------------------
    def rows(self, protein: torch.Tensor | np.ndarray, position: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Residue labels [B, m] (1, 0, NaN) for rows given by protein index and residue position."""
        prot = np.asarray(protein, dtype=np.int64)
        keys = prot * self.stride + np.asarray(position, dtype=np.int64)
        out = np.full((len(prot), len(self.concepts)), np.nan, dtype=np.float32)
        for j, c in enumerate(self.concepts):
            obs = np.zeros(len(prot), dtype=bool)
            pos = np.zeros(len(prot), dtype=bool)
            for s in self._covering[c]:
                o, p = s.residue_view(c, prot, keys)
                obs |= o
                pos |= p
            out[obs, j] = 0.0
            out[pos, j] = 1.0
        return torch.from_numpy(out)

    def proteins(self, protein: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Protein labels [len(protein), m] (1, 0, NaN) for protein indices."""
        prot = np.asarray(protein, dtype=np.int64)
        out = np.full((len(prot), len(self.concepts)), np.nan, dtype=np.float32)
        for j, c in enumerate(self.concepts):
            obs = np.zeros(len(prot), dtype=bool)
            pos = np.zeros(len(prot), dtype=bool)
            for s in self._covering[c]:
                o, p = s.protein_view(c, prot)
                obs |= o
                pos |= p
            out[obs, j] = 0.0
            out[pos, j] = 1.0
        return torch.from_numpy(out)

    def batch(self, protein: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What `ProtSAE.forward_train` takes: (labels, protein_index).

        Residue granularity: ([B, m], None). Protein granularity: labels [p, m] for the p distinct proteins of
        the batch and protein_index [B] into them (batch-local, so the tensor is not [all proteins, m])."""
        if self.granularity == "residue":
            return self.rows(protein, position), None
        uniq, inv = torch.unique(protein.cpu(), return_inverse=True)
        return self.proteins(uniq), inv

    def prior(self, protein: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Positive fraction among observed labels per concept (ProtSAE.init_concept_bias)."""
        y, _ = self.batch(protein, position)
        obs = ~torch.isnan(y)
        return (torch.nan_to_num(y) * obs).sum(0) / obs.sum(0).clamp_min(1)

    # -- what the checkpoint records -------------------------------------------------------------------
    def concept_entries(self) -> list[ConceptEntry]:
        """Latent c <-> concept c, threshold 0.0 (any nonzero activation) until `train_protsae` calibrates it on
        validation proteins: with defined_bias="pred" a defined latent is positive exactly when pi_c > 0.5,
        with "none" it is a graded score that needs the calibrated threshold."""
        out = []
        for j, c in enumerate(self.concepts):
            src = ",".join(Path(f).name for s in self._covering[c] for f in s.name.split(","))
            out.append(ConceptEntry(latent=j, concept_id=c, name=self.names[j], ontology_id=self.ontology_ids[j],
                                    threshold=0.0, source=src))
        return out

    def describe(self) -> dict:
        return {"concepts": self.concepts, "names": self.names, "granularity": self.granularity,
                "sources": [{"file": s.name, "level": s.level, "annotated_proteins": int(s.annotated.sum())}
                            for s in self.sources]}


# ----------------------------------------------------------------------------------------------- building
def _index_by_id(protein_ids: Sequence[str]) -> dict[str, list[int]]:
    idx: dict[str, list[int]] = {}
    for i, pid in enumerate(protein_ids):
        idx.setdefault(pid, []).append(i)
    return idx


def _source(name: str, labels: ResidueLabels | ProteinLabels, by_id: Mapping[str, list[int]], n: int,
            stride: int) -> _Source:
    annotated = np.zeros(n, dtype=bool)
    if isinstance(labels, ProteinLabels):
        src = _Source(name, "protein", set(labels.concepts), annotated)
        pos: dict[str, np.ndarray] = {}
        for pid, terms in labels.labels.items():
            for i in by_id.get(pid, ()):
                annotated[i] = True
                for t in terms:
                    pos.setdefault(t, np.zeros(n, dtype=bool))[i] = True
        src.protein_pos = pos
        return src
    src = _Source(name, "residue", set(labels.concepts), annotated)
    keys: dict[str, list[np.ndarray]] = {}
    ppos: dict[str, np.ndarray] = {}
    masked: list[np.ndarray] = []
    for pid, per in labels.positions.items():
        for i in by_id.get(pid, ()):
            annotated[i] = True
            for c, r in per.items():
                if r.size:
                    keys.setdefault(c, []).append(i * stride + r.astype(np.int64))
                    ppos.setdefault(c, np.zeros(n, dtype=bool))[i] = True
            m = labels.masked.get(pid)
            if m is not None and m.size:
                masked.append(i * stride + m.astype(np.int64))
    src.residue_keys = {c: np.unique(np.concatenate(v)) for c, v in keys.items()}
    src.masked_keys = np.unique(np.concatenate(masked)) if masked else np.zeros(0, dtype=np.int64)
    src.protein_pos = ppos
    return src


def concept_counts(label_sets: Sequence[tuple[str, ResidueLabels | ProteinLabels]], protein_ids: Sequence[str],
                   proteins: Sequence[int], granularity: str) -> dict[str, int]:
    """Positive residues (residue granularity) or proteins (protein granularity) per concept among `proteins`.

    Residue counts are over whole sequences, not sampled rows: selection should not depend on the sampling."""
    ids = {protein_ids[i] for i in proteins}
    counts: dict[str, int] = {}
    for _, labels in label_sets:
        if isinstance(labels, ProteinLabels):
            for pid, terms in labels.labels.items():
                if pid in ids:
                    for t in terms:
                        counts[t] = counts.get(t, 0) + 1
            continue
        for pid, per in labels.positions.items():
            if pid in ids:
                for c, r in per.items():
                    counts[c] = counts.get(c, 0) + (int(r.size) if granularity == "residue" else int(r.size > 0))
    return counts


def find_in(ontologies: Sequence[Ontology], concept: str) -> tuple[Ontology, str] | None:
    """(ontology, primary id) of the first ontology that knows `concept` by id or alt id."""
    for o in ontologies:
        r = o.resolve(concept)
        if r is not None:
            return o, r
    return None


def resolve_concept(ontologies: Sequence[Ontology], concept: str, known: set[str]) -> str:
    """A user-given concept (id, alt id or name) as the id the labels use."""
    if concept in known:
        return concept
    for o in ontologies:
        r = o.resolve(concept) or o.find_by_name(concept)
        if r is not None and r in known:
            return r
    raise InputError(f"concept {concept!r} has no annotations in the given files"
                     + (f" (annotated concepts include {', '.join(sorted(known)[:8])})" if known else ""))


def select_concepts(label_sets: Sequence[tuple[str, ResidueLabels | ProteinLabels]], protein_ids: Sequence[str],
                    train_proteins: Sequence[int], ontologies: Sequence[Ontology] = (),
                    concepts: Sequence[str] | None = None, min_count: int = 10, granularity: str = "residue",
                    keep_roots: bool = False) -> list[str]:
    """The concepts to bind latents to, in latent order.

    Explicit `concepts` are kept in the given order (each must be annotated somewhere and resolve through an
    ontology's ids, alt ids or names). Otherwise: every annotated concept with at least `min_count` positives
    among the training proteins, sorted by id, without ontology roots (the "residue-level concept" root is
    true of every annotated residue: a latent for it would learn "annotated by someone", not biology).
    """
    known = {c for _, lab in label_sets for c in lab.concepts}
    counts = concept_counts(label_sets, protein_ids, train_proteins, granularity)
    if concepts:
        out = [resolve_concept(ontologies, c, known) for c in concepts]
        dup = sorted({c for c in out if out.count(c) > 1})
        if dup:
            raise InputError(f"--concepts names the same concept twice: {', '.join(dup)}")
        for c in out:
            if counts.get(c, 0) == 0:
                raise InputError(f"concept {c} has no positive {granularity}s among the "
                                 f"{len(train_proteins)} training proteins; it cannot be learned")
        return out
    roots = set()
    if not keep_roots:
        for c in known:
            hit = find_in(ontologies, c)
            if hit is not None and not hit[0].parents(hit[1]):
                roots.add(c)
    chosen = sorted(c for c in known if counts.get(c, 0) >= min_count and c not in roots)
    if not chosen:
        top = sorted(((c, n) for c, n in counts.items() if c not in roots), key=lambda kv: -kv[1])[:5]
        raise InputError(
            f"no concept has at least {min_count} positive {granularity}s among the {len(train_proteins)} training "
            f"proteins (most frequent: {', '.join(f'{c} ({n})' for c, n in top) or 'none'}); lower "
            "--min-concept-residues or name the concepts with --concepts")
    return chosen


def concept_normal_forms(ontologies: Sequence[Ontology], concepts: Sequence[str]):
    """EL normal forms of the concepts' neighbourhoods in every ontology, merged into one class table.

    Each ontology contributes the axioms around the concepts it knows (GO terms from go.obo, residue concepts
    from the shipped PSC ontology); classes are matched by id across ontologies, so concepts come first in
    latent order and each zero class appears once.
    """
    from protsae_cli.labels.ontology import NormalForms, normal_forms

    class_ids = list(concepts)
    index = {c: i for i, c in enumerate(class_ids)}
    rel_ids: list[str] = []
    rindex: dict[str, int] = {}
    rows: dict[str, list[list[int]]] = {"nf1": [], "nf2": [], "nf3": [], "nf4": []}
    for o in ontologies:
        mine = [c for c in concepts if o.resolve(c) is not None]
        if not mine:
            continue
        nf = normal_forms(o, list(concepts))
        cmap = []
        for j, cid in enumerate(nf.class_ids):
            key = concepts[j] if j < len(concepts) else cid
            if key not in index:
                index[key] = len(class_ids)
                class_ids.append(key)
            cmap.append(index[key])
        rmap = []
        for r in nf.relation_ids:
            if r not in rindex:
                rindex[r] = len(rel_ids)
                rel_ids.append(r)
            rmap.append(rindex[r])
        for a, b in nf.nf1.tolist():
            rows["nf1"].append([cmap[a], cmap[b]])
        for a, b, e in nf.nf2.tolist():
            rows["nf2"].append([cmap[a], cmap[b], cmap[e]])
        for r, a, b in nf.nf3.tolist():
            rows["nf3"].append([rmap[r], cmap[a], cmap[b]])
        for a, r, b in nf.nf4.tolist():
            rows["nf4"].append([cmap[a], rmap[r], cmap[b]])

    def tensor(name: str, width: int) -> torch.Tensor:
        uniq = list(dict.fromkeys(tuple(r) for r in rows[name]))
        return torch.tensor(uniq, dtype=torch.long) if uniq else torch.zeros((0, width), dtype=torch.long)

    return NormalForms(class_ids=class_ids, relation_ids=rel_ids, nf1=tensor("nf1", 2), nf2=tensor("nf2", 3),
                       nf3=tensor("nf3", 3), nf4=tensor("nf4", 3), n_concepts=len(concepts))


def build_concept_labels(label_sets: Sequence[tuple[str, ResidueLabels | ProteinLabels]],
                         protein_ids: Sequence[str], sequences: Sequence[str], concepts: Sequence[str],
                         granularity: str = "residue", ontologies: Sequence[Ontology] = ()) -> ConceptLabels:
    """Index label sets (keyed by protein id) by protein ordinal, for the given concepts in latent order."""
    if not concepts:
        raise InputError("ProtSAE needs at least one concept")
    n = len(protein_ids)
    stride = max((len(s) for s in sequences), default=0) + 1
    by_id = _index_by_id(protein_ids)
    sources = [_source(name, lab, by_id, n, stride) for name, lab in label_sets]
    names, onto = [], []
    for c in concepts:
        hit = find_in(ontologies, c)
        name = next((lab.names[c] for _, lab in label_sets if c in lab.names), None)
        if name is None:
            name = hit[0].name(hit[1]) if hit is not None else c
        names.append(name)
        onto.append(hit[1] if hit is not None else "")
    return ConceptLabels(concepts, names, onto, sources, n, stride, granularity)


def check_unique_sequences(protein_ids: Sequence[str], sequences: Sequence[str]) -> dict[str, str]:
    """id -> sequence for the annotation loaders; an id used for two different sequences is refused, because
    its residue labels could only be right for one of them."""
    out: dict[str, str] = {}
    for pid, seq in zip(protein_ids, sequences, strict=True):
        if pid in out and out[pid] != seq:
            raise InputError(f"protein id {pid!r} appears more than once in the FASTA with different sequences; "
                             "annotations cannot be attached to it unambiguously (rename one)")
        out[pid] = seq
    return out
