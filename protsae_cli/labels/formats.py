"""Annotation loaders: the files biologists already have, turned into concept labels.

Every loader returns a `ResidueLabels` (residue-level concepts, 0-based) or a `ProteinLabels` (GO terms), and
maps its input onto the concept ids of the shipped ontology `protsae_cli/models/residue_concepts.obo` (PSC:...) or onto
GO ids, so that labels from different sources merge and propagate through one ontology.

Input problems are `InputError`s that name the file and the 1-based line: a malformed line, a position past
the sequence end, start > end, an id that is not in the given sequence set (unless `unknown_ids="skip"`),
a TMbed label string whose length differs from its sequence. Things that are legitimately not usable (a
Swiss-Prot feature with a fuzzy `<1` or `?` position, a GAF line with a NOT qualifier) are skipped and counted
in `labels.skipped`, never guessed at.

When a sequence set is given, ids are matched exactly first and then through unambiguous `|`-separated parts
of the sequence ids (`sp|P12345|NAME_HUMAN` matches `P12345`; TMbed's `Q9BEC7|EUKARYA|NO_SP|1` matches
`Q9BEC7`), and the labels are keyed by the sequence set's ids, so they line up with the activations.
"""

from __future__ import annotations

import gzip
import io
import logging
import re
from functools import lru_cache
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from protsae_cli.errors import InputError
from protsae_cli.labels.sets import ProteinLabels, ResidueLabelBuilder, ResidueLabels
from protsae_cli.labels.ontology import Ontology

log = logging.getLogger(__name__)

FORMATS = ("swissprot", "uniprot-xml", "uniprot-tsv", "tmbed", "binding", "gaf", "go-tsv", "generic-tsv")
PROTEIN_LEVEL_FORMATS = frozenset({"gaf", "go-tsv"})

# GO evidence codes DeepGO-SE (and so ProtSAE) keeps: experimental, high-throughput and author/curator statements.
EXPERIMENTAL_EVIDENCE = frozenset(
    {"EXP", "IDA", "IPI", "IMP", "IGI", "IEP", "TAS", "IC", "HTP", "HDA", "HMP", "HGI", "HEP"}
)

# ------------------------------------------------------------------------------- concept ids (residue_concepts.obo)
ROOT = "PSC:0000001"
TM_REGION = "PSC:0000100"
TM_HELIX = "PSC:0000101"
TM_STRAND = "PSC:0000102"
INTRAMEMBRANE = "PSC:0000103"
TOPO_DOMAIN = "PSC:0000110"
CYTOPLASMIC = "PSC:0000111"
NON_CYTOPLASMIC = "PSC:0000112"
SIGNAL_PEPTIDE = "PSC:0000120"
TRANSIT_PEPTIDE = "PSC:0000121"
PROPEPTIDE = "PSC:0000122"
BINDING_SITE = "PSC:0000200"
METAL_BINDING = "PSC:0000210"
ZINC_BINDING = "PSC:0000211"
IRON_BINDING = "PSC:0000212"
CALCIUM_BINDING = "PSC:0000213"
MAGNESIUM_BINDING = "PSC:0000214"
MANGANESE_BINDING = "PSC:0000215"
COPPER_BINDING = "PSC:0000216"
COBALT_BINDING = "PSC:0000217"
NICKEL_BINDING = "PSC:0000218"
POTASSIUM_BINDING = "PSC:0000219"
SODIUM_BINDING = "PSC:0000220"
FE_S_BINDING = "PSC:0000225"
SMALL_MOLECULE_BINDING = "PSC:0000230"
NUCLEOTIDE_BINDING = "PSC:0000231"
HEME_BINDING = "PSC:0000232"
NUCLEIC_ACID_BINDING = "PSC:0000240"
DNA_BINDING = "PSC:0000241"
RNA_BINDING = "PSC:0000242"
ACTIVE_SITE = "PSC:0000250"
FUNCTIONAL_SITE = "PSC:0000251"
PTM = "PSC:0000300"
MODIFIED_RESIDUE = "PSC:0000301"
PHOSPHORYLATION = "PSC:0000302"
ACETYLATION = "PSC:0000303"
METHYLATION = "PSC:0000304"
GLYCOSYLATION = "PSC:0000310"
LIPIDATION = "PSC:0000311"
CROSS_LINK = "PSC:0000312"
DISULFIDE_BOND = "PSC:0000313"
SECONDARY_STRUCTURE = "PSC:0000400"
HELIX = "PSC:0000401"
BETA_STRAND = "PSC:0000402"
TURN = "PSC:0000403"
DOMAIN = "PSC:0000500"
ZINC_FINGER = "PSC:0000501"
REGION = "PSC:0000510"
DISORDERED_REGION = "PSC:0000511"
MOTIF = "PSC:0000520"
COILED_COIL = "PSC:0000530"
COMPOSITIONAL_BIAS = "PSC:0000540"
REPEAT = "PSC:0000550"

# bindEmbed21 / bindPredict ligand classes
BINDING_CLASSES = {"metal": METAL_BINDING, "nuclear": NUCLEIC_ACID_BINDING, "small": SMALL_MOLECULE_BINDING}

# TMbed per-residue letters; U (unresolved) is masked, not a concept
TMBED_CONCEPTS = {
    "H": TM_HELIX,
    "h": TM_HELIX,
    "B": TM_STRAND,
    "b": TM_STRAND,
    "S": SIGNAL_PEPTIDE,
    "1": CYTOPLASMIC,
    "2": NON_CYTOPLASMIC,
}
TMBED_ALPHABET = frozenset("HhBbS12U")


@lru_cache(maxsize=1)
def concept_ontology() -> Ontology:
    """The shipped residue concept ontology (names for PSC ids, and is_a for propagation)."""
    from protsae_cli.models import concept_ontology_path

    return Ontology.from_obo(concept_ontology_path())


