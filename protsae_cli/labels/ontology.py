"""OBO ontologies and the EL normal forms of ProtSAE's axiom loss (METHOD.md §1.4, §1.7).

Our own small OBO reader rather than a dependency: we need exactly the parts that feed label propagation and
the ELEmbeddings loss (is_a, relationship, intersection_of, alt_id, obsolete), with errors that name the file
and line, and it must read both GO (OBO 1.2/1.4) and the project's `protsae_cli/models/residue_concepts.obo`.

Semantics follow DeepGO-SE's loader where METHOD.md pins them: ancestors include the term itself, alt ids
resolve to their primary term, obsolete terms are dropped. Unlike DeepGO's `with_rels=True`, which treats
every `relationship:` as a parent edge, the relations followed are chosen per call (`("is_a",)` by default,
`("is_a", "part_of")` for GO-style propagation), because following `has_part` or `regulates` upwards would
assign labels that are not implied.
"""

from __future__ import annotations

import gzip
import io
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Callable, Iterable, Iterator, Sequence

from protsae_cli.errors import InputError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

IS_A = "is_a"

_STANZA_RE = re.compile(r"^\[([A-Za-z]+)\]\s*$")
_TAG_RE = re.compile(r"^([A-Za-z0-9_-]+):(.*)$")


# ------------------------------------------------------------------------------------------------ data types
@dataclass
class Term:
    """One `[Term]` stanza. Edge targets are stored as written until `Ontology` resolves them."""

    id: str
    line: int = 0
    name: str = ""
    namespace: str = ""
    definition: str = ""
    is_a: list[str] = field(default_factory=list)
    relationships: list[tuple[str, str]] = field(default_factory=list)  # (relation, target)
    # (relation or None for a genus class, target); empty unless the term is a logical definition
    intersection_of: list[tuple[str | None, str]] = field(default_factory=list)
    alt_ids: list[str] = field(default_factory=list)
    synonyms: list[str] = field(default_factory=list)
    xrefs: list[str] = field(default_factory=list)
    # xref id -> its quoted description (`xref: SO:0000418 "signal_peptide"`): the SO term name of a feature type
    xref_names: dict[str, str] = field(default_factory=dict)
    subsets: list[str] = field(default_factory=list)
    replaced_by: list[str] = field(default_factory=list)
    consider: list[str] = field(default_factory=list)
    is_obsolete: bool = False


@dataclass
class Typedef:
    """One `[Typedef]` stanza (a relation such as part_of)."""

    id: str
    line: int = 0
    name: str = ""
    xrefs: list[str] = field(default_factory=list)
    is_a: list[str] = field(default_factory=list)
    is_transitive: bool = False
    inverse_of: str = ""
    transitive_over: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ OBO lexing
def _open_text(path: str | Path) -> io.TextIOBase:
    p = Path(path)
    if p.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8", errors="strict")
    return open(p, encoding="utf-8")


def _strip_value(raw: str) -> str:
    """Drop a trailing `! comment` and `{modifiers}` that lie outside quoted text, then unescape.

    OBO allows `!` and `{` inside quoted strings (definitions, synonyms), so a plain split would cut those.
    """
    out: list[str] = []
    in_quote = False
    i = 0
    n = len(raw)
    while i < n:
        ch = raw[i]
        if ch == "\\" and i + 1 < n:
            out.append(raw[i : i + 2])
            i += 2
            continue
        if ch == '"':
            in_quote = not in_quote
        elif not in_quote and ch == "!":
            break
        out.append(ch)
        i += 1
    value = "".join(out).strip()
    if value.endswith("}") and not in_quote:
        # trailing modifier block, e.g. `is_a: GO:1 {source="x"}`: find its unquoted opening brace
        depth_quote = False
        for j, ch in enumerate(value):
            if ch == '"' and (j == 0 or value[j - 1] != "\\"):
                depth_quote = not depth_quote
            elif ch == "{" and not depth_quote:
                value = value[:j].rstrip()
                break
    return value


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "W": " "}.get(m.group(1), m.group(1)), text)


def _quoted(value: str) -> str:
    """The text of the first quoted string in `value` (def: and synonym: lines), unescaped."""
    m = re.match(r'^"((?:[^"\\]|\\.)*)"', value)
    return _unescape(m.group(1)) if m else _unescape(value)


