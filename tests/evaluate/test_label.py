"""`protsae label` (protsae_cli/evaluate/label.py): latents of any SAE bound to labelled concepts, written as a protsae SAE
directory that `annotate` calls from without foreign flags.

The labels are synthetic membrane proteins a random tiny ESM-2 can represent: transmembrane helices are runs of
18-22 hydrophobic residues (TMbed `H`), the rest polar residues on alternating sides (`1`/`2`), so a latent
that tracks hydrophobic residues is a transmembrane-helix latent.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from protsae_cli.labels.formats import TM_HELIX
from protsae_cli.cli.app import build_app
from protsae_cli.errors import InputError, OutputError
from tests.conftest import TINY_DIM

pytestmark = pytest.mark.usefixtures("drop_cli_log_handlers", "one_thread")

HYDROPHOBIC, POLAR = "LLLLLLIVAF", "DEKRNQSTGHPY"


def membrane_proteins(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(id, sequence, TMbed labels): 1-3 helices of 18-22 residues between polar loops of 12-30; every fourth
    protein soluble (no helix). About a third of the residues are helix."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        seq, lab, side = [], [], "1"
        for h in range(0 if i % 4 == 3 else rng.randint(1, 3)):
            loop = rng.randint(12, 30)
            seq += rng.choices(POLAR, k=loop); lab += side * loop
            tm = rng.randint(18, 22)
            seq += rng.choices(HYDROPHOBIC, k=tm); lab += "H" * tm
            side = "2" if side == "1" else "1"
        loop = rng.randint(12, 30)
        seq += rng.choices(POLAR, k=loop); lab += side * loop
        out.append((f"M{seed}_{i}", "".join(seq), "".join(lab)))
    return out


def write_set(d: Path, name: str, prots: list[tuple[str, str, str]]) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    fasta, tmbed = d / f"{name}.fasta", d / f"{name}.3line"
    fasta.write_text("".join(f">{i}\n{s}\n" for i, s, _ in prots))
    tmbed.write_text("".join(f">{i}|EUKARYA|NO_SP|0\n{s}\n{l}\n" for i, s, l in prots))
    return fasta, tmbed


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("label_sets")
    return {"train": write_set(d, "train", membrane_proteins(40, seed=1)),
            "heldout": write_set(d, "heldout", membrane_proteins(20, seed=2))}


def _spec(tmbed: Path):
    from protsae_cli.evaluate.pipeline import AnnotationSpec

    return [AnnotationSpec([str(tmbed)], "tmbed")]


def _concepts(out: Path) -> dict[str, dict]:
    cfg = json.loads((out / "config.json").read_text())
    return {c["concept_id"]: c for c in cfg["concepts"]}


def test_label_names_a_tm_helix_latent_of_a_freshly_trained_topk_sae(sets, tiny_esm_path, tmp_path):
    """The issue's test: a TopK SAE trained without labels, labelled on its labelled training proteins, has a
    transmembrane-helix latent whose validation F1 is in the concept table and holds up on held-out proteins."""
    from protsae_cli.evaluate.calibrate import CalibrateOptions, calibrate
    from protsae_cli.evaluate.label import LabelOptions, label_sae
    from protsae_cli.train.pipeline import TrainOptions, train_sae
    from protsae_cli.train.trainer import TrainConfig

    t0 = time.perf_counter()
    fasta, tmbed = sets["train"]
    sae = train_sae(TrainOptions(
        fasta=str(fasta), output=str(tmp_path / "topk"), model=str(tiny_esm_path), layer=2, d_sae=64, k=8,
        tokens_per_protein=64, val_fraction=0.2, device="cpu", progress=False,
        train=TrainConfig(d_sae=64, k=8, lr=1e-2, batch_size=256, max_steps=200, seed=0, eval_every=50)))
    assert json.loads((sae / "config.json").read_text())["concepts"] == []
    out = tmp_path / "topk_labelled"
    report = label_sae(LabelOptions(sae=str(sae), fasta=str(fasta), annotations=_spec(tmbed), output=str(out),
                                    model=str(tiny_esm_path), device="cpu", progress=False))
    tm = _concepts(out)[TM_HELIX]
    assert tm["name"] == "transmembrane helix" and tm["kind"] == "region"
    assert tm["label_source"] == tmbed.name and tm["operating_point"] == "f1" and tm["source"] == "protsae label"
    # Calling every residue would give precision = the helix share (about a third) and F1 about 0.5.
    share = sum(l.count("H") for _, _, l in membrane_proteins(40, seed=1)) / sum(
        len(l) for _, _, l in membrane_proteins(40, seed=1))
    assert tm["precision"] > share + 0.3 and tm["f1"] > 0.65 and tm["recall"] > 0.4, (share, tm)
    assert tm["positives"] > 100 and "validation proteins" in tm["validation"] and tm["score_curve"]
    row = next(r for r in report["per_concept"] if r["concept"] == TM_HELIX)
    assert row["latent"] == tm["latent"] and row["f1"] == tm["f1"]
    assert report["split"]["association"] + report["split"]["validation"] == 40
    assert [c["latent"] for c in row["candidates"]] == [tm["latent"]]  # default: InterPLM's best latent
    # With several candidates the validation part picks the one whose best-F1 threshold scores highest; the
    # association ranking (same split) starts with the default's latent.
    rep5 = label_sae(LabelOptions(sae=str(sae), fasta=str(fasta), annotations=_spec(tmbed), output=str(tmp_path / "c5"),
                                  model=str(tiny_esm_path), device="cpu", progress=False, candidates=5))
    r5 = next(r for r in rep5["per_concept"] if r["concept"] == TM_HELIX)
    assert len(r5["candidates"]) >= 2 and r5["candidates"][0]["latent"] == tm["latent"]
    best = max(r5["candidates"], key=lambda c: c["validation_f1"])
    assert (r5["latent"], r5["f1"]) == (best["latent"], best["validation_f1"])
    # The same weights byte for byte, and the association/validation split recorded.
    assert (out / "sae.safetensors").read_bytes() == (sae / "sae.safetensors").read_bytes()
    assert json.loads((out / "label_report.json").read_text())["per_concept"] == report["per_concept"]
    # The table's numbers are calibrate's on the validation part: measuring them there gives them back.
    vids = set(report["split"]["validation_ids"])
    assert len(vids) == report["split"]["validation"] and not vids & set(report["split"]["association_ids"])
    vfasta = tmp_path / "validation.fasta"
    vfasta.write_text("".join(f">{i}\n{s}\n" for i, s, _ in membrane_proteins(40, seed=1) if i in vids))
    again = calibrate(CalibrateOptions(sae=str(out), fasta=str(vfasta), annotations=_spec(tmbed),
                                       model=str(tiny_esm_path), device="cpu", measure_only=True))
    vrow = next(r for r in again["per_concept"] if r["concept"] == TM_HELIX)
    assert (round(vrow["after"]["f1"], 4), vrow["positives"]) == (tm["f1"], tm["positives"])
    # Held out: proteins neither training nor labelling saw; the latent and threshold hold up there.
    hfasta, htmbed = sets["heldout"]
    held = calibrate(CalibrateOptions(sae=str(out), fasta=str(hfasta), annotations=_spec(htmbed), model=str(tiny_esm_path),
                                      device="cpu", measure_only=True))
    hrow = next(r for r in held["per_concept"] if r["concept"] == TM_HELIX)
    assert hrow["after"]["f1"] > 0.65 and hrow["after"]["precision"] > share + 0.3, (tm, hrow)
    print(f"TM helix latent {tm['latent']}: validation F1 {tm['f1']}, held-out F1 {hrow['after']['f1']:.4f}; "
          f"{time.perf_counter() - t0:.1f} s")


def _interprot_file(d: Path) -> Path:
    """InterProt's TopK SAE (per-residue layer norm: not affine, saved as arch foreign_topk)."""
    from tests.sae.test_foreign_sae import N, _rand

    f = d / f"esm2_plm{TINY_DIM}_l2_sae{N}_k7_auxk16.pt"
    torch.save({"w_enc": _rand(TINY_DIM, N, seed=20, scale=0.3), "w_dec": _rand(N, TINY_DIM, seed=21),
                "b_enc": _rand(N, seed=22), "b_pre": _rand(TINY_DIM, seed=23, scale=0.1)}, f)
    return f


