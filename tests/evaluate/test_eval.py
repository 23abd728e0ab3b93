"""`protsae eval`: splice exactness, loss-recovered anchors, the concept pipeline on planted latents, probing,
JSON/Markdown/PNG outputs and the CLI. Tiny fixtures only (plus the shipped stand-in PLM where a model whose
zero-ablation actually hurts is needed), so a fresh checkout runs these without outside data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protsae_cli.errors import InputError
from protsae_cli.plm.esm_forward import EsmRunner, HookPoint
from protsae_cli.evaluate.pipeline import (TEST, VALID, EvalOptions, assign_splits, cached_activation_batches, evaluate,
                                           evaluate_activations, lm_fidelity, markdown_summary, write_plots)
from protsae_cli.labels.sources import AnnotationSpec, load_label_sources
from protsae_cli.sae.checkpoint import save_sae
from protsae_cli.sae.config import ConceptEntry, SAEConfig
from protsae_cli.sae.topk import TopKSAE

AA = "ACDEFGHIKLMNPQRSTVWY"


class _IdentitySAE:
    """Duck-typed 'SAE' whose reconstruction is its input, bit for bit (what loss recovered = 100 % means)."""

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(x.shape[0], 1, dtype=torch.long), x

    def decode_sparse(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        return val


class _ZeroSAE(_IdentitySAE):
    def decode_sparse(self, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(val)


def _random_seqs(n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(AA), int(m))) for m in rng.integers(lo, hi, n)]


# ------------------------------------------------------------------------------------------------ LM fidelity
@pytest.mark.parametrize("attention", ["reference", "sdpa"])
def test_identity_splice_reproduces_original_logits_exactly(tiny_plm, attention):
    runner = EsmRunner(tiny_plm, "cpu", attention=attention)
    out = lm_fidelity(runner, HookPoint("resid_post", 2), [_IdentitySAE()], ["id"], _random_seqs(5, 10, 40),
                      np.zeros(32), toks_per_batch=120)
    ident = out["identity_splice"]
    assert ident["exact"] and ident["max_abs_logit_diff"] == 0.0
    assert ident["ce_identity"] == ident["ce_orig"]
    for mode in ("unmasked", "masked"):
        s = out[mode]["per_sae"]["id"]
        assert s["ce"] == out[mode]["ce_orig"] and s["delta_ce"] == 0.0
        assert s["kl"] == pytest.approx(0.0, abs=1e-12) and s["argmax_agreement"] == 1.0


def test_loss_recovered_is_100_for_identity_and_0_for_zero_splice():
    """On the shipped stand-in PLM, where zeroing resid_post@4 really costs CE (the tiny random model's does not)."""
    from protsae_cli.plm.loading import load_plm

    plm = load_plm(None)
    runner = EsmRunner(plm, "cpu", attention="reference")
    seqs = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLY",
            "MSDNKKPDVAELLKKSNEVLKEAKHLLEKGHVEEALKALEEALKLAPDN"]
    out = lm_fidelity(runner, HookPoint("resid_post", 4), [_IdentitySAE(), _ZeroSAE()], ["id", "zero"], seqs,
                      np.zeros(plm.d_model), mask_fraction=0.15, seed=3)
    for mode in ("unmasked", "masked"):
        b = out[mode]
        assert b["ce_zero"] - b["ce_orig"] > 0.05, "the anchor needs a zero-ablation that hurts"
        ident, zero = b["per_sae"]["id"], b["per_sae"]["zero"]
        assert ident["loss_recovered_zero"]["clipped"] == 100.0
        assert ident["loss_recovered_zero"]["unclipped"] == 100.0
        assert zero["loss_recovered_zero"]["clipped"] == 0.0
        assert zero["ce"] == b["ce_zero"]
        assert ident["kl_score_zero"] == 1.0 and zero["kl_score_zero"] == 0.0
        # mean = 0 here, so the mean ablation is the zero ablation
        assert b["ce_mean"] == b["ce_zero"]
    assert out["masked"]["n_tokens"] == sum(max(1, round(0.15 * len(s))) for s in seqs)


