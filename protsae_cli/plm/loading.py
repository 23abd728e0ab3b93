"""Find and load an ESM-2 protein language model: by fair-esm name, by checkpoint path, or the shipped stand-in.

Real ESM-2 weights come from fair-esm's hub checkpoints (`<name>.pt`, a pickle holding an argparse Namespace, so
it needs `torch.load(weights_only=False)`; we do that deliberately, only for files the user pointed us at or
that fair-esm itself put in the torch hub cache under a fair-esm name). Never unpickled: a file found by a glob
(`--model DIR` holding a .pt), a file named inside an SAE's config (it records a model *name*, see
`recorded_plm_spec`), a file in the working directory that happens to carry a fair-esm name (names are looked up
in the hub cache only), and the contact-regression file beside a checkpoint (read with `weights_only=True`, else
skipped: protsae never predicts contacts). Offline machines get a message naming the exact files and folder to
fill, instead of a stack trace from a failed download.

Hugging Face (transformers) ESM-2 checkpoints load too, from safetensors only (hf_esm.py renames them into
fair-esm's layout and they are built as the same `ESM2`): a directory with config.json (model_type "esm") +
model.safetensors, or a hub id (`facebook/esm2_t33_650M_UR50D`, or `hf:ORG/NAME` to skip the path lookup) found
in the local Hugging Face cache. protsae never downloads those: a missing one is MissingWeightsError (exit 4).
An HF model is named by its hub id; `canonical_esm2_name` maps `facebook/esm2_X` and fair-esm's `esm2_X` to one
release name (docs/MODELS.md says what the pairing check does with the two formats' different checksums).
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from protsae_cli.errors import InputError, MissingWeightsError
from protsae_cli.io.checksum import file_sha256

#: fair-esm ESM-2 model names with (layers, width). 1-based layer L = output of block L.
ESM2_MODELS: dict[str, tuple[int, int]] = {
    "esm2_t6_8M_UR50D": (6, 320),
    "esm2_t12_35M_UR50D": (12, 480),
    "esm2_t30_150M_UR50D": (30, 640),
    "esm2_t33_650M_UR50D": (33, 1280),
    "esm2_t36_3B_UR50D": (36, 2560),
    "esm2_t48_15B_UR50D": (48, 5120),
}

#: Published checksums we know of (from third-party code; unverified against the files themselves).
KNOWN_SHA256: dict[str, str] = {
    "esm2_t6_8M_UR50D": "46f002a9870c9bdecd0ea887acb1f9a38a6b561e8f8bf8a6990b679b9d31b928",
}

STANDIN_ALIASES = ("standin", "esm2_t6_8M_standin", "default")
#: The organisation that publishes ESM-2 on the Hugging Face hub; its repos carry fair-esm's model names.
HF_ESM2_ORG = "facebook"
HF_PREFIX = "hf:"
FAIR_ESM_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"


@dataclass
class LoadedPLM:
    model: Any            # esm.model.esm2.ESM2, eval mode
    alphabet: Any         # esm.data.Alphabet
    name: str
    sha256: str
    source: str           # file the weights came from
    num_layers: int
    d_model: int
    format: str = "fair-esm"   # "fair-esm" (.pt), "protsae-safetensors" (stand-in layout) or "hf-safetensors"
    has_lm_head: bool = True    # False for an HF EsmModel checkpoint: no logits (steer/eval's fidelity need them)
    _weights_sha256: str | None = field(default=None, repr=False, compare=False)

    @property
    def weights_sha256(self) -> str:
        """Format-independent digest of the weights (`plm.digest`): equal for the same weights loaded from a
        fair-esm .pt, an HF safetensors snapshot or protsae's layout. Computed on first use, then kept."""
        if self._weights_sha256 is None:
            from protsae_cli.plm.digest import weights_sha256

            self._weights_sha256 = weights_sha256(self.model)
        return self._weights_sha256

    @property
    def release(self) -> str:
        """The ESM-2 release name shared by both formats (see `canonical_esm2_name`)."""
        return canonical_esm2_name(self.name)

    def describe(self) -> str:
        return f"{self.name} ({self.num_layers} layers, d_model {self.d_model}, sha256 {self.sha256[:12]}...)"


