"""The fused top-k encode kernel against the torch reference.

CPU tests run the kernel in Triton's interpreter (fp32, small shapes). The kernel module builds the
interpreted copy of its kernels itself, with TRITON_INTERPRET=1 set while that copy is decorated, so these
tests hold whatever else the process imported first. They deliberately do NOT set TRITON_INTERPRET
process-wide: on a GPU machine that would turn every later-imported Triton kernel (the GPU tests' included)
into the slow interpreter.

GPU tests (marked `gpu`) run bf16/fp16/fp32 inputs at real shapes against the reference computed from the
same inputs upcast to fp32.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from protsae_cli.encode import topk_kernel as tk  # noqa: E402

has_cuda = torch.cuda.is_available()
gpu = pytest.mark.gpu


def _pre(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.addmm(b.float(), x.float(), W.float().T)


def _int_inputs(N: int, d: int, n: int, seed: int, lo: int = -3, hi: int = 4):
    """Small-integer inputs: every product and partial sum is exact in fp32, so any summation order gives
    bit-identical pre-activations and exact ties -- comparisons can demand equality."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(lo, hi, (N, d), generator=g).float()
    W = torch.randint(lo, hi, (n, d), generator=g).float()
    b = torch.randint(-8, 9, (n,), generator=g).float()
    return x, W, b


