"""Shipped model files (installed as `protsae_cli.models`): the stand-in PLM and the default SAE.

The stand-in is a small masked protein LM of the esm2_t6_8M_UR50D shape trained by the team, shipped so that
`protsae annotate` works on a fresh, offline machine. It is a demonstration model, not ESM-2.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
STANDIN_PLM_NAME = "esm2_t6_8M_standin"


def standin_plm_dir() -> Path:
    return MODELS_DIR / "standin_plm"


def default_sae_dir() -> Path:
    """The SAE `annotate` uses when no --sae is given (trained on the stand-in PLM)."""
    return MODELS_DIR / "default_sae"


def concept_ontology_path() -> Path:
    """The project's small OBO ontology of residue-level concepts (e.g. zinc binding is_a metal binding)."""
    return MODELS_DIR / "residue_concepts.obo"
