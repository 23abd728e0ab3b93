"""HDF5, TSV and GFF3 writers: layout, round trips, escaping, streaming and atomicity."""

from __future__ import annotations

import csv
import gzip
import io
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import h5py
import numpy as np
import pytest

from protsae_cli.call.concepts import call_segments
from protsae_cli.io.results import STATUS_NAMES, ProteinResult, Segment, seq_md5
from protsae_cli.sae.config import ConceptEntry
from protsae_cli.io.atomic import AtomicFile, atomic_path
from protsae_cli.io.writers.gff3 import GFF3Writer, escape_attr, escape_seqid
from protsae_cli.io.writers.h5 import H5Annotations, H5Writer, index_dtype
from protsae_cli.io.writers.tsv import TSV_COLUMNS, TSVWriter

D_SAE, K = 40, 4
PROVENANCE = {"command": "protsae annotate in.fa -o out", "plm_model": "esm2_t6_8M_UR50D", "plm_sha256": "ab" * 32,
              "hook_point": "resid_post", "layer": 6, "sae_id": "demo", "min_segment_len": 1, "merge_gap": 1,
              "shard": ""}
CONCEPTS = [
    ConceptEntry(latent=3, concept_id="IPR000001", name="Kringle; domain=x,y", ontology_id="GO:0005515",
                 threshold=0.3),
    ConceptEntry(latent=7, concept_id="SITE", name="binding\tsite", ontology_id="SO:0000409", threshold=0.5),
    ConceptEntry(latent=11, concept_id="c11", name="", threshold=0.2),
]
AA = "ACDEFGHIKLMNPQRSTVWY"