# ------------------------------------------------------------------------------------------------- Ontology
class Ontology:
    """A parsed OBO ontology: live terms, relations, alt-id map, and cached ancestor closures."""

    def __init__(
        self,
        terms: dict[str, Term],
        typedefs: dict[str, Typedef] | None = None,
        header: dict[str, list[str]] | None = None,
        obsolete: dict[str, Term] | None = None,
        source: str = "<ontology>",
    ) -> None:
        self.source = source
        self.header = header or {}
        self.typedefs = typedefs or {}
        self.obsolete = obsolete or {}
        self.terms: dict[str, Term] = {}
        self.alt_map: dict[str, str] = {}
        self.dangling: list[tuple[str, str, str]] = []  # (term, relation, missing target)
        for tid, term in terms.items():
            self.terms[tid] = term
        for tid, term in self.terms.items():
            for alt in term.alt_ids:
                if alt not in self.terms:
                    self.alt_map[alt] = tid
        # relation aliases: a relation may be named by its typedef id or by its xref (part_of == BFO:0000050)
        self._rel_alias: dict[str, str] = {}
        for rid, td in self.typedefs.items():
            self._rel_alias[rid] = rid
            for x in td.xrefs:
                self._rel_alias.setdefault(x, rid)
        self._resolve_edges()
        self._anc_cache: dict[tuple[tuple[str, ...], str], frozenset[str]] = {}
        self._children: dict[tuple[str, ...], dict[str, list[str]]] = {}
        self._names: tuple[dict[str, list[str]], dict[str, list[str]]] | None = None

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_obo(cls, path: str | Path) -> Ontology:
        """Parse an OBO 1.2/1.4 file (plain or .gz)."""
        try:
            with _open_text(path) as fh:
                return cls.from_lines(fh, source=str(path))
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not a UTF-8 text OBO file ({exc})") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read ontology: {exc}") from None

    @classmethod
    def from_string(cls, text: str, source: str = "<string>") -> Ontology:
        return cls.from_lines(io.StringIO(text), source=source)

    @classmethod
    def from_lines(cls, lines: Iterable[str], source: str = "<ontology>") -> Ontology:
        header: dict[str, list[str]] = {}
        stanzas: list[tuple[str, int, list[tuple[str, str, int]]]] = []
        current: list[tuple[str, str, int]] | None = None
        for lineno, raw in enumerate(lines, start=1):
            line = raw.rstrip("\r\n")
            stripped = line.strip()
            if not stripped or stripped.startswith("!"):
                continue
            if stripped.startswith("["):
                m = _STANZA_RE.match(stripped)
                if not m:
                    raise InputError(f"{source}, line {lineno}: malformed stanza header {stripped!r}")
                current = []
                stanzas.append((m.group(1), lineno, current))
                continue
            m = _TAG_RE.match(stripped)
            if not m:
                raise InputError(f"{source}, line {lineno}: expected 'tag: value', got {stripped!r}")
            tag, value = m.group(1), _strip_value(m.group(2))
            if current is None:
                header.setdefault(tag, []).append(value)
            else:
                current.append((tag, value, lineno))
        default_ns = (header.get("default-namespace") or [""])[0]

        terms: dict[str, Term] = {}
        obsolete: dict[str, Term] = {}
        typedefs: dict[str, Typedef] = {}
        for kind, start, tags in stanzas:
            if kind == "Term":
                term = _build_term(tags, start, source, default_ns)
                if term.id in terms or term.id in obsolete:
                    first = (terms.get(term.id) or obsolete[term.id]).line
                    raise InputError(
                        f"{source}, line {start}: duplicate term {term.id} (first defined at line {first})"
                    )
                (obsolete if term.is_obsolete else terms)[term.id] = term
            elif kind == "Typedef":
                td = _build_typedef(tags, start, source)
                typedefs[td.id] = td
            # [Instance] and unknown stanza types carry nothing the label or axiom machinery uses
        return cls(terms, typedefs, header, obsolete, source)

    def _resolve_edges(self) -> None:
        """Point every edge at a live primary id; drop (and record) edges to unknown or obsolete terms."""
        for tid, term in self.terms.items():
            isa: list[str] = []
            for target in term.is_a:
                r = self.resolve(target)
                if r is None:
                    self.dangling.append((tid, IS_A, target))
                elif r != tid and r not in isa:
                    isa.append(r)
            term.is_a = isa
            rels: list[tuple[str, str]] = []
            for rel, target in term.relationships:
                r = self.resolve(target)
                rel = self._rel_alias.get(rel, rel)
                if r is None:
                    self.dangling.append((tid, rel, target))
                elif (rel, r) not in rels:
                    rels.append((rel, r))
            term.relationships = rels
            inter: list[tuple[str | None, str]] = []
            for irel, target in term.intersection_of:
                r = self.resolve(target)
                if r is None:
                    # a logical definition with a missing part cannot be normalised faithfully: drop it whole
                    self.dangling.append((tid, "intersection_of", target))
                    inter = []
                    break
                inter.append((self._rel_alias.get(irel, irel) if irel else None, r))
            term.intersection_of = inter

    # ------------------------------------------------------------------------------------------------ lookup
    def __contains__(self, term_id: object) -> bool:
        return isinstance(term_id, str) and self.resolve(term_id) is not None

    def __len__(self) -> int:
        return len(self.terms)

    def __iter__(self) -> Iterator[str]:
        return iter(self.terms)

    def resolve(self, term_id: str) -> str | None:
        """Primary id for a term id or alt id; None for unknown and obsolete ids."""
        if term_id in self.terms:
            return term_id
        return self.alt_map.get(term_id)

    def _require(self, term_id: str) -> str:
        r = self.resolve(term_id)
        if r is None:
            why = "obsolete" if term_id in self.obsolete else "unknown"
            raise KeyError(f"{term_id} is {why} in {self.source}")
        return r

    def term(self, term_id: str) -> Term:
        return self.terms[self._require(term_id)]

    def name(self, term_id: str) -> str:
        return self.terms[self._require(term_id)].name

    def namespace(self, term_id: str) -> str:
        return self.terms[self._require(term_id)].namespace

    def find_by_name(self, name: str) -> str | None:
        """Term id whose name (or, failing that, synonym) is `name`, case-insensitively; None if absent or ambiguous."""
        if self._names is None:
            by_name: dict[str, list[str]] = {}
            by_syn: dict[str, list[str]] = {}
            for t in self.terms.values():
                by_name.setdefault(t.name.lower(), []).append(t.id)
                for syn in t.synonyms:
                    by_syn.setdefault(syn.lower(), []).append(t.id)
            self._names = (by_name, by_syn)
        key = name.strip().lower()
        hits = self._names[0].get(key) or self._names[1].get(key) or []
        return hits[0] if len(set(hits)) == 1 else None

    def relation_id(self, relation: str) -> str:
        """Canonical relation name (`BFO:0000050` -> `part_of` when the file's typedef says so)."""
        return relation if relation == IS_A else self._rel_alias.get(relation, relation)

    # -------------------------------------------------------------------------------------------- traversal
    def _rels(self, relations: Sequence[str]) -> tuple[str, ...]:
        if isinstance(relations, str):
            relations = (relations,)
        return tuple(sorted({self.relation_id(r) for r in relations}))

    def parents(self, term_id: str, relations: Sequence[str] = (IS_A,)) -> set[str]:
        return self._parents(self._require(term_id), self._rels(relations))

    def _parents(self, tid: str, rels: tuple[str, ...]) -> set[str]:
        term = self.terms[tid]
        out: set[str] = set(term.is_a) if IS_A in rels else set()
        out.update(t for r, t in term.relationships if r in rels)
        return out

    def ancestors(self, term_id: str, relations: Sequence[str] = (IS_A,)) -> set[str]:
        """All terms reachable upwards through `relations`, including the term itself (DeepGO convention)."""
        tid = self._require(term_id)
        rels = self._rels(relations)
        key = (rels, tid)
        hit = self._anc_cache.get(key)
        if hit is not None:
            return set(hit)
        seen = {tid}
        stack = [tid]
        while stack:
            cur = stack.pop()
            cached = self._anc_cache.get((rels, cur))
            if cached is not None and cur != tid:
                seen |= cached
                continue
            for p in self._parents(cur, rels):
                if p not in seen:
                    seen.add(p)
                    stack.append(p)
        self._anc_cache[key] = frozenset(seen)
        return seen

    def children(self, term_id: str, relations: Sequence[str] = (IS_A,)) -> set[str]:
        tid = self._require(term_id)
        rels = self._rels(relations)
        index = self._children.get(rels)
        if index is None:
            index = {}
            for cid in self.terms:
                for p in self._parents(cid, rels):
                    index.setdefault(p, []).append(cid)
            self._children[rels] = index
        return set(index.get(tid, ()))

    def descendants(self, term_id: str, relations: Sequence[str] = (IS_A,)) -> set[str]:
        """All terms reachable downwards through `relations`, including the term itself."""
        tid = self._require(term_id)
        seen = {tid}
        stack = [tid]
        while stack:
            for c in self.children(stack.pop(), relations):
                if c not in seen:
                    seen.add(c)
                    stack.append(c)
        return seen

    def closure(self, term_ids: Iterable[str], relations: Sequence[str] | None = None) -> set[str]:
        """Ancestor closure of several terms; `relations=None` follows every edge kind, intersection parts too."""
        start = [self._require(t) for t in term_ids]
        if relations is not None:
            out: set[str] = set()
            for t in start:
                out |= self.ancestors(t, relations)
            return out
        seen = set(start)
        stack = list(start)
        while stack:
            term = self.terms[stack.pop()]
            nxt = [*term.is_a, *(t for _, t in term.relationships), *(t for _, t in term.intersection_of)]
            for t in nxt:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return seen


