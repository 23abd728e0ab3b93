"""Hugging Face ESM-2 checkpoints: written here in transformers' own key names and config fields (the inverse of
protsae's converter, written from transformers' convert_esm.py / modeling_esm.py, not by calling protsae), then
loaded through --model DIR and a fake HF cache, and checked against fair-esm on the same weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from protsae_cli.errors import CompatibilityError, InputError, MissingWeightsError
from protsae_cli.plm.esm_forward import EsmRunner, HookPoint
from protsae_cli.plm.loading import canonical_esm2_name, load_plm, recorded_plm_spec
from tests.conftest import TINY_DIM, TINY_LAYERS

#: vocab.txt of facebook/esm2_t6_8M_UR50D, as the hub serves it (one token a line).
HF_VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q",
            "N", "F", "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>"]

SEQS = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MKVLAAGIV", "ACDEFGHIKLMNPQRSTVWYXBUZO"]


def hf_config(layers: int, dim: int, heads: int, name: str, token_dropout: bool = True) -> dict:
    """The fields of the official ESM-2 config.json (facebook/esm2_t6_8M_UR50D), scaled down."""
    return {
        "_name_or_path": name, "architectures": ["EsmForMaskedLM"], "attention_probs_dropout_prob": 0.0,
        "classifier_dropout": None, "emb_layer_norm_before": False, "esmfold_config": None, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "hidden_size": dim, "initializer_range": 0.02, "intermediate_size": 4 * dim,
        "is_folding_model": False, "layer_norm_eps": 1e-05, "mask_token_id": 32, "max_position_embeddings": 1026,
        "model_type": "esm", "num_attention_heads": heads, "num_hidden_layers": layers, "pad_token_id": 1,
        "position_embedding_type": "rotary", "token_dropout": token_dropout, "torch_dtype": "float32",
        "transformers_version": "4.25.0.dev0", "use_cache": True, "vocab_list": None, "vocab_size": 33,
    }


def to_hf_state(model, prefix: str = "esm.", lm_head: bool = True, tied_decoder: bool = False) -> dict:
    """fair-esm ESM2 -> HF keys, as transformers' convert_esm.py assigns them (query<-q_proj, ...)."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out = {f"{prefix}embeddings.word_embeddings.weight": sd["embed_tokens.weight"]}
    for i in range(model.num_layers):
        f, h = f"layers.{i}.", f"{prefix}encoder.layer.{i}."
        for ours, theirs in (("self_attn.q_proj", "attention.self.query"), ("self_attn.k_proj", "attention.self.key"),
                             ("self_attn.v_proj", "attention.self.value"),
                             ("self_attn.out_proj", "attention.output.dense"),
                             ("self_attn_layer_norm", "attention.LayerNorm"), ("fc1", "intermediate.dense"),
                             ("fc2", "output.dense"), ("final_layer_norm", "LayerNorm")):
            for leaf in ("weight", "bias"):
                out[f"{h}{theirs}.{leaf}"] = sd[f"{f}{ours}.{leaf}"]
        out[f"{h}attention.self.rotary_embeddings.inv_freq"] = sd[f"{f}self_attn.rot_emb.inv_freq"]
    for leaf in ("weight", "bias"):
        out[f"{prefix}encoder.emb_layer_norm_after.{leaf}"] = sd[f"emb_layer_norm_after.{leaf}"]
        if "contact_head.regression.weight" in sd:
            out[f"{prefix}contact_head.regression.{leaf}"] = sd[f"contact_head.regression.{leaf}"]
    if lm_head:
        for leaf in ("weight", "bias"):
            out[f"lm_head.dense.{leaf}"] = sd[f"lm_head.dense.{leaf}"]
            out[f"lm_head.layer_norm.{leaf}"] = sd[f"lm_head.layer_norm.{leaf}"]
        out["lm_head.bias"] = sd["lm_head.bias"]
        if tied_decoder:
            out["lm_head.decoder.weight"] = sd["lm_head.weight"].clone()
    return out