def test_masked_positions_do_not_depend_on_batching(tiny_plm):
    runner = EsmRunner(tiny_plm, "cpu", attention="reference")
    seqs = _random_seqs(6, 10, 30, seed=2)
    a = lm_fidelity(runner, HookPoint("resid_post", 1), [_IdentitySAE()], ["id"], seqs, np.zeros(32),
                    toks_per_batch=40, seed=5)
    b = lm_fidelity(runner, HookPoint("resid_post", 1), [_IdentitySAE()], ["id"], seqs, np.zeros(32),
                    toks_per_batch=10_000, seed=5)
    assert a["masked"]["n_tokens"] == b["masked"]["n_tokens"]
    assert a["masked"]["ce_orig"] == pytest.approx(b["masked"]["ce_orig"], rel=1e-5)


# ------------------------------------------------------------------------------------------------------- splits
def test_split_by_ids_refuses_overlap(tmp_path):
    (tmp_path / "v.txt").write_text("A\nB\n")
    (tmp_path / "t.txt").write_text("B\nC\n")
    with pytest.raises(InputError, match="both"):
        assign_splits(["A", "B", "C"], (str(tmp_path / "v.txt"), str(tmp_path / "t.txt")), 0.5, 0)
    (tmp_path / "t.txt").write_text("# test\nC\n")
    split, info = assign_splits(["A", "B", "C", "D"], (str(tmp_path / "v.txt"), str(tmp_path / "t.txt")), 0.5, 0)
    assert split == [VALID, VALID, TEST, None] and info["n_unassigned"] == 1


def test_fraction_split_is_seeded_and_by_protein():
    ids = [f"P{i}" for i in range(20)]
    a, _ = assign_splits(ids, None, 0.5, 7)
    b, _ = assign_splits(ids, None, 0.5, 7)
    assert a == b and a.count(VALID) == 10 and a.count(TEST) == 10


# ------------------------------------------------------------------------------------------ planted concepts
D = 8


class _Planted:
    """Activations where dimension 0 is 1 exactly on 'transmembrane helix' residues and dimension 1 on
    'signal peptide' residues; other dimensions are small noise. A TopK SAE with the identity basis as encoder
    then has latent 0 = the helix concept, latent 1 = the signal peptide."""

    def __init__(self, tmp_path: Path, n: int = 16, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.ids = [f"Q{i:03d}" for i in range(n)]
        self.seqs = _random_seqs(n, 30, 60, seed)
        self.acts: list[torch.Tensor] = []
        lines = []
        for pid, seq in zip(self.ids, self.seqs):
            L = len(seq)
            lab = np.array(["1"] * L)
            s = int(rng.integers(0, 5))
            lab[s:s + 6] = "S"
            h = int(rng.integers(12, L - 12))
            lab[h:h + 8] = "H"
            lab[L - 2:] = "U"  # masked residues must not be counted
            x = 0.01 * rng.standard_normal((L, D))
            x[lab == "H", 0] = 1.0
            x[lab == "S", 1] = 1.0
            x[:, 2] = 0.3  # a dense latent: fires everywhere, never the best for a concept
            self.acts.append(torch.tensor(x, dtype=torch.float32))
            lines += [f">{pid}|EUKARYA|SP|0", seq, "".join(lab)]
        self.tmbed = tmp_path / "planted_tmbed.fasta"
        self.tmbed.write_text("\n".join(lines) + "\n")
        self.split = [VALID if i % 2 == 0 else TEST for i in range(n)]

    def batches(self, per_batch: int = 3):
        for s in range(0, len(self.ids), per_batch):
            yield list(range(s, min(s + per_batch, len(self.ids)))), self.acts[s:s + per_batch]


def _identity_topk(k: int = 3) -> TopKSAE:
    sae = TopKSAE(SAEConfig(d_model=D, d_sae=D, k=k))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(D))
        sae.W_dec.copy_(torch.eye(D))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def _planted_protsae(k: int = 3):
    from protsae_cli.sae.protsae import ProtSAE

    cfg = SAEConfig(d_model=D, d_sae=D, k=k, arch="protsae",
                    concepts=[ConceptEntry(0, "PSC:0000101", "transmembrane helix"),
                              ConceptEntry(1, "PSC:0000120", "signal peptide")])
    sae = ProtSAE(cfg)
    with torch.no_grad():
        sae.W_pred.copy_(torch.eye(D)[:2] * 8.0)
        sae.b_pred.fill_(-4.0)     # pi > 0.5 exactly where the planted dimension is ~1
        sae.r_pred.fill_(-np.log(8.0))
        sae.W_unk.copy_(torch.eye(D)[2:])
        sae.b_unk.zero_()
        sae.W_dec.copy_(torch.eye(D))
        sae.b_dec.zero_()
    return sae.eval()


