"""No code runs from a data file: an SAE's config names a PLM, never a path that gets unpickled; the
contact-regression file beside a checkpoint is read as plain tensors only; shapes are checked before allocation.

Each payload is a pickle whose `__reduce__` creates a marker file: the marker must never appear.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from protsae_cli.errors import InputError
from tests.conftest import write_fair_esm_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "proteins.fasta"


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _poisoned_pickle(path: Path, marker: Path) -> Path:
    torch.save({"cfg": _Payload(marker), "model": {}}, path)
    return path


def _sae_recording_plm(tmp_path: Path, plm_name: str) -> Path:
    from protsae_cli.models import default_sae_dir

    sae = tmp_path / "sae"
    shutil.copytree(default_sae_dir(), sae)
    cfg = json.loads((sae / "config.json").read_text())
    cfg["plm"]["name"] = plm_name
    (sae / "config.json").write_text(json.dumps(cfg))
    return sae


def _protsae(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "protsae_cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("command", ["annotate", "steer"])
def test_sae_config_plm_path_is_never_unpickled(tmp_path: Path, command: str) -> None:
    marker = tmp_path / "PWNED"
    evil = _poisoned_pickle(tmp_path / "esm2_evil.pt", marker)
    sae = _sae_recording_plm(tmp_path, str(evil))
    if command == "annotate":
        r = _protsae("annotate", str(EXAMPLE), "--sae", str(sae), "-o", str(tmp_path / "out"), "--device", "cpu")
    else:
        r = _protsae("steer", "--sae", str(sae), "--concept", "transmembrane helix", "--device", "cpu",
                     "--input", str(EXAMPLE),
                     "-o", str(tmp_path / "steer"))
    assert not marker.exists(), "a pickle named in an SAE config was executed"
    assert r.returncode == 3, r.stderr
    assert "not a model name" in r.stderr and "--model" in r.stderr


def test_contact_regression_beside_a_checkpoint_is_not_unpickled(tmp_path: Path) -> None:
    from protsae_cli.plm import load_plm

    ckpt = write_fair_esm_checkpoint(tmp_path / "esm2_t3_tiny.pt", regression=False)
    marker = tmp_path / "PWNED"
    torch.save({"model": _Payload(marker)}, tmp_path / "esm2_t3_tiny-contact-regression.pt")
    with pytest.warns(UserWarning, match="contact-regression.pt: not loaded"):
        plm = load_plm(str(ckpt))
    assert not marker.exists()
    assert plm.name == "esm2_t3_tiny"


def test_plain_contact_regression_still_loads(tmp_path: Path) -> None:
    from protsae_cli.plm import load_plm

    ckpt = write_fair_esm_checkpoint(tmp_path / "esm2_t3_tiny.pt", regression=True)
    plm = load_plm(str(ckpt))
    assert plm.model.contact_head.regression.weight.abs().sum() > 0


def test_recorded_plm_names_only() -> None:
    from protsae_cli.plm import recorded_plm_spec

    assert recorded_plm_spec("esm2_t6_8M_standin", "c") is None
    assert recorded_plm_spec("", "c") is None
    assert recorded_plm_spec("esm2_t33_650M_UR50D", "c") == "esm2_t33_650M_UR50D"
    for bad in ("/tmp/x.pt", "../esm2_t6_8M_UR50D", "models/x", "esm2_custom"):
        with pytest.raises(InputError, match="not a model name"):
            recorded_plm_spec(bad, "c")


def _sae_with(tmp_path: Path, **changes: int) -> Path:
    from protsae_cli.models import default_sae_dir

    sae = tmp_path / "sae"
    shutil.copytree(default_sae_dir(), sae)
    cfg = json.loads((sae / "config.json").read_text())
    cfg.update(changes)
    (sae / "config.json").write_text(json.dumps(cfg))
    return sae


def test_huge_d_sae_refused_before_allocation(tmp_path: Path) -> None:
    from protsae_cli.sae import load_sae

    sae = _sae_with(tmp_path, d_sae=10**12)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"does not match its weights"):
        load_sae(sae)
    assert time.perf_counter() - t0 < 10


def test_d_model_mismatch_names_the_tensor(tmp_path: Path) -> None:
    from protsae_cli.sae import load_sae

    with pytest.raises(InputError, match=r"config.json \(d_model=321.*shape of"):
        load_sae(_sae_with(tmp_path, d_model=321))
