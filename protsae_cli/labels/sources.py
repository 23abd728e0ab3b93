"""Label sources: the `-a/--annotations` files of a command, read against its proteins, in one way for every
command (train, eval, calibrate, label, report).

Why one loader: train and eval each had their own, and they disagreed: a file that matched none of the
proteins was an error in one and a warning in the other; `--ontology` was repeatable in train only; eval
propagated residue labels through the shipped concept ontology, train only when no other ontology was given.
The rules, now for all (README "Concept labels" and docs/TRAINING.md):

- `-a a.tsv,b.tsv` is one source of one format (a protein in any of its files is labelled for all their
  concepts); `--annotation-format` is one value for all sources, or one per source, or inferred.
- GO files (GAF, GO TSV) are read with the GO ontology among `--ontology` (alt ids resolved, obsolete terms
  refused; without one they are not propagated, with a warning). Residue files are read with the first non-GO
  ontology, by default the shipped residue-concept ontology (names for PSC ids, is_a for propagation); any
  further ontologies propagate labels too.
- Annotations of proteins that are not among the command's proteins are skipped (annotation files usually cover
  more), but a source that annotates none of them is an error: it almost always means the ids do not line up.
- Ontology roots reached only by propagation label every annotated residue, so they are not evaluated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from collections.abc import Mapping, Sequence

from protsae_cli.errors import InputError

if TYPE_CHECKING:
    from protsae_cli.labels.ontology import Ontology

log = logging.getLogger("protsae.labels")

GO_ROOTS = ("GO:0003674", "GO:0008150", "GO:0005575")


@dataclass
class AnnotationSpec:
    """One annotation source: one or more files of one format, merged into one label set."""

    paths: list[str]
    """The files (an `-a a,b` value split at commas)."""
    fmt: str = "auto"
    """A format of `labels.formats.FORMATS`, or "auto" to infer it from each file."""

    @property
    def name(self) -> str:
        return "+".join(Path(p).name for p in self.paths)


def annotation_specs(annotations: Sequence[str], formats: Sequence[str] = ()) -> list[AnnotationSpec]:
    """Pair `-a` values with `--annotation-format` values: none (infer), one for all, or one per `-a`."""
    given = list(formats or [])
    if len(given) not in (0, 1, len(annotations)):
        raise InputError(f"{len(annotations)} --annotations values but {len(given)} --annotation-format values; "
                         "give one format for all, or one per --annotations in the same order")
    fmts = given * len(annotations) if len(given) == 1 else given or ["auto"] * len(annotations)
    specs = [AnnotationSpec([p for p in str(a).split(",") if p], f) for a, f in zip(annotations, fmts, strict=True)]
    for a, s in zip(annotations, specs, strict=True):
        if not s.paths:
            raise InputError(f"--annotations {a!r} names no file")
    return specs


@dataclass
class LabelSource:
    """An annotation source resolved against a command's proteins."""

    name: str
    """File names joined with '+' (how reports and concept tables name the source)."""
    paths: list[str]
    """The files as given."""
    fmt: str
    """The source's format."""
    kind: str
    """"residue" (per-residue labels) or "protein" (GO terms per protein)."""
    labels: Any
    """`ResidueLabels` or `ProteinLabels` (labels.sets), propagated as the rules above say."""
    concepts: list[str]
    """Concepts worth evaluating: with positives among the proteins, roots reached only by propagation left out."""
    names: dict[str, str]
    """Concept id -> name."""
    ontology: Any = None
    """The ontology the labels were read and propagated with (probing needs ancestors)."""


def is_go(onto: Ontology) -> bool:
    """A GO ontology (go.obo, a GO slim, or a test excerpt): it holds a GO root or only GO: ids."""
    return any(root in onto for root in GO_ROOTS) or (len(onto) > 0 and all(t.startswith("GO:") for t in onto))


def load_ontologies(paths: Sequence[str | Ontology] | str | None) -> list[Ontology]:
    """`--ontology` values as ontologies; none given: the shipped residue-concept ontology."""
    from protsae_cli.labels.formats import concept_ontology
    from protsae_cli.labels.ontology import Ontology

    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        return [concept_ontology()]
    return [p if isinstance(p, Ontology) else Ontology.from_obo(p) for p in paths]


