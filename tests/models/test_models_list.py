"""`protsae models`: finds the bundled models, torch hub .pt files (never opened), HF cache snapshots and a models
directory, with sizes, checksums (lazy for large files) and SAE pairings."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import protsae_cli.models.catalog as ml
from protsae_cli.cli.app import build_app
from tests.plm.test_hf_esm import write_hf_dir

pytestmark = pytest.mark.usefixtures("drop_cli_log_handlers")


class _Boom:
    def __reduce__(self):
        return (os._exit, (99,))  # unpickling this file would end the test process


def _hub_snapshot(cache: Path, hub_id: str, src: Path, blob_name: str | None = None) -> Path:
    """huggingface_hub's layout; LFS blobs are named by their sha256 (blob_name overrides, to fake a bad one)."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    snap = repo / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in src.iterdir():
        name = hashlib.sha256(f.read_bytes()).hexdigest() if f.suffix == ".safetensors" else f"git{f.name}"
        if f.suffix == ".safetensors" and blob_name:
            name = blob_name
        shutil.copy(f, repo / "blobs" / name)
        os.symlink(os.path.relpath(repo / "blobs" / name, snap), snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    return snap


@pytest.fixture()
def machine(tmp_path, monkeypatch, torch_home, tiny_plm, tiny_esm_path, tiny_sae_dir):
    """A machine with one of everything: torch hub .pt (a pickle that must never be opened), an HF cache with
    an ESM-2 snapshot and a non-ESM repo, and a models dir with an HF folder, a .pt and two SAEs."""
    import torch

    hub = torch_home / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(_Boom(), hub / "esm2_t6_8M_UR50D.pt")
    (hub / "esm2_t6_8M_UR50D-contact-regression.pt").write_bytes(b"x")
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "PROTSAE_MODELS"):
        monkeypatch.delenv(var, raising=False)
    _hub_snapshot(cache, "facebook/esm2_t6_8M_UR50D", write_hf_dir(tmp_path / "src8m", tiny_plm.model, "x"))
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _hub_snapshot(cache, "google/bert", other)
    models = tmp_path / "models"
    write_hf_dir(models / "my_hf_esm", tiny_plm.model, "lab/esm2_tiny_ft")
    shutil.copy(tiny_esm_path, models / "esm2_tiny_test.pt")
    shutil.copytree(tiny_sae_dir, models / "saes" / "tiny_sae")
    cfg = json.loads((tiny_sae_dir / "config.json").read_text())
    cfg["plm"].update(name="esm2_t6_8M_UR50D", sha256="f" * 64)
    shutil.copytree(tiny_sae_dir, models / "saes" / "on_8m")
    (models / "saes" / "on_8m" / "config.json").write_text(json.dumps(cfg))
    cfg["plm"]["weights_sha256"] = "e" * 64  # trained by a protsae that records the weights digest
    shutil.copytree(tiny_sae_dir, models / "saes" / "on_8m_digest")
    (models / "saes" / "on_8m_digest" / "config.json").write_text(json.dumps(cfg))
    return models


def _by_name(entries):
    return {(e.kind, e.name, e.location): e for e in entries}


