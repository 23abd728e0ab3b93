"""SAE checkpoints: a directory of config.json + sae.safetensors (or one safetensors file with the config in
its metadata), written atomically, read with every shape checked before anything is allocated, and the
pairing check between an SAE and a PLM.

Weights are safetensors only: a downloaded SAE is data and must never run code (README.md, "No code from
data files").
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from protsae_cli.errors import InputError
from protsae_cli.io.checksum import file_sha256
from protsae_cli.sae.base import SAE, sae_class
from protsae_cli.sae.config import CONFIG_NAME, FORMAT, WEIGHTS_NAME, SAEConfig


def build_sae(cfg: SAEConfig) -> SAE:
    """Instantiate the class registered for cfg.arch (`sae.base.sae_class`)."""
    return sae_class(cfg.arch).from_config(cfg)


def save_sae(sae: SAE, out_dir: str | os.PathLike, card: str | None = None) -> Path:
    """Write config.json + sae.safetensors atomically: both are complete under temp names before either is
    renamed, weights first and config last (a directory with a config has its weights)."""
    from safetensors.torch import save_file

    from protsae_cli.io.atomic import AtomicFile, atomic_write_text, follow_umask

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sae.state_dict().items()}
    weights, config = AtomicFile(out / WEIGHTS_NAME), AtomicFile(out / CONFIG_NAME)
    try:
        save_file(tensors, str(weights.tmp), metadata={"format": FORMAT})
        follow_umask(weights.tmp)  # safetensors creates its files 0600
        with open(config.tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(sae.cfg.to_json_dict(), indent=2, sort_keys=False) + "\n")
        weights.commit()
        config.commit()
    finally:
        for af in (weights, config):
            if not af.done:  # something failed before both were in place: no temp is left behind
                af.discard()
    if card is not None:
        atomic_write_text(out / "README.md", card)
    return out


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[SAE, str]:
    """Load an SAE directory (or single .safetensors with embedded config). Returns (module, sha256 of weights)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from protsae_cli.sae import foreign as foreign_sae  # noqa: PLC0415 (it builds on this module)

    if foreign_sae.detect(path) is not None:  # InterPLM, InterProt, SAELens, sparsify, plm-sae (docs/FOREIGN_SAES.md)
        return foreign_sae.load(path, device)
    p = Path(path)
    if p.is_dir():
        cfg_path, w_path = p / CONFIG_NAME, p / WEIGHTS_NAME
        if not cfg_path.exists() or not w_path.exists():
            raise InputError(f"SAE directory {p} must contain {CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            cfg_dict = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{cfg_path}: invalid JSON ({e})") from e
        where = str(cfg_path)
    elif p.is_file():
        w_path = p
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error types
            raise InputError(f"{p}: not a safetensors file ({e})") from e
        if "config" not in meta:
            raise InputError(f"{p}: safetensors file has no embedded 'config' metadata; pass the SAE directory")
        cfg_dict = json.loads(meta["config"])
        where = str(p)
    else:
        raise InputError(f"SAE not found: {p}")
    cfg = SAEConfig.from_json_dict(cfg_dict, where=where)
    _check_shapes(cfg, w_path, where)
    sae = build_sae(cfg)
    state = load_file(str(w_path))
    missing, unexpected = sae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{w_path}: weights do not match config (missing {missing}, unexpected {unexpected})")
    return sae.to(device).eval(), file_sha256(w_path)


def _check_shapes(cfg: SAEConfig, w_path: Path, where: str) -> None:
    """Compare the config's tensors with the weight file's header before anything is allocated.

    A config is data a user downloaded: a wrong or hostile `d_sae` must be refused with a message, not turned
    into a petabyte allocation. The module is built on the meta device (shapes only, no memory) and its
    state-dict shapes are compared with the safetensors header, which is read without loading any tensor.
    """
    from safetensors import safe_open

    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_sae(cfg).state_dict().items()}
    except InputError as e:  # e.g. a ProtSAE option out of range: the config's fault, named as such
        raise InputError(f"{where}: {e}") from e
    try:
        with safe_open(str(w_path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors' own error types for a truncated or foreign file
        raise InputError(f"{w_path}: cannot read the weights header ({type(e).__name__}: {e})") from e
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {found[k]} (config implies {expected[k]})" for k in sorted(set(expected) & set(found))
             if found[k] != expected[k]]
    if missing or unexpected or wrong:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unexpected {', '.join(unexpected)}"] if unexpected else []) + \
                ([f"shape of {', '.join(wrong)}"] if wrong else [])
        raise InputError(f"{where} (d_model={cfg.d_model}, d_sae={cfg.d_sae}) does not match its weights "
                         f"{w_path}: {'; '.join(parts)}")
