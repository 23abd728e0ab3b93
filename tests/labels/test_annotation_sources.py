"""Annotation loaders and label containers: exact coordinates, every error path, propagation, round trips."""

from __future__ import annotations

import gzip
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protsae_cli.labels import formats as A
from protsae_cli.labels.formats import (
    infer_format,
    load_annotations,
    load_binding,
    load_gaf,
    load_generic_tsv,
    load_go_tsv,
    load_swissprot,
    load_tmbed,
    load_uniprot_tsv,
    parse_uniprot_ft_cell,
    write_generic_tsv,
)
from protsae_cli.errors import InputError
from protsae_cli.labels.sets import ProteinLabels, ResidueLabelBuilder, ResidueLabels
from protsae_cli.models import concept_ontology_path
from protsae_cli.labels.ontology import Ontology

DATA = Path(__file__).parents[1] / "data"


def fasta_dict(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    key = None
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            key = line[1:].split()[0]
            out[key] = ""
        elif key is not None:
            out[key] += line.strip()
    return out


def pos(labels: ResidueLabels, pid: str, concept: str) -> list[int]:
    return labels.positions[pid][concept].tolist()


def expect_error(fn, *fragments: str):
    with pytest.raises(InputError) as exc:
        fn()
    msg = str(exc.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


@pytest.fixture(scope="module")
def psc() -> Ontology:
    return Ontology.from_obo(concept_ontology_path())


@pytest.fixture(scope="module")
def slim() -> Ontology:
    return Ontology.from_obo(DATA / "go_slim_excerpt.obo")


# ======================================================================================= Swiss-Prot flat file
def test_swissprot_real_entry_exact_coordinates() -> None:
    lab = load_swissprot(DATA / "uniprot_O95832_trimmed.txt")
    pid = "O95832"
    assert lab.protein_ids == [pid] and lab.lengths == {pid: 211}
    inst = lab.instances[pid]
    # FT TRANSMEM 8..28 /note="Helical" -> 0-based half-open (7, 28)
    assert inst[A.TM_HELIX] == [(7, 28), (81, 102), (115, 136), (163, 184)]
    assert inst[A.CYTOPLASMIC] == [(0, 7), (102, 115), (184, 211)]
    assert inst[A.NON_CYTOPLASMIC] == [(28, 81), (136, 163)]
    assert pos(lab, pid, A.TM_HELIX)[:3] == [7, 8, 9] and len(pos(lab, pid, A.TM_HELIX)) == 4 * 21
    # DISULFID 54..64: the two cysteines, one instance spanning the bond
    assert pos(lab, pid, A.DISULFIDE_BOND) == [53, 63]
    assert inst[A.DISULFIDE_BOND] == [(53, 64)]
    assert inst[A.DISORDERED_REGION] == [(191, 211)]
    assert inst[A.REGION] == [(209, 211)]
    assert lab.names[A.TM_HELIX] == "transmembrane helix"
    assert lab.skipped == {}


def test_swissprot_old_metal_feature() -> None:
    lab = load_swissprot(DATA / "uniprot_P0A186.txt")
    # FT METAL 45 /note="Iron-sulfur (2Fe-2S)"; 47; 64; 67
    assert pos(lab, "P0A186", A.FE_S_BINDING) == [44, 46, 63, 66]
    assert lab.instances["P0A186"][A.DOMAIN] == [(5, 101)]


def test_swissprot_synthetic_ligands_and_fuzzy_positions(psc: Ontology) -> None:
    lab = load_swissprot(DATA / "uniprot_synthetic.txt")
    assert lab.protein_ids == ["Q00001", "Q00002"]
    assert lab.lengths == {"Q00001": 60, "Q00002": 12}
    assert pos(lab, "Q00001", A.ZINC_BINDING) == [49, 52]  # BINDING 50 and 53, /ligand="Zn(2+)"
    assert pos(lab, "Q00001", A.NUCLEOTIDE_BINDING) == [9, 10, 11]  # BINDING 10..12 ATP
    assert pos(lab, "Q00001", A.PHOSPHORYLATION) == [4]
    assert pos(lab, "Q00001", A.DISULFIDE_BOND) == [2, 20]
    assert lab.instances["Q00001"][A.ZINC_FINGER] == [(47, 58)]
    assert lab.instances["Q00001"][A.TM_HELIX] == [(24, 45)]  # note "Helical; Signal-anchor ..." over 2 lines
    assert A.SIGNAL_PEPTIDE not in lab.positions["Q00001"]  # SIGNAL <1..20: skipped, not guessed
    assert A.BETA_STRAND not in lab.positions["Q00001"]  # STRAND 55..?
    assert lab.skipped == {
        "SIGNAL features with fuzzy or unknown positions": 1,
        "STRAND features with fuzzy or unknown positions": 1,
    }
    prop = lab.propagate(psc)
    zinc = pos(lab, "Q00001", A.ZINC_BINDING)
    assert set(zinc) <= set(pos(prop, "Q00001", A.METAL_BINDING))
    assert set(zinc) <= set(pos(prop, "Q00001", A.BINDING_SITE))
    assert pos(prop, "Q00001", A.BINDING_SITE) == [9, 10, 11, 49, 52]
    assert pos(prop, "Q00001", A.SMALL_MOLECULE_BINDING) == [9, 10, 11]
    assert prop.names[A.METAL_BINDING] == "metal binding"
    assert A.METAL_BINDING in prop.concepts and prop.concepts[: len(lab.concepts)] == lab.concepts
    assert prop.instances["Q00001"][A.METAL_BINDING] == [(49, 50), (52, 53)]


def test_swissprot_with_sequences(tmp_path: Path) -> None:
    seq1 = "MACSSGKTLVVACLLLAAVLCSGAAVLLALIVGALLVLAFLLAWRKCPECHKCFRRGDLK"
    # the secondary accession and an `sp|...|...` FASTA id both find their entry
    seqs = {"Q00099": seq1, "sp|Q00002|TEST2_HUMAN": "MKLVAEELKKGW"}
    lab = load_swissprot(DATA / "uniprot_synthetic.txt", seqs)
    assert sorted(lab.protein_ids) == ["Q00099", "sp|Q00002|TEST2_HUMAN"]
    assert pos(lab, "sp|Q00002|TEST2_HUMAN", A.HELIX) == [1, 2, 3, 4, 5, 6, 7]
    # unknown ids: strict by default, counted when skipped
    expect_error(lambda: load_swissprot(DATA / "uniprot_synthetic.txt", {"Q00001": seq1}), "uniprot_synthetic.txt",
                 "line 34", "Q00002", "not in the given sequences")
    lab = load_swissprot(DATA / "uniprot_synthetic.txt", {"Q00001": seq1}, unknown_ids="skip")
    assert lab.protein_ids == ["Q00001"]
    assert lab.skipped["annotations of proteins not in the sequence set"] == 1
    # a different sequence would make the coordinates meaningless
    expect_error(lambda: load_swissprot(DATA / "uniprot_synthetic.txt", {**seqs, "Q00099": seq1[:-1] + "A"}),
                 "line 1", "differs from the given sequence")
    # positions that do not fit a shorter given sequence are refused even without the sequence check
    expect_error(lambda: load_swissprot(DATA / "uniprot_synthetic.txt", {**seqs, "Q00099": seq1[:40]},
                                        check_sequence=False), "line 1", "past the sequence end (40 residues)")


def test_swissprot_unparseable(tmp_path: Path) -> None:
    p = tmp_path / "broken.txt"
    p.write_text("ID   BROKEN\nthis is not a UniProt entry\n//\n")
    expect_error(lambda: load_swissprot(p), "broken.txt", "line 1", "cannot parse UniProt entry 1")


def test_swissprot_gzip(tmp_path: Path) -> None:
    p = tmp_path / "entries.dat.gz"
    p.write_bytes(gzip.compress((DATA / "uniprot_synthetic.txt").read_bytes()))
    assert infer_format(p) == "swissprot"
    lab = load_annotations(p)
    assert pos(lab, "Q00001", A.ZINC_BINDING) == [49, 52]


# =========================================================================================== UniProt XML
def test_uniprot_xml() -> None:
    lab = load_annotations(DATA / "uniprot_P97881.xml")
    pid = "P97881"
    assert lab.lengths[pid] == 547
    assert lab.instances[pid][A.TM_HELIX] == [(458, 479)]
    assert lab.instances[pid][A.CYTOPLASMIC] == [(479, 547)]
    assert pos(lab, pid, A.DISULFIDE_BOND)[:4] == [213, 218, 224, 233]
    assert lab.instances[pid][A.DISULFIDE_BOND][:2] == [(213, 225), (218, 234)]
    assert lab.skipped == {"SIGNAL features with fuzzy or unknown positions": 1}  # <location> begin 1, end unknown
    multi = load_annotations(DATA / "uniprot_multiligand.xml", "uniprot-xml")
    assert multi.positions == {"DUMMY123": {A.NUCLEOTIDE_BINDING: np.array([0])}}  # ATP and ADP


def test_ligand_mapping() -> None:
    assert A.ligand_concept("Zn(2+)") == A.ZINC_BINDING
    assert A.ligand_concept("Fe cation") == A.IRON_BINDING
    assert A.ligand_concept("Fe(3+)") == A.IRON_BINDING
    assert A.ligand_concept("Cd(2+)") == A.METAL_BINDING
    assert A.ligand_concept("H(+)") == A.SMALL_MOLECULE_BINDING  # a proton is not a metal
    assert A.ligand_concept("[4Fe-4S] cluster") == A.FE_S_BINDING
    assert A.ligand_concept("heme b") == A.HEME_BINDING
    assert A.ligand_concept("GTP") == A.NUCLEOTIDE_BINDING
    assert A.ligand_concept("NADP(+)") == A.NUCLEOTIDE_BINDING
    assert A.ligand_concept("RNA") == A.RNA_BINDING
    assert A.ligand_concept("DNA") == A.DNA_BINDING
    assert A.ligand_concept("a peptide antigen") == A.BINDING_SITE
    assert A.ligand_concept("S-adenosyl-L-methionine") == A.SMALL_MOLECULE_BINDING
    assert A.feature_concepts("TOPO_DOM", "Lumenal, thylakoid") == [A.NON_CYTOPLASMIC]
    assert A.feature_concepts("TOPO_DOM", "Mitochondrial matrix") == [A.TOPO_DOMAIN]
    assert A.feature_concepts("TRANSMEM", "Beta stranded") == [A.TM_STRAND]
    assert A.feature_concepts("MOD_RES", "N6-acetyllysine") == [A.ACETYLATION]
    assert A.feature_concepts("METAL", "Zinc; catalytic") == [A.ZINC_BINDING]
    assert A.feature_concepts("CHAIN", "whatever") == []


# =========================================================================================== UniProt TSV
def test_uniprot_tsv_matches_flat_file() -> None:
    tsv = load_uniprot_tsv(DATA / "uniprot_export.tsv")
    flat = load_swissprot(DATA / "uniprot_synthetic.txt")
    assert tsv.lengths == {"Q00001": 60, "Q00002": 12}
    for concept, idx in tsv.positions["Q00001"].items():
        assert idx.tolist() == flat.positions["Q00001"][concept].tolist(), concept
        assert tsv.instances["Q00001"][concept] == flat.instances["Q00001"][concept]
    assert set(tsv.positions["Q00001"]) == {
        A.TM_HELIX, A.ZINC_BINDING, A.NUCLEOTIDE_BINDING, A.DISULFIDE_BOND, A.CYTOPLASMIC, A.PHOSPHORYLATION
    }
    assert tsv.positions["Q00002"] == {}  # annotated with nothing: all negatives
    assert tsv.skipped == {"SIGNAL features with fuzzy or unknown positions": 1}


def test_uniprot_ft_cell_parser() -> None:
    items = parse_uniprot_ft_cell(
        'TRANSMEM 10..30; /note="Helical; Name=1"; /evidence="ECO:0000255"; TRANSMEM 45..67; /note="Helical"'
    )
    assert items == [
        ("TRANSMEM", "10..30", {"note": ["Helical; Name=1"], "evidence": ["ECO:0000255"]}),
        ("TRANSMEM", "45..67", {"note": ["Helical"]}),
    ]
    assert parse_uniprot_ft_cell('BINDING 52; /ligand="Zn(2+)"')[0][2] == {"ligand": ["Zn(2+)"]}
    with pytest.raises(ValueError):
        parse_uniprot_ft_cell('/note="orphan"')


@pytest.mark.parametrize(
    "cell, fragments",
    [
        ("TRANSMEM 50..70", ["line 2", "past the sequence end (60 residues)"]),
        ("TRANSMEM 30..20", ["line 2", "start 30 > end 20"]),
        ("TRANSMEM 1..x", ["line 2", "malformed feature location"]),
        ('TRANSMEM 1..5; "stray"', ["line 2", "column 'ft_transmem'", "cannot read feature text"]),
    ],
)
def test_uniprot_tsv_errors(tmp_path: Path, cell: str, fragments: list[str]) -> None:
    p = tmp_path / "export.tsv"
    p.write_text(f"Entry\tLength\tft_transmem\nQ1\t60\t{cell}\n")
    expect_error(lambda: load_uniprot_tsv(p), "export.tsv", *fragments)


def test_uniprot_tsv_skips_isoform_and_checks_header(tmp_path: Path) -> None:
    p = tmp_path / "export.tsv"
    p.write_text("Entry\tSequence\tIntramembrane\nQ1\tMKLV\tINTRAMEM Q1-2:1..3; INTRAMEM 2..3\n")
    lab = load_uniprot_tsv(p)
    assert lab.lengths == {"Q1": 4} and pos(lab, "Q1", A.INTRAMEMBRANE) == [1, 2]
    assert lab.skipped == {"INTRAMEM features located on another isoform": 1}
    p.write_text("Entry\tSequence\nQ1\tMKLV\n")
    expect_error(lambda: load_uniprot_tsv(p), "line 1", "no feature column")
    p.write_text("Protein\tft_transmem\nQ1\tTRANSMEM 1..2\n")
    expect_error(lambda: load_uniprot_tsv(p), "line 1", "no 'Entry'")
    p.write_text("Entry\tft_transmem\nQ1\tTRANSMEM 1..2\nQ1\tTRANSMEM 1..2\n")
    expect_error(lambda: load_uniprot_tsv(p), "line 3", "appears twice")


# ================================================================================================ TMbed
def test_tmbed_excerpt_exact() -> None:
    lab = load_tmbed(DATA / "tmbed_excerpt.fasta")
    assert lab.protein_ids == ["6hu9_i", "A0A1W6EVM7", "1uun_A", "6u8y_A"]
    # 6u8y_A labels: UUUUUU 11 H*22 2 h*20 1...1 U
    inst = lab.instances["6u8y_A"]
    assert inst[A.TM_HELIX] == [(8, 30), (31, 51)]  # H and h are two helices, in two orientations
    assert inst[A.NON_CYTOPLASMIC] == [(30, 31)]
    assert inst[A.CYTOPLASMIC][0] == (6, 8)
    assert lab.masked["6u8y_A"].tolist() == [0, 1, 2, 3, 4, 5, lab.lengths["6u8y_A"] - 1]
    assert lab.lengths["6u8y_A"] == 168
    # 6hu9_i: U, twelve 1, 23 H, 20 2, UUU
    assert lab.instances["6hu9_i"][A.TM_HELIX] == [(13, 36)]
    assert lab.instances["6hu9_i"][A.NON_CYTOPLASMIC] == [(36, 56)]
    assert lab.instances["A0A1W6EVM7"][A.SIGNAL_PEPTIDE] == [(0, 26)]
    assert lab.instances["1uun_A"][A.TM_STRAND] == [(100, 110), (137, 146)]
    mask = lab.mask("6hu9_i", lab.lengths["6hu9_i"])
    assert not mask[0] and mask[1] and not mask[-1]
    dense = lab.dense("6u8y_A", 168, [A.TM_HELIX, A.SIGNAL_PEPTIDE])
    assert dense.shape == (168, 2) and dense[:, 0].sum() == 42 and not dense[:, 1].any()
    no_topo = load_tmbed(DATA / "tmbed_excerpt.fasta", topology=False)
    assert A.CYTOPLASMIC not in no_topo.concepts and A.TM_HELIX in no_topo.concepts


def test_tmbed_matches_fasta_ids_with_pipes() -> None:
    lines = (DATA / "tmbed_excerpt.fasta").read_text().splitlines()
    # ids as a FASTA reader keeps them (the whole first word, '|' fields included)
    seqs = {lines[i][1:]: lines[i + 1] for i in range(0, len(lines), 3)}
    assert "6u8y_A|I6UQN5|I6UQN5_9EURY" in seqs
    lab = load_tmbed(DATA / "tmbed_excerpt.fasta", seqs)
    assert "6u8y_A|I6UQN5|I6UQN5_9EURY" in lab.positions


@pytest.mark.parametrize(
    "records, line, fragment",
    [
        (">P1|EUKARYA|NO_SP|0\nMKLV\n1111\n>P2|x\nMKL\n11H1\n", 6, "4 labels for a sequence of 3 residues"),
        (">P1|EUKARYA|NO_SP|0\nMKLV\n11X1\n", 3, "label 'X' at residue 3"),
        (">P1|EUKARYA|NO_SP|0\nMKLV\n>P2|x\nMKL\n111\n", 1, "incomplete record"),
        ("MKLV\n1111\n", 1, "expected a '>' header"),
        (">P1\nMK1V\n1111\n", 2, "contains '1'"),
        (">P1\nMKLV\n1111\n\n>P1\nMKLV\n1111\n", 5, "appears twice"),
    ],
)
def test_tmbed_errors(tmp_path: Path, records: str, line: int, fragment: str) -> None:
    p = tmp_path / "bad_tmbed.fasta"
    p.write_text(records)
    expect_error(lambda: load_tmbed(p), "bad_tmbed.fasta", f"line {line}", fragment)


def test_tmbed_unknown_and_mismatched_sequence(tmp_path: Path) -> None:
    p = tmp_path / "t.fasta"
    p.write_text(">P1|EUKARYA|NO_SP|0\nMKLV\n11HH\n>P2|EUKARYA|NO_SP|0\nMK\n22\n")
    expect_error(lambda: load_tmbed(p, {"P1": "MKLV"}), "t.fasta", "line 4", "'P2' is not in the given sequences")
    lab = load_tmbed(p, {"P1": "MKLV"}, unknown_ids="skip")
    assert lab.protein_ids == ["P1"] and lab.skipped == {"annotations of proteins not in the sequence set": 1}
    expect_error(lambda: load_tmbed(p, {"P1": "MKLA", "P2": "MK"}), "line 2", "differs from the given sequence")


# ====================================================================================== binding residues
def test_binding_real_excerpt() -> None:
    seqs = fasta_dict(DATA / "bindpredict_excerpt.fasta")
    path = DATA / "binding_residues_2.5_metal_excerpt.txt"
    assert infer_format(path) == "binding"
    # the label file lists a protein without a sequence (P02185), as the original does
    expect_error(lambda: load_binding(path, seqs), "binding_residues_2.5_metal_excerpt.txt", "line 1", "P02185")
    lab = load_binding(path, seqs, unknown_ids="skip")
    assert lab.skipped == {"annotations of proteins not in the sequence set": 1}
    assert lab.concepts == [A.METAL_BINDING]  # from the file name
    # P00273  30,10,29,13 (1-based, unsorted) -> sorted 0-based
    assert pos(lab, "P00273", A.METAL_BINDING) == [9, 12, 28, 29]
    assert lab.instances["P00273"][A.METAL_BINDING] == [(9, 10), (12, 13), (28, 30)]
    assert lab.lengths["P00273"] == 37
    small = load_binding(DATA / "binding_residues_2.5_small_excerpt.txt", seqs, unknown_ids="skip")
    assert small.concepts == [A.SMALL_MOLECULE_BINDING]
    both = lab.merge(small)
    assert set(both.positions["Q9F1K9"]) == {A.METAL_BINDING, A.SMALL_MOLECULE_BINDING}
    assert both.skipped["annotations of proteins not in the sequence set"] == 2
    # without sequences, nothing to check against: every line is taken
    assert len(load_binding(path)) == 4


def test_binding_concept_argument_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "residues.txt"
    p.write_text("P1\t3,1,2\nP2\t\n")
    expect_error(lambda: load_binding(p), "cannot tell the ligand class")
    lab = load_binding(p, concept="nuclear")
    assert pos(lab, "P1", A.NUCLEIC_ACID_BINDING) == [0, 1, 2]
    assert lab.positions["P2"] == {}  # listed with no binding residue: annotated, all negatives
    assert load_binding(p, concept="PSC:0000241").concepts == [A.DNA_BINDING]
    cases = [
        ("P1\t1,x\n", 1, "position 'x'"),
        ("P1\t1,0\n", 1, "before the first residue"),
        ("P1\t1,2\nP2 3,4\n", 2, "expected 'ID<TAB>positions'"),
        ("P1\t1\nP1\t2\n", 2, "listed twice"),
        ("P1\t1,5\n", 1, "past the sequence end (4 residues)"),
    ]
    for text, line, fragment in cases:
        p.write_text(text)
        expect_error(lambda: load_binding(p, {"P1": "MKLV", "P2": "MKLV"}, concept="metal"), "residues.txt",
                     f"line {line}", fragment)


# ===================================================================================================== GO
def test_gaf_with_ontology(slim: Ontology) -> None:
    lab = load_gaf(DATA / "go_annotations.gaf", slim)
    assert isinstance(lab, ProteinLabels)
    # P1: IDA plasma membrane kept, IEA GTPase dropped; P2: NOT line excluded; P3: alt id GO:0005904 resolved;
    # P4: only ISS -> absent; P5: two taxa, kept
    assert lab.labels == {
        "P1": {"GO:0005886", "GO:0005575"},
        "P2": {"GO:0005615", "GO:0005575"},
        "P3": {"GO:0005886", "GO:0005575", "GO:0004871", "GO:0003674"},
        "P5": {"GO:0003924", "GO:0003674"},
    }
    assert lab.skipped == {
        "annotations with an evidence code not selected": 2,
        "annotations with a NOT qualifier": 1,
    }
    assert lab.names["GO:0005886"] == "plasma membrane"
    with_part_of = load_gaf(DATA / "go_annotations.gaf", slim, relations=("is_a", "part_of"))
    assert "GO:0005623" in with_part_of.labels["P1"]  # plasma membrane part_of cell
    everything = load_gaf(DATA / "go_annotations.gaf", slim, evidence=None)
    assert "GO:0003924" in everything.labels["P1"] and "P4" in everything.labels
    direct = load_gaf(DATA / "go_annotations.gaf", slim, propagate=False)
    assert direct.labels["P3"] == {"GO:0005886", "GO:0004871"}
    m = lab.matrix(["P3", "P9"], ["GO:0005886", "GO:0003924"])
    assert m.tolist() == [[True, False], [False, False]]
    only_c = load_gaf(DATA / "go_annotations.gaf", slim, aspects=["C"], propagate=False)
    assert only_c.labels == {"P1": {"GO:0005886"}, "P2": {"GO:0005615"}, "P3": {"GO:0005886"}}


def test_gaf_without_ontology_and_unknown_terms(tmp_path: Path, slim: Ontology) -> None:
    raw = load_gaf(DATA / "go_annotations.gaf")
    assert raw.labels["P3"] == {"GO:0005904", "GO:0004871"}  # no ontology: ids as written, no propagation
    expect_error(lambda: load_gaf(DATA / "go_annotations.gaf", slim, protein_ids=["P1", "P2"]), "line 7", "'P3'")
    sub = load_gaf(DATA / "go_annotations.gaf", slim, protein_ids=["P1"], unknown_ids="skip")
    assert list(sub.labels) == ["P1"]
    p = tmp_path / "one.gaf"
    line = (DATA / "go_annotations.gaf").read_text().splitlines()[2].replace("GO:0005886", "GO:0009999")
    p.write_text(line + "\n")
    expect_error(lambda: load_gaf(p, slim), "one.gaf", "line 1", "GO:0009999 is not in the ontology")
    assert load_gaf(p, slim, unknown_terms="skip").skipped == {"annotations to GO terms not in the ontology": 1}


def test_gaf_malformed_lines() -> None:
    path = DATA / "goa_human_illegal_excerpt.gaf"
    assert infer_format(path) == "gaf"
    expect_error(lambda: load_gaf(path, evidence=None), "goa_human_illegal_excerpt.gaf", "line 14",
                 "column 2 (DB object id) is empty")
    lab = load_gaf(path, evidence=None, malformed="skip")
    assert lab.skipped == {"malformed GAF lines": 2}
    assert sorted(lab.labels) == ["A0A024R161", "A0A075B6H7", "A0A075B6H8"]  # nothing from the two bad lines
    assert "A0A075B6J1" not in lab.labels


def test_gaf_illegal_taxon(tmp_path: Path) -> None:
    lines = (DATA / "goa_human_illegal_excerpt.gaf").read_text().splitlines()
    p = tmp_path / "taxon.gaf"
    p.write_text("\n".join(lines[:13] + lines[14:]) + "\n")  # without the empty-id line
    expect_error(lambda: load_gaf(p, evidence=None), "taxon.gaf", "line 14", "column 13 (taxon) 'NCBITaxon:'")


@pytest.mark.parametrize(
    "column, fragment",
    [(4, "column 5 (GO id)"), (8, "column 9 (aspect)"), (13, "column 14 (date)"), (6, "column 7 (evidence code)")],
)
def test_gaf_column_checks(tmp_path: Path, column: int, fragment: str) -> None:
    fields = (DATA / "go_annotations.gaf").read_text().splitlines()[2].split("\t")
    fields[column] = "bogus value"
    p = tmp_path / "x.gaf"
    p.write_text("!gaf-version: 2.2\n" + "\t".join(fields) + "\n")
    expect_error(lambda: load_gaf(p), "x.gaf", "line 2", fragment)
    p.write_text("\t".join(fields[:10]) + "\n")
    expect_error(lambda: load_gaf(p), "line 1", "10 tab-separated columns")


def test_go_tsv(tmp_path: Path, slim: Ontology) -> None:
    p = tmp_path / "go.tsv"
    p.write_text("# comment\nP1\tGO:0005886,GO:0003924\nP2\tGO:0005904\nP3\t\nP1\tGO:0005615\n")
    assert infer_format(p) == "go-tsv"
    lab = load_go_tsv(p, slim, propagate=False)
    assert lab.labels == {"P1": {"GO:0005886", "GO:0003924", "GO:0005615"}, "P2": {"GO:0005886"}, "P3": set()}
    prop = load_annotations(p, "go-tsv", ontology=slim)
    assert prop.labels["P2"] == {"GO:0005886", "GO:0005575"}
    # UniProt-style column with names, picked by header name
    p.write_text("Entry\tGene ontology (cellular component)\nQ1\tplasma membrane [GO:0005886]; cell [GO:0005623]\n")
    lab = load_go_tsv(p, slim, go_column="Gene ontology (cellular component)", propagate=False)
    assert lab.labels == {"Q1": {"GO:0005886", "GO:0005623"}}
    lab = load_go_tsv(p, propagate=False)  # header detected because its GO column holds no GO id
    assert lab.labels == {"Q1": {"GO:0005886", "GO:0005623"}}
    p.write_text("P1\tGO:0005886\nP2\tGO:0005886,membrane\n")
    expect_error(lambda: load_go_tsv(p), "go.tsv", "line 2", "not a list of GO ids")
    p.write_text("P1\tGO:0005886\nP2\tGO:0000001\n")
    expect_error(lambda: load_go_tsv(p, slim), "line 2", "GO:0000001 is not in the ontology")


# ========================================================================================== generic TSV
def test_generic_tsv_exact_and_names(tmp_path: Path, psc: Ontology) -> None:
    p = tmp_path / "labels.tsv"
    p.write_text(
        "id\tstart\tend\tconcept\n"
        "P1\t1\t3\tPSC:0000211\n"
        "P1\t10\t10\tzinc binding\n"
        "# comment\n"
        "P2\t5\t8\tMY:custom\tmy concept\n"
    )
    assert infer_format(p) == "generic-tsv"
    lab = load_generic_tsv(p, ontology=psc)
    assert pos(lab, "P1", A.ZINC_BINDING) == [0, 1, 2, 9]  # the name was mapped to its id
    assert lab.instances["P1"][A.ZINC_BINDING] == [(0, 3), (9, 10)]
    assert lab.instances["P2"]["MY:custom"] == [(4, 8)]
    assert lab.names == {A.ZINC_BINDING: "zinc binding", "MY:custom": "my concept"}
    plain = load_generic_tsv(p)  # without an ontology the name stays a (free-form) concept id
    assert "zinc binding" in plain.concepts


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("P1\t5\t3\tC", "start 5 > end 3"),
        ("P1\t0\t3\tC", "before the first residue"),
        ("P1\t3\t11\tC", "past the sequence end (10 residues)"),
        ("P1\ta\t3\tC", "must be integers"),
        ("P1\t1\t3", "got 3 fields"),
        ("P9\t1\t3\tC", "'P9' is not in the given sequences"),
        ("P1\t1\t3\t", "empty concept"),
    ],
)
def test_generic_tsv_errors(tmp_path: Path, line: str, fragment: str) -> None:
    p = tmp_path / "generic.tsv"
    p.write_text("#id\tstart\tend\tconcept\nP1\t1\t2\tC\n" + line + "\n")
    expect_error(lambda: load_generic_tsv(p, {"P1": "M" * 10}), "generic.tsv", "line 3", fragment)


