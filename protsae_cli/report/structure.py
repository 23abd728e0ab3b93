"""Put a concept's per-residue activation into a structure's B-factor column (PDB or mmCIF).

Structural biologists already colour AlphaFold models by pLDDT, which lives in the B-factor column, so writing
activations there lets them use the same one-liners (PyMOL ``spectrum b``, ChimeraX ``color bfactor``) with no
plugin. Optional ChimeraX ``.defattr`` and PyMOL ``.pml`` files carry the same numbers for people who prefer an
attribute or a ready-made colouring script.

Choices and why:

* **Residue mapping by alignment, not by number.** FASTA position *i* and PDB residue number *i* agree only for
  predicted models; experimental structures start at arbitrary numbers, skip disordered loops, carry insertion
  codes (52, 52A, 53) and expression tags. The chain's sequence (read from its residues, in file order) is
  aligned globally to the annotated sequence with free end gaps, so a structure of one domain maps onto the
  full-length protein. Identity is the fraction of the chain's residues that are identical to the protein
  residue they align to: counting over all chain residues (not only aligned pairs) means a handful of lucky
  matches cannot pass for a match. Below ``min_identity`` the export is refused (wrong protein or wrong chain
  is the usual cause; long expression tags the legitimate one, hence ``--force``/``--min-identity``).
* **Everything else untouched.** When input and output formats agree the file is edited in place, line by line
  for PDB (only columns 61-66 of ATOM/HETATM records change; HEADER, REMARK, ANISOU, CONECT stay byte-identical)
  and category by category for mmCIF (only ``_atom_site.B_iso_or_equiv`` changes). Converting between PDB and
  mmCIF goes through Bio.PDB's writers, which keep coordinates but not the other records.
* **Atoms with no activation get 0:** other chains, ligands, waters, residues that did not align and the
  unencoded tail of a truncated protein. A leftover crystallographic B-factor next to activations would be read
  as an activation.
* **Scale.** ``max`` (default) writes 100 x activation / the protein's maximum for the concept, the 0-100 range of
  pLDDT, so default palettes spread and two decimals keep ample precision. ``raw`` writes the activation itself,
  comparable across proteins.
"""

from __future__ import annotations

import difflib
import gzip
import io
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from protsae_cli.errors import InputError
from protsae_cli.report.html import ConceptRow, read_concepts

if TYPE_CHECKING:
    from Bio.PDB.Chain import Chain
    from Bio.PDB.Residue import Residue
    from Bio.PDB.Structure import Structure

    from protsae_cli.io.writers.h5 import H5Annotations

SCALES = ("max", "raw")
MIN_IDENTITY = 0.9
PDB_BFACTOR_MAX = 999.99  # the widest number PDB columns 61-66 (%6.2f) can hold
_MMCIF_SUFFIXES = (".cif", ".mmcif")

# (chain id, residue number, insertion code, residue name): how both a Bio.PDB residue and a PDB/mmCIF atom
# line are keyed, so the value computed on the parsed structure finds its way back to the text.
ResidueKey = tuple[str, int, str, str]


@dataclass
class ConceptSelection:
    """What ``--concept`` resolved to: a label for messages/files and the latent(s) whose maximum is written."""

    spec: str
    label: str
    latents: tuple[int, ...]
    entries: list[ConceptRow] = field(default_factory=list)
    by_latent: bool = False     # named as latent:N rather than through a concept


@dataclass
class ResidueValue:
    """One polymer residue of the chosen chain: its PDB identity, the FASTA position it aligned to, its value."""

    chain: str
    number: int
    icode: str
    resname: str
    letter: str
    position: int | None        # 1-based position in the annotated sequence; None when unaligned
    activation: float | None    # None when unaligned or beyond the encoded (truncated) residues
    bfactor: float

    @property
    def key(self) -> ResidueKey:
        return (self.chain, self.number, self.icode, self.resname)

    @property
    def label(self) -> str:
        """Author numbering with insertion code, as PyMOL's ``resi`` and ChimeraX's ``:`` spell it (52A)."""
        return f"{self.number}{self.icode}"


@dataclass
class ExportSummary:
    protein_id: str
    protein_index: int
    protein_status: str
    concept: ConceptSelection
    chain: str
    identity: float
    aligned: int
    identical: int
    chain_residues: int
    encoded_residues: int
    max_activation: float
    scale: str
    output: Path
    residues: list[ResidueValue]
    defattr: Path | None = None
    pml: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def mapped(self) -> int:
        return sum(1 for r in self.residues if r.activation is not None)