def _build_term(tags: list[tuple[str, str, int]], start: int, source: str, default_ns: str) -> Term:
    ids = [(v, ln) for t, v, ln in tags if t == "id"]
    if not ids:
        raise InputError(f"{source}, line {start}: [Term] stanza without an id")
    if len(ids) > 1:
        raise InputError(f"{source}, line {ids[1][1]}: [Term] stanza with a second id ({ids[1][0]})")
    tid, id_line = ids[0]
    if not tid or len(tid.split()) != 1:
        raise InputError(f"{source}, line {id_line}: malformed term id {tid!r}")
    term = Term(id=tid, line=start, namespace=default_ns)
    for tag, value, ln in tags:
        tokens = value.split()
        if tag == "name":
            term.name = _unescape(value)
        elif tag == "namespace":
            term.namespace = value
        elif tag == "def":
            term.definition = _quoted(value)
        elif tag == "is_a":
            if len(tokens) != 1:
                raise InputError(f"{source}, line {ln}: is_a expects one term id, got {value!r}")
            term.is_a.append(tokens[0])
        elif tag == "relationship":
            if len(tokens) != 2:
                raise InputError(f"{source}, line {ln}: relationship expects 'relation target', got {value!r}")
            term.relationships.append((tokens[0], tokens[1]))
        elif tag == "intersection_of":
            if len(tokens) == 1:
                term.intersection_of.append((None, tokens[0]))
            elif len(tokens) == 2:
                term.intersection_of.append((tokens[0], tokens[1]))
            else:
                raise InputError(
                    f"{source}, line {ln}: intersection_of expects 'class' or 'relation class', got {value!r}"
                )
        elif tag == "alt_id":
            if len(tokens) != 1:
                raise InputError(f"{source}, line {ln}: alt_id expects one id, got {value!r}")
            term.alt_ids.append(tokens[0])
        elif tag == "synonym":
            term.synonyms.append(_quoted(value))
        elif tag == "xref":
            if tokens:
                term.xrefs.append(tokens[0])
                desc = value[len(tokens[0]):].strip()
                if desc.startswith('"'):
                    term.xref_names[tokens[0]] = _quoted(desc)
        elif tag == "subset":
            term.subsets.append(value)
        elif tag == "replaced_by":
            term.replaced_by.append(value)
        elif tag == "consider":
            term.consider.append(value)
        elif tag == "is_obsolete":
            if value not in ("true", "false"):
                raise InputError(f"{source}, line {ln}: is_obsolete must be true or false, got {value!r}")
            term.is_obsolete = value == "true"
    n_genus = sum(1 for r, _ in term.intersection_of if r is None)
    if term.intersection_of and n_genus == 0:
        raise InputError(f"{source}, line {start}: {tid} has intersection_of lines but no genus class")
    return term