@st.composite
def label_files(draw):
    """Proteins with non-overlapping, non-adjacent spans per concept (so each line is one maximal instance)."""
    n_prot = draw(st.integers(1, 4))
    proteins: dict[str, tuple[int, dict[str, list[tuple[int, int]]]]] = {}
    for i in range(n_prot):
        pid = draw(st.text(alphabet=string.ascii_letters + string.digits + "_|.-", min_size=1, max_size=8))
        if pid.lower() in ("id", "protein_id", "protein") or pid in proteins:
            continue
        length = draw(st.integers(1, 60))
        concepts: dict[str, list[tuple[int, int]]] = {}
        for c in draw(st.lists(st.sampled_from(["PSC:0000211", "PSC:0000101", "X:1"]), unique=True, max_size=3)):
            cuts = sorted(draw(st.sets(st.integers(0, length), max_size=8)))
            spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if b > a]
            # keep a gap between spans so the loader's instances equal the written lines
            spans = [s for k, s in enumerate(spans) if k == 0 or s[0] > spans[k - 1][1]]
            if spans:
                concepts[c] = spans
        proteins[pid] = (length, concepts)
    return proteins


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=label_files(), shuffle=st.randoms())
def test_generic_tsv_round_trip(tmp_path: Path, data, shuffle) -> None:
    rows = [
        f"{pid}\t{s + 1}\t{e}\t{c}"
        for pid, (_, concepts) in data.items()
        for c, spans in concepts.items()
        for s, e in spans
    ]
    shuffle.shuffle(rows)
    p = tmp_path / "rt.tsv"
    p.write_text("#id\tstart\tend\tconcept\n" + "".join(r + "\n" for r in rows))
    seqs = {pid: "A" * length for pid, (length, _) in data.items()}
    lab = load_generic_tsv(p, seqs)
    for pid, (length, concepts) in data.items():
        got = lab.positions.get(pid, {})
        assert set(got) == set(concepts)
        for c, spans in concepts.items():
            assert got[c].tolist() == [r for s, e in spans for r in range(s, e)]
            assert lab.instances[pid][c] == sorted(spans)
        if concepts:
            assert lab.lengths[pid] == length
    # and back out through the writer
    out = tmp_path / "rt_out.tsv"
    write_generic_tsv(lab, out)
    again = load_generic_tsv(out, seqs)
    for pid in lab.positions:
        assert {c: v.tolist() for c, v in again.positions[pid].items()} == {
            c: v.tolist() for c, v in lab.positions[pid].items()
        }
        assert again.instances[pid] == lab.instances[pid]


