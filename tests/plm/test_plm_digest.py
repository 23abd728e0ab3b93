"""The format-independent weights digest: the same weights loaded from protsae's layout, a fair-esm .pt and a
Hugging Face safetensors directory give one digest (three different file checksums), the pairing check accepts
another file on it, and any change of the weights that the activations depend on changes it."""

from __future__ import annotations

import json
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from protsae_cli.errors import CompatibilityError
from protsae_cli.plm.digest import hashed_keys, weights_sha256
from protsae_cli.plm.loading import load_plm
from protsae_cli.runtime import check_compatible, check_pairing
from protsae_cli.sae.config import SAEConfig
from tests.plm.test_hf_esm import write_hf_dir


def write_fair_esm_pt(path: Path, model) -> Path:
    """`model`'s weights saved as fair-esm's hub files are ({'cfg': {'model': Namespace}, 'model': encoder.*})."""
    state = {f"encoder.{k}": v.detach().clone() for k, v in model.state_dict().items()
             if not k.startswith("contact_head")}
    cfg = Namespace(encoder_layers=model.num_layers, encoder_embed_dim=model.embed_dim,
                    encoder_ffn_embed_dim=4 * model.embed_dim, encoder_attention_heads=model.attention_heads,
                    token_dropout=model.token_dropout)
    torch.save({"cfg": {"model": cfg}, "model": state}, path)
    return path


@pytest.fixture(scope="module")
def standin_three_ways(tmp_path_factory):
    """The bundled stand-in as shipped (protsae safetensors), as a fair-esm .pt and as an HF directory."""
    d = tmp_path_factory.mktemp("digest")
    standin = load_plm(None)
    pt = load_plm(str(write_fair_esm_pt(d / "esm2_t6_8M_standin.pt", standin.model)))
    hf = load_plm(str(write_hf_dir(d / "hf_standin", standin.model, "team/esm2_t6_8M_standin")))
    return standin, pt, hf, d


def test_one_digest_for_the_same_weights_in_three_formats(standin_three_ways):
    standin, pt, hf, _ = standin_three_ways
    assert (standin.format, pt.format, hf.format) == ("protsae-safetensors", "fair-esm", "hf-safetensors")
    assert len({standin.sha256, pt.sha256, hf.sha256}) == 3  # three files, three file checksums
    assert standin.weights_sha256 == pt.weights_sha256 == hf.weights_sha256
    assert len(standin.weights_sha256) == 64 and standin.weights_sha256 != standin.sha256


def test_pairing_across_formats_passes_on_the_digest_and_fails_for_other_weights(standin_three_ways):
    standin, pt, hf, d = standin_three_ways
    # An SAE trained on the .pt records both identities, as `protsae train` writes them.
    cfg = SAEConfig(d_model=pt.d_model, d_sae=64, k=8, layer=3, plm_name=pt.name, plm_sha256=pt.sha256,
                    plm_num_layers=pt.num_layers, plm_weights_sha256=pt.weights_sha256)
    check_pairing(cfg, hf)       # another file, same weights
    check_pairing(cfg, standin)
    with torch.no_grad():  # one weight of one block changed by far less than any numerical tolerance
        other_model = load_plm(None).model
        other_model.layers[2].fc1.weight[0, 0] += 1e-6
    changed = load_plm(str(write_hf_dir(d / "hf_changed", other_model, "team/esm2_t6_8M_standin")))
    assert changed.weights_sha256 != hf.weights_sha256
    with pytest.raises(CompatibilityError, match=r"holds other weights.*--no-check-plm"):
        check_pairing(cfg, changed)
    check_pairing(cfg, changed, check_plm=False)  # --no-check-plm still overrides
    # An SAE recording only a file checksum (older protsae) cannot be confirmed on another file, as before.
    old = SAEConfig(d_model=pt.d_model, d_sae=64, k=8, layer=3, plm_name=pt.name, plm_sha256=pt.sha256,
                    plm_num_layers=pt.num_layers)
    with pytest.raises(CompatibilityError, match="records no format-independent weights digest"):
        check_compatible(old, "esm2_t6_8M_standin", hf.sha256, hf.d_model, hf.num_layers,
                         plm_weights_sha256=hf.weights_sha256)


def test_digest_is_computed_only_when_the_files_differ(standin_three_ways):
    _, pt, _, _ = standin_three_ways
    cfg = SAEConfig(d_model=pt.d_model, d_sae=64, k=8, layer=3, plm_name=pt.name, plm_sha256=pt.sha256,
                    plm_num_layers=pt.num_layers, plm_weights_sha256="0" * 64)

    def never() -> str:
        raise AssertionError("the digest was computed although the file checksums match")

    check_compatible(cfg, pt.name, pt.sha256, pt.d_model, pt.num_layers, plm_weights_sha256=never)


