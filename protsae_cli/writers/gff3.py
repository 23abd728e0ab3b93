"""Concept segments as GFF3 (Sequence Ontology spec, media type text/gff3), one feature per (concept, segment).

Layout::

    ##gff-version 3
    #protsae_version 0.1.0          provenance, one "#key value" comment per entry
    ##sequence-region <seqid> 1 <length>     for each protein with length > 0, just before its features
    <seqid> protsae <type> <start> <end> <max_act> . . ID=...;Name=...;Ontology_term=...;latent=...;...

Choices worth knowing:

* seqid is the protein id with every character outside ``a-zA-Z0-9.:^*$@!+_?-|`` percent-encoded (UTF-8
  bytes). The spec writes that set as the regex class ``[a-zA-Z0-9.:^*$@!+_?-|]``; we read ``?-|`` as the
  three characters, the evident intent, not as the ASCII range ``?``..``|`` (which would let ``[\\]`{``
  through). An empty id, which GFF3 cannot represent, becomes ``protsae_protein_<index>``.
* Duplicate protein ids are legal input, and each protein still gets its own ``##sequence-region`` line;
  remembering every id seen to suppress repeats would make memory grow with the input. GFF3 validators may
  complain about a repeated region for duplicate ids; the ids are data and are kept verbatim.
* ``ID`` is ``p<protein_index>.<n>``: unique in the file because protein indexes are unique input ordinals,
  and stable across sharding, so merged shards never collide.
* type is ``polypeptide_region`` (SO:0000839) unless the concept's ontology_id names an SO term, which is then
  used (by name when known, else as the accession, which the spec allows).
* score is the segment's max activation; ``n_residues`` is the span ``end - start + 1`` (including residues
  bridged by ``--merge-gap``), ``mean_activation`` is over on-residues only.
* Attribute values percent-encode ``; = % & ,``, tab, CR, LF and control characters; other non-ASCII text
  stays UTF-8. ontology_id may hold several comma-separated terms, which become a multi-value attribute.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from protsae_cli.concepts import ConceptLookup
from protsae_cli.results import ProteinResult
from protsae_cli.writers import identity_trailer, split_identity
from protsae_cli.writers.atomic import OutputWriter, TextOutput
from protsae_cli.writers.tsv import format_float, sorted_segments

if TYPE_CHECKING:
    from protsae_cli.sae import ConceptEntry

DEFAULT_TYPE = "polypeptide_region"
# SO accessions written by name in column 3. Any other SO accession is written as the accession itself,
# which the spec allows and which cannot be wrong, unlike a name table kept by hand.
SO_NAMES: dict[str, str] = {
    "SO:0000839": "polypeptide_region",
    "SO:0000349": "protein_match",
    "SO:0000417": "polypeptide_domain",
    "SO:0000409": "binding_site",
}

_SEQID_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.:^*$@!+_?-|")
_ATTR_UNSAFE = frozenset(";=%&,\x7f") | frozenset(chr(i) for i in range(0x20))


def _percent(ch: str) -> str:
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


def escape_seqid(seqid: str) -> str:
    """Column-1 escaping: everything outside the GFF3 seqid alphabet, which also covers whitespace and ``>``."""
    return "".join(c if c in _SEQID_SAFE else _percent(c) for c in seqid)


def escape_attr(value: str) -> str:
    """Attribute-value escaping: the characters with meaning in column 9, plus controls; UTF-8 kept."""
    return "".join(_percent(c) if c in _ATTR_UNSAFE else c for c in value)


def escape_text_column(value: str) -> str:
    """Columns 2/3 must not contain tabs or line breaks; escaping keeps them round-trippable."""
    return "".join(_percent(c) if c in _ATTR_UNSAFE or c == " " else c for c in value)


def _feature_type(ontology_id: str) -> str:
    for term in ontology_id.split(","):
        term = term.strip()
        if term.upper().startswith("SO:"):
            return SO_NAMES.get(term.upper(), term.upper())
    return DEFAULT_TYPE


def _comment_line(key: str, value: object) -> str:
    # A comment must stay on one line and must not turn into a "##" directive.
    text = f"#{key} {value}".replace("\r", " ").replace("\n", " ")
    if text.startswith("##"):
        text = "# " + text[1:]
    return text + "\n"


class GFF3Writer(OutputWriter):
    """Streaming GFF3 (``*.gz`` for gzip, ``-`` for stdout); see the module docstring for the conventions."""

    def __init__(self, path: str | os.PathLike[str], provenance: Mapping[str, str | int | float],
                 concepts: Sequence["ConceptEntry"], d_sae: int, k: int, *, source: str = "protsae"):
        super().__init__()
        self.path = path
        self.d_sae, self.k = int(d_sae), int(k)
        self.lookup = ConceptLookup(concepts)
        self.source = escape_text_column(source) or "protsae"
        self.n_features = 0
        provenance, identity = split_identity(provenance)
        self.set_input_identity(identity)
        self.out = TextOutput(path)
        self.out.write("##gff-version 3\n" + "".join(_comment_line(k_, v) for k_, v in provenance.items()))

    def _write(self, result: ProteinResult) -> None:
        seqid = escape_seqid(result.id) if result.id else f"protsae_protein_{result.index}"
        lines = []
        if result.length > 0:
            lines.append(f"##sequence-region {seqid} 1 {result.length}\n")
        n = 0
        for seg in sorted_segments(result.segments):
            entries = self.lookup.entries(seg) or [None]
            for c in entries:
                n += 1
                ontology = c.ontology_id.strip() if c else ""
                name = (c.name or c.concept_id) if c else ""
                name = name or f"latent_{seg.latent}"
                attrs = [f"ID=p{result.index}.{n}", f"Name={escape_attr(name)}"]
                if ontology:
                    terms = [t.strip() for t in ontology.split(",") if t.strip()]
                    attrs.append("Ontology_term=" + ",".join(escape_attr(t) for t in terms))
                attrs += [
                    f"latent={seg.latent}",
                    f"concept_id={escape_attr(c.concept_id)}" if c and c.concept_id else "",
                    f"threshold={format_float(seg.threshold)}",
                    f"mean_activation={format_float(seg.mean_act)}",
                    f"n_residues={seg.n_residues}",
                ]
                lines.append("\t".join((
                    seqid, self.source, _feature_type(ontology), str(seg.start), str(seg.end),
                    format_float(seg.max_act), ".", ".", ";".join(a for a in attrs if a),
                )) + "\n")
        self.out.write("".join(lines))
        self.n_features += n

    def _close(self) -> None:
        self.out.write(identity_trailer(self.input_identity))
        self.out.close()

    def _abort(self) -> None:
        self.out.abort()
