"""protsae report shows trust (issue #14.7): reliability on every lane, reference tracks from label files,
heatmap rows named by their latent's best concept and F1. Every check parses the written HTML."""

from __future__ import annotations

import logging
import re
from html.parser import HTMLParser
from pathlib import Path

import h5py
import numpy as np
import pytest

from protsae_cli.call.concepts import call_segments
from protsae_cli.errors import InputError
from protsae_cli.evaluate.pipeline import AnnotationSpec
from protsae_cli.report.plots import PLOT_W, REF_COLOR
from protsae_cli.report.html import ConceptRow, read_concepts, write_report
from protsae_cli.report.trust import heatmap_names
from protsae_cli.io.results import ProteinResult
from protsae_cli.sae.config import ConceptEntry
from protsae_cli.io.writers.h5 import H5Annotations, H5Writer
from tests.report.test_report import assert_self_contained

D_SAE, K = 64, 6
TM = ConceptEntry(latent=2, concept_id="PSC:0000101", name="transmembrane helix", threshold=0.3, kind="region",
                  precision=0.734, recall=0.75, f1=0.742, positives=12599, label_source="cv_02_a.fasta",
                  operating_point="f1", validation="1 file, 1301 proteins")
METAL = ConceptEntry(latent=5, concept_id="PSC:0000210", name="metal binding", threshold=0.5, kind="site",
                     precision=0.313, recall=0.141, f1=0.195, positives=811, label_source="metal.txt",
                     operating_point="f1")
REGION = ConceptEntry(latent=9, concept_id="PSC:0000100", name="transmembrane region", threshold=0.2)
CONCEPTS = [TM, METAL, REGION]
IDS = ["prot0", "sp|Q9XYZ1|TEST_HUMAN", "prot2", "prot3", "prot4", "prot5"]
WITHHELD = "PSC:0000230 small-molecule binding (precision 0.131 < 0.5)"


def write_h5(path: Path, ids=IDS, concepts=CONCEPTS, call_withheld: bool = False, seed: int = 0) -> dict[str, str]:
    """An annotation file with random codes, segments called from them, and a recorded calling policy."""
    rng = np.random.default_rng(seed)
    seqs = {}
    prov = {"plm_model": "esm2_t6_8M_UR50D", "hook_point": "resid_post", "layer": 4, "sae_id": "synthetic",
            "calling_policy": "withhold concepts with validation precision < 0.5 ...; --call-withheld "
                              + ("on: all called" if call_withheld else "off"),
            "concepts_withheld": "" if call_withheld else WITHHELD}
    with H5Writer(path, prov, concepts, D_SAE, K) as w:
        for i, pid in enumerate(ids):
            length = int(rng.integers(30, 90))
            seq = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), length))
            seqs[pid] = seq
            idx = np.stack([rng.choice(D_SAE, K, replace=False) for _ in range(length)]).astype(np.int64)
            val = np.sort(rng.gamma(1.0, 0.4, (length, K)).astype(np.float32), axis=1)[:, ::-1].copy()
            w.write(ProteinResult(index=i, id=pid, description="", sequence=seq, status="ok", status_detail="",
                                  idx=idx, val=val, segments=call_segments(idx, val, concepts, merge_gap=1)))
    return seqs


# ---------------------------------------------------------------------------------------------------------
# HTML parsing: per protein card, the SVG text rows and the tooltips of lanes / reference tracks
# ---------------------------------------------------------------------------------------------------------

