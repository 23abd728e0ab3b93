"""`protsae annotate --sae FOREIGN --sae-layer/--sae-plm/--sae-k`: the flags reach the foreign-SAE loader
(protsae_cli/sae/foreign.py), and a missing one is named with exit 3."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from tests.sae.test_foreign_sae import FASTA, _interplm_relu_state


def test_cli_flags_reach_the_loader(tiny_esm_path, tmp_path: Path) -> None:
    """`protsae annotate --sae ae.pt --sae-k ...`: exit 3 naming the missing flag, then a run that writes codes."""
    fasta = tmp_path / "p.fasta"
    fasta.write_text(FASTA)
    f = tmp_path / "layer_2" / "ae_normalized.pt"
    f.parent.mkdir()
    torch.save(_interplm_relu_state(), f)
    base = [sys.executable, "-m", "protsae_cli", "annotate", str(fasta), "--model", str(tiny_esm_path), "--sae",
            str(f), "--device", "cpu", "--formats", "tsv"]
    r = subprocess.run([*base, "-o", str(tmp_path / "a")], capture_output=True, text=True, timeout=300, check=False,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 3, r.stderr
    assert "--sae-k" in r.stderr and "--sae-layer" not in r.stderr and "--sae-plm" not in r.stderr
    r = subprocess.run([*base, "--sae-k", "8", "-o", str(tmp_path / "b")], capture_output=True, text=True,
                       timeout=300, check=False, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b.tsv").stat().st_size > 0
