"""End-to-end annotate throughput against esm-extract-style baselines measured in the same run.

    python bench/annotate.py --shape 650M --layer 24 --d-sae 10240 --k 64 --device cuda   # issue #3 targets
    python bench/annotate.py --shape 8M --layer 4 --d-sae 10240 --k 64 --device cuda
    python bench/annotate.py --models bundled --proteins heldout --n-seqs 200 --device cpu  # issue #18, CPU
    python bench/annotate.py --memory-scaling --shape 8M --device cuda                     # peak RSS, 1k vs 100k seqs

Models: `--models random` (default) writes random weights of the real ESM-2 shapes (speed does not depend on
the weights) as fair-esm checkpoints, so the real loading path is exercised, with a matching random TopK SAE;
`--models bundled` uses the shipped stand-in PLM and default SAE (their hook; --shape/--layer/--d-sae/--k
are then ignored). Proteins: `--proteins synthetic` (default) is the anchors' set (docs/PERFORMANCE_ANCHORS.md §1:
log-normal lengths around 300, 30-1022, seed 0); `--proteins heldout` takes real proteins the default SAE never
saw in training or checkpoint selection (see `heldout_proteins`).

Every side runs in this process, with the same PLM, the same hook, the same SAE and the same threads, reads the
FASTA inside its timed region and writes its codes as CSR to HDF5 (float32 values, annotate's default, gzip 4 + shuffle), so the
work is comparable; models are loaded and warmed up before the clock starts.

* ours: `protsae annotate`'s library path (length-sorted token-budget batches, stop at the hooked layer, SDPA
  attention, bf16 autocast on CUDA, chosen encode backend), HDF5 output (codes + protein table + segments).
* fair baseline: what a competent fair-esm user writes from `scripts/extract.py`: `FastaBatchedDataset` with its
  length-sorted `get_batch_indices(toks_per_batch, extra_toks_per_seq=1)`, the alphabet's batch converter
  (truncation 1022), `ESM2.forward(repr_layers=[hook layer])` (fair-esm runs every layer and the LM head) under
  `torch.inference_mode`, fp32, then the SAE's own encode math in torch (addmm -> ReLU -> TopK, with a
  ProtSAE's defined latents admitted first), codes written with h5py.
* naive baseline: the same, but batches in file order (what this bench measured before issue #18).

Each token budget in --toks-per-batch runs ours and the fair baseline (4,096 is esm-extract's default); the naive
row runs at the first budget. The table ends with every speed-up of ours over every baseline of this run.
--json writes the numbers.
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

import numpy as np
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

    from protsae_cli.plm.loading import load_plm
    from protsae_cli.sae.checkpoint import save_sae
    from protsae_cli.sae.config import SAEConfig
    from protsae_cli.sae.topk import TopKSAE

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


REPO = Path(__file__).resolve().parents[1]
TRUNCATION = 1022  # esm-extract's --truncation_seq_length default, and annotate's --max-window


def _fasta_pairs(path: Path) -> list[tuple[str, str]]:
    import esm

    d = esm.FastaBatchedDataset.from_file(str(path))
    return list(zip(d.sequence_labels, d.sequence_strs))


def heldout_proteins(data_dir: Path, n: int) -> list[tuple[str, str]]:
    """The first `n` proteins of TMbed split 3 that the default SAE never trained on or selected with.

    protsae_cli/models/default_sae's card: TMbed splits 0-1 train it, split 2 selects its checkpoint and thresholds, split 3
    is its test split; bindPredict splits 1-3 train, 4 validates. So: split 3, minus any sequence also in TMbed
    0-2 or bindPredict 1-4 (a few proteins are in both sources), minus proteins over 1,022 residues (esm-extract
    truncates them and annotate windows them: the two sides would not do the same work).
    """
    if data_dir is None:
        raise SystemExit("--proteins heldout needs --data DIR or $PROTSAE_SHARED_DATA (the data folder of "
                         "docs/METHOD.md §4)")
    tm = data_dir / "tmbed" / "cv"
    bp = data_dir / "bindpredict" / "development_set"
    if not (tm / "cv_03_s.fasta").is_file():
        raise SystemExit(f"{tm / 'cv_03_s.fasta'} not found: pass --data DIR (the data folder of docs/METHOD.md §4)")
    seen = {s for i in range(3) for _, s in _fasta_pairs(tm / f"cv_0{i}_s.fasta")}
    by_id = {label.split()[0]: s for label, s in _fasta_pairs(bp / "all.fasta")}
    for i in range(1, 5):
        seen |= {by_id[a] for a in (bp / f"ids_split{i}.txt").read_text().split() if a in by_id}
    out = [(label, s) for label, s in _fasta_pairs(tm / "cv_03_s.fasta") if len(s) <= TRUNCATION and s not in seen]
    if len(out) < n:
        raise SystemExit(f"only {len(out)} held-out proteins of at most {TRUNCATION} residues, asked for {n}")
    return out[:n]


def file_order_batches(lengths: list[int], toks_per_batch: int, extra_toks_per_seq: int = 1) -> list[list[int]]:
    """`FastaBatchedDataset.get_batch_indices`' greedy token budget without its sort: the naive row, so that
    the naive and fair baselines differ only in batch order."""
    batches: list[list[int]] = []
    buf: list[int] = []
    max_len = 0
    for i, n in enumerate(lengths):
        n += extra_toks_per_seq
        if buf and max(n, max_len) * (len(buf) + 1) > toks_per_batch:
            batches.append(buf)
            buf, max_len = [], 0
        max_len = max(max_len, n)
        buf.append(i)
    if buf:
        batches.append(buf)
    return batches


def write_csr_codes(path: Path, labels: list[str], codes: list, d_sae: int) -> None:
    """Codes in file order as one canonical CSR matrix (only real entries, latents ascending within a row),
    float32 values, gzip 4 + shuffle: what annotate's HDF5 keeps by default, so both sides pay for the same output."""
    import h5py

    from protsae_cli.io.writers.h5 import CSR_ENCODING, index_dtype

    idx = np.concatenate([c[0] for c in codes])
    val = np.concatenate([c[1] for c in codes])
    keep = (idx >= 0) & (val > 0)
    order = np.argsort(np.where(keep, idx, d_sae), axis=1, kind="stable")
    idx, val, keep = (np.take_along_axis(x, order, 1) for x in (idx, val, keep))
    indptr = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int64)
    row_offset = np.concatenate([[0], np.cumsum([len(c[0]) for c in codes])]).astype(np.int64)
    z = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    with h5py.File(path, "w") as f:
        g = f.create_group("codes")
        g.attrs.update(CSR_ENCODING)
        g.attrs["shape"] = np.array([idx.shape[0], d_sae], np.int64)
        g.create_dataset("data", data=val[keep].astype(np.float32), **z)
        g.create_dataset("indices", data=idx[keep].astype(index_dtype(d_sae)), **z)
        g.create_dataset("indptr", data=indptr, **z)
        p = f.create_group("proteins")
        p.create_dataset("id", data=labels, dtype=h5py.string_dtype("utf-8"))
        p.create_dataset("row_offset", data=row_offset)