def test_planted_concepts_are_found_with_f1_one(tmp_path):
    pl = _Planted(tmp_path)
    sources = load_label_sources([AnnotationSpec([str(pl.tmbed)], "tmbed")], dict(zip(pl.ids, pl.seqs)), None, True)
    assert sources[0].kind == "residue"
    names = sources[0].concepts
    assert "PSC:0000101" in names and "PSC:0000120" in names
    assert "PSC:0000001" not in names  # the root, reached only by propagation, is not a concept to find
    lengths = [len(s) for s in pl.seqs]
    out = evaluate_activations([_identity_topk(), _planted_protsae()], ["topk", "prot"], pl.ids, lengths,
                               pl.batches(), sources, pl.split)
    con = out["concepts"]
    for name in ("topk", "prot"):
        rows = {r["concept"]: r for r in con["per_sae"][name]["per_concept"]}
        helix, sp = rows["PSC:0000101"], rows["PSC:0000120"]
        assert helix["latent"] == 0 and helix["test_f1"] == pytest.approx(1.0)
        assert sp["latent"] == 1 and sp["test_f1"] == pytest.approx(1.0)
        assert helix["instance_test_f1"] == pytest.approx(1.0)
        assert con["per_sae"][name]["summary"]["coverage"] >= 2
    prot = {r["concept"]: r for r in con["per_sae"]["prot"]["per_concept"]}
    assert prot["PSC:0000101"]["defined_latent"] == 0 and prot["PSC:0000101"]["defined_test_f1"] == pytest.approx(1.0)
    assert prot["PSC:0000101"]["pi_test_f1"] == pytest.approx(1.0)
    assert prot["PSC:0000101"]["participation_positive"] == pytest.approx(1.0)
    assert prot["PSC:0000120"]["participation_predicted"] == pytest.approx(1.0)
    topk_rows = {r["concept"]: r for r in con["per_sae"]["topk"]["per_concept"]}
    assert topk_rows["PSC:0000101"]["defined_latent"] is None  # a TopK SAE has no bound latents
    summ = con["per_sae"]["prot"]["summary"]
    assert summ["defined_mean_test_f1"] == pytest.approx(1.0) and summ["n_bound"] == 2
    # masked (U) residues are dropped: positives and token counts exclude them
    info = con["sources"][0]
    n_masked = 2 * len(pl.ids)
    assert info["n_valid_tokens"] + info["n_test_tokens"] == sum(lengths) - n_masked
    rec = out["reconstruction"]["topk"]
    assert rec["n_tokens"] == sum(lengths)
    assert rec["dead"]["token_budget"] == sum(lengths)
    assert out["mean_activation"].shape == (D,)


def test_results_do_not_depend_on_batching(tmp_path):
    pl = _Planted(tmp_path, n=10, seed=4)
    sources = load_label_sources([AnnotationSpec([str(pl.tmbed)], "tmbed")], dict(zip(pl.ids, pl.seqs)), None, True)
    lengths = [len(s) for s in pl.seqs]
    a = evaluate_activations([_identity_topk(2)], ["t"], pl.ids, lengths, pl.batches(1), sources, pl.split)
    b = evaluate_activations([_identity_topk(2)], ["t"], pl.ids, lengths, pl.batches(7), sources, pl.split)
    assert a["concepts"]["per_sae"] == b["concepts"]["per_sae"]
    assert a["reconstruction"]["t"]["fve"] == pytest.approx(b["reconstruction"]["t"]["fve"], rel=1e-9)


