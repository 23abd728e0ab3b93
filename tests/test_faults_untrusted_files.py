"""No code runs from a data file: an SAE's config names a PLM, never a path that gets unpickled; the
contact-regression file beside a checkpoint is read as plain tensors only; shapes are checked before allocation.

Each payload is a pickle whose `__reduce__` creates a marker file: the marker must never appear.
"""

from __future__ import annotations

import json
import os
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
                     "--input", str(EXAMPLE.with_name("membrane.fasta")),  # steer refuses > 1022 residues first
                     "-o", str(tmp_path / "steer"))
    assert not marker.exists(), "a pickle named in an SAE config was executed"
    assert r.returncode == 3, r.stderr
    assert "not a model name" in r.stderr and "--model" in r.stderr


def test_contact_regression_beside_a_checkpoint_is_not_unpickled(tmp_path: Path) -> None:
    from protsae_cli.plm.loading import load_plm

    ckpt = write_fair_esm_checkpoint(tmp_path / "esm2_t3_tiny.pt", regression=False)
    marker = tmp_path / "PWNED"
    torch.save({"model": _Payload(marker)}, tmp_path / "esm2_t3_tiny-contact-regression.pt")
    with pytest.warns(UserWarning, match="contact-regression.pt: not loaded"):
        plm = load_plm(str(ckpt))
    assert not marker.exists()
    assert plm.name == "esm2_t3_tiny"


def test_plain_contact_regression_still_loads(tmp_path: Path) -> None:
    from protsae_cli.plm.loading import load_plm

    ckpt = write_fair_esm_checkpoint(tmp_path / "esm2_t3_tiny.pt", regression=True)
    plm = load_plm(str(ckpt))
    assert plm.model.contact_head.regression.weight.abs().sum() > 0


def test_recorded_plm_names_only() -> None:
    from protsae_cli.plm.loading import recorded_plm_spec

    assert recorded_plm_spec("esm2_t6_8M_standin", "c") is None
    assert recorded_plm_spec("", "c") is None
    assert recorded_plm_spec("esm2_t33_650M_UR50D", "c") == "esm2_t33_650M_UR50D"
    # ORG/NAME is a Hugging Face hub id: looked up only in the HF cache (safetensors), never as a path here
    assert recorded_plm_spec("models/x", "c") == "hf:models/x"
    for bad in ("/tmp/x.pt", "../esm2_t6_8M_UR50D", "./models/x", "models/x.pt", "esm2_custom"):
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
    from protsae_cli.sae.checkpoint import load_sae

    sae = _sae_with(tmp_path, d_sae=10**12)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"does not match its weights"):
        load_sae(sae)
    assert time.perf_counter() - t0 < 10


def test_d_model_mismatch_names_the_tensor(tmp_path: Path) -> None:
    from protsae_cli.sae.checkpoint import load_sae

    with pytest.raises(InputError, match=r"config.json \(d_model=321.*shape of"):
        load_sae(_sae_with(tmp_path, d_model=321))


# -- gaps closed after the first pass --------------------------------------------------------------------------

class _OpenPayload:
    """Unpickling this calls open(marker, 'w'): the file appearing proves the pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _sae_copy(src: Path, dst: Path, **changes) -> Path:
    """A copy of an SAE directory with config.json fields changed (dotted keys reach into sub-dicts)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_recorded_fair_esm_name_is_not_read_from_the_working_directory(tmp_path: Path) -> None:
    """A fair-esm name is looked up in the torch hub cache only; a cwd file of that name is not a checkpoint."""
    marker = tmp_path / "PWNED"
    torch.save({"cfg": _OpenPayload(marker), "model": {}}, tmp_path / "esm2_t6_8M_UR50D")
    sae = _sae_recording_plm(tmp_path, "esm2_t6_8M_UR50D")
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home"), "PROTSAE_OFFLINE": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "protsae_cli", "annotate", str(EXAMPLE), "--sae", str(sae), "-o",
                        str(tmp_path / "out"), "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert not marker.exists(), "a cwd file named like a fair-esm model was unpickled"
    assert r.returncode == 4, r.stderr  # not in the (empty) hub cache, and offline
    assert "esm2_t6_8M_UR50D.pt" in r.stderr


def test_contact_regression_in_hub_cache_is_not_unpickled(tmp_path: Path, torch_home: Path) -> None:
    from protsae_cli.plm.loading import load_plm

    marker = tmp_path / "PWNED"
    hub = torch_home / "hub" / "checkpoints"
    write_fair_esm_checkpoint(hub / "esm2_t6_8M_UR50D.pt", regression=False)
    torch.save({"model": _OpenPayload(marker)}, hub / "esm2_t6_8M_UR50D-contact-regression.pt")
    with pytest.warns(UserWarning, match="contact-regression.pt: not loaded"):
        assert load_plm("esm2_t6_8M_UR50D").name == "esm2_t6_8M_UR50D"
    assert not marker.exists()


