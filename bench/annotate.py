"""End-to-end annotate throughput against an esm-extract-style baseline measured in the same run.

    python bench/annotate.py --shape 650M --layer 24 --d-sae 10240 --k 64 --device cuda   # issue #3 targets
    python bench/annotate.py --shape 8M --layer 4 --d-sae 10240 --k 64 --device cuda
    python bench/annotate.py --shape 8M --layer 4 --n-seqs 200 --device cpu               # smoke run on a laptop
    python bench/annotate.py --memory-scaling --shape 8M --device cuda                     # peak RSS, 1k vs 100k seqs

Models have random weights of the real ESM-2 shapes (speed does not depend on the weights), written as
fair-esm checkpoints so the real loading path is exercised. The sequence set is the anchors' one
(shared/bench/anchors_gpu.py): 2,000 sequences, log-normal lengths around 300 (30-1022), seed 0.

Baseline ("extract style"): fair-esm's own ESM2.forward over all layers, fp32, file order, 4,096 tokens per
batch (esm-extract's defaults), then the torch SAE encode in fp32. Ours: `protsae annotate`'s library path
(length-sorted token-budget batches, stop at the hooked layer, SDPA attention, bf16 autocast on CUDA, chosen
encode backend) writing HDF5. Prints one table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch

SHAPES = {"8M": (6, 320, 20), "35M": (12, 480, 20), "150M": (30, 640, 20), "650M": (33, 1280, 20),
          "3B": (36, 2560, 40)}
AA = "ACDEFGHIKLMNPQRSTVWY"


def sequence_set(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    lens = [min(1022, max(30, int(rng.lognormvariate(math.log(300), 0.6)))) for _ in range(n)]
    return [(f"s{i}", "".join(rng.choice(AA) for _ in range(L))) for i, L in enumerate(lens)]


def write_fasta(seqs, path: Path) -> Path:
    with open(path, "w") as f:
        for sid, s in seqs:
            f.write(f">{sid}\n{s}\n")
    return path


def make_models(shape: str, layer: int, d_sae: int, k: int, workdir: Path) -> tuple[Path, Path]:
    """A random-weight ESM-2 of the given shape in fair-esm's format and a matching random TopK SAE."""
    import esm

    from protsae_cli.plm import load_plm
    from protsae_cli.sae import SAEConfig, TopKSAE, save_sae

    L, D, H = SHAPES[shape]
    torch.manual_seed(0)
    model = esm.model.esm2.ESM2(num_layers=L, embed_dim=D, attention_heads=H, token_dropout=True)
    state = {f"encoder.{k_}": v for k_, v in model.state_dict().items() if not k_.startswith("contact_head")}
    ckpt = workdir / f"esm2_t{L}_{shape}_random.pt"
    torch.save({"cfg": {"model": Namespace(encoder_layers=L, encoder_embed_dim=D, encoder_ffn_embed_dim=4 * D,
                                           encoder_attention_heads=H, token_dropout=True)}, "model": state}, ckpt)
    plm = load_plm(str(ckpt))
    cfg = SAEConfig(d_model=D, d_sae=d_sae, k=k, hook_point="resid_post", layer=layer, plm_name=plm.name,
                    plm_sha256=plm.sha256, plm_num_layers=L)
    sae = TopKSAE(cfg)
    sae.reset_parameters(seed=0)
    return ckpt, save_sae(sae, workdir / "sae")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def baseline(ckpt: Path, sae_dir: Path, seqs, layer: int, device: torch.device) -> float:
    """esm-extract style: file order, 4,096-token batches, fp32, the full network, then torch SAE encode."""
    from protsae_cli.plm import load_plm
    from protsae_cli.sae import load_sae

    plm = load_plm(str(ckpt), device)
    sae, _ = load_sae(sae_dir, device)
    conv = plm.alphabet.get_batch_converter()
    batches, cur, mx = [], [], 0
    for it in seqs:
        n = len(it[1]) + 2
        if cur and max(mx, n) * (len(cur) + 1) > 4096:
            batches.append(cur)
            cur, mx = [], 0
        cur.append(it)
        mx = max(mx, n)
    if cur:
        batches.append(cur)

    def run(bs) -> None:
        with torch.inference_mode():
            for bt in bs:
                _, _, toks = conv(bt)
                rep = plm.model(toks.to(device), repr_layers=[layer])["representations"][layer]
                rows = torch.cat([rep[i, 1:len(s) + 1] for i, (_, s) in enumerate(bt)])
                idx, val = sae.encode(rows)
                idx.cpu(), val.cpu()

    run(batches[:2])  # warm-up
    sync(device)
    t0 = time.perf_counter()
    run(batches)
    sync(device)
    return time.perf_counter() - t0