# ================================================================================================ plumbing
def _open_text(path: str | Path) -> io.TextIOBase:
    p = Path(path)
    try:
        if p.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8")
        return open(p, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read annotation file: {exc}") from None


def _open_binary(path: str | Path) -> io.BufferedIOBase:
    p = Path(path)
    try:
        return gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot read annotation file: {exc}") from None


def _lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without newline); a decoding failure names its line."""
    with _open_text(path) as fh:
        lineno = 0
        try:
            for lineno, raw in enumerate(fh, start=1):
                yield lineno, raw.rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}, line {lineno + 1}: not UTF-8 text ({exc.reason})") from None


LineRef = int | Callable[[], int | None] | None  # a line number, or a function that finds it


def _err(path: str | Path, lineno: LineRef, msg: str) -> InputError:
    """An InputError naming the file and 1-based line; `lineno` may be a callable, evaluated only on error."""
    if callable(lineno):
        lineno = lineno()
    where = f"{path}, line {lineno}" if lineno is not None else str(path)
    return InputError(f"{where}: {msg}")


def _check_policy(name: str, value: str) -> None:
    if value not in ("error", "skip"):
        raise InputError(f"{name} must be 'error' or 'skip', got {value!r}")


def _report(path: str | Path, skipped: Mapping[str, int]) -> None:
    for reason, n in sorted(skipped.items()):
        log.warning("%s: skipped %d %s", path, n, reason)


def _aliases(key: str) -> set[str]:
    first = key.split()[0] if key.split() else key
    out = {first}
    if "|" in first:
        out.update(part for part in first.split("|") if part)
    out.discard(key)
    return out


class _IdMatcher:
    """Maps the protein ids of an annotation file onto the keys of the given sequence set."""

    def __init__(self, path: str | Path, sequences: Mapping[str, str] | Iterable[str] | None, unknown_ids: str):
        _check_policy("unknown_ids", unknown_ids)
        self.path = path
        self.policy = unknown_ids
        self.keys: set[str] | None = None
        self.seqs: Mapping[str, str] | None = None
        self.alias: dict[str, str | None] = {}
        if sequences is None:
            return
        if isinstance(sequences, Mapping):
            self.seqs = sequences
            self.keys = set(sequences)
        else:
            self.keys = set(sequences)
        for key in self.keys:
            for a in _aliases(key):
                if a in self.keys:
                    continue
                self.alias[a] = key if a not in self.alias or self.alias[a] == key else None

    @property
    def active(self) -> bool:
        return self.keys is not None

    def lookup(self, raw: str, *more: str) -> str | None:
        assert self.keys is not None
        for cand in (raw, *more):
            if cand in self.keys:
                return cand
        for cand in (raw, *more):
            hit = self.alias.get(cand)
            if hit is not None:
                return hit
        return None

    def resolve(self, raw: str, lineno: LineRef, skip: Callable[[str], None], *more: str) -> str | None:
        """The sequence-set key for `raw` (or `raw` itself without a sequence set); None when skipped."""
        if self.keys is None:
            return raw
        key = self.lookup(raw, *more)
        if key is None:
            if self.policy == "skip":
                skip("annotations of proteins not in the sequence set")
                return None
            raise _err(
                self.path,
                lineno,
                f"protein id {raw!r} is not in the given sequences "
                "(use unknown_ids='skip' to drop annotations of other proteins)",
            )
        return key

    def sequence(self, key: str) -> str | None:
        return None if self.seqs is None else self.seqs.get(key)

    def length(self, key: str) -> int | None:
        s = self.sequence(key)
        return None if s is None else len(s)


def _check_span(path: str | Path, lineno: LineRef, start: int, end: int, length: int | None, what: str) -> None:
    """Validate a 1-based inclusive span before it becomes labels."""
    if start < 1:
        raise _err(path, lineno, f"{what}: position {start} is before the first residue (positions are 1-based)")
    if start > end:
        raise _err(path, lineno, f"{what}: start {start} > end {end}")
    if length is not None and end > length:
        raise _err(path, lineno, f"{what}: position {end} lies past the sequence end ({length} residues)")


def _runs(residues: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive 0-based residues as half-open spans."""
    out: list[tuple[int, int]] = []
    for r in sorted(set(residues)):
        if out and out[-1][1] == r:
            out[-1] = (out[-1][0], r + 1)
        else:
            out.append((r, r + 1))
    return out


