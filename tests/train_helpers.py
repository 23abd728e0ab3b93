"""Tiny training inputs shared by the training tests: random proteins and residue concepts that a random tiny
ESM-2 can represent (residue identity), written as FASTA + generic TSV."""

from __future__ import annotations

import random
from pathlib import Path

AA = "ACDEFGHIKLMNPQRSTVWY"
ZINC = "PSC:0000211"      # zinc binding (is_a metal binding is_a binding site)
DNA = "PSC:0000241"       # DNA binding (is_a nucleic-acid binding is_a binding site)
# Concept = residue identity: C/H residues "bind zinc", K/R residues "bind DNA".
RULES = {ZINC: "CH", DNA: "KR"}


def proteins(n: int = 60, seed: int = 0, lo: int = 30, hi: int = 80) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"P{i}", "".join(rng.choice(AA) for _ in range(rng.randint(lo, hi)))) for i in range(n)]


def write_fasta(path: Path, prots: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{pid} test protein\n{seq}\n" for pid, seq in prots))
    return path


def write_concept_tsv(path: Path, prots: list[tuple[str, str]], rules: dict[str, str] = RULES,
                      skip: set[str] = frozenset()) -> Path:
    """Generic TSV (id, start, end, concept; 1-based inclusive) marking every residue a rule names."""
    lines = ["#id\tstart\tend\tconcept"]
    for pid, seq in prots:
        if pid in skip:
            continue
        for j, a in enumerate(seq):
            for concept, letters in rules.items():
                if a in letters:
                    lines.append(f"{pid}\t{j + 1}\t{j + 1}\t{concept}")
    path.write_text("\n".join(lines) + "\n")
    return path
