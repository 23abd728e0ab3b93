"""annotate end to end on tiny models: outputs read back and checked against an independent computation."""

from __future__ import annotations

import csv
import gzip
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator, annotate
from protsae_cli.cli.app import build_app
from protsae_cli.errors import CompatibilityError, InputError
from protsae_cli.sae.checkpoint import load_sae
from protsae_cli.io.writers.h5 import H5Annotations


def _opts(tiny_esm_path, tiny_sae_dir, fasta, prefix, **kw):
    return AnnotateOptions(input=str(fasta), output_prefix=str(prefix), model=str(tiny_esm_path),
                           sae=str(tiny_sae_dir), device="cpu", progress=False, **kw)


def test_h5_codes_match_independent_reference(tiny_esm_path, tiny_sae_dir, tiny_plm, small_fasta, tmp_path):
    s = annotate(_opts(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path / "run"))
    assert s.proteins == 3 and s.ok == 3
    sae, _ = load_sae(tiny_sae_dir)
    seqs = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MKVLAAGIV", "ACDEFGHIKLMNPQRSTVWYXBUZO"]
    with H5Annotations(tmp_path / "run.h5") as h5:
        assert h5.n_proteins == 3
        assert list(h5.proteins["id"]) == ["P1", "sp|P2/x", "P1"]  # verbatim, duplicates kept, input order
        for i, seq in enumerate(seqs):
            # independent path: fair-esm's own forward + the SAE's dense reference encode
            _, _, tok = tiny_plm.alphabet.get_batch_converter()([("x", seq)])
            rep = tiny_plm.model(tok, repr_layers=[2])["representations"][2][0, 1:len(seq) + 1]
            dense = sae.encode_dense(rep).detach().numpy()
            got = h5.codes(i).toarray()
            assert got.shape == (len(seq), 64)
            assert ((got != 0).sum(1) <= sae.cfg.k).all()
            np.testing.assert_allclose(got, dense, rtol=2e-3, atol=2e-3)  # float16 storage
        assert h5.attrs["hook_point"] == "resid_post" and int(h5.attrs["layer"]) == 2
        assert h5.attrs["plm_sha256"] == load_sae(tiny_sae_dir)[0].cfg.plm_sha256
        offsets = h5.f["proteins/row_offset"][()]
        assert list(np.diff(offsets)) == [len(s) for s in seqs]
        indptr = h5.f["codes/indptr"][()]
        assert indptr[0] == 0 and indptr[-1] == h5.f["codes/data"].shape[0] and len(indptr) == offsets[-1] + 1


def test_tsv_and_gff3_agree_with_h5_segments(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path):
    annotate(_opts(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path / "run"))
    with H5Annotations(tmp_path / "run.h5") as h5:
        segs = [(h5.protein(i).id, s.latent, s.start, s.end) for i in range(h5.n_proteins) for s in h5.segments(i)]
    assert segs, "the tiny SAE's concept latents should fire somewhere"
    rows = list(csv.reader(open(tmp_path / "run.tsv"), delimiter="\t"))
    header, body = rows[0], rows[1:]
    assert header[0].startswith("#")
    col = {name.lstrip("#"): j for j, name in enumerate(header)}
    tsv = [(r[col["protein_id"]], int(r[col["latent"]]), int(r[col["start"]]), int(r[col["end"]])) for r in body]
    assert sorted(tsv) == sorted(segs)
    feats = [ln.split("\t") for ln in open(tmp_path / "run.gff3") if ln.strip() and not ln.startswith("#")]
    assert all(len(f) == 9 for f in feats) and len(feats) == len(segs)
    assert all(1 <= int(f[3]) <= int(f[4]) for f in feats)