def test_lm_and_contact_heads_are_not_part_of_the_digest(standin_three_ways, tmp_path):
    """An HF EsmModel checkpoint (no LM head, no contact head) reads the same activations: same digest."""
    standin, _, hf, _ = standin_three_ways
    bare = load_plm(str(write_hf_dir(tmp_path / "bare", standin.model, "team/x", prefix="", lm_head=False)))
    assert not bare.has_lm_head
    assert bare.weights_sha256 == hf.weights_sha256
    assert not any(k.startswith(("lm_head.", "contact_head.")) for k in hashed_keys(standin.model.state_dict()))


def test_every_hashed_tensor_and_token_dropout_change_the_digest(tiny_plm):
    """Perturb one element of each hashed tensor in turn: every one changes the digest (a recipe that hashed
    shapes only, or skipped a layer, would fail here); so does token dropout, which is no tensor."""
    import esm

    base = weights_sha256(tiny_plm.model)
    model = esm.model.esm2.ESM2(num_layers=tiny_plm.num_layers, embed_dim=tiny_plm.d_model,
                                attention_heads=tiny_plm.model.attention_heads, token_dropout=True)
    model.load_state_dict(tiny_plm.model.state_dict())
    assert weights_sha256(model) == base
    state = model.state_dict()
    keys = hashed_keys(state)
    assert any(k.endswith("rot_emb.inv_freq") for k in keys) and "emb_layer_norm_after.weight" in keys
    seen = {base}
    for key in keys:
        t = state[key]
        flat = t.view(-1)
        old = flat[-1].item()
        flat[-1] = float(np.nextafter(np.float32(old), np.float32(np.inf)))  # the next float32 up
        digest = weights_sha256(model)
        assert digest not in seen, key
        seen.add(digest)
        flat[-1] = old
    assert weights_sha256(model) == base
    no_dropout = esm.model.esm2.ESM2(num_layers=tiny_plm.num_layers, embed_dim=tiny_plm.d_model,
                                     attention_heads=tiny_plm.model.attention_heads, token_dropout=False)
    no_dropout.load_state_dict(tiny_plm.model.state_dict())  # same tensors, other embedding rescaling
    assert weights_sha256(no_dropout) != base


def test_config_round_trips_the_digest_and_older_configs_still_load(tiny_sae_dir, tmp_path):
    cfg = SAEConfig(d_model=32, d_sae=64, k=8, layer=2, plm_name="x", plm_sha256="a" * 64,
                    plm_weights_sha256="b" * 64)
    d = cfg.to_json_dict()
    assert d["plm"]["weights_sha256"] == "b" * 64 and d["plm"]["sha256"] == "a" * 64
    assert SAEConfig.from_json_dict(d).plm_weights_sha256 == "b" * 64
    old = json.loads((tiny_sae_dir / "config.json").read_text())
    assert "weights_sha256" not in old["plm"]
    assert SAEConfig.from_json_dict(old).plm_weights_sha256 == ""
    assert "weights_sha256" not in SAEConfig.from_json_dict(old).to_json_dict()["plm"]  # rewritten unchanged


def test_annotate_runs_the_bundled_sae_on_the_hf_standin_once_it_records_the_digest(standin_three_ways, tmp_path,
                                                                                     small_fasta, one_thread):
    """The bundled SAE with the stand-in's weights digest added to its config: annotate accepts the HF copy of
    the stand-in without --no-check-plm, and its codes equal those on the stand-in itself."""
    from protsae_cli.annotate.pipeline import AnnotateOptions, annotate
    from protsae_cli.io.writers.h5 import H5Annotations
    from protsae_cli.models import default_sae_dir

    standin, _, hf, d = standin_three_ways
    sae = tmp_path / "sae"
    shutil.copytree(default_sae_dir(), sae)
    cfg = json.loads((sae / "config.json").read_text())
    assert cfg["plm"]["sha256"] == standin.sha256 and "weights_sha256" not in cfg["plm"]
    cfg["plm"]["weights_sha256"] = standin.weights_sha256
    (sae / "config.json").write_text(json.dumps(cfg))

    def run(model, prefix):
        return annotate(AnnotateOptions(input=str(small_fasta), output_prefix=str(tmp_path / prefix), model=model,
                                        sae=str(sae), device="cpu", progress=False, formats=("h5",)))

    run(None, "standin")
    run(str(d / "hf_standin"), "hf")
    with H5Annotations(tmp_path / "standin.h5") as a, H5Annotations(tmp_path / "hf.h5") as b:
        assert a.n_proteins == b.n_proteins == 3
        assert b.attrs["plm_sha256"] == hf.sha256  # provenance keeps the file checksum of what was loaded
        for i in range(3):
            np.testing.assert_allclose(a.codes(i).toarray(), b.codes(i).toarray(), atol=1e-5)
