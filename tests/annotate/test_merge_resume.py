"""Determinism, `protsae merge` and `annotate --resume`: sharded, merged and resumed outputs equal a direct run's."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator
from protsae_cli.errors import InputError
from protsae_cli.io.merge import PROVENANCE_ORDER, canonical_result, combine_shards, merge_files
from protsae_cli.io.results import ProteinResult, Segment
from protsae_cli.io.writers.h5 import H5Annotations

# Attributes that name the invocation, not the data: they legitimately differ between equivalent runs.
PER_RUN = {"command", "shard"}


def write_fasta(path: Path, n: int = 24, seed: int = 7, invalid_at: int | None = 5, long_at: int | None = 9) -> Path:
    """A FASTA bigger than conftest's: mixed lengths, one invalid record and one protein long enough to window."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i == invalid_at:
            lines += [f">bad{i} not a protein", "MKV1234"]
            continue
        length = 1100 if i == long_at else rng.randint(4, 60)
        lines += [f">prot{i} protein number {i}", "".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(length))]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def fasta(tmp_path) -> Path:
    return write_fasta(tmp_path / "in.fasta")


def opts_for(tiny_esm_path, tiny_sae_dir, fasta, prefix, **kw) -> AnnotateOptions:
    base = dict(input=str(fasta), output_prefix=str(prefix), model=str(tiny_esm_path), sae=str(tiny_sae_dir),
                device="cpu", progress=False, skip_invalid=True, command="protsae annotate (test)")
    base.update(kw)
    return AnnotateOptions(**base)


@pytest.fixture(scope="module")
def annotator(tiny_esm_path, tiny_sae_dir) -> Annotator:
    return Annotator(str(tiny_esm_path), str(tiny_sae_dir), device="cpu")


def h5_content(path: Path, ignore_attrs: set[str] = PER_RUN) -> dict[str, object]:
    """Every dataset (values and dtype) and attribute of an HDF5 file, for equality checks."""
    out: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        def visit(name: str, obj) -> None:
            for k, v in obj.attrs.items():
                if not (name == "" and k in ignore_attrs):
                    out[f"{name}@{k}"] = np.asarray(v).tolist()
            if isinstance(obj, h5py.Dataset):
                v = obj[()]
                if v.dtype.kind == "f":  # NaN marks "not measured" (concept reliability); NaN != NaN in lists
                    v = np.where(np.isnan(v), np.inf, v)
                out[name] = (str(obj.dtype), v.tolist())

        visit("", f)
        f.visititems(visit)
    return out


def gff3_without_command(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not line.startswith(("#command ", "#shard "))]


def assert_same_outputs(a: str | Path, b: str | Path) -> None:
    a, b = str(a), str(b)
    assert h5_content(Path(a + ".h5")) == h5_content(Path(b + ".h5"))
    assert Path(a + ".tsv").read_bytes() == Path(b + ".tsv").read_bytes()
    assert gff3_without_command(Path(a + ".gff3")) == gff3_without_command(Path(b + ".gff3"))


# ---------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------

def test_outputs_are_byte_identical_across_runs(annotator, tiny_esm_path, tiny_sae_dir, fasta, tmp_path):
    prefix = tmp_path / "run"
    for attempt in range(2):
        if attempt:
            time.sleep(1.1)  # HDF5 object timestamps have 1 s resolution: make any stored time differ
        for shard in (None, (2, 3)):
            annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fasta, prefix, shard=shard))
            copy = tmp_path / f"copy{attempt}_{bool(shard)}"
            copy.mkdir()
            for ext in ("h5", "tsv", "gff3"):
                shutil.copy(f"{prefix}.{ext}", copy / f"run.{ext}")
    for shard in (False, True):
        saved = [tmp_path / f"copy{attempt}_{shard}" for attempt in range(2)]
        for ext in ("h5", "tsv", "gff3"):
            assert (saved[0] / f"run.{ext}").read_bytes() == (saved[1] / f"run.{ext}").read_bytes(), (shard, ext)
        with h5py.File(saved[0] / "run.h5") as f:
            names: list[str] = []
            f.visit(names.append)
            assert all(h5py.h5o.get_info(f[n].id).ctime == 0 for n in names)  # no creation times stored
            assert not any("time" in k or "date" in k or "host" in k for k in f.attrs)


