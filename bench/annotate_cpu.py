"""CPU throughput and peak memory of `protsae annotate` with the embedded default models (no flags).

    python bench/annotate_cpu.py [--n-seqs 300] [--threads 2] [--json out.json]

Runs the real console entry point in a child process (so peak RSS is the whole program's, imports and model
loading included) on the anchors' sequence distribution (log-normal lengths around 300, 30-1022, seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from annotate import sequence_set, write_fasta  # noqa: E402  (sibling bench script)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-seqs", type=int, default=300)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    seqs = sequence_set(a.n_seqs)
    total = sum(len(s) for _, s in seqs)
    with tempfile.TemporaryDirectory() as td:
        fa = write_fasta(seqs, Path(td) / "set.fa")
        cmd = [sys.executable, "-m", "protsae_cli", "annotate", str(fa), "-o", str(Path(td) / "out"),
               "--device", "cpu", "--threads", str(a.threads), "--no-progress"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
        dt = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        size = sum(p.stat().st_size for p in Path(td).glob("out.*"))
    res = {"date": time.strftime("%Y-%m-%d"), "sequences": len(seqs), "residues": total, "seconds": dt,
           "residues_per_s": total / dt, "peak_rss_mib": rss, "output_bytes": size, "threads": a.threads,
           "cpu_count": os.cpu_count()}
    print(f"{len(seqs)} sequences, {total:,} residues: {dt:.1f} s wall (process start and model load included) = "
          f"{total / dt:,.0f} residues/s; peak RSS {rss:,.0f} MiB; outputs {size / 1e6:.1f} MB "
          f"({a.threads} threads on {os.cpu_count()} cores)")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