def torch_hub_checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def offline_mode() -> bool:
    return os.environ.get("PROTSAE_OFFLINE", "").lower() in {"1", "true", "yes"}


def canonical_esm2_name(name: str) -> str:
    """One name per ESM-2 release across formats: `facebook/esm2_t6_8M_UR50D` (HF) -> `esm2_t6_8M_UR50D`
    (fair-esm). Other names (fine-tunes, other orgs, the stand-in) are returned unchanged."""
    org, _, rest = name.partition("/")
    if org == HF_ESM2_ORG and rest in ESM2_MODELS:
        return rest
    return name


def load_plm(spec: str | None = None, device: str | torch.device = "cpu", verify_sha256: bool = False) -> LoadedPLM:
    """Resolve `spec` (None/'standin' -> shipped stand-in; a fair-esm ESM-2 name; a path; an HF hub id) and load it.

    A fair-esm name is resolved before any path: it means the torch hub cache's `<name>.pt`, never a file of
    that name in the working directory, which would be a pickle nobody pointed protsae at (`./NAME` still
    loads such a file on purpose). `verify_sha256` compares a fair-esm name's file against the published
    checksum when we know one. `ORG/NAME` that is no existing path, and `hf:ORG/NAME` always, is a hub id
    looked up in the local Hugging Face cache (safetensors only, never downloaded).
    """
    from protsae_cli.plm.hf_esm import HUB_ID

    if spec is None or spec in STANDIN_ALIASES:
        return _load_shipped_standin(device)
    if spec in ESM2_MODELS:
        return _load_by_name(spec, device, verify_sha256)
    if spec.startswith(HF_PREFIX):
        hub_id = spec[len(HF_PREFIX):]
        if not HUB_ID.match(hub_id):
            raise InputError(f"{spec!r}: a Hugging Face hub id is ORG/NAME, e.g. hf:facebook/esm2_t33_650M_UR50D")
        return _load_hub_id(hub_id, device)
    path = Path(spec).expanduser()
    if path.exists():
        return _load_from_path(path, device)
    if HUB_ID.match(spec) and not spec.endswith((".pt", ".safetensors", ".bin")):
        return _load_hub_id(spec, device, not_a_path=True)
    if spec.endswith((".pt", ".safetensors")) or "/" in spec:
        raise InputError(f"PLM checkpoint not found: {spec}")
    raise InputError(
        f"unknown PLM {spec!r}: give a fair-esm ESM-2 name ({', '.join(ESM2_MODELS)}), a checkpoint path, "
        f"a Hugging Face hub id in the local cache (e.g. facebook/esm2_t6_8M_UR50D), or 'standin' for the "
        f"bundled demonstration model")


def _build_esm2(name: str, model_data: dict[str, Any], source: str,
                regression_data: dict[str, Any] | None = None) -> tuple[Any, Any]:
    import esm

    if not isinstance(model_data, dict) or "model" not in model_data or "cfg" not in model_data:
        raise InputError(f"{source}: not a fair-esm checkpoint (expected a dict with 'cfg' and 'model')")
    # fair-esm picks the ESM-2 builder from the name prefix; any ESM-2 checkpoint is built by that path.
    core_name = name if name.startswith("esm2") else f"esm2_{name}"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Regression weights not found")
        try:
            model, alphabet = esm.pretrained.load_model_and_alphabet_core(core_name, model_data, regression_data)
        except (RuntimeError, KeyError, AttributeError) as e:
            raise InputError(f"{source}: could not build ESM-2 from checkpoint ({e})") from e
    return model, alphabet


def _finish(model: Any, alphabet: Any, name: str, sha: str, source: str, device) -> LoadedPLM:
    model = model.float().eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedPLM(model=model, alphabet=alphabet, name=name, sha256=sha, source=source,
                     num_layers=model.num_layers, d_model=model.embed_dim)


def _torch_load_checkpoint(path: Path) -> dict[str, Any]:
    # fair-esm checkpoints pickle an argparse.Namespace, which weights_only=True refuses; the user chose this
    # file (or fair-esm downloaded it), so we trust it as fair-esm itself would.
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:  # truncated download, wrong file type, ...
        raise InputError(f"{path}: cannot be read as a fair-esm checkpoint ({type(e).__name__}: {e})") from e