def test_canonical_result_rounds_segment_stats_to_float32():
    res = ProteinResult(index=0, id="x", description="", sequence="MK", status="ok", status_detail="",
                        idx=np.zeros((2, 1), np.int64), val=np.ones((2, 1), np.float32),
                        segments=[Segment(latent=0, start=1, end=2, max_act=1.0, mean_act=0.123456789012,
                                          threshold=0.1)])
    seg = canonical_result(res).segments[0]
    assert seg.mean_act == float(np.float32(0.123456789012)) and seg.threshold == float(np.float32(0.1))


def test_provenance_order_matches_annotator(annotator, tiny_esm_path, tiny_sae_dir, fasta, tmp_path):
    prov = annotator.provenance(opts_for(tiny_esm_path, tiny_sae_dir, fasta, tmp_path / "x"))
    assert list(prov) == list(PROVENANCE_ORDER), "update protsae_cli.io.merge.PROVENANCE_ORDER"


# ---------------------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------------------

def results_by_index(path: Path) -> dict[int, tuple]:
    """Every protein of an HDF5 output as comparable plain values (codes, segments, table row)."""
    out = {}
    with H5Annotations(path) as h5:
        for r in h5.iter_results():
            out[r.index] = (r.id, r.description, r.sequence, r.status, r.status_detail, r.length, r.seq_md5,
                            r.idx.tolist(), r.val.tolist(), [vars(s) for s in r.segments])
    return out


@pytest.fixture(scope="module")
def halves(annotator, tiny_esm_path, tiny_sae_dir, tmp_path_factory) -> Path:
    """Shards 1/2 and 2/2 with default batching (h5 + tsv), shared by the tests that only read them."""
    d = tmp_path_factory.mktemp("halves")
    fa = write_fasta(d / "in.fasta")
    for i in (1, 2):
        annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fa, d / f"s{i}", shard=(i, 2), formats=("h5", "tsv")))
    return d


@pytest.fixture(scope="module")
def thirds(annotator, tiny_esm_path, tiny_sae_dir, tmp_path_factory) -> Path:
    """An unsharded run and shards 1/3..3/3, one protein per batch (see the test using it)."""
    d = tmp_path_factory.mktemp("thirds")
    fa = write_fasta(d / "in.fasta")
    annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fa, d / "whole", toks_per_batch=1))
    for i in (1, 2, 3):
        annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fa, d / f"s{i}", shard=(i, 3), toks_per_batch=1))
    return d


def test_merge_is_lossless(halves, tmp_path):
    """Default batching: the merge holds exactly what the shards hold (shards themselves may differ from an
    unsharded run in the last float bits, because their batches hold other proteins)."""
    merge_files([halves / "s2.h5", halves / "s1.h5"], str(tmp_path / "m"), formats=("h5",))
    expected = {**results_by_index(halves / "s1.h5"), **results_by_index(halves / "s2.h5")}
    merged = results_by_index(tmp_path / "m.h5")
    assert list(merged) == sorted(expected) and merged == expected


