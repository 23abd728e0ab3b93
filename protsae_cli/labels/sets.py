"""Concept label sets: which residues (or proteins) carry which concept.

Every annotation loader (`protsae_cli.labels.formats`) produces one of the two containers here, so training
(concept predictor BCE), evaluation (per-residue F1, instance recall, protein-level Fmax) and the ontology
propagation all consume one representation whatever the source file was.

Coordinates are 0-based here (row *i* of a protein's activations is residue *i+1*, as in ARCHITECTURE.md);
text formats are 1-based inclusive and are converted once, in the loaders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from protsae_cli.errors import InputError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from protsae_cli.labels.ontology import Ontology

Instance = tuple[int, int]

_EMPTY = np.zeros(0, dtype=np.int64)


def _as_index_array(values: Iterable[int]) -> np.ndarray:
    """Sorted unique int64 indices: the one canonical form, so equality and merging are trivial."""
    arr = np.fromiter((int(v) for v in values), dtype=np.int64)
    if arr.size == 0:
        return _EMPTY.copy()
    return np.unique(arr)


def _merge_counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


@dataclass
class ResidueLabels:
    """Residue-level concept labels for a set of proteins.

    A protein listed in `positions` (even with no concept) is *annotated*: its unlabelled residues are
    negatives. A protein absent from `positions` has no annotation at all, and `dense` returns all-False for
    it; callers that must tell "negative" from "unknown" check `protein_id in labels.positions`.

    `instances` holds the annotated features one by one (0-based half-open spans) so evaluation can compute
    instance (domain-level) recall. The residues of an instance are `positions ∩ [start, end)`: for features
    made of separate residues (a disulfide bond's two cysteines) the span covers the whole bond while only the
    two ends are positions.

    `masked` lists residues whose annotation is unknown (TMbed's `U`, unresolved in the structure): they are
    neither positives nor negatives and evaluation should drop them. `skipped` counts, by reason, the input
    features a loader left out on purpose (fuzzy positions, unknown ids with `unknown_ids="skip"`...), so a
    report can say what was not used.
    """

    concepts: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    positions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    instances: dict[str, dict[str, list[Instance]]] = field(default_factory=dict)
    lengths: dict[str, int] = field(default_factory=dict)
    masked: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def protein_ids(self) -> list[str]:
        return list(self.positions)

    def __len__(self) -> int:
        return len(self.positions)

    def residue_counts(self) -> dict[str, int]:
        """Positive residues per concept over all proteins (for reports and class weights)."""
        counts = {c: 0 for c in self.concepts}
        for per in self.positions.values():
            for c, idx in per.items():
                counts[c] = counts.get(c, 0) + int(idx.size)
        return counts

    def dense(self, protein_id: str, length: int, concept_order: Sequence[str]) -> np.ndarray:
        """Boolean [length, len(concept_order)] matrix of one protein's labels.

        Refuses a length that contradicts the one the labels were made for, or positions that do not fit:
        silently truncating would pair labels with the wrong residues.
        """
        out = np.zeros((int(length), len(concept_order)), dtype=bool)
        known = self.lengths.get(protein_id)
        if known is not None and known != length:
            raise InputError(
                f"labels for protein {protein_id!r} were made for length {known}, but length {length} was requested"
            )
        per = self.positions.get(protein_id)
        if not per:
            return out
        for j, concept in enumerate(concept_order):
            idx = per.get(concept)
            if idx is None or idx.size == 0:
                continue
            if int(idx[-1]) >= length or int(idx[0]) < 0:
                raise InputError(
                    f"labels for protein {protein_id!r}, concept {concept!r}: residue {int(idx[-1]) + 1} "
                    f"lies past the sequence end ({length})"
                )
            out[idx, j] = True
        return out

    def mask(self, protein_id: str, length: int) -> np.ndarray:
        """Boolean [length] vector, True where the residue's annotation is known (not masked)."""
        keep = np.ones(int(length), dtype=bool)
        idx = self.masked.get(protein_id)
        if idx is not None and idx.size:
            keep[idx[idx < length]] = False
        return keep

    # ------------------------------------------------------------------------------------------- combinators
    def merge(self, other: ResidueLabels) -> ResidueLabels:
        """Union of two label sets (e.g. TMbed topology + bindPredict binding residues for the same proteins).

        A protein with two different lengths is an error: the two sources disagree about the sequence, and
        their coordinates cannot both be right. Note that a protein annotated by only one source becomes a
        negative for the other source's concepts; evaluate each concept on the proteins of the source that
        defines it when the sources cover different proteins.
        """
        lengths = dict(self.lengths)
        for pid, n in other.lengths.items():
            if pid in lengths and lengths[pid] != n:
                raise InputError(
                    f"cannot merge labels: protein {pid!r} has length {lengths[pid]} in one source and {n} in the other"
                )
            lengths[pid] = n
        builder = ResidueLabelBuilder()
        for src in (self, other):
            builder.names.update(src.names)
            builder.add_label_set(src)
        merged = builder.build(lengths=lengths)
        merged.concepts = _ordered_union(self.concepts, other.concepts)
        merged.skipped = _merge_counts(self.skipped, other.skipped)
        return merged

    def propagate(self, ontology: Ontology, relations: Sequence[str] = ("is_a",)) -> ResidueLabels:
        """Add every ancestor concept: a zinc-binding residue is also a metal-binding and a binding-site residue.

        Concepts unknown to the ontology are kept as they are (they simply have no ancestors).
        """
        anc_cache: dict[str, list[str]] = {}

        def ancestors(concept: str) -> list[str]:
            if concept not in anc_cache:
                if concept in ontology:
                    anc_cache[concept] = sorted(ontology.ancestors(concept, relations) | {concept})
                else:
                    anc_cache[concept] = [concept]
            return anc_cache[concept]

        builder = ResidueLabelBuilder()
        builder.names.update(self.names)
        for pid, per in self.positions.items():
            builder.touch(pid)
            for concept, idx in per.items():
                for anc in ancestors(concept):
                    builder.add_residues(pid, anc, idx)
        for pid, inst in self.instances.items():
            for concept, spans in inst.items():
                for anc in ancestors(concept):
                    for span in spans:
                        builder.add_instance_span(pid, anc, span)
        for pid, idx in self.masked.items():
            builder.add_masked(pid, idx)
        out = builder.build(lengths=dict(self.lengths))
        extra = sorted({a for c in self.concepts for a in ancestors(c)} - set(self.concepts))
        out.concepts = list(self.concepts) + extra
        for c in out.concepts:
            if c not in out.names and c in ontology:
                out.names[c] = ontology.name(c)
        out.skipped = dict(self.skipped)
        return out

    def restrict(self, concepts: Iterable[str]) -> ResidueLabels:
        """Keep only some concepts (proteins stay annotated: their other residues remain negatives)."""
        keep = list(dict.fromkeys(concepts))
        keep_set = set(keep)
        return ResidueLabels(
            concepts=keep,
            names={c: n for c, n in self.names.items() if c in keep_set},
            positions={p: {c: i for c, i in per.items() if c in keep_set} for p, per in self.positions.items()},
            instances={p: {c: s for c, s in per.items() if c in keep_set} for p, per in self.instances.items()},
            lengths=dict(self.lengths),
            masked=dict(self.masked),
            skipped=dict(self.skipped),
        )


def _ordered_union(a: Sequence[str], b: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*a, *b]))