def test_long_protein_windows_cover_every_residue(tiny_esm_path, tiny_sae_dir, tmp_path):
    rng = np.random.default_rng(0)
    seq = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 130))
    fa = tmp_path / "long.fa"
    fa.write_text(f">long\n{seq}\n>short\nMKV\n")
    s = annotate(_opts(tiny_esm_path, tiny_sae_dir, fa, tmp_path / "w", max_window=50, window_overlap=10))
    assert s.windowed == 1 and s.ok == 1
    with H5Annotations(tmp_path / "w.h5") as h5:
        assert h5.protein(0).status == "windowed" and h5.codes(0).shape[0] == 130
    s = annotate(_opts(tiny_esm_path, tiny_sae_dir, fa, tmp_path / "t", max_window=50, window_overlap=10, long_policy="truncate"))
    with H5Annotations(tmp_path / "t.h5") as h5:
        assert h5.protein(0).status == "truncated" and h5.codes(0).shape[0] == 50
    with pytest.raises(InputError, match="long"):
        annotate(_opts(tiny_esm_path, tiny_sae_dir, fa, tmp_path / "e", max_window=50, window_overlap=10, long_policy="error"))
    assert not (tmp_path / "e.h5").exists()


def test_windowed_codes_come_from_the_most_central_window(tiny_esm_path, tiny_sae_dir, tiny_plm, tmp_path):
    from protsae_cli.plm.batching import plan_windows

    rng = np.random.default_rng(1)
    seq = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 90))
    fa = tmp_path / "l.fa"
    fa.write_text(f">l\n{seq}\n")
    annotate(_opts(tiny_esm_path, tiny_sae_dir, fa, tmp_path / "w", max_window=40, window_overlap=8))
    sae, _ = load_sae(tiny_sae_dir)
    wins, _ = plan_windows(90, "window", max_residues=40, overlap=8)
    expect = np.zeros((90, 64), np.float32)
    for w in wins:
        _, _, tok = tiny_plm.alphabet.get_batch_converter()([("x", seq[w.start:w.end])])
        rep = tiny_plm.model(tok, repr_layers=[2])["representations"][2][0, 1:w.end - w.start + 1]
        dense = sae.encode_dense(rep).detach().numpy()
        expect[w.keep_start:w.keep_end] = dense[w.keep_start - w.start:w.keep_end - w.start]
    with H5Annotations(tmp_path / "w.h5") as h5:
        np.testing.assert_allclose(h5.codes(0).toarray(), expect, rtol=2e-3, atol=2e-3)


def test_invalid_records_stop_or_are_recorded(tiny_esm_path, tiny_sae_dir, tmp_path):
    fa = tmp_path / "bad.fa"
    fa.write_text(">ok1\nMKV\n>bad one\nMK-V\n>ok2\nACD\n")
    with pytest.raises(InputError, match=r"'bad'.*position 3"):
        annotate(_opts(tiny_esm_path, tiny_sae_dir, fa, tmp_path / "x"))
    assert not list(tmp_path.glob("x.*")) and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    s = annotate(_opts(tiny_esm_path, tiny_sae_dir, fa, tmp_path / "y", skip_invalid=True))
    assert (s.ok, s.invalid) == (2, 1)
    with H5Annotations(tmp_path / "y.h5") as h5:
        p = h5.protein(1)
        assert p.id == "bad" and p.status == "invalid" and "position 3" in p.status_detail and p.n_rows == 0


def test_wrong_plm_is_refused_naming_both_sides(tiny_sae_dir, tmp_path, small_fasta):
    from tests.conftest import write_fair_esm_checkpoint

    other = write_fair_esm_checkpoint(tmp_path / "esm2_other.pt", seed=5)
    with pytest.raises(CompatibilityError, match="esm2_other"):
        annotate(AnnotateOptions(input=str(small_fasta), output_prefix=str(tmp_path / "r"), model=str(other),
                                 sae=str(tiny_sae_dir), device="cpu", progress=False))
    wide = write_fair_esm_checkpoint(tmp_path / "esm2_wide.pt", dim=48)
    with pytest.raises(CompatibilityError, match="d_model=32.*d_model=48"):
        annotate(AnnotateOptions(input=str(small_fasta), output_prefix=str(tmp_path / "r"), model=str(wide),
                                 sae=str(tiny_sae_dir), device="cpu", progress=False))


def test_interrupted_run_leaves_no_output(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path, monkeypatch):
    def boom(self, items):
        raise KeyboardInterrupt

    monkeypatch.setattr(Annotator, "_encode_items", boom)
    with pytest.raises(KeyboardInterrupt):
        annotate(_opts(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path / "run"))
    assert list(tmp_path.iterdir()) == [small_fasta]


