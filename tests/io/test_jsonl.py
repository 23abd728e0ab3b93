"""`--formats jsonl`: one self-contained JSON object per protein, in input order (issue #16, item 7)."""

from __future__ import annotations

import json

import pytest

from protsae_cli.annotate.pipeline import Annotator
from protsae_cli.io.merge import merge_files
from tests.annotate.test_merge_resume import opts_for, write_fasta


@pytest.fixture(scope="module")
def annotator(tiny_esm_path, tiny_sae_dir) -> Annotator:
    return Annotator(str(tiny_esm_path), str(tiny_sae_dir), device="cpu")


def test_one_record_per_protein_matching_the_tsv(annotator, tiny_esm_path, tiny_sae_dir, tmp_path):
    fa = write_fasta(tmp_path / "in.fasta")  # 24 records, one invalid, one windowed
    annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fa, tmp_path / "run", formats=("tsv", "jsonl")))
    lines = (tmp_path / "run.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["protein_index"] for r in records] == list(range(24))  # every protein, calls or not
    assert records[5]["status"] == "invalid" and records[5]["segments"] == [] and records[5]["status_detail"]
    assert records[9]["status"] == "windowed"
    tsv = [x.split("\t") for x in (tmp_path / "run.tsv").read_text().splitlines()[1:]]
    header = (tmp_path / "run.tsv").read_text().splitlines()[0].lstrip("#").split("\t")
    col = {name: i for i, name in enumerate(header)}
    from_tsv = sorted((int(r[col["protein_index"]]), int(r[col["start"]]), int(r[col["end"]]), int(r[col["latent"]]))
                      for r in tsv)
    from_jsonl = sorted((r["protein_index"], s["start"], s["end"], s["latent"]) for r in records
                        for s in r["segments"])
    assert from_jsonl == from_tsv and from_tsv
    for r in records:
        if r["status"] != "invalid":
            assert r["length"] > 0 and len(r["seq_md5"]) == 32
        for s in r["segments"]:
            assert 1 <= s["start"] <= s["end"] <= r["length"]


def test_merged_shards_regenerate_the_same_jsonl(annotator, tiny_esm_path, tiny_sae_dir, tmp_path):
    fa = write_fasta(tmp_path / "in.fasta")
    annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fa, tmp_path / "whole", formats=("h5", "jsonl"),
                           toks_per_batch=1))
    for i in (1, 2):
        annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fa, tmp_path / f"s{i}", shard=(i, 2), formats=("h5",),
                               toks_per_batch=1))
    merge_files([tmp_path / "s2.h5", tmp_path / "s1.h5"], str(tmp_path / "m"), formats=("jsonl",))
    assert (tmp_path / "m.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_jsonl_is_not_a_default_and_not_for_stdout(annotator, tiny_esm_path, tiny_sae_dir, tmp_path):
    fa = write_fasta(tmp_path / "in.fasta", n=3, invalid_at=None, long_at=None)
    annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fa, tmp_path / "d"))
    assert sorted(p.suffix for p in tmp_path.glob("d.*")) == [".gff3", ".h5", ".tsv"]
    from protsae_cli.errors import InputError

    with pytest.raises(InputError, match="-o - writes TSV to stdout"):
        annotator.run(opts_for(tiny_esm_path, tiny_sae_dir, fa, "-", formats=("jsonl",)))


def test_segments_carry_the_calibrated_score(tmp_path):
    from protsae_cli.call.concepts import segment_score
    from protsae_cli.io.results import ProteinResult, Segment
    from protsae_cli.sae.config import ConceptEntry
    from protsae_cli.io.writers.jsonl import JSONLWriter
    import numpy as np

    c = ConceptEntry(latent=0, concept_id="PSC:0000101", name="tm", threshold=0.5,
                     score_curve=[[0.0, 0.1], [1.0, 0.9]])
    seg = Segment(latent=0, start=1, end=3, max_act=1.5, mean_act=1.0, threshold=0.5)
    res = ProteinResult(index=0, id="p", description="", sequence="MKV", status="ok", status_detail="",
                        idx=np.zeros((3, 1), np.int64), val=np.ones((3, 1), np.float32), segments=[seg])
    with JSONLWriter(tmp_path / "x.jsonl", {}, [c], 4, 1) as w:
        w.write(res)
    rec = json.loads((tmp_path / "x.jsonl").read_text())
    assert rec["segments"][0]["score"] == pytest.approx(segment_score(c, 1.5)) and segment_score(c, 1.5) == 0.9
