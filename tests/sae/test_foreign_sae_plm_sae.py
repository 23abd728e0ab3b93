"""The ESM-2 8M layer-3 SAE of "Interpreting and Steering Protein Language Models through Sparse Autoencoders"
(edithvillegas/plm-sae, published as evillegasgarcia/sae_esm2_6_l3): its `AutoEncoder` checkpoints, written here
in the layouts its code and huggingface_hub's PyTorchModelHubMixin produce (real key names and layouts, scaled
down), give through `--sae` the codes of the equivalent protsae SAE and of the formula in its `encode`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from protsae_cli.errors import CompatibilityError, InputError
from tests.conftest import TINY_DIM
from tests.sae.test_foreign_sae import (FASTA, LAYER, _acts, _assert_same, _codes, _protsae_dir, _rand,
                                        _reference_codes)

N = 48


@pytest.fixture()
def fasta(tmp_path: Path) -> Path:
    p = tmp_path / "p.fasta"
    p.write_text(FASTA)
    return p


def plm_sae_state(d: int = TINY_DIM, n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    """`AutoEncoder(cfg).state_dict()`: W_enc [act_size, dict_size], W_dec [dict_size, act_size] (rows unit-norm,
    as make_decoder_weights_and_grad_unit_norm keeps them), b_enc [dict_size], b_dec [act_size]."""
    W_dec = _rand(n, d, seed=seed + 1)
    return {"W_enc": _rand(d, n, seed=seed, scale=0.3), "W_dec": W_dec / W_dec.norm(dim=-1, keepdim=True),
            "b_enc": _rand(n, seed=seed + 2, scale=0.3), "b_dec": _rand(d, seed=seed + 3, scale=0.1)}


def plm_sae_cfg(d: int, n: int, layer: str | int, model_name: str) -> dict:
    """The cfg keys AutoEncoder.__init__ and post_init_cfg read (values are this test's own)."""
    return {"act_size": d, "dict_mult": n // d, "dict_size": n, "l1_coeff": 0.001, "enc_dtype": "fp32", "seed": 49,
            "device": "cuda", "SAVE_DIR": "/somewhere/checkpoints", "model_name": model_name, "layer": layer,
            "site": "resid_post", "batch_size": 4096, "seq_len": 1024, "lr": 1e-4, "beta1": 0.9, "beta2": 0.99,
            "name": f"{model_name}_{layer}_{n}_resid_post"}


def write_hub_folder(d: Path, state: dict, cfg: dict, weights: str = "model.safetensors") -> Path:
    """What PyTorchModelHubMixin.save_pretrained writes for AutoEncoder(cfg): config.json holding the __init__
    arguments ({"cfg": ...}, sorted, indent 2) and model.safetensors (pytorch_model.bin before safetensors)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"cfg": cfg}, sort_keys=True, indent=2))
    if weights == "model.safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(d / weights), metadata={"format": "pt"})
    else:
        torch.save(state, d / weights)
    (d / "README.md").write_text("---\ntags:\n- model_hub_mixin\n- pytorch_model_hub_mixin\n---\n")
    return d


@pytest.mark.parametrize("layout", ["hub-safetensors", "hub-bin", "autoencoder-save"])
def test_plm_sae_matches_protsae_and_its_encode_formula(tiny_esm_path, tiny_plm, fasta, tmp_path, layout):
    from protsae_cli.sae.checkpoint import load_sae
    from protsae_cli.sae.foreign import detect, with_options
    from protsae_cli.sae.topk import TopKSAE

    st = plm_sae_state()
    # LAYER 2 is the output of the second block: EsmForMaskedLM's module esm.encoder.layer.1.output
    cfg = plm_sae_cfg(TINY_DIM, N, f"esm.encoder.layer.{LAYER - 1}.output", tiny_plm.name)
    if layout == "autoencoder-save":  # AutoEncoder.save(name): SAVE_DIR/<name>.pt + SAVE_DIR/<name>_cfg.json
        f = tmp_path / "ckpts" / "0.pt"
        f.parent.mkdir()
        torch.save(st, f)
        (tmp_path / "ckpts" / "0_cfg.json").write_text(json.dumps(cfg))
        sae_path = str(f)
    else:
        sae_path = str(write_hub_folder(tmp_path / "hub", st, cfg,
                                        "model.safetensors" if layout == "hub-safetensors" else "pytorch_model.bin"))
    assert detect(sae_path) in ("plm-sae", "interplm-or-interprot")
    spec = with_options(sae_path, plm=tiny_plm.name, k=12)  # layer from cfg; a ReLU SAE needs k
    sae, _ = load_sae(spec)
    assert type(sae) is TopKSAE and (sae.cfg.layer, sae.cfg.hook_point, sae.cfg.k) == (LAYER, "resid_post", 12)
    assert sae.cfg.training["imported_from"] == "plm-sae"
    # protsae's layout: pre = W_enc (x - b_dec) + b_enc, with W_enc [d_sae, d_model]
    ref = _protsae_dir(tmp_path, st["W_enc"].T, st["b_enc"], st["W_dec"], st["b_dec"], k=12, plm_name=tiny_plm.name)
    got = _codes(tiny_esm_path, spec, fasta)
    _assert_same(got, _codes(tiny_esm_path, ref, fasta))
    # and AutoEncoder.encode written out: ReLU((x - b_dec) @ W_enc + b_enc)
    formula = _reference_codes(_acts(tiny_esm_path, fasta),
                               lambda x: torch.relu((x - st["b_dec"]) @ st["W_enc"] + st["b_enc"]), 12)
    _assert_same(got, formula)


def test_published_repo_names_plm_and_layer(tmp_path):
    """In the Hugging Face cache layout of evillegasgarcia/sae_esm2_6_l3 the PLM is ESM-2 8M and the layer the
    README's hook esm.encoder.layer.3.output, protsae's layer 4 (its "layer 3" counts modules from 0)."""
    from protsae_cli.sae.checkpoint import load_sae

    repo = tmp_path / "models--evillegasgarcia--sae_esm2_6_l3"
    snap = repo / "snapshots" / ("ab" * 20)
    write_hub_folder(snap, plm_sae_state(320, 64), {"act_size": 320, "dict_size": 64, "seed": 0})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    for where in (repo, snap, snap / "model.safetensors"):
        sae, sha = load_sae(f"{where}#k=8")
        assert (sae.cfg.layer, sae.cfg.hook_point, sae.cfg.plm_name, sae.cfg.plm_num_layers, sae.cfg.k) == \
            (4, "resid_post", "esm2_t6_8M_UR50D", 6, 8), where
        assert len(sha) == 64
    with pytest.raises(InputError, match=r"does not record k.*--sae-k"):
        load_sae(str(repo))
    with pytest.raises(CompatibilityError, match=r"records layer 4 .*layer\.3\.output.* but --sae-layer 3"):
        load_sae(f"{repo}#k=8,layer=3")
    (snap / "config.json").write_text(json.dumps(
        {"cfg": {"act_size": 320, "dict_size": 64, "layer": "esm.encoder.layer.2.output"}}))
    with pytest.raises(CompatibilityError, match=r"cfg says layer 3 .* which is layer 4"):
        load_sae(f"{repo}#k=8")


def test_missing_metadata_and_mismatches_are_named(tiny_plm, tmp_path):
    from protsae_cli.sae.checkpoint import load_sae
    from protsae_cli.sae.foreign import detect

    bare = tmp_path / "sae.safetensors"  # the state dict alone: nothing says layer, PLM or k
    save_file(plm_sae_state(), str(bare))
    assert detect(bare) == "plm-sae"
    with pytest.raises(InputError, match=r"does not record the layer or the PLM or k.*--sae-layer.*--sae-plm.*--sae-k"):
        load_sae(str(bare))
    sae, _ = load_sae(f"{bare}#layer=2,plm={tiny_plm.name},k=4")
    assert sae.cfg.d_sae == N
    # an integer cfg layer does not say whether it counts blocks from 0 or 1: it is not guessed
    hub = write_hub_folder(tmp_path / "int_layer", plm_sae_state(), plm_sae_cfg(TINY_DIM, N, 3, "x"))
    with pytest.raises(InputError, match=r"does not record the layer.*no module name"):
        load_sae(f"{hub}#plm={tiny_plm.name},k=4")
    wrong = write_hub_folder(tmp_path / "wrong", plm_sae_state(), plm_sae_cfg(TINY_DIM, 2 * N, "layers.1", "x"))
    with pytest.raises(InputError, match=r"dict_size 96 does not match the weights' 48"):
        load_sae(f"{wrong}#plm={tiny_plm.name},k=4")
    # the last block's module output is before ESM-2's final layer norm; protsae's last layer is after it
    last = write_hub_folder(tmp_path / "last", plm_sae_state(320, N),
                            plm_sae_cfg(320, N, "esm.encoder.layer.5.output", "facebook/esm2_t6_8M_UR50D"))
    with pytest.raises(CompatibilityError, match="before ESM-2's final layer norm"):
        load_sae(f"{last}#k=4")
    extra = tmp_path / "extra.safetensors"
    save_file({**plm_sae_state(), "threshold": torch.zeros(N)}, str(extra))
    assert detect(extra) is None  # not this format's state dict (a JumpReLU file of another library)


def test_real_mixin_save_and_the_readme_hook(tmp_path):
    """Optional (needs transformers and huggingface_hub, not dependencies): a class with plm-sae AutoEncoder's
    __init__(cfg) and parameters, saved by the real PyTorchModelHubMixin, loads with its weights; and the README's
    hook, `esm.encoder.layer[i].output` of a real EsmForMaskedLM, is protsae's resid_post@(i+1) for every block
    but the last (whose module output precedes the final layer norm, which is why that one is refused)."""
    transformers = pytest.importorskip("transformers")
    hub = pytest.importorskip("huggingface_hub")
    from torch import nn

    from protsae_cli.plm.esm_forward import EsmRunner, HookPoint
    from protsae_cli.plm.loading import load_plm
    from protsae_cli.sae.checkpoint import load_sae
    from tests.plm.test_hf_esm import SEQS, save_transformers_esm

    class AutoEncoder(nn.Module, hub.PyTorchModelHubMixin):
        def __init__(self, cfg):
            super().__init__()
            self.W_enc = nn.Parameter(torch.randn(cfg["act_size"], cfg["dict_size"]))
            self.W_dec = nn.Parameter(torch.randn(cfg["dict_size"], cfg["act_size"]))
            self.b_enc = nn.Parameter(torch.randn(cfg["dict_size"]))
            self.b_dec = nn.Parameter(torch.randn(cfg["act_size"]))

    ae = AutoEncoder(plm_sae_cfg(32, N, "esm.encoder.layer.1.output", "x"))
    ae.save_pretrained(str(tmp_path / "ae"))
    sae, _ = load_sae(f"{tmp_path / 'ae'}#plm=x,k=4")
    assert (sae.cfg.layer, sae.cfg.d_sae) == (2, N)
    assert torch.equal(sae.W_enc, ae.W_enc.detach().T) and torch.equal(sae.b_dec, ae.b_dec.detach())

    model = save_transformers_esm(transformers, tmp_path / "esm", layers=4)
    runner = EsmRunner(load_plm(str(tmp_path / "esm")), "cpu", attention="reference")
    tokens = runner.tokenizer.batch(SEQS[:1])
    for i in range(4):
        got: dict[str, torch.Tensor] = {}
        h = model.esm.encoder.layer[i].output.register_forward_hook(lambda m, inp, out, got=got: got.update(x=out))
        with torch.no_grad():
            model(input_ids=tokens)
        h.remove()
        diff = float((got["x"] - runner.hook_activations(tokens, HookPoint("resid_post", i + 1))).abs().max())
        assert (diff <= 1e-5) == (i < 3), (i, diff)


def test_pickle_payload_in_pytorch_model_bin_is_never_run(tmp_path):
    """The older mixin's pytorch_model.bin is a pickle: read with weights_only=True, a payload is refused unrun."""
    from protsae_cli.sae.checkpoint import load_sae
    from tests.sae.test_foreign_sae import _OpenPayload

    marker = tmp_path / "PWNED"
    d = write_hub_folder(tmp_path / "hub", plm_sae_state(), plm_sae_cfg(TINY_DIM, N, "layers.1", "x"),
                         "pytorch_model.bin")
    torch.save({**plm_sae_state(), "W_enc": _OpenPayload(marker)}, d / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"pytorch_model\.bin: not a plain tensor state dict.*weights_only=True"):
        load_sae(f"{d}#plm=x,k=4")
    assert not marker.exists(), "a pickle inside a plm-sae file was executed"