def test_merged_shards_equal_unsharded_run(thirds, tmp_path):
    # One protein per batch (--toks-per-batch 1), so a protein's numbers cannot depend on its batch-mates,
    # which differ between shards: then the merge must reproduce the unsharded run exactly.
    src = thirds
    shards = [src / f"s{i}.h5" for i in (3, 1, 2)]  # order of arguments must not matter
    merge_files(shards, str(tmp_path / "merged"), command="protsae merge (test)")
    assert_same_outputs(tmp_path / "merged", src / "whole")
    with h5py.File(tmp_path / "merged.h5") as f:
        assert f.attrs["shard"] == "" and f.attrs["command"] == "protsae merge (test)"
        assert list(f["proteins/index"][()]) == list(range(24))

    # Text shards, for users who kept only those.
    merge_files([src / f"s{i}.tsv" for i in (1, 2, 3)], str(tmp_path / "t"))
    assert (tmp_path / "t.tsv").read_bytes() == (src / "whole.tsv").read_bytes()
    merge_files([src / f"s{i}.gff3" for i in (2, 1, 3)], str(tmp_path / "g"))
    assert gff3_without_command(tmp_path / "g.gff3") == gff3_without_command(src / "whole.gff3")

    # An incomplete set is refused, naming what is missing; --allow-partial merges it and records the coverage.
    with pytest.raises(InputError, match=r"shard 2/3 is missing"):
        merge_files(shards[:2], str(tmp_path / "part"), formats=("h5",))
    assert not (tmp_path / "part.h5").exists()
    merge_files(shards[:2], str(tmp_path / "part"), formats=("h5",), allow_partial=True)
    with h5py.File(tmp_path / "part.h5") as f:
        assert f.attrs["shard"] == "1,3/3"


def test_merge_refuses_overlaps_and_mismatched_provenance(halves, tmp_path):
    s1, s2 = halves / "s1.h5", halves / "s2.h5"
    dup = tmp_path / "again.h5"
    shutil.copy(s1, dup)
    with pytest.raises(InputError, match="again.h5.*ordinal 0 is also in .*s1.h5|s1.h5.*ordinal 0 .*again.h5"):
        merge_files([s1, dup], str(tmp_path / "m"))
    with pytest.raises(InputError, match="s1.tsv"):
        merge_files([halves / "s1.tsv", halves / "s1.tsv"], str(tmp_path / "m"))

    other = tmp_path / "other_sae.h5"
    shutil.copy(s2, other)
    with h5py.File(other, "r+") as f:
        f.attrs["sae_sha256"] = "0" * 64
    with pytest.raises(InputError, match=r"other_sae\.h5: sae_sha256"):
        merge_files([s1, other], str(tmp_path / "m"))
    with h5py.File(other, "r+") as f:
        f.attrs["sae_sha256"] = h5py.File(s1, "r").attrs["sae_sha256"]
        f.attrs["layer"] = 1
    with pytest.raises(InputError, match=r"other_sae\.h5: layer"):
        merge_files([s1, other], str(tmp_path / "m"))
    with pytest.raises(InputError, match="mix kinds"):
        merge_files([s1, halves / "s2.tsv"], str(tmp_path / "m"))
    assert not list(tmp_path.glob("m.*")) and not list(tmp_path.glob(".m.*"))  # nothing half-written


def test_merge_renumbers_separately_numbered_pieces(annotator, tiny_esm_path, tiny_sae_dir, thirds, tmp_path):
    """Nextflow's splitFasta gives files numbered from 0 each; --renumber offsets them in the given order."""
    text = (thirds / "in.fasta").read_text().splitlines(keepends=True)
    cut = 2 * 11  # 11 records (2 lines each) in the first piece
    (tmp_path / "a.fa").write_text("".join(text[:cut]))
    (tmp_path / "b.fa").write_text("".join(text[cut:]))
    for name in ("a", "b"):
        annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, tmp_path / f"{name}.fa", tmp_path / name,
                               toks_per_batch=1))
    with pytest.raises(InputError, match="--renumber"):
        merge_files([tmp_path / "a.h5", tmp_path / "b.h5"], str(tmp_path / "m"))
    merge_files([tmp_path / "a.h5", tmp_path / "b.h5"], str(tmp_path / "m"), renumber=True)
    assert_same_outputs(tmp_path / "m", thirds / "whole")


def test_combine_shards():
    assert combine_shards(["1/3", "2/3", "3/3"]) == ""
    assert combine_shards(["2/8", "6/8"]) == "2/4"  # two --devices workers inside --shard 2/4
    assert combine_shards(["1/4", "3/4"]) == "1/2"
    assert combine_shards(["1/3", "2/3"]) == "1,2/3"
    assert combine_shards(["", ""]) == ""