class _Svg(HTMLParser):
    """Elements of one card: <text> (class, own text, tooltip, enclosing <g>), <g> with its tooltip, <rect>
    attributes (with the enclosing <g>), and the text of reference notes."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[dict] = []
        self.texts: list[dict] = []
        self.groups: list[dict] = []
        self.rects: list[dict] = []
        self.notes: list[str] = []
        self._title: list[str] | None = None

    def _group(self) -> dict | None:
        return next((el for el in reversed(self.stack) if el["tag"] == "g"), None)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "rect":
            self.rects.append({**a, "_g": self._group()})
            return
        if tag == "title":
            self._title = []
            return
        el = {"tag": tag, "class": a.get("class", "") or "", "text": "", "title": "", "attrs": a,
              "g": self._group()}
        self.stack.append(el)
        if tag == "text":
            self.texts.append(el)
        elif tag == "g":
            self.groups.append(el)

    def handle_startendtag(self, tag, attrs):
        if tag == "rect":
            self.rects.append({**dict(attrs), "_g": self._group()})

    def handle_endtag(self, tag):
        if tag == "title":
            if self.stack:
                self.stack[-1]["title"] = "".join(self._title or [])
            self._title = None
            return
        while self.stack:
            el = self.stack.pop()
            if el["tag"] == "div" and "refnote" in el["class"]:
                self.notes.append(el["text"])
            if el["tag"] == tag:
                break

    def handle_data(self, data):
        if self._title is not None:
            self._title.append(data)
        elif self.stack and self.stack[-1]["tag"] in ("text", "div"):
            self.stack[-1]["text"] += data


def cards(html: str) -> dict[int, _Svg]:
    """Protein position -> its parsed card."""
    out = {}
    for part in re.split(r'(?=<div class="protein" id="p\d+">)', html)[1:]:
        pos = int(re.match(r'<div class="protein" id="p(\d+)">', part).group(1))
        end = part.find("</section>")
        p = _Svg()
        p.feed(part if end < 0 else part[:end])
        out[pos] = p
    return out


def lanes(card: _Svg) -> list[tuple[str, str, str, str]]:
    """(concept label, reliability line, its class, lane tooltip) per predicted lane with a reliability line."""
    out = []
    for g in card.groups:
        mine = [t for t in card.texts if t["g"] is g]
        if len(mine) == 2 and mine[0]["class"] == "lane" and mine[1]["class"].startswith("lnote"):
            out.append((mine[0]["text"], mine[1]["text"], mine[1]["class"], g["title"]))
    return out


def ref_tracks(card: _Svg) -> list[tuple[str, str, str]]:
    """(label, tooltip, colour of the label's swatch) per reference track."""
    out = []
    for g in card.groups:
        if g["class"] != "ref":
            continue
        label = next(t["text"] for t in card.texts if t["g"] is g)
        swatch = next(r for r in card.rects if r["_g"] is g)
        out.append((label, g["title"], swatch.get("fill", "")))
    return out


def ref_bars(card: _Svg, title_start: str) -> list[tuple[float, float]]:
    """(x, width) of the labelled-residue bars of the reference track whose tooltip starts so."""
    g = next(g for g in card.groups if g["class"] == "reftrack" and g["title"].startswith(title_start))
    inner = [x for x in card.groups if x["g"] is g]
    return [(float(r["x"]), float(r["width"])) for r in card.rects if r.get("class") == "rb" and r["_g"] in inner]


def heat_rows(card: _Svg) -> list[str]:
    return [t["text"] for t in card.texts if t["class"] == "hrow"]


def report(tmp_path: Path, h5: Path, **kw) -> tuple[str, dict[int, _Svg]]:
    out = tmp_path / "r.html"
    write_report(h5, out, top_latents=D_SAE, progress=False, **kw)
    html = out.read_text(encoding="utf-8")
    return html, cards(html)


def called_residues(h5: Path, pos: int, latent: int, length: int) -> np.ndarray:
    with H5Annotations(h5) as ann:
        mask = np.zeros(length, bool)
        for s in ann.segments(pos):
            if s.latent == latent:
                mask[s.start - 1:s.end] = True
    return mask


# ---------------------------------------------------------------------------------------------------------
# 1. Reliability on every lane and in the concept table
# ---------------------------------------------------------------------------------------------------------

def test_lanes_show_reliability(tmp_path):
    h5 = tmp_path / "run.h5"
    write_h5(h5)
    html, cs = report(tmp_path, h5)
    seen = {}
    for card in cs.values():
        for label, note, cls, title in lanes(card):
            seen.setdefault(label, (note, cls, title))
    assert set(seen) == {"transmembrane helix", "metal binding", "transmembrane region"}
    note, cls, title = seen["transmembrane helix"]
    assert note == "P 0.734 \u00b7 R 0.750 \u00b7 F1 0.742" and cls == "lnote"
    for text in ("threshold 0.3", "operating point f1", "region concept", "validation precision 0.734",
                 "recall 0.750", "F1 0.742", "12,599 positive residues", "labels: cv_02_a.fasta",
                 "validation proteins: 1 file, 1301 proteins", "called: passes the calling floors"):
        assert text in title, text
    note, cls, title = seen["metal binding"]
    assert note.endswith("below floor") and cls == "lnote warn"
    assert "below the default floors (precision 0.313 < 0.5)" in title and "labels: metal.txt" in title
    note, cls, title = seen["transmembrane region"]
    assert note == "reliability not measured" and cls == "lnote warn"
    assert "not measured" in title and "validation precision" not in title
    # Nothing else in the figures carries reliability text (it belongs to its lane).
    stray = [t["text"] for c in cs.values() for t in c.texts if t["class"] == "muted" and "F1" in t["text"]]
    assert not stray
    _, few = report(tmp_path, h5, max_lanes=1)
    muted = [t["text"] for c in few.values() for t in c.texts if t["class"] == "muted"]
    assert muted and all(re.fullmatch(r"\+\d+ more concepts \(see segment table\)", m) for m in muted)

    # The concept table carries the same numbers; the withheld concept is listed with its reason.
    section = html[html.index('id="concepts"'):html.index('id="latents"')]
    assert "P 0.734 \u00b7 R 0.750 \u00b7 F1 0.742" in section and "12,599 pos." in section
    assert "labels: cv_02_a.fasta" in section and "below floor" in section and "not measured" in section
    assert "Withheld" in section and "PSC:0000230 small-molecule binding (precision 0.131 &lt; 0.5)" in section


def test_every_concept_withheld(tmp_path):
    """An SAE whose every concept was withheld is not reported as one without concepts."""
    h5 = tmp_path / "none.h5"
    write_h5(h5, concepts=[])
    html, _ = report(tmp_path, h5)
    section = html[html.index('id="concepts"'):html.index('id="latents"')]
    assert "Every concept of this SAE was withheld" in section and "small-molecule binding" in section
    assert "no concepts bound to latents" not in section


def test_call_withheld_run_says_so(tmp_path):
    h5 = tmp_path / "forced.h5"
    write_h5(h5, call_withheld=True)
    _, cs = report(tmp_path, h5)
    titles = [t for c in cs.values() for lab, _, _, t in lanes(c) if lab == "metal binding"]
    assert titles and all("called because of --call-withheld" in t for t in titles)


def test_file_without_reliability_columns_says_not_measured(tmp_path):
    """Files annotate wrote before the reliability columns existed still render, saying "not measured"."""
    h5 = tmp_path / "old.h5"
    write_h5(h5)
    with h5py.File(h5, "r+") as f:
        g = f["concepts"]
        for name in ("kind", "precision", "recall", "f1", "positives", "label_source", "operating_point",
                     "validation", "score_activation", "score_probability"):
            del g[name]
        for key in ("calling_policy", "concepts_withheld"):
            del f.attrs[key]
    with H5Annotations(h5) as ann:
        rows = read_concepts(ann)
    assert [(r.concept_id, r.precision, r.f1, r.positives) for r in rows] == [
        ("PSC:0000101", None, None, 0), ("PSC:0000210", None, None, 0), ("PSC:0000100", None, None, 0)]
    html, cs = report(tmp_path, h5)
    notes = {note for c in cs.values() for _, note, _, _ in lanes(c)}
    assert notes == {"reliability not measured"}
    assert "P 0." not in html and "records no calling policy" in html


# ---------------------------------------------------------------------------------------------------------
# 2. Reference tracks (report --annotations)
# ---------------------------------------------------------------------------------------------------------

def test_reference_tracks_under_the_right_proteins(tmp_path, caplog):
    h5 = tmp_path / "run.h5"
    seqs = write_h5(h5)
    s3 = seqs["prot3"]
    tm = tmp_path / "tm.fasta"   # TMbed: prot3 has a helix at 6-17 and one unresolved residue; ghost1 is elsewhere
    tm.write_text(f">prot3|EUKARYA|NO_SP|0\n{s3}\n{'1' * 5 + 'H' * 12 + '2' * (len(s3) - 18) + 'U'}\n"
                  ">ghost1|EUKARYA|NO_SP|0\nMKV\n111\n")
    zn = tmp_path / "zinc.tsv"  # generic TSV: zinc binding on the protein stored as sp|Q9XYZ1|TEST_HUMAN
    zn.write_text("Q9XYZ1\t4\t6\tPSC:0000211\nQ9XYZ1\t9\t9\tX:odd\t<b>odd</b> & name\n")
    specs = [AnnotationSpec([str(tm)], "tmbed"), AnnotationSpec([str(zn)], "auto")]
    with caplog.at_level(logging.WARNING, logger="protsae.report"):
        html, cs = report(tmp_path, h5, png_dir=tmp_path / "png", annotations=specs)
    assert any("ghost1" in r.getMessage() and "not in" in r.getMessage() and str(tm) in r.getMessage()
               for r in caplog.records)

    assert {p for p, c in cs.items() if ref_tracks(c)} == {1, 3}
    tracks3 = {lab: (title, color) for lab, title, color in ref_tracks(cs[3])}
    # Concepts the run calls first, in the protein's lane order, then the file's other concepts by id.
    called_first = [f"{lab} (implied)" if lab == "transmembrane region" else lab for lab, *_ in lanes(cs[3])
                    if lab in ("transmembrane helix", "transmembrane region")]
    assert list(tracks3) == [*called_first, "cytoplasmic side", "extracellular or lumenal side"]
    assert "transmembrane helix" in called_first and "transmembrane region (implied)" in called_first
    # Residues 6-17 labelled: one bar at x = 5 px-per-residue, 12 residues wide.
    px = PLOT_W / len(s3)
    (x, w), = ref_bars(cs[3], "transmembrane helix")
    assert x == pytest.approx(5 * px, abs=0.06) and w == pytest.approx(12 * px, abs=0.06)
    # The track of a called concept has its lane's colour and compares calls with labels on this protein.
    lane_colors = {r["fill"] for r in cs[3].rects if r.get("width") == "4" and r["_g"] and not r["_g"]["class"]}
    title, color = tracks3["transmembrane helix"]
    assert color in lane_colors and color != REF_COLOR
    called = called_residues(h5, 3, TM.latent, len(s3))
    lab = np.zeros(len(s3), bool)
    lab[5:17] = True
    assert (f"called on this protein: {int(called.sum())} residues; {int((called & lab).sum())} of the 12 "
            "labelled residues called") in title
    side_title, side_color = tracks3["cytoplasmic side"]
    assert side_title.startswith("cytoplasmic side (PSC:0000111)\nreference labels from tm.fasta (tmbed): 5 residues")
    assert "called on this protein" not in side_title and side_color == REF_COLOR
    assert any(r.get("fill") == "url(#hatch)" for r in cs[3].rects)  # the unresolved residue

    # The zinc label, matched through the |-separated id, also shows as the metal-binding concept it implies.
    tracks1 = [lab for lab, _, _ in ref_tracks(cs[1])]
    assert tracks1 == ["metal binding (implied)", "zinc binding", "<b>odd</b> & name"]  # then by concept id
    assert "<b>odd</b>" not in html and "&lt;b&gt;odd&lt;/b&gt; &amp; name" in html  # label data is escaped
    assert (tmp_path / "png" / "000003_prot3.tracks.png").exists()
    assert_self_contained(html)
    again = tmp_path / "again.html"
    write_report(h5, again, top_latents=D_SAE, progress=False, annotations=specs)
    assert again.read_text(encoding="utf-8") == html  # deterministic with overlays too


def test_reference_length_mismatch_and_protein_level_terms(tmp_path, caplog):
    h5 = tmp_path / "run.h5"
    seqs = write_h5(h5)
    other = "M" * (len(seqs["prot2"]) + 3)
    tm = tmp_path / "tm.fasta"
    tm.write_text(f">prot2|EUKARYA|NO_SP|0\n{other}\n{'H' * len(other)}\n")
    go = tmp_path / "go.tsv"
    go.write_text("prot0\tGO:0005524,GO:0046872\n")
    with caplog.at_level(logging.WARNING):
        _, cs = report(tmp_path, h5, annotations=[AnnotationSpec([str(tm)], "tmbed"),
                                                  AnnotationSpec([str(go)], "go-tsv")])
    assert not [r for r in caplog.records if "--ontology" in r.getMessage()]  # report has no such option
    assert not ref_tracks(cs[2])
    assert any(f"sequence of {len(other)} residues" in n and "Not drawn" in n for n in cs[2].notes)
    assert any("go.tsv" in n and "GO:0005524" in n and "GO:0046872" in n for n in cs[0].notes)
    assert not cs[4].notes and not ref_tracks(cs[4])
    # Labelled proteins that are not drawn: the page says how to draw them.
    html, cs = report(tmp_path, h5, max_proteins=1, annotations=[AnnotationSpec([str(tm)], "tmbed")])
    assert list(cs) == [0] and "labels 1 of the file's protein ids, 0 of them drawn here" in html
    assert "draw others with <code>--proteins prot2</code>" in html


def test_reference_file_matching_no_protein_is_an_error(tmp_path):
    h5 = tmp_path / "run.h5"
    write_h5(h5)
    bad = tmp_path / "binding_metal.txt"
    bad.write_text("P99999\t1,2\nQ88888\t3\n")
    with pytest.raises(InputError, match=re.escape(str(bad)) + r".*none of its 2 labelled proteins.*P99999"):
        write_report(h5, tmp_path / "x.html", annotations=[AnnotationSpec([str(bad)], "binding")], progress=False)
    assert not (tmp_path / "x.html").exists()


def test_cli_annotations(tmp_path, capsys, drop_cli_log_handlers):
    from typer.testing import CliRunner

    from protsae_cli.cli.app import build_app, main

    h5 = tmp_path / "run.h5"
    seqs = write_h5(h5)
    tm = tmp_path / "labels.fasta"
    tm.write_text(f">prot4|X|NO_SP|0\n{seqs['prot4']}\n{'2' * len(seqs['prot4'])}\n")
    out = tmp_path / "cli.html"
    res = CliRunner().invoke(build_app(), ["report", str(h5), "-o", str(out), "-a", str(tm),
                                           "--annotation-format", "tmbed", "--no-progress"])
    assert res.exit_code == 0, res.output
    cs = cards(out.read_text())
    assert [lab for lab, _, _ in ref_tracks(cs[4])] == ["extracellular or lumenal side"]
    assert {p for p, c in cs.items() if ref_tracks(c)} == {4}

    # Errors a user can act on, with the documented exit code (3: bad input) from the real entry point.
    def run_main(args: list[str]) -> int:
        with pytest.raises(SystemExit) as e:
            main(args)
        return int(e.value.code or 0)

    assert run_main(["report", str(h5), "-o", str(out), "-a", str(tm), "-a", str(tm),
                     *["--annotation-format", "tmbed"] * 3]) == 3
    assert "2 --annotations values but 3 --annotation-format values" in capsys.readouterr().err
    empty = tmp_path / "elsewhere.fasta"
    empty.write_text(">zzz|X|NO_SP|0\nMK\n22\n")
    assert run_main(["report", str(h5), "-o", str(out), "-a", str(empty)]) == 3
    err = capsys.readouterr().err
    assert str(empty) in err and "none of its 1 labelled proteins" in err


# ---------------------------------------------------------------------------------------------------------
# 3. Heatmap rows
# ---------------------------------------------------------------------------------------------------------

def test_heatmap_rows_name_best_concept_and_f1(tmp_path):
    h5 = tmp_path / "run.h5"
    write_h5(h5)
    _, cs = report(tmp_path, h5)
    want = {2: "L2 \u00b7 transmembrane helix \u00b7 F1 0.742", 5: "L5 \u00b7 metal binding \u00b7 F1 0.195",
            9: "L9 \u00b7 transmembrane region"}
    found = set()
    for card in cs.values():
        for row in heat_rows(card):
            latent = int(re.match(r"L(\d+)", row).group(1))
            assert row == want.get(latent, f"L{latent}"), row
            found.add(latent)
    assert {2, 5, 9} <= found


def test_heatmap_names_pick_best_f1_and_keep_it_visible():
    def row(latent, cid, name, f1):
        return ConceptRow(latent, cid, name, "", 0.1, f1=f1, precision=f1, recall=f1, positives=100)

    rows = [row(7, "C:a", "weak concept", 0.21), row(7, "C:b", "strong concept", 0.81),
            row(8, "C:c", "a very long concept name that would push the F1 out of view", 0.5),
            row(9, "C:d", "never measured", None)]
    names = heatmap_names(rows)
    assert names[7][0] == "strong concept +1 \u00b7 F1 0.810" and "weak concept" in names[7][1]
    label = f"L8 \u00b7 {names[8][0]}"
    assert len(label) <= 40 and label.endswith("\u2026 \u00b7 F1 0.500")
    assert names[9][0] == "never measured" and "not measured" in names[9][1]
