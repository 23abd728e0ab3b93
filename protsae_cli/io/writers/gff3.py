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
* Duplicate protein ids are legal input, but a GFF3 seqid names one sequence, so a repeated id cannot be
  written twice (``gt gff3validator``: "sequence region defined twice"). The first protein with an id keeps it;
  the n-th (n >= 2) becomes ``<id>.<n>`` (the next free ``.<n>`` if that name is taken by another input id),
  its features carry ``original_id=<id>``, and a ``#protsae_seqid <seqid> <record> <id>`` comment before its
  region line records the mapping (record = 1-based input record number). This needs a set of the seqids
  written so far: 64-bit hashes, about 60 bytes per protein (60 MB per million proteins). A hash collision
  can only rename a protein that did not need it, never let a repeat through.
* ``ID`` is ``p<protein_index>.<n>``: unique in the file because protein indexes are unique input ordinals,
  and stable across sharding, so merged shards never collide.
* type is the concept's Sequence Ontology term (``ontology.concept_terms``): an SO id written in its
  ontology_id, else its own or nearest ancestor's SO xref in the shipped concept ontology (signal_peptide,
  transmembrane_polypeptide_region, metal_binding_site ...), by name when the ontology names it, else as the
  accession (the spec allows both); ``polypeptide_region`` (SO:0000839) when there is none.
* ``Ontology_term`` lists the concept's SO and GO ids (feature type first), ``Dbxref`` its GO ids, so the file
  lines up with InterProScan's GFF3; ``concept_id`` is the protsae (PSC) id.
* score (column 6) is the segment's max activation; ``n_residues`` is the span ``end - start + 1`` (including
  residues bridged by ``--merge-gap``), ``mean_activation`` is over on-residues only. ``concept_precision``,
  ``concept_recall``, ``concept_f1`` are the concept's validated reliability and ``score`` the segment's
  calibrated probability (docs/CALLS.md); they are left out when not measured.
* Attribute values percent-encode ``; = % & ,``, tab, CR, LF and control characters; other non-ASCII text
  stays UTF-8. ontology_id may hold several comma-separated terms, which become a multi-value attribute.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from protsae_cli.call.concepts import ConceptLookup, segment_score
from protsae_cli.labels.ontology import concept_terms
from protsae_cli.io.results import ProteinResult
from protsae_cli.io.writers import identity_trailer, split_identity
from protsae_cli.io.atomic import OutputWriter, TextOutput
from protsae_cli.io.writers.tsv import format_float, format_metric, sorted_segments

if TYPE_CHECKING:
    from protsae_cli.sae.config import ConceptEntry

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


def _feature_type(ontology_id: str, concept_id: str = "") -> str:
    t = concept_terms(concept_id, ontology_id)
    if t.so_id != "SO:0000839" or any(x.strip().upper() == "SO:0000839" for x in ontology_id.split(",")):
        return SO_NAMES.get(t.so_id, t.feature_type)
    return DEFAULT_TYPE


class SeqidMap:
    """Unique GFF3 seqids for possibly repeated protein ids (see the module docstring for the rule)."""

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._next: dict[int, int] = {}

    @staticmethod
    def _h(seqid: str) -> int:
        return int.from_bytes(hashlib.blake2b(seqid.encode("utf-8"), digest_size=8).digest(), "little")

    def assign(self, base: str) -> str:
        """The seqid for the next protein whose escaped id is `base` (`base` itself the first time)."""
        h = self._h(base)
        if h not in self._seen:
            self._seen.add(h)
            return base
        n = self._next.get(h, 2)
        while self._h(f"{base}.{n}") in self._seen:
            n += 1
        self._next[h] = n + 1
        seqid = f"{base}.{n}"
        self._seen.add(self._h(seqid))
        return seqid


def _comment_line(key: str, value: object) -> str:
    # A comment must stay on one line and must not turn into a "##" directive.
    text = f"#{key} {value}".replace("\r", " ").replace("\n", " ")
    if text.startswith("##"):
        text = "# " + text[1:]
    return text + "\n"