def test_oom_halves_batches_and_records_failures(tiny_esm_path, tiny_sae_dir, tmp_path, monkeypatch):
    """Simulated CUDA OOM for any batch holding the 'huge' protein: others succeed, 'huge' is recorded."""
    fa = tmp_path / "o.fa"
    fa.write_text(">a\nMKVL\n>huge\nMKVLMKVLMKVLMKVLMKVL\n>b\nACDE\n>c\nWWW\n")
    ann = Annotator(str(tiny_esm_path), str(tiny_sae_dir), device="cpu")
    real = ann.runner.hook_activations

    def flaky(tokens, hook):
        if tokens.shape[1] >= 22:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(tokens, hook)

    monkeypatch.setattr(ann.runner, "hook_activations", flaky)
    s = ann.run(_opts(tiny_esm_path, tiny_sae_dir, fa, tmp_path / "o"))
    assert (s.ok, s.failed) == (3, 1)
    with H5Annotations(tmp_path / "o.h5") as h5:
        assert [h5.protein(i).status for i in range(4)] == ["ok", "failed_oom", "ok", "ok"]
        assert "out of GPU memory" in h5.protein(1).status_detail


def test_cli_gz_stdin_formats_and_shard(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path):
    runner = CliRunner()
    gz = tmp_path / "in.fa.gz"
    gz.write_bytes(gzip.compress(small_fasta.read_bytes()))
    args = ["annotate", str(gz), "--model", str(tiny_esm_path), "--sae", str(tiny_sae_dir), "--device", "cpu"]
    r = runner.invoke(build_app(), [*args, "-o", str(tmp_path / "gz"), "--formats", "h5"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "gz.h5").exists() and not (tmp_path / "gz.tsv").exists()
    r = runner.invoke(build_app(), [*args, "-o", str(tmp_path / "s2"), "--shard", "2/2"])
    assert r.exit_code == 0, r.output
    with H5Annotations(tmp_path / "s2.h5") as h5:
        assert list(h5.proteins["index"]) == [1]
    r = runner.invoke(build_app(), [*args, "-o", str(tmp_path / "s"), "--shard", "3/2"])
    assert r.exit_code != 0
    out = subprocess.run([sys.executable, "-m", "protsae_cli", "annotate", "-", "--model", str(tiny_esm_path),
                          "--sae", str(tiny_sae_dir), "--device", "cpu", "-o", "-", "--formats", "tsv"],
                         input=small_fasta.read_bytes(), capture_output=True, check=True)
    assert out.stdout.startswith(b"#protein_id")


def test_version_is_fast_and_bare():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "protsae_cli", "--version"],
                         capture_output=True, text=True, check=True)
    from protsae_cli import __version__

    assert out.stdout.strip() == __version__
    assert "torch" not in out.stderr  # importtime lists every imported module on stderr


def test_bad_fasta_exit_code(tiny_esm_path, tiny_sae_dir, tmp_path):
    fa = tmp_path / "junk.fa"
    fa.write_text("this is not fasta\n")
    out = subprocess.run([sys.executable, "-m", "protsae_cli", "annotate", str(fa), "--model", str(tiny_esm_path),
                          "--sae", str(tiny_sae_dir), "--device", "cpu", "-o", str(tmp_path / "j")],
                         capture_output=True, text=True)
    assert out.returncode == 3 and "junk.fa" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("backend", ["onnx"])
def test_backends_give_the_same_annotations(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path, backend):
    pytest.importorskip("onnxruntime")
    annotate(_opts(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path / "t", backend="torch"))
    annotate(_opts(tiny_esm_path, tiny_sae_dir, small_fasta, tmp_path / "o", backend=backend))
    with H5Annotations(tmp_path / "t.h5") as a, H5Annotations(tmp_path / "o.h5") as b:
        assert a.attrs["backend"] == "torch" and b.attrs["backend"] == backend
        for i in range(a.n_proteins):
            np.testing.assert_allclose(a.codes(i).toarray(), b.codes(i).toarray(), rtol=2e-3, atol=2e-3)
            assert [(s.latent, s.start, s.end) for s in a.segments(i)] == \
                [(s.latent, s.start, s.end) for s in b.segments(i)]
