"""Published SAE formats (InterPLM, InterProt, SAELens, sparsify) read by `--sae` give the codes of the
equivalent protsae SAE (built here by converting the same weights by hand), or, where the format computes
something no protsae SAE directory can (per-residue input normalisation, JumpReLU), the codes of the format's
own formula written out here from its source. Checkpoints use the real key names and layouts, scaled down.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from protsae_cli.errors import CompatibilityError, InputError
from tests.conftest import TINY_DIM

D, N, LAYER = TINY_DIM, 48, 2
ROOT = Path(__file__).resolve().parents[2]
FASTA = ">a one\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n>b\nMKVLAAGIVGLLLAW\n>c\nACDEFGHIKLMNPQRSTVWY\n"


@pytest.fixture()
def fasta(tmp_path: Path) -> Path:
    p = tmp_path / "p.fasta"
    p.write_text(FASTA)
    return p


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed)) * scale


def _codes(model: Path, sae: str, fasta: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Codes of every protein through the library's annotate path (Annotator.iter_results)."""
    from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator
    from protsae_cli.io.fasta import read_fasta

    ann = Annotator(str(model), sae, device="cpu", backend="torch")
    opts = AnnotateOptions(input=str(fasta), output_prefix="unused", model=str(model), sae=sae, progress=False)
    return [(r.idx, r.val) for r in ann.iter_results(read_fasta(str(fasta)), opts)]


def _acts(model: Path, fasta: Path, layer: int = LAYER) -> list[torch.Tensor]:
    """Hook activations (resid_post@layer) of each protein, for formulas written out by hand."""
    from protsae_cli.plm.esm_forward import EsmRunner, HookPoint
    from protsae_cli.io.fasta import read_fasta
    from protsae_cli.plm.loading import load_plm

    runner = EsmRunner(load_plm(str(model)), torch.device("cpu"))
    out = []
    for rec in read_fasta(str(fasta)):
        tokens = runner.tokenizer.batch([rec.sequence])
        out.append(runner.hook_activations(tokens, HookPoint("resid_post", layer))[0, 1:len(rec.sequence) + 1])
    return out


def _protsae_dir(tmp_path: Path, W_enc, b_enc, W_dec, b_dec, k: int, plm_name: str, layer: int = LAYER) -> str:
    """The protsae SAE with these weights in protsae's layout (pre = W_enc (x - b_dec) + b_enc)."""
    from protsae_cli.sae.checkpoint import save_sae
    from protsae_cli.sae.config import SAEConfig
    from protsae_cli.sae.topk import TopKSAE

    cfg = SAEConfig(d_model=W_enc.shape[1], d_sae=W_enc.shape[0], k=k, layer=layer, plm_name=plm_name)
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
    return str(save_sae(sae, tmp_path / "protsae_equivalent"))


def _assert_same(a, b) -> None:
    assert len(a) == len(b) == 3
    for (ia, va), (ib, vb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-5)
        assert (ia >= 0).any()  # the comparison is not between empty codes


def _reference_codes(acts: list[torch.Tensor], dense_fn, k: int):
    """Top-k of hand-computed dense activations, in protsae's order (value desc, index asc; -1/0 empty)."""
    from protsae_cli.sae.topk import topk_relu

    out = []
    for x in acts:
        idx, val = topk_relu(dense_fn(x.float()), k)
        out.append((idx.numpy(), val.numpy()))
    return out


# -- InterPLM -------------------------------------------------------------------------------------------------

def _interplm_relu_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """ReLUSAE / the published AutoEncoder: bias [d], encoder = Linear(d, n), decoder = Linear(n, d, bias=False)."""
    return {"bias": _rand(D, seed=seed, scale=0.1), "encoder.weight": _rand(N, D, seed=seed + 1, scale=0.3),
            "encoder.bias": _rand(N, seed=seed + 2, scale=0.3), "decoder.weight": _rand(D, N, seed=seed + 3),
            "activation_rescale_factor": torch.rand(N, generator=_g(seed + 4)) * 3 + 0.5}


