"""Merge knows its input (issue #12, item 3): every output records the identity of the whole input it was cut
from, and `protsae merge` refuses shards of different inputs (naming both files) and shard sets with shards
missing (naming them) unless --allow-partial.

Before this, shards of two different FASTA files merged silently into one plausible-looking file, and a
missing shard only gave a warning.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from protsae_cli.annotate.pipeline import Annotator
from protsae_cli.errors import InputError
from protsae_cli.io.fasta import InputIdentity, read_fasta
from protsae_cli.io.merge import merge_files, missing_shards
from tests.annotate.test_merge_resume import opts_for, write_fasta


@pytest.fixture(scope="module")
def annotator(tiny_esm_path, tiny_sae_dir) -> Annotator:
    return Annotator(str(tiny_esm_path), str(tiny_sae_dir), device="cpu")


def expected_identity(fasta: Path) -> tuple[int, str]:
    """Written independently of protsae's code, from the documented definition: one line
    ``ordinal<TAB>id<TAB>md5(sequence)`` per record (md5 empty for an invalid record), SHA-256 over them."""
    lines = []
    seq_id, seq = None, []
    records = []
    for line in fasta.read_text().splitlines():
        if line.startswith(">"):
            if seq_id is not None:
                records.append((seq_id, "".join(seq)))
            seq_id, seq = line[1:].split()[0], []
        else:
            seq.append(line.strip())
    records.append((seq_id, "".join(seq)))
    for ordinal, (pid, s) in enumerate(records):
        valid = s.isalpha()
        md5 = hashlib.md5(s.upper().encode()).hexdigest() if valid else ""
        lines.append(f"{ordinal}\t{pid}\t{md5}\n")
    return len(records), hashlib.sha256("".join(lines).encode()).hexdigest()


@pytest.fixture(scope="module")
def runs(annotator, tiny_esm_path, tiny_sae_dir, tmp_path_factory) -> Path:
    """A whole run and 1/3..3/3 of input A; shard 2/3 of input B (one residue changed in one protein)."""
    d = tmp_path_factory.mktemp("identity")
    a = write_fasta(d / "a.fasta")
    b = d / "b.fasta"
    lines = a.read_text().splitlines()
    lines[3] = ("A" if lines[3][0] != "A" else "C") + lines[3][1:]  # record 2's sequence, first residue
    b.write_text("\n".join(lines) + "\n")
    annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, a, d / "whole"))
    for i in (1, 2, 3):
        annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, a, d / f"a{i}", shard=(i, 3)))
    annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, b, d / "b2", shard=(2, 3)))
    return d


def test_every_output_records_the_whole_inputs_identity(runs):
    n, sha = expected_identity(runs / "a.fasta")
    for prefix in ("whole", "a1", "a2", "a3"):  # a shard records the whole input, not its own part
        with h5py.File(runs / f"{prefix}.h5") as f:
            assert (int(f.attrs["input_records"]), f.attrs["input_sha256"]) == (n, sha), prefix
        tail = (runs / f"{prefix}.gff3").read_text().splitlines()[-2:]
        assert tail == [f"#input_records {n}", f"#input_sha256 {sha}"], prefix
        assert not any(line.startswith("#input") for line in (runs / f"{prefix}.tsv").read_text().splitlines())
    with h5py.File(runs / "b2.h5") as f:
        assert f.attrs["input_sha256"] != sha and int(f.attrs["input_records"]) == n


def test_identity_ignores_wrapping_and_descriptions_but_not_order(tmp_path):
    def ident(text: str) -> tuple[int, str]:
        p = tmp_path / "x.fa"
        p.write_text(text)
        i = InputIdentity()
        for _ in i.track(read_fasta(str(p))):
            pass
        return i.records, i.sha256

    base = ident(">a one\nMKVL\nAA\n>b two\nGGG\n")
    assert ident(">a other words\nMKVLAA\n>b\nGG\nG\n") == base
    assert ident(">b two\nGGG\n>a one\nMKVLAA\n") != base
    assert ident(">a one\nMKVLAA\n") != base
    assert ident(">a one\nMKVLAC\n>b two\nGGG\n") != base


@pytest.mark.parametrize("ext", ["h5", "gff3"])
def test_merge_refuses_shards_of_another_input_naming_both(runs, tmp_path, ext):
    shards = [runs / f"a1.{ext}", runs / f"b2.{ext}", runs / f"a3.{ext}"]
    with pytest.raises(InputError, match=r"b2\.%s was made from a different input .* than .*a1\.%s" % (ext, ext)):
        merge_files(shards, str(tmp_path / "m"), formats=(ext,))
    assert not list(tmp_path.iterdir()), "a refused merge leaves nothing behind"


@pytest.mark.parametrize("ext", ["h5", "gff3"])
def test_merge_names_missing_shards_unless_allow_partial(runs, tmp_path, ext):
    with pytest.raises(InputError, match=r"shard 2/3 is missing .* --allow-partial"):
        merge_files([runs / f"a1.{ext}", runs / f"a3.{ext}"], str(tmp_path / "m"), formats=(ext,))
    merge_files([runs / f"a1.{ext}", runs / f"a3.{ext}"], str(tmp_path / "m"), formats=(ext,), allow_partial=True)
    assert (tmp_path / f"m.{ext}").exists()


def test_complete_merge_carries_the_identity(runs, tmp_path):
    merge_files([runs / f"a{i}.h5" for i in (2, 3, 1)], str(tmp_path / "m"))
    n, sha = expected_identity(runs / "a.fasta")
    with h5py.File(tmp_path / "m.h5") as f:
        assert (int(f.attrs["input_records"]), f.attrs["input_sha256"]) == (n, sha)
    assert (tmp_path / "m.tsv").read_bytes() == (runs / "whole.tsv").read_bytes()
    assert (tmp_path / "m.gff3").read_text().splitlines()[-1] == f"#input_sha256 {sha}"
    merge_files([runs / f"a{i}.gff3" for i in (1, 2, 3)], str(tmp_path / "g"))
    assert (tmp_path / "g.gff3").read_text().splitlines()[-1] == f"#input_sha256 {sha}"


def test_renumbered_pieces_get_the_identity_of_their_concatenation(annotator, tiny_esm_path, tiny_sae_dir,
                                                                   tmp_path):
    whole = write_fasta(tmp_path / "whole.fasta", n=10, invalid_at=3, long_at=None)
    text = whole.read_text().splitlines()
    (tmp_path / "p1.fasta").write_text("\n".join(text[:8]) + "\n")
    (tmp_path / "p2.fasta").write_text("\n".join(text[8:]) + "\n")
    for name in ("p1", "p2"):
        annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, tmp_path / f"{name}.fasta", tmp_path / name,
                               formats=("h5",)))
    merge_files([tmp_path / "p1.h5", tmp_path / "p2.h5"], str(tmp_path / "m"), formats=("h5",), renumber=True)
    with h5py.File(tmp_path / "m.h5") as f:
        assert (int(f.attrs["input_records"]), f.attrs["input_sha256"]) == expected_identity(whole)


def test_resumed_run_records_the_same_identity(annotator, tiny_esm_path, tiny_sae_dir, runs, tmp_path):
    annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, runs / "a.fasta", tmp_path / "r", resume=True,
                           chunk_records=5))
    n, sha = expected_identity(runs / "a.fasta")
    with h5py.File(tmp_path / "r.h5") as f:
        assert (int(f.attrs["input_records"]), f.attrs["input_sha256"]) == (n, sha)
    assert (tmp_path / "r.gff3").read_text().splitlines()[-1] == f"#input_sha256 {sha}"


def test_missing_shards_arithmetic():
    assert missing_shards(["1/4", "3/4"]) == ["2/4", "4/4"]
    assert missing_shards(["1/4", "2/4", "3/4", "4/4"]) == []
    assert missing_shards(["1/2", "2/4"]) == ["4/4"]
    assert missing_shards(["1,3/8", "2/4", "4/4"]) == ["5/8", "7/8"]
    assert missing_shards(["", "1/2"]) == []  # a whole run: nothing can be missing


def test_cli_merge_exit_codes(runs, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "protsae_cli", "merge", str(tmp_path / "m"), str(runs / "a1.h5"), str(runs / "a3.h5")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 3 and "shard 2/3 is missing" in p.stderr, p.stderr
    p = subprocess.run(cmd + ["--allow-partial"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    other = tmp_path / "copy_of_b2.h5"
    shutil.copy(runs / "b2.h5", other)
    p = subprocess.run([*cmd[:4], str(tmp_path / "n"), str(runs / "a1.h5"), str(other), str(runs / "a3.h5")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 3 and "copy_of_b2.h5 was made from a different input" in p.stderr, p.stderr


def test_shards_without_any_identity_merge_with_a_warning(runs, tmp_path, caplog):
    old = []
    for i in (1, 2, 3):
        dst = tmp_path / f"old{i}.h5"
        shutil.copy(runs / f"a{i}.h5", dst)
        with h5py.File(dst, "r+") as f:
            del f.attrs["input_records"], f.attrs["input_sha256"]
        old.append(dst)
    merge_files(old, str(tmp_path / "m"), formats=("h5",))
    assert "merged without checking that they come from the same input" in caplog.text