def _interplm_file(d: Path) -> Path:
    """InterPLM's published ReLU AutoEncoder (affine once its rescale is folded in: saved as arch topk)."""
    from tests.sae.test_foreign_sae import _interplm_relu_state

    f = d / "layer_2" / "ae_normalized.pt"
    f.parent.mkdir()
    torch.save(_interplm_relu_state(), f)
    return f


@pytest.mark.parametrize("fmt, build, flags, arch", [
    ("interprot", _interprot_file, [], "foreign_topk"),
    ("interplm", _interplm_file, ["--sae-k", "8"], "topk"),
])
def test_a_published_sae_is_labelled_and_annotate_names_its_concepts_without_foreign_flags(
        fmt, build, flags, arch, sets, tiny_esm_path, tiny_plm, tmp_path):
    from protsae_cli.sae.foreign import with_options
    from tests.sae.test_foreign_sae import _codes

    fasta, tmbed = sets["train"]
    f = build(tmp_path)
    out = tmp_path / f"{fmt}_labelled"
    res = CliRunner().invoke(build_app(), [
        "label", "--sae", str(f), *flags, "--sae-plm", tiny_plm.name, str(fasta), "-a", str(tmbed),
        "--annotation-format", "tmbed", "-o", str(out), "--model", str(tiny_esm_path), "--device", "cpu",
        "--no-progress"])
    assert res.exit_code == 0, (res.output, res.exception)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"] == arch and cfg["training"]["imported_from"] == fmt
    assert cfg["plm"]["sha256"] == tiny_plm.sha256 and cfg["training"]["label"]["split"]["validation"] > 0
    if arch == "foreign_topk":
        assert cfg["foreign"] == {"row_norm": "layer_norm", "threshold": False, "post_scale": False,
                                  "source_format": "interprot"}
    named = _concepts(out)
    assert TM_HELIX in named and all(c["precision"] is not None and c["kind"] for c in named.values())
    # The saved SAE computes the same codes as the published file read with its flags.
    k = ["8"] if flags else []
    spec = with_options(str(f), plm=tiny_plm.name, k=int(k[0]) if k else None)
    hfasta, _ = sets["heldout"]
    for (ia, va), (ib, vb) in zip(_codes(tiny_esm_path, str(out), hfasta), _codes(tiny_esm_path, spec, hfasta)):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_allclose(va, vb, rtol=1e-6, atol=1e-6)
    # annotate --sae OUT: no --sae-layer/--sae-plm/--sae-k, and the calls carry the concept names.
    prefix = tmp_path / "ann"
    res = CliRunner().invoke(build_app(), [
        "annotate", str(hfasta), "--sae", str(out), "--model", str(tiny_esm_path), "--device", "cpu",
        "--formats", "tsv", "--call-withheld", "--decode", "none", "-o", str(prefix), "--no-progress"])
    assert res.exit_code == 0, (res.output, res.exception)
    rows = [ln.split("\t") for ln in (tmp_path / "ann.tsv").read_text().splitlines() if not ln.startswith("#")]
    assert rows and {r[6] for r in rows} <= {c["name"] for c in named.values()}
    assert "transmembrane helix" in {r[6] for r in rows}


