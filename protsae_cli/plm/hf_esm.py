"""Hugging Face (transformers) ESM-2 checkpoints -> fair-esm's ESM2 state dict, and the local HF cache lookup.

Why convert instead of running transformers: every hook, layer number and attention path in protsae is written
against fair-esm's `ESM2` module (esm_forward.py drives its submodules), so an HF checkpoint is renamed into that
layout and built as the same `ESM2`; one code path then serves both formats and their activations agree.

The renaming is the inverse of transformers' `convert_esm.py` (fair-esm -> HF), read from
huggingface/transformers `src/transformers/models/esm/{convert_esm,modeling_esm}.py`:

    HF (EsmModel; EsmForMaskedLM adds the "esm." prefix)      fair-esm ESM2
    embeddings.word_embeddings.weight                         embed_tokens.weight
    encoder.layer.N.attention.self.{query,key,value}.*        layers.N.self_attn.{q,k,v}_proj.*
    encoder.layer.N.attention.self.rotary_embeddings.inv_freq layers.N.self_attn.rot_emb.inv_freq
    encoder.layer.N.attention.output.dense.*                  layers.N.self_attn.out_proj.*
    encoder.layer.N.attention.LayerNorm.*                     layers.N.self_attn_layer_norm.*
    encoder.layer.N.intermediate.dense.*                      layers.N.fc1.*
    encoder.layer.N.output.dense.*                            layers.N.fc2.*
    encoder.layer.N.LayerNorm.*                               layers.N.final_layer_norm.*
    encoder.emb_layer_norm_after.*                            emb_layer_norm_after.*
    contact_head.regression.*                                 contact_head.regression.*
    lm_head.{dense,layer_norm}.*, lm_head.bias (no prefix)    lm_head.{dense,layer_norm}.*, lm_head.bias
    lm_head.decoder.weight (tied; usually not stored)         lm_head.weight (fair-esm ties it to embed_tokens)

transformers 5 saves two things differently (its conversion_mapping.py, seen in a 5.25 save_pretrained file): one
shared `encoder.layer.*.attention.self.rotary_embeddings.inv_freq` (a literal `*`; in memory
`rotary_embeddings.inv_freq`), copied to every layer as transformers itself does on load, and the block layer
norms as `LayerNorm.gamma`/`LayerNorm.beta` (its "legacy" renaming), read as weight/bias.

Dropped: `embeddings.position_ids` (a buffer older transformers saved), `pooler.*` and `classifier.*` (heads
protsae never runs). Anything else is refused by name, so a checkpoint of another architecture cannot load
half-renamed. Only safetensors are read (never pickles); the config is checked against what fair-esm's ESM2 can
express (rotary positions, no embedding layer norm, GELU, FFN 4x width, LayerNorm eps 1e-5, ESM-1b alphabet).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protsae_cli.errors import InputError, MissingWeightsError

#: fair-esm's ESM-1b/ESM-2 alphabet, in token-id order (esm.data.Alphabet.from_architecture("ESM-1b").all_toks).
#: An HF vocab in any other order would feed the embedding rows the wrong residues.
ESM_ALPHABET: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>", "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F",
    "Y", "M", "H", "W", "C", "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_LAYER_MAP = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.self.rotary_embeddings": "self_attn.rot_emb",
    "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}
_TOP_MAP = {
    "embeddings.word_embeddings.weight": "embed_tokens.weight",
    "encoder.emb_layer_norm_after.weight": "emb_layer_norm_after.weight",
    "encoder.emb_layer_norm_after.bias": "emb_layer_norm_after.bias",
    "contact_head.regression.weight": "contact_head.regression.weight",
    "contact_head.regression.bias": "contact_head.regression.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "lm_head.bias",
}
_DROPPED = re.compile(r"^(embeddings\.position_ids|pooler\..*|classifier\..*)$")
_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|inv_freq|gamma|beta)$")
#: transformers >= 5 keeps one rotary inv_freq for the whole model and saves it under a wildcard key (its
#: conversion_mapping.py "esm" entry); older files have one per layer. All layers share the same values.
_SHARED_INV_FREQ = ("encoder.layer.*.attention.self.rotary_embeddings.inv_freq", "rotary_embeddings.inv_freq")
#: transformers' "legacy" renaming, which it applies to ESM on load (and writes back on save): LayerNorm.gamma/beta.
_LEGACY_LEAF = {"gamma": "weight", "beta": "bias"}


@dataclass
class HFEsmCheckpoint:
    """An HF ESM-2 checkpoint found on disk: where its files are and what its config says."""

    directory: Path
    config: dict[str, Any]
    weights: list[Path]           # model.safetensors, or the shards an index names
    name: str                     # HF name (hub id) used for provenance and pairing
    num_layers: int = 0
    d_model: int = 0
    heads: int = 0
    token_dropout: bool = True
    notes: list[str] = field(default_factory=list)


def is_hf_config(cfg: Any) -> bool:
    return isinstance(cfg, dict) and cfg.get("model_type") == "esm"


def hub_cache_dirs() -> list[Path]:
    """Where huggingface_hub keeps downloaded repos, in its own precedence order (HF_HUB_CACHE, the legacy
    HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub); all that are
    set are searched so a message can name every folder looked in."""
    env = os.environ
    out: list[Path] = []
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            out.append(Path(env[var]).expanduser())
    if env.get("HF_HOME"):
        out.append(Path(env["HF_HOME"]).expanduser() / "hub")
    if env.get("XDG_CACHE_HOME"):
        out.append(Path(env["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub")
    out.append(Path("~/.cache/huggingface/hub").expanduser())
    seen: list[Path] = []
    for p in out:
        if p not in seen:
            seen.append(p)
    return seen


def repo_folder_name(hub_id: str) -> str:
    return "models--" + hub_id.replace("/", "--")


def snapshot_of(repo_dir: Path) -> Path | None:
    """The snapshot refs/main points at, else the only snapshot; None when neither identifies one."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        rev = ref.read_text().strip()
        snap = repo_dir / "snapshots" / rev
        if rev and snap.is_dir():
            return snap
    snaps = sorted(p for p in (repo_dir / "snapshots").glob("*") if p.is_dir())
    return snaps[0] if len(snaps) == 1 else None


