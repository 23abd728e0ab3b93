"""protsae report: self-contained, escaped, deterministic HTML; PNG figures; selection and scale behaviour."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from protsae_cli.call.concepts import call_segments
from protsae_cli.errors import InputError
from protsae_cli.report.plots import png_bytes
from protsae_cli.report.html import OrdinalMap, read_concepts, scan_segments, write_report
from protsae_cli.io.results import ProteinResult
from protsae_cli.sae.config import ConceptEntry
from protsae_cli.io.writers.h5 import H5Annotations, H5Writer

ODD_ID = "weird<id>&\"q\"'x'</script>"
ODD_ID_ESCAPED = "weird&lt;id&gt;&amp;&quot;q&quot;&#x27;x&#x27;&lt;/script&gt;"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _Collector(HTMLParser):
    """Collects tags with attributes and the text of <script> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._in_script: dict[str, str | None] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = dict(attrs)
            self.scripts.append((self._in_script, ""))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = None

    def handle_data(self, data):
        if self._in_script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)


def parse(html: str) -> _Collector:
    c = _Collector()
    c.feed(html)
    c.close()
    return c


def read_png(data: bytes) -> np.ndarray:
    import matplotlib.image

    assert data.startswith(PNG_SIGNATURE)
    return matplotlib.image.imread(io.BytesIO(data), format="png")


def assert_self_contained(html: str) -> None:
    assert "http://" not in html and "https://" not in html
    doc = parse(html)
    for tag, attrs in doc.tags:
        for key in ("src", "href", "xlink:href", "data"):
            value = attrs.get(key)
            if value is None:
                continue
            assert value.startswith(("data:", "#")), (tag, key, value[:80])
    assert not any(t == "link" for t, _ in doc.tags)
    assert all("src" not in attrs for attrs, _ in doc.scripts)


# ---------------------------------------------------------------------------------------------------------
# A real annotate run (tiny models) with odd ids, a duplicate and an invalid record
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def annotated(tmp_path_factory, tiny_esm_path, tiny_sae_dir) -> Path:
    from protsae_cli.annotate.pipeline import AnnotateOptions, annotate

    d = tmp_path_factory.mktemp("report_run")
    fasta = d / "in.fasta"
    fasta.write_text(">P1 first protein\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n"
                     f">{ODD_ID} <b>bold</b> & co\nMKVLAAGIVKKHEEL\n"
                     ">bad_one not a protein\nMKV1LL\n"
                     ">P1 duplicate id\nACDEFGHIKLMNPQRSTVWY\n")
    annotate(AnnotateOptions(input=str(fasta), output_prefix=str(d / "run"), model=str(tiny_esm_path),
                             sae=str(tiny_sae_dir), formats=("h5",), skip_invalid=True, progress=False,
                             device="cpu"))
    return d / "run.h5"


def test_report_of_annotate_run(annotated, tmp_path):
    out = tmp_path / "report.html"
    pngs = tmp_path / "png"
    summary = write_report(annotated, out, png_dir=pngs)
    html = out.read_text(encoding="utf-8")
    assert summary.proteins_total == 4 and summary.proteins_drawn == 4
    assert_self_contained(html)

    # Every data string escaped: the odd id never appears raw, and only two real <script> elements exist.
    assert ODD_ID not in html and "<b>bold</b>" not in html
    assert ODD_ID_ESCAPED in html and "&lt;b&gt;bold&lt;/b&gt; &amp; co" in html
    doc = parse(html)
    assert len(doc.scripts) == 2 and html.count("</script>") == 2
    data = json.loads(next(text for attrs, text in doc.scripts if attrs.get("id") == "protein-data"))
    with H5Annotations(annotated) as ann:
        ids = list(ann.proteins["id"])
    assert [row[2] for row in data["rows"]] == ids
    assert ids[1] == ODD_ID
    statuses = [row[5] for row in data["rows"]]
    assert statuses == ["ok", "ok", "invalid", "ok"]

    # Run summary, concepts, one card per protein (the invalid one with its reason), figures.
    for text in ("Run summary", "Top concepts", "test concept one", "PSC:T1", "GO:0046872", "Latent activations",
                 "All proteins", "Proteins in detail", "hook resid_post@2"):
        assert text in html, text
    cards = re.findall(r'<div class="protein" id="p(\d+)">', html)
    assert cards == ["0", "1", "2", "3"]
    assert "Not annotated (invalid)" in html and "invalid character" in html
    assert html.count('class="trk"') == 3  # figures for the three encoded proteins

    # Inline PNGs (heatmaps, colour bar) decode.
    uris = re.findall(r'(?:href|src)="data:image/png;base64,([^"]+)"', html)
    assert len(uris) >= 4
    for u in uris:
        assert read_png(base64.b64decode(u)).ndim == 3

    # matplotlib PNGs: valid images, file names derived from ids but safe.
    names = sorted(p.name for p in pngs.iterdir())
    assert "top_concepts.png" in names and "latent_histograms.png" in names
    assert sum(n.endswith(".tracks.png") for n in names) == 3
    assert sum(n.endswith(".heatmap.png") for n in names) == 3
    for n in names:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", n), n
        assert read_png((pngs / n).read_bytes()).shape[0] > 50
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_report_is_deterministic(annotated, tmp_path):
    a, b = tmp_path / "a.html", tmp_path / "b.html"
    write_report(annotated, a, png_dir=tmp_path / "pa")
    write_report(annotated, b, png_dir=tmp_path / "pb")
    assert a.read_bytes() == b.read_bytes()
    for p in (tmp_path / "pa").iterdir():
        assert p.read_bytes() == (tmp_path / "pb" / p.name).read_bytes(), p.name