class GFF3Writer(OutputWriter):
    """Streaming GFF3 (``*.gz`` for gzip, ``-`` for stdout); see the module docstring for the conventions."""

    def __init__(self, path: str | os.PathLike[str], provenance: Mapping[str, str | int | float],
                 concepts: Sequence[ConceptEntry], d_sae: int, k: int, *, source: str = "protsae"):
        super().__init__()
        self.path = path
        self.d_sae, self.k = int(d_sae), int(k)
        self.lookup = ConceptLookup(concepts)
        self.source = escape_text_column(source) or "protsae"
        self.n_features = 0
        self.seqids = SeqidMap()
        provenance, identity = split_identity(provenance)
        self.set_input_identity(identity)
        self.out = TextOutput(path)
        self.out.write("##gff-version 3\n" + "".join(_comment_line(k_, v) for k_, v in provenance.items()))

    def _write(self, result: ProteinResult) -> None:
        base = escape_seqid(result.id) if result.id else f"protsae_protein_{result.index}"
        seqid = self.seqids.assign(base)
        renamed = seqid != base
        lines = []
        if renamed:
            lines.append(_comment_line("protsae_seqid", f"{seqid} {result.index + 1} {base}"))
        if result.length > 0:
            lines.append(f"##sequence-region {seqid} 1 {result.length}\n")
        n = 0
        for seg in sorted_segments(result.segments):
            entries: list[ConceptEntry | None] = list(self.lookup.entries(seg)) or [None]
            for c in entries:
                n += 1
                ontology = c.ontology_id.strip() if c else ""
                name = (c.name or c.concept_id) if c else ""
                name = name or f"latent_{seg.latent}"
                attrs = [f"ID=p{result.index}.{n}", f"Name={escape_attr(name)}"]
                std = concept_terms(c.concept_id, ontology) if c else None
                if c is not None and std is not None:
                    own = [t.strip() for t in ontology.split(",") if t.strip()]
                    terms = list(dict.fromkeys([*std.ontology_terms, *own]))
                    if terms:
                        attrs.append("Ontology_term=" + ",".join(escape_attr(t) for t in terms))
                    if std.go_ids:
                        attrs.append("Dbxref=" + ",".join(escape_attr(t) for t in std.go_ids))
                if renamed:
                    attrs.append(f"original_id={escape_attr(result.id)}")
                attrs += [
                    f"latent={seg.latent}",
                    f"concept_id={escape_attr(c.concept_id)}" if c and c.concept_id else "",
                    f"threshold={format_float(seg.threshold)}",
                    f"mean_activation={format_float(seg.mean_act)}",
                    f"n_residues={seg.n_residues}",
                ]
                if c is not None:
                    for key in ("precision", "recall", "f1"):
                        v = getattr(c, key, None)
                        if v is not None:
                            attrs.append(f"concept_{key}={format_metric(v)}")
                    score = segment_score(c, seg.max_act) if getattr(c, "score_curve", None) else None
                    if score is not None:
                        attrs.append(f"score={format_metric(score)}")
                ftype = _feature_type(ontology, c.concept_id if c else "")
                lines.append("\t".join((
                    seqid, self.source, escape_text_column(ftype), str(seg.start), str(seg.end),
                    format_float(seg.max_act), ".", ".", ";".join(a for a in attrs if a),
                )) + "\n")
        self.out.write("".join(lines))
        self.n_features += n

    def _close(self) -> None:
        self.out.write(identity_trailer(self.input_identity))
        self.out.close()

    def _abort(self) -> None:
        self.out.abort()


def rename_block(lines: list[str], seqids: SeqidMap, ordinal: int | None = None) -> list[str]:
    """One protein's GFF3 lines (its ``#protsae_seqid`` comment, ``##sequence-region`` line and features) with
    the seqid `seqids` assigns now, for merging shards: each shard named its proteins on its own, so an id
    repeated across shards came out unrenamed in both. The original id comes from the block's mapping comment,
    else from its seqid; the block is rewritten only when the seqid changes."""
    base = current = None
    for line in lines:
        if line.startswith("#protsae_seqid "):
            parts = line.split()
            if len(parts) == 4:
                current, base = parts[1], parts[3]
                ordinal = int(parts[2]) - 1 if parts[2].isdigit() else ordinal
        elif line.startswith("##sequence-region"):
            current = line.split()[1] if len(line.split()) > 1 else current
        elif not line.startswith("#") and line.strip():
            cols = line.split("\t")
            current = current or cols[0]
            m = re.search(r"(?:^|;)ID=p(\d+)\.", cols[8]) if len(cols) == 9 else None
            ordinal = int(m.group(1)) if m else ordinal
    if current is None:
        return lines
    base = base or current
    new = seqids.assign(base)
    if new == current:
        return lines
    out = [] if new == base else [_comment_line(
        "protsae_seqid", f"{new} {ordinal + 1 if ordinal is not None else '.'} {base}")]
    original = escape_attr(unquote_seqid(base))
    for line in lines:
        if line.startswith("#protsae_seqid "):
            continue
        if line.startswith("##sequence-region"):
            parts = line.split()
            out.append(" ".join([parts[0], new, *parts[2:]]) + "\n")
        elif line.startswith("#") or not line.strip():
            out.append(line)
        else:
            cols = line.rstrip("\n").split("\t")
            attrs = [a for a in cols[8].split(";") if not a.startswith("original_id=")]
            if new != base:  # where the writer puts it: just before latent=
                at = next((i for i, a in enumerate(attrs) if a.startswith("latent=")), len(attrs))
                attrs.insert(at, f"original_id={original}")
            out.append("\t".join([new, *cols[1:8], ";".join(attrs)]) + "\n")
    return out


def unquote_seqid(seqid: str) -> str:
    """Inverse of `escape_seqid` (percent-decoding of UTF-8 bytes)."""
    from urllib.parse import unquote

    return unquote(seqid)