def write_hf_dir(d: Path, model, name: str, prefix: str = "esm.", lm_head: bool = True, vocab: list | None = None,
                 dtype: torch.dtype = torch.float32, tied_decoder: bool = False) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(model.num_layers, model.embed_dim, model.attention_heads, name, model.token_dropout)
    if not lm_head:
        cfg["architectures"] = ["EsmModel"]
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "vocab.txt").write_text("\n".join(vocab or HF_VOCAB))
    state = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("inv_freq") else v)
             for k, v in to_hf_state(model, prefix, lm_head, tied_decoder).items()}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def fake_hub_cache(root: Path, hub_id: str, model, rev: str = "0123abcd" * 5) -> Path:
    """huggingface_hub's layout: models--ORG--NAME/{refs/main, snapshots/REV/...} (files are symlinks to blobs)."""
    repo = root / ("models--" + hub_id.replace("/", "--"))
    src = write_hf_dir(root / "_src", model, hub_id)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in src.iterdir():
        blob = repo / "blobs" / f.name
        f.rename(blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return repo


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(root))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.cache/huggingface/hub must not be the user's
    (root / "hub").mkdir(parents=True)
    return root / "hub"


def hook_acts(plm, seqs, point: str, layer: int, attention: str = "reference") -> torch.Tensor:
    runner = EsmRunner(plm, "cpu", attention=attention)
    return runner.hook_activations(runner.tokenizer.batch(seqs), HookPoint(point, layer))


def max_diff_all_hooks(a, b, n_layers: int) -> float:
    worst = 0.0
    for layer in range(1, n_layers + 1):
        for point in ("resid_post", "attn_out"):
            for attention in ("reference", "sdpa"):
                x, y = hook_acts(a, SEQS, point, layer, attention), hook_acts(b, SEQS, point, layer, attention)
                worst = max(worst, float((x - y).abs().max()))
    return worst


def test_hf_dir_matches_fair_esm_at_every_hook(tiny_plm, tmp_path):
    d = write_hf_dir(tmp_path / "hf_tiny", tiny_plm.model, "facebook/esm2_t3_tiny")
    hf = load_plm(str(d))
    assert (hf.num_layers, hf.d_model, hf.format, hf.has_lm_head) == (TINY_LAYERS, TINY_DIM, "hf-safetensors", True)
    assert hf.name == "facebook/esm2_t3_tiny"
    diff = max_diff_all_hooks(hf, tiny_plm, TINY_LAYERS)
    assert diff <= 1e-5, diff
    ours = dict(hf.model.state_dict())
    for k, v in tiny_plm.model.state_dict().items():
        assert torch.equal(ours[k], v), k  # the conversion is exact, tensor for tensor (contact head included)
    # fair-esm's own forward on the converted model, every layer (the last includes emb_layer_norm_after)
    tok = tiny_plm.alphabet.get_batch_converter()([("a", SEQS[0])])[2]
    r_hf = hf.model(tok, repr_layers=list(range(TINY_LAYERS + 1)))
    r_fe = tiny_plm.model(tok, repr_layers=list(range(TINY_LAYERS + 1)))
    for layer in range(TINY_LAYERS + 1):
        assert torch.allclose(r_hf["representations"][layer], r_fe["representations"][layer], atol=1e-5)
    assert torch.allclose(r_hf["logits"], r_fe["logits"], atol=1e-5)
    import hashlib

    assert hf.sha256 == hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()


def test_esm_model_without_prefix_or_lm_head(tiny_plm, tmp_path):
    d = write_hf_dir(tmp_path / "hf_base", tiny_plm.model, "me/esm_base", prefix="", lm_head=False)
    hf = load_plm(str(d / "model.safetensors"))
    assert not hf.has_lm_head
    x, y = hook_acts(hf, SEQS, "resid_post", 2), hook_acts(tiny_plm, SEQS, "resid_post", 2)
    assert float((x - y).abs().max()) <= 1e-5
    runner = EsmRunner(hf, "cpu")
    with pytest.raises(InputError, match="without an LM head"):
        runner.logits(runner.tokenizer.batch(SEQS[:1]))