def test_interplm_relu_matches_hand_converted_protsae(tiny_esm_path, tiny_plm, fasta, tmp_path):
    st = _interplm_relu_state()
    f = tmp_path / "layer_2" / "ae_normalized.pt"
    f.parent.mkdir()
    torch.save(st, f)
    s = st["activation_rescale_factor"]
    # f = ReLU(W (x - bias) + b) / s: the division folds into the encoder rows; the decoder takes f * s.
    ref = _protsae_dir(tmp_path, st["encoder.weight"] / s[:, None], st["encoder.bias"] / s,
                       st["decoder.weight"].T * s[:, None], st["bias"], k=12, plm_name=tiny_plm.name)
    from protsae_cli.sae.foreign import with_options

    spec = with_options(str(f), plm=tiny_plm.name, k=12)  # layer 2 comes from the folder name layer_2
    _assert_same(_codes(tiny_esm_path, spec, fasta), _codes(tiny_esm_path, ref, fasta))


def test_interplm_topk_with_rescale_divides_after_selection(tiny_esm_path, tiny_plm, fasta, tmp_path):
    """TopKSAE: b_dec subtracted, TopK(ReLU), then features / activation_rescale_factor (selection unscaled)."""
    st = {"k": torch.tensor(6, dtype=torch.int), "threshold": torch.tensor(-1.0),
          "encoder.weight": _rand(N, D, seed=5, scale=0.3), "encoder.bias": _rand(N, seed=6, scale=0.3),
          "decoder.weight": _rand(D, N, seed=7), "b_dec": _rand(D, seed=8, scale=0.1),
          "activation_rescale_factor": torch.rand(N, generator=_g(9)) * 3 + 0.5}
    f = tmp_path / "ae.pt"
    torch.save(st, f)
    from protsae_cli.sae.topk import canonical_order
    from protsae_cli.sae.foreign import with_options
    from protsae_cli.sae.topk import topk_relu

    got = _codes(tiny_esm_path, with_options(str(f), layer=LAYER, plm=tiny_plm.name), fasta)
    ref = []
    for x in _acts(tiny_esm_path, fasta):
        pre = F.relu(F.linear(x - st["b_dec"], st["encoder.weight"], st["encoder.bias"]))
        idx, val = topk_relu(pre, 6)
        val = torch.where(idx >= 0, val / st["activation_rescale_factor"][idx.clamp_min(0)], val)
        i, v = canonical_order(idx, val)
        ref.append((i.numpy(), v.numpy()))
    _assert_same(got, ref)
    # Without a rescale the same file is an affine TopK SAE: identical to the protsae directory.
    del st["activation_rescale_factor"]
    torch.save(st, f)
    plain = _protsae_dir(tmp_path, st["encoder.weight"], st["encoder.bias"], st["decoder.weight"].T, st["b_dec"],
                         k=6, plm_name=tiny_plm.name)
    _assert_same(_codes(tiny_esm_path, with_options(str(f), layer=LAYER, plm=tiny_plm.name), fasta),
                 _codes(tiny_esm_path, plain, fasta))


def test_interplm_jumprelu_and_sqrt_d_normalisation(tiny_esm_path, tiny_plm, fasta, tmp_path):
    """JumpReLUSAE (no b_dec subtraction, decoder bias) with normalize_to_sqrt_d: x / ||x|| * sqrt(d) first."""
    st = {"encoder.weight": _rand(N, D, seed=10, scale=0.3), "encoder.bias": _rand(N, seed=11, scale=0.3),
          "decoder.weight": _rand(D, N, seed=12), "decoder.bias": _rand(D, seed=13, scale=0.1),
          "threshold": torch.rand(N, generator=_g(14)) * 0.5, "normalize_to_sqrt_d": torch.tensor(True)}
    f = tmp_path / "ae.pt"
    torch.save(st, f)
    from protsae_cli.sae.foreign import with_options

    def dense(x):
        x = F.normalize(x, dim=-1) * math.sqrt(D)
        pre = F.linear(x, st["encoder.weight"], st["encoder.bias"])
        return F.relu(pre * (pre > st["threshold"]))

    got = _codes(tiny_esm_path, with_options(str(f), layer=LAYER, plm=tiny_plm.name, k=N), fasta)
    _assert_same(got, _reference_codes(_acts(tiny_esm_path, fasta), dense, N))