def _build_typedef(tags: list[tuple[str, str, int]], start: int, source: str) -> Typedef:
    ids = [v for t, v, _ in tags if t == "id"]
    if len(ids) != 1 or not ids[0] or len(ids[0].split()) != 1:
        raise InputError(f"{source}, line {start}: [Typedef] stanza needs exactly one id")
    td = Typedef(id=ids[0], line=start)
    for tag, value, _ in tags:
        if tag == "name":
            td.name = _unescape(value)
        elif tag == "xref" and value.split():
            td.xrefs.append(value.split()[0])
        elif tag == "is_a" and value.split():
            td.is_a.append(value.split()[0])
        elif tag == "is_transitive":
            td.is_transitive = value == "true"
        elif tag == "inverse_of":
            td.inverse_of = value.split()[0] if value.split() else ""
        elif tag == "transitive_over" and value.split():
            td.transitive_over.append(value.split()[0])
    return td


# ------------------------------------------------------------------------------------- EL normal forms (NF1-4)
@dataclass
class NormalForms:
    """Normalised EL axioms as index tensors, the input of the ELEmbeddings axiom loss (METHOD.md §1.4).

    `class_ids[:n_concepts]` are the given concepts in latent order (class c <-> defined latent c); after them
    come the "zero classes" (ontology classes that occur in axioms but are not concepts; they get their own
    embeddings) and last the fresh classes introduced by normalisation, whose ids start with `_:`.
    """

    class_ids: list[str]
    relation_ids: list[str]
    nf1: torch.Tensor  # [n1, 2] (C, D):     C ⊑ D
    nf2: torch.Tensor  # [n2, 3] (C, D, E):  C ⊓ D ⊑ E
    nf3: torch.Tensor  # [n3, 3] (R, C, D):  ∃R.C ⊑ D
    nf4: torch.Tensor  # [n4, 3] (C, R, D):  C ⊑ ∃R.D
    n_concepts: int = 0

    @property
    def zero_class_ids(self) -> list[str]:
        return self.class_ids[self.n_concepts :]

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    @property
    def num_relations(self) -> int:
        return len(self.relation_ids)

    def counts(self) -> dict[str, int]:
        return {name: int(getattr(self, name).shape[0]) for name in ("nf1", "nf2", "nf3", "nf4")}

    def to(self, device: torch.device | str) -> NormalForms:
        return NormalForms(
            list(self.class_ids),
            list(self.relation_ids),
            self.nf1.to(device),
            self.nf2.to(device),
            self.nf3.to(device),
            self.nf4.to(device),
            self.n_concepts,
        )

    def describe(self, index_rows: bool = False) -> list[str]:
        """Human-readable axioms (for logs and tests): `A SubClassOf B`, `R some A SubClassOf B`, ..."""
        c, r = self.class_ids, self.relation_ids
        out = [f"{c[a]} SubClassOf {c[b]}" for a, b in self.nf1.tolist()]
        out += [f"{c[a]} and {c[b]} SubClassOf {c[e]}" for a, b, e in self.nf2.tolist()]
        out += [f"{r[x]} some {c[a]} SubClassOf {c[b]}" for x, a, b in self.nf3.tolist()]
        out += [f"{c[a]} SubClassOf {r[x]} some {c[b]}" for a, x, b in self.nf4.tolist()]
        return out


