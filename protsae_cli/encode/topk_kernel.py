"""Fused SAE encode: TopK(ReLU(x W^T + b)) per row without writing the [N, n] pre-activation matrix.

Why a kernel at all: at 65,536 rows x 10,240 latents the unfused path writes and re-reads 1.3 GB of bf16
pre-activations and then runs a multi-pass radix select over it; on an H200 that costs 3-8x the GEMM itself
(docs/PERFORMANCE_ANCHORS.md §1, measured anchors). Here each program owns BLOCK_M rows, sweeps all latents in
BLOCK_N tiles (GEMM on tensor cores, fp32 accumulate) and keeps the rows' running top-k on chip.

Selection design (see docs/KERNEL_NOTES.md for the arithmetic behind it):

* Keys. A positive fp32 value's bit pattern is monotone in the value, so one int64 key
  ``(value_bits << 32) | (2^31 - 1 - column)`` orders by value and, for equal values, puts the LOWER column
  first. One integer top-k therefore yields indices and the documented tie rule at once. Zero and negative
  pre-activations map below the admission floor (2^32 - 1) and are never reported (idx -1, val 0).
* Threshold gating. The running top-k's smallest key is a per-row threshold that only rises. A tile element
  whose key is not above it can never be selected, and is dropped with one compare. Tiles without a single
  survivor in the whole row block skip the selection entirely.
* Two selection modes (constexpr ``CAP``):
  - ``CAP == 0`` ("direct"): a tile with survivors is reduced to its top-K_PAD by a bitonic top-k network
    and merged into the running top-k. All in registers; costs ~25 compare-exchange rounds per tile
    element whenever any row of the block has a survivor.
  - ``CAP > 0`` ("buffered", default): survivors are appended (prefix-sum positions) to a per-row candidate
    buffer of CAP keys in global scratch memory (L2-resident: one buffer per persistent program). Only when
    a row's buffer would overflow (and once at the end) is it drained through the bitonic network. The
    per-element cost in steady state is a compare, a prefix sum and a predicated store; the expensive
    network runs on survivors only (about k (1 + ln(n/k)) per row plus staleness).
* Bitonic networks are written out here on a 2x2x...x2 hypercube view of the tile (compare-exchange along
  one axis = pair sum minus self to find the partner, then select), using only reshape/reduce/where so that
  the kernel does not depend on ``tl.topk``/``tl.bitonic_merge`` (absent from older Triton releases).

Interpreter: ``@triton.jit`` decides at decoration time whether it builds an interpreted function
(``TRITON_INTERPRET=1``) or a GPU one. ``topk_encode`` therefore picks a copy of this module built in the mode
the input's device needs (CPU tensors -> interpreted copy, CUDA tensors -> compiled copy), so callers and
tests never depend on the order in which modules were imported or on a process-wide environment variable.
The interpreter cannot do bf16 arithmetic: CPU inputs must be fp32 (fp16 is also accepted).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import threading
from dataclasses import dataclass, replace
from types import ModuleType
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

# Whether THIS copy of the module was decorated in interpreter mode (decided once, at import).
BUILT_INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_K = 128


# ----------------------------------------------------------------------------------------------------
# Bitonic building blocks on a hypercube view: a [R, L] tile (R, L powers of two) reshaped to [2] * ND.
# Axis ND-1-b holds bit b of the column position; the row bits are the outer axes.
# ----------------------------------------------------------------------------------------------------

# Only Triton *builtins* are used inside kernels, plus the helpers below: triton.language's own jit-level
# library (tl.max, tl.sum, tl.cumsum, tl.cdiv, ...) is decorated once, when triton is first imported, in
# whatever mode the environment said then -- calling it from a kernel built in the other mode fails. With
# builtins only, a copy of this module decorated in either mode works in any process.

@triton.jit
def _max_op(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_op(a, b):
    return tl.minimum(a, b)


@triton.jit
def _add_op(a, b):
    return a + b


# Combine functions. The interpreter runs a custom combine function element by element in Python but has
# numpy fast paths for triton.language's own max/min/sum combiners (recognised by identity), so the
# interpreted copy passes those; the compiled copy passes its own (always built in compiled mode).
if BUILT_INTERPRETED:
    _MAX_OP = getattr(tl.standard, "_elementwise_max", _max_op)
    _MIN_OP = getattr(tl.standard, "_elementwise_min", _min_op)
    _ADD_OP = getattr(tl.standard, "_sum_combine", _add_op)
else:
    _MAX_OP, _MIN_OP, _ADD_OP = _max_op, _min_op, _add_op


@triton.jit
def _rmax(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _MAX_OP)


@triton.jit
def _rmin(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _MIN_OP)


@triton.jit
def _rsum(x, AXIS: tl.constexpr):
    return tl.reduce(x, AXIS, _ADD_OP)


@triton.jit
def _cumsum(x, AXIS: tl.constexpr):
    return tl.associative_scan(x, AXIS, _ADD_OP)


@triton.jit
def _axis_bit(ND: tl.constexpr, AX: tl.constexpr):
    """0/1 along hypercube axis AX, shaped to broadcast against the [2] * ND view."""
    return tl.reshape(tl.arange(0, 2), [1] * AX + [2] + [1] * (ND - AX - 1))


@triton.jit
def _compare_exchange(h, desc, ND: tl.constexpr, AX: tl.constexpr):
    """One bitonic round along axis AX: each pair ends up ordered ascending (desc == 0) or descending."""
    # Pair sum minus self is the partner (exact in wrapping int64 arithmetic); a sum, not a xor, because
    # the interpreter has a fast path for sums.
    partner = tl.reduce(h, AX, _ADD_OP, keep_dims=True) - h
    upper = _axis_bit(ND, AX)
    # The element in the lower slot keeps the min (ascending) and the upper one the max; `desc` flips that.
    take_partner = (h > partner) != ((desc ^ upper) != 0)
    return tl.where(take_partner, partner, h)


@triton.jit
def _merge_runs(h, ND: tl.constexpr, LOG_RUN: tl.constexpr, ORDER: tl.constexpr):
    """Sort every bitonic run of length 2^LOG_RUN (innermost axes). ORDER: 0 ascending, 1 descending,
    2 alternating by run parity (even runs ascending) so that neighbouring runs can be merged next."""
    if ORDER == 2:
        desc = _axis_bit(ND, ND - 1 - LOG_RUN)
    else:
        desc = tl.full([1] * ND, ORDER, tl.int32)
    for i in tl.static_range(LOG_RUN):
        h = _compare_exchange(h, desc, ND, ND - LOG_RUN + i)
    return h


@triton.jit
def _topk_desc(x, LOG_R: tl.constexpr, LOG_L: tl.constexpr, LOG_K: tl.constexpr):
    """Per-row top 2^LOG_K of x [2^LOG_R, 2^LOG_L] (int64 keys), sorted descending.

    Sort runs of K with alternating directions, then repeatedly take the elementwise max of each
    (ascending, descending) neighbour pair -- a bitonic run holding the top K of both -- and re-sort it,
    halving the width each time (the "bitonic top-k" construction)."""
    ND: tl.constexpr = LOG_R + LOG_L
    h = tl.reshape(x, [2] * ND)
    for j in tl.static_range(1, LOG_K + 1):
        if j == LOG_L:
            h = _merge_runs(h, ND, j, 1)
        else:
            h = _merge_runs(h, ND, j, 2)
    for lvl in tl.static_range(LOG_K + 1, LOG_L + 1):
        h = _rmax(h, ND - (lvl - LOG_K - 1) - 1 - LOG_K)
        if lvl == LOG_L:
            h = _merge_runs(h, ND - (lvl - LOG_K), LOG_K, 1)
        else:
            h = _merge_runs(h, ND - (lvl - LOG_K), LOG_K, 2)
    return tl.reshape(h, [2**LOG_R, 2**LOG_K])


@triton.jit
def _merge_into(top, new_desc, LOG_R: tl.constexpr, LOG_K: tl.constexpr):
    """top (ascending) + new_desc (descending), both [R, K] -> top K of their union, ascending."""
    ND: tl.constexpr = LOG_R + LOG_K
    h = tl.reshape(tl.maximum(top, new_desc), [2] * ND)
    h = _merge_runs(h, ND, LOG_K, 0)
    return tl.reshape(h, [2**LOG_R, 2**LOG_K])


# ----------------------------------------------------------------------------------------------------
# Pieces of the fused kernel
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _gemm_tile(x_ptr, w_ptr, rows64, row_ok, cols, col_ok, D, stride_xm, stride_xd, stride_wn, stride_wd,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] = x[rows, :] @ W[cols, :]^T in fp32, looping over d in BLOCK_K chunks."""
    rk = tl.arange(0, BLOCK_K)
    # Offsets are rebuilt from two small vectors every step instead of carrying [BLOCK_M, BLOCK_K] and
    # [BLOCK_K, BLOCK_N] 64-bit pointer tensors through the loop: those cost ~100 registers per thread that
    # the selection needs more.
    x_row = x_ptr + rows64 * stride_xm
    w_col = w_ptr + cols * stride_wn
    acc = tl.full([BLOCK_M, BLOCK_N], 0, tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kd = k0 + rk
        x_ptrs = x_row[:, None] + (kd * stride_xd)[None, :]
        w_ptrs = w_col[None, :] + (kd * stride_wd)[:, None]
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            wt = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = kd < D
            xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _pack_keys(acc, bias, cols):
    """int64 keys: value bits high, inverted column low. No masking on purpose (it costs selects on every
    element): a negative value (or -0.0) sign-extends to a negative key, +0.0 gives a key below 2^32, and
    only positive values reach 2^32 or more -- the per-row admission bar starts at 2^32 - 1, which rejects
    the rest with the same compare that gates candidates."""
    v = acc + bias[None, :]
    vbits = v.to(tl.int32, bitcast=True).to(tl.int64)
    low = (2147483647 - cols).to(tl.int64)
    return (vbits << 32) + low[None, :]


@triton.jit
def _write_out(top, rows64, row_ok, idx_ptr, val_ptr, K_OUT, K_PAD: tl.constexpr):
    """Unpack ascending keys into output slot K_PAD - 1 - p (value desc, index asc); zero keys -> -1 / 0."""
    slot = K_PAD - 1 - tl.arange(0, K_PAD)
    hi = top >> 32
    col = 2147483647 - (top - (hi << 32))
    val = hi.to(tl.int32).to(tl.float32, bitcast=True)
    used = top > 0
    offs = rows64[:, None] * K_OUT + slot[None, :]
    omask = row_ok[:, None] & (slot[None, :] < K_OUT)
    tl.store(idx_ptr + offs, tl.where(used, col, -1), mask=omask)
    tl.store(val_ptr + offs, tl.where(used, val, 0.0), mask=omask)


@triton.jit
def _drain(scratch, fill, row0, N, idx_ptr, val_ptr, K_OUT,
           BLOCK_M: tl.constexpr, DRAIN_M: tl.constexpr, K_PAD: tl.constexpr, RS: tl.constexpr,
           LOG_DM: tl.constexpr, LOG_KP: tl.constexpr, FINAL: tl.constexpr):
    """Merge every row's buffered candidates into its running top-k; with FINAL, also write the outputs.

    Scratch row (RS int64 slots): [0] fill count, [1, 1 + K_PAD) the running top-k (ascending keys),
    then the candidates. Everything goes through scratch so that the sorting network works on DRAIN_M rows
    at a time ([DRAIN_M, K_PAD] tiles) instead of the whole block: the GEMM loop keeps only the tile,
    the thresholds and the fill counts in registers, and the network never spills. Candidates are sorted
    K_PAD at a time (full bitonic sort, then a log2(K_PAD)-round merge into the running top-k).
    Returns the new admission thresholds (smallest running key per row)."""
    rm = tl.arange(0, BLOCK_M)
    tl.store(scratch + rm.to(tl.int64) * RS, fill.to(tl.int64))
    tl.debug_barrier()  # every thread's appends and counts visible before anyone reads them back
    rg = tl.arange(0, DRAIN_M)
    kk = tl.arange(0, K_PAD)
    for g in range(0, BLOCK_M, DRAIN_M):
        rows_g = scratch + (g + rg).to(tl.int64) * RS
        fill_g = tl.load(rows_g).to(tl.int32)
        top = tl.load(rows_g[:, None] + 1 + kk[None, :])
        thr = _rmin(top, 1)
        max_fill = _rmax(fill_g, 0)
        for c0 in range(0, max_fill, K_PAD):
            slots = c0 + kk
            chunk = tl.load(rows_g[:, None] + (1 + K_PAD) + slots[None, :], mask=slots[None, :] < fill_g[:, None],
                            other=0)
            # Candidates were admitted against an older threshold; re-gate against the current one.
            chunk = tl.where(chunk > thr[:, None], chunk, 0)
            if _rmax(_rmax(chunk, 1), 0) > 0:
                top = _merge_into(top, _topk_desc(chunk, LOG_DM, LOG_KP, LOG_KP), LOG_DM, LOG_KP)
                thr = _rmin(top, 1)
        if FINAL:
            out_rows = row0 + g + rg
            _write_out(top, out_rows.to(tl.int64), out_rows < N, idx_ptr, val_ptr, K_OUT, K_PAD)
        else:
            tl.store(rows_g[:, None] + 1 + kk[None, :], top)
    tl.debug_barrier()  # all reads and writes done before the buffer is appended to again
    return tl.load(scratch + rm.to(tl.int64) * RS + 1)  # ascending: slot 1 holds each row's smallest key


@triton.jit
def _topk_encode_kernel(
    x_ptr, w_ptr, b_ptr, idx_ptr, val_ptr, buf_ptr,
    N, D, NL, K_OUT,
    stride_xm, stride_xd, stride_wn, stride_wd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PAD: tl.constexpr,
    CAP: tl.constexpr, DRAIN_M: tl.constexpr, LOG_M: tl.constexpr, LOG_N: tl.constexpr,
    LOG_DM: tl.constexpr, LOG_KP: tl.constexpr, EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr,
):
    RS: tl.constexpr = 1 + K_PAD + CAP
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    n_row_blocks = (N + BLOCK_M - 1) // BLOCK_M
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    kk = tl.arange(0, K_PAD)
    # Persistent programs: each walks row blocks pid, pid + n_prog, ... and reuses one scratch block
    # ([BLOCK_M, RS] keys), which keeps the scratch small and hot in L2.
    scratch = buf_ptr + pid.to(tl.int64) * (BLOCK_M * RS)
    buf_rows = scratch + rm.to(tl.int64) * RS + (1 + K_PAD)
    for rb in range(pid, n_row_blocks, n_prog):
        row0 = rb * BLOCK_M
        rows = row0 + rm
        rows64 = rows.to(tl.int64)
        row_ok = rows < N
        # Admission bar per row: above it a key may still enter the top-k. At least 2^32 - 1 (positive values
        # only, see _pack_keys); out-of-range rows get the largest int64 so that nothing is admitted.
        one = tl.full([BLOCK_M], 1, tl.int64)
        bar0 = tl.where(row_ok, (one << 32) - 1, ((one << 62) - 1) * 2 + 1)
        thr = bar0
        if CAP == 0:
            top = tl.full([BLOCK_M, K_PAD], 0, tl.int64)  # running top-k keys, ascending, in registers
        else:
            fill = tl.full([BLOCK_M], 0, tl.int32)  # candidates waiting in each row's buffer
            tl.store(scratch + rm.to(tl.int64)[:, None] * RS + 1 + kk[None, :],
                     tl.full([BLOCK_M, K_PAD], 0, tl.int64))
        for n0 in range(0, NL, BLOCK_N):
            if CAP > 0:
                # Drain before the tile rather than when it overflows, so that the tile's keys are not
                # live across the sorting network (a tile adds at most BLOCK_N per row).
                if _rmax(fill, 0) > CAP - BLOCK_N:
                    thr = _drain(scratch, fill, row0, N, idx_ptr, val_ptr, K_OUT, BLOCK_M, DRAIN_M, K_PAD, RS,
                                 LOG_DM, LOG_KP, False)
                    thr = tl.maximum(thr, bar0)  # 0 while a row's top-k is not full yet
                    fill = tl.full([BLOCK_M], 0, tl.int32)
            cols = n0 + rn
            col_ok = cols < NL
            acc = _gemm_tile(x_ptr, w_ptr, rows64, row_ok, cols, col_ok, D, stride_xm, stride_xd,
                             stride_wn, stride_wd, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_PREC)
            bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
            key = _pack_keys(acc, bias, cols)  # columns past NL: W and b masked to 0 -> +0.0 -> below the bar
            cand = key > thr[:, None]
            n_new = _rsum(cand.to(tl.int32), 1)
            if _rmax(n_new, 0) > 0:  # whole tile below every row's bar: nothing to do
                if CAP == 0:
                    tile_top = _topk_desc(tl.where(cand, key, 0), LOG_M, LOG_N, LOG_KP)
                    top = _merge_into(top, tile_top, LOG_M, LOG_KP)
                    thr = tl.maximum(_rmin(top, 1), bar0)
                else:
                    pos = fill[:, None] + _cumsum(cand.to(tl.int32), 1) - 1
                    tl.store(buf_rows[:, None] + pos, key, mask=cand)
                    fill = fill + n_new
        if CAP == 0:
            _write_out(top, rows64, row_ok, idx_ptr, val_ptr, K_OUT, K_PAD)
        else:
            _drain(scratch, fill, row0, N, idx_ptr, val_ptr, K_OUT, BLOCK_M, DRAIN_M, K_PAD, RS,
                   LOG_DM, LOG_KP, True)


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters. block_n must be >= the padded k; cap is 0 (direct mode) or >= block_n; drain_m
    (rows per sorting-network pass in buffered mode) is capped at block_m."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    cap: int = 256
    num_warps: int = 8
    num_stages: int = 3
    programs_per_sm: int = 2
    drain_m: int = 32

    def label(self) -> str:
        mode = f"buf{self.cap}" if self.cap else "direct"
        return (f"{mode} m{self.block_m} n{self.block_n} k{self.block_k} d{self.drain_m} "
                f"w{self.num_warps} s{self.num_stages} p{self.programs_per_sm}")


def padded_k(k: int) -> int:
    """k rounded up to a power of two (at least 2: the networks need one compare axis)."""
    return max(2, 1 << (int(k) - 1).bit_length())


def default_config(d: int, n: int, k: int, dtype: torch.dtype, interpret: bool) -> KernelConfig:
    """A starting configuration; bench/encode.py measures variants (KERNEL_NOTES.md records the choice)."""
    kp = padded_k(k)
    if interpret:
        # The interpreter runs programs one by one with numpy: small blocks keep the work per op low.
        bn = max(32, kp)
        return KernelConfig(block_m=16, block_n=bn, block_k=32, cap=2 * bn, num_warps=4, num_stages=1,
                            programs_per_sm=1, drain_m=16)
    bn = max(128, kp)
    bk = 64 if d % 64 == 0 or d > 512 else 32
    return KernelConfig(block_m=64, block_n=bn, block_k=bk, cap=4 * bn, num_warps=8, num_stages=3,
                        programs_per_sm=2, drain_m=32)


def candidate_configs(d: int, n: int, k: int, dtype: torch.dtype) -> list[KernelConfig]:
    """GPU variants worth timing in one device session: mode, tile shape, warps, stages, scratch size.

    Offline sm_90 compiles (ptxas resource usage, see docs/KERNEL_NOTES.md) showed 64x64 tiles without
    register spills and larger tiles spilling a little; which costs less overall can only be measured."""
    base = default_config(d, n, k, dtype, interpret=False)
    kp = padded_k(k)
    bn64 = max(64, kp)
    out = [base,
           replace(base, block_n=bn64, cap=8 * bn64),
           replace(base, cap=8 * base.block_n),
           replace(base, cap=2 * base.block_n),
           replace(base, drain_m=16),
           replace(base, drain_m=64),
           replace(base, block_m=128, block_n=bn64, cap=8 * bn64),
           replace(base, block_m=128),
           replace(base, num_warps=4),
           replace(base, num_warps=4, block_n=bn64, cap=8 * bn64),  # 2 CTAs/SM fit: GEMM/selection overlap
           replace(base, num_stages=2),
           replace(base, num_stages=4),
           replace(base, block_k=128 if d % 128 == 0 else base.block_k),
           replace(base, programs_per_sm=1),
           replace(base, programs_per_sm=4),
           replace(base, cap=0, block_n=bn64),
           replace(base, cap=0)]
    seen: set[KernelConfig] = set()
    uniq = []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def _check_config(cfg: KernelConfig, kp: int) -> None:
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(cfg, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if cfg.block_n < kp:
        raise ValueError(f"block_n ({cfg.block_n}) must be >= padded k ({kp})")
    if cfg.drain_m < 2 or cfg.drain_m & (cfg.drain_m - 1):
        raise ValueError(f"drain_m must be a power of two >= 2, got {cfg.drain_m}")
    if cfg.cap and cfg.cap < cfg.block_n:
        raise ValueError(f"cap ({cfg.cap}) must be 0 (direct mode) or >= block_n ({cfg.block_n})")


def kernel_meta(cfg: KernelConfig, k: int, d: int, dtype: torch.dtype) -> dict[str, object]:
    """The kernel's constexpr arguments for a configuration (also used to compile offline for inspection)."""
    kp = padded_k(k)
    dm = min(cfg.drain_m, cfg.block_m)
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, K_PAD=kp, CAP=cfg.cap,
                DRAIN_M=dm, LOG_M=int(math.log2(cfg.block_m)), LOG_N=int(math.log2(cfg.block_n)),
                LOG_DM=int(math.log2(dm)), LOG_KP=int(math.log2(kp)), EVEN_K=d % cfg.block_k == 0,
                DOT_PREC="ieee" if dtype == torch.float32 else "tf32")


_twins: dict[bool, ModuleType] = {}
_twin_lock = threading.Lock()


@contextlib.contextmanager
def _interpret_env(on: bool) -> Iterator[None]:
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def kernel_module(interpret: bool) -> ModuleType:
    """This module as decorated in the requested mode (itself when it already is; else a cached copy)."""
    if interpret == BUILT_INTERPRETED:
        return sys.modules[__name__]
    with _twin_lock:
        mod = _twins.get(interpret)
        if mod is None:
            name = f"{__name__}__{'interpreted' if interpret else 'compiled'}"
            spec = importlib.util.spec_from_file_location(name, __file__)
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod  # inspect.getsource, used by triton.jit, looks modules up by name
            with _interpret_env(interpret):
                spec.loader.exec_module(mod)
            _twins[interpret] = mod
    return mod


def topk_encode(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int,
                config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK(ReLU(x @ W.T + b)) per row, fused.

    x [N, d] and W [n, d] share a dtype (bf16/fp16/fp32 on CUDA; fp32/fp16 on CPU, where the Triton
    interpreter runs it); b [n] is promoted to fp32. Returns (idx int64 [N, k], val float32 [N, k]) ordered
    by (value desc, index asc); equal values go to the lower latent index; slots beyond a row's positive
    pre-activations are idx -1 / val 0. fp32 inputs use IEEE fp32 products on the GPU (no TF32).
    """
    if x.dim() != 2 or W.dim() != 2 or b.dim() != 1:
        raise ValueError(f"expected x [N, d], W [n, d], b [n]; got {tuple(x.shape)}, {tuple(W.shape)}, "
                         f"{tuple(b.shape)}")
    N, d = x.shape
    n = W.shape[0]
    if W.shape[1] != d or b.shape[0] != n:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, W {tuple(W.shape)}, b {tuple(b.shape)}")
    if x.dtype != W.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x and W must share a float dtype (fp32/bf16/fp16); got {x.dtype}, {W.dtype}")
    if not 1 <= k <= min(n, MAX_K):
        raise ValueError(f"k must be in 1..min(d_sae, {MAX_K}); got k={k}, d_sae={n}")
    if n * d >= 2**31 or n >= 2**31 - 1:
        raise ValueError(f"W with {n} x {d} elements is too large for 32-bit offsets")
    if x.device != W.device or x.device != b.device:
        raise ValueError("x, W and b must be on the same device")
    interpret = x.device.type != "cuda"
    if interpret and x.dtype == torch.bfloat16:
        raise ValueError("the Triton interpreter cannot compute in bf16; pass fp32 (or fp16) on CPU")
    kp = padded_k(k)
    cfg = config or default_config(d, n, k, x.dtype, interpret)
    _check_config(cfg, kp)

    idx = torch.empty((N, k), dtype=torch.int64, device=x.device)
    val = torch.empty((N, k), dtype=torch.float32, device=x.device)
    if N == 0:
        return idx, val
    b32 = b.to(torch.float32).contiguous()
    row_blocks = triton.cdiv(N, cfg.block_m)
    if interpret:
        n_prog = row_blocks
    else:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        n_prog = max(1, min(row_blocks, sms * cfg.programs_per_sm))
    buf = torch.empty((n_prog * cfg.block_m * (1 + kp + cfg.cap),), dtype=torch.int64, device=x.device)
    mod = kernel_module(interpret)
    args = (x, W, b32, idx, val, buf, N, d, n, k, x.stride(0), x.stride(1), W.stride(0), W.stride(1))
    meta = kernel_meta(cfg, k, d, x.dtype)
    if interpret:
        with _interpret_env(True):
            mod._topk_encode_kernel[(n_prog,)](*args, **meta)
    else:
        with torch.cuda.device(x.device):
            mod._topk_encode_kernel[(n_prog,)](*args, **meta, num_warps=cfg.num_warps,
                                               num_stages=cfg.num_stages)
    return idx, val


# ----------------------------------------------------------------------------------------------------
# Verification against the reference (pure torch; used by the tests and by bench/encode.py before timing)
# ----------------------------------------------------------------------------------------------------

def check_topk(idx: torch.Tensor, val: torch.Tensor, pre: torch.Tensor, k: int, atol: float = 1e-5,
               rtol: float = 1e-5, exact: bool = False,
               ref: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[str]:
    """Problems with (idx, val) as the encoding of pre-activations `pre` [N, n]; an empty list means it agrees
    with the reference (`protsae_cli.sae.topk.topk_relu`) up to near-ties.

    Two backends computing the same GEMM in different orders differ in the last bits, so a latent whose
    value lies within the tolerance of a row's k-th value may legitimately be in one selection and not the
    other. Outside that band the selections must agree, values must match `pre` at the reported indices,
    slots must be in the canonical order (value desc, index asc, empties last as -1 / 0) and indices must be
    distinct. With ``exact`` (inputs whose GEMM is exact in fp32, e.g. small integers) idx and val must
    equal the reference bit for bit, which also pins the lower-index tie rule. Runs on `pre`'s device;
    `ref` may pass a precomputed `topk_relu(pre, k)` when several outputs are checked against one `pre`.
    """
    from protsae_cli.sae.topk import topk_relu

    problems: list[str] = []
    pre = pre.detach().float()
    idx, val = idx.detach().to(pre.device), val.detach().to(pre.device)
    N = pre.shape[0]
    if idx.shape != (N, k) or val.shape != (N, k):
        return [f"shapes {tuple(idx.shape)}, {tuple(val.shape)}; expected ({N}, {k})"]
    if idx.dtype != torch.int64 or val.dtype != torch.float32:
        return [f"dtypes {idx.dtype}, {val.dtype}; expected int64, float32"]
    if N == 0:
        return problems
    ref_idx, ref_val = ref if ref is not None else topk_relu(pre, k)
    if exact:
        if not torch.equal(idx, ref_idx) or not torch.equal(val, ref_val):
            rows = ((idx != ref_idx) | (val != ref_val)).any(1).nonzero().flatten()[:3].tolist()
            problems.append(f"differs from the reference in {int(((idx != ref_idx) | (val != ref_val)).any(1).sum())} "
                            f"rows, e.g. row {rows[0]}: got {idx[rows[0]].tolist()} / {val[rows[0]].tolist()}, "
                            f"expected {ref_idx[rows[0]].tolist()} / {ref_val[rows[0]].tolist()}")
        return problems
    valid = idx >= 0
    if ((val != 0) != valid).any():
        problems.append("a slot has idx -1 with a nonzero value or a real index with value 0")
    if (val < 0).any() or not torch.isfinite(val).all():
        problems.append("negative or non-finite values")
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        problems.append("an empty slot precedes a filled one")
    dv = val[:, 1:] - val[:, :-1]
    if (dv > 0).any():
        problems.append("values are not in descending order")
    if ((dv == 0) & valid[:, 1:] & (idx[:, 1:] <= idx[:, :-1])).any():
        problems.append("equal values not ordered by ascending index (or duplicate indices)")
    srt = torch.where(valid, idx, torch.full_like(idx, -1)).sort(1).values
    if ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any():
        problems.append("duplicate indices in a row")
    tol = atol + rtol * pre.abs().amax(1, keepdim=True)
    at = pre.gather(1, idx.clamp_min(0))
    bad = valid & ((at - val).abs() > tol)
    if bad.any():
        r = int(bad.any(1).nonzero()[0])
        problems.append(f"values do not match the pre-activations at the reported indices (row {r})")
    kth = ref_val[:, -1:]  # reference k-th value (0 when a row has fewer than k positives)
    if (valid & (at < kth - tol)).any():
        r = int((valid & (at < kth - tol)).any(1).nonzero()[0])
        problems.append(f"row {r} selects a latent clearly below the reference k-th value")
    chosen = torch.zeros_like(pre, dtype=torch.bool)
    chosen.scatter_(1, idx.clamp_min(0), valid)
    missing = (pre > kth + tol) & (pre > tol) & ~chosen
    if missing.any():
        r = int(missing.any(1).nonzero()[0])
        problems.append(f"row {r} misses a latent clearly above the reference k-th value")
    n_sel = valid.sum(1)
    lo = (pre > tol).sum(1).clamp_max(k)
    hi = (pre > -tol).sum(1).clamp_max(k)
    if ((n_sel < lo) | (n_sel > hi)).any():
        r = int(((n_sel < lo) | (n_sel > hi)).nonzero()[0])
        problems.append(f"row {r} reports {int(n_sel[r])} nonzeros; expected {int(lo[r])}..{int(hi[r])}")
    return problems
