"""OBO parsing, ancestor closures, the shipped residue concept ontology, and EL normal forms (NF1-NF4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protsae_cli.errors import InputError
from protsae_cli.models import concept_ontology_path
from protsae_cli.labels.ontology import NormalForms, Ontology, load_normal_forms_file, normal_forms

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(scope="module")
def tiny() -> Ontology:
    return Ontology.from_obo(DATA / "tiny_el.obo")


@pytest.fixture(scope="module")
def slim() -> Ontology:
    return Ontology.from_obo(DATA / "go_slim_excerpt.obo")


@pytest.fixture(scope="module")
def psc() -> Ontology:
    return Ontology.from_obo(concept_ontology_path())


# ------------------------------------------------------------------------------------------------ parsing
def test_obo_fields_comments_and_modifiers(tiny: Ontology) -> None:
    a = tiny.term("T:A")
    assert a.name == "a"
    assert a.definition == 'Root class; the text has a "quote", a ! bang and a {brace}.'
    # `{source="test"}` modifier and `! b` comment are not part of the id
    assert tiny.term("T:C").is_a == ["T:B"]
    assert tiny.term("T:C").relationships == [("part_of", "T:D")]
    assert tiny.term("T:E").intersection_of == [(None, "T:B"), ("part_of", "T:D")]
    assert tiny.header["ontology"] == ["tiny"]
    assert tiny.typedefs["part_of"].xrefs == ["BFO:0000050"]
    assert tiny.typedefs["part_of"].is_transitive


def test_alt_id_and_obsolete(tiny: Ontology) -> None:
    assert tiny.resolve("T:D2") == "T:D"
    assert "T:D2" in tiny
    assert tiny.name("T:D2") == "d"
    assert "T:F" not in tiny  # obsolete terms are dropped
    assert "T:F" in tiny.obsolete
    assert tiny.resolve("T:F") is None
    with pytest.raises(KeyError, match="obsolete"):
        tiny.ancestors("T:F")
    with pytest.raises(KeyError, match="unknown"):
        tiny.ancestors("T:NOPE")
    assert len(tiny) == 7


def test_ancestors_include_self_and_follow_chosen_relations(tiny: Ontology) -> None:
    assert tiny.ancestors("T:C") == {"T:C", "T:B", "T:A"}
    assert tiny.ancestors("T:C", ("is_a", "part_of")) == {"T:C", "T:B", "T:A", "T:D"}
    # a relation may be named by its typedef xref
    assert tiny.ancestors("T:C", ("is_a", "BFO:0000050")) == {"T:C", "T:B", "T:A", "T:D"}
    assert tiny.ancestors("T:A") == {"T:A"}
    assert tiny.descendants("T:B") == {"T:B", "T:C", "T:E"}
    assert tiny.descendants("T:D", ("part_of",)) == {"T:D", "T:C"}
    assert tiny.parents("T:E") == {"T:B"}


def test_go_slim_excerpt(slim: Ontology) -> None:
    assert len(slim) == 15
    assert slim.name("GO:0005886") == "plasma membrane"
    assert slim.namespace("GO:0005886") == "cellular_component"
    assert slim.resolve("GO:0005904") == "GO:0005886"  # alt_id
    assert slim.ancestors("GO:0000228") == {"GO:0000228", "GO:0005694", "GO:0043226", "GO:0005575"}
    assert slim.ancestors("GO:0000228", ("is_a", "part_of")) == {
        "GO:0000228", "GO:0005694", "GO:0043226", "GO:0005575", "GO:0005634", "GO:0005622", "GO:0005623"
    }
    assert slim.dangling == []


def test_gzip_obo(tmp_path: Path) -> None:
    import gzip

    p = tmp_path / "tiny.obo.gz"
    p.write_bytes(gzip.compress((DATA / "tiny_el.obo").read_bytes()))
    assert Ontology.from_obo(p).ancestors("T:C") == {"T:C", "T:B", "T:A"}


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("format-version: 1.2\n\n[Term\nid: X:1\n", 3, "malformed stanza header"),
        ("[Term]\nid: X:1\nthis line has no tag\n", 3, "expected 'tag: value'"),
        ("[Term]\nname: no id here\n", 1, "without an id"),
        ("[Term]\nid: X:1\n\n[Term]\nid: X:1\n", 4, "duplicate term X:1"),
        ("[Term]\nid: X:1\nis_a: X:2 X:3\n", 3, "is_a expects one term id"),
        ("[Term]\nid: X:1\nrelationship: part_of\n", 3, "relationship expects"),
        ("[Term]\nid: X:1\nintersection_of: part_of X:2\n", 1, "no genus class"),
        ("[Term]\nid: X:1\nis_obsolete: maybe\n", 3, "is_obsolete must be"),
        ("[Term]\nid: X:1\nid: X:2\n", 3, "second id"),
    ],
)
def test_malformed_obo_names_file_and_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(InputError) as exc:
        Ontology.from_string(text, source="bad.obo")
    msg = str(exc.value)
    assert "bad.obo" in msg and f"line {line}" in msg and fragment in msg


def test_malformed_obo_file_on_disk(tmp_path: Path) -> None:
    p = tmp_path / "broken.obo"
    p.write_text("format-version: 1.2\n\n[Term]\nid: X:1\nrelationship: part_of\n")
    with pytest.raises(InputError, match=r"broken\.obo, line 5: relationship"):
        Ontology.from_obo(p)


# --------------------------------------------------------------------------------------- shipped ontology
def test_shipped_residue_ontology(psc: Ontology) -> None:
    assert psc.header["format-version"] == ["1.2"]
    assert all(t.startswith("PSC:") for t in psc.terms)
    assert all(t.name and t.definition for t in psc.terms.values())
    assert psc.ancestors("PSC:0000211") == {"PSC:0000211", "PSC:0000210", "PSC:0000200", "PSC:0000001"}
    assert psc.name("PSC:0000211") == "zinc binding"
    assert psc.name("PSC:0000210") == "metal binding"
    assert psc.ancestors("PSC:0000101") == {"PSC:0000101", "PSC:0000100", "PSC:0000001"}
    assert "SO:0001077" in psc.term("PSC:0000100").xrefs
    # every term reaches the root
    root = "PSC:0000001"
    assert all(root in psc.ancestors(t) for t in psc.terms)
    assert psc.find_by_name("Zinc binding") == "PSC:0000211"
    # zinc finger has_part zinc binding gives the shipped ontology an NF4 axiom, but no is_a to zinc binding
    assert ("has_part", "PSC:0000211") in psc.term("PSC:0000501").relationships
    assert "PSC:0000211" not in psc.ancestors("PSC:0000501")


# ------------------------------------------------------------------------------------------ normal forms
def _rows(t: torch.Tensor) -> list[list[int]]:
    return t.tolist()


def test_normal_forms_exact_tensors(tiny: Ontology) -> None:
    nf = normal_forms(tiny, ["T:C", "T:E"])
    assert isinstance(nf, NormalForms)
    # concepts first (latent order), then zero classes by first appearance, then the fresh class for ∃part_of.D
    assert nf.class_ids == ["T:C", "T:E", "T:B", "T:A", "T:D", "_:some(part_of,T:D)"]
    assert nf.n_concepts == 2 and nf.zero_class_ids == ["T:B", "T:A", "T:D", "_:some(part_of,T:D)"]
    assert nf.relation_ids == ["part_of"]
    C, E, B, A, D, X = range(6)
    assert _rows(nf.nf1) == [[B, A], [C, B], [E, B]]  # is_a (E ⊑ B from is_a and from the genus: deduplicated)
    assert _rows(nf.nf2) == [[B, X, E]]  # B ⊓ X ⊑ E
    assert _rows(nf.nf3) == [[0, D, X]]  # ∃part_of.D ⊑ X
    assert _rows(nf.nf4) == [[C, 0, D], [E, 0, D]]  # C ⊑ ∃part_of.D (relationship), E ⊑ ∃part_of.D (differentia)
    for t, w in ((nf.nf1, 2), (nf.nf2, 3), (nf.nf3, 3), (nf.nf4, 3)):
        assert t.dtype == torch.long and t.dim() == 2 and t.shape[1] == w
    # T:G and T:H are outside the closure of the concepts
    assert "T:G" not in nf.class_ids and "T:H" not in nf.class_ids


def test_normal_forms_long_intersection_is_chained(tiny: Ontology) -> None:
    nf = normal_forms(tiny, ["T:H"])
    assert sorted(nf.describe()) == sorted(
        [
            "T:G SubClassOf T:A",
            "T:H SubClassOf T:A",
            "T:H SubClassOf T:G",
            "T:A and T:G SubClassOf _:and(T:A,T:G)",
            "_:and(T:A,T:G) and _:some(part_of,T:D) SubClassOf T:H",
            "part_of some T:D SubClassOf _:some(part_of,T:D)",
            "T:H SubClassOf part_of some T:D",
        ]
    )


def test_normal_forms_alias_missing_concepts_and_whole_ontology(tiny: Ontology) -> None:
    # an alt id as a concept takes the place of its term; an unknown concept keeps its latent with no axioms
    nf = normal_forms(tiny, ["T:D2", "X:unknown", "T:C"])
    assert nf.class_ids[:3] == ["T:D2", "X:unknown", "T:C"]
    assert [2, 0, 0] in _rows(nf.nf4)  # C ⊑ ∃part_of.D, with D at the alt id's index
    assert all(1 not in row for row in _rows(nf.nf1) + _rows(nf.nf4))
    full = normal_forms(tiny, ["T:C"], restrict_to_closure=False)
    assert "T:H" in full.class_ids and "T:G" in full.class_ids
    with pytest.raises(InputError, match="same term"):
        normal_forms(tiny, ["T:D", "T:D2"])
    with pytest.raises(InputError, match="duplicates"):
        normal_forms(tiny, ["T:C", "T:C"])


def test_normal_forms_on_shipped_ontology(psc: Ontology) -> None:
    concepts = ["PSC:0000211", "PSC:0000501", "PSC:0000101"]
    nf = normal_forms(psc, concepts)
    zinc, finger = 0, 1
    assert [finger, nf.relation_ids.index("has_part"), zinc] in _rows(nf.nf4)
    assert [zinc, nf.class_ids.index("PSC:0000210")] in _rows(nf.nf1)
    assert nf.counts() == {"nf1": 7, "nf2": 0, "nf3": 0, "nf4": 1}
    moved = nf.to("cpu")
    assert moved.class_ids == nf.class_ids and torch.equal(moved.nf1, nf.nf1)


def test_normal_forms_with_go_intersection(slim: Ontology) -> None:
    nf = normal_forms(slim, ["GO:0000228"])
    text = nf.describe()
    assert "GO:0005694 and _:some(part_of,GO:0005634) SubClassOf GO:0000228" in text
    assert "part_of some GO:0005634 SubClassOf _:some(part_of,GO:0005634)" in text
    assert "GO:0000228 SubClassOf part_of some GO:0005634" in text


# ---------------------------------------------------------------------------------------------- go.norm
def test_go_norm_file() -> None:
    nf = load_normal_forms_file(DATA / "tiny.norm", concepts=["GO:0000002", "GO:0000001"])
    assert nf.class_ids == ["GO:0000002", "GO:0000001", "GO:0000003", "GO:0000004", "GO:0000005", "GO:0000006"]
    assert nf.relation_ids == ["BFO:0000050"]
    assert _rows(nf.nf1) == [[1, 0]]  # the repeated line is counted once
    assert _rows(nf.nf2) == [[1, 2, 3]]
    assert _rows(nf.nf3) == [[0, 0, 4]]
    assert _rows(nf.nf4) == [[5, 0, 1]]
    assert nf.n_concepts == 2
    plain = load_normal_forms_file(DATA / "tiny.norm")
    assert plain.class_ids[:2] == ["GO:0000001", "GO:0000002"] and plain.n_concepts == 0


def test_go_norm_bad_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.norm"
    p.write_text("GO_0000001 SubClassOf GO_0000002\nGO_1 and GO_2 SubClassOf R some GO_3\n")
    with pytest.raises(InputError, match=r"bad\.norm, line 2: not one of the normal forms"):
        load_normal_forms_file(p)