def test_cli(annotated, tmp_path):
    from typer.testing import CliRunner

    from protsae_cli.cli.app import build_app

    out = tmp_path / "cli.html"
    res = CliRunner().invoke(build_app(), ["report", str(annotated), "-o", str(out), "--png-dir",
                                           str(tmp_path / "figs"), "--proteins", "P1"])
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert re.findall(r'<div class="protein" id="p(\d+)">', html) == ["0", "3"]  # both proteins named P1
    assert "wrote" in res.output and (tmp_path / "figs" / "top_concepts.png").exists()

    res = CliRunner().invoke(build_app(), ["report", str(annotated), "--max-proteins", "1"])
    assert res.exit_code == 0, res.output
    default = annotated.with_name("run.report.html")
    assert default.exists()
    assert len(re.findall(r'<div class="protein" id="p', default.read_text())) == 1


# ---------------------------------------------------------------------------------------------------------
# Synthetic files: scale, truncation, statistics
# ---------------------------------------------------------------------------------------------------------

D_SAE, K = 64, 6
CONCEPTS = [
    ConceptEntry(latent=2, concept_id="C:helix", name="helix", ontology_id="SO:0001117", threshold=0.3),
    ConceptEntry(latent=5, concept_id="C:site", name="binding <site>", ontology_id="GO:0005488", threshold=0.5),
    ConceptEntry(latent=5, concept_id="C:site2", name="alias of site", ontology_id="", threshold=0.5),
    ConceptEntry(latent=9, concept_id="C:never", name="never called", ontology_id="", threshold=50.0),
]