def _regression_beside(path: Path) -> dict[str, Any] | None:
    """fair-esm keeps contact-regression weights in '<stem>-contact-regression.pt' next to the model.

    That file is one protsae finds by itself (the user named only the model), so it is never unpickled: it is
    read with `weights_only=True` (a plain dict of tensors passes) and skipped with a warning otherwise.
    protsae never predicts contacts, so nothing is lost without it.
    """
    reg = path.with_name(path.stem + "-contact-regression.pt")
    if not reg.exists():
        return None
    try:
        return torch.load(str(reg), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for anything beyond tensors and plain containers
        warnings.warn(f"{reg}: not loaded (not a plain tensor file: {type(e).__name__}); contact prediction, "
                      "which protsae does not use, is unavailable", stacklevel=2)
        return None


def recorded_plm_spec(name: str, where: str) -> str | None:
    """The PLM to load for an SAE that records `name`, or None for the bundled stand-in.

    An SAE's config is data from wherever the user got it, so what it records may only *name* a model: the
    stand-in, a fair-esm ESM-2 name (then found in the torch hub cache and checked against the recorded
    checksum) or an HF hub id (then found in the HF cache, safetensors only, as `hf:ORG/NAME` so that a path of
    that name in the working directory is never read instead). A path there would make protsae unpickle a file
    nobody pointed it at, so it is refused.
    """
    from protsae_cli.plm.hf_esm import HUB_ID

    if not name or name in STANDIN_ALIASES:
        return None
    if name in ESM2_MODELS:
        return name
    if HUB_ID.match(name) and not name.endswith((".pt", ".safetensors", ".bin")):
        return HF_PREFIX + name
    raise InputError(f"{where} records PLM {name!r}, which is not a model name protsae loads by itself (the "
                     f"stand-in, one of {', '.join(ESM2_MODELS)}, or a Hugging Face hub id); pass --model with "
                     f"the checkpoint to use")


def _load_from_path(path: Path, device) -> LoadedPLM:
    if path.is_dir():
        from protsae_cli.plm.hf_esm import snapshot_of

        if (path / "snapshots").is_dir() and not (path / "config.json").exists():
            snap = snapshot_of(path)  # a models--ORG--NAME folder of the HF cache: its refs/main snapshot
            if snap is None:
                raise InputError(f"{path}: an HF cache repo folder without refs/main or a single snapshot; pass "
                                 f"--model {path}/snapshots/<revision>")
            path = snap
        cfg = path / "config.json"
        if cfg.exists():
            if _is_hf_dir(path):
                return _load_hf_dir(path, device)
            return _load_safetensors_dir(path, device)
        pts = sorted(p for p in path.glob("*.pt") if not p.name.endswith("-contact-regression.pt"))
        hint = f"; pass the checkpoint file itself, e.g. --model {pts[0]}" if pts else ""
        # A fair-esm .pt is a pickle: it is loaded only when the user names the file, never found by a glob.
        raise InputError(f"{path}: a directory without config.json; protsae loads a directory only in its "
                         f"safetensors layout (config.json + weights){hint}")
    if path.suffix == ".safetensors":
        if _is_hf_dir(path.parent):
            return _load_hf_dir(path.parent, device)
        return _load_safetensors_dir(path.parent, device, weights=path)
    if path.suffix == ".bin" and _is_hf_dir(path.parent):
        from protsae_cli.plm.hf_esm import weight_files

        weight_files(path.parent)  # refuses a pickle-only folder with the message saying what to do instead
    data = _torch_load_checkpoint(path)
    model, alphabet = _build_esm2(path.stem, data, str(path), _regression_beside(path))
    return _finish(model, alphabet, path.stem, file_sha256(path), str(path), device)


def _is_hf_dir(d: Path) -> bool:
    from protsae_cli.plm.hf_esm import is_hf_config

    try:
        return is_hf_config(json.loads((d / "config.json").read_text()))
    except (OSError, json.JSONDecodeError):
        return False


def _load_hub_id(hub_id: str, device, not_a_path: bool = False) -> LoadedPLM:
    from protsae_cli.plm.hf_esm import find_in_hub_cache

    return _load_hf_dir(find_in_hub_cache(hub_id, not_a_path), device, hub_id=hub_id)


def _load_hf_dir(d: Path, device, hub_id: str | None = None) -> LoadedPLM:
    """An HF ESM-2 directory built as fair-esm's ESM2 (see hf_esm.py for the key mapping)."""
    import logging

    import esm

    from protsae_cli.plm.hf_esm import (
        checkpoint_sha256,
        hf_to_fair_esm,
        load_state,
        open_checkpoint,
    )

    ck = open_checkpoint(d, hub_id)
    where = ", ".join(str(w) for w in ck.weights)
    state, has = hf_to_fair_esm(load_state(ck), ck.num_layers, where)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    model = esm.model.esm2.ESM2(num_layers=ck.num_layers, embed_dim=ck.d_model, attention_heads=ck.heads,
                                alphabet=alphabet, token_dropout=ck.token_dropout)
    if not has["lm_head"]:
        model.lm_head = _NoLMHead(ck.name, where)
    result = model.load_state_dict(state, strict=False)
    allowed = {k for k in result.missing_keys
               if k.startswith("contact_head.") or k.endswith("rot_emb.inv_freq")}
    if set(result.missing_keys) - allowed or result.unexpected_keys:  # hf_to_fair_esm checked; a guard, not a path
        raise InputError(f"{where}: does not fill fair-esm's ESM2: missing "
                         f"{sorted(set(result.missing_keys) - allowed)[:4]}, unexpected {result.unexpected_keys[:4]}")
    log = logging.getLogger("protsae.plm")
    log.debug("%s: %s; LM head %s, contact head %s, rotary inv_freq %s", d, "; ".join(ck.notes),
              has["lm_head"], has["contact_head"], "stored" if has["inv_freq"] else "computed")
    plm = _finish(model, alphabet, ck.name, checkpoint_sha256(ck), where, device)
    plm.format, plm.has_lm_head = "hf-safetensors", has["lm_head"]
    return plm


class _NoLMHead(torch.nn.Module):
    """Stands in for the LM head of an HF EsmModel checkpoint (no `lm_head.*` weights): hook activations need no
    head, but logits from a random head would be silently wrong, so asking for them is an error."""

    def __init__(self, name: str, where: str) -> None:
        super().__init__()
        self.name, self.where = name, where

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise InputError(f"{self.where}: {self.name} is an EsmModel checkpoint without an LM head (no lm_head.* "
                         f"weights), so it gives no logits; use its EsmForMaskedLM checkpoint for steering or "
                         f"fidelity metrics")


def _load_safetensors_dir(d: Path, device, weights: Path | None = None) -> LoadedPLM:
    """Our shipping format: fair-esm state dict in safetensors + a JSON of the architecture (no pickle)."""
    from argparse import Namespace

    from safetensors.torch import load_file

    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{d / 'config.json'}: cannot read PLM config ({e})") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("name"), str) or not cfg["name"]:
        raise InputError(f"{d / 'config.json'}: a PLM config needs a \"name\" (the model's name, a string)")
    weights = weights or d / f"{cfg['name']}.safetensors"
    if not weights.exists():
        raise MissingWeightsError(f"PLM weights missing: {weights}")
    _check_architecture(cfg, weights, d / "config.json")
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    ns = Namespace(encoder_layers=cfg["encoder_layers"], encoder_embed_dim=cfg["encoder_embed_dim"],
                   encoder_ffn_embed_dim=cfg["encoder_ffn_embed_dim"],
                   encoder_attention_heads=cfg["encoder_attention_heads"], token_dropout=cfg["token_dropout"])
    model, alphabet = _build_esm2(cfg["name"], {"cfg": {"model": ns}, "model": state}, str(weights))
    plm = _finish(model, alphabet, cfg["name"], file_sha256(weights), str(weights), device)
    plm.format = "protsae-safetensors"
    return plm


_ARCH_INTS = ("encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads")


def _check_architecture(cfg: dict, weights: Path, where: Path) -> None:
    """The config's sizes must be the weights' own, checked on the safetensors header before ESM-2 is built.

    The model is built from the config and only then filled with the weights, so a config claiming a width of
    a million would allocate terabytes before any mismatch surfaced: a downloaded config is data, checked
    like the SAE's (`sae._check_shapes`). Heads cannot be read from shapes; they must divide the width.
    """
    import re

    from safetensors import safe_open

    for key in _ARCH_INTS:
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InputError(f"{where}: {key} must be a positive integer, got {v!r}")
    if not isinstance(cfg.get("token_dropout"), bool):
        raise InputError(f"{where}: token_dropout must be true or false, got {cfg.get('token_dropout')!r}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {re.sub(r"^encoder\.", "", k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors' own error types for a truncated or foreign file
        raise InputError(f"{weights}: cannot read the weights header ({type(e).__name__}: {e})") from e
    embed, fc1 = shapes.get("embed_tokens.weight"), shapes.get("layers.0.fc1.weight")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"layers\.(\d+)\.", k))}
    if embed is None or fc1 is None or len(embed) != 2 or len(fc1) != 2:
        raise InputError(f"{weights}: not an ESM-2 state dict (no embed_tokens.weight / layers.0.fc1.weight)")
    found = {"encoder_layers": len(layers), "encoder_embed_dim": embed[1], "encoder_ffn_embed_dim": fc1[0]}
    wrong = [f"{k} {cfg[k]} (weights have {v})" for k, v in found.items() if cfg[k] != v]
    if layers != set(range(len(layers))):
        wrong.append(f"layer numbers {sorted(layers)} are not 0..{len(layers) - 1}")
    if cfg["encoder_embed_dim"] % cfg["encoder_attention_heads"]:
        wrong.append(f"encoder_attention_heads {cfg['encoder_attention_heads']} does not divide the width "
                     f"{cfg['encoder_embed_dim']}")
    if wrong:
        raise InputError(f"{where} does not match its weights {weights}: {'; '.join(wrong)}")