def test_missing_and_extra_tensors_name_the_file(tmp_path: Path, tiny_sae_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    from protsae_cli.sae.checkpoint import load_sae

    sae = _sae_copy(tiny_sae_dir, tmp_path / "sae")
    w = sae / "sae.safetensors"
    state = load_file(str(w))
    del state["b_enc"]
    state["extra"] = torch.zeros(2)
    save_file(state, str(w))
    with pytest.raises(InputError, match=r"sae\.safetensors.*missing b_enc.*unexpected extra"):
        load_sae(sae)


def test_protsae_option_shapes_checked_before_allocation(tmp_path: Path) -> None:
    """A ProtSAE whose options (n_zero_classes) disagree with its weights is refused from the header alone."""
    from protsae_cli.sae.protsae import ProtSAE
    from protsae_cli.sae.checkpoint import load_sae, save_sae
    from protsae_cli.sae.config import ConceptEntry, SAEConfig

    cfg = SAEConfig(d_model=16, d_sae=32, k=4, layer=1, arch="protsae",
                    concepts=[ConceptEntry(latent=0, concept_id="C0", name="c0")], protsae={"n_zero_classes": 2})
    d = save_sae(ProtSAE(cfg), tmp_path / "p")
    assert load_sae(d)[0].cfg.protsae["n_zero_classes"] == 2
    c = json.loads((d / "config.json").read_text())
    c["protsae"]["n_zero_classes"] = 10**11
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(InputError, match=r"zero_emb"):
        load_sae(d)
    c["protsae"]["n_zero_classes"] = "two"
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(InputError, match=r"config\.json: ProtSAE option n_zero_classes must be an integer"):
        load_sae(d)


@pytest.mark.parametrize("change, match", [
    ({"k": 0}, "k must be an integer >= 1, got 0"),
    ({"k": 65}, r"k must be in 1\.\.d_sae \(64\), got 65"),
    ({"d_sae": -1}, "d_sae must be an integer >= 1, got -1"),
    ({"d_model": 32.5}, "d_model must be an integer >= 1, got 32.5"),
    ({"d_model": "32"}, "d_model must be an integer >= 1, got '32'"),
    ({"k": True}, "k must be an integer >= 1, got True"),
    ({"hook.layer": 0}, "hook layer must be an integer >= 1, got 0"),
    ({"hook.point": "mlp_out"}, "unknown hook point 'mlp_out'"),
    ({"plm.name": ["x"]}, "plm name must be a string"),
    ({"plm.num_layers": -2}, "plm num_layers must be an integer >= 0"),
    ({"format_version": "1"}, "format_version must be an integer >= 0"),
    ({"protsae": []}, "'protsae' must be a JSON object"),
    ({"concepts": [{"latent": 64, "concept_id": "X", "name": "x"}]}, r"concept 'X' is bound to latent 64"),
    ({"concepts": [{"latent": "3", "concept_id": "X", "name": "x"}]}, r"concept 'X' is bound to latent '3'"),
])
def test_config_values_are_bounded_and_name_config_json(change, match, tmp_path: Path, tiny_sae_dir: Path) -> None:
    from protsae_cli.sae.checkpoint import load_sae

    sae = _sae_copy(tiny_sae_dir, tmp_path / "sae", **change)
    with pytest.raises(InputError, match=match) as e:
        load_sae(sae)
    assert str(e.value).startswith(str(sae / "config.json")), str(e.value)


@pytest.mark.parametrize("change, match", [
    ({"encoder_embed_dim": 10**6}, r"encoder_embed_dim 1000000 \(weights have 320\)"),
    ({"encoder_layers": 40}, r"encoder_layers 40 \(weights have 6\)"),
    ({"encoder_ffn_embed_dim": 7}, r"encoder_ffn_embed_dim 7 \(weights have 1280\)"),
    ({"encoder_attention_heads": 7}, "encoder_attention_heads 7 does not divide the width 320"),
    ({"encoder_attention_heads": "20"}, "encoder_attention_heads must be a positive integer"),
    ({"token_dropout": "yes"}, "token_dropout must be true or false"),
])
def test_plm_config_sizes_checked_against_weights_before_building(change, match, tmp_path: Path) -> None:
    """A PLM directory's config.json is data: a width of a million used to be allocated (terabytes) before
    the weights were compared with it."""
    from protsae_cli.models import standin_plm_dir
    from protsae_cli.plm.loading import load_plm

    d = tmp_path / "plm"
    shutil.copytree(standin_plm_dir(), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=match) as e:
        load_plm(str(d))
    assert str(d / "config.json") in str(e.value) and time.perf_counter() - t0 < 30
    cfg.pop("name")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match='needs a "name"'):
        load_plm(str(d))
