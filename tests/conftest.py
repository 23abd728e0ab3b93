"""Shared fixtures: tiny ESM-2 checkpoints written in fair-esm's exact hub format, tiny SAEs, tiny FASTAs.

Nothing here touches the network or any data outside the repository: a fresh clone must pass on its own.
"""

from __future__ import annotations

import os
from argparse import Namespace
from pathlib import Path

import pytest
import torch

TINY_LAYERS, TINY_DIM, TINY_HEADS = 3, 32, 4


def write_fair_esm_checkpoint(path: Path, layers: int = TINY_LAYERS, dim: int = TINY_DIM, heads: int = TINY_HEADS,
                              seed: int = 0, regression: bool = True) -> Path:
    """A randomly initialised ESM-2 saved exactly like fair-esm's hub files: {'cfg': {'model': Namespace},
    'model': {'encoder.<param>': tensor}} (+ '<stem>-contact-regression.pt' beside it)."""
    import esm

    torch.manual_seed(seed)
    model = esm.model.esm2.ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, token_dropout=True)
    with torch.no_grad():  # non-trivial layer norms so layer-norm bugs cannot hide
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    state = {f"encoder.{k}": v for k, v in model.state_dict().items() if not k.startswith("contact_head")}
    cfg = Namespace(encoder_layers=layers, encoder_embed_dim=dim, encoder_ffn_embed_dim=4 * dim,
                    encoder_attention_heads=heads, token_dropout=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": {"model": cfg}, "model": state}, path)
    if regression:
        reg = {k: v for k, v in model.state_dict().items() if k.startswith("contact_head")}
        torch.save({"model": reg}, path.with_name(path.stem + "-contact-regression.pt"))
    return path


@pytest.fixture(scope="session")
def tiny_esm_path(tmp_path_factory) -> Path:
    return write_fair_esm_checkpoint(tmp_path_factory.mktemp("esm") / "esm2_tiny_test.pt")


@pytest.fixture()
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME so name lookups cannot see (or write to) the user's real cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("PROTSAE_OFFLINE", "1")
    torch.hub.set_dir(str(tmp_path / "torch_home" / "hub"))
    yield tmp_path / "torch_home"
    torch.hub.set_dir(os.path.join(os.path.expanduser("~"), ".cache", "torch", "hub"))


@pytest.fixture(scope="session")
def tiny_plm(tiny_esm_path):
    from protsae_cli.plm.loading import load_plm

    return load_plm(str(tiny_esm_path))


@pytest.fixture(scope="session")
def tiny_sae_dir(tmp_path_factory, tiny_plm) -> Path:
    """A small TopK SAE on the tiny PLM (resid_post@2) with two concept-bound latents."""
    from protsae_cli.sae.checkpoint import save_sae
    from protsae_cli.sae.config import ConceptEntry, SAEConfig
    from protsae_cli.sae.topk import TopKSAE

    cfg = SAEConfig(d_model=TINY_DIM, d_sae=64, k=8, hook_point="resid_post", layer=2, plm_name=tiny_plm.name,
                    plm_sha256=tiny_plm.sha256, plm_num_layers=tiny_plm.num_layers,
                    concepts=[ConceptEntry(latent=3, concept_id="PSC:T1", name="test concept one", threshold=0.0),
                              ConceptEntry(latent=7, concept_id="PSC:T2", name="test concept two",
                                           ontology_id="GO:0046872", threshold=0.0)])
    sae = TopKSAE(cfg)
    sae.reset_parameters(seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return save_sae(sae, tmp_path_factory.mktemp("sae") / "tiny_sae")


@pytest.fixture()
def small_fasta(tmp_path) -> Path:
    p = tmp_path / "small.fasta"
    p.write_text(">P1 first protein\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n>sp|P2/x second one\nmkvlaagiv*\n"
                 ">P1 duplicate id\nACDEFGHIKLMNPQRSTVWYXBUZO\n")
    return p


@pytest.fixture
def one_thread():
    """Tiny matmuls: intra-op threads only add contention on a loaded 2-core box (x70 slower), and one thread
    makes CPU results bit-reproducible, which the resume tests rely on."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def drop_cli_log_handlers():
    """CliRunner gives the CLI a temporary stderr; the log handler the CLI installs on it must not outlive it."""
    from protsae_cli.logging_setup import remove_handlers

    yield
    remove_handlers()
