"""Concept calls as JSON Lines: one JSON object per protein, in input order (``--formats jsonl``).

Why a fourth format: TSV and GFF3 have one row per segment, so a protein is spread over many lines and a
protein without calls has no line at all; pipelines that consume per-protein records (InterProScan 6 writes
JSON Lines, as do most LLM/ML data tools) want exactly one self-contained record per protein, proteins without
calls and invalid ones included, parseable with nothing but a JSON library. The codes themselves stay in the
HDF5 file; this is the calls.

Each line::

    {"protein_id": "P12345", "protein_index": 0, "length": 120, "seq_md5": "...", "status": "ok",
     "status_detail": "", "segments": [{"start": 5, "end": 27, "latent": 3, "concept_id": "PSC:0000101",
     "concept_name": "...", "ontology_id": "SO:0001077", "max_act": 1.23, "mean_act": 0.8, "threshold": 0.1,
     ...reliability fields of the concept when the SAE records them...}]}

Positions are 1-based inclusive like TSV and GFF3; floats keep HDF5's float32 digits (``%.4g`` like the TSV);
the file is UTF-8 without escaping non-ASCII (``ensure_ascii=False``). Provenance (models, checksums, options)
is in the HDF5 attributes and the GFF3 header, not repeated on every line. The input's identity is not
recorded (as for TSV), so merge HDF5 shards to produce a merged JSON Lines file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from protsae_cli.call.concepts import ConceptLookup, segment_score
from protsae_cli.io.results import ProteinResult, Segment
from protsae_cli.io.atomic import OutputWriter, TextOutput
from protsae_cli.io.writers.tsv import sorted_segments

if TYPE_CHECKING:
    from protsae_cli.sae.config import ConceptEntry

# Concept fields copied into each segment when the SAE's concept table has them (see docs/ARCHITECTURE.md).
_RELIABILITY_FIELDS = ("kind", "precision", "recall", "f1", "positives", "label_source")


def _number(x: float | None) -> float | None:
    """Four significant digits, like the TSV; JSON has no NaN/inf, so those become null."""
    if x is None or not math.isfinite(float(x)):
        return None
    return float(f"{float(x):.4g}")


class JSONLWriter(OutputWriter):
    """Streaming JSON Lines (``*.gz`` for gzip); constructor shape shared with the other writers."""

    def __init__(self, path: str | os.PathLike[str], provenance: Mapping[str, Any],
                 concepts: Sequence[ConceptEntry], d_sae: int, k: int):
        super().__init__()
        self.path = path
        self.lookup = ConceptLookup(concepts)
        self.out = TextOutput(path)
        self.n_proteins = 0

    def _segment(self, seg: Any, concept: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "start": seg.start, "end": seg.end, "latent": seg.latent,
            "concept_id": concept.concept_id if concept else None,
            "concept_name": (concept.name or None) if concept else None,
            "ontology_id": (concept.ontology_id or None) if concept else None,
            "max_act": _number(seg.max_act), "mean_act": _number(seg.mean_act), "threshold": _number(seg.threshold),
        }
        for name in _RELIABILITY_FIELDS:  # only what was measured: no validation positives means no numbers
            value = getattr(concept, name, None) if concept else None
            if value is None or value == "" or (name == "positives" and not value):
                continue
            rec[name] = _number(value) if isinstance(value, float) else value
        score = segment_score(concept, seg.max_act) if getattr(concept, "score_curve", None) else None
        if score is not None:
            rec["score"] = _number(score)
        return rec

    def _entries_or_none(self, seg: Segment) -> list[ConceptEntry | None]:
        """The segment's concepts, or [None]: a segment of an unnamed latent is still written."""
        return list(self.lookup.entries(seg)) or [None]

    def _write(self, result: ProteinResult) -> None:
        segments = [self._segment(seg, c) for seg in sorted_segments(result.segments)
                    for c in self._entries_or_none(seg)]
        record = {"protein_id": result.id, "protein_index": result.index, "length": result.length,
                  "seq_md5": result.seq_md5 or None, "status": result.status,
                  "status_detail": result.status_detail or "", "segments": segments}
        self.out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.n_proteins += 1

    def _close(self) -> None:
        self.out.close()

    def _abort(self) -> None:
        self.out.abort()
