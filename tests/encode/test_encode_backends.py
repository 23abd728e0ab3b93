"""Every encode backend gives the same codes on the same input: torch (reference), onnx (onnxruntime),
triton (the fused kernel; on CPU in Triton's interpreter, enabled per test with TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

from protsae_cli.encode import get_encoder
from protsae_cli.errors import InputError
from protsae_cli.sae.config import SAEConfig
from protsae_cli.sae.topk import TopKSAE

BACKENDS = ["torch", "onnx", "triton"]


@pytest.fixture()
def backend_env(monkeypatch):
    """Allow the Triton backend on CPU (its interpreter) for the duration of one test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _needs(name: str) -> None:
    if name == "onnx":
        pytest.importorskip("onnxruntime")
    if name == "triton":
        pytest.importorskip("triton")


def _float_sae(d=32, n=256, k=16, seed=0) -> TopKSAE:
    sae = TopKSAE(SAEConfig(d_model=d, d_sae=n, k=k))
    sae.reset_parameters(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(n, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=g))
        sae.norm_mean.copy_(0.5 * torch.randn(d, generator=g))
        sae.norm_scale.fill_(1.3)
    return sae


def _int_sae(d=24, n=192, k=12, seed=0) -> TopKSAE:
    """Integer weights (exact GEMM in any order) with duplicated latents (exact ties); few latents have a
    positive bias, so all-zero input rows have fewer than k positives."""
    sae = TopKSAE(SAEConfig(d_model=d, d_sae=n, k=k))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-3, 4, (n, d), generator=g).float())
        sae.b_enc.copy_(torch.randint(-60, 4, (n,), generator=g).float())
        for src, dst in [(0, 190), (5, 6), (5, 100), (150, 3)]:
            sae.W_enc[dst] = sae.W_enc[src]
            sae.b_enc[dst] = sae.b_enc[src]
    return sae


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_matches_torch_reference_on_random_inputs(name, backend_env):
    _needs(name)
    from protsae_cli.encode.topk_kernel import check_topk

    sae = _float_sae()
    x = torch.randn(70, 32, generator=torch.Generator().manual_seed(3))
    enc = get_encoder(name, sae, "cpu")
    assert enc.name == name
    idx, val = enc.encode(x)
    with torch.no_grad():
        pre = sae.pre_activations(x)
    assert check_topk(idx, val, pre, sae.cfg.k, atol=1e-5, rtol=1e-5) == []


def test_all_backends_identical_on_exact_inputs_with_ties(backend_env):
    sae = _int_sae()
    x = torch.randint(-3, 4, (48, 24), generator=torch.Generator().manual_seed(1)).float()
    x[:4] = 0
    ref_idx, ref_val = get_encoder("torch", sae, "cpu").encode(x)
    assert (ref_idx == -1).any()  # some rows have fewer than k positives
    seen = ["torch"]
    for name in ("onnx", "triton"):
        try:
            _needs(name)
        except pytest.skip.Exception:
            continue
        idx, val = get_encoder(name, sae, "cpu").encode(x)
        assert torch.equal(idx, ref_idx), name
        assert torch.equal(val, ref_val), name
        seen.append(name)
    assert len(seen) >= 2


@pytest.mark.parametrize("name", BACKENDS)
def test_chunking_and_empty_input(name, backend_env):
    _needs(name)
    sae = _int_sae(seed=2)
    x = torch.randint(-3, 4, (37, 24), generator=torch.Generator().manual_seed(2)).float()
    whole = get_encoder("torch", sae, "cpu").encode(x)
    enc = get_encoder(name, sae, "cpu", chunk_rows=10)
    idx, val = enc.encode(x)
    assert torch.equal(idx, whole[0]) and torch.equal(val, whole[1])
    e_idx, e_val = enc.encode(x[:0])
    assert e_idx.shape == (0, sae.cfg.k) and e_idx.dtype == torch.int64 and e_val.dtype == torch.float32


def test_triton_backend_on_cpu_needs_the_interpreter_switch(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InputError, match="--backend torch"):
        get_encoder("triton", _float_sae(), "cpu")


def test_triton_backend_refuses_what_the_kernel_cannot_do(backend_env):
    pytest.importorskip("triton")
    big_k = TopKSAE(SAEConfig(d_model=16, d_sae=512, k=200))
    with pytest.raises(InputError, match="k <= 128"):
        get_encoder("triton", big_k, "cpu")
    with pytest.raises(InputError, match="bf16"):
        get_encoder("triton", _float_sae(), "cpu", dtype=torch.bfloat16)
    enc = get_encoder("triton", _float_sae(), "cpu")
    with pytest.raises(InputError, match="expected activations"):
        enc.encode(torch.randn(4, 31))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", BACKENDS)
def test_backends_on_gpu_agree_with_reference(name):
    _needs(name)
    from protsae_cli.encode.topk_kernel import check_topk

    sae = _float_sae(d=320, n=10240, k=64)
    x = torch.randn(5000, 320, generator=torch.Generator().manual_seed(0))
    enc = get_encoder(name, sae, "cuda")
    idx, val = enc.encode(x.cuda())
    # bf16 inputs on the GPU (torch and triton): compare against the reference on the same rounded inputs.
    dtype = getattr(enc, "dtype", torch.float32)
    W, b = sae.encoder_affine()
    pre = torch.addmm(b, x.to(dtype).float(), W.to(dtype).float().T)
    # torch rounds its bf16 GEMM output to bf16 before the bias; onnxruntime's CUDA MatMul may use TF32;
    # the fused kernel keeps fp32 accumulators throughout.
    tol = {"torch": 1e-2, "onnx": 1e-2, "triton": 1e-4}[name]
    assert check_topk(idx, val, pre, 64, atol=tol, rtol=tol) == [], name
