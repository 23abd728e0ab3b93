"""SAE encode benchmark: the fused Triton kernel against cuBLAS and torch, and onnxruntime against torch on CPU.

    python bench/encode.py                      # CUDA when present, else the CPU part
    python bench/encode.py --device cuda --json encode_gpu.json
    python bench/encode.py --device cpu --rows 8192 --json encode_cpu.json
    python bench/encode.py --device cuda --variants default   # skip the kernel-config sweep

CUDA (issue #3 shapes: (d_model, d_sae) in (320, 10240), (480, 10240), (1280, 10240), (1280, 40960); 65,536
rows, k = 64, bf16 inputs, fp32 accumulate), per shape, all measured in the same process:
  * cuBLAS GEMM alone: torch.addmm(b, x, W^T) in bf16 -- the floor a fused kernel is judged against;
  * torch: addmm -> relu -> topk(sorted=False), as the anchors of docs/PERFORMANCE_ANCHORS.md §1;
  * fused: protsae_cli.encode.topk_kernel with its default config, and every config of
    `candidate_configs` (modes, tile shapes, warps, stages, scratch size) so one GPU session can pick one.
Each kernel's output is checked against the fp32 reference computed from the same bf16 inputs before it is
timed (a config that fails is reported, not timed). Times are triton.testing.do_bench medians; calls rotate
over several input sets so that x is not served from L2 by the previous call.

CPU: torch fp32 (TorchEncoder) against onnxruntime fp32 (OnnxEncoder) on the same shapes at fewer rows,
interleaved repeats, medians of wall time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(320, 10240), (480, 10240), (1280, 10240), (1280, 40960)]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip()
    except Exception:
        return ""


def _inputs(rows: int, d: int, n: int, dtype: torch.dtype, device: str, seed: int, sets: int = 1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = (torch.randn(n, d, generator=g) / math.sqrt(d)).to(device, dtype)
    b = torch.zeros(n, device=device)  # as in the anchors: zero bias, about half the latents positive
    xs = [torch.randn(rows, d, generator=g).to(device, dtype) for _ in range(sets)]
    return xs, W, b


# ------------------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------------------

def bench_cuda(args) -> dict:
    import triton
    from triton.testing import do_bench

    from protsae_cli.encode import topk_kernel as tk

    dev = "cuda"
    k, rows = args.k, args.rows
    props = torch.cuda.get_device_properties(0)
    out = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
           "triton": triton.__version__, "rows": rows, "k": k, "dtype": "bf16", "shapes": []}
    shapes = [s for s in SHAPES if args.shapes is None or f"{s[0]}x{s[1]}" in args.shapes]
    check_rows = min(rows, 4096)

    def timed(fn) -> float:
        return float(do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))

    for d, n in shapes:
        xs, W, b = _inputs(rows, d, n, torch.bfloat16, dev, seed=d + n, sets=args.input_sets)
        b16 = b.to(torch.bfloat16)
        turn = [0]

        def nxt():
            turn[0] = (turn[0] + 1) % len(xs)
            return xs[turn[0]]

        from protsae_cli.sae.topk import topk_relu

        pre_ref = torch.addmm(b, xs[0][:check_rows].float(), W.float().T)
        ref = topk_relu(pre_ref, k)  # once per shape; every variant is checked against it on the GPU
        row = {"d": d, "n": n, "flop": 2.0 * rows * d * n}
        row["gemm_ms"] = timed(lambda: torch.addmm(b16, nxt(), W.T))

        def torch_encode():
            return torch.relu(torch.addmm(b16, nxt(), W.T)).topk(k, dim=-1, sorted=False)

        row["torch_ms"] = timed(torch_encode)
        configs = [tk.default_config(d, n, k, torch.bfloat16, interpret=False)]
        if args.variants == "all":
            configs = tk.candidate_configs(d, n, k, torch.bfloat16)
        variants = []
        for cfg in configs:
            rec = {"config": cfg.label(), **cfg.__dict__}
            try:
                t0 = time.perf_counter()
                idx, val = tk.topk_encode(xs[0][:check_rows], W, b, k, cfg)  # compiles on first use
                torch.cuda.synchronize()
                rec["first_call_s"] = time.perf_counter() - t0
                problems = tk.check_topk(idx, val, pre_ref, k, atol=1e-4, rtol=1e-4, ref=ref)
                if problems:
                    rec["error"] = "wrong result: " + problems[0]
                else:
                    rec["ms"] = timed(lambda cfg=cfg: tk.topk_encode(nxt(), W, b, k, cfg))
            except Exception as e:  # one broken variant must not lose the other measurements
                rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            variants.append(rec)
            status = f"{rec['ms']:.3f} ms" if "ms" in rec else rec["error"]
            print(f"  d={d} n={n} {cfg.label():<40} {status}", flush=True)
        row["variants"] = variants
        ok = [v for v in variants if "ms" in v]
        if "ms" in variants[0]:
            row["fused_default_ms"] = variants[0]["ms"]
        if ok:
            best = min(ok, key=lambda v: v["ms"])
            row["fused_best_ms"], row["fused_best_config"] = best["ms"], best["config"]
            row["fused_over_gemm"] = best["ms"] / row["gemm_ms"]
            row["torch_over_fused"] = row["torch_ms"] / best["ms"]
            row["fused_TFLOPs"] = row["flop"] / best["ms"] / 1e9
        row["gemm_TFLOPs"] = row["flop"] / row["gemm_ms"] / 1e9
        out["shapes"].append(row)
        del xs, W, pre_ref, ref
        torch.cuda.empty_cache()

    print(f"\n{out['device']}, {rows} rows, k={k}, bf16 inputs, medians (triton.testing.do_bench)")
    print(f"{'d_model':>7} {'d_sae':>6} | {'GEMM ms':>8} {'torch ms':>9} {'fused ms':>9} | {'fused/GEMM':>10} "
          f"{'torch/fused':>11} | best config")
    for r in out["shapes"]:
        fb = r.get("fused_best_ms")
        print(f"{r['d']:>7} {r['n']:>6} | {r['gemm_ms']:>8.3f} {r['torch_ms']:>9.3f} "
              f"{(f'{fb:.3f}' if fb else 'n/a'):>9} | {r.get('fused_over_gemm', float('nan')):>10.2f} "
              f"{r.get('torch_over_fused', float('nan')):>11.2f} | {r.get('fused_best_config', '-')}")
    return out


# ------------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------------

def bench_cpu(args) -> dict:
    import onnxruntime as ort

    from protsae_cli.encode.onnx_backend import OnnxEncoder
    from protsae_cli.encode.torch_backend import TorchEncoder
    from protsae_cli.encode.topk_kernel import check_topk
    from protsae_cli.sae.config import SAEConfig
    from protsae_cli.sae.topk import TopKSAE

    rows, k = args.rows, args.k
    out = {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)",
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__,
           "rows": rows, "k": k, "dtype": "fp32", "chunk_rows": args.cpu_chunk_rows, "repeats": args.repeats,
           "shapes": []}
    shapes = [s for s in SHAPES if args.shapes is None or f"{s[0]}x{s[1]}" in args.shapes]
    for d, n in shapes:
        sae = TopKSAE(SAEConfig(d_model=d, d_sae=n, k=k))
        sae.reset_parameters(seed=d + n)
        x = torch.randn(rows, d, generator=torch.Generator().manual_seed(d))
        enc_t = TorchEncoder(sae, torch.device("cpu"), chunk_rows=args.cpu_chunk_rows)
        enc_o = OnnxEncoder(sae, "cpu", chunk_rows=args.cpu_chunk_rows)
        with torch.no_grad():
            pre = sae.pre_activations(x[:1024])
        for enc in (enc_t, enc_o):
            problems = check_topk(*enc.encode(x[:1024]), pre, k, atol=1e-4, rtol=1e-4)
            if problems:
                raise SystemExit(f"{enc.name} encoder disagrees with the reference at d={d} n={n}: {problems[0]}")
        enc_t.encode(x[:256])
        enc_o.encode(x[:256])
        times = {"torch": [], "onnx": []}
        for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
            for name, enc in (("torch", enc_t), ("onnx", enc_o)):
                t0 = time.perf_counter()
                enc.encode(x)
                times[name].append(time.perf_counter() - t0)
        row = {"d": d, "n": n, "torch_s": statistics.median(times["torch"]),
               "onnx_s": statistics.median(times["onnx"]), "torch_all_s": times["torch"],
               "onnx_all_s": times["onnx"]}
        row["onnx_over_torch"] = row["onnx_s"] / row["torch_s"]
        row["torch_rows_per_s"] = rows / row["torch_s"]
        row["onnx_rows_per_s"] = rows / row["onnx_s"]
        out["shapes"].append(row)
        print(f"  d={d} n={n}: torch {row['torch_s']:.3f} s, onnxruntime {row['onnx_s']:.3f} s "
              f"(onnx/torch {row['onnx_over_torch']:.2f})", flush=True)
        del sae, enc_t, enc_o
    print(f"\n{out['device']}, {rows} rows, k={k}, fp32, chunks of {args.cpu_chunk_rows} rows, "
          f"median of {args.repeats}")
    print(f"{'d_model':>7} {'d_sae':>6} | {'torch s':>8} {'onnxrt s':>9} | {'onnx/torch':>10} | "
          f"{'torch rows/s':>12} {'onnx rows/s':>12}")
    for r in out["shapes"]:
        print(f"{r['d']:>7} {r['n']:>6} | {r['torch_s']:>8.3f} {r['onnx_s']:>9.3f} | {r['onnx_over_torch']:>10.2f} | "
              f"{r['torch_rows_per_s']:>12.0f} {r['onnx_rows_per_s']:>12.0f}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--rows", type=int, default=None, help="rows per call (default 65536 on CUDA, 8192 on CPU)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--shapes", nargs="*", default=None, help="subset, e.g. 320x10240 1280x40960")
    ap.add_argument("--variants", choices=["all", "default"], default="all",
                    help="CUDA: time every candidate kernel config, or only the default")
    ap.add_argument("--input-sets", type=int, default=3, help="CUDA: input sets rotated between calls")
    ap.add_argument("--warmup-ms", type=int, default=50)
    ap.add_argument("--rep-ms", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3, help="CPU: timed repeats per backend")
    ap.add_argument("--cpu-chunk-rows", type=int, default=2048, help="CPU: rows per encoder chunk")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.rows is None:
        args.rows = 65536 if device == "cuda" else 8192
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "commit": _commit(),
              "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "host": platform.node(), "python": platform.python_version()}
    result.update(bench_cuda(args) if device == "cuda" else bench_cpu(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