class ResidueLabelBuilder:
    """Accumulates residue labels as Python sets, then freezes them into a `ResidueLabels`.

    Loaders add features one at a time; sets make duplicates (the same residue annotated twice) harmless and
    the final arrays sorted and unique.
    """

    def __init__(self) -> None:
        self._pos: dict[str, dict[str, set[int]]] = {}
        self._inst: dict[str, dict[str, dict[Instance, None]]] = {}
        self._masked: dict[str, set[int]] = {}
        self.names: dict[str, str] = {}
        self.skipped: dict[str, int] = {}

    def touch(self, protein_id: str) -> None:
        """Mark a protein as annotated even if it carries no concept (its residues are all negatives)."""
        self._pos.setdefault(protein_id, {})

    def add_residues(self, protein_id: str, concept: str, residues: Iterable[int]) -> None:
        per = self._pos.setdefault(protein_id, {})
        per.setdefault(concept, set()).update(int(r) for r in residues)

    def add_instance_span(self, protein_id: str, concept: str, span: Instance) -> None:
        self._inst.setdefault(protein_id, {}).setdefault(concept, {})[(int(span[0]), int(span[1]))] = None

    def add_span(self, protein_id: str, concept: str, start: int, end: int) -> None:
        """One contiguous feature, 0-based half-open: all its residues are positives and it is one instance."""
        self.add_residues(protein_id, concept, range(start, end))
        self.add_instance_span(protein_id, concept, (start, end))

    def add_masked(self, protein_id: str, residues: Iterable[int]) -> None:
        self._masked.setdefault(protein_id, set()).update(int(r) for r in residues)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + n

    def add_label_set(self, labels: ResidueLabels) -> None:
        for pid, per in labels.positions.items():
            self.touch(pid)
            for concept, idx in per.items():
                self.add_residues(pid, concept, idx.tolist())
        for pid, inst in labels.instances.items():
            for concept, spans in inst.items():
                for span in spans:
                    self.add_instance_span(pid, concept, span)
        for pid, idx in labels.masked.items():
            self.add_masked(pid, idx.tolist())

    def build(self, lengths: Mapping[str, int] | None = None) -> ResidueLabels:
        positions = {
            pid: {c: _as_index_array(sorted(r)) for c, r in sorted(per.items()) if r} for pid, per in self._pos.items()
        }
        instances = {
            pid: {c: sorted(spans) for c, spans in sorted(per.items())} for pid, per in self._inst.items()
        }
        concepts = sorted({c for per in positions.values() for c in per} | {c for per in self._inst.values() for c in per})
        lengths = dict(lengths or {})
        return ResidueLabels(
            concepts=concepts,
            names={c: self.names[c] for c in concepts if c in self.names},
            positions=positions,
            instances=instances,
            lengths={p: lengths[p] for p in positions if p in lengths},
            masked={p: _as_index_array(sorted(r)) for p, r in self._masked.items() if r},
            skipped=dict(self.skipped),
        )