def test_transformers5_save_layout(tiny_plm, tmp_path):
    """transformers 5.25's save_pretrained writes one wildcard rotary key and LayerNorm.gamma/.beta (observed on
    a real save): rewritten here by hand from the v4 layout."""
    from safetensors.torch import load_file

    d = write_hf_dir(tmp_path / "v5", tiny_plm.model, "facebook/x")
    state = load_file(str(d / "model.safetensors"))
    inv = next(state[k] for k in sorted(state) if k.endswith("rotary_embeddings.inv_freq"))
    for k in [k for k in state if k.endswith("rotary_embeddings.inv_freq")]:
        del state[k]
    state["esm.encoder.layer.*.attention.self.rotary_embeddings.inv_freq"] = inv
    for k in [k for k in state if k.endswith(("LayerNorm.weight", "LayerNorm.bias"))]:
        state[k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")] = \
            state.pop(k)
    save_file(state, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(rope_theta=10000.0, tie_word_embeddings=True, dtype="float32")
    (d / "config.json").write_text(json.dumps(cfg))
    hf = load_plm(str(d))
    for k, v in tiny_plm.model.state_dict().items():
        assert torch.equal(hf.model.state_dict()[k], v), k
    cfg["rope_theta"] = 500000.0
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="rope_theta"):
        load_plm(str(d))


def test_half_precision_file_and_tied_decoder(tiny_plm, tmp_path):
    d = write_hf_dir(tmp_path / "hf16", tiny_plm.model, "facebook/x", dtype=torch.float16, tied_decoder=True)
    hf = load_plm(str(d))
    ref = tiny_plm.model.state_dict()["layers.0.fc1.weight"].half().float()
    assert torch.equal(hf.model.state_dict()["layers.0.fc1.weight"], ref)
    assert hf.model.state_dict()["lm_head.weight"].dtype == torch.float32


def test_hub_id_resolves_in_the_local_cache(tiny_plm, hf_cache, tmp_path, monkeypatch):
    fake_hub_cache(hf_cache, "facebook/esm2_t3_tiny", tiny_plm.model)
    monkeypatch.chdir(tmp_path)
    for spec in ("facebook/esm2_t3_tiny", "hf:facebook/esm2_t3_tiny", str(hf_cache / "models--facebook--esm2_t3_tiny")):
        plm = load_plm(spec)
        assert plm.name == "facebook/esm2_t3_tiny" and "snapshots" in plm.source
        x, y = hook_acts(plm, SEQS, "attn_out", 3), hook_acts(tiny_plm, SEQS, "attn_out", 3)
        assert float((x - y).abs().max()) <= 1e-5
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))  # the explicit cache variable wins, same result
    monkeypatch.delenv("HF_HOME")
    assert load_plm("facebook/esm2_t3_tiny").name == "facebook/esm2_t3_tiny"


def test_sae_recording_a_hub_id_loads_it_from_the_cache(tiny_plm, tiny_sae_dir, hf_cache, tmp_path, monkeypatch):
    """An SAE trained on an HF model records its hub id and safetensors checksum: annotate without --model
    finds it in the cache (as hf:ORG/NAME, never a same-named path here) and the checksum check passes."""
    import shutil

    from protsae_cli.annotate.pipeline import Annotator

    repo = fake_hub_cache(hf_cache, "facebook/esm2_t3_tiny", tiny_plm.model)
    sae = tmp_path / "sae_on_hf"
    shutil.copytree(tiny_sae_dir, sae)
    cfg = json.loads((sae / "config.json").read_text())
    hf = load_plm("facebook/esm2_t3_tiny")
    cfg["plm"].update(name="facebook/esm2_t3_tiny", sha256=hf.sha256)
    (sae / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "facebook").mkdir()
    (tmp_path / "facebook" / "esm2_t3_tiny").write_bytes(b"not a model: must not be read")
    monkeypatch.chdir(tmp_path)
    ann = Annotator(sae=str(sae), device="cpu")
    assert ann.plm.name == "facebook/esm2_t3_tiny" and str(repo) in ann.plm.source


@pytest.mark.parametrize("offline", ["1", ""])
def test_missing_hub_id_names_the_folders_searched_and_never_downloads(hf_cache, monkeypatch, offline):
    monkeypatch.setenv("PROTSAE_OFFLINE", offline)

    def no_network(*a, **k):
        raise AssertionError("protsae tried the network")

    monkeypatch.setattr("socket.create_connection", no_network)
    with pytest.raises(MissingWeightsError) as e:
        load_plm("facebook/esm2_t33_650M_UR50D")
    msg = str(e.value)
    assert str(hf_cache / "models--facebook--esm2_t33_650M_UR50D") in msg and "never downloads" in msg
    assert "hf download facebook/esm2_t33_650M_UR50D" in msg