# ---------------------------------------------------------------------------------------------------------
# Protein and concept lookup
# ---------------------------------------------------------------------------------------------------------

def select_protein(ann: H5Annotations, protein_id: str | None, index: int | None) -> int:
    """File position of the protein named by id and/or input ordinal, with errors a user can act on."""
    if protein_id is None and index is None:
        raise InputError("name the protein with --protein ID (or --index N, its 0-based input ordinal)")
    ordinals = ann.proteins["index"]
    if index is not None:
        hits = [int(p) for p in np.flatnonzero(ordinals == index)]
        if not hits:
            raise InputError(f"{ann.path}: no protein with input index {index} "
                             f"(the file holds indices {int(ordinals.min()) if len(ordinals) else '-'}"
                             f"..{int(ordinals.max()) if len(ordinals) else '-'})")
        pos = hits[0]
        if protein_id is not None and ann.proteins["id"][pos] != protein_id:
            raise InputError(f"{ann.path}: input index {index} is protein {ann.proteins['id'][pos]!r}, "
                             f"not {protein_id!r}")
        return pos
    assert protein_id is not None
    hits = ann.find(protein_id)
    if not hits:
        ids = [str(x) for x in ann.proteins["id"][:200000]]
        close = difflib.get_close_matches(protein_id, ids, n=5, cutoff=0.5)
        hint = f"; close ids: {', '.join(repr(c) for c in close)}" if close else ""
        raise InputError(f"{ann.path}: protein {protein_id!r} is not in this file{hint}")
    if len(hits) > 1:
        listing = "; ".join(f"--index {int(ordinals[p])} ({ann.proteins['description'][p] or 'no description'},"
                            f" {int(ann.proteins['length'][p])} aa)" for p in hits[:10])
        raise InputError(f"{ann.path}: protein id {protein_id!r} occurs {len(hits)} times; pick one with "
                         f"--index: {listing}")
    return hits[0]


_LATENT_RE = re.compile(r"^(?:latent|l)[:#_ ]?(\d+)$", re.IGNORECASE)


def resolve_concept(concepts: Sequence[ConceptRow], spec: str, d_sae: int) -> ConceptSelection:
    """Map ``--concept`` to latents: ``latent:N``, then a concept id, then a name, then an ontology id.

    A concept bound to several latents (same concept id on more than one latent) resolves to all of them and
    the written value is their per-residue maximum. A name or ontology id shared by different concept ids is
    ambiguous and refused, listing the ids to choose from.
    """
    spec = spec.strip()
    m = _LATENT_RE.match(spec)
    if m:
        latent = int(m.group(1))
        if not 0 <= latent < d_sae:
            raise InputError(f"concept {spec!r}: latent {latent} is out of range (the SAE has {d_sae} latents, "
                             f"0..{d_sae - 1})")
        bound = [c for c in concepts if c.latent == latent]
        names = ", ".join(sorted({f"{c.concept_id} {c.name}".strip() for c in bound}))
        label = f"latent {latent}" + (f" ({names})" if names else "")
        return ConceptSelection(spec=spec, label=label, latents=(latent,), entries=bound, by_latent=True)

    def pick(field_name: str, fold: bool) -> list[ConceptRow]:
        want = spec.casefold() if fold else spec
        return [c for c in concepts
                if (getattr(c, field_name).casefold() if fold else getattr(c, field_name)) == want
                and getattr(c, field_name)]

    for field_name, fold in (("concept_id", False), ("name", False), ("name", True), ("ontology_id", False),
                             ("concept_id", True)):
        hits = pick(field_name, fold)
        if not hits:
            continue
        ids = sorted({c.concept_id for c in hits})
        if len(ids) > 1:
            raise InputError(f"concept {spec!r} is ambiguous: it matches the {field_name.replace('_', ' ')} of "
                             f"{', '.join(repr(i) for i in ids)}; pass one of these concept ids, or latent:N")
        latents = tuple(sorted({c.latent for c in hits}))
        first = hits[0]
        label = f"{first.concept_id} {first.name}".strip() if first.name != first.concept_id else first.concept_id
        return ConceptSelection(spec=spec, label=label, latents=latents, entries=hits)

    if not concepts:
        raise InputError(f"concept {spec!r}: this annotation file has no concepts bound to latents; "
                         f"use latent:N (0..{d_sae - 1})")
    vocab: dict[str, str] = {}
    for c in concepts:
        for v in (c.concept_id, c.name, c.ontology_id):
            if v:
                vocab.setdefault(v.casefold(), v)
    close = difflib.get_close_matches(spec.casefold(), list(vocab), n=5, cutoff=0.5)
    hint = (f"; did you mean {', '.join(repr(vocab[c]) for c in close)}?" if close else
            f"; known concepts include {', '.join(repr(c.concept_id) for c in concepts[:8])}")
    raise InputError(f"concept {spec!r} is not a concept id, name or ontology id in this file, nor latent:N{hint}")


