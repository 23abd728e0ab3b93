"""Loading ESM-2 the real ways (path, fair-esm name via TORCH_HOME, shipped stand-in) and failing clearly."""

from __future__ import annotations

import shutil

import pytest
import torch

from protsae_cli.errors import InputError, MissingWeightsError
from protsae_cli.plm.loading import load_plm
from tests.conftest import TINY_DIM, TINY_LAYERS, write_fair_esm_checkpoint


def test_load_by_path_matches_fair_esm(tiny_esm_path):
    import esm

    plm = load_plm(str(tiny_esm_path))
    assert (plm.num_layers, plm.d_model) == (TINY_LAYERS, TINY_DIM)
    data = torch.load(tiny_esm_path, weights_only=False)
    reg = torch.load(tiny_esm_path.with_name(tiny_esm_path.stem + "-contact-regression.pt"), weights_only=False)
    ref, _ = esm.pretrained.load_model_and_alphabet_core("esm2_x", data, reg)
    for (k, a), (k2, b) in zip(sorted(plm.model.state_dict().items()), sorted(ref.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    assert len(plm.sha256) == 64


def test_load_by_name_from_torch_hub_cache(torch_home, tiny_esm_path):
    ckpt = torch_home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copy(tiny_esm_path, ckpt / "esm2_t6_8M_UR50D.pt")
    plm = load_plm("esm2_t6_8M_UR50D")
    assert plm.name == "esm2_t6_8M_UR50D" and plm.source.startswith(str(ckpt))


def test_name_checksum_verification_rejects_wrong_file(torch_home, tiny_esm_path):
    ckpt = torch_home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copy(tiny_esm_path, ckpt / "esm2_t6_8M_UR50D.pt")
    with pytest.raises(InputError, match="does not match the published"):
        load_plm("esm2_t6_8M_UR50D", verify_sha256=True)


def test_offline_missing_weights_message_names_files(torch_home):
    with pytest.raises(MissingWeightsError) as e:
        load_plm("esm2_t33_650M_UR50D")
    msg = str(e.value)
    assert "esm2_t33_650M_UR50D.pt" in msg and str(torch_home) in msg and "--model" in msg


def test_unknown_and_bad_specs(tmp_path):
    with pytest.raises(InputError, match="unknown PLM"):
        load_plm("not_a_model")
    bad = tmp_path / "esm2_bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(InputError, match="cannot be read"):
        load_plm(str(bad))
    torch.save({"just": "a dict"}, tmp_path / "esm2_dict.pt")
    with pytest.raises(InputError, match="not a fair-esm checkpoint"):
        load_plm(str(tmp_path / "esm2_dict.pt"))


def test_directory_with_a_pickle_is_refused_naming_the_file(tmp_path):
    # A .pt found by a glob is a pickle nobody named: protsae asks for the file itself instead.
    write_fair_esm_checkpoint(tmp_path / "d" / "esm2_t3_tiny.pt")
    with pytest.raises(InputError, match=r"pass the checkpoint file itself, e.g. --model .*esm2_t3_tiny\.pt"):
        load_plm(str(tmp_path / "d"))
    assert load_plm(str(tmp_path / "d" / "esm2_t3_tiny.pt")).name == "esm2_t3_tiny"


def test_shipped_standin_loads_offline(torch_home):
    plm = load_plm(None)
    assert plm.name == "esm2_t6_8M_standin" and (plm.num_layers, plm.d_model) == (6, 320)
    assert all(p.dtype == torch.float32 for p in plm.model.parameters())


def test_spec_forms_for_hugging_face_ids(tmp_path, monkeypatch):
    """ORG/NAME that is no path is a hub id (exit 4, cache folders named); a .pt-looking one stays 'not found';
    hf: takes only ORG/NAME."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingWeightsError, match=r"nor is it a path here.*models--lab--esm_ft"):
        load_plm("lab/esm_ft")
    with pytest.raises(InputError, match="PLM checkpoint not found"):
        load_plm("lab/esm_ft.pt")
    with pytest.raises(InputError, match="a Hugging Face hub id is ORG/NAME"):
        load_plm("hf:just_a_name")
    with pytest.raises(MissingWeightsError) as e:
        load_plm("hf:lab/esm_ft")
    assert "nor is it a path" not in str(e.value)


def test_loaded_plm_records_its_format(tiny_esm_path):
    assert load_plm(str(tiny_esm_path)).format == "fair-esm"
    standin = load_plm(None)
    assert (standin.format, standin.has_lm_head, standin.release) == ("protsae-safetensors", True,
                                                                      "esm2_t6_8M_standin")