def _names_for(concepts: Iterable[str], *ontologies: Ontology | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for c in concepts:
        for onto in ontologies:
            if onto is not None and c in onto:
                out[c] = onto.name(c)
                break
    return out


def _finish(builder: ResidueLabelBuilder, lengths: Mapping[str, int], path: str | Path) -> ResidueLabels:
    labels = builder.build(lengths=lengths)
    names = _names_for(labels.concepts, concept_ontology())
    names.update({c: n for c, n in builder.names.items() if c in labels.concepts})
    labels.names = names
    _report(path, labels.skipped)
    return labels


# ===================================================================================== feature -> concept maps
_XML_TYPES = {
    "active site": "ACT_SITE",
    "binding site": "BINDING",
    "calcium-binding region": "CA_BIND",
    "coiled-coil region": "COILED",
    "compositionally biased region": "COMPBIAS",
    "cross-link": "CROSSLNK",
    "disulfide bond": "DISULFID",
    "dna-binding region": "DNA_BIND",
    "domain": "DOMAIN",
    "glycosylation site": "CARBOHYD",
    "helix": "HELIX",
    "intramembrane region": "INTRAMEM",
    "lipid moiety-binding region": "LIPID",
    "metal ion-binding site": "METAL",
    "modified residue": "MOD_RES",
    "nucleotide phosphate-binding region": "NP_BIND",
    "propeptide": "PROPEP",
    "region of interest": "REGION",
    "repeat": "REPEAT",
    "short sequence motif": "MOTIF",
    "signal peptide": "SIGNAL",
    "site": "SITE",
    "strand": "STRAND",
    "topological domain": "TOPO_DOM",
    "transit peptide": "TRANSIT",
    "transmembrane region": "TRANSMEM",
    "turn": "TURN",
    "zinc finger region": "ZN_FING",
}

_SIMPLE_FT = {
    "INTRAMEM": INTRAMEMBRANE,
    "SIGNAL": SIGNAL_PEPTIDE,
    "TRANSIT": TRANSIT_PEPTIDE,
    "PROPEP": PROPEPTIDE,
    "ACT_SITE": ACTIVE_SITE,
    "SITE": FUNCTIONAL_SITE,
    "CARBOHYD": GLYCOSYLATION,
    "LIPID": LIPIDATION,
    "CROSSLNK": CROSS_LINK,
    "DISULFID": DISULFIDE_BOND,
    "HELIX": HELIX,
    "STRAND": BETA_STRAND,
    "TURN": TURN,
    "DOMAIN": DOMAIN,
    "MOTIF": MOTIF,
    "ZN_FING": ZINC_FINGER,
    "DNA_BIND": DNA_BINDING,
    "COMPBIAS": COMPOSITIONAL_BIAS,
    "COILED": COILED_COIL,
    "REPEAT": REPEAT,
    "CA_BIND": CALCIUM_BINDING,
    "NP_BIND": NUCLEOTIDE_BINDING,
}
# the UniProt feature keys that become concepts; CHAIN, VARIANT, CONFLICT, MUTAGEN... do not
CONCEPT_FEATURE_KEYS = frozenset(_SIMPLE_FT) | {"TRANSMEM", "TOPO_DOM", "BINDING", "METAL", "MOD_RES", "REGION"}
# features whose two ends are the annotated residues (a bond), not the span between them
_BOND_FT = frozenset({"DISULFID", "CROSSLNK"})

_METAL_BY_SYMBOL = {
    "Zn": ZINC_BINDING,
    "Fe": IRON_BINDING,
    "Ca": CALCIUM_BINDING,
    "Mg": MAGNESIUM_BINDING,
    "Mn": MANGANESE_BINDING,
    "Cu": COPPER_BINDING,
    "Co": COBALT_BINDING,
    "Ni": NICKEL_BINDING,
    "K": POTASSIUM_BINDING,
    "Na": SODIUM_BINDING,
}
_METAL_SYMBOLS = set(_METAL_BY_SYMBOL) | {
    "Li", "Rb", "Cs", "Be", "Sr", "Ba", "Al", "Ga", "In", "Tl", "Sn", "Pb", "Bi", "Cd", "Hg", "Ag", "Au",
    "Pt", "Pd", "Rh", "Ir", "Ru", "Os", "Mo", "W", "V", "Cr", "Ti", "Sc", "Y", "Zr", "La", "Ce", "Pr", "Nd",
    "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "U",
}
_METAL_BY_WORD = {
    "zinc": ZINC_BINDING,
    "iron": IRON_BINDING,
    "calcium": CALCIUM_BINDING,
    "magnesium": MAGNESIUM_BINDING,
    "manganese": MANGANESE_BINDING,
    "copper": COPPER_BINDING,
    "cobalt": COBALT_BINDING,
    "nickel": NICKEL_BINDING,
    "potassium": POTASSIUM_BINDING,
    "sodium": SODIUM_BINDING,
}
_ION_RE = re.compile(r"^([A-Z][a-z]?)(?:\(\d*\+\)| cation)$")
_NUCLEOTIDE_RE = re.compile(
    r"^(?:d?[ACGUTI][MDT]P|(?:3',5'-cyclic )[AGCU]MP|c[AG]MP|NAD\(\+\)|NADH|NADP\(\+\)|NADPH|FAD|FADH2|FMN|FMNH2"
    r"|coenzyme A|.*-CoA|(?:d?[ACGUT]DP)-.+|.*nucleotide.*)$"
)


def ligand_concept(name: str) -> str:
    """Concept for one UniProt ligand name (ChEBI-derived, e.g. `Zn(2+)`, `[4Fe-4S] cluster`, `ATP`).

    Ligands that are neither metals, nucleic acids nor nucleotides count as small molecules, except peptides and
    proteins, which stay plain binding sites: bindEmbed21's "small" class is small molecules only.
    """
    n = name.strip()
    m = _ION_RE.match(n)
    if m and m.group(1) in _METAL_SYMBOLS:
        return _METAL_BY_SYMBOL.get(m.group(1), METAL_BINDING)
    low = n.lower()
    if re.search(r"\[\d*fe-\d*s\]", low) or "iron-sulfur" in low:
        return FE_S_BINDING
    if low.startswith("heme") or low in ("siroheme", "protoheme"):
        return HEME_BINDING
    if re.search(r"\bDNA\b", n):
        return DNA_BINDING
    if re.search(r"RNA\b", n):
        return RNA_BINDING
    if _NUCLEOTIDE_RE.match(n):
        return NUCLEOTIDE_BINDING
    if re.match(r"^(?:an? )?(?:peptide|protein|polypeptide)\b", low):
        return BINDING_SITE
    return SMALL_MOLECULE_BINDING


def _metal_from_text(note: str) -> str:
    """Old-style METAL features name the metal in their note ("Zinc; catalytic", "Iron-sulfur (2Fe-2S)")."""
    low = note.strip().lower()
    if low.startswith("iron-sulfur") or re.search(r"\d*fe-\d*s", low):
        return FE_S_BINDING
    word = re.split(r"[\s;,(]", low, maxsplit=1)[0] if low else ""
    return _METAL_BY_WORD.get(word, METAL_BINDING)


_NON_CYTO_PREFIXES = (
    "extracellular", "lumenal", "periplasmic", "vacuolar", "intravacuolar", "mitochondrial intermembrane",
    "chloroplast intermembrane", "exoplasmic", "perinuclear space", "intragranular", "vesicular", "thylakoid lumen",
    "virion surface",
)


def feature_concepts(key: str, note: str = "", ligands: Sequence[str] = ()) -> list[str]:
    """Concepts for one UniProt feature (flat-file key, e.g. TRANSMEM); [] when the key is not a concept."""
    low = note.strip().lower()
    if key == "TRANSMEM":
        if low.startswith("helical"):
            return [TM_HELIX]
        if low.startswith("beta stranded"):
            return [TM_STRAND]
        return [TM_REGION]
    if key == "TOPO_DOM":
        if low.startswith("cytoplasmic"):
            return [CYTOPLASMIC]
        if low.startswith(_NON_CYTO_PREFIXES):
            return [NON_CYTOPLASMIC]
        return [TOPO_DOMAIN]
    if key == "BINDING":
        found = list(dict.fromkeys(ligand_concept(x) for x in ligands if x.strip()))
        return found or [BINDING_SITE]
    if key == "METAL":
        return [_metal_from_text(note)]
    if key == "MOD_RES":
        if low.startswith("phospho"):
            return [PHOSPHORYLATION]
        if "acetyl" in low:
            return [ACETYLATION]
        if "methyl" in low:
            return [METHYLATION]
        return [MODIFIED_RESIDUE]
    if key == "REGION":
        return [DISORDERED_REGION] if low.startswith("disordered") else [REGION]
    c = _SIMPLE_FT.get(key)
    return [c] if c else []


def _add_feature(
    builder: ResidueLabelBuilder, pid: str, key: str, concepts: Sequence[str], start0: int, end0: int
) -> None:
    """Add one located feature (0-based half-open). Bonds label their two end residues as one instance."""
    for c in concepts:
        if key in _BOND_FT:
            builder.add_residues(pid, c, {start0, end0 - 1})
            builder.add_instance_span(pid, c, (start0, end0))
        else:
            builder.add_span(pid, c, start0, end0)


# ===================================================================================== Swiss-Prot / UniProt XML
_XML_ENTRY = re.compile(r"<entry[\s>]")


def _entry_lines(path: str | Path, xml: bool) -> list[int]:
    """1-based line of each entry's start, so errors in Biopython-parsed records can still name a line."""
    out: list[int] = []
    for lineno, line in _lines(path):
        if (xml and _XML_ENTRY.search(line)) or (not xml and line.startswith("ID   ")):
            out.append(lineno)
    return out


def _qual_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value)
    return str(value)


