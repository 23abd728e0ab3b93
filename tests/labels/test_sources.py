"""The one label-source loader every command uses (protsae_cli.labels.sources): its rules, stated in the module
docstring, hold for train, eval and calibrate alike."""

from __future__ import annotations

import logging

import pytest

from protsae_cli.errors import InputError
from protsae_cli.labels.sources import annotation_specs, load_label_sources, load_ontologies

ZINC, METAL, BINDING, ROOT = "PSC:0000211", "PSC:0000210", "PSC:0000200", "PSC:0000001"
SEQS = {"A": "M" * 10, "B": "M" * 10}

GO_OBO = """format-version: 1.2

[Term]
id: GO:0003674
name: molecular_function
namespace: molecular_function

[Term]
id: GO:0000002
name: a
namespace: molecular_function
is_a: GO:0003674 ! molecular_function
"""


def _tsv(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join(f"{line}\n" for line in lines))
    return str(p)


def test_annotation_specs_pair_files_with_formats():
    specs = annotation_specs(["a.tsv,b.tsv", "c.3line"], ["generic-tsv", "tmbed"])
    assert [(s.paths, s.fmt) for s in specs] == [(["a.tsv", "b.tsv"], "generic-tsv"), (["c.3line"], "tmbed")]
    assert [s.fmt for s in annotation_specs(["a", "b"], ["gaf"])] == ["gaf", "gaf"]  # one for all
    assert [s.fmt for s in annotation_specs(["a", "b"])] == ["auto", "auto"]
    assert annotation_specs(["a,b"])[0].name == "a+b"
    with pytest.raises(InputError, match="2 --annotations values but 3 --annotation-format"):
        annotation_specs(["a", "b"], ["gaf", "gaf", "gaf"])
    with pytest.raises(InputError, match="names no file"):
        annotation_specs([","])


def test_residue_labels_propagate_through_the_shipped_ontology_and_roots_are_left_out(tmp_path):
    f = _tsv(tmp_path, "zn.tsv", [f"A\t2\t3\t{ZINC}"])
    (src,) = load_label_sources(annotation_specs([f], ["generic-tsv"]), SEQS)
    assert src.kind == "residue" and src.name == "zn.tsv"
    assert {ZINC, METAL, BINDING} <= set(src.concepts)  # zinc binding is metal binding is binding
    assert ROOT not in src.concepts  # reached only by propagation: labels every annotated residue
    (direct,) = load_label_sources(annotation_specs([f], ["generic-tsv"]), SEQS, propagate=False)
    assert direct.concepts == [ZINC]


def test_a_source_that_annotates_none_of_the_proteins_is_an_error_naming_it(tmp_path):
    f = _tsv(tmp_path, "other.tsv", [f"Z\t2\t3\t{ZINC}"])
    with pytest.raises(InputError, match=r"other\.tsv: none of its proteins is in the training FASTA \(2 proteins\)"):
        load_label_sources(annotation_specs([f], ["generic-tsv"]), SEQS, against="the training FASTA")
    # report overlays match ids themselves: no sequences, no error
    (src,) = load_label_sources(annotation_specs([f], ["generic-tsv"]), None)
    assert src.labels.protein_ids == ["Z"]


def test_comma_joined_files_are_one_source_and_must_share_a_format(tmp_path):
    zn = _tsv(tmp_path, "zn.tsv", [f"A\t2\t2\t{ZINC}"])
    metal = _tsv(tmp_path, "m.tsv", [f"B\t3\t3\t{METAL}"])
    (src,) = load_label_sources(annotation_specs([f"{zn},{metal}"], ["generic-tsv"]), SEQS)
    assert sorted(src.labels.protein_ids) == ["A", "B"] and src.paths == [zn, metal]


def test_go_and_residue_files_each_get_their_own_ontology_from_repeated_ontology(tmp_path, caplog):
    go_obo = tmp_path / "go.obo"
    go_obo.write_text(GO_OBO)
    gaf_like = _tsv(tmp_path, "go.tsv", ["A\tGO:0000002", "B\tGO:0003674"])
    zn = _tsv(tmp_path, "zn.tsv", [f"A\t2\t3\t{ZINC}"])
    specs = annotation_specs([gaf_like, zn], ["go-tsv", "generic-tsv"])
    go_src, zn_src = load_label_sources(specs, SEQS, [str(go_obo)])
    assert go_src.kind == "protein" and "GO:0000002" in go_src.concepts
    assert "GO:0003674" not in go_src.concepts  # a GO root
    assert METAL in zn_src.concepts  # GO given alone: residue files still use the shipped ontology
    caplog.set_level(logging.WARNING, logger="protsae.labels")
    load_label_sources(annotation_specs([gaf_like], ["go-tsv"]), SEQS)  # no GO ontology: warned, not propagated
    assert any("without a GO ontology" in r.getMessage() for r in caplog.records)


def test_default_ontology_is_the_shipped_one():
    (onto,) = load_ontologies(None)
    assert ZINC in onto and METAL in onto.parents(ZINC)