class _AxiomSink:
    """Collects axioms over string ids with de-duplication, then indexes them in a fixed class order."""

    def __init__(self) -> None:
        self.nf1: dict[tuple[str, str], None] = {}
        self.nf2: dict[tuple[str, str, str], None] = {}
        self.nf3: dict[tuple[str, str, str], None] = {}
        self.nf4: dict[tuple[str, str, str], None] = {}
        self.relations: dict[str, None] = {}
        self.class_order: dict[str, None] = {}
        self.fresh: dict[str, None] = {}

    def _cls(self, *ids: str) -> None:
        for i in ids:
            (self.fresh if i.startswith("_:") else self.class_order).setdefault(i, None)

    def add_nf1(self, c: str, d: str) -> None:
        if c != d:
            self._cls(c, d)
            self.nf1.setdefault((c, d), None)

    def add_nf2(self, c: str, d: str, e: str) -> None:
        self._cls(c, d, e)
        self.nf2.setdefault((c, d, e), None)

    def add_nf3(self, r: str, c: str, d: str) -> None:
        self.relations.setdefault(r, None)
        self._cls(c, d)
        self.nf3.setdefault((r, c, d), None)

    def add_nf4(self, c: str, r: str, d: str) -> None:
        self.relations.setdefault(r, None)
        self._cls(c, d)
        self.nf4.setdefault((c, r, d), None)

    def build(self, concepts: Sequence[str], concept_alias: dict[str, int] | None = None) -> NormalForms:
        import torch

        class_ids = list(concepts)
        index: dict[str, int] = {c: i for i, c in enumerate(class_ids)}
        for alias, i in (concept_alias or {}).items():
            index.setdefault(alias, i)
        for cid in [*self.class_order, *self.fresh]:
            if cid not in index:
                index[cid] = len(class_ids)
                class_ids.append(cid)
        rel_ids = list(self.relations)
        rindex = {r: i for i, r in enumerate(rel_ids)}

        def tensor(rows: list[list[int]], width: int) -> torch.Tensor:
            if not rows:
                return torch.zeros((0, width), dtype=torch.long)
            return torch.tensor(rows, dtype=torch.long)

        return NormalForms(
            class_ids=class_ids,
            relation_ids=rel_ids,
            nf1=tensor([[index[c], index[d]] for c, d in self.nf1], 2),
            nf2=tensor([[index[c], index[d], index[e]] for c, d, e in self.nf2], 3),
            nf3=tensor([[rindex[r], index[c], index[d]] for r, c, d in self.nf3], 3),
            nf4=tensor([[index[c], rindex[r], index[d]] for c, r, d in self.nf4], 3),
            n_concepts=len(concepts),
        )