def test_write_generic_tsv_keeps_bond_residues(tmp_path: Path) -> None:
    lab = load_swissprot(DATA / "uniprot_synthetic.txt")
    out = tmp_path / "export.tsv"
    write_generic_tsv(lab, out)
    back = load_generic_tsv(out)
    for pid in lab.positions:
        for c, idx in lab.positions[pid].items():
            assert back.positions[pid][c].tolist() == idx.tolist()
    assert "Q00001\t3\t3\tPSC:0000313\tdisulfide bond" in out.read_text()


# ======================================================================================= labels / dispatch
def test_residue_labels_dense_merge_and_errors() -> None:
    b = ResidueLabelBuilder()
    b.add_span("P1", "X:a", 2, 5)
    b.add_residues("P1", "X:b", [0, 0, 7])
    b.touch("P2")
    lab = b.build(lengths={"P1": 8, "P2": 4})
    d = lab.dense("P1", 8, ["X:b", "X:a", "X:none"])
    assert d[:, 0].nonzero()[0].tolist() == [0, 7]
    assert d[:, 1].nonzero()[0].tolist() == [2, 3, 4]
    assert not d[:, 2].any()
    assert not lab.dense("P2", 4, ["X:a"]).any() and not lab.dense("P_unknown", 3, ["X:a"]).any()
    expect_error(lambda: lab.dense("P1", 9, ["X:a"]), "length 8")
    loose = ResidueLabels(concepts=["X:a"], positions={"P": {"X:a": np.array([5])}})
    expect_error(lambda: loose.dense("P", 5, ["X:a"]), "past the sequence end")
    other = ResidueLabelBuilder()
    other.add_span("P1", "X:a", 6, 8)
    merged = lab.merge(other.build(lengths={"P1": 8}))
    assert merged.positions["P1"]["X:a"].tolist() == [2, 3, 4, 6, 7]
    assert merged.instances["P1"]["X:a"] == [(2, 5), (6, 8)]
    expect_error(lambda: lab.merge(other.build(lengths={"P1": 9})), "length 8 in one source and 9")
    assert lab.restrict(["X:a"]).positions["P1"].keys() == {"X:a"}
    assert lab.residue_counts() == {"X:a": 3, "X:b": 2}