def test_cached_activation_batches_round_trip(tmp_path):
    from protsae_cli.train.activations import ActivationSet

    pl = _Planted(tmp_path, n=4)
    rows = torch.cat(pl.acts).half()
    prot = torch.cat([torch.full((a.shape[0],), i) for i, a in enumerate(pl.acts)])
    pos = torch.cat([torch.arange(a.shape[0]) for a in pl.acts])
    perm = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))  # cache order is arbitrary
    acts = ActivationSet(rows[perm], prot[perm], pos[perm], pl.ids, pl.seqs)
    got = list(cached_activation_batches(acts, rows_per_batch=50))
    flat = [(p, x) for ids, xs in got for p, x in zip(ids, xs)]
    assert [p for p, _ in flat] == [0, 1, 2, 3]
    for p, x in flat:
        assert torch.equal(x, pl.acts[p].half().float())
    keep = pos[perm] != 3
    holes = ActivationSet(rows[perm][keep], prot[perm][keep], pos[perm][keep], pl.ids, pl.seqs)
    with pytest.raises(InputError, match="every residue"):
        list(cached_activation_batches(holes))


# ------------------------------------------------------------------------------------------------------ probing
OBO = """format-version: 1.2

[Term]
id: GO:0000001
name: root
namespace: molecular_function

[Term]
id: GO:0000002
name: a
namespace: molecular_function
is_a: GO:0000001 ! root

[Term]
id: GO:0000003
name: b
namespace: molecular_function
is_a: GO:0000001 ! root

[Term]
id: GO:0000004
name: a1
namespace: molecular_function
is_a: GO:0000002 ! a
"""