def load_swissprot(
    path: str | Path,
    sequences: Mapping[str, str] | None = None,
    *,
    fmt: str = "swissprot",
    unknown_ids: str = "error",
    check_sequence: bool = True,
    feature_keys: Iterable[str] | None = None,
) -> ResidueLabels:
    """Residue concepts from UniProtKB flat files (`fmt="swissprot"`) or UniProt XML (`fmt="uniprot-xml"`).

    Reads the FT lines / <feature> elements through Biopython. Features with fuzzy or unknown ends (`<1`,
    `>74`, `?`, `?57`) are skipped and counted: their extent is not known, and a guessed extent would teach
    the concept predictor wrong residues. With a sequence set, an entry whose sequence differs from the given
    one is an error (`check_sequence=False` only checks that positions fit), since coordinates would not
    transfer.
    """
    from Bio import SeqIO
    from Bio.SeqFeature import ExactPosition

    _check_policy("unknown_ids", unknown_ids)
    xml = fmt in ("uniprot-xml", "xml")
    bio_fmt = "uniprot-xml" if xml else "swiss"
    keys_wanted = set(feature_keys) if feature_keys is not None else None
    entry_lines: list[int] | None = None  # found only when an error needs a line number
    ids = _IdMatcher(path, sequences, unknown_ids)
    builder = ResidueLabelBuilder()
    lengths: dict[str, int] = {}
    seen: dict[str, int] = {}

    def line_of(i: int) -> int | None:
        nonlocal entry_lines
        if entry_lines is None:
            entry_lines = _entry_lines(path, xml)
        return entry_lines[i] if i < len(entry_lines) else (1 if not entry_lines else None)

    handle = _open_binary(path) if xml else _open_text(path)
    i = -1
    try:
        records = SeqIO.parse(handle, bio_fmt)
        while True:
            i += 1
            try:
                record = next(records)
            except StopIteration:
                break
            except InputError:
                raise
            except Exception as exc:  # Biopython raises ValueError, AssertionError, ParseError...
                raise _err(path, line_of(i), f"cannot parse UniProt entry {i + 1}: {exc}") from None
            lineno = (lambda k=i: line_of(k))
            accs = [str(a) for a in record.annotations.get("accessions", [])]
            pid = ids.resolve(record.id, lineno, builder.skip, record.name, *accs)
            if pid is None:
                continue
            if pid in seen:
                raise _err(path, lineno, f"entry {record.id} appears twice (first at entry {seen[pid] + 1})")
            seen[pid] = i
            try:
                own_seq: str | None = str(record.seq)
            except Exception:  # an XML entry without <sequence> has an undefined sequence
                own_seq = None
            given = ids.sequence(pid)
            if given is not None and own_seq is not None and check_sequence and given.upper() != own_seq.upper():
                raise _err(
                    path,
                    lineno,
                    f"the sequence of entry {record.id} ({len(own_seq)} aa) differs from the given sequence of "
                    f"{pid!r} ({len(given)} aa); feature positions would not transfer (check_sequence=False to "
                    "accept when positions fit)",
                )
            length = len(given) if given is not None else (len(own_seq) if own_seq else None)
            if length is not None:
                lengths[pid] = length
            builder.touch(pid)
            for ft in record.features:
                key = _XML_TYPES.get(ft.type.lower(), ft.type) if xml else ft.type
                if key not in CONCEPT_FEATURE_KEYS or (keys_wanted is not None and key not in keys_wanted):
                    continue
                loc = ft.location
                if loc is None:
                    builder.skip(f"{key} features without a location")
                    continue
                if type(loc.start) is not ExactPosition or type(loc.end) is not ExactPosition:
                    builder.skip(f"{key} features with fuzzy or unknown positions")
                    continue
                start0, end0 = int(loc.start), int(loc.end)
                _check_span(path, lineno, start0 + 1, end0, length, f"entry {record.id}, {key} {start0 + 1}..{end0}")
                q = ft.qualifiers
                note = _qual_text(q.get("note") or q.get("description"))
                ligands: list[str] = []
                if key == "BINDING":
                    if xml:
                        ligands = [str(d.get("name", "")) for d in q.get("ligands", []) if isinstance(d, dict)]
                    elif q.get("ligand"):
                        lig = q["ligand"]
                        ligands = [str(x) for x in lig] if isinstance(lig, (list, tuple)) else [str(lig)]
                _add_feature(builder, pid, key, feature_concepts(key, note, ligands), start0, end0)
    finally:
        handle.close()
    return _finish(builder, lengths, path)


def load_uniprot_xml(path: str | Path, sequences: Mapping[str, str] | None = None, **opts: Any) -> ResidueLabels:
    return load_swissprot(path, sequences, fmt="uniprot-xml", **opts)


# ========================================================================================== UniProt TSV export
# column header (as the website writes it) and REST field name, lower-cased -> feature key
UNIPROT_TSV_COLUMNS = {
    "transmembrane": "TRANSMEM", "ft_transmem": "TRANSMEM",
    "intramembrane": "INTRAMEM", "ft_intramem": "INTRAMEM",
    "topological domain": "TOPO_DOM", "ft_topo_dom": "TOPO_DOM",
    "signal peptide": "SIGNAL", "ft_signal": "SIGNAL",
    "transit peptide": "TRANSIT", "ft_transit": "TRANSIT",
    "propeptide": "PROPEP", "ft_propep": "PROPEP",
    "binding site": "BINDING", "ft_binding": "BINDING",
    "active site": "ACT_SITE", "ft_act_site": "ACT_SITE",
    "site": "SITE", "ft_site": "SITE",
    "metal binding": "METAL", "ft_metal": "METAL",
    "calcium binding": "CA_BIND", "ft_ca_bind": "CA_BIND",
    "nucleotide binding": "NP_BIND", "ft_np_bind": "NP_BIND",
    "dna binding": "DNA_BIND", "ft_dna_bind": "DNA_BIND",
    "disulfide bond": "DISULFID", "ft_disulfid": "DISULFID",
    "modified residue": "MOD_RES", "ft_mod_res": "MOD_RES",
    "glycosylation": "CARBOHYD", "ft_carbohyd": "CARBOHYD",
    "lipidation": "LIPID", "ft_lipid": "LIPID",
    "cross-link": "CROSSLNK", "ft_crosslnk": "CROSSLNK",
    "domain [ft]": "DOMAIN", "ft_domain": "DOMAIN",
    "region": "REGION", "ft_region": "REGION",
    "motif": "MOTIF", "ft_motif": "MOTIF",
    "zinc finger": "ZN_FING", "ft_zn_fing": "ZN_FING",
    "compositional bias": "COMPBIAS", "ft_compbias": "COMPBIAS",
    "coiled coil": "COILED", "ft_coiled": "COILED",
    "repeat": "REPEAT", "ft_repeat": "REPEAT",
    "helix": "HELIX", "ft_helix": "HELIX",
    "beta strand": "STRAND", "ft_strand": "STRAND",
    "turn": "TURN", "ft_turn": "TURN",
}
_TSV_ID_COLUMNS = ("entry", "accession")
_TSV_ALIAS_COLUMNS = ("entry name", "id")
_TSV_SEQ_COLUMNS = ("sequence",)
_TSV_LEN_COLUMNS = ("length",)

_FT_ITEM = re.compile(
    r'\s*(?:/(?P<qual>[A-Za-z_]+)=(?P<val>"[^"]*"|[^;]*)|(?P<key>[A-Z][A-Z_]+)\s+(?P<loc>[^;\s]+))\s*(?:;|$)'
)
_FUZZY_LOC = re.compile(r"^(?:[<>?]?\d*)(?:\.\.[<>?]?\d*)?$")