def concept_activation(ann: H5Annotations, position: int, selection: ConceptSelection) -> np.ndarray:
    """Per-encoded-residue activation (float32 [rows]): the maximum over the concept's latents, 0 where off."""
    codes = ann.codes(position)
    cols = codes[:, list(selection.latents)].toarray()
    if cols.shape[1] == 0:
        return np.zeros(codes.shape[0], np.float32)
    return cols.max(axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Structure reading and alignment
# ---------------------------------------------------------------------------------------------------------

def structure_format(path: str | os.PathLike[str]) -> str:
    """``"cif"`` or ``"pdb"`` from the file name (``.gz`` looked through); PDB is the fallback (``.ent``...)."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return "cif" if name.endswith(_MMCIF_SUFFIXES) else "pdb"


def _read_text(path: Path) -> str:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape", newline="") as fh:
                return fh.read()
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
            return fh.read()
    except FileNotFoundError:
        raise InputError(f"{path}: structure file not found") from None
    except (OSError, EOFError) as e:
        raise InputError(f"{path}: cannot read structure file ({e})") from e


def parse_structure(text: str, fmt: str, name: str = "model") -> Structure:
    import warnings

    from Bio.PDB import MMCIFParser, PDBParser
    from Bio.PDB.PDBExceptions import PDBConstructionWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PDBConstructionWarning)
        try:
            parser = MMCIFParser(QUIET=True) if fmt == "cif" else PDBParser(QUIET=True)
            structure = parser.get_structure(name, io.StringIO(text))
        except Exception as e:  # Bio.PDB raises bare ValueError/KeyError/IndexError on malformed files
            raise InputError(f"{name}: cannot parse as {'mmCIF' if fmt == 'cif' else 'PDB'} ({e})") from e
    if len(structure) == 0:
        raise InputError(f"{name}: no models (no ATOM/HETATM records)")
    return structure


def residue_letter(residue: Residue) -> str | None:
    """One-letter code of a polymer amino-acid residue, or None for waters, ligands and nucleotides.

    Modified residues recorded as HETATM inside the chain (MSE, SEP, ...) count as their parent amino acid
    because the PLM saw the parent letter in the FASTA; free amino acids used as ligands are rare enough that
    requiring a CA atom is the only guard.
    """
    from Bio.Data.PDBData import protein_letters_3to1_extended

    het = residue.id[0]
    if het == "W":
        return None
    name = residue.get_resname().strip().upper()
    letter = protein_letters_3to1_extended.get(name)
    if letter is None:
        return "X" if het == " " and name == "UNK" else None
    if het != " " and "CA" not in residue:
        return None
    return letter


def polymer_residues(chain: Chain) -> list[tuple[Residue, str]]:
    return [(r, letter) for r in chain for letter in [residue_letter(r)] if letter is not None]


def chain_sequences(structure: Structure) -> dict[str, list[tuple[Residue, str]]]:
    """Polymer residues of every chain of the first model (the one aligned; other models share numbering)."""
    model = next(iter(structure))
    out = {}
    for chain in model:
        res = polymer_residues(chain)
        if res:
            out[str(chain.id)] = res
    return out


@dataclass
class Alignment:
    """Chain-residue -> sequence-position map (0-based, -1 = unaligned) and its statistics."""

    positions: list[int]
    aligned: int
    identical: int
    open_end: bool = False   # the protein sequence is a prefix (truncated): chain residues past it are unknown

    @property
    def compared(self) -> int:
        """Chain residues the identity is judged over.

        All of them, except that for a truncated protein the chain residues after the last aligned one may
        belong to the part that was never encoded, so they cannot count as differences.
        """
        if not self.open_end:
            return len(self.positions)
        last = max((i for i, p in enumerate(self.positions) if p >= 0), default=-1)
        return last + 1

    @property
    def identity(self) -> float:
        """Identical residues over the compared chain residues (unaligned ones count as differences)."""
        return self.identical / self.compared if self.compared else 0.0


def align_chain(chain_seq: str, protein_seq: str, open_end: bool = False) -> Alignment:
    """Global alignment of the chain to the protein with free end gaps.

    Free end gaps because structures usually cover part of a protein (one domain, disordered termini missing);
    charging for them would push residues into wrong columns. Simple match/mismatch scores rather than BLOSUM
    because the two should be near-identical, and the FASTA alphabet includes letters (U, O, B, Z) that
    substitution matrices do not all know. Mismatches cost more than a match earns so that an expression tag
    next to an unobserved stretch is left unaligned rather than smeared over the missing residues, while a
    point mutation (one mismatch) still beats opening two gaps around it. Exact containment is checked first: it is the common case for
    predicted models and avoids the quadratic aligner on very long proteins.
    """
    if not chain_seq or not protein_seq:
        return Alignment([-1] * len(chain_seq), 0, 0, open_end)
    start = protein_seq.find(chain_seq)
    if start >= 0 and protein_seq.find(chain_seq, start + 1) < 0:
        n = len(chain_seq)
        return Alignment(list(range(start, start + n)), n, n, open_end)

    from Bio.Align import PairwiseAligner

    aligner = PairwiseAligner()
    aligner.mode = "global"
    aligner.match_score = 2.0
    aligner.mismatch_score = -3.0
    aligner.open_gap_score = -5.0
    aligner.extend_gap_score = -0.5
    aligner.end_gap_score = 0.0   # sets open and extend, left and right, target and query
    alignment = aligner.align(chain_seq, protein_seq)[0]
    positions = [-1] * len(chain_seq)
    aligned = identical = 0
    for (t0, t1), (q0, q1) in zip(*alignment.aligned, strict=True):
        for t, q in zip(range(t0, t1), range(q0, q1), strict=True):
            positions[t] = q
            aligned += 1
            identical += chain_seq[t] == protein_seq[q]
    return Alignment(positions, aligned, identical, open_end)


def _choose_chain(chains: dict[str, list[tuple[Residue, str]]], protein_seq: str, requested: str | None,
                  where: str, open_end: bool) -> tuple[str, Alignment]:
    """The requested chain, or else the chain with the most identical aligned residues (the usual intent)."""
    if not chains:
        raise InputError(f"{where}: no protein chain (no amino-acid residues in the first model)")
    if requested is not None:
        if requested not in chains:
            raise InputError(f"{where}: chain {requested!r} not found or has no amino-acid residues; "
                             f"protein chains: {', '.join(chains)}")
        return requested, align_chain("".join(l for _, l in chains[requested]), protein_seq, open_end)
    best: tuple[str, Alignment] | None = None
    for cid, residues in chains.items():
        aln = align_chain("".join(l for _, l in residues), protein_seq, open_end)
        if best is None or aln.identical > best[1].identical:
            best = (cid, aln)
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------

def _fmt_pdb_b(value: float) -> str:
    return f"{value:6.2f}"


def _pdb_line_key(line: str) -> ResidueKey | None:
    try:
        return (line[21], int(line[22:26]), line[26].strip() if len(line) > 26 else "", line[17:20].strip())
    except (ValueError, IndexError):
        return None


def rewrite_pdb(text: str, values: dict[ResidueKey, float]) -> str:
    """The PDB text with every ATOM/HETATM B-factor replaced (``values`` or 0); all other bytes kept."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.startswith(("ATOM  ", "HETATM")):
            body = line.rstrip("\r\n")
            ending = line[len(body):]
            key = _pdb_line_key(body)
            b = values.get(key, 0.0) if key is not None else 0.0
            if len(body) < 66:
                body = body.ljust(66)
                if body[54:60].strip() == "":  # occupancy missing too: write 1.00 so readers do not choke
                    body = body[:54] + "  1.00" + body[60:]
            body = body[:60] + _fmt_pdb_b(b) + body[66:]
            line = body + ending
        out.append(line)
    return "".join(out)


def rewrite_mmcif(text: str, values: dict[ResidueKey, float], handle: IO[str]) -> None:
    """Write the mmCIF with only ``_atom_site.B_iso_or_equiv`` changed, every other category kept.

    Keys use the fields Bio.PDB's MMCIFParser builds residues from (author chain, author number, PDB insertion
    code, label_comp_id), so the values computed on the parsed structure line up row by row.
    """
    from Bio.PDB.MMCIF2Dict import MMCIF2Dict
    from Bio.PDB.mmcifio import MMCIFIO

    d = MMCIF2Dict(io.StringIO(text))
    need = ("_atom_site.auth_asym_id", "_atom_site.auth_seq_id", "_atom_site.label_comp_id")
    if any(k not in d for k in need):
        raise InputError("mmCIF has no author chain/number columns in _atom_site; cannot place values")
    chains = d["_atom_site.auth_asym_id"]
    numbers = d["_atom_site.auth_seq_id"]
    names = d["_atom_site.label_comp_id"]
    icodes = d.get("_atom_site.pdbx_PDB_ins_code", ["?"] * len(chains))
    if not isinstance(chains, list):  # a single-atom file stores scalars
        chains, numbers, names, icodes = [chains], [numbers], [names], [icodes]
    lengths = {len(col) for col in (chains, numbers, names, icodes)}
    if len(lengths) > 1:  # a loop whose value count is not a multiple of its columns
        raise InputError(f"mmCIF _atom_site columns have different lengths (auth_asym_id {len(chains)}, "
                         f"auth_seq_id {len(numbers)}, label_comp_id {len(names)}, pdbx_PDB_ins_code {len(icodes)}); "
                         "the file is malformed")
    new_b = []
    for c, n, name, ic in zip(chains, numbers, names, icodes, strict=True):
        try:
            key = (c, int(n), "" if ic in ("?", ".") else ic, name)
        except ValueError:
            new_b.append("0.0000")
            continue
        new_b.append(f"{values.get(key, 0.0):.4f}")
    d["_atom_site.B_iso_or_equiv"] = new_b if len(new_b) != 1 else new_b[0]
    writer = MMCIFIO()
    writer.set_dict(d)
    writer.save(handle)


def write_converted(structure: Structure, values: dict[ResidueKey, float], fmt: str,
                    handle: IO[str]) -> None:
    """PDB <-> mmCIF through Bio.PDB: coordinates and B-factors only (headers do not survive conversion)."""
    from Bio.PDB import PDBIO
    from Bio.PDB.mmcifio import MMCIFIO

    for model in structure:
        for chain in model:
            for residue in chain:
                key = (str(chain.id), int(residue.id[1]), residue.id[2].strip(), residue.get_resname().strip())
                b = values.get(key, 0.0)
                for atom in residue.get_unpacked_list():
                    atom.set_bfactor(b)
    if fmt == "pdb":
        long_ids = sorted({str(c.id) for m in structure for c in m if len(str(c.id)) > 1})
        if long_ids:
            raise InputError(f"chain ids {', '.join(long_ids)} do not fit a PDB file (one character); "
                             "write mmCIF instead (-o out.cif)")
        writer: Any = PDBIO()
    else:
        writer = MMCIFIO()
    writer.set_structure(structure)
    writer.save(handle)


def _attr_name(selection: ConceptSelection) -> str:
    """A ChimeraX/PyMOL-safe identifier (letters, digits, underscores; not starting with a digit)."""
    base = (selection.entries[0].concept_id if selection.entries and not selection.by_latent
            else "latent_" + "_".join(str(x) for x in selection.latents))
    slug = re.sub(r"[^A-Za-z0-9_]+", "_", base).strip("_") or "concept"
    return "protsae_" + slug[:40]


def write_defattr(path: Path, summary: ExportSummary) -> None:
    """ChimeraX residue attribute file: one line per aligned, encoded residue (others get no value)."""
    from protsae_cli.io.atomic import TextOutput

    attr = _attr_name(summary.concept)
    top = 100.0 if summary.scale == "max" else max(summary.max_activation, 1e-6)
    out = TextOutput(path)
    try:
        out.write(f"# protsae export-structure: {_one_line(summary.concept.label)} on protein "
                  f"{_one_line(summary.protein_id)} (input index {summary.protein_index}), chain {summary.chain}\n")
        out.write(f"# values: {_scale_words(summary.scale)}; residues without a value did not align to the "
                  "annotated sequence or were not encoded\n")
        out.write(f"# usage in ChimeraX: open {summary.output.name}; open {path.name}; "
                  f"color byattribute r:{attr} palette white:red range 0,{top:.4g} noValueColor gray\n")
        out.write(f"attribute: {attr}\nmatch mode: any\nrecipient: residues\n")
        for r in summary.residues:
            if r.activation is None:
                continue
            out.write(f"\t/{r.chain}:{r.label}\t{r.bfactor:.4f}\n")
    except BaseException:
        out.abort()
        raise
    out.close()


def write_pml(path: Path, summary: ExportSummary) -> None:
    """PyMOL script that loads the written structure and colours the chain by B-factor (= the concept)."""
    from protsae_cli.io.atomic import TextOutput

    obj = re.sub(r"[^A-Za-z0-9_]+", "_", summary.output.name.split(".")[0]).strip("_") or "protsae"
    if obj[0].isdigit():
        obj = "m_" + obj
    try:
        rel = os.path.relpath(summary.output.resolve(), path.resolve().parent)
    except ValueError:  # different drives on Windows
        rel = str(summary.output.resolve())
    target = rel if not rel.startswith("..") else str(summary.output.resolve())
    top = 100.0 if summary.scale == "max" else max(summary.max_activation, 1e-6)
    chain_sel = f'{obj} and chain {summary.chain} and polymer'
    out = TextOutput(path)
    try:
        out.write(f"# protsae export-structure: {_one_line(summary.concept.label)} on protein "
                  f"{_one_line(summary.protein_id)} (input index {summary.protein_index}), chain {summary.chain}\n")
        out.write(f"# B-factor column = {_scale_words(summary.scale)}.\n")
        out.write("# PyMOL resolves the path below against its working directory: run it from this file's\n"
                  "# directory (cd there, then: pymol " + path.name + ").\n")
        quoted = f'"{target}"' if any(c in target for c in ' ,;"') else target
        out.write(f"load {quoted}, {obj}\n")
        out.write(f"hide everything, {obj}\n")
        out.write(f"show cartoon, {obj}\n")
        out.write(f"show sticks, {obj} and not polymer and not solvent\n")
        out.write(f"color grey80, {obj}\n")
        out.write(f"spectrum b, white_red, {chain_sel}, minimum=0, maximum={top:.4g}\n")
        out.write(f"orient {obj}\n")
    except BaseException:
        out.abort()
        raise
    out.close()


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


def _scale_words(scale: str) -> str:
    return ("100 x activation / this protein's maximum for the concept (0-100, like pLDDT)" if scale == "max"
            else "raw SAE activation")


# ---------------------------------------------------------------------------------------------------------
# The command's library function
# ---------------------------------------------------------------------------------------------------------

def export_structure(h5: str | os.PathLike[str], structure_path: str | os.PathLike[str],
                     output: str | os.PathLike[str], concept: str, *, protein_id: str | None = None,
                     index: int | None = None, chain: str | None = None, scale: str = "max",
                     force: bool = False, min_identity: float = MIN_IDENTITY,
                     defattr: str | os.PathLike[str] | None = None,
                     pml: str | os.PathLike[str] | None = None) -> ExportSummary:
    """Write ``structure_path`` to ``output`` with the concept's activation of one protein as B-factors."""
    from protsae_cli.io.atomic import TextOutput
    from protsae_cli.io.writers.h5 import H5Annotations

    if scale not in SCALES:
        raise InputError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    structure_path, output = Path(structure_path), Path(output)
    if structure_path.resolve() == output.resolve():
        raise InputError(f"{output}: refusing to overwrite the input structure; choose another output path")

    with H5Annotations(h5) as ann:
        pos = select_protein(ann, protein_id, index)
        info = ann.protein(pos)
        who = f"protein {info.id!r} (input index {info.index})"
        if info.n_rows == 0:
            detail = f": {info.status_detail}" if info.status_detail else ""
            raise InputError(f"{who} has status {info.status} and no activations{detail}")
        selection = resolve_concept(read_concepts(ann), concept, ann.d_sae)
        act = concept_activation(ann, pos, selection)
        encoded = ann.residues(pos)
    warnings_: list[str] = []
    if info.status == "truncated":
        warnings_.append(f"{who} was truncated to its first {info.n_rows} of {info.length} residues; residues "
                         "after that have no activation (B=0)")

    text = _read_text(structure_path)
    in_fmt, out_fmt = structure_format(structure_path), structure_format(output)
    structure = parse_structure(text, in_fmt, structure_path.name)
    chains = chain_sequences(structure)
    where = f"{structure_path}"
    cid, aln = _choose_chain(chains, encoded, chain, where, open_end=info.status == "truncated")
    chain_res = chains[cid]
    if aln.aligned == 0 or (aln.identity < min_identity and not force):
        raise InputError(
            f"{where}: chain {cid} does not match {who}: only {aln.identical} of the chain's {aln.compared} "
            f"residues ({aln.identity:.1%}) are identical to the protein residue they align to ({aln.aligned} "
            f"aligned; protein length {info.length}), below {min_identity:.0%}. Check --protein/--chain, or pass "
            f"--force (or a lower --min-identity) to write anyway"
            if aln.aligned else
            f"{where}: chain {cid} shares no aligned residues with {who}; check --protein/--chain")
    if aln.identity < min_identity:
        warnings_.append(f"chain {cid} is only {aln.identity:.1%} identical to {who} (forced)")

    max_act = float(act.max()) if act.size else 0.0
    residues: list[ResidueValue] = []
    values: dict[ResidueKey, float] = {}
    for (res, letter), p in zip(chain_res, aln.positions, strict=True):
        a = float(act[p]) if 0 <= p < act.size else None
        if a is None:
            b = 0.0
        elif scale == "max":
            b = 100.0 * a / max_act if max_act > 0 else 0.0
        else:
            b = a
        rv = ResidueValue(chain=cid, number=int(res.id[1]), icode=res.id[2].strip(),
                          resname=res.get_resname().strip(), letter=letter,
                          position=p + 1 if p >= 0 else None, activation=a, bfactor=b)
        residues.append(rv)
        values[rv.key] = b
    if out_fmt == "pdb" and any(v > PDB_BFACTOR_MAX or not math.isfinite(v) for v in values.values()):
        raise InputError(f"{who}, concept {selection.label!r}: activations up to {max_act:g} do not fit the PDB "
                         "B-factor column (max 999.99); use --scale max or write mmCIF (-o out.cif)")
    if max_act == 0:
        warnings_.append(f"concept {selection.label!r} is never active on {who}; all B-factors are 0")

    summary = ExportSummary(
        protein_id=info.id, protein_index=info.index, protein_status=info.status, concept=selection, chain=cid,
        identity=aln.identity, aligned=aln.aligned, identical=aln.identical, chain_residues=len(chain_res),
        encoded_residues=info.n_rows, max_activation=max_act, scale=scale, output=output, residues=residues,
        warnings=warnings_,
    )

    out = TextOutput(output)
    try:
        if in_fmt == out_fmt == "pdb":
            out.write(rewrite_pdb(text, values))
        elif in_fmt == out_fmt == "cif":
            rewrite_mmcif(text, values, out.stream)
        else:
            write_converted(structure, values, out_fmt, out.stream)
    except BaseException:
        out.abort()
        raise
    out.close()
    if defattr is not None:
        summary.defattr = Path(defattr)
        write_defattr(summary.defattr, summary)
    if pml is not None:
        summary.pml = Path(pml)
        write_pml(summary.pml, summary)
    return summary


def describe(summary: ExportSummary) -> Iterable[str]:
    """Human-readable lines for the CLI (stderr)."""
    yield (f"{summary.output}: {summary.concept.label} on protein {summary.protein_id!r} "
           f"(input index {summary.protein_index}) -> chain {summary.chain}")
    yield (f"  alignment: {summary.identity:.1%} identity ({summary.identical} of {summary.chain_residues} chain "
           f"residues identical, {summary.aligned} aligned); "
           f"{summary.mapped}/{summary.chain_residues} chain residues carry a value")
    yield f"  B-factor = {_scale_words(summary.scale)}; max activation {summary.max_activation:.4g}"
    for path in (summary.defattr, summary.pml):
        if path is not None:
            yield f"  wrote {path}"
    for w in summary.warnings:
        yield f"  warning: {w}"