@dataclass
class ProteinLabels:
    """Protein-level labels (GO terms, localisation, EC): which concepts each protein carries.

    A protein present in `labels` with an empty set is annotated with nothing: a negative for every concept.
    """

    concepts: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    labels: dict[str, set[str]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def protein_ids(self) -> list[str]:
        return list(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        """Proteins per concept (for choosing the concepts to bind latents to, as DeepGO-SE's terms.pkl does)."""
        out = {c: 0 for c in self.concepts}
        for terms in self.labels.values():
            for t in terms:
                out[t] = out.get(t, 0) + 1
        return out

    def matrix(self, protein_ids: Sequence[str], concept_order: Sequence[str]) -> np.ndarray:
        """Boolean [len(protein_ids), len(concept_order)] label matrix; unknown proteins are all-False rows."""
        col = {c: j for j, c in enumerate(concept_order)}
        out = np.zeros((len(protein_ids), len(concept_order)), dtype=bool)
        for i, pid in enumerate(protein_ids):
            for t in self.labels.get(pid, ()):
                j = col.get(t)
                if j is not None:
                    out[i, j] = True
        return out

    def propagate(self, ontology: Ontology, relations: Sequence[str] = ("is_a",)) -> ProteinLabels:
        """Close each protein's term set under the ontology (DeepGO-SE's `prop_annotations`)."""
        cache: dict[str, set[str]] = {}
        new_labels: dict[str, set[str]] = {}
        for pid, terms in self.labels.items():
            out: set[str] = set()
            for t in terms:
                if t not in cache:
                    cache[t] = (ontology.ancestors(t, relations) | {t}) if t in ontology else {t}
                out |= cache[t]
            new_labels[pid] = out
        extra = sorted({t for s in new_labels.values() for t in s} - set(self.concepts))
        concepts = list(self.concepts) + extra
        names = dict(self.names)
        for c in concepts:
            if c not in names and c in ontology:
                names[c] = ontology.name(c)
        return ProteinLabels(concepts=concepts, names=names, labels=new_labels, skipped=dict(self.skipped))

    def merge(self, other: ProteinLabels) -> ProteinLabels:
        labels = {p: set(t) for p, t in self.labels.items()}
        for p, t in other.labels.items():
            labels.setdefault(p, set()).update(t)
        return ProteinLabels(
            concepts=_ordered_union(self.concepts, other.concepts),
            names={**self.names, **other.names},
            labels=labels,
            skipped=_merge_counts(self.skipped, other.skipped),
        )