def parse_uniprot_ft_cell(cell: str) -> list[tuple[str, str, dict[str, list[str]]]]:
    """Split a UniProt TSV feature cell into (key, location, qualifiers).

    `TRANSMEM 10..30; /note="Helical"; /evidence="ECO:0000255"; TRANSMEM 45..67; ...`. Quoted values may
    hold `;` (`/note="Helical; Signal-anchor for type II membrane protein"`), so the cell is scanned, not split.
    """
    out: list[tuple[str, str, dict[str, list[str]]]] = []
    pos, text = 0, cell.strip()
    while pos < len(text):
        m = _FT_ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read feature text at {text[pos:pos + 40]!r}")
        pos = m.end()
        if m.group("key"):
            out.append((m.group("key"), m.group("loc"), {}))
        else:
            if not out:
                raise ValueError(f"qualifier /{m.group('qual')} before any feature key")
            val = m.group("val").strip()
            if val.startswith('"') and val.endswith('"') and len(val) >= 2:
                val = val[1:-1]
            out[-1][2].setdefault(m.group("qual"), []).append(val)
    return out


def _parse_ft_location(loc: str) -> tuple[int, int] | str:
    """1-based inclusive (start, end), or the reason the location cannot be used exactly."""
    if ":" in loc:
        return "features located on another isoform"
    m = re.match(r"^(\d+)(?:\.\.(\d+))?$", loc)
    if m:
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        return a, b
    if _FUZZY_LOC.match(loc):
        return "features with fuzzy or unknown positions"
    raise ValueError(f"malformed feature location {loc!r}")


def load_uniprot_tsv(
    path: str | Path,
    sequences: Mapping[str, str] | None = None,
    *,
    unknown_ids: str = "error",
    check_sequence: bool = True,
) -> ResidueLabels:
    """Residue concepts from a UniProt TSV export with feature columns (`Transmembrane` or `ft_transmem`...).

    The id column is `Entry` (or `accession`); `Sequence` or `Length`, when exported, bound the positions.
    """
    ids = _IdMatcher(path, sequences, unknown_ids)
    builder = ResidueLabelBuilder()
    lengths: dict[str, int] = {}
    header: list[str] | None = None
    cols: dict[str, int] = {}
    feat_cols: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        fields = line.split("\t")
        if header is None:
            header = [f.strip() for f in fields]
            low = [h.lower() for h in header]
            for i, h in enumerate(low):
                cols.setdefault(h, i)
            feat_cols = [(i, UNIPROT_TSV_COLUMNS[h]) for i, h in enumerate(low) if h in UNIPROT_TSV_COLUMNS]
            if not any(c in cols for c in _TSV_ID_COLUMNS):
                raise _err(path, lineno, "UniProt TSV header has no 'Entry' (or 'accession') column")
            if not feat_cols:
                raise _err(path, lineno, "UniProt TSV header has no feature column (e.g. 'Transmembrane', 'ft_binding')")
            continue
        if len(fields) > len(header):
            raise _err(path, lineno, f"{len(fields)} tab-separated fields, but the header has {len(header)}")
        fields += [""] * (len(header) - len(fields))

        def col(names: Sequence[str], row: list[str] = fields) -> str:
            # row bound now: the helper reads this line's fields, never a later line's
            for n in names:
                if n in cols:
                    return row[cols[n]].strip()
            return ""

        raw_id = col(_TSV_ID_COLUMNS)
        if not raw_id:
            raise _err(path, lineno, "empty Entry field")
        alias = col(_TSV_ALIAS_COLUMNS)
        pid = ids.resolve(raw_id, lineno, builder.skip, *([alias] if alias else []))
        if pid is None:
            continue
        if pid in seen:
            raise _err(path, lineno, f"entry {raw_id} appears twice (first at line {seen[pid]})")
        seen[pid] = lineno
        own_seq = col(_TSV_SEQ_COLUMNS) or None
        own_len_text = col(_TSV_LEN_COLUMNS)
        given = ids.sequence(pid)
        if given is not None and own_seq is not None and check_sequence and given.upper() != own_seq.upper():
            raise _err(path, lineno, f"the sequence of {raw_id} differs from the given sequence of {pid!r}")
        length: int | None = None
        if given is not None:
            length = len(given)
        elif own_seq:
            length = len(own_seq)
        elif own_len_text:
            if not own_len_text.isdigit():
                raise _err(path, lineno, f"Length field {own_len_text!r} is not a number")
            length = int(own_len_text)
        if length is not None:
            lengths[pid] = length
        builder.touch(pid)
        for ci, _expected in feat_cols:
            cell = fields[ci]
            if not cell.strip():
                continue
            try:
                items = parse_uniprot_ft_cell(cell)
            except ValueError as exc:
                raise _err(path, lineno, f"column {header[ci]!r}: {exc}") from None
            for key, loc, quals in items:
                if key not in CONCEPT_FEATURE_KEYS:
                    continue
                try:
                    parsed = _parse_ft_location(loc)
                except ValueError as exc:
                    raise _err(path, lineno, f"column {header[ci]!r}, {key}: {exc}") from None
                if isinstance(parsed, str):
                    builder.skip(f"{key} {parsed}")
                    continue
                a, b = parsed
                _check_span(path, lineno, a, b, length, f"{raw_id} {key} {loc}")
                note = "; ".join(quals.get("note", []))
                _add_feature(builder, pid, key, feature_concepts(key, note, quals.get("ligand", [])), a - 1, b)
    if header is None:
        raise _err(path, None, "empty file (expected a UniProt TSV header line)")
    return _finish(builder, lengths, path)