def make_codes(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoder-shaped codes: distinct latents, ordered (value desc, latent asc), some empty (-1/0) slots."""
    idx = np.full((rows, K), -1, dtype=np.int64)
    val = np.zeros((rows, K), dtype=np.float32)
    hot = np.array([3, 7, 11])
    for r in range(rows):
        n = int(rng.integers(0, K + 1))
        lats = rng.choice(np.setdiff1d(np.arange(D_SAE), hot), n, replace=False)
        if n and rng.random() < 0.7:
            lats[0] = rng.choice(hot)
        vals = rng.uniform(0.05, 3.0, n).astype(np.float16).astype(np.float32)  # exactly representable in fp16
        order = np.lexsort((lats, -vals))
        idx[r, :n], val[r, :n] = lats[order], vals[order]
    return idx, val


def make_result(rng: np.random.Generator, index: int, pid: str, length: int, status: str = "ok",
                rows: int | None = None, detail: str = "") -> ProteinResult:
    seq = "".join(rng.choice(list(AA), length)) if length else ""
    rows = length if rows is None else rows
    idx, val = make_codes(rng, rows)
    return ProteinResult(index=index, id=pid, description=f"{pid} some protein OS=Homo sapiens", sequence=seq,
                         status=status, status_detail=detail, idx=idx, val=val,
                         segments=call_segments(idx, val, CONCEPTS, merge_gap=1))


@pytest.fixture(scope="module")
def results() -> list[ProteinResult]:
    rng = np.random.default_rng(7)
    return [
        make_result(rng, 0, "sp|P12345|KRING_HUMAN", 30),
        make_result(rng, 1, "sp|P12345|KRING_HUMAN", 12),            # duplicate id
        make_result(rng, 2, "weird id/with slash", 9),
        ProteinResult.without_codes(3, "bad>record", "broken", "", "invalid", "invalid residue 'J' at 5", K),
        make_result(rng, 4, "énzyme_β;x=1%", 25, status="truncated", rows=16),
        make_result(rng, 5, "long1", 50, status="windowed"),
        ProteinResult.without_codes(6, "oom", "", "MKV" * 10, "failed_oom", "CUDA out of memory", K),
    ]


def write_all(writer_cls: type, path: Path | str, results: list[ProteinResult], **kw: object) -> None:
    with writer_cls(path, PROVENANCE, CONCEPTS, D_SAE, K, **kw) as w:
        for r in results:
            w.write(r)


def no_temps(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if ".tmp-" in p.name]


# -- HDF5 -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [{}, {"compression": "lzf", "dtype": "float32"}, {"compression": None}])
def test_h5_layout_and_raw_contents(tmp_path: Path, results: list[ProteinResult], opts: dict) -> None:
    path = tmp_path / "out.h5"
    # Tiny flush sizes force many appends, exercising the streaming path.
    write_all(H5Writer, path, results, flush_rows=7, flush_proteins=2, chunk_elems=16, **opts)
    assert no_temps(tmp_path)
    with h5py.File(path, "r") as f:
        for key in ("format", "format_version", "coordinate_system", "d_sae", "k", "protsae_version", "command",
                    "plm_model", "hook_point", "layer", "shard"):
            assert key in f.attrs, key
        assert f.attrs["format"] == "protsae-annotations"
        assert f.attrs["coordinate_system"] == "0-based rows; text outputs 1-based inclusive"
        p = f["proteins"]
        assert list(p["id"].asstr()[()]) == [r.id for r in results]
        assert list(p["index"][()]) == [r.index for r in results]
        assert list(p["length"][()]) == [r.length for r in results]
        assert [x.decode() for x in p["seq_md5"][()]] == [seq_md5(r.sequence) for r in results]
        assert [STATUS_NAMES[s] for s in p["status"][()]] == [r.status for r in results]
        assert p["status"].dtype == np.int8
        assert list(p["status"].attrs["status_names"]) == list(STATUS_NAMES)
        assert p["status_detail"].asstr()[3] == "invalid residue 'J' at 5"
        offsets = p["row_offset"][()]
        assert offsets[0] == 0 and list(np.diff(offsets)) == [r.n_rows for r in results]
        n_rows = int(offsets[-1])

        c = f["codes"]
        assert c.attrs["encoding-type"] == "csr_matrix" and c.attrs["encoding-version"] == "0.1.0"
        assert list(c.attrs["shape"]) == [n_rows, D_SAE]
        indptr, indices, data = c["indptr"][()], c["indices"][()], c["data"][()]
        assert indptr.shape == (n_rows + 1,) and indptr[0] == 0 and indptr[-1] == data.size == indices.size
        assert np.all(np.diff(indptr) >= 0) and np.all(np.diff(indptr) <= K)
        assert indices.dtype == index_dtype(D_SAE) == np.uint16
        assert data.dtype == np.dtype(opts.get("dtype", "float32"))
        assert np.all(data != 0)
        for r in range(n_rows):  # canonical CSR: latents strictly ascending within a row
            assert np.all(np.diff(indices[indptr[r]:indptr[r + 1]].astype(int)) > 0)
        expected_nnz = sum(int(((x.idx >= 0) & (x.val != 0)).sum()) for x in results)
        assert data.size == expected_nnz
        aa = f["residues/aa"][()].tobytes().decode()
        assert aa == "".join(r.sequence[:r.n_rows] for r in results)
        if opts.get("compression", "gzip") == "gzip":
            assert c["data"].compression == "gzip" and c["data"].shuffle
        assert f["segments/start"].shape[0] == sum(len(r.segments) for r in results)
        assert list(f["concepts/latent"][()]) == [3, 7, 11]
        assert list(f["concepts/name"].asstr()[()]) == [c.name for c in CONCEPTS]


def test_h5_reader_round_trip(tmp_path: Path, results: list[ProteinResult]) -> None:
    path = tmp_path / "out.h5"
    write_all(H5Writer, path, results, flush_rows=5)
    with H5Annotations(path) as h:
        assert h.n_proteins == len(h) == len(results)
        assert h.d_sae == D_SAE and h.k == K
        assert h.attrs["layer"] == 6 and h.attrs["plm_model"] == "esm2_t6_8M_UR50D"
        assert list(h.proteins["id"]) == [r.id for r in results]
        assert h.find("sp|P12345|KRING_HUMAN") == [0, 1]
        assert [c.concept_id for c in h.concepts] == [c.concept_id for c in CONCEPTS]
        info = h.protein(4)
        assert (info.status, info.length, info.n_rows) == ("truncated", 25, 16)
        assert h.residues(4) == results[4].sequence[:16]
        for i, r in enumerate(results):
            m = h.codes(i)
            assert m.shape == (r.n_rows, D_SAE)
            dense = np.zeros((r.n_rows, D_SAE), np.float32)
            for row in range(r.n_rows):
                for lat, v in zip(r.idx[row], r.val[row]):
                    if lat >= 0:
                        dense[row, lat] = v
            np.testing.assert_allclose(m.toarray(), dense, rtol=1e-3)
            idx, val = h.codes_topk(i)
            np.testing.assert_array_equal(idx, r.idx)
            np.testing.assert_allclose(val, r.val, rtol=1e-3)
            assert [(s.latent, s.start, s.end) for s in h.segments(i)] == \
                [(s.latent, s.start, s.end) for s in r.segments]
        back = list(h.iter_results(block_rows=20, block_proteins=3))
        assert len(back) == len(results)
        for got, want in zip(back, results):
            assert (got.index, got.id, got.description, got.status, got.status_detail) == \
                (want.index, want.id, want.description, want.status, want.status_detail)
            assert (got.length, got.seq_md5) == (want.length, want.seq_md5)
            assert got.sequence == want.sequence[:want.n_rows]
            np.testing.assert_array_equal(got.idx, want.idx)
            np.testing.assert_allclose(got.val, want.val, rtol=1e-3)
            assert len(got.segments) == len(want.segments)
            for a, b in zip(got.segments, want.segments):
                assert (a.latent, a.start, a.end) == (b.latent, b.start, b.end)
                assert a.max_act == pytest.approx(b.max_act, rel=1e-3)
                assert a.mean_act == pytest.approx(b.mean_act, rel=1e-3)
                assert a.threshold == pytest.approx(b.threshold)
        assert [r.index for r in h.iter_results(2, 5)] == [2, 3, 4]


def test_h5_rejects_malformed_records(tmp_path: Path) -> None:
    good = ProteinResult(0, "a", "", "AC", "ok", "", np.array([[1, -1], [2, -1]]), np.ones((2, 2), np.float32))
    too_wide = ProteinResult(1, "b", "", "A", "ok", "", np.arange(K + 1)[None], np.ones((1, K + 1), np.float32))
    out_of_range = ProteinResult(1, "b", "", "A", "ok", "", np.array([[D_SAE]]), np.ones((1, 1), np.float32))
    for bad in (too_wide, out_of_range):
        with pytest.raises(ValueError):
            write_all(H5Writer, tmp_path / "x.h5", [good, bad])
        assert not (tmp_path / "x.h5").exists() and no_temps(tmp_path)
    with pytest.raises(ValueError):
        ProteinResult(0, "a", "", "ACD", "ok", "", np.zeros((2, K), np.int64), np.zeros((2, K), np.float32))
    with pytest.raises(ValueError):
        ProteinResult(0, "a", "", "ACD", "unknown", "", np.zeros((3, K), np.int64), np.zeros((3, K), np.float32))


def test_h5_large_dictionary_uses_uint32(tmp_path: Path) -> None:
    r = ProteinResult(0, "a", "", "AC", "ok", "", np.array([[70000], [-1]]), np.array([[1.5], [0]], np.float32))
    path = tmp_path / "big.h5"
    with H5Writer(path, PROVENANCE, [], 70001, 1) as w:
        w.write(r)
    with H5Annotations(path) as h:
        assert h.f["codes/indices"].dtype == np.uint32
        assert h.codes(0)[0, 70000] == pytest.approx(1.5)
        assert h.concepts == [] and h.segments(0) == []


def test_h5_reader_rejects_foreign_files(tmp_path: Path) -> None:
    from protsae_cli.errors import InputError

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(InputError):
        H5Annotations(tmp_path / "other.h5")


@pytest.mark.parametrize("group, column", [("concepts", "name"), ("concepts", "score_probability"),
                                           ("segments", "max_act")])
def test_h5_reader_rejects_table_columns_of_different_lengths(tmp_path: Path, results: list[ProteinResult],
                                                              group: str, column: str) -> None:
    """Readers pair the columns of /concepts and /segments row by row: a damaged file is bad input (exit 3),
    named with the column lengths, not a ValueError from zip(strict=True) or rows silently dropped."""
    from protsae_cli.errors import InputError

    path = tmp_path / "out.h5"
    write_all(H5Writer, path, results)
    with h5py.File(path, "r+") as f:
        g = f[group]
        data, dtype = g[column][()], g[column].dtype  # one row short
        del g[column]
        g.create_dataset(column, data=data[:-1], dtype=dtype)
    with pytest.raises(InputError, match=rf"out\.h5: the /{group} columns have different lengths \(.*{column} "):
        H5Annotations(path)


# -- TSV ------------------------------------------------------------------------------------------------------

def parse_tsv(text: str) -> tuple[list[str], list[dict[str, str]]]:
    lines = text.splitlines()
    assert lines[0].startswith("#")
    header = lines[0][1:].split("\t")
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[1:])), fieldnames=header, delimiter="\t",
                               quoting=csv.QUOTE_NONE))
    return header, rows


def expected_tsv_rows(results: list[ProteinResult]) -> list[tuple[str, int, int, int]]:
    by_key = {(c.latent, np.float32(c.threshold)): c for c in CONCEPTS}
    return [(r.id, s.latent, s.start, s.end) for r in results for s in r.segments
            if (s.latent, np.float32(s.threshold)) in by_key]


@pytest.mark.parametrize("name", ["seg.tsv", "seg.tsv.gz"])
def test_tsv_round_trip(tmp_path: Path, results: list[ProteinResult], name: str) -> None:
    path = tmp_path / name
    write_all(TSVWriter, path, results)
    assert no_temps(tmp_path)
    raw = gzip.open(path, "rb").read() if name.endswith(".gz") else path.read_bytes()
    assert b"\r" not in raw
    header, rows = parse_tsv(raw.decode("utf-8"))
    assert tuple(header) == TSV_COLUMNS
    assert all(len(r) == len(TSV_COLUMNS) and None not in r for r in rows)
    assert [(r["protein_id"], int(r["latent"]), int(r["start"]), int(r["end"])) for r in rows] == \
        expected_tsv_rows(results)
    lengths = {r.index: r for r in results}
    for row in rows:
        res = lengths[int(row["protein_index"])]
        start, end = int(row["start"]), int(row["end"])
        assert 1 <= start <= end <= res.n_rows  # 1-based inclusive
        assert row["seq_md5"] == res.seq_md5 and int(row["length"]) == res.length
        assert (row["hook"], row["layer"], row["plm"]) == ("resid_post", "6", "esm2_t6_8M_UR50D")
        # The segment's values are on-residue activations of that latent in that range.
        lat = int(row["latent"])
        acts = [v for r_ in range(start - 1, end) for i_, v in zip(res.idx[r_], res.val[r_]) if i_ == lat]
        assert float(row["max_act"]) == pytest.approx(max(acts), rel=1e-3)
        assert row["max_act"] == "%.4g" % float(row["max_act"])
        if lat == 11:
            assert row["ontology_id"] == "-" and row["concept_name"] == "-"
        if lat == 7:
            assert row["concept_name"] == "binding site"  # the tab cannot split the row


def test_tsv_without_header_and_to_stdout(results: list[ProteinResult], capsys: pytest.CaptureFixture[str]) -> None:
    write_all(TSVWriter, "-", results, header=False)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines and not lines[0].startswith("#")
    assert len(lines) == len(expected_tsv_rows(results))
    assert all(len(line.split("\t")) == len(TSV_COLUMNS) for line in lines)


def test_tsv_segment_without_concept_is_kept(tmp_path: Path) -> None:
    r = ProteinResult(0, "p", "", "ACDE", "ok", "", np.array([[9], [9], [-1], [-1]]),
                      np.array([[1.0], [1.0], [0], [0]], np.float32), segments=[Segment(9, 1, 2, 1.0, 1.0, 0.5)])
    write_all(TSVWriter, tmp_path / "s.tsv", [r])
    _, rows = parse_tsv((tmp_path / "s.tsv").read_text())
    assert len(rows) == 1 and rows[0]["concept_id"] == "-" and rows[0]["latent"] == "9"


# -- GFF3 -----------------------------------------------------------------------------------------------------

def parse_gff3(text: str) -> tuple[list[str], list[list[str]]]:
    directives, features = [], []
    for line in text.split("\n")[:-1]:
        if line.startswith("#"):
            directives.append(line)
        else:
            cols = line.split("\t")
            assert len(cols) == 9, line
            features.append(cols)
    return directives, features


def attributes(col9: str) -> dict[str, list[str]]:
    out = {}
    for part in col9.split(";"):
        key, value = part.split("=", 1)
        out[key] = [unquote(v) for v in value.split(",")]
    return out


@pytest.mark.parametrize("name", ["seg.gff3", "seg.gff3.gz"])
def test_gff3_round_trip(tmp_path: Path, results: list[ProteinResult], name: str) -> None:
    path = tmp_path / name
    write_all(GFF3Writer, path, results)
    assert no_temps(tmp_path)
    raw = gzip.open(path, "rb").read() if name.endswith(".gz") else path.read_bytes()
    assert b"\r" not in raw
    text = raw.decode("utf-8")
    directives, features = parse_gff3(text)
    assert directives[0] == "##gff-version 3"
    assert f"#command {PROVENANCE['command']}" in directives
    regions = [d.split(" ") for d in directives if d.startswith("##sequence-region")]
    # The second protein named sp|P12345|KRING_HUMAN becomes <id>.2 (one seqid per sequence), mapped in a comment.
    expected_seqids = [r.id + (".2" if r.index == 1 else "") for r in results if r.length > 0]
    assert [(unquote(r[1]), int(r[2]), int(r[3])) for r in regions] == \
        [(sid, 1, r.length) for sid, r in zip(expected_seqids, [r for r in results if r.length > 0])]
    assert "#protsae_seqid sp|P12345|KRING_HUMAN.2 2 sp|P12345|KRING_HUMAN" in directives
    assert len(features) == len(expected_tsv_rows(results))
    ids = [attributes(f[8])["ID"][0] for f in features]
    assert len(set(ids)) == len(ids)
    lengths = {}
    for r in regions:
        lengths.setdefault(r[1], []).append(int(r[3]))
    for f, (pid, lat, start, end) in zip(features, expected_tsv_rows(results)):
        seqid, source, ftype, s, e, score, strand, phase, col9 = f
        assert not any(ch.isspace() for ch in seqid) and not seqid.startswith(">")
        a = attributes(col9)
        assert a.get("original_id", [unquote(seqid)]) == [pid]
        assert unquote(seqid) in (pid, pid + ".2") and len(lengths[seqid]) == 1
        assert (source, strand, phase) == ("protsae", ".", ".")
        assert (int(s), int(e)) == (start, end) and int(e) <= lengths[seqid][0]
        float(score)
        assert a["latent"] == [str(lat)]
        assert set(a) <= {"ID", "Name", "Ontology_term", "Dbxref", "original_id", "latent", "concept_id",
                          "threshold", "mean_activation", "n_residues"}
        assert int(a["n_residues"][0]) == end - start + 1
        if lat == 3:
            assert a["Name"] == ["Kringle; domain=x,y"] and a["Ontology_term"] == ["GO:0005515"]
            assert a["Dbxref"] == ["GO:0005515"]
            assert ftype == "polypeptide_region"
        elif lat == 7:
            assert a["Name"] == ["binding\tsite"] and ftype == "binding_site"
        else:
            assert "Ontology_term" not in a and a["Name"] == ["c11"]


def test_gff3_escaping() -> None:
    for s in ["sp|P1|X_HUMAN", "a b/c", "énzyme;=%&,", ">lead", "tab\there", "ok.1:2^*$@!+_?-|"]:
        esc = escape_seqid(s)
        assert unquote(esc) == s
        assert all(c.isalnum() or c in ".:^*$@!+_?-|%" for c in esc) and esc.isascii()
    assert escape_seqid("ok.1:2^*$@!+_?-|") == "ok.1:2^*$@!+_?-|"
    assert escape_seqid("[x]") == "%5Bx%5D"
    for v in ["a;b=c%d&e,f", "line\nbreak\ttab\x01", "naïve Ω"]:
        esc = escape_attr(v)
        assert unquote(esc) == v
        assert not any(c in esc for c in ";=&,\t\n\x01")
    assert escape_attr("naïve Ω") == "naïve Ω"


@pytest.mark.skipif(shutil.which("gt") is None, reason="GenomeTools (gt) not installed")
def test_gff3_validates_with_genometools(tmp_path: Path, results: list[ProteinResult]) -> None:
    # Duplicate ids included (the fixture's first two proteins share one): each still gets its own seqid.
    dup = results + [make_result(np.random.default_rng(3), 7, "sp|P12345|KRING_HUMAN.2", 14),  # taken by the map
                     make_result(np.random.default_rng(4), 8, "sp|P12345|KRING_HUMAN", 11)]
    write_all(GFF3Writer, tmp_path / "v.gff3", dup)
    proc = subprocess.run(["gt", "gff3validator", str(tmp_path / "v.gff3")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    problems = gff3_structure_problems((tmp_path / "v.gff3").read_text())
    assert problems == []


def gff3_structure_problems(text: str) -> list[str]:
    """What `gt gff3validator` checks structurally, in Python, so the property is tested without GenomeTools:
    version line first, 9 tab-separated columns, legal seqid characters, one ##sequence-region per seqid
    declared before its features, features inside their region, start <= end, unique IDs, well-formed
    key=value attributes with reserved characters escaped."""
    import re

    out: list[str] = []
    lines = text.splitlines()
    if not lines or lines[0] != "##gff-version 3":
        out.append("first line is not ##gff-version 3")
    regions: dict[str, tuple[int, int]] = {}
    ids: set[str] = set()
    seqid_ok = re.compile(r"^[a-zA-Z0-9.:^*$@!+_?|%-]+$")
    for n, line in enumerate(lines[1:], start=2):
        if line.startswith("##sequence-region"):
            parts = line.split()
            if len(parts) != 4:
                out.append(f"line {n}: malformed region")
                continue
            if parts[1] in regions:
                out.append(f"line {n}: sequence region {parts[1]} defined twice")
            regions[parts[1]] = (int(parts[2]), int(parts[3]))
            continue
        if line.startswith("#") or not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 9:
            out.append(f"line {n}: {len(cols)} columns")
            continue
        seqid, _, ftype, start, end, score, strand, phase, col9 = cols
        if not seqid_ok.match(seqid):
            out.append(f"line {n}: illegal seqid {seqid!r}")
        if seqid not in regions:
            out.append(f"line {n}: feature on {seqid} before its ##sequence-region")
        elif not regions[seqid][0] <= int(start) <= int(end) <= regions[seqid][1]:
            out.append(f"line {n}: {start}-{end} outside the region of {seqid}")
        if not ftype or " " in ftype:
            out.append(f"line {n}: bad type {ftype!r}")
        if score != ".":
            float(score)
        if strand not in ".+-?" or phase != ".":
            out.append(f"line {n}: strand/phase")
        for part in col9.split(";"):
            key, eq, value = part.partition("=")
            if not eq or not key or not value or any(c in value for c in "=\t"):
                out.append(f"line {n}: malformed attribute {part!r}")
            if key == "ID":
                if value in ids:
                    out.append(f"line {n}: ID {value} not unique")
                ids.add(value)
    return out


def test_gff3_structure_with_duplicate_ids(tmp_path: Path, results: list[ProteinResult]) -> None:
    """Runs without GenomeTools: the same structural rules gt checks, duplicates and a taken <id>.2 included."""
    dup = results + [make_result(np.random.default_rng(3), 7, "sp|P12345|KRING_HUMAN.2", 14),
                     make_result(np.random.default_rng(4), 8, "sp|P12345|KRING_HUMAN", 11)]
    write_all(GFF3Writer, tmp_path / "v.gff3", dup)
    text = (tmp_path / "v.gff3").read_text()
    assert gff3_structure_problems(text) == []
    regions = [line.split()[1] for line in text.splitlines() if line.startswith("##sequence-region")]
    # input order: X, X, weird, (invalid: no region), enzyme, long1, oom, X.2 (an input id), X
    assert [unquote(r) for r in regions] == [
        "sp|P12345|KRING_HUMAN", "sp|P12345|KRING_HUMAN.2", "weird id/with slash", "énzyme_β;x=1%", "long1", "oom",
        "sp|P12345|KRING_HUMAN.2.2", "sp|P12345|KRING_HUMAN.3"]
    assert "#protsae_seqid sp|P12345|KRING_HUMAN.3 9 sp|P12345|KRING_HUMAN" in text.splitlines()
    # The checker itself fails on what it is meant to catch.
    bad = text.replace("sp|P12345|KRING_HUMAN.2 1", "sp|P12345|KRING_HUMAN 1", 1)
    assert any("defined twice" in p for p in gff3_structure_problems(bad))


# -- atomicity ------------------------------------------------------------------------------------------------

WRITERS = [(H5Writer, "out.h5"), (TSVWriter, "out.tsv"), (TSVWriter, "out.tsv.gz"), (GFF3Writer, "out.gff3"),
           (GFF3Writer, "out.gff3.gz")]


@pytest.mark.parametrize("writer_cls,name", WRITERS)
def test_exception_inside_context_leaves_nothing(tmp_path: Path, results: list[ProteinResult], writer_cls: type,
                                                 name: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with writer_cls(tmp_path / name, PROVENANCE, CONCEPTS, D_SAE, K) as w:
            w.write(results[0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer_cls,name", WRITERS)
def test_abort_leaves_nothing_and_keeps_previous_output(tmp_path: Path, results: list[ProteinResult],
                                                        writer_cls: type, name: str) -> None:
    final = tmp_path / name
    final.write_bytes(b"previous complete output")
    w = writer_cls(final, PROVENANCE, CONCEPTS, D_SAE, K)
    w.write(results[0])
    assert not no_temps(tmp_path)  # work in progress lives under a temp name only
    w.abort()
    w.abort()
    w.close()  # no-op after abort: must not publish anything
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert final.read_bytes() == b"previous complete output"
    with pytest.raises(ValueError):
        w.write(results[1])


def test_keyboard_interrupt_cleans_up(tmp_path: Path, results: list[ProteinResult]) -> None:
    with pytest.raises(KeyboardInterrupt):
        with H5Writer(tmp_path / "k.h5", PROVENANCE, CONCEPTS, D_SAE, K) as w:
            w.write(results[0])
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_helpers(tmp_path: Path) -> None:
    final = tmp_path / "x.txt"
    tmp = atomic_path(final)
    assert tmp.parent == tmp_path and tmp.name.startswith(".x.txt.tmp-") and tmp != atomic_path(final)
    with AtomicFile(final) as af:
        af.tmp.write_text("done")
        assert not final.exists()
    assert final.read_text() == "done" and no_temps(tmp_path)
    with pytest.raises(OSError):
        with AtomicFile(tmp_path / "y.txt") as af:
            af.tmp.write_text("partial")
            raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_gff3_shards_with_a_repeated_id_merge_to_the_unsharded_file(tmp_path: Path,
                                                                     results: list[ProteinResult]) -> None:
    """Each shard names its proteins alone (both copies of sp|P12345|KRING_HUMAN keep the id when they land in
    different shards); merging renames them as one writer would have, so the merged file is valid too."""
    from protsae_cli.io.merge import merge_gff3

    ident = {"input_records": len(results), "input_sha256": "cd" * 32}
    whole = tmp_path / "whole.gff3"
    with GFF3Writer(whole, {**PROVENANCE, **ident}, CONCEPTS, D_SAE, K) as w:
        for r in results:
            w.write(r)
    shards = []
    for i in (1, 2):
        p = tmp_path / f"s{i}.gff3"
        with GFF3Writer(p, {**PROVENANCE, "shard": f"{i}/2", **ident}, CONCEPTS, D_SAE, K) as w:
            for r in results:
                if r.index % 2 == i - 1:
                    w.write(r)
        shards.append(p)
    assert "#protsae_seqid" not in shards[0].read_text() + shards[1].read_text()   # 0 and 1 in different shards
    merge_gff3(shards, str(tmp_path / "merged"))
    merged = (tmp_path / "merged.gff3").read_text()

    def body(text: str) -> list[str]:
        return [x for x in text.splitlines() if not x.startswith(("#command ", "#shard "))]

    assert body(merged) == body(whole.read_text())
    assert gff3_structure_problems(merged) == []


def test_duplicate_ids_stay_distinct_records_in_tsv_and_h5(tmp_path: Path, results: list[ProteinResult]) -> None:
    """The fixture's first two proteins share an id: TSV rows and HDF5 records keep them apart by ordinal."""
    write_all(TSVWriter, tmp_path / "d.tsv", results)
    write_all(H5Writer, tmp_path / "d.h5", results)
    rows = [r.split("\t") for r in (tmp_path / "d.tsv").read_text().splitlines()[1:]]
    dup = "sp|P12345|KRING_HUMAN"
    by_index = {r[1] for r in rows if r[0] == dup}
    assert by_index == {"0", "1"}
    assert {r[2] for r in rows if r[0] == dup and r[1] == "1"} == {"12"}      # each row keeps its own length
    with H5Annotations(tmp_path / "d.h5") as h5:
        pos = h5.find(dup)
        assert len(pos) == 2 and [h5.protein(p).index for p in pos] == [0, 1]
        assert [h5.protein(p).length for p in pos] == [30, 12]
