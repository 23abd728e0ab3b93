"""ONNX export (graph, metadata, atomic write, CLI) and the onnxruntime encode backend against torch."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from protsae_cli.errors import InputError  # noqa: E402
from protsae_cli.encode.onnx_export import (  # noqa: E402
    META_CONFIG, META_SHA, build_onnx_model, export_onnx, export_onnx_from_dir, load_onnx_config,
    load_onnx_metadata, state_sha256)
from protsae_cli.sae.checkpoint import load_sae, save_sae  # noqa: E402
from protsae_cli.sae.config import ConceptEntry, SAEConfig
from protsae_cli.sae.topk import TopKSAE, topk_relu


def make_sae(d: int = 48, n: int = 320, k: int = 16, seed: int = 0) -> TopKSAE:
    """A TopK SAE with non-trivial normalisation and biases, so the folded affine is really exercised."""
    cfg = SAEConfig(d_model=d, d_sae=n, k=k, hook_point="resid_post", layer=3, plm_name="esm2_t6_8M_UR50D",
                    plm_sha256="ab" * 32, plm_num_layers=6,
                    concepts=[ConceptEntry(latent=5, concept_id="PSC:1", name="helix", ontology_id="SO:0001117",
                                           threshold=0.5)],
                    training={"seed": seed, "note": "test"})
    sae = TopKSAE(cfg)
    sae.reset_parameters(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.2 * torch.randn(n, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=g))
        sae.norm_mean.copy_(torch.randn(d, generator=g))
        sae.norm_scale.fill_(1.7)
    return sae


def _reference(sae: TopKSAE, x: torch.Tensor):
    with torch.no_grad():
        pre = sae.pre_activations(x)
    return pre, topk_relu(pre, sae.cfg.k)


def _check(idx, val, pre, k, exact=False):
    tk = pytest.importorskip("protsae_cli.encode.topk_kernel")
    return tk.check_topk(idx, val, pre, k, atol=1e-5, rtol=1e-5, exact=exact)


def test_graph_is_matmul_add_relu_topk_with_dynamic_rows():
    sae = make_sae()
    model = build_onnx_model(sae, opset=17)
    ops = [n.op_type for n in model.graph.node]
    assert ops[:4] == ["MatMul", "Add", "Relu", "TopK"] and "Where" in ops
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "rows" and dims[1].dim_value == 48
    outs = {o.name: o for o in model.graph.output}
    assert set(outs) == {"indices", "values"}
    assert [d.dim_value for d in outs["indices"].type.tensor_type.shape.dim][1] == 16
    k_init = [t for t in model.graph.initializer if t.name == "k"][0]
    assert list(k_init.int64_data) == [16]
    assert model.opset_import[0].version == 17


@pytest.mark.parametrize("opset", [11, 17])
def test_onnxruntime_matches_torch_reference(tmp_path, opset):
    sae = make_sae(seed=opset)
    path = export_onnx(sae, tmp_path / "sae.onnx", opset=opset)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(300, 48, generator=torch.Generator().manual_seed(opset))
    idx, val = sess.run(None, {"x": x.numpy()})
    pre, _ = _reference(sae, x)
    assert _check(torch.from_numpy(idx), torch.from_numpy(val), pre, 16) == []


def test_ties_and_empty_slots_follow_the_reference_exactly():
    """Integer weights make the GEMM exact, duplicate rows make exact ties; negative biases leave rows with
    fewer than k positives. The ONNX graph must reproduce the reference bit for bit."""
    from protsae_cli.encode.onnx_backend import OnnxEncoder

    d, n, k = 24, 200, 12
    sae = TopKSAE(SAEConfig(d_model=d, d_sae=n, k=k))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-3, 4, (n, d), generator=g).float())
        for src, dst in [(2, 150), (2, 151), (9, 100), (199, 1)]:
            sae.W_enc[dst] = sae.W_enc[src]
        sae.b_enc.copy_(torch.randint(-70, 0, (n,), generator=g).float())
        sae.b_enc[150], sae.b_enc[151], sae.b_enc[100], sae.b_enc[1] = (sae.b_enc[2], sae.b_enc[2],
                                                                        sae.b_enc[9], sae.b_enc[199])
    x = torch.randint(-3, 4, (64, d), generator=g).float()
    enc = OnnxEncoder(sae, "cpu")
    idx, val = enc.encode(x)
    pre, (ridx, rval) = _reference(sae, x)
    assert (ridx == -1).any(), "test needs rows with fewer than k positives"
    assert torch.equal(idx, ridx) and torch.equal(val, rval)


def test_metadata_round_trip_and_checksum(tmp_path):
    sae = make_sae()
    d = save_sae(sae, tmp_path / "sae_dir")
    _, file_sha = load_sae(d)
    assert state_sha256(sae) == file_sha  # the in-memory digest equals the checkpoint file's
    out, cfg = export_onnx_from_dir(d, tmp_path / "out" / "sae.onnx")
    meta = load_onnx_metadata(out)
    assert meta[META_SHA] == file_sha
    assert json.loads(meta[META_CONFIG]) == sae.cfg.to_json_dict()
    back = load_onnx_config(out)
    assert back == sae.cfg and back.concepts[0].name == "helix" and back.plm_sha256 == "ab" * 32
    from protsae_cli.runtime import check_compatible

    check_compatible(back, "esm2_t6_8M_UR50D", "ab" * 32, 48, 6)
    with pytest.raises(InputError):
        check_compatible(back, "esm2_t6_8M_UR50D", "ab" * 32, 320, 6)


def test_atomic_write_leaves_no_temporaries_and_replaces(tmp_path):
    sae = make_sae()
    p = tmp_path / "sae.onnx"
    p.write_bytes(b"old")
    export_onnx(sae, p)
    assert p.read_bytes()[:3] != b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["sae.onnx"]


def test_rejects_bad_opset_and_foreign_files(tmp_path):
    sae = make_sae()
    with pytest.raises(InputError, match="opset"):
        export_onnx(sae, tmp_path / "a.onnx", opset=9)
    assert not (tmp_path / "a.onnx").exists()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model")
    with pytest.raises(InputError):
        load_onnx_config(junk)
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["a"], ["b"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    onnx.save_model(helper.make_model(g), str(tmp_path / "other.onnx"))
    with pytest.raises(InputError, match="not a protsae"):
        load_onnx_config(tmp_path / "other.onnx")
    with pytest.raises(InputError, match="not found"):
        load_onnx_config(tmp_path / "missing.onnx")


def test_onnx_encoder_from_module_and_from_file_in_chunks(tmp_path):
    from protsae_cli.encode import get_encoder
    from protsae_cli.encode.onnx_backend import OnnxEncoder

    sae = make_sae(n=256, k=32)
    x = torch.randn(1000, 48, generator=torch.Generator().manual_seed(8))
    pre, _ = _reference(sae, x)
    enc = get_encoder("onnx", sae, "cpu", chunk_rows=333)  # ragged last chunk
    assert enc.name == "onnx" and enc.providers == ["CPUExecutionProvider"]
    idx, val = enc.encode(x)
    assert _check(idx, val, pre, 32) == []
    path = export_onnx(sae, tmp_path / "s.onnx")
    idx2, val2 = OnnxEncoder(path, "cpu", chunk_rows=4096).encode(x)
    assert torch.equal(idx, idx2) and torch.equal(val, val2)
    e_idx, e_val = enc.encode(x[:0])
    assert e_idx.shape == (0, 32) and e_val.dtype == torch.float32
    with pytest.raises(InputError, match="expected activations"):
        enc.encode(torch.randn(3, 47))


def _invoke(args):
    from typer.testing import CliRunner

    from protsae_cli.cli.app import build_app

    try:
        app = build_app()
    except ImportError as e:  # another command module of the tree not importable (not this test's subject)
        pytest.skip(f"protsae app does not build here: {e}")
    return CliRunner().invoke(app, args)


def test_cli_export_onnx(tmp_path):
    sae = make_sae()
    d = save_sae(sae, tmp_path / "sae")
    out = tmp_path / "x" / "sae.onnx"
    res = _invoke(["export-onnx", "--sae", str(d), "-o", str(out), "--opset", "13"])
    assert res.exit_code == 0, res.output
    assert out.is_file()
    import onnx

    assert onnx.load(str(out)).opset_import[0].version == 13
    assert load_onnx_config(out) == sae.cfg
    x = torch.randn(50, 48)
    idx, val = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    pre, _ = _reference(sae, x)
    assert _check(torch.from_numpy(idx), torch.from_numpy(val), pre, 16) == []


def test_cli_export_onnx_errors(tmp_path):
    res = _invoke(["export-onnx", "--sae", str(tmp_path / "nope"), "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code != 0
    assert isinstance(res.exception, InputError) or "not found" in res.output.lower()
    res = _invoke(["export-onnx", "-o", str(tmp_path / "o.onnx")])
    assert res.exit_code == 2  # usage error: --sae is required


@pytest.mark.parametrize("opset", [11, 17, 18])
def test_priority_graph_matches_a_defined_first_protsae(tmp_path, opset):
    """A ProtSAE that admits its called concepts first (topk_scope="defined_first") exports with the priority
    rule in the graph (ReduceMax's axes moved from attribute to input at opset 18), and the file alone gives the
    module's codes."""
    import onnx

    from protsae_cli.encode.onnx_backend import OnnxEncoder
    from protsae_cli.sae.checkpoint import build_sae

    if opset > onnx.defs.onnx_opset_version():
        pytest.skip(f"this onnx package stops at opset {onnx.defs.onnx_opset_version()}")
    m = 5
    cfg = SAEConfig(d_model=12, d_sae=64, k=6, arch="protsae",
                    protsae={"n_concepts": m, "defined_bias": "calibrated", "topk_scope": "defined_first"},
                    concepts=[ConceptEntry(latent=c, concept_id=f"C:{c}", name=f"c{c}") for c in range(m)])
    sae = build_sae(cfg)
    sae.reset_parameters(0)
    with torch.no_grad():
        sae.defined_offset.copy_(torch.tensor([-0.5, 0.0, 0.3, 0.8, 2.0]))
        sae.r_pred.fill_(-2.0)  # small defined values: plain TopK would drop many of these calls
    x = torch.randn(400, 12, generator=torch.Generator().manual_seed(opset))
    path = export_onnx(sae, tmp_path / "p.onnx", opset=opset)
    ref_idx, ref_val = sae.encode(x)
    idx, val = OnnxEncoder(path).encode(x)
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(val, ref_val, atol=1e-5)
    plain_idx, _ = topk_relu(sae.pre_activations(x), 6)
    assert not torch.equal(plain_idx, ref_idx)  # the rule matters on these inputs