# ================================================================================================ TMbed
def load_tmbed(
    path: str | Path,
    sequences: Mapping[str, str] | None = None,
    *,
    unknown_ids: str = "error",
    topology: bool = True,
    check_sequence: bool = True,
) -> ResidueLabels:
    """TMbed 3-line records: `>ID|KINGDOM|SPTYPE|n`, sequence, one label letter per residue.

    H/h (the two orientations) -> transmembrane helix, B/b -> transmembrane beta strand, S -> signal peptide,
    1/2 -> cytoplasmic / extracellular-or-lumenal side (`topology=False` leaves those out), U (unresolved) ->
    masked. Each run of one letter is an instance, so a helix in one orientation directly followed by one in the
    other counts as two helices. The id is the first `|` field of the header.
    """
    ids = _IdMatcher(path, sequences, unknown_ids)
    builder = ResidueLabelBuilder()
    lengths: dict[str, int] = {}
    seen: dict[str, int] = {}
    lines = [(n, l) for n, l in _lines(path) if l.strip()]
    if not lines:
        raise _err(path, None, "empty file (expected TMbed 3-line records)")
    k = 0
    while k < len(lines):
        hline, header = lines[k]
        if not header.startswith(">"):
            raise _err(path, hline, f"expected a '>' header line, got {header[:40]!r}")
        if k + 2 >= len(lines) or lines[k + 1][1].startswith(">") or lines[k + 2][1].startswith(">"):
            raise _err(path, hline, "incomplete record: a TMbed record is a header, a sequence and a label line")
        (sline, seq), (lline, lab) = lines[k + 1], lines[k + 2]
        k += 3
        raw_id = header[1:].split("|", 1)[0].strip()
        if not raw_id:
            raise _err(path, hline, "header without an id")
        seq, lab = seq.strip(), lab.strip()
        if not seq.isalpha():
            bad = next(c for c in seq if not c.isalpha())
            raise _err(path, sline, f"sequence of {raw_id} contains {bad!r}")
        wrong = [(i, c) for i, c in enumerate(lab) if c not in TMBED_ALPHABET]
        if wrong:
            i, c = wrong[0]
            raise _err(path, lline, f"label {c!r} at residue {i + 1} of {raw_id} is not one of H h B b S 1 2 U")
        if len(lab) != len(seq):
            raise _err(path, lline, f"{raw_id}: {len(lab)} labels for a sequence of {len(seq)} residues")
        pid = ids.resolve(raw_id, hline, builder.skip)
        if pid is None:
            continue
        if pid in seen:
            raise _err(path, hline, f"protein {raw_id} appears twice (first at line {seen[pid]})")
        seen[pid] = hline
        given = ids.sequence(pid)
        if given is not None:
            if len(given) != len(seq) or (check_sequence and given.upper() != seq.upper()):
                raise _err(path, sline, f"the sequence of {raw_id} differs from the given sequence of {pid!r}")
        lengths[pid] = len(seq)
        builder.touch(pid)
        start = 0
        for i in range(1, len(lab) + 1):
            if i < len(lab) and lab[i] == lab[start]:
                continue
            letter = lab[start]
            if letter == "U":
                builder.add_masked(pid, range(start, i))
            else:
                concept = TMBED_CONCEPTS[letter]
                if topology or concept not in (CYTOPLASMIC, NON_CYTOPLASMIC):
                    builder.add_span(pid, concept, start, i)
            start = i
    return _finish(builder, lengths, path)


# =================================================================================== binding-residue lists
def _binding_concept(path: str | Path, concept: str | None) -> str:
    if concept is not None:
        return BINDING_CLASSES.get(concept.lower(), concept)
    name = Path(path).name.lower()
    hits = [c for c in BINDING_CLASSES if c in name]
    if len(hits) != 1:
        raise _err(
            path,
            None,
            "cannot tell the ligand class from the file name; pass concept='metal', 'nuclear', 'small' or a concept id",
        )
    return BINDING_CLASSES[hits[0]]


def load_binding(
    path: str | Path,
    sequences: Mapping[str, str] | None = None,
    *,
    concept: str | None = None,
    unknown_ids: str = "error",
) -> ResidueLabels:
    """bindEmbed21 / bindPredict residue lists: `ACC<TAB>comma-separated 1-based positions`, one ligand class per file.

    The class comes from `concept` ("metal", "nuclear", "small", or any concept id) or from the file name
    (`binding_residues_2.5_metal.txt`). A protein listed with no positions is annotated with none (all its
    residues negatives). Each run of consecutive binding residues is one instance.
    """
    target = _binding_concept(path, concept)
    ids = _IdMatcher(path, sequences, unknown_ids)
    builder = ResidueLabelBuilder()
    lengths: dict[str, int] = {}
    seen: dict[str, int] = {}
    for lineno, line in _lines(path):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            raise _err(path, lineno, f"expected 'ID<TAB>positions', got {len(fields)} tab-separated fields")
        raw_id, pos_text = fields[0].strip(), fields[1].strip()
        if not raw_id:
            raise _err(path, lineno, "empty protein id")
        positions: list[int] = []
        for tok in pos_text.split(",") if pos_text else []:
            tok = tok.strip()
            if not tok.isdigit():
                raise _err(path, lineno, f"position {tok!r} of {raw_id} is not a positive integer")
            positions.append(int(tok))
        pid = ids.resolve(raw_id, lineno, builder.skip)
        if pid is None:
            continue
        if pid in seen:
            raise _err(path, lineno, f"protein {raw_id} is listed twice (first at line {seen[pid]})")
        seen[pid] = lineno
        length = ids.length(pid)
        for p in positions:
            _check_span(path, lineno, p, p, length, f"{raw_id} binding residue")
        if length is not None:
            lengths[pid] = length
        builder.touch(pid)
        residues = [p - 1 for p in positions]
        builder.add_residues(pid, target, residues)
        for span in _runs(residues):
            builder.add_instance_span(pid, target, span)
    return _finish(builder, lengths, path)


# ================================================================================================== GO
_GO_ID = re.compile(r"^GO:\d{7}$")
_GO_IN_TEXT = re.compile(r"\[(GO:\d{7})\]$")
_GAF_TAXON = re.compile(r"^taxon:\d+(?:\|taxon:\d+)?$")
_GAF_DATE = re.compile(r"^\d{8}$")
_GAF_EVIDENCE = re.compile(r"^[A-Z]{2,4}$")
_GAF_QUALIFIER = re.compile(r"^[A-Za-z_]+$")


def _gaf_problem(f: list[str]) -> str | None:
    """What is wrong with a GAF data line (columns per the GAF 2.x spec), or None."""
    if not (15 <= len(f) <= 17):
        return f"{len(f)} tab-separated columns (GAF has 15 to 17)"
    required = {1: "DB", 2: "DB object id", 5: "GO id", 6: "reference", 7: "evidence code", 9: "aspect",
                12: "object type", 13: "taxon", 14: "date", 15: "assigned by"}
    for col, what in required.items():
        if not f[col - 1].strip():
            return f"column {col} ({what}) is empty"
    if not _GO_ID.match(f[4].strip()):
        return f"column 5 (GO id) {f[4]!r} is not GO:nnnnnnn"
    if not _GAF_EVIDENCE.match(f[6].strip()):
        return f"column 7 (evidence code) {f[6]!r} is not an evidence code"
    if f[8].strip() not in ("P", "F", "C"):
        return f"column 9 (aspect) {f[8]!r} is not P, F or C"
    if not _GAF_TAXON.match(f[12].strip()):
        return f"column 13 (taxon) {f[12]!r} is not taxon:<id>"
    if not _GAF_DATE.match(f[13].strip()):
        return f"column 14 (date) {f[13]!r} is not YYYYMMDD"
    qual = f[3].strip()
    if qual and not all(_GAF_QUALIFIER.match(q) for q in qual.split("|")):
        return f"column 4 (qualifier) {f[3]!r} is malformed"
    return None


def _protein_ids(sequences: Mapping[str, str] | Iterable[str] | None, protein_ids: Iterable[str] | None):
    return protein_ids if protein_ids is not None else sequences


def _finish_go(
    path: str | Path,
    labels: dict[str, set[str]],
    skipped: dict[str, int],
    ontology: Ontology | None,
    propagate: bool,
    relations: Sequence[str],
) -> ProteinLabels:
    concepts = sorted({t for s in labels.values() for t in s})
    out = ProteinLabels(concepts=concepts, names=_names_for(concepts, ontology), labels=labels, skipped=skipped)
    if ontology is not None and propagate:
        out = out.propagate(ontology, relations)
    _report(path, skipped)
    return out


