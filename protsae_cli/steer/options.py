"""The options of `protsae steer` (SteerSpec: what decides the sequences; SteerOptions: one run) and the choices
they take, with every default.

Why a module of its own: the CLI reads its defaults and choices from here, and must not import torch to show
`--help` or to reject a bad option, so this module imports nothing heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protsae_cli.errors import InputError

MODES = ("add", "clamp", "multiply")
DECODES = ("argmax", "iterative", "gibbs", "sample")
MASK_STRATEGIES = ("random", "low-activation")
POSITIONS = ("masked", "all")
EDIT_SCOPES = ("all", "designed")
CONTROLS = ("random-latent", "activity-matched")
INITS = ("mask", "random")
PPPL_POSITIONS = ("all", "designed")

MAX_RESIDUES = 1022

#: Pseudo-perplexity positions scored per sequence on CPU when --pppl-max-positions is not given. Each scored
#: position is one forward pass of the whole sequence; scoring every residue of the 20 bundled proteins under
#: 7 conditions is ~50,000 passes (hours on a laptop CPU), 32 seeded positions per sequence keep it to minutes.
CPU_PPPL_MAX_POSITIONS = 32


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class SteerSpec:
    """Everything that decides which sequences come out (recorded verbatim in the TSV provenance)."""

    concept: str
    strengths: tuple[float, ...] = (1.0,)
    mode: str = "add"
    with_ancestors: bool = False
    keep_error: bool = True
    positions: str = "masked"
    mask_ratio: float = 0.3
    mask_strategy: str = "random"
    edit_scope: str = "all"
    decode: str = "argmax"
    iterations: int = 4
    temperature: float = 1.0
    seed: int = 0
    controls: tuple[str, ...] = ()
    n_controls: int = 1
    init: str = "mask"
    pppl: bool = True
    pppl_positions: str = "all"
    pppl_max_positions: int | None = None

    def validate(self) -> None:
        for name, value, choices in (("mode", self.mode, MODES), ("decode", self.decode, DECODES),
                                     ("mask strategy", self.mask_strategy, MASK_STRATEGIES),
                                     ("positions", self.positions, POSITIONS),
                                     ("edit scope", self.edit_scope, EDIT_SCOPES), ("init", self.init, INITS),
                                     ("pppl positions", self.pppl_positions, PPPL_POSITIONS)):
            if value not in choices:
                raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        for c in self.controls:
            if c not in CONTROLS:
                raise InputError(f"unknown control {c!r}; choose one of {', '.join(CONTROLS)}")
        if not self.strengths:
            raise InputError("give at least one strength")
        if any(not math.isfinite(s) for s in self.strengths):
            raise InputError(f"strengths must be finite numbers, got {list(self.strengths)}")
        if not 0.0 < self.mask_ratio <= 1.0:
            raise InputError(f"--mask-ratio must be in (0, 1], got {self.mask_ratio}")
        if self.iterations < 1:
            raise InputError(f"--iterations must be >= 1, got {self.iterations}")
        if self.decode in ("sample", "gibbs") and not self.temperature > 0:
            raise InputError(f"--temperature must be > 0 for {self.decode} decoding, got {self.temperature}")
        if self.n_controls < 1:
            raise InputError(f"--n-controls must be >= 1, got {self.n_controls}")
        if self.pppl_max_positions is not None and self.pppl_max_positions < 0:
            raise InputError(f"--pppl-max-positions must be >= 0 (0: all positions), got {self.pppl_max_positions}")


@dataclass
class SteerOptions:
    """One `protsae steer` run: inputs, models, outputs and the steering spec."""

    spec: SteerSpec
    output: str
    input: str | None = None
    length: int | None = None
    num: int | None = None
    sae: str | None = None
    model: str | None = None
    ontology: str | None = None
    device: str = "auto"
    attention: str = "auto"
    check_plm: bool = True
    threads: int | None = None
    command: str = ""
    progress: bool = True