def test_output_rules_and_unmatched_labels(sets, tiny_esm_path, tiny_sae_dir, tmp_path):
    """A non-empty -o needs --force (checked before any model loads) and is then replaced whole; -o may not be
    the --sae itself; labels that match no protein are exit 3 naming the label file."""
    from protsae_cli.evaluate.label import LabelOptions, label_sae

    fasta, tmbed = sets["train"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    opts = dict(sae=str(tiny_sae_dir), fasta=str(fasta), annotations=_spec(tmbed), output=str(out),
                model=str(tiny_esm_path), device="cpu", progress=False)
    with pytest.raises(OutputError, match=r"not empty; pass --force"):
        label_sae(LabelOptions(**opts))
    label_sae(LabelOptions(**opts, force=True))
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or old directory left
    with pytest.raises(InputError, match="is where the --sae"):
        label_sae(LabelOptions(**{**opts, "output": str(tiny_sae_dir)}, force=True))
    other = tmp_path / "other.3line"
    other.write_text(">X1|EUKARYA|NO_SP|0\n" + "MK" + "L" * 21 + "KD\n" + "1" * 2 + "H" * 21 + "2" * 2 + "\n")
    with pytest.raises(InputError, match=r"other\.3line: none of its proteins is in .*train\.fasta \(40 proteins\)"):
        label_sae(LabelOptions(**{**opts, "output": str(tmp_path / "new"), "annotations": _spec(other)}))
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("kind", ["topk_rescaled", "jumprelu_sqrt_d"])
def test_foreign_topk_directory_round_trip(kind, tiny_plm, tmp_path):
    """What `label` saves for a non-affine published SAE (arch foreign_topk: row norm, JumpReLU thresholds, a
    rescale after TopK) loads back computing the same codes and reconstructions; a wrong flag is refused."""
    from protsae_cli.sae.foreign import with_options
    from protsae_cli.sae.checkpoint import load_sae, save_sae
    from tests.sae.test_foreign_sae import N, _g, _rand

    D = TINY_DIM
    if kind == "topk_rescaled":
        st = {"k": torch.tensor(6, dtype=torch.int), "threshold": torch.tensor(-1.0),
              "encoder.weight": _rand(N, D, seed=5, scale=0.3), "encoder.bias": _rand(N, seed=6, scale=0.3),
              "decoder.weight": _rand(D, N, seed=7), "b_dec": _rand(D, seed=8, scale=0.1),
              "activation_rescale_factor": torch.rand(N, generator=_g(9)) * 3 + 0.5}
        spec_k = None
    else:
        st = {"encoder.weight": _rand(N, D, seed=10, scale=0.3), "encoder.bias": _rand(N, seed=11, scale=0.3),
              "decoder.weight": _rand(D, N, seed=12), "decoder.bias": _rand(D, seed=13, scale=0.1),
              "threshold": torch.rand(N, generator=_g(14)) * 0.5, "normalize_to_sqrt_d": torch.tensor(True)}
        spec_k = 9
    f = tmp_path / "ae.pt"
    torch.save(st, f)
    sae, _ = load_sae(with_options(str(f), layer=2, plm=tiny_plm.name, k=spec_k))
    assert not sae.supports_affine_encode
    sae.cfg = sae.protsae_config()
    back, _ = load_sae(save_sae(sae, tmp_path / "saved"))
    assert type(back) is type(sae) and back.row_norm == sae.row_norm and back.source_format == "interplm"
    x = _rand(50, D, seed=99, scale=2.0)
    for a, b in zip(sae.encode(x), back.encode(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(sae(x), back(x))
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    cfg["foreign"]["row_norm"] = "rms"
    (tmp_path / "saved" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="foreign.row_norm must be one of"):
        load_sae(tmp_path / "saved")
