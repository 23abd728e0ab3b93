"""export-structure: activations into B-factors (PDB and mmCIF), residue mapping by alignment, error messages."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from Bio.PDB import MMCIFParser, PDBParser
from Bio.PDB.MMCIF2Dict import MMCIF2Dict

from protsae_cli.call.concepts import call_segments
from protsae_cli.errors import EXIT_BAD_INPUT, InputError
from protsae_cli.io.results import ProteinResult
from protsae_cli.sae.config import ConceptEntry
from protsae_cli.report.structure import align_chain, export_structure
from protsae_cli.io.writers.h5 import H5Writer

DATA = Path(__file__).parents[1] / "data" / "structure"
PDB = DATA / "tiny.pdb"
CIF = DATA / "tiny.cif"
TEST_SEQUENCE = "MSTKLVAEGHWYRQMPDNFCIKSLAEGTRVHDWPQNYEKS"
CHAIN_A_START = 4          # chain A = TEST_SEQUENCE[3:33], author numbers 101..110, 110A, 111..
CHAIN_A_LEN = 30
D_SAE, K = 32, 4
PDB_TOL = 0.0051           # the PDB column holds two decimals (2.125 may print as 2.12)
CONCEPTS = [
    ConceptEntry(latent=3, concept_id="PSC:0001", name="helix cap", ontology_id="SO:0001114", threshold=0.5),
    ConceptEntry(latent=7, concept_id="PSC:0002", name="zinc site", ontology_id="GO:0008270", threshold=1.0),
    ConceptEntry(latent=9, concept_id="PSC:0002", name="zinc site", ontology_id="GO:0008270", threshold=1.0),
    ConceptEntry(latent=11, concept_id="PSC:0003", name="zinc finger", ontology_id="GO:0008270", threshold=0.5),
]


def activations(length: int) -> np.ndarray:
    """Dense [length, D_SAE] codes with known values (multiples of 1/8: exact in float16)."""
    dense = np.zeros((length, D_SAE), np.float32)
    for p in range(5, min(31, length + 1)):        # 1-based positions 5..30 on latent 3
        dense[p - 1, 3] = p / 8
    dense[9:15, 7] = 2.0                            # positions 10-15
    dense[12:20, 9] = 3.0                           # positions 13-20
    dense[np.arange(length), 20 + np.arange(length) % 5] = 0.25
    return dense


def to_topk(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = dense.shape[0]
    idx = np.full((rows, K), -1, np.int64)
    val = np.zeros((rows, K), np.float32)
    for r in range(rows):
        nz = np.flatnonzero(dense[r])
        order = nz[np.lexsort((nz, -dense[r, nz]))][:K]
        idx[r, :order.size], val[r, :order.size] = order, dense[r, order]
    return idx, val


def result(index: int, pid: str, seq: str, status: str = "ok", rows: int | None = None) -> ProteinResult:
    rows = len(seq) if rows is None else rows
    idx, val = to_topk(activations(len(seq))[:rows])
    return ProteinResult(index=index, id=pid, description=f"{pid} test", sequence=seq, status=status,
                         status_detail="", idx=idx, val=val, segments=call_segments(idx, val, CONCEPTS))


@pytest.fixture(scope="module")
def h5(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("struct") / "run.h5"
    other = "".join(np.random.default_rng(3).choice(list("ACDEFGHIKLMNPQRSTVWY"), len(TEST_SEQUENCE)))
    with H5Writer(path, {"plm_model": "tiny", "hook_point": "resid_post", "layer": 2}, CONCEPTS, D_SAE, K) as w:
        w.write(result(0, "P1", TEST_SEQUENCE))
        w.write(result(1, "dup", TEST_SEQUENCE))
        w.write(result(2, "dup", TEST_SEQUENCE))
        w.write(ProteinResult.without_codes(3, "bad", "", "", "invalid", "invalid residue 'J' at 7", K))
        w.write(result(4, "OTHER", other))
        w.write(result(5, "trunc", TEST_SEQUENCE, status="truncated", rows=20))
        w.write(result(6, "sp|Q9<&>\"x'", TEST_SEQUENCE))
    return path


def expected(latents: tuple[int, ...]) -> np.ndarray:
    return activations(len(TEST_SEQUENCE))[:, list(latents)].max(axis=1).astype(np.float16).astype(np.float32)


def chain_b(path: Path, chain: str = "A") -> list[tuple[tuple, str, float]]:
    """(residue id, resname, B of its CA or first atom) for every residue of a chain, in file order."""
    parser = MMCIFParser(QUIET=True) if path.suffix == ".cif" else PDBParser(QUIET=True)
    s = parser.get_structure("x", str(path))
    out = []
    for res in s[0][chain]:
        atoms = list(res.get_atoms())
        out.append((res.id, res.get_resname(), atoms[0].get_bfactor()))
        assert len({a.get_bfactor() for a in atoms}) == 1, "all atoms of a residue share its value"
    return out


def fasta_position(chain_index: int) -> int:
    return CHAIN_A_START + chain_index  # 1-based


def test_pdb_raw_bfactors_equal_activations(h5, tmp_path):
    out = tmp_path / "out.pdb"
    s = export_structure(h5, PDB, out, "helix cap", protein_id="P1", scale="raw")
    assert s.chain == "A" and s.identity == 1.0 and s.aligned == CHAIN_A_LEN
    want = expected((3,))
    residues = [r for r in chain_b(out) if r[1] not in ("HOH", "ZN")]
    assert len(residues) == CHAIN_A_LEN
    for i, (rid, resname, b) in enumerate(residues):
        assert b == pytest.approx(want[fasta_position(i) - 1], abs=PDB_TOL), (rid, resname)
    # Offset numbering + insertion code: 110A is the 11th chain residue = FASTA position 14 (Q).
    ids = [r[0] for r in residues]
    assert ids[0] == (" ", 101, " ") and ids[10] == (" ", 110, "A") and ids[11] == ("H_MSE", 111, " ")
    assert residues[10][2] == pytest.approx(14 / 8, abs=PDB_TOL)
    assert residues[11][2] == pytest.approx(15 / 8, abs=PDB_TOL)  # MSE counts as M at FASTA position 15
    hetero = [r for r in chain_b(out) if r[1] in ("HOH", "ZN")]
    assert len(hetero) == 3 and all(b == 0 for _, _, b in hetero)
    assert all(b == 0 for _, _, b in chain_b(out, "B"))
    # Nothing but columns 61-66 of ATOM/HETATM records changed.
    before, after = PDB.read_text().splitlines(), out.read_text().splitlines()
    assert len(before) == len(after)
    for x, y in zip(before, after):
        if x.startswith(("ATOM", "HETATM")):
            assert x[:60] == y[:60] and x[66:] == y[66:]
        else:
            assert x == y  # HEADER, REMARK, ANISOU, TER, CONECT, END untouched


def test_scale_max_is_percent_of_protein_maximum(h5, tmp_path):
    out = tmp_path / "out.pdb"
    s = export_structure(h5, PDB, out, "PSC:0001", protein_id="P1")
    assert s.scale == "max"
    want = expected((3,))
    bs = [b for _, name, b in chain_b(out) if name not in ("HOH", "ZN")]
    assert max(bs) == pytest.approx(100.0)
    for i, b in enumerate(bs):
        assert b == pytest.approx(100 * want[fasta_position(i) - 1] / want.max(), abs=0.01)


def test_concept_on_two_latents_takes_the_maximum(h5, tmp_path):
    out = tmp_path / "out.pdb"
    s = export_structure(h5, PDB, out, "PSC:0002", protein_id="P1", scale="raw")
    assert s.concept.latents == (7, 9)
    want = expected((7, 9))
    bs = [b for _, name, b in chain_b(out) if name not in ("HOH", "ZN")]
    assert bs == pytest.approx([want[fasta_position(i) - 1] for i in range(CHAIN_A_LEN)], abs=PDB_TOL)
    assert max(bs) == pytest.approx(3.0)


def test_latent_spec_and_odd_protein_id(h5, tmp_path):
    out = tmp_path / "out.pdb"
    s = export_structure(h5, PDB, out, "latent:20", protein_id="sp|Q9<&>\"x'", scale="raw")
    assert s.concept.latents == (20,) and s.protein_index == 6
    want = activations(len(TEST_SEQUENCE))[:, 20]
    bs = [b for _, name, b in chain_b(out) if name not in ("HOH", "ZN")]
    assert bs == pytest.approx([want[fasta_position(i) - 1] for i in range(CHAIN_A_LEN)], abs=PDB_TOL)


def test_mmcif_round_trip_keeps_other_categories(h5, tmp_path):
    out = tmp_path / "out.cif"
    export_structure(h5, CIF, out, "helix cap", protein_id="P1", scale="raw")
    want = expected((3,))
    residues = [r for r in chain_b(out) if r[1] not in ("HOH", "ZN")]
    assert [r[0] for r in residues][10] == (" ", 110, "A")
    for i, (_, _, b) in enumerate(residues):
        assert b == pytest.approx(want[fasta_position(i) - 1], abs=1e-4)
    d = MMCIF2Dict(str(out))
    assert d["_struct.title"] == ["hand-made protsae test model"]
    assert d["_software.name"] == ["protsae-tests"]
    src = MMCIF2Dict(str(CIF))
    for key in ("_atom_site.Cartn_x", "_atom_site.auth_seq_id", "_atom_site.pdbx_PDB_ins_code",
                "_atom_site.label_comp_id"):
        assert d[key] == src[key]


@pytest.mark.parametrize("src,dst", [(PDB, "out.cif"), (CIF, "out.pdb")])
def test_format_conversion(h5, tmp_path, src, dst):
    out = tmp_path / dst
    export_structure(h5, src, out, "helix cap", protein_id="P1", scale="raw")
    want = expected((3,))
    residues = [r for r in chain_b(out) if r[1] not in ("HOH", "ZN")]
    assert len(residues) == CHAIN_A_LEN
    for i, (_, _, b) in enumerate(residues):
        assert b == pytest.approx(want[fasta_position(i) - 1], abs=PDB_TOL)


def test_gzipped_input_and_output(h5, tmp_path):
    gz = tmp_path / "model.pdb.gz"
    with gzip.open(gz, "wb") as fh:
        fh.write(PDB.read_bytes())
    out = tmp_path / "out.pdb.gz"
    export_structure(h5, gz, out, "helix cap", protein_id="P1")
    plain = tmp_path / "plain.pdb"
    plain.write_bytes(gzip.decompress(out.read_bytes()))
    assert max(b for _, _, b in chain_b(plain)) == pytest.approx(100.0)


def test_truncated_protein_tail_gets_zero(h5, tmp_path):
    out = tmp_path / "out.pdb"
    s = export_structure(h5, PDB, out, "helix cap", protein_id="trunc", scale="raw")
    assert any("truncated" in w for w in s.warnings)
    bs = [b for _, name, b in chain_b(out) if name not in ("HOH", "ZN")]
    for i, b in enumerate(bs):
        pos = fasta_position(i)
        assert b == (pytest.approx(pos / 8, abs=PDB_TOL) if 5 <= pos <= 20 else 0.0)
    assert s.mapped == 20 - CHAIN_A_START + 1


def test_defattr_and_pml(h5, tmp_path):
    out, defattr, pml = tmp_path / "out.pdb", tmp_path / "out.defattr", tmp_path / "color.pml"
    export_structure(h5, PDB, out, "zinc site", protein_id="P1", scale="raw", defattr=defattr, pml=pml)
    lines = defattr.read_text().splitlines()
    assert "attribute: protsae_PSC_0002" in lines and "recipient: residues" in lines
    data = dict(line.strip().split("\t") for line in lines if line.startswith("\t"))
    assert len(data) == CHAIN_A_LEN
    assert float(data["/A:109"]) == pytest.approx(2.0)     # FASTA position 12: latent 7 only
    assert float(data["/A:110A"]) == pytest.approx(3.0)    # position 14: max(latent 7 = 2, latent 9 = 3)
    text = pml.read_text()
    assert "load out.pdb, out" in text and "spectrum b, white_red, out and chain A and polymer" in text
    assert "maximum=3" in text


def test_chain_choice_and_missing_chain(h5, tmp_path):
    out = tmp_path / "out.pdb"
    with pytest.raises(InputError, match=r"chain 'C' not found.*protein chains: A, B"):
        export_structure(h5, PDB, out, "helix cap", protein_id="P1", chain="C")
    with pytest.raises(InputError, match=r"chain B (does not match|shares no aligned residues with) protein 'P1'"):
        export_structure(h5, PDB, out, "helix cap", protein_id="P1", chain="B")
    assert not out.exists()


def test_low_identity_refused_unless_forced(h5, tmp_path):
    out = tmp_path / "out.pdb"
    with pytest.raises(InputError, match=r"protein 'OTHER' \(input index 4\).*identical.*--force"):
        export_structure(h5, PDB, out, "helix cap", protein_id="OTHER")
    assert not out.exists()
    s = export_structure(h5, PDB, out, "helix cap", protein_id="OTHER", force=True)
    assert s.identity < 0.9 and any("forced" in w for w in s.warnings) and out.exists()


def test_protein_errors(h5, tmp_path):
    out = tmp_path / "out.pdb"
    with pytest.raises(InputError, match=r"protein 'P2' is not in this file; close ids: 'P1'"):
        export_structure(h5, PDB, out, "helix cap", protein_id="P2")
    with pytest.raises(InputError, match=r"'dup' occurs 2 times; pick one with --index: --index 1 .*--index 2"):
        export_structure(h5, PDB, out, "helix cap", protein_id="dup")
    s = export_structure(h5, PDB, out, "helix cap", protein_id="dup", index=2)
    assert s.protein_index == 2
    with pytest.raises(InputError, match=r"protein 'bad' \(input index 3\) has status invalid.*residue 'J'"):
        export_structure(h5, PDB, out, "helix cap", protein_id="bad")
    with pytest.raises(InputError, match=r"input index 1 is protein 'dup', not 'P1'"):
        export_structure(h5, PDB, out, "helix cap", protein_id="P1", index=1)


def test_concept_errors(h5, tmp_path):
    out = tmp_path / "out.pdb"
    with pytest.raises(InputError, match=r"concept 'zinc sit' .*did you mean 'zinc site'"):
        export_structure(h5, PDB, out, "zinc sit", protein_id="P1")
    with pytest.raises(InputError, match=r"'GO:0008270' is ambiguous.*'PSC:0002', 'PSC:0003'"):
        export_structure(h5, PDB, out, "GO:0008270", protein_id="P1")
    with pytest.raises(InputError, match=r"latent 99 is out of range"):
        export_structure(h5, PDB, out, "latent:99", protein_id="P1")
    s = export_structure(h5, PDB, out, "SO:0001114", protein_id="P1")
    assert s.concept.latents == (3,)


def test_structure_file_errors(h5, tmp_path):
    with pytest.raises(InputError, match="structure file not found"):
        export_structure(h5, tmp_path / "nope.pdb", tmp_path / "o.pdb", "helix cap", protein_id="P1")
    with pytest.raises(InputError, match="refusing to overwrite the input"):
        copy = tmp_path / "m.pdb"
        shutil.copy(PDB, copy)
        export_structure(h5, copy, copy, "helix cap", protein_id="P1")
    empty = tmp_path / "empty.pdb"
    empty.write_text("HEADER    NOTHING\nEND\n")
    with pytest.raises(InputError, match="no models|no protein chain"):
        export_structure(h5, empty, tmp_path / "o.pdb", "helix cap", protein_id="P1")


def test_pdb_lines_without_bfactor_columns_and_crlf(h5, tmp_path):
    short = tmp_path / "short.pdb"
    lines = [line[:54] if line.startswith(("ATOM", "HETATM")) else line for line in PDB.read_text().splitlines()]
    short.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    out = tmp_path / "out.pdb"
    export_structure(h5, short, out, "helix cap", protein_id="P1", scale="raw")
    raw = out.read_bytes()
    assert raw.count(b"\r\n") == len(lines) and b"\n" not in raw.replace(b"\r\n", b"")
    want = expected((3,))
    bs = [b for _, name, b in chain_b(out) if name not in ("HOH", "ZN")]
    assert bs == pytest.approx([want[fasta_position(i) - 1] for i in range(CHAIN_A_LEN)], abs=PDB_TOL)


def test_raw_values_too_wide_for_pdb(tmp_path):
    path = tmp_path / "big.h5"
    dense = np.zeros((len(TEST_SEQUENCE), D_SAE), np.float32)
    dense[:, 3] = 2048.0
    idx, val = to_topk(dense)
    with H5Writer(path, {}, CONCEPTS, D_SAE, K) as w:
        w.write(ProteinResult(index=0, id="P1", description="", sequence=TEST_SEQUENCE, status="ok",
                              status_detail="", idx=idx, val=val))
    with pytest.raises(InputError, match="do not fit the PDB B-factor column"):
        export_structure(path, PDB, tmp_path / "o.pdb", "helix cap", protein_id="P1", scale="raw")
    export_structure(path, PDB, tmp_path / "o.cif", "helix cap", protein_id="P1", scale="raw")


def test_mmcif_atom_site_columns_of_different_lengths_are_bad_input():
    """A loop whose value count is not a multiple of its columns leaves MMCIF2Dict's columns uneven: the rewrite
    pairs them row by row, so that is refused as malformed input (not a ValueError, not values on wrong atoms)."""
    import io

    from protsae_cli.report.structure import rewrite_mmcif

    text = ("data_x\nloop_\n_atom_site.auth_asym_id\n_atom_site.auth_seq_id\n_atom_site.label_comp_id\n"
            "_atom_site.B_iso_or_equiv\nA 1 ALA 5.0\nA 2 GLY 5.0\nA\n")
    with pytest.raises(InputError, match=r"_atom_site columns have different lengths \(auth_asym_id 3, "
                                         r"auth_seq_id 2, label_comp_id 2"):
        rewrite_mmcif(text, {}, io.StringIO())
    out = io.StringIO()
    rewrite_mmcif(text.removesuffix("A\n"), {("A", 2, "", "GLY"): 1.5}, out)
    assert MMCIF2Dict(io.StringIO(out.getvalue()))["_atom_site.B_iso_or_equiv"] == ["0.0000", "1.5000"]


def test_alignment_handles_gaps_and_offsets():
    seq = "MSTKLVAEGHWYRQMPDNFCIKSLAEGTRVHDWPQNYEKS"
    chain = "KLVAEGHW" + "RQMPDNF"   # residue Y (position 12) missing from the model
    aln = align_chain(chain, seq)
    assert aln.identical == aln.aligned == len(chain)
    assert aln.positions[:8] == list(range(3, 11)) and aln.positions[8] == 12
    tagged = "HHHHHH" + seq[10:30]      # expression tag not in the FASTA
    aln = align_chain(tagged, seq)
    assert aln.positions == [-1] * 5 + list(range(9, 30))   # the tag's last H happens to match H10
    assert aln.identity == pytest.approx(21 / 26)   # the rest of the tag counts against identity: --force
    prefix = align_chain(seq[5:30], seq[:20], open_end=True)   # truncated protein: tail unknown, not different
    assert prefix.identity == 1.0 and prefix.compared == 15
    unrelated = align_chain("GGWWPPRR", seq)
    assert unrelated.identity < 0.5


def test_cli(h5, tmp_path):
    from typer.testing import CliRunner

    from protsae_cli.cli.app import build_app

    out = tmp_path / "cli.pdb"
    res = CliRunner().invoke(build_app(), ["export-structure", "--h5", str(h5), "--protein", "P1", "--concept",
                                           "helix cap", "--pdb", str(PDB), "-o", str(out), "--chain", "A",
                                           "--scale", "raw", "--pml", str(tmp_path / "c.pml")])
    assert res.exit_code == 0, res.output
    assert out.exists() and (tmp_path / "c.pml").exists()
    assert "100.0% identity" in res.output and "chain A" in res.output

    res = CliRunner().invoke(build_app(), ["export-structure", "--h5", str(h5), "--protein", "P1", "--concept",
                                           "nonsense", "--pdb", str(PDB), "-o", str(out)])
    assert isinstance(res.exception, InputError)


def test_main_exit_code(h5, tmp_path, capsys):
    from protsae_cli.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(["export-structure", "--h5", str(h5), "--protein", "dup", "--concept", "helix cap", "--pdb",
              str(PDB), "-o", str(tmp_path / "o.pdb")])
    assert e.value.code == EXIT_BAD_INPUT
    assert "--index" in capsys.readouterr().err


def test_h5_is_positional_as_in_report_and_still_an_option(tmp_path):
    """`protsae export-structure H5` like `protsae report H5`; `--h5 H5` (older scripts) still works; both or
    neither is a usage error (exit 2)."""
    from typer.testing import CliRunner

    from protsae_cli.cli.app import build_app

    rest = ["--protein", "P1", "--concept", "c", "--pdb", str(tmp_path / "x.pdb"), "-o", str(tmp_path / "o.pdb")]
    app = build_app()
    neither = CliRunner().invoke(app, ["export-structure", *rest])
    both = CliRunner().invoke(app, ["export-structure", "a.h5", "--h5", "b.h5", *rest])
    assert neither.exit_code == 2 and both.exit_code == 2
    assert "give the annotation file once" in neither.output + str(neither.stderr_bytes or b"")
    for argv in (["export-structure", str(tmp_path / "missing.h5"), *rest],
                 ["export-structure", "--h5", str(tmp_path / "missing.h5"), *rest]):
        res = CliRunner().invoke(app, argv)
        assert res.exit_code != 2, res.output  # parsed: fails later, on the missing file