def test_protein_level_probing_scores_planted_terms(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    ids = [f"G{i}" for i in range(n)]
    seqs = _random_seqs(n, 20, 30, seed=1)
    acts, lines = [], []
    for pid, s in zip(ids, seqs):
        x = 0.01 * rng.standard_normal((len(s), D))
        term = ["GO:0000004", "GO:0000003"][int(rng.integers(0, 2))]
        x[:5, 0 if term == "GO:0000004" else 1] = 1.0
        acts.append(torch.tensor(x, dtype=torch.float32))
        lines.append(f"{pid}\t{term}")
    (tmp_path / "go.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "go.obo").write_text(OBO)
    sources = load_label_sources([AnnotationSpec([str(tmp_path / "go.tsv")], "go-tsv")], dict(zip(ids, seqs)),
                                 str(tmp_path / "go.obo"), True)
    assert sources[0].kind == "protein"
    assert "GO:0000001" not in sources[0].concepts and "GO:0000002" in sources[0].concepts  # root out, parent in
    split = [VALID if i < n // 2 else TEST for i in range(n)]
    batches = ((list(range(s, s + 5)), acts[s:s + 5]) for s in range(0, n, 5))
    out = evaluate_activations([_identity_topk(3)], ["t"], ids, [len(s) for s in seqs], batches, sources, split)
    block = out["probing"]["go.tsv"]
    assert block["n_terms"] == 3 and block["n_test_proteins"] == n // 2
    probe = block["per_sae"]["t"]["probe"]
    assert probe["fmax"]["fmax"] > 0.9 and probe["auc"]["auc"] > 0.9
    assert block["per_sae"]["t"]["zero_shot"] is None
    assert 0.0 <= block["plm_mean_pool"]["aupr"] <= 1.0


# ----------------------------------------------------------------------------------------------- end to end
def _tiny_protsae_dir(tmp_path: Path, tiny_plm) -> Path:
    from protsae_cli.sae.protsae import ProtSAE

    cfg = SAEConfig(d_model=32, d_sae=64, k=8, hook_point="resid_post", layer=2, plm_name=tiny_plm.name,
                    plm_sha256=tiny_plm.sha256, plm_num_layers=tiny_plm.num_layers, arch="protsae",
                    concepts=[ConceptEntry(0, "PSC:0000101", "transmembrane helix", threshold=0.0),
                              ConceptEntry(1, "PSC:0000120", "signal peptide", threshold=0.0)])
    sae = ProtSAE(cfg)
    sae.reset_parameters(seed=2)
    with torch.no_grad():
        sae.b_pred.fill_(0.5)
    return save_sae(sae, tmp_path / "tiny_protsae")


def _tiny_eval_inputs(tmp_path: Path, n: int = 12) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(3)
    seqs = _random_seqs(n, 25, 45, seed=3)
    fasta, tm, lines = tmp_path / "eval.fasta", tmp_path / "tm_3line.fasta", []
    with open(fasta, "w") as fh:
        for i, s in enumerate(seqs):
            fh.write(f">T{i} test protein\n{s}\n")
            lab = np.array(["1"] * len(s))
            lab[:5] = "S"
            h = int(rng.integers(8, len(s) - 10))
            lab[h:h + 7] = "H"
            lines += [f">T{i}|BACTERIA|SP|0", s, "".join(lab)]
    tm.write_text("\n".join(lines) + "\n")
    metal = tmp_path / "binding_residues_2.5_metal.txt"
    metal.write_text("".join(f"T{i}\t3,4,{10 + i}\n" for i in range(0, n, 2)))
    return fasta, tm, metal


def test_evaluate_writes_documented_json_markdown_and_plots(tmp_path, tiny_esm_path, tiny_plm, tiny_sae_dir):
    fasta, tm, metal = _tiny_eval_inputs(tmp_path)
    prot_dir = _tiny_protsae_dir(tmp_path, tiny_plm)
    opts = EvalOptions(sae=[str(tiny_sae_dir), str(prot_dir)], fasta=str(fasta), model=str(tiny_esm_path),
                       annotations=[AnnotationSpec([str(tm)], "tmbed"), AnnotationSpec([str(metal)], "binding")],
                       valid_fraction=0.5, lm_proteins=4, device="cpu", json_out=str(tmp_path / "e.json"),
                       markdown_out=str(tmp_path / "e.md"), plots_dir=str(tmp_path / "plots"), command="test")
    res = evaluate(opts)
    on_disk = json.loads((tmp_path / "e.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    for key in ("format", "format_version", "protsae_version", "command", "created", "device", "plm", "hook", "data",
                "saes", "reconstruction", "lm_fidelity", "concepts"):
        assert key in res, key
    names = [s["name"] for s in res["saes"]]
    assert names == ["tiny_sae", "tiny_protsae"]
    assert res["saes"][1]["arch"] == "protsae" and res["saes"][1]["n_defined"] == 2
    for n in names:
        r = res["reconstruction"][n]
        for key in ("mse_per_token", "fve", "fvu", "variance_explained_interplm", "l0_mean", "dead", "dense",
                    "firing_frequency_log10_hist", "cosine_mean"):
            assert key in r, key
        assert r["dead"]["token_budget"] == res["data"]["n_tokens"]
    fid = res["lm_fidelity"]
    assert fid["identity_splice"]["exact"]
    for mode in ("unmasked", "masked"):
        for n in names:
            s = fid[mode]["per_sae"][n]
            for key in ("ce", "delta_ce", "loss_recovered_zero", "loss_recovered_mean", "kl", "kl_score_zero",
                        "kl_score_mean", "argmax_agreement"):
                assert key in s, key
            assert set(s["loss_recovered_zero"]) == {"unclipped", "clipped", "headroom", "defined"}
    con = res["concepts"]
    assert [s["name"] for s in con["sources"]] == ["tm_3line.fasta", "binding_residues_2.5_metal.txt"]
    summ = con["per_sae"]["tiny_protsae"]["summary"]
    for key in ("coverage", "mean_best_test_f1", "top10_mean_f1", "top10_max_f1", "defined_mean_test_f1",
                "pi_mean_test_f1", "participation_predicted"):
        assert key in summ, key
    assert "defined_mean_test_f1" not in con["per_sae"]["tiny_sae"]["summary"]
    # the binding source only annotates the even proteins: its tokens come from them alone
    bind = con["sources"][1]
    assert bind["n_valid_proteins"] + bind["n_test_proteins"] == 6
    md = (tmp_path / "e.md").read_text()
    assert "## Concept alignment" in md and "tiny_protsae" in md and "Identity splice" in md
    for png in ("firing_frequency.png", "concept_f1.png", "lm_ce.png"):
        data = (tmp_path / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_eval(tmp_path, tiny_esm_path, tiny_sae_dir):
    from typer.testing import CliRunner

    from protsae_cli.cli.app import build_app

    fasta, tm, metal = _tiny_eval_inputs(tmp_path, n=8)
    (tmp_path / "v.txt").write_text("T0\nT1\nT2\nT3\n")
    (tmp_path / "t.txt").write_text("T4\nT5\nT6\nT7\n")
    out = tmp_path / "cli.json"
    res = CliRunner().invoke(build_app(), [
        "eval", "--sae", str(tiny_sae_dir), str(fasta), "--model", str(tiny_esm_path), "-a", str(tm),
        "-a", str(metal), "--annotation-format", "tmbed", "--annotation-format", "binding",
        "--split-by-id", str(tmp_path / "v.txt"), str(tmp_path / "t.txt"), "--lm-proteins", "2",
        "--device", "cpu", "--json", str(out), "--markdown", str(tmp_path / "cli.md")])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["data"]["split"] == {"method": "ids", "valid_ids": str(tmp_path / "v.txt"),
                                     "test_ids": str(tmp_path / "t.txt"), "n_valid": 4, "n_test": 4,
                                     "n_unassigned": 0}
    assert data["lm_fidelity"]["n_proteins"] == 2
    assert "concepts" in data and (tmp_path / "cli.md").exists()


def test_cli_eval_refuses_mismatched_formats(tmp_path, tiny_esm_path, tiny_sae_dir):
    from typer.testing import CliRunner

    from protsae_cli.cli.app import build_app

    fasta, tm, metal = _tiny_eval_inputs(tmp_path, n=4)
    res = CliRunner().invoke(build_app(), [
        "eval", "--sae", str(tiny_sae_dir), str(fasta), "--model", str(tiny_esm_path), "-a", str(tm), "-a",
        str(metal), "-a", str(tm), "--annotation-format", "tmbed", "--annotation-format", "binding",
        "--json", str(tmp_path / "x.json")])
    assert res.exit_code != 0
    assert "--annotation-format" in str(res.exception) or "--annotation-format" in res.output


def test_markdown_and_plots_from_a_saved_result(tmp_path):
    """The report can be re-rendered from JSON alone (e.g. after editing names)."""
    pl = _Planted(tmp_path, n=8)
    sources = load_label_sources([AnnotationSpec([str(pl.tmbed)], "tmbed")], dict(zip(pl.ids, pl.seqs)), None, True)
    out = evaluate_activations([_identity_topk(), _planted_protsae()], ["topk", "protsae"], pl.ids,
                               [len(s) for s in pl.seqs], pl.batches(), sources, pl.split)
    out.pop("mean_activation")
    res = {"saes": [{"name": "topk", "arch": "topk", "d_sae": D, "k": 3},
                    {"name": "protsae", "arch": "protsae", "d_sae": D, "k": 3}],
           "plm": {"name": "x", "sha256": "0" * 64}, "hook": "resid_post@1", "created": "now", "command": "c",
           "data": {"n_proteins": 8, "n_tokens": 100, "n_cropped": 0, "max_residues": 1022,
                    "split": {"method": "ids", "n_valid": 4, "n_test": 4}}, **json.loads(json.dumps(out, default=float))}
    written = write_plots(res, str(tmp_path / "p"))
    assert set(written) == {"firing_frequency", "concept_f1"}
    md = markdown_summary(res, written)
    assert "transmembrane helix" in md and "1.000 / 1.000" in md
