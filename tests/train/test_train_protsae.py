"""ProtSAE training from FASTA + annotation files: concept labels (missing is not negative, protein pooling),
concept selection, end-to-end training whose defined latents mean their concepts, and `annotate` with the
result."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from protsae_cli.train.activations import ActivationSet
from protsae_cli.annotate.pipeline import AnnotateOptions, annotate
from protsae_cli.cli.app import build_app
from protsae_cli.labels.concept_labels import build_concept_labels, concept_normal_forms, select_concepts
from protsae_cli.errors import InputError
from protsae_cli.plm.esm_forward import EsmRunner, HookPoint
from protsae_cli.labels.sets import ProteinLabels, ResidueLabelBuilder
from protsae_cli.labels.ontology import Ontology
from protsae_cli.plm.loading import load_plm
from protsae_cli.sae.checkpoint import load_sae
from protsae_cli.sae.config import SAEConfig
from protsae_cli.train.protsae import prepare_concepts, train_protsae
from protsae_cli.train.trainer import TrainConfig
from tests.train_helpers import DNA, RULES, ZINC, proteins, write_concept_tsv, write_fasta


pytestmark = pytest.mark.usefixtures("drop_cli_log_handlers", "one_thread")


@pytest.fixture(scope="module")
def psc():
    from protsae_cli.models import concept_ontology_path

    return Ontology.from_obo(concept_ontology_path())


def cli(*args: str):
    res = CliRunner().invoke(build_app(), ["train", *args])
    return res


def common(fasta, out, esm) -> list[str]:
    return [str(fasta), "-o", str(out), "-m", str(esm), "--layer", "2", "--d-sae", "64", "--k", "4",
            "--tokens-per-protein", "32", "--val-fraction", "0.2", "--batch-size", "128", "--lr", "0.01",
            "--device", "cpu", "--no-progress", "--arch", "protsae"]


# -- end to end ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_esm_path):
    d = tmp_path_factory.mktemp("protsae")
    prots = proteins(60)
    fasta = write_fasta(d / "p.fasta", prots)
    tsv = write_concept_tsv(d / "concepts.tsv", prots)
    out = d / "sae"
    torch.set_num_threads(1)
    res = cli(*common(fasta, out, tiny_esm_path), "--annotations", str(tsv), "--annotation-format", "generic-tsv",
              "--min-concept-residues", "5", "--max-steps", "150", "--eval-every", "25")
    assert res.exit_code == 0, res.output
    return d, prots, fasta, out


def test_checkpoint_names_its_concepts(trained):
    _, _, _, out = trained
    sae, _ = load_sae(out)
    assert sae.cfg.arch == "protsae"
    by_id = {c.concept_id: c for c in sae.cfg.concepts}
    # the two annotated concepts and their ancestors in the shipped ontology; never the root
    assert set(by_id) == {ZINC, DNA, "PSC:0000210", "PSC:0000200", "PSC:0000240"}
    assert by_id[ZINC].name == "zinc binding" and by_id[ZINC].ontology_id == ZINC
    assert [c.latent for c in sae.cfg.concepts] == list(range(len(by_id)))
    assert all(c.source == "concepts.tsv" for c in sae.cfg.concepts)
    # residue labels: the recipe (calibrated cuts, defined latents admitted first, the predictor's own lr)
    o = sae.cfg.protsae
    assert (o["defined_bias"], o["topk_scope"], o["predictor_lr"]) == ("calibrated", "defined_first", 0.03)
    # each defined latent's cut was fitted on the validation proteins, is in the weights, and is recorded
    offs = sae.cfg.training["defined_offset_calibration"]
    assert offs["selected_step"] == sae.cfg.training["selected_step"]
    for c in sae.cfg.concepts:
        assert offs["per_concept"][c.concept_id]["offset"] == pytest.approx(float(sae.defined_offset[c.latent]))
    assert offs["per_concept"][ZINC]["valid_f1"] > 0.8
    # and the annotation threshold on top of the cut was calibrated and recorded too
    cal = sae.cfg.training["threshold_calibration"]["per_concept"]
    for c in sae.cfg.concepts:
        assert cal[c.concept_id]["threshold"] == c.threshold >= 0.0
        assert c.threshold <= cal[c.concept_id]["validation_max"]
    assert cal[ZINC]["valid_f1"] > 0.8
    assert sae.cfg.protsae["n_concepts"] == 5 and sae.cfg.protsae["n_zero_classes"] == 1  # the root
    log = json.loads((out / "training_log.json").read_text())
    assert log["selection"]["rule"] == "min (val l_annot, val nmse)"
    eligible = [e for e in log["evals"] if e["step"] >= 0.6 * 150]
    best = min(eligible, key=lambda e: (e["val"]["l_annot"], e["val"]["nmse"]))
    assert log["selection"]["selected_step"] == best["step"]
    assert log["concepts"] == [c.concept_id for c in sae.cfg.concepts]


def test_defined_latents_fire_on_annotated_residues(trained, tiny_esm_path):
    _, prots, _, out = trained
    sae, _ = load_sae(out)
    runner = EsmRunner(load_plm(str(tiny_esm_path)), "cpu")
    seqs = [s for _, s in prots]
    h = runner.hook_activations(runner.tokenizer.batch(seqs), HookPoint("resid_post", 2))
    latent = {c.concept_id: c.latent for c in sae.cfg.concepts}
    # "called" as annotate calls it: active and at or above the concept's calibrated threshold
    tau = torch.zeros(sae.cfg.d_sae)
    for c in sae.cfg.concepts:
        tau[c.latent] = c.threshold
    fired, residues = [], []
    for i, s in enumerate(seqs):
        idx, val = sae.encode(h[i, 1:len(s) + 1])
        on = (idx >= 0) & (val > 0) & (val >= tau[idx.clamp_min(0)])
        fired.append(torch.zeros(len(s), sae.cfg.d_sae, dtype=torch.bool).scatter(1, idx.clamp_min(0), on))
        residues += list(s)
    fired_all = torch.cat(fired)
    aa = np.array(residues)
    for concept, letters in RULES.items():
        pos = torch.from_numpy(np.isin(aa, list(letters)))
        col = fired_all[:, latent[concept]]
        rate_pos, rate_neg = col[pos].float().mean().item(), col[~pos].float().mean().item()
        assert rate_pos > 0.5 and rate_pos > 4 * rate_neg, (concept, rate_pos, rate_neg)


def test_annotate_calls_segments_named_after_the_concepts(trained, tiny_esm_path):
    d, _, fasta, out = trained
    annotate(AnnotateOptions(input=str(fasta), output_prefix=str(d / "ann"), model=str(tiny_esm_path), sae=str(out),
                             formats=("tsv",), device="cpu", progress=False))
    rows = list(csv.reader(open(d / "ann.tsv"), delimiter="\t"))
    col = {name.lstrip("#"): j for j, name in enumerate(rows[0])}
    names = {r[col["concept_name"]] for r in rows[1:]}
    assert {"zinc binding", "DNA binding"} <= names
    zinc = [r for r in rows[1:] if r[col["concept_id"]] == ZINC]
    seq = dict(proteins(60))
    hits = [seq[r[col["protein_id"]]][int(r[col["start"]]) - 1:int(r[col["end"]])] for r in zinc]
    frac = sum(ch in "CH" for h in hits for ch in h) / sum(len(h) for h in hits)
    assert frac > 0.8, frac


# -- labels -------------------------------------------------------------------------------------------------

def _residue_source(spec: dict[str, dict[str, list[int]]], lengths: dict[str, int], masked=None):
    b = ResidueLabelBuilder()
    for pid, per in spec.items():
        b.touch(pid)
        for c, pos in per.items():
            b.add_residues(pid, c, pos)
    for pid, pos in (masked or {}).items():
        b.add_masked(pid, pos)
    return b.build(lengths=lengths)


def test_unannotated_proteins_are_missing_not_negative():
    ids, seqs = ["A", "B", "C"], ["M" * 10, "M" * 8, "M" * 6]
    tm = _residue_source({"A": {"TM": [1, 2]}, "B": {}}, {"A": 10, "B": 8}, masked={"B": [5]})
    bind = _residue_source({"B": {"ZN": [3]}, "C": {"ZN": [0]}}, {"B": 8, "C": 6})
    labels = build_concept_labels([("tm", tm), ("bind", bind)], ids, seqs, ["TM", "ZN"])
    prot = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    pos = torch.tensor([1, 3, 3, 4, 5, 0, 1])
    y = labels.rows(prot, pos)
    nan = float("nan")
    expect = torch.tensor([[1, nan], [0, nan],      # A: annotated by tm only -> ZN unknown
                           [0, 1], [0, 0], [nan, 0],  # B: both; residue 5 masked in tm
                           [nan, 1], [nan, 0]])    # C: bind only -> TM unknown
    assert torch.equal(torch.isnan(y), torch.isnan(expect))
    assert torch.equal(torch.nan_to_num(y, -1), torch.nan_to_num(expect, -1))
    assert labels.prior(prot, pos).tolist() == pytest.approx([1 / 4, 2 / 5])


def test_comma_joined_files_are_one_source(tmp_path, psc):
    from protsae_cli.labels.sources import annotation_specs, load_label_sources

    seqs = {"A": "M" * 10, "B": "M" * 10}
    (tmp_path / "zn.tsv").write_text(f"A\t2\t2\t{ZINC}\n")
    (tmp_path / "dna.tsv").write_text(f"B\t3\t3\t{DNA}\n")
    files = [str(tmp_path / "zn.tsv"), str(tmp_path / "dna.tsv")]
    for entries, b_zinc in ((files, float("nan")), ([",".join(files)], 0.0)):
        sets = [(",".join(s.paths), s.labels)  # what train_sae hands to build_concept_labels
                for s in load_label_sources(annotation_specs(entries, ["generic-tsv"]), seqs, [psc])]
        lab = build_concept_labels(sets, ["A", "B"], list(seqs.values()), [ZINC, DNA], ontologies=[psc])
        y = lab.rows(torch.tensor([1, 1]), torch.tensor([2, 1]))
        assert torch.equal(torch.nan_to_num(y[:, 0], -1), torch.nan_to_num(torch.tensor([b_zinc] * 2), -1))
        assert y[:, 1].tolist() == [1.0, 0.0]
    assert lab.concept_entries()[0].source == "zn.tsv,dna.tsv"


def test_protein_granularity_pools_and_residue_granularity_broadcasts():
    ids, seqs = ["A", "B", "C"], ["M" * 10, "M" * 8, "M" * 6]
    go = ProteinLabels(concepts=["GO:1"], labels={"A": {"GO:1"}, "B": set()})
    zn = _residue_source({"A": {"ZN": [2]}, "B": {}}, {"A": 10, "B": 8})
    prot_lab = build_concept_labels([("go", go), ("zn", zn)], ids, seqs, ["GO:1", "ZN"], granularity="protein")
    y, pidx = prot_lab.batch(torch.tensor([2, 0, 0, 1]), torch.tensor([0, 1, 5, 2]))
    # distinct proteins of the batch (0, 1, 2), and each row's index into them
    assert pidx.tolist() == [2, 0, 0, 1]
    assert torch.equal(torch.nan_to_num(y, -1), torch.tensor([[1.0, 1.0], [0.0, 0.0], [-1.0, -1.0]]))
    res_lab = build_concept_labels([("go", go), ("zn", zn)], ids, seqs, ["GO:1", "ZN"], granularity="residue")
    y, pidx = res_lab.batch(torch.tensor([0, 0, 1, 2]), torch.tensor([1, 2, 0, 0]))
    assert pidx is None
    assert torch.equal(torch.nan_to_num(y, -1), torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [-1.0, -1.0]]))


def test_concept_selection(psc):
    ids = ["A", "B"]
    src = _residue_source({"A": {ZINC: list(range(10))}, "B": {DNA: [1, 2]}}, {"A": 50, "B": 50}).propagate(psc)
    sets = [("s", src)]
    auto = select_concepts(sets, ids, [0, 1], [psc], min_count=5)
    assert auto == ["PSC:0000200", "PSC:0000210", ZINC]  # DNA binding too rare; the root never
    assert select_concepts(sets, ids, [0, 1], [psc], concepts=["DNA binding", ZINC]) == [DNA, ZINC]
    with pytest.raises(InputError, match="no concept has at least 1000"):
        select_concepts(sets, ids, [0, 1], [psc], min_count=1000)
    with pytest.raises(InputError, match="no annotations"):
        select_concepts(sets, ids, [0, 1], [psc], concepts=["heme binding"])
    with pytest.raises(InputError, match="no positive"):
        select_concepts(sets, ids, [0], [psc], concepts=[DNA])  # B is not a training protein


def test_normal_forms_merge_ontologies(psc):
    go = Ontology.from_string("format-version: 1.2\n\n[Term]\nid: GO:1\nname: root\n\n"
                              "[Term]\nid: GO:2\nname: child\nis_a: GO:1\n")
    nf = concept_normal_forms([psc, go], [ZINC, "GO:2"])
    assert nf.class_ids[:2] == [ZINC, "GO:2"] and nf.n_concepts == 2
    axioms = set(nf.describe())
    assert f"{ZINC} SubClassOf PSC:0000210" in axioms and "GO:2 SubClassOf GO:1" in axioms


# -- Python API, protein-level labels -------------------------------------------------------------------------

def test_train_protsae_python_api_with_protein_labels():
    g = torch.Generator().manual_seed(0)
    d, n_prot, per = 16, 80, 20
    has = torch.rand(n_prot, generator=g) < 0.4
    direction = torch.randn(d, generator=g)
    x = torch.randn(n_prot * per, d, generator=g)
    prot = torch.arange(n_prot).repeat_interleave(per)
    x += 3 * has[prot, None].float() * direction  # proteins with the concept shift every residue
    ids = [f"P{i}" for i in range(n_prot)]
    acts = ActivationSet(x.half(), prot, torch.arange(per).repeat(n_prot), ids, ["M" * per] * n_prot, {})
    go = ProteinLabels(concepts=["GO:9"], labels={ids[i]: ({"GO:9"} if has[i] else set()) for i in range(n_prot)})
    train_idx, val_idx = np.arange(60), np.arange(60, 80)
    labels, nf = prepare_concepts([("go.tsv", go)], ids, acts.sequences, train_idx, min_count=3)
    assert labels.granularity == "protein" and labels.concepts == ["GO:9"]
    cfg = TrainConfig(d_sae=32, k=4, lr=3e-2, batch_size=200, max_steps=60, eval_every=20, state_every=None)
    sae, hist = train_protsae(acts.subset_proteins(train_idx), acts.subset_proteins(val_idx), labels,
                              SAEConfig(d_model=d, d_sae=32, k=4, protsae={"pool": "max"}), cfg, normal_forms=nf)
    assert sae.cfg.protsae["label_granularity"] == "protein" and sae.cfg.protsae["pool"] == "max"
    assert [c.concept_id for c in sae.cfg.concepts] == ["GO:9"]
    first, last = hist["evals"][0]["val"], hist["evals"][-1]["val"]
    assert last["l_annot"] < first["l_annot"] and last["l_annot"] < 0.3
    assert hist["best"]["step"] >= 0.6 * 60


# -- options and errors -----------------------------------------------------------------------------------------

def test_ablation_flags_reach_the_checkpoint(trained, tiny_esm_path, tmp_path):
    d, _, fasta, _ = trained
    out = tmp_path / "abl"
    res = cli(*common(fasta, out, tiny_esm_path), "-a", str(d / "concepts.tsv"), "--concepts",
              f"zinc binding,{DNA}", "--max-steps", "4", "--no-detach", "--no-r-pred", "--no-forced-activation",
              "--no-axiom", "--lambda-annot", "2", "--margin", "0.3", "--topk-scope", "unknown",
              "--defined-bias", "pred", "--predictor-lr", "0.02")
    assert res.exit_code == 0, res.output
    sae, _ = load_sae(out)
    o = sae.cfg.protsae
    assert [c.concept_id for c in sae.cfg.concepts] == [ZINC, DNA]
    assert (o["detach"], o["use_r_pred"], o["forced_activation"], o["use_axiom"]) == (False,) * 4
    assert (o["lambda_annot"], o["margin"], o["topk_scope"], o["defined_bias"]) == (2.0, 0.3, "unknown", "pred")
    assert o["predictor_lr"] == 0.02

    # annotate runs such a ProtSAE (defined latents outside TopK) with its own encode: k + m slots per residue,
    # the same codes as ProtSAE.encode; the fast affine backends refuse it by name instead of computing others.
    from protsae_cli.encode import get_encoder
    from protsae_cli.io.writers.h5 import H5Annotations

    with pytest.raises(InputError, match="use --backend torch or auto"):
        get_encoder("onnx", sae, "cpu")
    annotate(AnnotateOptions(input=str(fasta), output_prefix=str(tmp_path / "ann"), model=str(tiny_esm_path),
                             sae=str(out), formats=("h5",), device="cpu", progress=False))
    runner = EsmRunner(load_plm(str(tiny_esm_path)), "cpu")
    seq = proteins(60)[0][1]
    h = runner.hook_activations(runner.tokenizer.batch([seq]), HookPoint("resid_post", 2))[0, 1:len(seq) + 1]
    with torch.no_grad():
        want_i, want_v = sae.encode(h)
    with H5Annotations(tmp_path / "ann.h5") as ann:
        assert ann.k == sae.cfg.k + 2 == want_i.shape[1]
        got_i, got_v = ann.codes_topk(0)
    assert np.array_equal(got_i, want_i.numpy())
    np.testing.assert_allclose(got_v, want_v.numpy(), rtol=2e-3, atol=1e-3)  # stored as float16


def test_clear_errors(trained, tiny_esm_path, tmp_path):
    d, _, fasta, _ = trained
    res = cli(*common(fasta, tmp_path / "e1", tiny_esm_path), "--max-steps", "2")
    assert res.exit_code != 0 and "--annotations" in str(res.exception)
    res = cli(*common(fasta, tmp_path / "e2", tiny_esm_path), "-a", str(d / "concepts.tsv"),
              "--min-concept-residues", "100000", "--max-steps", "2")
    assert isinstance(res.exception, InputError) and "no concept has at least 100000" in str(res.exception)
    bad = tmp_path / "bad.tsv"
    bad.write_text("#id\tstart\tend\tconcept\nP0\t1\t2\tPSC:0000211\nP1\tx\t3\tPSC:0000211\n")
    res = cli(*common(fasta, tmp_path / "e3", tiny_esm_path), "-a", str(bad), "--annotation-format",
              "generic-tsv", "--max-steps", "2")
    assert isinstance(res.exception, InputError) and f"{bad}, line 3" in str(res.exception)
    other = tmp_path / "other.tsv"
    other.write_text("Q99\t1\t2\tPSC:0000211\n")
    res = cli(*common(fasta, tmp_path / "e4", tiny_esm_path), "-a", str(other), "--annotation-format",
              "generic-tsv", "--max-steps", "2")
    assert isinstance(res.exception, InputError) and "none of its proteins" in str(res.exception)


# -- threshold calibration ----------------------------------------------------------------------------------

class _OneLatentSAE(torch.nn.Module):
    """Stands in for a ProtSAE whose single defined latent's code is the input's first column (ReLU'd)."""

    n_concepts = 1

    def __init__(self, concepts):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.cfg = SAEConfig(d_model=2, d_sae=4, k=2, concepts=concepts)

    def encode(self, x):
        v = x[:, :1].clamp_min(0)
        idx = torch.where(v > 0, torch.zeros_like(v, dtype=torch.long), torch.full_like(v, -1, dtype=torch.long))
        return torch.cat([idx, torch.full_like(idx, 3)], 1), torch.cat([v, torch.full_like(v, 0.01)], 1)


class _Labels:
    granularity = "residue"

    def __init__(self, y):
        self.y = y

    def rows(self, protein, position):
        return self.y[position].unsqueeze(1)


@settings(max_examples=25, deadline=None)
@given(st.floats(0.1, 0.9), st.integers(0, 10_000))
def test_calibration_finds_the_separating_threshold(cut, seed):
    from protsae_cli.sae.config import ConceptEntry
    from protsae_cli.train.protsae import calibrate_thresholds

    g = torch.Generator().manual_seed(seed)
    n = 2000
    score = torch.rand(n, generator=g)
    y = (score >= cut).float()
    y[torch.rand(n, generator=g) < 0.1] = float("nan")  # unobserved residues count for neither side
    x = torch.stack([score * 5.0, torch.zeros(n)], 1)  # the latent's scale is not 1
    val = ActivationSet(x.half().float(), torch.zeros(n, dtype=torch.long), torch.arange(n), ["P"], ["M" * n], {})
    sae = _OneLatentSAE([ConceptEntry(latent=0, concept_id="C:1", name="c", threshold=0.0)])
    out = calibrate_thresholds(sae, val, _Labels(y), batch_size=333, bins=100)
    rec = out["per_concept"]["C:1"]
    z = val.acts[:, 0]
    obs = ~torch.isnan(y)
    called = (z >= rec["threshold"]) & (z > 0)
    tp = float((called & (y == 1) & obs).sum())
    f1 = 2 * tp / (float((called & obs).sum()) + float((y == 1).sum()))
    assert sae.cfg.concepts[0].threshold == rec["threshold"]
    assert abs(rec["valid_f1"] - f1) < 1e-9  # the recorded F1 is the F1 of annotate's rule at that threshold
    assert f1 > 0.97  # one grid step of 5.0 / 100 around the cut costs at most a few boundary residues
    assert abs(rec["threshold"] - 5.0 * cut) <= 5.0 / 100 + 1e-6


def test_calibration_keeps_thresholds_without_positives():
    from protsae_cli.sae.config import ConceptEntry
    from protsae_cli.train.protsae import calibrate_thresholds

    n = 50
    val = ActivationSet(torch.rand(n, 2), torch.zeros(n, dtype=torch.long), torch.arange(n), ["P"], ["M" * n], {})
    sae = _OneLatentSAE([ConceptEntry(latent=0, concept_id="C:1", name="c", threshold=0.25)])
    rec = calibrate_thresholds(sae, val, _Labels(torch.zeros(n)))["per_concept"]["C:1"]
    assert rec["valid_f1"] is None and rec["kept"] == "no positive validation residue"
    assert sae.cfg.concepts[0].threshold == 0.25


# -- calibrated cuts, the residue recipe, the predictor's learning rate --------------------------------------

def _one_concept_protsae(**opts):
    from protsae_cli.sae.protsae import ProtSAE
    from protsae_cli.sae.checkpoint import build_sae
    from protsae_cli.sae.config import ConceptEntry

    cfg = SAEConfig(d_model=2, d_sae=8, k=2, arch="protsae", protsae={"n_concepts": 1, **opts},
                    concepts=[ConceptEntry(latent=0, concept_id="C:1", name="c")])
    sae = build_sae(cfg)
    assert isinstance(sae, ProtSAE)
    with torch.no_grad():
        sae.W_pred.copy_(torch.tensor([[1.0, 0.0]]))  # the score W x~ is the first input column
    return sae


@settings(max_examples=20, deadline=None)
@given(st.floats(-2.0, 2.0), st.floats(0.0, 1.0), st.integers(0, 10_000))
def test_defined_offset_is_the_f1_optimal_cut(cut, noise, seed):
    from protsae_cli.train.protsae import calibrate_defined_offsets

    g = torch.Generator().manual_seed(seed)
    n = 3000
    score = 6 * torch.rand(n, generator=g) - 3  # negative scores too: the range is not [0, max]
    y = (score + noise * torch.randn(n, generator=g) >= cut).float()
    y[torch.rand(n, generator=g) < 0.1] = float("nan")
    val = ActivationSet(torch.stack([score, torch.zeros(n)], 1), torch.zeros(n, dtype=torch.long),
                        torch.arange(n), ["P"], ["M" * n], {})
    sae = _one_concept_protsae(defined_bias="calibrated")
    rec = calibrate_defined_offsets(sae, val, _Labels(y), batch_size=700, bins=300)["per_concept"]["C:1"]
    theta = float(sae.defined_offset[0])
    assert rec["offset"] == pytest.approx(theta)
    obs, pos = ~torch.isnan(y), y == 1

    def f1(t: float) -> float:
        called = (score >= t) & obs
        return 2 * float((called & pos).sum()) / (float(called.sum()) + float(pos.sum()))

    assert rec["valid_f1"] == pytest.approx(f1(theta), abs=2e-3)  # what the record says is what the cut gives
    best = max(f1(float(t)) for t in score[obs])  # exhaustive: every observed score as the cut
    assert f1(theta) >= best - 0.01  # one grid step (6 / 300) from the optimum costs little
    # the model's defined latent is zero exactly below the cut
    z_def = sae.defined_pre(sae.normalize(val.acts))[:, 0]
    assert torch.equal(z_def > 0, score > theta)


def test_residue_recipe_resolution():
    from protsae_cli.train.protsae import RESIDUE_RECIPE, resolve_recipe

    auto = {"defined_bias": "auto", "topk_scope": "auto", "predictor_lr": "auto", "lambda_annot": 2.0}
    assert resolve_recipe(auto, "residue") == {**RESIDUE_RECIPE, "lambda_annot": 2.0}
    assert resolve_recipe(auto, "protein") == {"defined_bias": "none", "topk_scope": "all", "predictor_lr": None,
                                               "lambda_annot": 2.0}
    assert resolve_recipe(auto, "residue", has_validation=False)["defined_bias"] == "none"
    # an explicit choice wins; "auto" admission is not defined_first for graded (bias "none") latents
    mixed = resolve_recipe({**auto, "defined_bias": "none"}, "residue")
    assert (mixed["defined_bias"], mixed["topk_scope"], mixed["predictor_lr"]) == ("none", "all", 3e-2)
    with pytest.raises(InputError, match="validation proteins"):
        resolve_recipe({"defined_bias": "calibrated"}, "residue", has_validation=False)


def test_predictor_trains_at_its_own_learning_rate():
    """One Adam step moves each parameter by about its group's lr: the predictor by predictor_lr."""
    from protsae_cli.train.protsae import build_protsae, ProtSAEObjective

    g = torch.Generator().manual_seed(0)
    n_prot, per, d = 40, 50, 8
    x = torch.randn(n_prot * per, d, generator=g)
    prot = torch.arange(n_prot).repeat_interleave(per)
    ids = [f"P{i}" for i in range(n_prot)]
    acts = ActivationSet(x, prot, torch.arange(per).repeat(n_prot), ids, ["A" * per] * n_prot, {})
    label_set = _residue_source({ids[i]: {"C:1": [p for p in range(per) if x[i * per + p, 0] > 0.5]}
                                 for i in range(n_prot)}, {pid: per for pid in ids})
    labels, nf = prepare_concepts([("l", label_set)], ids, acts.sequences, np.arange(30), concepts=["C:1"])
    lr, plr = 1e-3, 5e-2
    cfg = TrainConfig(d_sae=32, k=4, lr=lr, lr_schedule="constant", warmup_frac=0.0, batch_size=256, max_steps=1,
                      eval_every=1, save_after=0.0, state_every=None)
    sae_cfg = SAEConfig(d_model=d, d_sae=32, k=4, protsae={"predictor_lr": plr, "defined_bias": "none"})
    fresh = lambda: build_protsae(  # noqa: E731 - the model train_protsae builds, before any step
        SAEConfig(d_model=d, d_sae=32, k=4, protsae=dict(sae_cfg.protsae)), labels, nf, 0)
    probe = fresh()
    groups = ProtSAEObjective(probe, labels, cfg).param_groups(lr)
    assert [gr["lr_scale"] for gr in groups] == [1.0, pytest.approx(plr / lr)]
    assert {id(probe.W_pred), id(probe.b_pred)} <= {id(q) for q in groups[1]["params"]}
    assert id(probe.W_unk) in {id(q) for q in groups[0]["params"]}
    before = fresh()
    sae, _ = train_protsae(acts.subset_proteins(range(30)), acts.subset_proteins(range(30, 40)), labels, sae_cfg,
                           cfg, normal_forms=nf)
    step_pred = (sae.W_pred - before.W_pred).abs().max().item()
    step_unk = (sae.W_unk - before.W_unk).abs().max().item()
    assert 0.5 * plr < step_pred <= 1.01 * plr
    assert 0.5 * lr < step_unk <= 1.01 * lr