def _float_inputs(N: int, d: int, n: int, seed: int, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    W = torch.randn(n, d, generator=g) / math.sqrt(d)
    b = 0.1 * torch.randn(n, generator=g)
    return x.to(device, dtype), W.to(device, dtype), b.to(device)


# ------------------------------------------------------------------------------------------------------
# Interpreter (CPU)
# ------------------------------------------------------------------------------------------------------

def test_cpu_copy_is_interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(tk.kernel_module(True)._topk_encode_kernel, InterpretedFunction)
    assert not isinstance(tk.kernel_module(False)._topk_encode_kernel, InterpretedFunction)


@pytest.mark.parametrize("N,d,n,k", [
    (1, 20, 128, 8),     # one row, d below one BLOCK_K
    (7, 64, 512, 16),    # rows not a multiple of BLOCK_M
    (64, 96, 640, 64),   # d_sae not a power of two
    (33, 20, 600, 1),    # k = 1 (padded to 2 internally), ragged last tile
])
def test_random_float_inputs_match_reference(N, d, n, k):
    x, W, b = _float_inputs(N, d, n, seed=N + d + n + k)
    idx, val = tk.topk_encode(x, W, b, k)
    assert tk.check_topk(idx, val, _pre(x, W, b), k) == []


@pytest.mark.parametrize("mode", ["buffered_tight", "direct"])
def test_both_selection_modes_exact(mode):
    """Exact agreement in both modes; `buffered_tight` (cap == block_n) drains before nearly every tile."""
    N, d, n, k = 40, 48, 512, 16
    x, W, b = _int_inputs(N, d, n, seed=3)
    base = tk.default_config(d, n, k, torch.float32, interpret=True)
    cfg = replace(base, cap=base.block_n) if mode == "buffered_tight" else replace(base, cap=0)
    idx, val = tk.topk_encode(x, W, b, k, cfg)
    assert tk.check_topk(idx, val, _pre(x, W, b), k, exact=True) == []


def test_ties_go_to_the_lower_index():
    """Duplicate weight rows give bit-identical pre-activations; the lower latent index must win, both
    inside the selection (order) and at the k-th boundary (which latent is kept)."""
    N, d, n, k = 16, 32, 256, 8
    x, W, b = _int_inputs(N, d, n, seed=5)
    # Copy high-scoring latents onto later (and earlier) positions: exact duplicates of the same values.
    for src, dst in [(3, 200), (3, 201), (10, 130), (250, 7), (64, 65)]:
        W[dst] = W[src]
        b[dst] = b[src]
    idx, val = tk.topk_encode(x, W, b, k)
    pre = _pre(x, W, b)
    assert tk.check_topk(idx, val, pre, k, exact=True) == []
    # Independent check of the rule on rows where a tie straddles the k-th value.
    srt = torch.sort(pre, dim=1, descending=True, stable=True)
    for r in range(N):
        kth = srt.values[r, k - 1]
        if kth > 0 and (pre[r] == kth).sum() > 1:
            tied = (pre[r] == kth).nonzero().flatten()
            kept = [int(i) for i in idx[r] if i >= 0 and pre[r, i] == kth]
            assert kept == sorted(tied.tolist())[:len(kept)]


def test_rows_without_positive_preactivations_report_nothing():
    N, d, n, k = 9, 24, 128, 8
    x, W, _ = _int_inputs(N, d, n, seed=7)
    b = torch.full((n,), -1e4)
    idx, val = tk.topk_encode(x, W, b, k)
    assert (idx == -1).all() and (val == 0).all()


def test_rows_with_fewer_positives_than_k_are_padded():
    N, d, n, k = 6, 16, 128, 32
    x, W, b = _int_inputs(N, d, n, seed=11)
    b = b - 40.0  # only a few latents stay positive
    pre = _pre(x, W, b)
    assert ((pre > 0).sum(1) < k).any()
    idx, val = tk.topk_encode(x, W, b, k)
    assert tk.check_topk(idx, val, pre, k, exact=True) == []
    assert ((idx == -1) == (val == 0)).all()


def test_zero_rows_and_validation():
    x, W, b = _float_inputs(0, 16, 64, seed=0)
    idx, val = tk.topk_encode(x, W, b, 4)
    assert idx.shape == (0, 4) and val.dtype == torch.float32
    x, W, b = _float_inputs(4, 16, 64, seed=0)
    with pytest.raises(ValueError, match="k must be"):
        tk.topk_encode(x, W, b, 65)
    with pytest.raises(ValueError, match="k must be"):
        tk.topk_encode(x, W, b, 0)
    with pytest.raises(ValueError, match="share a float dtype"):
        tk.topk_encode(x, W.double(), b, 4)
    with pytest.raises(ValueError, match="interpreter cannot compute in bf16"):
        tk.topk_encode(x.bfloat16(), W.bfloat16(), b, 4)
    with pytest.raises(ValueError, match="block_n"):
        tk.topk_encode(x, W, b, 32, tk.KernelConfig(block_m=16, block_n=16, block_k=16, cap=64))
    with pytest.raises(ValueError, match="k must be"):
        tk.topk_encode(*_float_inputs(2, 16, 256, seed=0), 129)


def test_non_contiguous_input():
    x, W, b = _float_inputs(20, 32, 256, seed=9)
    xt = torch.randn(32, 20).T  # strided view
    xt.copy_(x)
    idx, val = tk.topk_encode(xt, W, b, 8)
    assert tk.check_topk(idx, val, _pre(x, W, b), 8) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 40), d=st.integers(1, 80), n=st.integers(2, 300), k=st.integers(1, 64),
       seed=st.integers(0, 2**16), direct=st.booleans())
def test_hypothesis_shapes_exact(N, d, n, k, seed, direct):
    k = min(k, n)
    x, W, b = _int_inputs(N, d, n, seed)
    cfg = tk.default_config(d, n, k, torch.float32, interpret=True)
    if direct:
        cfg = replace(cfg, cap=0)
    idx, val = tk.topk_encode(x, W, b, k, cfg)
    assert tk.check_topk(idx, val, _pre(x, W, b), k, exact=True) == []


def test_check_topk_catches_wrong_answers():
    """The checker the other tests rely on must reject a wrong selection, a wrong value and a bad order."""
    x, W, b = _float_inputs(8, 16, 64, seed=1)
    pre = _pre(x, W, b)
    from protsae_cli.sae.topk import topk_relu

    idx, val = topk_relu(pre, 8)
    assert tk.check_topk(idx, val, pre, 8) == []
    bad = idx.clone()
    bad[0, 0] = int(pre[0].argmin())
    assert tk.check_topk(bad, val, pre, 8)
    badv = val.clone()
    badv[1, 2] += 0.5
    assert tk.check_topk(idx, badv, pre, 8)
    assert tk.check_topk(idx.flip(1), val.flip(1), pre, 8)