def _exists_class(relation: str, target: str) -> str:
    """Fresh class X standing for ∃R.B; the name is deterministic so two definitions share one X."""
    return f"_:some({relation},{target})"


def _and_class(a: str, b: str) -> str:
    return f"_:and({a},{b})"


def normal_forms(ontology: Ontology, concepts: Sequence[str], restrict_to_closure: bool = True) -> NormalForms:
    """EL normal forms of the ontology around `concepts`, indexed with the concepts first (latent order).

    Axioms come from each term of the closure (every edge kind followed upwards from the concepts, so zinc
    binding brings metal binding and binding site, but not the rest of GO; `restrict_to_closure=False` takes
    the whole ontology):

    * `is_a: D` on C                    -> NF1  C ⊑ D
    * `relationship: R D` on C          -> NF4  C ⊑ ∃R.D
    * `intersection_of` lines on C, i.e. C ≡ A1 ⊓ ... ⊓ Ak ⊓ ∃R1.B1 ⊓ ... ⊓ ∃Rn.Bn:
        - C ⊑ Ai                        -> NF1 for each genus Ai
        - C ⊑ ∃Rj.Bj                    -> NF4 for each differentia
        - the converse, conjunction ⊑ C: each ∃Rj.Bj is replaced by a fresh class Xj = `_:some(Rj,Bj)` with
          ∃Rj.Bj ⊑ Xj (NF3), leaving a conjunction of atoms P1 ⊓ ... ⊓ Pm ⊑ C. With m = 1 that is NF1
          (P1 ⊑ C); with m = 2 one NF2 (P1 ⊓ P2 ⊑ C); longer conjunctions are chained through fresh classes
          Y1 = `_:and(P1,P2)`: P1 ⊓ P2 ⊑ Y1, Y1 ⊓ P3 ⊑ Y2, ..., Y(m-2) ⊓ Pm ⊑ C (all NF2).
      Both replacements only weaken what the embedding must satisfy towards C (anything in ∃R.B is in X), so the
      normalised set implies the original axiom and adds no new consequence over the original vocabulary.

    Relation inclusions and transitivity (is_transitive) have no place in NF1-NF4 and are not used, as in
    DeepGO-SE. Concepts absent from the ontology stay in `class_ids` (their latents exist) with no axioms.
    """
    order = list(concepts)
    if len(set(order)) != len(order):
        dup = sorted({c for c in order if order.count(c) > 1})
        raise InputError(f"normal forms: concept list has duplicates: {', '.join(dup)}")
    alias: dict[str, int] = {}
    present: list[str] = []
    for i, c in enumerate(order):
        r = ontology.resolve(c)
        if r is None:
            continue
        if r in alias:
            raise InputError(
                f"normal forms: concepts {order[alias[r]]} and {c} are the same term ({r}) in {ontology.source}"
            )
        alias[r] = i
        present.append(r)
    scope = ontology.closure(present) if restrict_to_closure else set(ontology.terms)

    sink = _AxiomSink()
    for tid in sorted(scope):
        term = ontology.terms[tid]
        for parent in term.is_a:
            sink.add_nf1(tid, parent)
        for rel, target in term.relationships:
            sink.add_nf4(tid, rel, target)
        if term.intersection_of:
            atoms: list[str] = []
            for irel, target in term.intersection_of:
                if irel is None:
                    sink.add_nf1(tid, target)
                    atoms.append(target)
                else:
                    sink.add_nf4(tid, irel, target)
                    x = _exists_class(irel, target)
                    sink.add_nf3(irel, target, x)
                    atoms.append(x)
            atoms = list(dict.fromkeys(atoms))
            if len(atoms) == 1:
                sink.add_nf1(atoms[0], tid)
            else:
                acc = atoms[0]
                for k, atom in enumerate(atoms[1:], start=1):
                    target = tid if k == len(atoms) - 1 else _and_class(acc, atom)
                    sink.add_nf2(acc, atom, target)
                    acc = target
    return sink.build(order, concept_alias=alias)