def test_interplm_missing_metadata_names_the_flags(tmp_path):
    from protsae_cli.sae.checkpoint import load_sae

    f = tmp_path / "ae.pt"
    torch.save(_interplm_relu_state(), f)
    with pytest.raises(InputError) as e:
        load_sae(str(f))
    msg = str(e.value)
    assert str(f) in msg and "--sae-layer" in msg and "--sae-plm" in msg and "--sae-k" in msg
    with pytest.raises(InputError, match=r"does not record k; pass --sae-k N") as e:
        load_sae(f"{f}#layer=2,plm=esm2_t6_8M_UR50D")
    assert "--sae-layer" not in str(e.value)


def test_interplm_path_metadata_and_pairing_checks(tmp_path):
    """The published layout (Elana/InterPLM-esm2-8m/layer_N/ae_normalized.pt) names PLM and layer; a flag that
    contradicts them, or a width the named ESM-2 does not have, is refused."""
    from protsae_cli.sae.checkpoint import load_sae

    d = tmp_path / "models--Elana--InterPLM-esm2-8m" / "snapshots" / "abc" / "layer_4"
    d.mkdir(parents=True)
    st = {"bias": torch.zeros(320), "encoder.weight": _rand(64, 320, seed=1), "encoder.bias": torch.zeros(64),
          "decoder.weight": _rand(320, 64, seed=2)}
    torch.save(st, d / "ae_normalized.pt")
    sae, sha = load_sae(f"{d / 'ae_normalized.pt'}#k=64")
    assert (sae.cfg.layer, sae.cfg.plm_name, sae.cfg.plm_num_layers, sae.cfg.k) == (4, "esm2_t6_8M_UR50D", 6, 64)
    assert len(sha) == 64
    with pytest.raises(CompatibilityError, match=r"records layer 4 .* but --sae-layer 3"):
        load_sae(f"{d / 'ae_normalized.pt'}#k=64,layer=3")
    torch.save(_interplm_relu_state(), d / "ae_normalized.pt")  # 32-wide: not ESM-2 8M
    with pytest.raises(CompatibilityError, match=r"esm2_t6_8M_UR50D has d_model=320 but this SAE reads d_model=32"):
        load_sae(f"{d / 'ae_normalized.pt'}#k=8")


# -- InterProt ------------------------------------------------------------------------------------------------

def test_interprot_topk_with_layer_norm(tiny_esm_path, tiny_plm, fasta, tmp_path):
    """SparseAutoencoder: LN(x) - b_pre, @ w_enc [d_model, d_hidden] + b_enc, TopK then ReLU; k, layer and
    PLM width from the file name (plm<d>_l<layer>_sae<n>_k<k>)."""
    st = {"w_enc": _rand(D, N, seed=20, scale=0.3), "w_dec": _rand(N, D, seed=21), "b_enc": _rand(N, seed=22),
          "b_pre": _rand(D, seed=23, scale=0.1), "stats_last_nonzero": torch.zeros(N, dtype=torch.long)}
    f = tmp_path / f"esm2_plm{D}_l{LAYER}_sae{N}_k7_auxk16.pt"
    torch.save(st, f)
    from protsae_cli.sae.foreign import with_options
    from protsae_cli.sae.checkpoint import load_sae

    def dense(x):
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        xn = xc / (xc.std(-1, keepdim=True) + 1e-5)
        return F.relu((xn - st["b_pre"]) @ st["w_enc"] + st["b_enc"])

    spec = with_options(str(f), plm=tiny_plm.name)  # no ESM-2 is 32 wide: the PLM must be named
    sae, _ = load_sae(spec)
    assert (sae.cfg.k, sae.cfg.layer) == (7, LAYER) and not sae.supports_affine_encode
    _assert_same(_codes(tiny_esm_path, spec, fasta), _reference_codes(_acts(tiny_esm_path, fasta), dense, 7))
    # Reconstruction undoes the LN, as InterProt's forward does.
    x = _acts(tiny_esm_path, fasta)[0]
    mu, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
    i, v = (torch.as_tensor(a) for a in _reference_codes([x], dense, 7)[0])
    z = torch.zeros(x.shape[0], N).scatter(-1, i.clamp_min(0), torch.where(i >= 0, v, 0.0))
    torch.testing.assert_close(sae(x), (z @ st["w_dec"] + st["b_pre"]) * std + mu, rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="per-residue input normalisation"):
        from protsae_cli.encode import get_encoder

        get_encoder("onnx", sae)


