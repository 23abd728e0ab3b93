"""What models are here: the bundled ones, fair-esm checkpoints in the torch hub cache, ESM-2 snapshots in the
Hugging Face cache, and a models directory (--dir or $PROTSAE_MODELS), with sizes, checksums and pairings.

Why a listing that loads nothing: the files it finds are whatever is on the machine, and a fair-esm `.pt` is a
pickle, so it is described from its name and size alone (never unpickled); everything else from JSON configs
and safetensors headers. Checksums of large files are not computed unless asked for (`checksums=True`): hashing a
2.5 GB ESM-2 650M file takes seconds per file (docs/MODELS.md has the measured rate). The Hugging Face cache
names each large (LFS) file's blob by its sha256, so those are shown without hashing, marked as the hub's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Files up to this size are hashed even without --checksums (the bundled models are 10-15 MB).
SMALL_FILE_BYTES = 64 << 20
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class ModelEntry:
    kind: str                      # "plm" | "sae"
    name: str
    format: str                    # protsae-safetensors, fair-esm-pt, hf-safetensors, hf-pickle-only, protsae-sae, ...
    location: str                  # bundled | torch-hub-cache | hf-cache | models-dir
    path: str
    spec: str                      # what to pass to --model / --sae
    size_bytes: int
    sha256: str | None = None
    sha256_source: str = ""        # "computed" | "hf-cache-blob" | "" (not computed)
    num_layers: int | None = None
    d_model: int | None = None
    hook: str | None = None        # SAEs: "resid_post@4"
    plm: str | None = None         # SAEs: the PLM name it records
    plm_sha256: str | None = None
    plm_weights_sha256: str | None = None  # SAEs: the format-independent weights digest it records (plm.digest)
    pairs_with: list[str] = field(default_factory=list)  # SAEs: listed PLMs it pairs with, and how
    notes: list[str] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)      # the weight files the size and sha256 are of


def models_dir_from_env() -> Path | None:
    v = os.environ.get("PROTSAE_MODELS")
    return Path(v).expanduser() if v else None


def list_models(models_dir: Path | None = None, checksums: bool = False) -> list[ModelEntry]:
    """Every model found, PLMs first, with SAE pairings resolved against the PLMs found."""
    from protsae_cli.errors import InputError

    entries = [*_bundled(), *_torch_hub(), *_hf_cache()]
    if models_dir is not None:
        if not models_dir.is_dir():
            raise InputError(f"models directory not found: {models_dir}")
        entries += _scan_dir(models_dir)
    for e in entries:
        _fill_sha(e, checksums)
    _resolve_pairs(entries)
    entries.sort(key=lambda e: (e.kind != "plm", e.location != "bundled", e.name, e.path))
    return entries


# -- finders ---------------------------------------------------------------------------------------------------
def _bundled() -> list[ModelEntry]:
    from protsae_cli.models import default_sae_dir, standin_plm_dir

    out = []
    plm = _protsae_plm_dir(standin_plm_dir(), "bundled")
    if plm:
        plm.spec = "standin"
        plm.notes.append("demonstration model, not ESM-2")
        out.append(plm)
    sae = _protsae_sae_dir(default_sae_dir(), "bundled")
    if sae:
        sae.spec = "(default)"
        out.append(sae)
    return out


def _torch_hub() -> list[ModelEntry]:
    from protsae_cli.plm.loading import ESM2_MODELS, torch_hub_checkpoints_dir

    d = torch_hub_checkpoints_dir()
    out = []
    for p in sorted(d.glob("*.pt")) if d.is_dir() else []:
        if p.name.endswith("-contact-regression.pt"):
            continue
        e = ModelEntry(kind="plm", name=p.stem, format="fair-esm-pt", location="torch-hub-cache", path=str(p),
                       spec=p.stem if p.stem in ESM2_MODELS else str(p), size_bytes=_size(p), weights=[str(p)])
        if p.stem in ESM2_MODELS:
            e.num_layers, e.d_model = ESM2_MODELS[p.stem]
        else:
            e.notes.append("not a fair-esm ESM-2 name: load it by path")
        out.append(e)
    return out


def _hf_cache() -> list[ModelEntry]:
    from protsae_cli.plm.hf_esm import hub_cache_dirs, snapshot_of

    out = []
    for cache in hub_cache_dirs():
        for repo in sorted(cache.glob("models--*")) if cache.is_dir() else []:
            snap = snapshot_of(repo)
            if snap is None:
                continue
            e = _hf_dir(snap, "hf-cache")
            if e:
                e.spec = e.name
                out.append(e)
    return out


def _hf_dir(d: Path, location: str) -> ModelEntry | None:
    from protsae_cli.plm.hf_esm import hf_model_name, is_hf_config

    cfg = _json(d / "config.json")
    if not is_hf_config(cfg):
        return None
    name = hf_model_name(d, cfg)
    weights = [d / "model.safetensors"] if (d / "model.safetensors").is_file() else []
    index = _json(d / "model.safetensors.index.json")
    if not weights and isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        weights = [d / s for s in sorted({str(v) for v in index["weight_map"].values()}) if (d / s).is_file()]
    e = ModelEntry(kind="plm", name=name, format="hf-safetensors", location=location, path=str(d), spec=str(d),
                   size_bytes=sum(_size(w) for w in weights), num_layers=_int(cfg.get("num_hidden_layers")),
                   d_model=_int(cfg.get("hidden_size")))
    if not weights:
        bins = sorted(d.glob("pytorch_model*.bin"))
        e.format, e.size_bytes = ("hf-pickle-only", sum(_size(b) for b in bins)) if bins else ("hf-no-weights", 0)
        e.notes.append("no model.safetensors: protsae cannot load it" + (" (convert the .bin)" if bins else ""))
    elif len(weights) == 1:
        blob = _blob_sha(weights[0])
        if blob:
            e.sha256, e.sha256_source = blob, "hf-cache-blob"
    else:
        e.notes.append(f"{len(weights)} shards (sha256 over the shard names and sha256s)")
    e.weights = [str(w) for w in weights]
    return e


def _protsae_plm_dir(d: Path, location: str) -> ModelEntry | None:
    cfg = _json(d / "config.json")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("name"), str) or "encoder_layers" not in cfg:
        return None
    w = d / f"{cfg['name']}.safetensors"
    if not w.is_file():
        return None
    e = ModelEntry(kind="plm", name=cfg["name"], format="protsae-safetensors", location=location, path=str(d),
                   spec=str(d), size_bytes=_size(w), num_layers=_int(cfg.get("encoder_layers")),
                   d_model=_int(cfg.get("encoder_embed_dim")))
    e.weights = [str(w)]
    return e


def _protsae_sae_dir(d: Path, location: str) -> ModelEntry | None:
    from protsae_cli.sae.config import CONFIG_NAME, WEIGHTS_NAME

    cfg = _json(d / CONFIG_NAME)
    w = d / WEIGHTS_NAME
    if not isinstance(cfg, dict) or cfg.get("format") != "protsae-sae" or not w.is_file():
        return None
    plm, hook = cfg.get("plm"), cfg.get("hook")
    plm = plm if isinstance(plm, dict) else {}
    hook = hook if isinstance(hook, dict) else {}
    e = ModelEntry(kind="sae", name=d.name, format=f"protsae-sae ({cfg.get('arch', '?')})", location=location,
                   path=str(d), spec=str(d), size_bytes=_size(w), d_model=_int(cfg.get("d_model")),
                   hook=f"{hook.get('point', '?')}@{hook.get('layer', '?')}", plm=str(plm.get("name") or "") or None,
                   plm_sha256=str(plm.get("sha256") or "") or None,
                   plm_weights_sha256=str(plm.get("weights_sha256") or "") or None)
    e.notes.append(f"d_sae {cfg.get('d_sae')}, k {cfg.get('k')}, {len(cfg.get('concepts') or [])} concepts")
    e.weights = [str(w)]
    return e


def _foreign_sae(p: Path, fmt: str, location: str) -> ModelEntry:
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*.safetensors"))
    e = ModelEntry(kind="sae", name=p.name, format=fmt, location=location, path=str(p), spec=str(p),
                   size_bytes=sum(_size(f) for f in files))
    cfg = _json(p / "cfg.json") if p.is_dir() else None
    if isinstance(cfg, dict):
        e.plm = cfg.get("model_name") if isinstance(cfg.get("model_name"), str) else None
        e.hook = cfg.get("hook_name") if isinstance(cfg.get("hook_name"), str) else None
    if fmt.endswith("pt") or fmt.startswith("interplm-or"):
        e.notes.append("a .pt file: read by --sae with torch.load(weights_only=True); not opened here")
    e.notes.append("published format: PLM/layer from its metadata when loaded, else --sae-plm/--sae-layer")
    if len(files) == 1:
        e.weights = [str(w) for w in files]
    return e


def _scan_dir(root: Path, max_depth: int = 4) -> list[ModelEntry]:
    """protsae PLM/SAE folders, HF ESM-2 folders (or a whole HF cache), fair-esm .pt files, published SAEs."""
    from protsae_cli.sae.foreign import detect

    out: list[ModelEntry] = []

    def visit(d: Path, depth: int) -> None:
        for found in (_protsae_sae_dir(d, "models-dir"), _protsae_plm_dir(d, "models-dir"), _hf_dir(d, "models-dir")):
            if found:
                out.append(found)
                return
        try:
            fmt = detect(d)
        except Exception:  # noqa: BLE001 - a folder that is no SAE is simply not listed
            fmt = None
        if fmt:
            out.append(_foreign_sae(d, fmt, "models-dir"))
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(d.iterdir())
        except OSError:
            return
        for c in children:
            if c.is_dir() and not c.name.startswith("."):
                visit(c, depth + 1)
            elif c.is_file() and c.suffix == ".pt" and not c.name.endswith("-contact-regression.pt"):
                out.append(_pt_file(c))
            elif c.is_file() and c.suffix == ".safetensors" and not (d / "config.json").exists():
                try:
                    fmt = detect(c)
                except Exception:  # noqa: BLE001
                    fmt = None
                if fmt:
                    out.append(_foreign_sae(c, fmt, "models-dir"))

    visit(root, 0)
    return out


def _pt_file(p: Path) -> ModelEntry:
    """A .pt in the models directory: a fair-esm checkpoint if it carries an ESM-2 name, else a possible SAE;
    never opened (a pickle), so this is what its name says, not what it holds."""
    from protsae_cli.plm.loading import ESM2_MODELS

    if p.stem in ESM2_MODELS or p.stem.startswith("esm2_"):
        e = ModelEntry(kind="plm", name=p.stem, format="fair-esm-pt", location="models-dir", path=str(p),
                       spec=str(p), size_bytes=_size(p), weights=[str(p)])
        if p.stem in ESM2_MODELS:
            e.num_layers, e.d_model = ESM2_MODELS[p.stem]
        e.notes.append("described by its file name (a pickle is never opened to list it)")
        return e
    return _foreign_sae(p, "interplm-or-interprot (.pt)", "models-dir")


# -- checksums and pairing -------------------------------------------------------------------------------------
def _fill_sha(e: ModelEntry, checksums: bool) -> None:
    from protsae_cli.io.checksum import file_sha256

    weights = [Path(w) for w in e.weights]
    if e.sha256_source == "hf-cache-blob" and not checksums:
        return
    if not weights or (not checksums and sum(_size(w) for w in weights) > SMALL_FILE_BYTES):
        return
    if len(weights) == 1:
        e.sha256 = file_sha256(weights[0])
    else:
        import hashlib

        lines = "".join(f"{w.name} {file_sha256(w)}\n" for w in weights)
        e.sha256 = hashlib.sha256(lines.encode()).hexdigest()
    if e.sha256_source == "hf-cache-blob" and e.sha256 != _blob_sha(weights[0]):
        e.notes.append("file does not match the sha256 its cache blob is named by: corrupted download")
    e.sha256_source = "computed"


def _resolve_pairs(entries: list[ModelEntry]) -> None:
    """For each SAE: the listed PLMs it pairs with. A checksum match is a pairing annotate accepts as is; a
    match of the ESM-2 release name only (the other file format, or a checksum not computed) needs the file
    checked, and annotate's checksum check refuses a different file unless --no-check-plm."""
    from protsae_cli.plm.loading import STANDIN_ALIASES, canonical_esm2_name

    plms = [e for e in entries if e.kind == "plm"]
    for s in (e for e in entries if e.kind == "sae"):
        if not s.plm:
            continue
        want = canonical_esm2_name("esm2_t6_8M_standin" if s.plm in STANDIN_ALIASES else s.plm)
        for p in plms:
            if s.plm_sha256 and p.sha256 == s.plm_sha256:
                s.pairs_with.append(f"{p.name} [{p.location}] (checksum matches)")
            elif canonical_esm2_name(p.name) == want:
                if p.sha256 and s.plm_sha256 and s.plm_weights_sha256:
                    why = "same release name, another file: annotate compares the weights digest the SAE records"
                elif p.sha256 and s.plm_sha256:
                    why = "same release name, another file: annotate needs --no-check-plm"
                elif s.plm_sha256:
                    why = "same release name; checksum not computed (--checksums)"
                else:
                    why = "same release name; the SAE records no checksum"
                s.pairs_with.append(f"{p.name} [{p.location}] ({why})")