def test_lists_every_source_with_pairings(machine, tiny_plm):
    entries = ml.list_models(machine)
    got = _by_name(entries)
    assert ("plm", "esm2_t6_8M_standin", "bundled") in got and ("sae", "default_sae", "bundled") in got
    pt = got[("plm", "esm2_t6_8M_UR50D", "torch-hub-cache")]
    assert (pt.num_layers, pt.d_model, pt.format, pt.spec) == (6, 320, "fair-esm-pt", "esm2_t6_8M_UR50D")
    assert pt.size_bytes == Path(pt.path).stat().st_size
    assert not any("contact-regression" in e.path for e in entries)
    hf = got[("plm", "facebook/esm2_t6_8M_UR50D", "hf-cache")]
    assert hf.sha256_source == "hf-cache-blob" and hf.spec == "facebook/esm2_t6_8M_UR50D"
    assert not any("bert" in e.name for e in entries)  # not an ESM model
    mine = got[("plm", "lab/esm2_tiny_ft", "models-dir")]
    assert (mine.num_layers, mine.d_model) == (3, 32)
    assert got[("plm", "esm2_tiny_test", "models-dir")].sha256 == tiny_plm.sha256  # small: hashed, not opened
    tiny = got[("sae", "tiny_sae", "models-dir")]
    assert tiny.hook == "resid_post@2" and tiny.plm == "esm2_tiny_test"
    assert any("esm2_tiny_test [models-dir] (checksum matches)" in p for p in tiny.pairs_with)
    on8m = got[("sae", "on_8m", "models-dir")]
    pairs = " | ".join(on8m.pairs_with)
    assert "facebook/esm2_t6_8M_UR50D [hf-cache] (same release name, another file: annotate needs --no-check-plm)" \
        in pairs
    assert "esm2_t6_8M_UR50D [torch-hub-cache] (same release name, another file" in pairs  # small: hashed
    assert "facebook/esm2_t6_8M_UR50D [hf-cache] (same release name, another file: annotate compares the weights " \
        "digest the SAE records)" in got[("sae", "on_8m_digest", "models-dir")].pairs_with
    default = got[("sae", "default_sae", "bundled")]
    assert any("checksum matches" in p for p in default.pairs_with)


def test_checksums_lazy_for_large_files(machine, monkeypatch):
    monkeypatch.setattr(ml, "SMALL_FILE_BYTES", 0)
    lazy = _by_name(ml.list_models(machine))
    assert lazy[("plm", "esm2_tiny_test", "models-dir")].sha256 is None
    assert lazy[("plm", "facebook/esm2_t6_8M_UR50D", "hf-cache")].sha256_source == "hf-cache-blob"
    assert any("esm2_t6_8M_UR50D [torch-hub-cache] (same release name; checksum not computed (--checksums))" == p
               for p in lazy[("sae", "on_8m", "models-dir")].pairs_with)
    full = _by_name(ml.list_models(machine, checksums=True))
    for e in full.values():
        assert e.sha256 and e.sha256_source == "computed", e.name
        if len(e.weights) == 1:
            assert e.sha256 == hashlib.sha256(Path(e.weights[0]).read_bytes()).hexdigest()
    table = ml.to_table(list(lazy.values()))
    assert "--checksums" in table and "blob name" in table


def test_corrupted_cache_file_is_flagged(tmp_path, monkeypatch, torch_home, tiny_plm):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _hub_snapshot(cache, "facebook/esm2_t6_8M_UR50D", write_hf_dir(tmp_path / "s", tiny_plm.model, "x"),
                  blob_name="0" * 64)
    e = _by_name(ml.list_models(checksums=True))[("plm", "facebook/esm2_t6_8M_UR50D", "hf-cache")]
    assert any("corrupted" in n for n in e.notes)


def test_cli_table_and_json(machine, monkeypatch):
    runner = CliRunner()
    monkeypatch.setenv("PROTSAE_MODELS", str(machine))
    r = runner.invoke(build_app(), ["models"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "FORMAT", "WHERE", "SIZE", "SHA256", "SHAPE/HOOK", "USE", "AS"]
    assert any(ln.startswith("plm") and "facebook/esm2_t6_8M_UR50D" in ln and "--model facebook/" in ln
               for ln in lines)
    r = runner.invoke(build_app(), ["models", "--json", "--dir", str(machine)])
    assert r.exit_code == 0
    data = json.loads(r.output)
    assert {d["location"] for d in data} == {"bundled", "torch-hub-cache", "hf-cache", "models-dir"}
    r = runner.invoke(build_app(), ["models", "--dir", str(machine / "nope")])
    from protsae_cli.runtime import exit_status

    code, message, _ = exit_status(r.exception)  # what `protsae` exits with (main maps the exception)
    assert code == 3 and "models directory not found" in message