def test_interprot_lightning_checkpoint_and_last_layer(tmp_path):
    """InterProt's Lightning checkpoints keep the weights under state_dict/sae_model.*; an SAE on the last
    block's output (before ESM-2's final layer norm) is refused: protsae's last layer includes that norm."""
    from protsae_cli.sae.checkpoint import load_sae

    st = {"sae_model.w_enc": torch.zeros(320, 16), "sae_model.w_dec": torch.zeros(16, 320),
          "sae_model.b_enc": torch.zeros(16), "sae_model.b_pre": torch.zeros(320)}
    torch.save({"state_dict": st}, tmp_path / "esm2_plm320_l5_sae16_k4.ckpt")
    sae, _ = load_sae(str(tmp_path / "esm2_plm320_l5_sae16_k4.ckpt"))
    assert (sae.cfg.plm_name, sae.cfg.layer, sae.cfg.k) == ("esm2_t6_8M_UR50D", 5, 4)
    torch.save({"state_dict": st}, tmp_path / "esm2_plm320_l6_sae16_k4.ckpt")
    with pytest.raises(CompatibilityError, match="before ESM-2's final layer norm"):
        load_sae(str(tmp_path / "esm2_plm320_l6_sae16_k4.ckpt"))


def test_interprot_published_safetensors_name(tmp_path):
    """The published file (liambai/InterProt-ESM2-SAEs esm2_plm1280_l24_sae4096.safetensors) names no k: their
    notebook builds SparseAutoencoder(ESM_DIM, SAE_DIM), whose default k is 128."""
    from protsae_cli.sae.foreign import INTERPROT_DEFAULT_K, detect
    from protsae_cli.sae.checkpoint import load_sae

    n = 160
    f = tmp_path / f"esm2_plm320_l3_sae{n}.safetensors"
    save_file({"w_enc": torch.zeros(320, n), "w_dec": torch.zeros(n, 320), "b_enc": torch.zeros(n),
               "b_pre": torch.zeros(320), "stats_last_nonzero": torch.zeros(n, dtype=torch.long)}, str(f))
    assert detect(f) == "interprot"
    sae, _ = load_sae(str(f))
    assert (sae.cfg.k, sae.cfg.layer, sae.cfg.plm_name, sae.cfg.d_sae) == (INTERPROT_DEFAULT_K, 3,
                                                                          "esm2_t6_8M_UR50D", n)
    with pytest.raises(InputError, match="the file name says plm320/sae999"):
        save_file({"w_enc": torch.zeros(320, n), "w_dec": torch.zeros(n, 320), "b_enc": torch.zeros(n),
                   "b_pre": torch.zeros(320)}, str(tmp_path / "esm2_plm320_l3_sae999.safetensors"))
        load_sae(str(tmp_path / "esm2_plm320_l3_sae999.safetensors"))


# -- SAELens --------------------------------------------------------------------------------------------------

def _saelens_dir(tmp_path: Path, name: str, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "sae_weights.safetensors"))
    return d


def _saelens_weights(seed: int) -> dict[str, torch.Tensor]:
    return {"W_enc": _rand(D, N, seed=seed, scale=0.3), "b_enc": _rand(N, seed=seed + 1, scale=0.3),
            "W_dec": _rand(N, D, seed=seed + 2), "b_dec": _rand(D, seed=seed + 3, scale=0.1)}