def _load_shipped_standin(device) -> LoadedPLM:
    from protsae_cli.models import standin_plm_dir

    return _load_safetensors_dir(standin_plm_dir(), device)


def _missing_message(name: str, hub: Path, reason: str) -> str:
    return (
        f"ESM-2 weights for {name} are not available offline ({reason}).\n"
        f"Put these files in {hub}/ (the torch hub cache; set TORCH_HOME to move it):\n"
        f"  {name}.pt                      from {FAIR_ESM_URL.format(name=name)}\n"
        f"  {name}-contact-regression.pt   (optional; only contact prediction needs it)\n"
        f"or pass the checkpoint path directly: --model /path/to/{name}.pt")


def _load_by_name(name: str, device, verify_sha256: bool) -> LoadedPLM:
    hub = torch_hub_checkpoints_dir()
    local = hub / f"{name}.pt"
    if not local.exists():
        if offline_mode():
            raise MissingWeightsError(_missing_message(name, hub, "PROTSAE_OFFLINE is set"))
        _download(name, hub)
    sha = file_sha256(local)
    if verify_sha256 and name in KNOWN_SHA256 and sha != KNOWN_SHA256[name]:
        raise InputError(f"{local}: sha256 {sha} does not match the published {KNOWN_SHA256[name]} for {name}; "
                         f"the file may be truncated or corrupted: delete it and download again")
    data = _torch_load_checkpoint(local)
    model, alphabet = _build_esm2(name, data, str(local), _regression_beside(local))
    return _finish(model, alphabet, name, sha, str(local), device)


def _download(name: str, hub: Path) -> None:
    """Fetch the checkpoint into the torch hub cache, where fair-esm itself would put it."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    partial = hub / f"{name}.pt.partial"
    try:
        hub.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(FAIR_ESM_URL.format(name=name), str(partial), progress=True)
        os.replace(partial, hub / f"{name}.pt")
    except Exception as e:  # URLError, timeouts, HTTP errors, read-only cache: all mean "not available"
        partial.unlink(missing_ok=True)
        raise MissingWeightsError(_missing_message(name, hub, f"download failed: {type(e).__name__}: {e}")) from e
    finally:
        socket.setdefaulttimeout(old)