# ------------------------------------------------------------------------------------------ go.norm files
def load_normal_forms_file(path: str | Path, concepts: Sequence[str] | None = None) -> NormalForms:
    """Read DeepGO-SE's `go.norm` (one normalised axiom per line, Manchester syntax) into index tensors.

    As DeepGO-SE does, `_` becomes `:` (GO_0000001 -> GO:0000001) and only lines containing ` SubClassOf `
    count; classes outside `concepts` become zero classes in order of first appearance, and relations are
    indexed in order of appearance. A `SubClassOf` line of any other shape is an error rather than a silent
    drop, because the loss would quietly lose constraints.
    """
    sink = _AxiomSink()
    try:
        fh = _open_text(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read normal forms: {exc}") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            if " SubClassOf " not in raw:
                continue
            line = raw.strip().replace("_", ":")
            left, _, right = line.partition(" SubClassOf ")
            lt, rt = left.split(), right.split()
            if len(rt) == 1 and len(lt) == 1:
                sink.add_nf1(lt[0], rt[0])
            elif len(rt) == 1 and len(lt) == 3 and lt[1] == "and":
                sink.add_nf2(lt[0], lt[2], rt[0])
            elif len(rt) == 1 and len(lt) == 3 and lt[1] == "some":
                sink.add_nf3(lt[0], lt[2], rt[0])
            elif len(lt) == 1 and len(rt) == 3 and rt[1] == "some":
                sink.add_nf4(lt[0], rt[0], rt[2])
            else:
                raise InputError(f"{path}, line {lineno}: not one of the normal forms NF1-NF4: {raw.strip()!r}")
    order = list(concepts) if concepts is not None else []
    nf = sink.build(order)
    if concepts is None:
        nf.n_concepts = 0
    return nf


# ------------------------------------------------------------------------------------- standard terms of concepts
#: GFF3 column 3 when a concept has no Sequence Ontology term of its own or inherited (SO's root of protein features).
SO_FALLBACK = ("SO:0000839", "polypeptide_region")
#: Subsets of the shipped concept ontology that declare how a concept is called (inherited along is_a).
KIND_SUBSETS = {"region_concept": "region", "site_concept": "site"}


@dataclass(frozen=True)
class ConceptTerms:
    """The standard vocabulary of one concept, as GFF3/TSV consumers (InterProScan, genome browsers) expect it.

    ``feature_type`` is the SO term name for GFF3 column 3 (the accession when no name is known, which the spec
    allows); ``ontology_terms`` are SO and GO ids, feature type first (GFF3 ``Ontology_term``, TSV
    ``ontology_id``); ``go_ids`` the GO ids alone (GFF3 ``Dbxref``); ``kind`` is "region", "site" or "".
    """

    feature_type: str
    so_id: str
    ontology_terms: tuple[str, ...]
    go_ids: tuple[str, ...]
    kind: str


def _standard_ids(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()[:3].upper() in ("SO:", "GO:")]


@lru_cache(maxsize=1)
def shipped_concept_ontology() -> Ontology:
    """`protsae_cli/models/residue_concepts.obo`, parsed once per process (writers look every concept up in it)."""
    from protsae_cli.models import concept_ontology_path

    return Ontology.from_obo(concept_ontology_path())


def _nearest(onto: Ontology, tid: str, pick: Callable[[Term], str | None]) -> str | None:
    """First value `pick` finds on the term or, breadth-first along is_a, its nearest ancestor."""
    seen, level = {tid}, [tid]
    while level:
        for t in level:
            hit = pick(onto.terms[t])
            if hit:
                return hit
        nxt: list[str] = []
        for t in level:
            for p in onto.terms[t].is_a:
                if p in onto.terms and p not in seen:
                    seen.add(p)
                    nxt.append(p)
        level = nxt
    return None


def concept_terms(concept_id: str, ontology_id: str = "", ontology: Ontology | None = None) -> ConceptTerms:
    """Standard terms of a concept from its recorded `ontology_id` and the concept ontology's xrefs.

    Why here and not in the SAE config alone: SAEs trained before the xrefs existed record `ontology_id` as a
    copy of the PSC id, and their calls should still come out typed; SO/GO ids written in `ontology_id` come
    first, then the concept's own xrefs, and the SO feature type is inherited from the nearest is_a ancestor
    that has one (transmembrane helix -> transmembrane region -> SO:0001077), since SO is coarser than PSC.
    """
    if ontology is None:
        return _shipped_terms(concept_id, ontology_id)
    return _concept_terms(concept_id, ontology_id, ontology)


@lru_cache(maxsize=4096)
def _shipped_terms(concept_id: str, ontology_id: str) -> ConceptTerms:
    return _concept_terms(concept_id, ontology_id, shipped_concept_ontology())


def _concept_terms(concept_id: str, ontology_id: str, onto: Ontology) -> ConceptTerms:
    ids = _standard_ids(ontology_id) + _standard_ids(concept_id)
    tid = onto.resolve(concept_id) if concept_id else None
    kind, inherited_so = "", None
    if tid is not None:
        ids += _standard_ids(",".join(onto.terms[tid].xrefs))
        inherited_so = _nearest(onto, tid, lambda t: next((x for x in t.xrefs if x.upper().startswith("SO:")), None))
        kind = _nearest(onto, tid, lambda t: next((KIND_SUBSETS[s] for s in t.subsets if s in KIND_SUBSETS),
                                                  None)) or ""
    ids = list(dict.fromkeys(i.upper()[:3] + i[3:] for i in ids))
    so = next((i for i in ids if i.startswith("SO:")), None) or inherited_so
    if so is None:
        so_id, feature_type = SO_FALLBACK
    else:
        so_id, feature_type = so, _so_names(onto).get(so, so)
    terms = list(dict.fromkeys(([so] if so else []) + [i for i in ids if i.startswith("SO:")]
                               + [i for i in ids if i.startswith("GO:")]))
    return ConceptTerms(feature_type=feature_type, so_id=so_id, ontology_terms=tuple(terms),
                        go_ids=tuple(i for i in terms if i.startswith("GO:")), kind=kind)


def _so_names(onto: Ontology) -> dict[str, str]:
    """SO accession -> term name, from the xref descriptions of every term (one name per accession)."""
    cached = getattr(onto, "_so_name_table", None)
    if cached is None:
        cached = {}
        for t in onto.terms.values():
            for x, name in t.xref_names.items():
                if x.upper().startswith("SO:"):
                    cached.setdefault(x.upper()[:3] + x[3:], name)
        onto._so_name_table = cached  # type: ignore[attr-defined]
    return cached