def test_saelens_standard_and_topk_match_protsae(tiny_esm_path, tiny_plm, fasta, tmp_path):
    """W_enc [d_in, d_sae] transposed; apply_b_dec_to_input false folds b_dec into b_enc; layer from hook_name
    (TransformerLens blocks.1.hook_resid_post = output of block 2 = protsae layer 2)."""
    from protsae_cli.sae.foreign import with_options

    w = _saelens_weights(30)
    std = _saelens_dir(tmp_path, "std", {"architecture": "standard", "d_in": D, "d_sae": N,
                                         "apply_b_dec_to_input": False, "normalize_activations": "none",
                                         "metadata_ignored": 1, "meta": {"hook_name": "blocks.1.hook_resid_post",
                                                                         "model_name": tiny_plm.name}}, w)
    ref = _protsae_dir(tmp_path, w["W_enc"].T, w["b_enc"] + w["W_enc"].T @ w["b_dec"], w["W_dec"], w["b_dec"],
                       k=10, plm_name=tiny_plm.name)
    _assert_same(_codes(tiny_esm_path, with_options(str(std), plm=tiny_plm.name, k=10), fasta),
                 _codes(tiny_esm_path, ref, fasta))

    w = _saelens_weights(40)
    topk = _saelens_dir(tmp_path, "topk", {"architecture": "topk", "k": 5, "d_in": D, "d_sae": N,
                                           "apply_b_dec_to_input": True, "hook_name": "blocks.2.hook_resid_pre"}, w)
    (tmp_path / "ref2").mkdir()
    ref = _protsae_dir(tmp_path / "ref2", w["W_enc"].T, w["b_enc"], w["W_dec"], w["b_dec"], k=5,
                       plm_name=tiny_plm.name)
    _assert_same(_codes(tiny_esm_path, with_options(str(topk), plm=tiny_plm.name), fasta),
                 _codes(tiny_esm_path, ref, fasta))