def test_protein_labels_propagate(slim: Ontology) -> None:
    pl = ProteinLabels(concepts=["GO:0005904"], labels={"P": {"GO:0005886"}, "Q": set()})
    prop = pl.propagate(slim)
    assert prop.labels == {"P": {"GO:0005886", "GO:0005575"}, "Q": set()}
    assert prop.names["GO:0005575"] == "cellular_component"
    assert prop.counts()["GO:0005575"] == 1
    merged = pl.merge(ProteinLabels(concepts=["GO:1"], labels={"Q": {"GO:1"}}))
    assert merged.labels["Q"] == {"GO:1"} and merged.concepts == ["GO:0005904", "GO:1"]


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("uniprot_O95832_trimmed.txt", "swissprot"),
        ("uniprot_P97881.xml", "uniprot-xml"),
        ("uniprot_export.tsv", "uniprot-tsv"),
        ("tmbed_excerpt.fasta", "tmbed"),
        ("binding_residues_2.5_small_excerpt.txt", "binding"),
        ("go_annotations.gaf", "gaf"),
    ],
)
def test_infer_format_and_dispatch(name: str, fmt: str, psc: Ontology, slim: Ontology) -> None:
    path = DATA / name
    assert infer_format(path) == fmt
    onto = slim if fmt == "gaf" else psc
    lab = load_annotations(path, ontology=onto)
    assert len(lab) >= 1
    if isinstance(lab, ResidueLabels):
        # propagated through the shipped ontology: everything reaches the root concept
        assert all(A.ROOT in per for per in lab.positions.values() if per)


def test_dispatch_errors(tmp_path: Path) -> None:
    expect_error(lambda: load_annotations(DATA / "tiny_el.obo"), "ontology (OBO), not an annotation file")
    expect_error(lambda: load_annotations(DATA / "go_annotations.gaf", "bed"), "unknown annotation format 'bed'")
    p = tmp_path / "mystery.txt"
    p.write_text("hello world\n")
    expect_error(lambda: infer_format(p), "mystery.txt", "cannot infer")
    q = tmp_path / "missing.txt"
    expect_error(lambda: load_binding(q, concept="metal"), "missing.txt", "cannot read")
    expect_error(lambda: load_binding(DATA / "binding_residues_2.5_metal_excerpt.txt", unknown_ids="maybe"),
                 "unknown_ids must be")
