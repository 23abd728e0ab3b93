"""TopK training, the shared loop (checkpoint selection, resume, seeds), and activation caches (streaming with a
bounded shuffle buffer, mismatch refusals). Small enough to run in seconds on a shared CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from protsae_cli.train.activations import ActivationCache, ActivationSet, InMemoryRows, ShuffleBufferStream
from protsae_cli.cli.app import build_app
from protsae_cli.train.distributed import SINGLE
from protsae_cli.errors import InputError, OutputError
from protsae_cli.plm.esm_forward import EsmRunner, HookPoint
from protsae_cli.plm.loading import load_plm
from protsae_cli.sae.checkpoint import load_sae
from protsae_cli.sae.config import SAEConfig
from protsae_cli.sae.topk import TopKSAE
from protsae_cli.train.pipeline import TrainOptions, get_activations, split_data, train_sae
from protsae_cli.train.topk import TopKObjective, evaluate, train_topk
from protsae_cli.train.trainer import STATE_NAME, TrainConfig, fit, load_state
from tests.train_helpers import proteins, write_fasta


pytestmark = pytest.mark.usefixtures("drop_cli_log_handlers", "one_thread")


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    return write_fasta(tmp_path_factory.mktemp("fa") / "p.fasta", proteins(60))


def opts(fasta, out, esm, **kw) -> TrainOptions:
    train = dict(d_sae=64, k=4, lr=1e-2, batch_size=128, max_steps=40, seed=0, log_every=5, eval_every=10,
                 state_every=7, dead_after_tokens=500)
    train.update(kw.pop("train", {}))
    base = dict(fasta=str(fasta), output=str(out), model=str(esm), layer=2, d_sae=64, k=4, tokens_per_protein=32,
                val_fraction=0.2, device="cpu", progress=False)
    base.update(kw)
    return TrainOptions(**base, train=TrainConfig(**train))


def weights(d) -> dict[str, torch.Tensor]:
    return load_file(str(d / "sae.safetensors"))


def synthetic(n: int, d: int = 16, n_prot: int = 40, seed: int = 0) -> ActivationSet:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(24, d, generator=g)
    coef = (torch.rand(n, 24, generator=g) < 0.1).float() * torch.rand(n, 24, generator=g)
    x = coef @ dirs + 0.01 * torch.randn(n, d, generator=g)
    prot = torch.arange(n) % n_prot
    return ActivationSet(x.half(), prot, torch.arange(n) // n_prot, [f"P{i}" for i in range(n_prot)],
                         ["A" * (n // n_prot + 1)] * n_prot, {})


# -- TopK training -----------------------------------------------------------------------------------------

def test_topk_training_improves_fvu_over_initialisation(fasta, tiny_esm_path, tmp_path):
    out = train_sae(opts(fasta, tmp_path / "sae", tiny_esm_path))
    sae, _ = load_sae(out)
    log = json.loads((out / "training_log.json").read_text())
    cfg = SAEConfig(**{k: getattr(sae.cfg, k) for k in ("d_model", "d_sae", "k", "hook_point", "layer")})
    init = TopKSAE(cfg)
    init.reset_parameters(seed=0)
    # The initial SAE exactly as training starts it: same activations, split and initialisation sample.
    o = opts(fasta, tmp_path / "x", tiny_esm_path)
    acts = get_activations(o, EsmRunner(load_plm(str(tiny_esm_path)), "cpu"), HookPoint("resid_post", 2))
    rows, val, _, _ = split_data(o, acts, SINGLE)
    TopKObjective(init, o.train).init(rows.sample(o.train.init_rows))
    fvu0 = evaluate(init, val.acts)["fvu"]
    fvu1 = evaluate(sae, val.acts)["fvu"]
    assert fvu1 < 0.5 * fvu0, (fvu0, fvu1)
    assert fvu1 == pytest.approx(log["metrics"]["val"]["fvu"], rel=1e-5)
    assert sae.cfg.training["metrics"]["val"]["fve"] > 0.5
    assert [e["step"] for e in log["evals"]] == [10, 20, 30, 40]


def test_cli_trains_topk_and_writes_the_documented_outputs(fasta, tiny_esm_path, tmp_path):
    out = tmp_path / "cli_sae"
    res = CliRunner().invoke(build_app(), [
        "train", str(fasta), "-o", str(out), "-m", str(tiny_esm_path), "--layer", "2", "--d-sae", "64", "--k", "4",
        "--tokens-per-protein", "32", "--batch-size", "128", "--max-steps", "12", "--eval-every", "4",
        "--lr", "0.01", "--device", "cpu", "--no-progress", "--save-after", "0"])
    assert res.exit_code == 0, res.output
    for name in ("config.json", "sae.safetensors", "README.md", "training_log.json", STATE_NAME):
        assert (out / name).exists(), name
    plm = json.loads((out / "config.json").read_text())["plm"]  # both identities: the file's and the weights'
    tiny = load_plm(str(tiny_esm_path))
    assert (plm["sha256"], plm["weights_sha256"]) == (tiny.sha256, tiny.weights_sha256)
    log = json.loads((out / "training_log.json").read_text())
    assert log["selection"]["rule"] == "min val fvu"
    best = min(log["evals"], key=lambda e: e["val"]["fvu"])
    assert log["selection"]["selected_step"] == best["step"]


def test_small_input_lowers_the_default_batch_and_says_so(fasta, tiny_esm_path, tmp_path, caplog):
    """#16.5: the default batch (4096) no longer fails on a small FASTA; the log says what was changed."""
    out = tmp_path / "small"
    caplog.set_level("INFO", logger="protsae.train")
    res = CliRunner().invoke(build_app(), [
        "train", str(fasta), "-o", str(out), "-m", str(tiny_esm_path), "--layer", "2", "--d-sae", "64", "--k", "4",
        "--tokens-per-protein", "32", "--max-steps", "2", "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    lowered = [r.getMessage() for r in caplog.records if "batch size lowered" in r.getMessage()]
    assert lowered and "from 4096 to 1822" in lowered[0], lowered  # 57 training proteins, <= 32 tokens each
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["train_config"]["batch_size"] == 1822


def test_explicit_batch_too_large_fails_naming_the_option_and_leaves_no_directory(fasta, tiny_esm_path, tmp_path):
    out = tmp_path / "nested" / "big"
    res = CliRunner().invoke(build_app(), [
        "train", str(fasta), "-o", str(out), "-m", str(tiny_esm_path), "--layer", "2", "--d-sae", "64", "--k", "4",
        "--tokens-per-protein", "32", "--batch-size", "5000", "--device", "cpu", "--no-progress"])
    assert isinstance(res.exception, InputError), res.output  # exit 3 through protsae's main
    msg = str(res.exception)
    assert "only 1822 training tokens" in msg and "--batch-size to at most 1822" in msg, msg
    assert not out.exists() and not out.parent.exists()


def test_output_that_is_a_file_fails_before_the_models_load(fasta, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(build_app(), ["train", str(fasta), "-o", str(blocker), "-m", "/nonexistent/plm",
                                           "--device", "cpu"])
    assert isinstance(res.exception, OutputError), res.output  # exit 5 through protsae's main
    assert "is not a directory" in str(res.exception)


# -- checkpoint selection ------------------------------------------------------------------------------------

class ScriptedObjective(TopKObjective):
    """Real TopK training, scripted validation metrics: makes 'which checkpoint is selected' a known answer."""

    def __init__(self, sae, cfg, script):
        super().__init__(sae, cfg)
        self.script, self.seen = list(script), {}

    def evaluate(self, val, device, env, batch_size):
        fvu = self.script.pop(0)
        self.seen[fvu] = {k: v.clone() for k, v in self.sae.state_dict().items()}
        return {"fvu": fvu}


@pytest.mark.parametrize("save_after, expect", [(0.0, 0.2), (0.6, 0.3)])
def test_selection_picks_the_best_eligible_evaluation(save_after, expect):
    data = synthetic(2048)
    cfg = TrainConfig(d_sae=32, k=4, lr=1e-2, batch_size=256, max_steps=40, eval_every=10, save_after=save_after,
                      state_every=None)
    sae = TopKSAE(SAEConfig(d_model=16, d_sae=32, k=4))
    obj = ScriptedObjective(sae, cfg, [0.5, 0.2, 0.3, 0.4])  # evals at steps 10, 20, 30, 40
    res = fit(obj, InMemoryRows(data, cfg.batch_size, cfg.seed), data, cfg)
    assert res.best["step"] == {0.2: 20, 0.3: 30}[expect]
    for k, v in res.sae.state_dict().items():
        assert torch.equal(v, obj.seen[expect][k]), k
    assert not torch.equal(res.last_state["W_dec"], obj.seen[expect]["W_dec"])  # last weights kept apart


def test_without_validation_the_last_step_is_kept():
    data = synthetic(1024)
    cfg = TrainConfig(d_sae=32, k=4, batch_size=256, max_steps=8, state_every=None)
    sae, hist = train_topk(data, None, SAEConfig(d_model=16, d_sae=32, k=4), cfg)
    assert hist["best"] == {} and sae.cfg.training["selected_step"] == 8
    assert all(torch.equal(v, hist["last_state"][k]) for k, v in sae.state_dict().items())


# -- resume and seeds ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_resume_reproduces_an_uninterrupted_run_exactly(fasta, tiny_esm_path, tmp_path, stream):
    cache = str(tmp_path / "cache")
    kw = dict(activation_cache=cache, stream=stream, shuffle_buffer=300)
    full = train_sae(opts(fasta, tmp_path / "full", tiny_esm_path, **kw))
    part = tmp_path / "part"
    train_sae(opts(fasta, part, tiny_esm_path, train={"stop_at": 17}, **kw))
    assert not (part / "sae.safetensors").exists()
    state = load_state(part)
    assert state["step"] == 17 and not state["final"]
    train_sae(opts(fasta, part, tiny_esm_path, resume=str(part), **kw))
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = (json.loads((d / "training_log.json").read_text()) for d in (full, part))
    assert [e["val"] for e in la["evals"]] == [e["val"] for e in lb["evals"]]


def test_resume_refuses_a_different_run(fasta, tiny_esm_path, tmp_path):
    part = tmp_path / "part"
    train_sae(opts(fasta, part, tiny_esm_path, train={"stop_at": 5}))
    with pytest.raises(InputError, match="lr"):
        train_sae(opts(fasta, part, tiny_esm_path, resume=str(part), train={"lr": 1e-3}))
    with pytest.raises(InputError, match="no training state"):
        train_sae(opts(fasta, tmp_path / "other", tiny_esm_path, resume=str(tmp_path / "nothing")))


def test_seed_controls_split_sampling_init_and_order(fasta, tiny_esm_path, tmp_path):
    a = train_sae(opts(fasta, tmp_path / "a", tiny_esm_path, train={"max_steps": 6, "seed": 3}))
    b = train_sae(opts(fasta, tmp_path / "b", tiny_esm_path, train={"max_steps": 6, "seed": 3}))
    c = train_sae(opts(fasta, tmp_path / "c", tiny_esm_path, train={"max_steps": 6, "seed": 4}))
    wa, wb, wc = weights(a), weights(b), weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["W_dec"], wc["W_dec"])


# -- activation caches ----------------------------------------------------------------------------------------

def test_cache_round_trip_and_partial_loads(tmp_path):
    data = synthetic(1000)
    data.save(tmp_path / "c", shard_rows=300)
    cache = ActivationCache.open(tmp_path / "c")
    assert cache.n_shards == 4 and len(cache) == 1000 and cache.d_model == 16
    back = cache.load()
    assert torch.equal(back.acts, data.acts) and torch.equal(back.protein, data.protein)
    mask = np.zeros(40, dtype=bool)
    mask[[1, 5]] = True
    part = cache.load(proteins=mask)
    assert set(part.protein.tolist()) == {1, 5} and len(part) == 50
    rows = np.array([999, 3, 301, 600])
    assert torch.equal(cache.gather(rows), data.acts[torch.from_numpy(rows)])


def test_cache_with_unpaired_ids_and_sequences_is_bad_input(tmp_path):
    synthetic(100).save(tmp_path / "c", shard_rows=60)
    meta_path = tmp_path / "c" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["sequences"] = meta["sequences"][:-1]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"meta\.json: protein_ids \(40\) and sequences \(39\) must be lists"):
        ActivationCache.open(tmp_path / "c")


def test_streaming_memory_is_bounded_by_the_shuffle_buffer(tmp_path):
    data = synthetic(4000)
    data.save(tmp_path / "c", shard_rows=700)
    cache = ActivationCache.open(tmp_path / "c")
    biggest = []
    read = cache.read

    def spy(shard, start, stop, rows=None):
        out = read(shard, start, stop, rows)
        biggest.append(len(out[0]))
        return out

    cache.read = spy
    keep = np.ones(40, dtype=bool)
    keep[[0, 7]] = False  # "validation proteins": never streamed
    stream = ShuffleBufferStream(cache, keep, batch_size=64, buffer_rows=256, seed=1)
    seen = [(b.protein, b.position) for b in stream.epoch(0)]
    assert max(biggest) <= 256 and stream.peak_rows <= 256
    prot = torch.cat([p for p, _ in seen])
    assert not set(prot.tolist()) & {0, 7}
    assert len(seen) == stream.steps_per_epoch == (4000 - 200) // 64
    keys = set(zip(prot.tolist(), torch.cat([q for _, q in seen]).tolist()))
    assert len(keys) == len(prot)  # no row twice within an epoch
    # A resumed epoch continues with exactly the batches an uninterrupted one yields after it.
    full = list(stream.epoch(1))
    resumed = list(stream.epoch(1, skip=20))
    assert len(resumed) == len(full) - 20
    for x, y in zip(full[20:], resumed):
        assert torch.equal(x.acts, y.acts) and torch.equal(x.protein, y.protein)
        assert torch.equal(x.position, y.position)
    # Ranks of a DDP job get disjoint halves of the same global batch.
    r0 = next(iter(ShuffleBufferStream(cache, keep, 64, 256, seed=1, rank=0, world_size=2).epoch(0)))
    r1 = next(iter(ShuffleBufferStream(cache, keep, 64, 256, seed=1, rank=1, world_size=2).epoch(0)))
    first = next(iter(stream.epoch(0)))
    assert torch.equal(torch.cat([r0.acts, r1.acts]), first.acts)


def test_mismatched_cache_is_refused(fasta, tiny_esm_path, tmp_path):
    cache = str(tmp_path / "cache")
    train_sae(opts(fasta, tmp_path / "a", tiny_esm_path, activation_cache=cache, train={"max_steps": 2}))
    with pytest.raises(InputError, match="resid_post@1"):
        train_sae(opts(fasta, tmp_path / "b", tiny_esm_path, activation_cache=cache, layer=1,
                       train={"max_steps": 2}))
    other = write_fasta(tmp_path / "other.fasta", proteins(30, seed=9))
    with pytest.raises(InputError, match="differ"):
        train_sae(opts(other, tmp_path / "c", tiny_esm_path, activation_cache=cache, train={"max_steps": 2}))