def load_label_sources(specs: Sequence[AnnotationSpec], sequences: Mapping[str, str] | None,
                       ontologies: Sequence[str | Ontology] | str | None = None, propagate: bool = True,
                       against: str = "the FASTA") -> list[LabelSource]:
    """Read each source against `sequences` (id -> sequence; None: no matching, as `report` overlays do) with
    the module's rules; `propagate=False` keeps direct labels only (eval/calibrate `--no-propagate`)."""
    from protsae_cli.labels.formats import PROTEIN_LEVEL_FORMATS, concept_ontology, infer_format, load_annotations
    from protsae_cli.labels.sets import ProteinLabels, ResidueLabels

    ontos = load_ontologies(ontologies)
    go = next((o for o in ontos if is_go(o)), None)
    residue_onto = next((o for o in ontos if not is_go(o)), None) or concept_ontology()
    extra = [o for o in ontos if o is not go and o is not residue_onto]
    out: list[LabelSource] = []
    for spec in specs:
        fmts = {(infer_format(p) if spec.fmt in (None, "", "auto") else spec.fmt.lower()) for p in spec.paths}
        if len(fmts) != 1:
            raise InputError(f"annotation source {spec.name}: files of different formats ({', '.join(sorted(fmts))}) "
                             "cannot be merged into one source; pass them as separate --annotations")
        fmt = fmts.pop()
        protein_level = fmt in PROTEIN_LEVEL_FORMATS
        onto = go if protein_level else residue_onto
        if protein_level and go is None and propagate:  # with propagate=False nothing was asked of an ontology
            log.warning("%s: GO annotations without a GO ontology (--ontology go.obo) are not propagated to "
                        "ancestor terms and no roots are excluded", spec.name)
        merged: ResidueLabels | ProteinLabels | None = None
        for p in spec.paths:
            # Residue files are read direct (the ontology names their concepts), propagated below, so that the
            # concepts they state themselves are known; GO loaders propagate as they resolve alt ids.
            lab = load_annotations(p, fmt, sequences=sequences, ontology=onto, unknown_ids="skip",
                                   propagate=protein_level and propagate and onto is not None)
            if merged is not None and type(lab) is not type(merged):
                raise InputError(f"{spec.name}: files joined with ',' form one source and must all be residue-level "
                                 "or all protein-level")
            if merged is None:
                merged = lab
            elif isinstance(merged, ProteinLabels):
                merged = merged.merge(cast(ProteinLabels, lab))  # same type as merged: checked just above
            else:
                merged = merged.merge(cast(ResidueLabels, lab))  # same type as merged: checked just above
        assert merged is not None  # annotation_specs refuses a source without files
        direct = set(merged.concepts)
        if propagate:
            for o in ([] if protein_level else [residue_onto]) + extra:  # residue sources: onto is residue_onto
                merged = merged.propagate(o)
        if protein_level:
            keep = [c for c in merged.concepts if not _is_root(onto, c)]
        else:  # roots reached only by propagation label every annotated residue: nothing to learn from them
            keep = [c for c in merged.concepts if c in direct or not _is_root(onto, c)]
        # GO formats (protein_level) load as ProteinLabels, all others as ResidueLabels (load_annotations).
        counts = merged.counts() if isinstance(merged, ProteinLabels) else merged.residue_counts()
        concepts = [c for c in keep if counts.get(c, 0) > 0]
        n_prot = len(merged.labels) if isinstance(merged, ProteinLabels) else len(merged.positions)
        if sequences is not None and n_prot == 0:
            raise InputError(f"{spec.name}: none of its proteins is in {against} ({len(sequences)} proteins); ids "
                             "are matched exactly or by a '|' field (sp|P12345|X matches P12345)")
        skipped = merged.skipped.get("annotations of proteins not in the sequence set", 0)
        log.info("%s: %d proteins annotated, %d concepts%s", spec.name, n_prot, len(merged.concepts),
                 f", {skipped} annotations of other proteins skipped" if skipped else "")
        out.append(LabelSource(spec.name, list(spec.paths), fmt, "protein" if protein_level else "residue", merged,
                               concepts, dict(merged.names), onto))
    return out


def _is_root(onto: Ontology | None, concept: str) -> bool:
    return onto is not None and concept in onto and not onto.parents(concept)
