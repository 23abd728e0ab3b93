"""Regenerate the tiny test structures (run from the repository root; output is committed).

tiny.pdb: chain A is residues 4-33 of TEST_SEQUENCE with author numbering starting at 101, an insertion code
(110A) and a selenomethionine (MSE, HETATM) in the chain; chain B is an unrelated 8-mer; a zinc ion, two
waters, an ANISOU record, REMARKs and a CONECT record that must survive untouched. tiny.cif is the same model
as mmCIF (Bio.PDB's writer) plus extra categories that must survive.
Coordinates are a straight idealised backbone: nothing here is meant to be physically meaningful.
"""

from __future__ import annotations

import io
from pathlib import Path

from Bio.Data.PDBData import protein_letters_1to3

HERE = Path(__file__).parent
TEST_SEQUENCE = "MSTKLVAEGHWYRQMPDNFCIKSLAEGTRVHDWPQNYEKS"
CHAIN_A_RANGE = (4, 33)          # 1-based inclusive positions of TEST_SEQUENCE present in chain A
CHAIN_B_SEQUENCE = "GGWWPPRR"


def author_numbers(n: int) -> list[tuple[int, str]]:
    """101..110, 110A, 111, ...: an insertion code after residue 110."""
    out: list[tuple[int, str]] = []
    num = 101
    for i in range(n):
        if out and out[-1] == (110, ""):
            out.append((110, "A"))
            continue
        out.append((num, ""))
        num += 1
    return out


def atom_line(record: str, serial: int, name: str, resname: str, chain: str, resseq: int, icode: str,
              xyz: tuple[float, float, float], b: float, element: str) -> str:
    padded = f" {name:<3}" if len(name) < 4 else name
    return (f"{record:<6}{serial:>5} {padded:<4} {resname:>3} {chain}{resseq:>4}{icode:1}   "
            f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}{1.0:6.2f}{b:6.2f}          {element:>2}\n")


def residue_atoms(letter: str) -> list[tuple[str, tuple[float, float, float], str]]:
    atoms = [("N", (-1.2, 0.5, 0.0), "N"), ("CA", (0.0, 0.0, 0.0), "C"), ("C", (1.2, 0.5, 0.0), "C"),
             ("O", (1.2, 1.7, 0.0), "O")]
    if letter != "G":
        atoms.append(("CB", (0.0, -1.0, 1.2), "C"))
    return atoms


def build_pdb() -> str:
    lines = ["HEADER    TEST STRUCTURE                          01-JAN-24   0TST              \n",
             "REMARK   1 HAND-MADE FOR PROTSAE TESTS; B-FACTORS ARE 30.00 (A) AND 40.00 (B)\n"]
    serial = 1
    anisou_done = False
    a0, a1 = CHAIN_A_RANGE
    chain_a = TEST_SEQUENCE[a0 - 1:a1]
    for i, (letter, (num, icode)) in enumerate(zip(chain_a, author_numbers(len(chain_a)))):
        resname = "MSE" if letter == "M" else protein_letters_1to3[letter].upper()
        record = "HETATM" if resname == "MSE" else "ATOM"
        for name, (dx, dy, dz), element in residue_atoms(letter):
            lines.append(atom_line(record, serial, name, resname, "A", num, icode, (3.8 * i + dx, dy, dz), 30.0,
                                   element))
            if not anisou_done:
                lines.append(f"ANISOU{serial:>5}  N   {resname:>3} A{num:>4}{icode:1}  "
                             "  2406   1892  -1614    198   -519   -328       N\n")
                anisou_done = True
            serial += 1
    lines.append(f"TER   {serial:>5}      {resname:>3} A{num:>4}{icode:1}\n")
    serial += 1
    for i, letter in enumerate(CHAIN_B_SEQUENCE):
        resname = protein_letters_1to3[letter].upper()
        for name, (dx, dy, dz), element in residue_atoms(letter):
            lines.append(atom_line("ATOM", serial, name, resname, "B", i + 1, "", (3.8 * i + dx, 10 + dy, dz),
                                   40.0, element))
            serial += 1
    lines.append(f"TER   {serial:>5}      {resname:>3} B{len(CHAIN_B_SEQUENCE):>4}\n")
    serial += 1
    zn = serial
    lines.append(atom_line("HETATM", serial, "ZN", " ZN", "A", 201, "", (5.0, 5.0, 5.0), 25.0, "ZN"))
    serial += 1
    for w in range(2):
        lines.append(atom_line("HETATM", serial, "O", "HOH", "A", 301 + w, "", (w * 3.0, -6.0, 0.0), 35.0, "O"))
        serial += 1
    lines.append(f"CONECT{zn:>5}{2:>5}\n")
    lines.append("END\n")
    return "".join(lines)


def build_cif(pdb_text: str) -> str:
    from Bio.PDB import PDBParser
    from Bio.PDB.mmcifio import MMCIFIO

    structure = PDBParser(QUIET=True).get_structure("0TST", io.StringIO(pdb_text))
    buf = io.StringIO()
    writer = MMCIFIO()
    writer.set_structure(structure)
    writer.save(buf)
    text = buf.getvalue()
    head, rest = text.split("\n", 1)
    extra = ("#\n_struct.entry_id 0TST\n_struct.title 'hand-made protsae test model'\n"
             "#\n_software.name protsae-tests\n")
    return f"{head}\n{extra}{rest}"


if __name__ == "__main__":
    pdb = build_pdb()
    (HERE / "tiny.pdb").write_text(pdb)
    (HERE / "tiny.cif").write_text(build_cif(pdb))
    print("wrote", HERE / "tiny.pdb", HERE / "tiny.cif")