def _go_term(
    path: str | Path, lineno: int, term: str, ontology: Ontology | None, unknown_terms: str, skip: Callable[[str], None]
) -> str | None:
    if ontology is None:
        return term
    r = ontology.resolve(term)
    if r is None:
        why = "obsolete" if term in ontology.obsolete else "not in the ontology"
        if unknown_terms == "skip":
            skip(f"annotations to GO terms {why}")
            return None
        raise _err(path, lineno, f"GO term {term} is {why} ({ontology.source}); unknown_terms='skip' drops such lines")
    return r


def load_gaf(
    path: str | Path,
    ontology: Ontology | None = None,
    *,
    sequences: Mapping[str, str] | None = None,
    protein_ids: Iterable[str] | None = None,
    evidence: Iterable[str] | None = EXPERIMENTAL_EVIDENCE,
    aspects: Iterable[str] | None = None,
    unknown_ids: str = "error",
    unknown_terms: str = "error",
    malformed: str = "error",
    propagate: bool = True,
    relations: Sequence[str] = ("is_a",),
    id_column: int = 2,
) -> ProteinLabels:
    """Protein GO labels from a GAF 2.x (or 1.0) file.

    Lines with a NOT qualifier are excluded (they state the protein lacks the function). `evidence` keeps only
    the listed codes (default: the experimental codes DeepGO-SE keeps; None keeps all). With an ontology, alt ids
    resolve to primary ids and labels are propagated to ancestors through `relations` (add "part_of" for GO's
    part_of edges). `id_column` is the 1-based GAF column naming the protein (2 = DB object id, 3 = symbol).
    """
    _check_policy("unknown_terms", unknown_terms)
    _check_policy("malformed", malformed)
    ev = {e.upper() for e in evidence} if evidence is not None else None
    asp = {a.upper() for a in aspects} if aspects is not None else None
    ids = _IdMatcher(path, _protein_ids(sequences, protein_ids), unknown_ids)
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    labels: dict[str, set[str]] = {}
    for lineno, line in _lines(path):
        if not line.strip() or line.startswith("!"):
            continue
        f = line.split("\t")
        problem = _gaf_problem(f)
        if problem is not None:
            if malformed == "skip":
                skip("malformed GAF lines")
                continue
            raise _err(path, lineno, f"malformed GAF line: {problem}")
        if "NOT" in f[3].strip().split("|"):
            skip("annotations with a NOT qualifier")
            continue
        if ev is not None and f[6].strip() not in ev:
            skip("annotations with an evidence code not selected")
            continue
        if asp is not None and f[8].strip() not in asp:
            skip("annotations of other aspects")
            continue
        if not 1 <= id_column <= len(f) or not f[id_column - 1].strip():
            raise _err(path, lineno, f"id column {id_column} is empty")
        pid = ids.resolve(f[id_column - 1].strip(), lineno, skip)
        if pid is None:
            continue
        term = _go_term(path, lineno, f[4].strip(), ontology, unknown_terms, skip)
        if term is None:
            continue
        labels.setdefault(pid, set()).add(term)
    return _finish_go(path, labels, skipped, ontology, propagate, relations)


def _column_index(spec: int | str, header: list[str] | None, path: str | Path, lineno: int) -> int:
    if isinstance(spec, int):
        return spec
    if header is None:
        raise _err(path, lineno, f"column {spec!r} given by name, but the file has no header line")
    low = [h.strip().lower() for h in header]
    if spec.lower() not in low:
        raise _err(path, lineno, f"no column named {spec!r} in the header")
    return low.index(spec.lower())


def _go_tokens(cell: str) -> list[str] | None:
    """GO ids in a cell (`GO:1,GO:2`, `GO:1; GO:2`, or UniProt's `name [GO:1]; ...`); None if a token is not one."""
    out: list[str] = []
    for tok in re.split(r"[,;|]", cell):
        tok = tok.strip()
        if not tok:
            continue
        if _GO_ID.match(tok):
            out.append(tok)
            continue
        m = _GO_IN_TEXT.search(tok)
        if not m:
            return None
        out.append(m.group(1))
    return out


def load_go_tsv(
    path: str | Path,
    ontology: Ontology | None = None,
    *,
    sequences: Mapping[str, str] | None = None,
    protein_ids: Iterable[str] | None = None,
    unknown_ids: str = "error",
    unknown_terms: str = "error",
    propagate: bool = True,
    relations: Sequence[str] = ("is_a",),
    id_column: int | str = 0,
    go_column: int | str = 1,
) -> ProteinLabels:
    """Protein GO labels from `id<TAB>GO:1,GO:2` lines (an optional header line; `#` lines are comments).

    Also reads UniProt's GO columns (`name [GO:0006526]; ...`) when `go_column` names one. A protein with an
    empty GO field is annotated with no term. Several lines for one protein add up.
    """
    _check_policy("unknown_terms", unknown_terms)
    ids = _IdMatcher(path, _protein_ids(sequences, protein_ids), unknown_ids)
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    labels: dict[str, set[str]] = {}
    header: list[str] | None = None
    icol = gcol = -1
    first = True
    for lineno, line in _lines(path):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if first:
            first = False
            gi = go_column if isinstance(go_column, int) else -1
            looks_header = isinstance(id_column, str) or isinstance(go_column, str)
            if not looks_header and 0 <= gi < len(fields):
                cell = fields[gi].strip()
                looks_header = bool(cell) and _go_tokens(cell) is None
            if looks_header:
                header = fields
                icol = _column_index(id_column, header, path, lineno)
                gcol = _column_index(go_column, header, path, lineno)
                continue
            icol = _column_index(id_column, None, path, lineno)
            gcol = _column_index(go_column, None, path, lineno)
        if max(icol, gcol) >= len(fields):
            raise _err(path, lineno, f"expected at least {max(icol, gcol) + 1} tab-separated fields, got {len(fields)}")
        raw_id = fields[icol].strip()
        if not raw_id:
            raise _err(path, lineno, "empty protein id")
        terms = _go_tokens(fields[gcol])
        if terms is None:
            raise _err(path, lineno, f"GO field {fields[gcol][:60]!r} is not a list of GO ids")
        pid = ids.resolve(raw_id, lineno, skip)
        if pid is None:
            continue
        dest = labels.setdefault(pid, set())
        for t in terms:
            r = _go_term(path, lineno, t, ontology, unknown_terms, skip)
            if r is not None:
                dest.add(r)
    return _finish_go(path, labels, skipped, ontology, propagate, relations)