def ours(ckpt: Path, sae_dir: Path, fasta: Path, out: Path, device: torch.device, backend: str,
         toks_per_batch: int) -> tuple[float, str]:
    from protsae_cli.annotate import AnnotateOptions, Annotator

    ann = Annotator(str(ckpt), str(sae_dir), device=str(device), backend=backend)
    warm = write_fasta([("w", "ACDEFGHIKLMNPQRSTVWY" * 10)] * 4, out.parent / "warm.fa")
    ann.run(AnnotateOptions(input=str(warm), output_prefix=str(out) + "_warm", formats=("h5",), progress=False,
                            toks_per_batch=toks_per_batch))
    sync(device)
    t0 = time.perf_counter()
    s = ann.run(AnnotateOptions(input=str(fasta), output_prefix=str(out), formats=("h5",), progress=False,
                                toks_per_batch=toks_per_batch))
    sync(device)
    return time.perf_counter() - t0, s.backend


def peak_rss_mb(args: list[str]) -> float:
    """Peak resident memory of a child process (MiB), via getrusage of waited-for children."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(after, before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8M", choices=sorted(SHAPES))
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--d-sae", type=int, default=10240)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--n-seqs", type=int, default=2000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--toks-per-batch", type=int, default=16384)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--memory-scaling", action="store_true",
                    help="peak host RSS of `protsae annotate` on 1,000 vs 100,000 sequences (separate processes)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    device = torch.device(a.device)
    res: dict = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device.type == "cuda"
                 else f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__, "args": vars(a) | {"json": None}}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        ckpt, sae_dir = make_models(a.shape, a.layer, a.d_sae, a.k, work)
        if a.memory_scaling:
            for n in (1000, 100_000):
                fa = write_fasta(sequence_set(n, seed=1), work / f"m{n}.fa")
                rss = peak_rss_mb([sys.executable, "-m", "protsae_cli", "annotate", str(fa), "--model", str(ckpt),
                                   "--sae", str(sae_dir), "--device", a.device, "-o", str(work / f"m{n}"),
                                   "--no-progress"])
                res[f"peak_rss_mb_{n}"] = rss
                print(f"{n:>7} sequences: peak RSS {rss:,.0f} MiB", flush=True)
            res["rss_ratio"] = res["peak_rss_mb_100000"] / res["peak_rss_mb_1000"]
            print(f"ratio 100k/1k: {res['rss_ratio']:.2f} (target <= 1.2)")
        else:
            seqs = sequence_set(a.n_seqs)
            total = sum(len(s) for _, s in seqs)
            fasta = write_fasta(seqs, work / "set.fa")
            print(f"{a.shape} resid_post@{a.layer}, d_sae {a.d_sae}, k {a.k}: {len(seqs)} sequences, "
                  f"{total:,} residues on {res['device']}", flush=True)
            t_ours, backend = ours(ckpt, sae_dir, fasta, work / "out", device, a.backend, a.toks_per_batch)
            res.update(residues=total, ours_s=t_ours, ours_res_per_s=total / t_ours, backend=backend)
            print(f"protsae annotate ({backend}, HDF5 written): {t_ours:.2f} s = {total / t_ours:,.0f} residues/s",
                  flush=True)
            if not a.skip_baseline:
                t_base = baseline(ckpt, sae_dir, seqs, a.layer, device)
                res.update(baseline_s=t_base, baseline_res_per_s=total / t_base, speedup=t_base / t_ours)
                print(f"extract-style baseline: {t_base:.2f} s = {total / t_base:,.0f} residues/s", flush=True)
                print(f"speed-up: {t_base / t_ours:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