def synthetic(path: Path, n: int, seed: int = 0, concepts=CONCEPTS) -> Path:
    rng = np.random.default_rng(seed)
    with H5Writer(path, {"plm_model": "esm2_t6_8M_UR50D", "hook_point": "resid_post", "layer": 4,
                         "sae_id": "synthetic"}, concepts, D_SAE, K) as w:
        for i in range(n):
            if i % 17 == 5:
                w.write(ProteinResult.without_codes(i, f"inv{i}", "", "", "invalid", "bad residue", K))
                continue
            length = int(rng.integers(8, 120))
            seq = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), length))
            rows = length if i % 11 != 3 else max(1, length // 2)
            idx = np.full((rows, K), -1, np.int64)
            val = np.zeros((rows, K), np.float32)
            for r in range(rows):
                lat = rng.choice(D_SAE, K, replace=False)
                v = np.sort(rng.gamma(1.0, 0.4, K).astype(np.float16).astype(np.float32))[::-1]
                idx[r], val[r] = lat, v
            status = "truncated" if rows < length else "ok"
            w.write(ProteinResult(index=i, id=f"prot{i}", description=f"synthetic {i}", sequence=seq,
                                  status=status, status_detail="", idx=idx, val=val,
                                  segments=call_segments(idx, val, concepts, merge_gap=1)))
    return path


def test_many_proteins_default_selection_and_table(tmp_path):
    h5 = synthetic(tmp_path / "many.h5", 300)
    out = tmp_path / "many.html"
    s = write_report(h5, out)
    html = out.read_text()
    assert s.proteins_drawn == 50
    assert len(re.findall(r'<div class="protein" id="p', html)) == 50
    doc = parse(html)
    data = json.loads(next(text for attrs, text in doc.scripts if attrs.get("id") == "protein-data"))
    assert len(data["rows"]) == 300 and data["total"] == 300 and not data["truncated"]
    assert sum(r[9] for r in data["rows"]) == 50
    assert "Truncated: only residues" in html and 'fill="url(#hatch)"' in html
    assert_self_contained(html)

    write_report(h5, out, max_proteins=0, table_limit=100, scan_entries=500)
    html = out.read_text()
    data = json.loads(next(t for a, t in parse(html).scripts if a.get("id") == "protein-data"))
    assert len(data["rows"]) == 100 and data["truncated"] and data["total"] == 300
    assert "Sampled: the first" in html
    assert not re.findall(r'<div class="protein" id="p', html)


def test_selection_errors_and_ids_with_commas(tmp_path):
    h5 = synthetic(tmp_path / "sel.h5", 20)
    with pytest.raises(InputError, match=r"not in this file: 'nope'"):
        write_report(h5, tmp_path / "x.html", proteins=["prot1", "nope"])
    assert not (tmp_path / "x.html").exists()
    write_report(h5, tmp_path / "x.html", proteins=["prot2,prot4", "prot1"])
    assert re.findall(r'<div class="protein" id="p(\d+)">', (tmp_path / "x.html").read_text()) == ["1", "2", "4"]
    with pytest.raises(InputError, match="not a protsae annotation file|cannot open"):
        bogus = tmp_path / "bogus.h5"
        bogus.write_bytes(b"not hdf5")
        write_report(bogus, tmp_path / "y.html")
    assert not (tmp_path / "y.html").exists()


def test_segment_statistics_match_brute_force(tmp_path):
    h5 = synthetic(tmp_path / "stats.h5", 60, seed=4)
    with H5Annotations(h5) as ann:
        concepts = read_concepts(ann)
        omap = OrdinalMap(ann.proteins["index"])
        whole = scan_segments(ann, concepts, omap)
        chunked = scan_segments(ann, concepts, omap, chunk=7)   # exercises proteins straddling chunks
        table = ann.segment_table()
        ordinals = ann.proteins["index"]
    for stats, seg_pp, con_pp in (whole, chunked):
        by_key = {(s.latent, s.threshold): s for s in stats}
        for (lat, thr), s in by_key.items():
            sel = (table["latent"] == lat) & (table["threshold"] == np.float32(thr))
            assert s.segments == int(sel.sum())
            assert s.residues == int((table["end"][sel] - table["start"][sel] + 1).sum())
            assert s.proteins == len(set(table["protein_index"][sel].tolist()))
            if sel.any():
                assert s.max_act == pytest.approx(float(table["max_act"][sel].max()))
                best = {}
                for p, m in zip(table["protein_index"][sel], table["max_act"][sel]):
                    best[int(p)] = max(best.get(int(p), 0.0), float(m))
                want = sorted(best.items(), key=lambda t: (-t[1], t[0]))[:5]
                assert [(p, pytest.approx(m)) for m, p in s.top] == [(p, pytest.approx(m)) for p, m in want]
        # C:site and C:site2 share latent 5 at 0.5: one key carrying both entries.
        site = by_key[(5, 0.5)]
        assert {e.concept_id for e in site.entries} == {"C:site", "C:site2"}
        assert by_key[(9, 50.0)].segments == 0
        for pos, ordinal in enumerate(ordinals):
            mine = table["protein_index"] == ordinal
            assert seg_pp[pos] == int(mine.sum())
            keys = {(int(l), float(t)) for l, t in zip(table["latent"][mine], table["threshold"][mine])}
            assert con_pp[pos] == len(keys)
    assert [s.segments for s in whole[0]] == sorted((s.segments for s in whole[0]), reverse=True)


def test_sae_without_concepts(tmp_path):
    h5 = synthetic(tmp_path / "plain.h5", 5, concepts=[])
    out = tmp_path / "plain.html"
    write_report(h5, out, png_dir=tmp_path / "png")
    html = out.read_text()
    assert "no concepts bound to latents" in html
    assert "No concept was called on this protein" in html
    assert html.count('class="trk"') == 5  # heatmaps still drawn
    assert (tmp_path / "png" / "top_concepts.png").exists()


def test_png_encoder_round_trip():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (7, 13, 3), dtype=np.uint8)
    back = read_png(png_bytes(img))
    assert back.shape[:2] == (7, 13)
    assert np.array_equal((back[..., :3] * 255).round().astype(np.uint8), img)