def test_pickle_only_snapshot_is_refused(tiny_plm, tmp_path):
    d = write_hf_dir(tmp_path / "bin", tiny_plm.model, "facebook/x")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"pytorch_model\.bin.*safetensors only.*convert it.*fair-esm's \.pt"):
        load_plm(str(d))
    with pytest.raises(InputError, match="safetensors only"):
        load_plm(str(d / "pytorch_model.bin"))


def test_vocab_order_mismatch_is_refused(tiny_plm, tmp_path):
    swapped = list(HF_VOCAB)
    swapped[4], swapped[5] = swapped[5], swapped[4]
    d = write_hf_dir(tmp_path / "v", tiny_plm.model, "facebook/x", vocab=swapped)
    with pytest.raises(InputError, match=r"vocab\.txt: token order differs .* at id 4 \('A', expected 'L'"):
        load_plm(str(d))
    (d / "vocab.txt").unlink()  # no vocab file: the config's sizes and ids are what is checked
    cfg = json.loads((d / "config.json").read_text())
    assert load_plm(str(d)).d_model == TINY_DIM
    cfg["mask_token_id"] = 31
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="mask_token_id 31"):
        load_plm(str(d))


@pytest.mark.parametrize("field,value,match", [
    ("position_embedding_type", "absolute", "rotary"), ("emb_layer_norm_before", True, "embedding layer norm"),
    ("intermediate_size", 100, "4 x hidden_size"), ("layer_norm_eps", 1e-12, "1e-5"),
    ("num_hidden_layers", 4, "does not match its weights"), ("hidden_size", 64, "does not match its weights"),
    ("is_folding_model", True, "ESMFold")])
def test_configs_fair_esm_cannot_express_are_refused(tiny_plm, tmp_path, field, value, match):
    d = write_hf_dir(tmp_path / "c", tiny_plm.model, "facebook/x")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    if field == "hidden_size":
        cfg["intermediate_size"] = 4 * value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=match):
        load_plm(str(d))


def test_unknown_keys_and_untied_decoder_are_refused(tiny_plm, tmp_path):
    d = write_hf_dir(tmp_path / "k", tiny_plm.model, "facebook/x", tied_decoder=True)
    from safetensors.torch import load_file

    state = load_file(str(d / "model.safetensors"))
    state["lm_head.decoder.weight"] = state["lm_head.decoder.weight"] + 1
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(InputError, match="untied LM head"):
        load_plm(str(d))
    del state["lm_head.decoder.weight"]
    state["esm.encoder.layer.0.attention.self.distance_embedding.weight"] = torch.zeros(3, 3)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(InputError, match="distance_embedding"):
        load_plm(str(d))


def test_names_map_between_formats_and_recorded_hub_ids_use_the_cache():
    assert canonical_esm2_name("facebook/esm2_t6_8M_UR50D") == "esm2_t6_8M_UR50D"
    assert canonical_esm2_name("esm2_t6_8M_UR50D") == "esm2_t6_8M_UR50D"
    assert canonical_esm2_name("someone/esm2_t6_8M_UR50D") == "someone/esm2_t6_8M_UR50D"
    assert recorded_plm_spec("facebook/esm2_t6_8M_UR50D", "x") == "hf:facebook/esm2_t6_8M_UR50D"
    with pytest.raises(InputError, match="not a model name"):
        recorded_plm_spec("/abs/path/model.pt", "x")


def test_pairing_across_formats_names_the_reason():
    """Same release, other format: still refused (file checksums differ), with the reason in the message."""
    from protsae_cli.runtime import check_compatible
    from protsae_cli.sae.config import SAEConfig

    cfg = SAEConfig(d_model=320, d_sae=64, k=8, hook_point="resid_post", layer=3, plm_name="esm2_t6_8M_UR50D",
                    plm_sha256="a" * 64, plm_num_layers=6)
    with pytest.raises(CompatibilityError, match=r"--no-check-plm.*one ESM-2 release.*different checksums"):
        check_compatible(cfg, "facebook/esm2_t6_8M_UR50D", "b" * 64, 320, 6)
    with pytest.raises(CompatibilityError) as e:
        check_compatible(cfg, "lab/esm2_t6_8M_UR50D", "b" * 64, 320, 6)
    assert "one ESM-2 release" not in str(e.value)
    check_compatible(cfg, "facebook/esm2_t6_8M_UR50D", "b" * 64, 320, 6, strict_checksum=False)