def test_saelens_jumprelu_with_layer_norm(tiny_esm_path, tiny_plm, fasta, tmp_path):
    from protsae_cli.sae.foreign import with_options

    w = {**_saelens_weights(50), "threshold": torch.rand(N, generator=_g(55)) * 0.3}
    d = _saelens_dir(tmp_path, "jr", {"architecture": "jumprelu", "d_in": D, "d_sae": N,
                                      "apply_b_dec_to_input": True, "normalize_activations": "layer_norm",
                                      "meta": {"hook_name": "blocks.1.hook_resid_post"}}, w)

    def dense(x):
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        pre = (xc / (xc.std(-1, keepdim=True) + 1e-5) - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
        return F.relu(pre) * (pre > w["threshold"])

    got = _codes(tiny_esm_path, with_options(str(d), plm=tiny_plm.name, k=16), fasta)
    _assert_same(got, _reference_codes(_acts(tiny_esm_path, fasta), dense, 16))


def test_saelens_refusals(tmp_path, tiny_plm):
    from protsae_cli.sae.checkpoint import load_sae

    w = _saelens_weights(60)
    for name, cfg, match in [
        ("gated", {"architecture": "gated"}, "architecture 'gated' is not supported"),
        ("dsae", {"architecture": "topk", "k": 4, "d_sae": N + 1}, f"d_sae {N + 1} does not match the weights' {N}"),
        ("hook", {"architecture": "topk", "k": 4, "hook_name": "blocks.0.hook_resid_pre"}, "reads the embeddings"),
        ("attn", {"architecture": "topk", "k": 4, "hook_name": "blocks.1.hook_mlp_out"}, "not recognised.*--sae-layer"),
    ]:
        d = _saelens_dir(tmp_path, name, cfg, w)
        with pytest.raises(InputError, match=match):
            load_sae(f"{d}#plm={tiny_plm.name}")


# -- sparsify -------------------------------------------------------------------------------------------------

def test_sparsify_layer_folders_match_protsae(tiny_esm_path, tiny_plm, fasta, tmp_path):
    """encoder.weight [num_latents, d_in] (protsae's layout), W_dec, b_dec subtracted before encoding; one folder
    per hookpoint (layers.N = output of block N+1); --sae-layer picks it."""
    from protsae_cli.sae.foreign import with_options
    from protsae_cli.sae.checkpoint import load_sae

    root = tmp_path / "sparsify_run"
    weights = {}
    for block in (0, 1):
        w = {"encoder.weight": _rand(N, D, seed=70 + block, scale=0.3), "encoder.bias": _rand(N, seed=80 + block),
             "W_dec": _rand(N, D, seed=90 + block), "b_dec": _rand(D, seed=100 + block, scale=0.1)}
        weights[block] = w
        d = root / f"layers.{block}"
        d.mkdir(parents=True)
        (d / "cfg.json").write_text(json.dumps({"activation": "topk", "k": 6, "num_latents": N, "d_in": D,
                                                "expansion_factor": 32, "normalize_decoder": True,
                                                "multi_topk": False, "skip_connection": False,
                                                "transcode": False}))
        save_file(w, str(d / "sae.safetensors"))
    with pytest.raises(InputError, match=r"several hookpoints \(layers.0, layers.1\); pass --sae-layer"):
        load_sae(f"{root}#plm={tiny_plm.name}")
    w = weights[1]
    ref = _protsae_dir(tmp_path, w["encoder.weight"], w["encoder.bias"], w["W_dec"], w["b_dec"], k=6,
                       plm_name=tiny_plm.name)
    _assert_same(_codes(tiny_esm_path, with_options(str(root), layer=LAYER, plm=tiny_plm.name), fasta),
                 _codes(tiny_esm_path, ref, fasta))
    with pytest.raises(CompatibilityError, match="k=6; --sae-k 5"):
        load_sae(f"{root / 'layers.1'}#plm={tiny_plm.name},k=5")
    cfg = json.loads((root / "layers.1" / "cfg.json").read_text())
    (root / "layers.1" / "cfg.json").write_text(json.dumps({**cfg, "transcode": True}))
    with pytest.raises(InputError, match="transcode=True is not supported"):
        load_sae(f"{root / 'layers.1'}#plm={tiny_plm.name}")


# -- untrusted files and the CLI ------------------------------------------------------------------------------

class _OpenPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("layout", ["interplm", "interprot", "lightning"])
def test_pickle_payload_in_a_foreign_pt_is_refused(tmp_path, layout):
    from protsae_cli.sae.checkpoint import load_sae

    marker = tmp_path / "PWNED"
    if layout == "interplm":
        obj = {**_interplm_relu_state(), "cfg": _OpenPayload(marker)}
    elif layout == "interprot":
        obj = {"w_enc": torch.zeros(D, N), "w_dec": torch.zeros(N, D), "b_enc": torch.zeros(N),
               "b_pre": _OpenPayload(marker)}
    else:
        obj = {"state_dict": {"sae_model.w_enc": torch.zeros(D, N)}, "hyper_parameters": _OpenPayload(marker)}
    f = tmp_path / "layer_2" / "ae_normalized.pt"
    f.parent.mkdir()
    torch.save(obj, f)
    with pytest.raises(InputError, match=r"ae_normalized\.pt: not a plain tensor state dict.*weights_only=True"):
        load_sae(f"{f}#plm=x,k=4")
    assert not marker.exists(), "a pickle inside a foreign SAE file was executed"


def test_protsae_directories_are_not_foreign(tiny_sae_dir):
    from protsae_cli.sae.foreign import detect

    assert detect(tiny_sae_dir) is None
    with pytest.raises(InputError, match="apply to published SAE formats"):
        detect(f"{tiny_sae_dir}#layer=2")


def test_affine_foreign_sae_runs_on_every_cpu_backend(tmp_path):
    """An InterPLM ReLU SAE is one affine map + TopK: it loads as a plain TopKSAE, so the ONNX backend (what
    --backend auto picks on CPU) gives the torch backend's codes."""
    pytest.importorskip("onnxruntime")
    from protsae_cli.encode import get_encoder
    from protsae_cli.sae.checkpoint import load_sae
    from protsae_cli.sae.topk import TopKSAE

    f = tmp_path / "ae.pt"
    torch.save(_interplm_relu_state(), f)
    sae, _ = load_sae(f"{f}#layer=2,plm=x,k=12")
    assert type(sae) is TopKSAE
    x = _rand(200, D, seed=3)
    i_t, v_t = get_encoder("torch", sae).encode(x)
    i_o, v_o = get_encoder("onnx", sae).encode(x)
    assert (i_t >= 0).sum() > 200
    torch.testing.assert_close(i_o, i_t)
    torch.testing.assert_close(v_o, v_t, rtol=1e-4, atol=1e-5)