# -- output ----------------------------------------------------------------------------------------------------
def to_json(entries: Iterable[ModelEntry]) -> str:
    return json.dumps([asdict(e) for e in entries], indent=2)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def to_table(entries: list[ModelEntry]) -> str:
    """Tab-free fixed-width table (one model a line, then its pairings/notes indented), for people."""
    head = ("KIND", "NAME", "FORMAT", "WHERE", "SIZE", "SHA256", "SHAPE/HOOK", "USE AS")
    rows = []
    for e in entries:
        sha = (e.sha256[:12] + ("*" if e.sha256_source == "hf-cache-blob" else "")) if e.sha256 else "-"
        shape = e.hook or (f"{e.num_layers}L x {e.d_model}" if e.num_layers and e.d_model else "-")
        flag = "--model" if e.kind == "plm" else "--sae"
        rows.append((e.kind, e.name, e.format, e.location, human_size(e.size_bytes), sha, shape, f"{flag} {e.spec}"))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    for e, r in zip(entries, rows, strict=True):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if e.kind == "sae" and e.plm:
            rec = f"    trained on {e.plm}" + (f" (sha256 {e.plm_sha256[:12]})" if e.plm_sha256 else "")
            lines.append(rec + "; pairs with: " + ("; ".join(e.pairs_with) if e.pairs_with else "no PLM listed here"))
        for n in e.notes:
            lines.append(f"    {n}")
    if not entries:
        lines.append("(no models found)")
    notes = []
    if any(e.sha256 is None and e.size_bytes > SMALL_FILE_BYTES for e in entries):
        notes.append(f"SHA256 '-': files over {SMALL_FILE_BYTES >> 20} MiB are hashed only with --checksums "
                     f"(seconds per GB)")
    if any(e.sha256_source == "hf-cache-blob" for e in entries):
        notes.append("SHA256 '*': the Hugging Face cache's blob name (the hub's sha256), not re-hashed here")
    return "\n".join(lines + notes) + "\n"


# -- helpers ---------------------------------------------------------------------------------------------------
def _json(p: Path) -> Any:
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _blob_sha(p: Path) -> str | None:
    """An HF cache snapshot file links to blobs/<sha256> for LFS files: the hub's checksum, free."""
    try:
        if p.is_symlink():
            name = Path(os.readlink(p)).name
            return name if _HEX64.match(name) else None
    except OSError:
        pass
    return None