def test_official_config_names(tmp_path):
    """The real 8M config records _name_or_path "/tmp/facebook/esm2_t6_8M_UR50D": named by its hub id."""
    from protsae_cli.plm.hf_esm import hf_model_name

    assert hf_model_name(tmp_path, {"_name_or_path": "/tmp/facebook/esm2_t6_8M_UR50D"}) == \
        "facebook/esm2_t6_8M_UR50D"
    assert hf_model_name(tmp_path, {"_name_or_path": "facebook/esm2_t12_35M_UR50D"}) == \
        "facebook/esm2_t12_35M_UR50D"
    snap = tmp_path / "models--facebook--esm2_t6_8M_UR50D" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    assert hf_model_name(snap, {"_name_or_path": "/somewhere/else"}) == "facebook/esm2_t6_8M_UR50D"
    assert hf_model_name(tmp_path, {}) == tmp_path.name


def test_annotate_on_hf_standin_gives_the_fair_esm_codes(tmp_path, small_fasta, one_thread):
    """The bundled SAE on the stand-in converted to HF format: the checksum check refuses it (another file),
    --no-check-plm runs it and the codes equal the stand-in's own run."""
    from protsae_cli.annotate.pipeline import AnnotateOptions, annotate
    from protsae_cli.io.writers.h5 import H5Annotations

    standin = load_plm(None)
    d = write_hf_dir(tmp_path / "hf_standin", standin.model, "team/esm2_t6_8M_standin")

    def run(model, prefix, check=True):
        return annotate(AnnotateOptions(input=str(small_fasta), output_prefix=str(tmp_path / prefix), model=model,
                                        device="cpu", progress=False, formats=("h5", "tsv"), check_plm=check))

    with pytest.raises(CompatibilityError, match="sha256"):
        run(str(d), "refused")
    run(None, "fair")
    run(str(d), "hf", check=False)
    with H5Annotations(tmp_path / "fair.h5") as a, H5Annotations(tmp_path / "hf.h5") as b:
        assert a.n_proteins == b.n_proteins == 3
        for i in range(3):
            np.testing.assert_allclose(a.codes(i).toarray(), b.codes(i).toarray(), atol=1e-5)
        assert b.attrs["plm_model"] == "team/esm2_t6_8M_standin"
    def rows(p: Path) -> list[list[str]]:
        return [ln.split("\t")[:8] for ln in p.read_text().splitlines() if not ln.startswith("#")]

    assert rows(tmp_path / "fair.tsv") == rows(tmp_path / "hf.tsv")


def save_transformers_esm(transformers, path: Path, layers: int, dim: int = 32, heads: int = 4):
    """A tiny random transformers EsmForMaskedLM (layer norms perturbed, so they matter) saved with
    save_pretrained as safetensors at `path`; returns the model in eval mode."""
    torch.manual_seed(0)
    cfg = transformers.EsmConfig(**{k: v for k, v in hf_config(layers, dim, heads, "x").items()
                                    if k not in ("_name_or_path", "architectures", "torch_dtype",
                                                 "transformers_version", "esmfold_config")})
    model = transformers.EsmForMaskedLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n or "layer_norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path), safe_serialization=True)
    return model


def test_transformers_model_saved_with_save_pretrained(tmp_path):
    """Optional: a real transformers EsmForMaskedLM (tiny, random) saved by save_pretrained loads through
    protsae, and its hidden_states[L] equal protsae's resid_post@L at every layer."""
    transformers = pytest.importorskip("transformers")
    model = save_transformers_esm(transformers, tmp_path / "tf", layers=3)
    plm = load_plm(str(tmp_path / "tf"))
    runner = EsmRunner(plm, "cpu", attention="reference")
    tokens = runner.tokenizer.batch(SEQS)
    attn = (tokens != 1).long()
    with torch.no_grad():
        out = model(input_ids=tokens, attention_mask=attn, output_hidden_states=True)
    for layer in range(1, 4):
        ours = runner.hook_activations(tokens, HookPoint("resid_post", layer))
        mask = attn.bool()
        diff = float((out.hidden_states[layer][mask] - ours[mask]).abs().max())
        assert diff <= 1e-5, (layer, diff)
    logits = runner.logits(tokens)
    assert float((out.logits[attn.bool()] - logits[attn.bool()]).abs().max()) <= 1e-4