class ExtractBaseline:
    """fair-esm's `scripts/extract.py` flow with an SAE encode after it (see the module docstring).

    Models load once in the constructor (outside any timing); `run` is the timed work.
    """

    def __init__(self, plm_spec: str | None, sae_dir: Path, device: torch.device) -> None:
        from protsae_cli.plm.loading import load_plm
        from protsae_cli.sae.checkpoint import load_sae

        self.device = device
        self.plm = load_plm(plm_spec, device)
        self.model = self.plm.model.eval()
        sae, _ = load_sae(sae_dir)
        cfg = sae.cfg
        if cfg.hook_point != "resid_post":
            raise SystemExit(f"the fair-esm baseline needs a resid_post SAE (repr_layers); this one hooks "
                             f"{cfg.hook_point}@{cfg.layer}")
        self.layer, self.k, self.d_sae = cfg.layer, cfg.k, cfg.d_sae
        W, b = sae.encoder_affine()  # the SAE's pre-activations x @ W.T + b, normalisation folded in
        self.W, self.b = W.to(device).float(), b.to(device).float()
        self.priority = int(getattr(sae, "priority_latents", 0))  # a ProtSAE's defined latents go first
        self.convert = self.plm.alphabet.get_batch_converter(TRUNCATION)

    def _encode(self, pairs: list[tuple[str, str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(idx, val) [length, k] per protein of one batch, in the SAE's reference slot order."""
        from protsae_cli.sae.topk import priority_topk_relu

        _, strs, toks = self.convert(pairs)
        rep = self.model(toks.to(self.device), repr_layers=[self.layer])["representations"][self.layer]
        lens = [min(TRUNCATION, len(s)) for s in strs]
        rows = torch.cat([rep[i, 1:n + 1] for i, n in enumerate(lens)])
        idx, val = priority_topk_relu(torch.addmm(self.b, rows, self.W.T), self.k, self.priority)
        idx, val = idx.cpu().numpy(), val.cpu().numpy()
        offs = [0]
        for n in lens:
            offs.append(offs[-1] + n)
        return [(idx[a:z], val[a:z]) for a, z in zip(offs, offs[1:])]

    def warm_up(self) -> None:
        with torch.inference_mode():
            self._encode([("w", AA * 10)] * 4)
        sync(self.device)

    def run(self, fasta: Path, out_h5: Path, toks_per_batch: int, order: str = "length") -> float:
        """Seconds for FASTA -> codes on disk; `order` "length" is extract.py's, "file" the naive row's."""
        import esm

        sync(self.device)
        t0 = time.perf_counter()
        data = esm.FastaBatchedDataset.from_file(str(fasta))
        if order == "length":
            batches = data.get_batch_indices(toks_per_batch, extra_toks_per_seq=1)
        else:
            batches = file_order_batches([len(s) for s in data.sequence_strs], toks_per_batch)
        codes: list = [None] * len(data)
        with torch.inference_mode():
            for bt in batches:
                for i, c in zip(bt, self._encode([data[i] for i in bt])):
                    codes[i] = c
        write_csr_codes(out_h5, data.sequence_labels, codes, self.d_sae)
        sync(self.device)
        return time.perf_counter() - t0


def ours(plm_spec: str | None, sae_dir: Path, fasta: Path, out: Path, device: torch.device, backend: str,
         toks_per_batch: int) -> tuple[float, str]:
    from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator

    ann = Annotator(plm_spec, str(sae_dir), device=str(device), backend=backend)
    warm = write_fasta([("w", AA * 10)] * 4, out.parent / "warm.fa")
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


def speed_table(ours_runs: dict[int, float], base_runs: dict[str, float]) -> dict[str, float]:
    """Speed-up of each `ours` run over each baseline run of this process (baseline seconds / ours seconds)."""
    return {f"annotate@{t} vs {name}": base_s / s for t, s in ours_runs.items() for name, base_s in base_runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="random", choices=("random", "bundled"),
                    help="random weights of --shape, or the shipped stand-in PLM + default SAE")
    ap.add_argument("--shape", default="8M", choices=sorted(SHAPES))
    ap.add_argument("--layer", type=int, default=4)
    ap.add_argument("--d-sae", type=int, default=10240)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--proteins", default="synthetic", choices=("synthetic", "heldout"),
                    help="the anchors' synthetic set, or real proteins held out from the default SAE")
    ap.add_argument("--data", type=Path,
                    default=os.environ.get("PROTSAE_SHARED_DATA"),
                    help="the data folder of docs/METHOD.md §4 (for --proteins heldout; default $PROTSAE_SHARED_DATA)")
    ap.add_argument("--n-seqs", type=int, default=2000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--toks-per-batch", type=int, nargs="+", default=[4096, 16384],
                    help="token budgets; each runs ours and the fair baseline (4096 = esm-extract's default)")
    ap.add_argument("--repeats", type=int, default=1, help="time each run this many times, keep the fastest")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--no-naive", action="store_true", help="skip the file-order baseline row")
    ap.add_argument("--memory-scaling", action="store_true",
                    help="peak host RSS of `protsae annotate` on 1,000 vs 100,000 sequences (separate processes)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    device = torch.device(a.device)
    res: dict = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device.type == "cuda"
                 else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
                 "torch": torch.__version__, "args": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(a).items() if k != "json"}}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        if a.models == "bundled":
            from protsae_cli.models import default_sae_dir

            plm_spec, sae_dir = None, default_sae_dir()
        else:
            ckpt, sae_dir = make_models(a.shape, a.layer, a.d_sae, a.k, work)
            plm_spec = str(ckpt)
        if a.memory_scaling:
            model_args = ["--sae", str(sae_dir)] + (["--model", plm_spec] if plm_spec else [])
            for n in (1000, 100_000):
                fa = write_fasta(sequence_set(n, seed=1), work / f"m{n}.fa")
                rss = peak_rss_mb([sys.executable, "-m", "protsae_cli", "annotate", str(fa), *model_args,
                                   "--device", a.device, "-o", str(work / f"m{n}"), "--no-progress"])
                res[f"peak_rss_mb_{n}"] = rss
                print(f"{n:>7} sequences: peak RSS {rss:,.0f} MiB", flush=True)
            res["rss_ratio"] = res["peak_rss_mb_100000"] / res["peak_rss_mb_1000"]
            print(f"ratio 100k/1k: {res['rss_ratio']:.2f} (target <= 1.2)")
        else:
            seqs = heldout_proteins(a.data, a.n_seqs) if a.proteins == "heldout" else sequence_set(a.n_seqs)
            total = sum(len(s) for _, s in seqs)
            fasta = write_fasta(seqs, work / "set.fa")
            from protsae_cli.sae.checkpoint import load_sae

            cfg = load_sae(sae_dir)[0].cfg
            print(f"{a.models} models, {cfg.hook_point}@{cfg.layer}, d_sae {cfg.d_sae}, k {cfg.k}: {len(seqs)} "
                  f"{a.proteins} sequences, {total:,} residues on {res['device']}", flush=True)
            res.update(residues=total, sequences=len(seqs), runs=[])

            def record(path: str, toks: int, seconds: float) -> None:
                res["runs"].append({"path": path, "toks_per_batch": toks, "seconds": seconds,
                                    "residues_per_s": total / seconds})
                print(f"{path:<44} {toks:>6} tok/batch  {seconds:7.2f} s  {total / seconds:>9,.0f} residues/s",
                      flush=True)

            ours_s: dict[int, float] = {}
            for t in a.toks_per_batch:
                times = [ours(plm_spec, sae_dir, fasta, work / f"out{t}_{r}", device, a.backend, t)
                         for r in range(a.repeats)]
                ours_s[t] = min(s for s, _ in times)
                res["backend"] = times[0][1]
                record(f"protsae annotate ({times[0][1]}, HDF5)", t, ours_s[t])
            base_s: dict[str, float] = {}
            if not a.skip_baseline:
                base = ExtractBaseline(plm_spec, sae_dir, device)
                base.warm_up()
                plan = [("fair", "length", t) for t in a.toks_per_batch]
                if not a.no_naive:
                    plan.append(("naive", "file", a.toks_per_batch[0]))
                for name, order, t in plan:
                    s = min(base.run(fasta, work / f"{name}{t}.h5", t, order) for _ in range(a.repeats))
                    base_s[f"{name}@{t}"] = s
                    record(f"{name} extract-style baseline ({order} order, HDF5)", t, s)
                res["speedups"] = speed_table(ours_s, base_s)
                for key, x in res["speedups"].items():
                    print(f"speed-up {key}: {x:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