# ========================================================================================= generic TSV
def load_generic_tsv(
    path: str | Path,
    sequences: Mapping[str, str] | None = None,
    *,
    unknown_ids: str = "error",
    ontology: Ontology | None = None,
) -> ResidueLabels:
    """`id<TAB>start<TAB>end<TAB>concept[<TAB>name]`, 1-based inclusive; `#` lines and an `id ...` header skipped.

    Each line is one instance. `concept` is kept as written (any id scheme), except that with an ontology a
    term *name* (`zinc binding`) is turned into its id. Names come from the optional fifth column, else the
    ontology, else the shipped concept ontology.
    """
    ids = _IdMatcher(path, sequences, unknown_ids)
    builder = ResidueLabelBuilder()
    lengths: dict[str, int] = {}
    first = True
    for lineno, line in _lines(path):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if first:
            first = False
            if fields[0].strip().lower() in ("id", "protein_id", "protein") and not (
                len(fields) > 1 and fields[1].strip().isdigit()
            ):
                continue
        if len(fields) not in (4, 5):
            raise _err(path, lineno, f"expected 'id<TAB>start<TAB>end<TAB>concept', got {len(fields)} fields")
        raw_id, s_text, e_text, concept = (x.strip() for x in fields[:4])
        if not raw_id:
            raise _err(path, lineno, "empty protein id")
        if not concept:
            raise _err(path, lineno, "empty concept")
        try:
            start, end = int(s_text), int(e_text)
        except ValueError:
            raise _err(path, lineno, f"start {s_text!r} and end {e_text!r} must be integers") from None
        pid = ids.resolve(raw_id, lineno, builder.skip)
        if pid is None:
            continue
        length = ids.length(pid)
        _check_span(path, lineno, start, end, length, f"{raw_id} {concept}")
        if ontology is not None and concept not in ontology:
            by_name = ontology.find_by_name(concept)
            if by_name is not None:
                concept = by_name
        if len(fields) == 5 and fields[4].strip():
            builder.names.setdefault(concept, fields[4].strip())
        if length is not None:
            lengths[pid] = length
        builder.add_span(pid, concept, start - 1, end)
    labels = builder.build(lengths=lengths)
    names = _names_for(labels.concepts, ontology, concept_ontology())
    names.update({c: n for c, n in builder.names.items() if c in labels.concepts})
    labels.names = names
    _report(path, labels.skipped)
    return labels


def write_generic_tsv(labels: ResidueLabels, path: str | Path) -> None:
    """Write labels in the generic TSV format (1-based inclusive), so any source can be exported and re-read.

    Contiguous instances are written as they are; residues of a concept not covered by a contiguous instance
    (the two cysteines of a disulfide bond) are written as their own runs, so positions always survive a round
    trip.
    """
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("#id\tstart\tend\tconcept\tname\n")
        for pid, per in labels.positions.items():
            for concept, idx in per.items():
                pos = set(idx.tolist())
                covered: set[int] = set()
                rows: list[tuple[int, int]] = []
                for s, e in labels.instances.get(pid, {}).get(concept, []):
                    span = range(s, e)
                    if all(r in pos for r in span):
                        rows.append((s, e))
                        covered.update(span)
                rows += _runs(sorted(pos - covered))
                name = labels.names.get(concept, "")
                for s, e in sorted(rows):
                    fh.write(f"{pid}\t{s + 1}\t{e}\t{concept}\t{name}\n")


# ================================================================================================ dispatch
_LOADERS: dict[str, Callable[..., Any]] = {
    "swissprot": load_swissprot,
    "uniprot-xml": load_uniprot_xml,
    "uniprot-tsv": load_uniprot_tsv,
    "tmbed": load_tmbed,
    "binding": load_binding,
    "generic-tsv": load_generic_tsv,
}


def load_annotations(
    path: str | Path,
    fmt: str | None = None,
    sequences: Mapping[str, str] | None = None,
    ontology: Ontology | None = None,
    **opts: Any,
) -> ResidueLabels | ProteinLabels:
    """Load any supported annotation file; `fmt=None` or "auto" infers the format from name and content.

    With an ontology, labels are propagated to ancestors (`propagate=False` to keep direct annotations only;
    `relations=("is_a", "part_of")` to follow part_of too). Residue formats without an ontology return direct
    labels named from the shipped concept ontology.
    """
    if fmt in (None, "auto"):
        fmt = infer_format(path)
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise InputError(f"unknown annotation format {fmt!r}; expected one of {', '.join(FORMATS)}")
    propagate = opts.pop("propagate", True)
    relations = opts.pop("relations", ("is_a",))
    if fmt == "gaf":
        return load_gaf(path, ontology, sequences=sequences, propagate=propagate, relations=relations, **opts)
    if fmt == "go-tsv":
        return load_go_tsv(path, ontology, sequences=sequences, propagate=propagate, relations=relations, **opts)
    if fmt == "generic-tsv":
        labels = load_generic_tsv(path, sequences, ontology=ontology, **opts)
    else:
        labels = _LOADERS[fmt](path, sequences, **opts)
    if ontology is not None and propagate:
        labels = labels.propagate(ontology, relations)
    return labels


def infer_format(path: str | Path) -> str:
    """Guess the annotation format from the file name, then from the first lines."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(".obo"):
        raise _err(path, None, "this is an ontology (OBO), not an annotation file")
    if name.endswith((".gaf", ".gpa")):
        return "gaf"
    if name.endswith(".xml"):
        return "uniprot-xml"
    if name.endswith((".dat", ".swiss", ".sp")):
        return "swissprot"
    head: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            head.append(line)
        if len(head) >= 30:
            break
    if not head:
        raise _err(path, None, "empty file: cannot infer its annotation format")
    first = head[0]
    if first.startswith("ID   "):
        return "swissprot"
    if first.lstrip().startswith(("<?xml", "<uniprot")):
        return "uniprot-xml"
    if first.startswith("!gaf-version") or first.startswith("!"):
        return "gaf"
    if first.startswith(">"):
        if len(head) >= 3 and set(head[2].strip()) <= TMBED_ALPHABET:
            return "tmbed"
        raise _err(path, None, "FASTA-like file whose third line is not a TMbed label string")
    fields0 = first.split("\t")
    low0 = [f.strip().lower() for f in fields0]
    if any(c in low0 for c in _TSV_ID_COLUMNS) and any(h in UNIPROT_TSV_COLUMNS for h in low0):
        return "uniprot-tsv"
    data = [l for l in head if not l.startswith("#")]
    if data and data[0].split("\t")[0].strip().lower() in ("id", "protein_id", "protein"):
        data = data[1:]
    if not data:
        raise _err(path, None, "no data lines: cannot infer the annotation format")
    rows = [l.split("\t") for l in data]
    if all(15 <= len(r) <= 17 and _GO_ID.match(r[4].strip()) for r in rows):
        return "gaf"
    if all(len(r) == 2 and re.match(r"^\s*(\d+\s*(,\s*\d+\s*)*)?$", r[1]) for r in rows):
        return "binding"
    if all(len(r) >= 2 and _go_tokens(r[1]) is not None for r in rows):
        return "go-tsv"
    if all(len(r) in (4, 5) and r[1].strip().isdigit() and r[2].strip().isdigit() for r in rows):
        return "generic-tsv"
    raise _err(path, None, "cannot infer the annotation format; name it explicitly (--annotation-format)")