def find_in_hub_cache(hub_id: str, not_a_path: bool = False) -> Path:
    """The local snapshot directory of `hub_id`. protsae never downloads: a missing one names the folders
    searched and the command that fetches exactly the files protsae reads."""
    searched = []
    for cache in hub_cache_dirs():
        repo = cache / repo_folder_name(hub_id)
        searched.append(str(repo))
        if repo.is_dir():
            snap = snapshot_of(repo)
            if snap is None:
                snaps = sorted(p.name for p in (repo / "snapshots").glob("*"))
                raise InputError(f"{repo}: no refs/main and {len(snaps)} snapshots ({', '.join(snaps) or 'none'}); "
                                 f"pass the snapshot directory itself: --model {repo}/snapshots/<revision>")
            return snap
    raise MissingWeightsError(
        f"Hugging Face checkpoint {hub_id} is not in the local cache (protsae never downloads it"
        f"{'; nor is it a path here' if not_a_path else ''}); searched "
        f"{', '.join(searched)}. Fetch it on a machine with network access: `hf download {hub_id} config.json "
        f"model.safetensors` (or huggingface-cli download; set HF_HOME/HF_HUB_CACHE to choose the cache), or pass "
        f"a directory holding config.json + model.safetensors: --model DIR")


def name_from_location(d: Path) -> str | None:
    """`org/name` when `d` is a snapshot inside an HF cache (…/models--org--name/snapshots/<rev>)."""
    parts = d.resolve().parts if d.exists() else d.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        pieces = parts[-3][len("models--"):].split("--")
        if len(pieces) >= 2:
            return pieces[0] + "/" + "--".join(pieces[1:])
    return None


def hf_model_name(d: Path, cfg: dict[str, Any], hub_id: str | None = None) -> str:
    """The HF name for provenance: the hub id asked for, the cache layout's repo, else config `_name_or_path`.

    `_name_or_path` records where transformers loaded the model from, a hub id or a local path (the official
    8M config says "/tmp/facebook/esm2_t6_8M_UR50D"): a path keeps its last two components, which is the hub id
    of a snapshot saved under its org/name. A bare local directory without either gets its own folder name.
    """
    if hub_id:
        return hub_id
    from_cache = name_from_location(d)
    if from_cache:
        return from_cache
    recorded = cfg.get("_name_or_path")
    if isinstance(recorded, str) and recorded.strip():
        recorded = recorded.strip().rstrip("/")
        if HUB_ID.match(recorded):
            return recorded
        parts = Path(recorded).parts
        if len(parts) >= 2 and HUB_ID.match("/".join(parts[-2:])):
            return "/".join(parts[-2:])
        if parts:
            return parts[-1]
    return d.resolve().name