# ---------------------------------------------------------------------------------------------------------
# --resume
# ---------------------------------------------------------------------------------------------------------

def _count_encoded(monkeypatch) -> list[int]:
    """Record how many proteins go through the model, to prove finished chunks are not redone."""
    seen: list[int] = []
    original = Annotator.iter_results

    def counting(self, records, opts, *a, **kw):
        records = list(records)
        seen.append(len(records))
        return original(self, records, opts, *a, **kw)

    monkeypatch.setattr(Annotator, "iter_results", counting)
    return seen


def test_resume_after_kill_9_equals_uninterrupted_run(annotator, tiny_esm_path, tiny_sae_dir, fasta, tmp_path,
                                                      monkeypatch):
    prefix = tmp_path / "out" / "run"
    env = dict(os.environ, PROTSAE_CHUNK_RECORDS="2")
    cmd = [sys.executable, "-m", "protsae_cli", "annotate", "-", "-o", str(prefix), "--model", str(tiny_esm_path),
           "--sae", str(tiny_sae_dir), "--device", "cpu", "--skip-invalid", "--resume"]
    # Feed the input through a pipe we control: after 8 records the run has finished chunks 0-2 (chunk 3 needs
    # to see a 9th record to know it is complete) and is blocked reading, so the kill lands at a known point.
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    lines = fasta.read_text().splitlines(keepends=True)
    proc.stdin.write("".join(lines[:16]).encode())
    proc.stdin.flush()
    parts = Path(f"{prefix}.parts")
    deadline = time.monotonic() + 90
    # A part counts as finished once its checksum sidecar is written (renamed into place after the part itself).
    while len(list(parts.glob("chunk_*.h5.sha256"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoints appeared"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdin.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not any((prefix.parent / f"run.{ext}").exists() for ext in ("h5", "tsv", "gff3"))  # nothing final yet
    assert sorted(p.name for p in parts.glob("chunk_*.h5")) == [f"chunk_{i:06d}.h5" for i in range(3)]

    # Different settings: refused, and the checkpoints are left alone.
    with pytest.raises(InputError, match="toks_per_batch"):
        annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fasta, prefix, chunk_records=2, resume=True,
                               toks_per_batch=999))
    # A different input under the same prefix: refused too.
    other = write_fasta(tmp_path / "other.fasta", seed=99)
    with pytest.raises(InputError, match="does not match the input"):
        annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, other, prefix, chunk_records=2, resume=True))
    assert len(list(parts.glob("chunk_*.h5"))) == 3

    seen = _count_encoded(monkeypatch)
    summary = annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fasta, prefix, chunk_records=2, resume=True))
    assert sum(seen) == 24 - 6, "finished chunks were recomputed"
    assert summary.proteins == 24 and summary.invalid == 1 and summary.windowed == 1
    assert not parts.exists()
    monkeypatch.undo()

    annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fasta, tmp_path / "plain", chunk_records=2))
    assert_same_outputs(prefix, tmp_path / "plain")


def test_resume_without_a_crash_and_with_stdout_refused(annotator, tiny_esm_path, tiny_sae_dir, fasta, tmp_path):
    annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fasta, tmp_path / "r", resume=True, chunk_records=5,
                           formats=("tsv", "gff3")))
    annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fasta, tmp_path / "p", chunk_records=5))
    assert (tmp_path / "r.tsv").read_bytes() == (tmp_path / "p.tsv").read_bytes()
    assert gff3_without_command(tmp_path / "r.gff3") == gff3_without_command(tmp_path / "p.gff3")
    assert not (tmp_path / "r.h5").exists() and not (tmp_path / "r.parts").exists()
    with pytest.raises(InputError, match="stdout"):
        annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fasta, "-", resume=True, formats=("tsv",)))