# ------------------------------------------------------------------------------------------------------
# GPU code generation without a GPU: compile for sm_90 with the bundled ptxas (catches Triton front-end /
# lowering errors that the interpreter cannot see).
# ------------------------------------------------------------------------------------------------------

def _ptxas_available() -> bool:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(bundled) or shutil.which("ptxas") is not None


@pytest.mark.skipif(has_cuda, reason="covered by the GPU tests")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_compiles_for_hopper():
    if not _ptxas_available():
        pytest.skip("no ptxas to compile for sm_90")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = tk.kernel_module(False)
    k, d = 64, 320
    cfg = tk.default_config(d, 10240, k, torch.bfloat16, interpret=False)
    const = dict(stride_xd=1, stride_wd=1, **tk.kernel_meta(cfg, k, d, torch.bfloat16))
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*fp32", "idx_ptr": "*i64", "val_ptr": "*fp32",
           "buf_ptr": "*i64", "N": "i32", "D": "i32", "NL": "i32", "K_OUT": "i32", "stride_xm": "i32",
           "stride_wn": "i32", **{name: "constexpr" for name in const}}
    # What a launch would specialise on: 16-byte aligned pointers, ints divisible by 16 (all ESM-2 sizes).
    params = mod._topk_encode_kernel.arg_names
    aligned = {(params.index(name),): [["tt.divisibility", 16]] for name, ty in sig.items() if ty != "constexpr"}
    compiled = triton.compile(ASTSource(fn=mod._topk_encode_kernel, signature=sig, constexprs=const, attrs=aligned),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    assert "wgmma" in compiled.asm["ptx"]  # the tile GEMM runs on Hopper tensor cores
    assert "async_copy_global_to_local" in compiled.asm["ttgir"]  # and its loads are software-pipelined
    assert compiled.asm["cubin"]


# ------------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------------

@gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU")
@pytest.mark.parametrize("d,n,k", [(320, 10240, 64), (480, 10240, 64), (1280, 10240, 64), (1280, 40960, 64),
                                   (640, 65536, 128), (2560, 16384, 32), (5120, 8192, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_inputs_real_shapes(d, n, k, dtype):
    x, W, b = _float_inputs(3000, d, n, seed=d + n + k, dtype=dtype, device="cuda")
    idx, val = tk.topk_encode(x, W, b, k)
    torch.cuda.synchronize()
    # Different fp32 summation orders: allow near-ties at the k-th value.
    assert tk.check_topk(idx, val, _pre(x, W, b), k, atol=1e-4, rtol=1e-4) == []


@gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU")
def test_gpu_fp32_exact_on_integer_inputs():
    x, W, b = _int_inputs(2048, 320, 10240, seed=1)
    x, W, b = x.cuda(), W.cuda(), b.cuda()
    idx, val = tk.topk_encode(x, W, b, 64)
    assert tk.check_topk(idx, val, _pre(x, W, b), 64, exact=True) == []


@gpu
@pytest.mark.skipif(not has_cuda, reason="needs a CUDA GPU")
def test_gpu_every_benchmarked_config_is_correct():
    d, n, k = 320, 10240, 64
    x, W, b = _float_inputs(1500, d, n, seed=2, dtype=torch.bfloat16, device="cuda")
    pre = _pre(x, W, b)
    for cfg in tk.candidate_configs(d, n, k, torch.bfloat16):
        idx, val = tk.topk_encode(x, W, b, k, cfg)
        assert tk.check_topk(idx, val, pre, k, atol=1e-4, rtol=1e-4) == [], cfg.label()