def _int_field(cfg: dict, key: str, where: Path) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise InputError(f"{where}: {key} must be a positive integer, got {v!r}")
    return v


def check_hf_config(cfg: dict[str, Any], where: Path) -> tuple[int, int, int, bool]:
    """(layers, width, heads, token_dropout) of an HF ESM config that fair-esm's ESM2 can express exactly."""
    layers = _int_field(cfg, "num_hidden_layers", where)
    width = _int_field(cfg, "hidden_size", where)
    heads = _int_field(cfg, "num_attention_heads", where)
    ffn = _int_field(cfg, "intermediate_size", where)
    wrong = []
    if cfg.get("is_folding_model"):
        wrong.append("is_folding_model is true (ESMFold, not an ESM-2 language model)")
    if cfg.get("position_embedding_type", "absolute") != "rotary":
        wrong.append(f"position_embedding_type {cfg.get('position_embedding_type', 'absolute')!r} (ESM-2 is "
                     f"'rotary'; ESM-1b/1v checkpoints are not ESM-2)")
    if cfg.get("emb_layer_norm_before"):
        wrong.append("emb_layer_norm_before is true (ESM-2 has no embedding layer norm)")
    if cfg.get("hidden_act", "gelu") != "gelu":
        wrong.append(f"hidden_act {cfg.get('hidden_act')!r} (ESM-2 uses gelu)")
    eps = cfg.get("layer_norm_eps", 1e-12)
    if not isinstance(eps, (int, float)) or abs(float(eps) - 1e-5) > 1e-12:
        wrong.append(f"layer_norm_eps {eps!r} (fair-esm's ESM2 uses 1e-5)")
    if ffn != 4 * width:
        wrong.append(f"intermediate_size {ffn} is not 4 x hidden_size {width} (fixed in ESM-2)")
    theta = cfg.get("rope_theta", 10000.0)
    if not isinstance(theta, (int, float)) or float(theta) != 10000.0:
        wrong.append(f"rope_theta {theta!r} (fair-esm's rotary embedding uses 10000)")
    if width % heads:
        wrong.append(f"num_attention_heads {heads} does not divide hidden_size {width}")
    if cfg.get("vocab_size") != len(ESM_ALPHABET):
        wrong.append(f"vocab_size {cfg.get('vocab_size')!r} (ESM-2's alphabet has {len(ESM_ALPHABET)} tokens)")
    for key, want in (("pad_token_id", 1), ("mask_token_id", 32)):
        if key in cfg and cfg[key] is not None and cfg[key] != want:
            wrong.append(f"{key} {cfg[key]!r} (fair-esm's alphabet has {want})")
    td = cfg.get("token_dropout", False)
    if not isinstance(td, bool):
        wrong.append(f"token_dropout {td!r} is not true/false")
    if wrong:
        raise InputError(f"{where}: not an ESM-2 checkpoint protsae can run as fair-esm's ESM2: {'; '.join(wrong)}")
    return layers, width, heads, td


def check_vocab(d: Path, cfg: dict[str, Any]) -> str:
    """Refuse a vocabulary whose order differs from fair-esm's alphabet; say what was checked.

    Token ids index the embedding rows, so a reordered vocab would silently embed the wrong residues. A model
    saved without its tokenizer (only config.json + weights, as `save_pretrained` of the model writes) has no
    vocab.txt: then the config's vocab_list, else vocab_size/pad/mask ids (checked in `check_hf_config`).
    """
    vocab_file = d / "vocab.txt"
    if vocab_file.is_file():
        toks = [t.strip() for t in vocab_file.read_text().splitlines() if t.strip()]
        source = str(vocab_file)
    elif isinstance(cfg.get("vocab_list"), (list, tuple)):
        toks, source = [str(t) for t in cfg["vocab_list"]], f"{d / 'config.json'} vocab_list"
    else:
        return "no vocab.txt or vocab_list: ESM-2's alphabet assumed from vocab_size 33 and the pad/mask ids"
    if tuple(toks) != ESM_ALPHABET:
        # strict=False: the vocab may be shorter or longer; then the first id past the shorter one differs.
        first = next((i for i, (a, b) in enumerate(zip(toks, ESM_ALPHABET, strict=False)) if a != b),
                     min(len(toks), 33))
        got = toks[first] if first < len(toks) else "(end)"
        want = ESM_ALPHABET[first] if first < len(ESM_ALPHABET) else "(end)"
        raise InputError(f"{source}: token order differs from fair-esm's ESM-2 alphabet at id {first} ({got!r}, "
                         f"expected {want!r}; {len(toks)} tokens): the embedding rows would mean other residues")
    return f"vocab order checked against fair-esm's alphabet ({source})"


def weight_files(d: Path) -> list[Path]:
    """model.safetensors, or the shards of model.safetensors.index.json; a pickle-only folder is refused."""
    single = d / "model.safetensors"
    if single.is_file():
        return [single]
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            shards = sorted({str(v) for v in wm.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{index}: cannot read the shard index ({type(e).__name__}: {e})") from e
        paths = []
        for s in shards:
            p = d / s
            if Path(s).name != s or not p.is_file():
                raise MissingWeightsError(f"{index} names shard {s!r}, which is not in {d}")
            paths.append(p)
        return paths
    pickles = sorted(p.name for p in d.glob("pytorch_model*.bin"))
    if pickles:
        raise InputError(f"{d}: only {', '.join(pickles)} (a pickle) and no model.safetensors; protsae reads HF "
                         f"checkpoints as safetensors only: convert it (transformers: model.save_pretrained(DIR, "
                         f"safe_serialization=True)) or pass fair-esm's .pt: --model /path/to/esm2_....pt")
    raise MissingWeightsError(f"{d}: no model.safetensors beside config.json")


def open_checkpoint(d: Path, hub_id: str | None = None) -> HFEsmCheckpoint:
    """Read and check an HF ESM-2 directory's config and vocab without reading any weights."""
    cfg_path = d / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg_path}: cannot read the model config ({e})") from e
    if not is_hf_config(cfg):
        raise InputError(f"{cfg_path}: model_type is {cfg.get('model_type') if isinstance(cfg, dict) else None!r}, "
                         f"not 'esm'")
    layers, width, heads, td = check_hf_config(cfg, cfg_path)
    note = check_vocab(d, cfg)
    ck = HFEsmCheckpoint(directory=d, config=cfg, weights=weight_files(d), name=hf_model_name(d, cfg, hub_id),
                         num_layers=layers, d_model=width, heads=heads, token_dropout=td, notes=[note])
    _check_header_shapes(ck)
    return ck


def _strip_prefix(keys: list[str]) -> dict[str, str]:
    """HF key -> key without the EsmForMaskedLM/EsmFor* "esm." prefix (an EsmModel has none)."""
    return {k: k.removeprefix("esm.") for k in keys}


def _check_header_shapes(ck: HFEsmCheckpoint) -> None:
    """Shapes from the safetensors headers against the config, before any tensor is allocated (a config is data)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for w in ck.weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                for k in f.keys():
                    shapes[k] = tuple(f.get_slice(k).get_shape())
        except Exception as e:  # safetensors' own error types for a truncated or foreign file
            raise InputError(f"{w}: cannot read the weights header ({type(e).__name__}: {e})") from e
    bare = {v: shapes[k] for k, v in _strip_prefix(list(shapes)).items()}
    h, n = ck.d_model, ck.num_layers
    expect = {"embeddings.word_embeddings.weight": (len(ESM_ALPHABET), h)}
    for i in range(n):
        expect[f"encoder.layer.{i}.attention.self.query.weight"] = (h, h)
        expect[f"encoder.layer.{i}.intermediate.dense.weight"] = (4 * h, h)
    wrong = [f"{k} {bare.get(k, 'missing')} (config implies {v})" for k, v in expect.items() if bare.get(k) != v]
    layers = {int(m.group(1)) for k in bare if (m := _LAYER_KEY.match(k))}
    if layers and layers != set(range(n)):
        wrong.append(f"layer numbers {min(layers)}..{max(layers)} ({len(layers)} of them) are not 0..{n - 1} "
                     f"(num_hidden_layers {n})")
    if wrong:
        raise InputError(f"{ck.directory / 'config.json'} does not match its weights "
                         f"{', '.join(str(w) for w in ck.weights)}: {'; '.join(wrong[:4])}")


def hf_to_fair_esm(state: dict[str, Any], num_layers: int, where: str) -> tuple[dict[str, Any], dict[str, bool]]:
    """Rename an HF ESM-2 state dict into fair-esm's ESM2 keys.

    Returns the fair-esm state dict and what it holds: {"lm_head": ..., "contact_head": ..., "inv_freq": ...}.
    The tied LM decoder is fair-esm's `lm_head.weight`, the same tensor as `embed_tokens.weight`; an untied
    decoder that differs from the embeddings cannot be expressed by fair-esm's ESM2 and is refused.
    """
    import torch

    out: dict[str, Any] = {}
    unknown: list[str] = []
    decoder = shared_inv_freq = None
    for hf_key, key in _strip_prefix(list(state)).items():
        t = state[hf_key]
        if key in _TOP_MAP:
            out[_TOP_MAP[key]] = t
        elif key == "lm_head.decoder.weight":
            decoder = t
        elif key in _SHARED_INV_FREQ:
            shared_inv_freq = t
        elif m := _LAYER_KEY.match(key):
            i, mod, leaf = int(m.group(1)), m.group(2), m.group(3)
            target = _LAYER_MAP.get(mod)
            if leaf in _LEGACY_LEAF and mod.endswith("LayerNorm"):
                leaf = _LEGACY_LEAF[leaf]
            if (target is None or i >= num_layers or leaf in _LEGACY_LEAF
                    or (leaf == "inv_freq") != (mod == "attention.self.rotary_embeddings")):
                unknown.append(hf_key)
            elif f"layers.{i}.{target}.{leaf}" in out:
                raise InputError(f"{where}: {hf_key} is stored twice (as .weight/.bias and .gamma/.beta)")
            else:
                out[f"layers.{i}.{target}.{leaf}"] = t
        elif not _DROPPED.match(key):
            unknown.append(hf_key)
    if shared_inv_freq is not None:
        for i in range(num_layers):
            out.setdefault(f"layers.{i}.self_attn.rot_emb.inv_freq", shared_inv_freq)
    if unknown:
        raise InputError(f"{where}: keys that are not part of an HF ESM-2 (EsmModel/EsmForMaskedLM) checkpoint: "
                         f"{', '.join(sorted(unknown)[:6])}{' ...' if len(unknown) > 6 else ''}")
    lm_keys = [v for v in _TOP_MAP.values() if v.startswith("lm_head.")]
    has_lm = [k in out for k in lm_keys]
    if any(has_lm) and not all(has_lm):
        raise InputError(f"{where}: an incomplete LM head (missing "
                         f"{', '.join(k for k, h in zip(lm_keys, has_lm, strict=True) if not h)})")
    emb = out.get("embed_tokens.weight")
    if emb is None:
        raise InputError(f"{where}: no embeddings.word_embeddings.weight (not an ESM-2 checkpoint)")
    if decoder is not None and not torch.equal(decoder.to(emb.dtype), emb):
        raise InputError(f"{where}: lm_head.decoder.weight differs from the word embeddings; fair-esm's ESM2 ties "
                         f"them, so this untied LM head cannot be reproduced")
    if all(has_lm):
        out["lm_head.weight"] = emb
    missing = []
    for i in range(num_layers):  # inv_freq may be absent: fair-esm then computes it as transformers would
        missing += [f"layers.{i}.{t}.{leaf}" for t in _LAYER_MAP.values() if t != "self_attn.rot_emb"
                    for leaf in ("weight", "bias") if f"layers.{i}.{t}.{leaf}" not in out]
    missing += [k for k in ("emb_layer_norm_after.weight", "emb_layer_norm_after.bias") if k not in out]
    if missing:
        raise InputError(f"{where}: missing {len(missing)} ESM-2 weights, e.g. {', '.join(missing[:4])}")
    has = {"lm_head": all(has_lm), "contact_head": "contact_head.regression.weight" in out,
           "inv_freq": any(k.endswith("rot_emb.inv_freq") for k in out)}
    return out, has


def load_state(ck: HFEsmCheckpoint) -> dict[str, Any]:
    """All tensors of the checkpoint as float32 (HF files may be stored in float16/bfloat16)."""
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for w in ck.weights:
        for k, v in load_file(str(w)).items():
            if k in state:
                raise InputError(f"{w}: tensor {k} also appears in another shard")
            state[k] = v.float() if v.is_floating_point() else v
    return state


def checkpoint_sha256(ck: HFEsmCheckpoint) -> str:
    """sha256 of model.safetensors; for a sharded checkpoint, of the lines '<shard name> <shard sha256>'."""
    import hashlib

    from protsae_cli.io.checksum import file_sha256

    if len(ck.weights) == 1:
        return file_sha256(ck.weights[0])
    lines = "".join(f"{w.name} {file_sha256(w)}\n" for w in ck.weights)
    return hashlib.sha256(lines.encode()).hexdigest()
