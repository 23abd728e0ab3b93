"""Merge shard outputs into one output set, ordered by input ordinal.

Three producers feed this module: `annotate --shard i/n` runs (one per cluster job), the per-chunk part files
of `annotate --resume`, and the per-GPU workers of `annotate --devices`. All of them write HDF5, which holds
everything (codes, segments, protein table, provenance), so the merged TSV and GFF3 are *regenerated* from the
merged HDF5 stream rather than concatenated: the result then equals an unsharded run's output, including the
GFF3 feature IDs and the TSV row order. Text shards (TSV/GFF3 only) are merged line-wise for users who kept
nothing else.

Refusals are the point of this module as much as the merging: shards made with another PLM, SAE, hook, layer
or calling option would merge into a file that looks fine and means nothing, and two shards holding the same
ordinal mean the shard set is wrong (a repeated shard, or inputs that were split into separate FASTA files and
need `--renumber`). Each refusal names the file.
"""

from __future__ import annotations

import gzip
import heapq
import io
import logging
import math
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from protsae_cli.errors import InputError
from protsae_cli.io.fasta import InputIdentity
from protsae_cli.io.results import ProteinResult, Segment
from protsae_cli.sae.config import ConceptEntry  # torch-free: merge stays fast on CPU-only nodes
from protsae_cli.io.writers import (DEFAULT_FORMATS, INPUT_IDENTITY_KEYS, identity_trailer, open_writers,
                                 output_paths, prepare_output_prefix, read_identity_trailer)

log = logging.getLogger("protsae.merge")

# Root attributes in the order `Annotator.provenance` emits them, so a GFF3 regenerated from merged HDF5 lists
# its `#key value` provenance lines in the same order as a direct run's (tests/annotate/test_merge_resume.py checks this
# list against the annotator, so a key added there cannot be silently forgotten here).
PROVENANCE_ORDER: tuple[str, ...] = (
    "format", "format_version", "protsae_version", "command", "plm_model", "plm_sha256", "hook_point", "layer",
    "layer_semantics", "sae_id", "sae_sha256", "d_model", "d_sae", "k", "sae_arch", "dtype", "device_type",
    "backend", "compute_dtype", "long_policy", "max_window", "window_overlap", "min_segment_len", "merge_gap",
    "calling_policy", "concepts_withheld", "decode", "decode_constraints", "coordinate_system", "shard",
)
# Keys that change what the numbers mean: shards disagreeing on any of them are refused.
STRICT_KEYS: tuple[str, ...] = (
    "format_version", "plm_model", "plm_sha256", "hook_point", "layer", "sae_sha256", "d_model", "d_sae", "k",
    "sae_arch", "dtype", "compute_dtype", "long_policy", "max_window", "window_overlap", "min_segment_len",
    "merge_gap", "decode",
)
# Keys that may legitimately differ between shards (a CPU and a GPU node, a renamed SAE directory); the merged
# file records every value seen, comma-separated, rather than pretending there was one.
MIXED_KEYS: tuple[str, ...] = ("protsae_version", "sae_id", "device_type", "backend")
# Keys that describe one invocation and are rewritten for the merged output.
PER_RUN_KEYS: tuple[str, ...] = ("command", "shard")

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@dataclass
class MergeSummary:
    proteins: int = 0
    segments: int = 0
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------

def canonical_result(res: ProteinResult) -> ProteinResult:
    """The result as HDF5 stores it: segment statistics and thresholds rounded to float32.

    Text outputs of a direct run must equal those regenerated from HDF5 (resume parts, merged shards), and
    ``%.4g`` of a float64 mean can differ from ``%.4g`` of the same mean stored as float32 when it sits on a
    rounding boundary. Rounding once, before any writer sees the record, makes both paths print the same
    digits; it changes no value beyond what the HDF5 file keeps anyway.
    """
    if not res.segments:
        return res
    f32 = np.float32
    res.segments = [Segment(latent=s.latent, start=s.start, end=s.end, max_act=float(f32(s.max_act)),
                            mean_act=float(f32(s.mean_act)), threshold=float(f32(s.threshold)))
                    for s in res.segments]
    return res


def combine_shards(values: Sequence[str]) -> str:
    """The `shard` attribute of a merge: "" when the shards add up to everything, else what they cover.

    Shards "i/n" of one n are collected; if they are all n of them the result is complete (""). A subset that
    is exactly one coarser shard (sub-shards of `--devices` workers inside an `--shard 2/4` job: 2/8 and 6/8)
    collapses to it ("2/4"); any other subset is listed ("1,3/8") so an incomplete merge is visible. Inputs
    without a shard value are whole runs (or resume parts), which say nothing about coverage: "".
    """
    parsed: list[tuple[int, int]] = []
    for v in values:
        v = (v or "").strip()
        if not v:
            return ""
        m = re.fullmatch(r"([\d,]+)/(\d+)", v)
        if not m:
            return ""
        n = int(m.group(2))
        parsed.extend((int(i), n) for i in m.group(1).split(","))
    ns = {n for _, n in parsed}
    if len(ns) != 1:
        return ",".join(sorted({f"{i}/{n}" for i, n in parsed}))
    n = ns.pop()
    residues = sorted({i - 1 for i, _ in parsed})
    for d in range(1, n + 1):  # the coarsest description first: d=1 means "everything"
        if n % d or len(residues) != n // d:
            continue
        r0 = residues[0] % d
        if all(r % d == r0 for r in residues):
            return "" if d == 1 else f"{r0 + 1}/{d}"
    return ",".join(str(r + 1) for r in residues) + f"/{n}"


def check_input_identity(identities: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """The one input all shards were cut from, refusing shards of different inputs (naming both files).

    Returns the shared identity entries, or ``{}`` when some input does not record one (written by a protsae
    before identities existed, or a resume part): those are merged with a warning, as before.
    """
    present = [(i, n) for i, n in zip(identities, names, strict=True) if all(k in i for k in INPUT_IDENTITY_KEYS)]
    for ident, name in present[1:]:
        ref, ref_name = present[0]
        if any(str(_norm(ident[k])) != str(_norm(ref[k])) for k in INPUT_IDENTITY_KEYS):
            raise InputError(
                f"{name} was made from a different input ({ident['input_records']} records, sha256 "
                f"{str(ident['input_sha256'])[:12]}...) than {ref_name} ({ref['input_records']} records, sha256 "
                f"{str(ref['input_sha256'])[:12]}...); shards must be cut from the same FASTA (for separately "
                "numbered pieces of one input use --renumber)")
    if len(present) < len(identities):
        return {}  # the caller warns (resume parts have none by design)
    return {k: _norm(present[0][0][k]) for k in INPUT_IDENTITY_KEYS}


def _warn_no_identity(names: Sequence[str]) -> None:
    log.warning("not every input records the identity of the FASTA it was cut from (written by an older "
                "protsae?): %s merged without checking that they come from the same input", ", ".join(names))


def missing_shards(values: Sequence[str]) -> list[str]:
    """The shards ("i/n") absent from a set of `--shard` values, [] when they cover the whole input.

    Shards of different n are compared on their least common multiple (1/2 and 2/4 miss 4/4). Inputs without a
    shard value are whole runs: nothing is missing.
    """
    parsed: list[tuple[set[int], int]] = []
    for v in values:
        v = (v or "").strip()
        m = re.fullmatch(r"([\d,]+)/(\d+)", v)
        if not m:
            return []
        parsed.append(({int(i) - 1 for i in m.group(1).split(",")}, int(m.group(2))))
    if not parsed:
        return []
    big = math.lcm(*(n for _, n in parsed))
    if big > 1 << 16:
        return []  # not shards anyone made by hand; the coverage attribute still records what is there
    covered = {r + n * j for residues, n in parsed for r in residues for j in range(big // n)}
    return [f"{c + 1}/{big}" for c in range(big) if c not in covered]


def refuse_missing_shards(values: Sequence[str], names: Sequence[str]) -> None:
    """A shard set with a shard given twice or shards missing is an error naming them (`--allow-partial` skips
    the missing-shard part)."""
    seen: dict[str, str] = {}
    for v, name in zip(values, names, strict=True):
        v = (v or "").strip()
        if v and v in seen:
            raise InputError(f"{name} and {seen[v]} are both shard {v}: the same shard given twice?")
        seen.setdefault(v, name)
    missing = missing_shards(values)
    if missing:
        raise InputError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                         f"{'are' if len(missing) > 1 else 'is'} missing from the {len(names)} inputs; merge every "
                         "shard, or pass --allow-partial to merge these anyway")


def merged_provenance(attrs_list: Sequence[dict[str, Any]], names: Sequence[str], command: str,
                      shard: str | None = None, renumber: bool = False) -> dict[str, Any]:
    """One provenance dict for the merge of these inputs, refusing inputs that disagree on a strict key and
    inputs cut from different FASTA files. ``renumber``: the inputs are pieces of different files by design, so
    their identities are not compared and the merge records none."""
    first = attrs_list[0]
    for key in STRICT_KEYS:
        ref = _norm(first.get(key, ""))
        for attrs, name in zip(attrs_list[1:], names[1:], strict=True):
            if _norm(attrs.get(key, "")) != ref:
                raise InputError(f"{name}: {key} is {attrs.get(key, '')!r} but {names[0]} has {first.get(key, '')!r}; "
                                 "shards must come from the same models and settings")
    identity = {} if renumber else check_input_identity(attrs_list, names)
    attrs_list = [{k: v for k, v in a.items() if k not in INPUT_IDENTITY_KEYS} for a in attrs_list]
    keys = [k for k in PROVENANCE_ORDER if any(k in a for a in attrs_list)]
    keys += sorted({k for a in attrs_list for k in a} - set(keys))
    out: dict[str, Any] = {}
    for key in keys:
        if key == "command":
            out[key] = command
        elif key == "shard":
            out[key] = combine_shards([str(a.get("shard", "")) for a in attrs_list]) if shard is None else shard
        elif key in MIXED_KEYS:
            seen = list(dict.fromkeys(str(a.get(key, "")) for a in attrs_list))
            if len(seen) > 1:
                log.warning("shards differ in %s (%s); the merged output records all of them", key, ", ".join(seen))
            out[key] = ",".join(seen)
        else:
            out[key] = first.get(key, "")
    if shard is not None:
        out["shard"] = shard
    elif out.get("shard"):
        log.warning("the inputs are only shards %s of the input: the merged output is incomplete", out["shard"])
    out.update(identity)
    return out


def _norm(v: Any) -> Any:
    """Compare attribute values across files regardless of numpy scalar vs Python scalar vs bytes."""
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def merge_command() -> str:
    return shlex.join(["protsae", *sys.argv[1:]])


def detect_kind(path: str | Path) -> str:
    """"h5", "tsv" or "gff3" from the file's first bytes, so oddly staged names (Nextflow) still work."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if head == _HDF5_SIGNATURE:
                return "h5"
            f.seek(0)
            if head[:2] == b"\x1f\x8b":
                with gzip.open(f) as g:
                    text = g.read(64)
            else:
                text = f.read(64)
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except (OSError, EOFError) as e:
        raise InputError(f"{p}: cannot read ({e})") from e
    if text.startswith(b"##gff-version"):
        return "gff3"
    if text.startswith(b"#protein_id"):
        return "tsv"
    raise InputError(f"{p}: not a protsae HDF5, TSV or GFF3 output (unrecognised start {text[:20]!r})")




# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------

def merge_files(inputs: Sequence[str | Path], output_prefix: str, formats: Sequence[str] | None = None, *,
                renumber: bool = False, compression: str | None = "gzip", command: str | None = None,
                allow_partial: bool = False) -> MergeSummary:
    """`protsae merge`: dispatch on what the inputs are (all must be of one kind)."""
    if not inputs:
        raise InputError("no input files to merge")
    kinds = {str(p): detect_kind(p) for p in inputs}
    distinct = set(kinds.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{p} ({k})" for p, k in kinds.items())
        raise InputError(f"inputs mix kinds ({listing}); merge the HDF5 shards, which regenerate TSV and GFF3")
    kind = distinct.pop()
    command = command or merge_command()
    if kind == "h5":
        return merge_h5(list(inputs), output_prefix, formats or DEFAULT_FORMATS, renumber=renumber,
                        compression=compression, command=command, allow_partial=allow_partial)
    if renumber:
        raise InputError("--renumber needs HDF5 inputs: TSV/GFF3 files do not record how many proteins they hold")
    fmts = tuple(formats or (kind,))
    if fmts != (kind,):
        raise InputError(f"{kind.upper()} shards can only be merged into {kind.upper()} (--formats {kind}); "
                         "merge the HDF5 shards to get every format")
    if kind == "tsv":
        return merge_tsv(list(inputs), output_prefix)
    return merge_gff3(list(inputs), output_prefix, command=command, allow_partial=allow_partial)


# ---------------------------------------------------------------------------------------------------------
# HDF5
# ---------------------------------------------------------------------------------------------------------

@dataclass
class _H5Input:
    path: Path
    attrs: dict[str, Any]
    n: int
    first: int
    last: int
    offset: int = 0


def _scan_h5(path: Path) -> tuple[_H5Input, list[tuple]]:
    """Header facts of one input: provenance, ordinal range (checked strictly increasing), concept table."""
    from protsae_cli.io.writers.h5 import H5Annotations, read_concept_reliability

    with H5Annotations(path) as h5:
        attrs = h5.attrs
        index = np.asarray(h5.proteins["index"], dtype=np.int64)
        g = h5.f["concepts"]
        rel = [tuple((k, tuple(map(tuple, v)) if k == "score_curve" else v) for k, v in sorted(r.items()))
               for r in read_concept_reliability(g)]
        concepts = list(zip(g["latent"][()].tolist(), g["concept_id"].asstr()[()].tolist(),
                            g["name"].asstr()[()].tolist(), g["ontology_id"].asstr()[()].tolist(),
                            g["threshold"][()].tolist(), rel, strict=True))
    if index.size > 1:
        bad = np.flatnonzero(index[1:] <= index[:-1])
        if bad.size:
            j = int(bad[0])
            raise InputError(f"{path}: protein ordinals are not increasing (position {j + 1}: {index[j]} then "
                             f"{index[j + 1]}); only files written by protsae annotate/merge can be merged")
    first, last = (int(index[0]), int(index[-1])) if index.size else (-1, -1)
    return _H5Input(path, attrs, int(index.size), first, last), concepts


def merge_h5(inputs: Sequence[str | Path], output_prefix: str, formats: Sequence[str] = DEFAULT_FORMATS, *,
             provenance: dict[str, Any] | None = None, renumber: bool = False, compression: str | None = "gzip",
             command: str | None = None, on_result: Callable[[ProteinResult], None] | None = None,
             allow_partial: bool = False) -> MergeSummary:
    """Merge HDF5 annotation files into PREFIX.{h5,tsv,gff3}, in input-ordinal order.

    ``provenance`` replaces the merged root attributes (resume and multi-GPU runs pass their own, so the final
    files carry the user's command, not an internal one); the inputs are still checked against each other.
    ``on_result`` sees every merged record (resume uses it for the run summary). Inputs whose ordinal ranges do
    not interleave (resume parts) are read one after another, one file open at a time; interleaved ones
    (`--shard i/n` outputs) are merged with a heap, all open at once.
    """
    from protsae_cli.io.writers.h5 import H5Annotations

    paths = [Path(p) for p in inputs]
    if not paths:
        raise InputError("no input files to merge")
    scanned = [_scan_h5(p) for p in paths]
    infos = [s[0] for s in scanned]
    ref_concepts = scanned[0][1]
    for info, (_, table) in zip(infos[1:], scanned[1:], strict=True):
        if table != ref_concepts:
            raise InputError(f"{info.path}: its concept table differs from {infos[0].path}'s (same SAE weights "
                             "but edited concepts?); shards must use the same SAE checkpoint")
    names = [str(i.path) for i in infos]
    merged = merged_provenance([i.attrs for i in infos], names, command or merge_command(), renumber=renumber)
    prov = dict(provenance) if provenance is not None else merged

    if renumber:
        offset = 0
        for info in infos:
            info.offset = offset
            if info.n:
                offset += info.last + 1
        if provenance is None:
            prov["shard"] = ""

    nonempty = [i for i in infos if i.n]
    ranges = sorted(nonempty, key=lambda i: i.first + i.offset)
    sequential = all(a.last + a.offset < b.first + b.offset for a, b in zip(ranges, ranges[1:], strict=False))
    if not sequential:
        _check_no_shared_ordinals(nonempty)
    if provenance is None and not renumber and not any(k in merged for k in INPUT_IDENTITY_KEYS):
        _warn_no_identity(names)
    if provenance is None and not allow_partial and not renumber:  # internal callers merge sub-shards
        refuse_missing_shards([str(i.attrs.get("shard", "")) for i in infos], names)

    out_paths = output_paths(prepare_output_prefix(output_prefix, formats), formats)
    for p in out_paths.values():
        if p != "-":
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            if Path(p).resolve() in {x.resolve() for x in paths}:
                raise InputError(f"{p}: the output would overwrite one of the inputs")

    concepts = [ConceptEntry(int(lat), cid, name, ont, float(thr), **dict(rel))
                for lat, cid, name, ont, thr, rel in ref_concepts]
    with H5Annotations(paths[0]) as h5:
        d_sae, k = h5.d_sae, h5.k
    dtype = str(infos[0].attrs.get("dtype") or "float16")
    summary = MergeSummary(inputs=names, outputs=list(out_paths.values()))
    writers: list[Any] = []
    try:
        writers = open_writers(out_paths, prov, concepts, d_sae, k, dtype=dtype, compression=compression)
        stream = _sequential(ranges) if sequential else _interleaved(nonempty)
        # Renumbered pieces were separate files: the identity of the input they add up to is rebuilt from the
        # records themselves (the protein table keeps every record, invalid ones included).
        rebuilt = InputIdentity() if renumber and provenance is None else None
        for res in stream:
            if rebuilt is not None:
                assert res.seq_md5 is not None  # ProteinResult.__post_init__ fills it from the sequence
                rebuilt.add_fields(res.index, res.id, res.seq_md5)
            for w in writers:
                w.write(res)
            summary.proteins += 1
            summary.segments += len(res.segments)
            if on_result is not None:
                on_result(res)
        for w in writers:
            if rebuilt is not None:
                rebuilt.complete = True
                w.set_input_identity(rebuilt.attrs())
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    return summary


def _results(info: _H5Input, h5: Any) -> Iterator[ProteinResult]:
    for res in h5.iter_results():
        yield replace(res, index=res.index + info.offset) if info.offset else res


def _sequential(infos: Sequence[_H5Input]) -> Iterator[ProteinResult]:
    from protsae_cli.io.writers.h5 import H5Annotations

    for info in infos:
        with H5Annotations(info.path) as h5:
            yield from _results(info, h5)


def _interleaved(infos: Sequence[_H5Input]) -> Iterator[ProteinResult]:
    from protsae_cli.io.writers.h5 import H5Annotations

    files = [H5Annotations(i.path) for i in infos]
    try:
        streams = [_results(info, h5) for info, h5 in zip(infos, files, strict=True)]
        yield from heapq.merge(*streams, key=lambda r: r.index)
    finally:
        for h5 in files:
            h5.close()


def _check_no_shared_ordinals(infos: Sequence[_H5Input]) -> None:
    """Refuse before writing anything when two inputs hold the same ordinal, naming both files.

    Reads the ordinal columns only (8 bytes per protein), which is cheap next to the merge itself, and means
    a wrong shard set fails in seconds instead of after rewriting most of the data.
    """
    from protsae_cli.io.writers.h5 import H5Annotations

    cols, owners = [], []
    for j, info in enumerate(infos):
        with H5Annotations(info.path) as h5:
            cols.append(np.asarray(h5.proteins["index"], dtype=np.int64) + info.offset)
        owners.append(np.full(cols[-1].size, j, dtype=np.int32))
    allidx = np.concatenate(cols)
    owner = np.concatenate(owners)
    order = np.argsort(allidx, kind="stable")
    s = allidx[order]
    dup = np.flatnonzero(s[1:] == s[:-1])
    if dup.size:
        j = int(dup[0])
        a, b = infos[int(owner[order[j]])], infos[int(owner[order[j + 1]])]
        raise InputError(f"{b.path}: protein ordinal {int(s[j])} is also in {a.path} ({dup.size} shared in all); "
                         "the same shard given twice, or pieces of separately numbered FASTA files "
                         "(use --renumber for those)")


# ---------------------------------------------------------------------------------------------------------
# Text shards
# ---------------------------------------------------------------------------------------------------------

def _open_text(path: Path) -> IO[str]:
    raw = open(path, "rb")
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8", newline="")
    raw.seek(0)
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _tsv_rows(path: Path, j: int) -> Iterator[tuple[int, int, str]]:
    """(ordinal, file number, line) for each data row, checking the file is in ordinal order."""
    prev = -1
    with _open_text(path) as f:
        next(f, None)  # header, checked by the caller
        for lineno, line in enumerate(f, start=2):
            if not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            try:
                idx = int(cols[1])
            except (IndexError, ValueError):
                raise InputError(f"{path}:{lineno}: no protein_index in column 2") from None
            if idx < prev:
                raise InputError(f"{path}:{lineno}: rows are not in ordinal order ({prev} then {idx})")
            prev = idx
            yield idx, j, line if line.endswith("\n") else line + "\n"


def merge_tsv(inputs: Sequence[str | Path], output_prefix: str) -> MergeSummary:
    """Line-wise merge of segment TSVs by protein_index. Proteins without segments have no rows in any TSV, so
    this reproduces an unsharded run's TSV exactly."""
    from protsae_cli.io.atomic import TextOutput

    paths = [Path(p) for p in inputs]
    header = None
    facts = None
    for p in paths:
        with _open_text(p) as f:
            h = f.readline()
            first = f.readline()
        if header is None:
            header = h
        elif h != header:
            raise InputError(f"{p}: TSV header differs from {paths[0]}'s")
        if first.strip():
            cols = first.rstrip("\n").split("\t")
            names = h.lstrip("#").rstrip("\n").split("\t")
            at = [names.index(c) if c in names else len(names) - 3 + i for i, c in enumerate(("hook", "layer", "plm"))]
            this = tuple(cols[i] if i < len(cols) else "" for i in at)  # the provenance a TSV carries
            if facts is None:
                facts = (this, p)
            elif this != facts[0]:
                raise InputError(f"{p}: hook/layer/plm {this} differ from {facts[1]}'s {facts[0]}; shards must "
                                 "come from the same models and settings")
    # A TSV records no input identity (a trailer would be a junk row to pandas and awk): say what is not checked.
    log.info("TSV shards do not record their input: merge the HDF5 or GFF3 shards to have it checked")
    out_path = output_paths(prepare_output_prefix(output_prefix, ["tsv"]), ["tsv"])["tsv"]
    out = TextOutput(out_path)
    summary = MergeSummary(inputs=[str(p) for p in paths], outputs=[out_path])
    try:
        out.write(header or "")
        prev_idx, prev_file = -1, -1
        for idx, j, line in heapq.merge(*(_tsv_rows(p, j) for j, p in enumerate(paths)), key=lambda t: t[0]):
            if idx == prev_idx and j != prev_file:
                raise InputError(f"{paths[j]}: protein ordinal {idx} is also in {paths[prev_file]}; the same "
                                 "shard given twice?")
            if idx != prev_idx:
                summary.proteins += 1
            prev_idx, prev_file = idx, j
            out.write(line)
            summary.segments += 1
        out.close()
    except BaseException:
        out.abort()
        raise
    return summary


_IDENTITY_PREFIXES = tuple(f"#{k} " for k in INPUT_IDENTITY_KEYS)
_GFF_ID = re.compile(r"(?:^|;)ID=p(\d+)\.\d+(?:;|$)")


def _gff3_parse(path: Path) -> tuple[list[str], list[tuple[float, list[str]]], int, dict[str, str]]:
    """Header lines, protein blocks (sort key, lines), the number of blocks placed by approximation, and the
    input identity from the trailer.

    A block is a protein's ``##sequence-region`` line plus its features; its ordinal comes from the feature
    IDs (``p<ordinal>.<n>``). A protein without features has no ordinal anywhere in GFF3; see
    :func:`_place_featureless` for how it is placed.
    """
    header: list[str] = []
    blocks: list[tuple[int | None, list[str]]] = []
    cur: list[str] | None = None
    cur_key: int | None = None
    in_header = True
    trailer: list[str] = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.endswith("\n"):
                line += "\n"
            if line.startswith(_IDENTITY_PREFIXES):
                trailer.append(line)
                continue
            if in_header and line.startswith("#") and not line.startswith("##sequence-region"):
                header.append(line)
                continue
            in_header = False
            if line.startswith("##sequence-region"):
                if cur is not None:
                    blocks.append((cur_key, cur))
                cur, cur_key = [line], None
                continue
            if line.startswith("#") or not line.strip():
                (cur if cur is not None else header).append(line)
                continue
            cols = line.rstrip("\n").split("\t")
            m = _GFF_ID.search(cols[8]) if len(cols) == 9 else None
            if m is None:
                raise InputError(f"{path}:{lineno}: feature without a protsae ID=p<ordinal>.<n> attribute")
            key = int(m.group(1))
            if cur is None or (cur_key is not None and cur_key != key):
                if cur is not None:
                    blocks.append((cur_key, cur))
                cur = []
            cur_key = key
            cur.append(line)
    if cur is not None:
        blocks.append((cur_key, cur))
    prev = -1
    for block_key, _ in blocks:
        if block_key is not None:
            if block_key < prev:
                raise InputError(f"{path}: features are not in ordinal order ({prev} then {block_key})")
            prev = block_key
    residues, n = _shard_classes(_gff3_provenance(header).get("shard", ""))
    keyed, approximate = _place_featureless(blocks, residues, n)
    return header, keyed, approximate, read_identity_trailer(trailer)


def _shard_classes(shard: str) -> tuple[set[int], int]:
    """Ordinal classes a shard holds: "2/3" -> ({1}, 3); "1,3/8" -> ({0, 2}, 8); "" -> ({0}, 1), everything."""
    m = re.fullmatch(r"([\d,]+)/(\d+)", shard.strip())
    if not m:
        return {0}, 1
    return {int(i) - 1 for i in m.group(1).split(",")}, int(m.group(2))


def _place_featureless(blocks: Sequence[tuple[int | None, list[str]]], residues: set[int],
                       n: int) -> tuple[list[tuple[float, list[str]]], int]:
    """Give featureless blocks an ordinal where the shard leaves no doubt, else a key just before the next.

    Between two featured proteins with ordinals a < b, a shard "i/n" holds the ordinals x with a < x < b and
    x % n == i-1. When there are exactly as many featureless blocks as such ordinals, they are those proteins,
    in order. Otherwise (invalid records, which have no block, took some of the ordinals) the blocks keep
    their place before b, which is right within the shard but approximate among shards. Trailing blocks take
    the next ordinals of the shard.
    """
    out: list[tuple[float, list[str]]] = []
    approximate = 0
    prev = -1
    i = 0
    while i < len(blocks):
        key, lines = blocks[i]
        if key is not None:
            out.append((float(key), lines))
            prev = key
            i += 1
            continue
        j = i
        while j < len(blocks) and blocks[j][0] is None:
            j += 1
        run = blocks[i:j]
        nxt = blocks[j][0] if j < len(blocks) else None
        if nxt is None:
            cands: list[int] = []
            x = prev + 1
            while len(cands) < len(run):
                if x % n in residues:
                    cands.append(x)
                x += 1
        else:
            cands = [x for x in range(prev + 1, nxt) if x % n in residues]
        if len(cands) == len(run):
            out.extend((float(x), lines) for x, (_, lines) in zip(cands, run, strict=True))
        else:
            assert nxt is not None  # trailing blocks (nxt None) always get exactly len(run) candidates above
            out.extend((nxt - 0.5, lines) for _, lines in run)
            approximate += len(run)
        i = j
    return out, approximate


def _gff3_provenance(header: Sequence[str]) -> dict[str, str]:
    out = {}
    for line in header:
        if line.startswith("#") and not line.startswith("##"):
            key, _, value = line[1:].rstrip("\n").partition(" ")
            out[key] = value
    return out


def merge_gff3(inputs: Sequence[str | Path], output_prefix: str, command: str | None = None,
               allow_partial: bool = False) -> MergeSummary:
    """Block-wise merge of GFF3 shards by ordinal; the header's provenance is checked and rewritten."""
    from protsae_cli.io.atomic import TextOutput

    paths = [Path(p) for p in inputs]
    parsed = [_gff3_parse(p) for p in paths]
    provs = [_gff3_provenance(h) for h, _, _, _ in parsed]
    for p, prov in zip(paths[1:], provs[1:], strict=True):
        for strict_key in STRICT_KEYS:
            if prov.get(strict_key) != provs[0].get(strict_key):
                raise InputError(f"{p}: {strict_key} is {prov.get(strict_key)!r} but {paths[0]} has "
                                 f"{provs[0].get(strict_key)!r}; "
                                 "shards must come from the same models and settings")
    identity = check_input_identity([t for _, _, _, t in parsed], [str(p) for p in paths])
    if not identity:
        _warn_no_identity([str(p) for p in paths])
    if not allow_partial:
        refuse_missing_shards([prov.get("shard", "") for prov in provs], [str(p) for p in paths])
    approximate = sum(a for _, _, a, _ in parsed)
    if approximate and len(paths) > 1:
        log.warning("%d proteins without features could not be given an ordinal from the GFF3 files; their "
                    "##sequence-region lines stay before the next feature of their shard. Merge the HDF5 shards "
                    "for the exact order.", approximate)
    shard = combine_shards([prov.get("shard", "") for prov in provs])
    header = []
    for line in parsed[0][0]:
        if line.startswith("#command "):
            line = f"#command {command or merge_command()}\n"
        elif line.startswith("#shard"):
            line = f"#shard {shard}\n"
        header.append(line)
    out_path = output_paths(prepare_output_prefix(output_prefix, ["gff3"]), ["gff3"])["gff3"]
    out = TextOutput(out_path)
    summary = MergeSummary(inputs=[str(p) for p in paths], outputs=[out_path])
    try:
        out.write("".join(header))
        from protsae_cli.io.writers.gff3 import SeqidMap, rename_block

        seqids = SeqidMap()  # an id repeated across shards is renamed here as an unsharded run would name it
        streams = [((key, j, lines) for key, lines in blocks) for j, (_, blocks, _, _) in enumerate(parsed)]
        prev_key, prev_file = None, -1
        for key, j, lines in heapq.merge(*streams, key=lambda t: t[0]):
            if key.is_integer() and key == prev_key and j != prev_file:
                raise InputError(f"{paths[j]}: protein ordinal {int(key)} is also in {paths[prev_file]}; the same "
                                 "shard given twice?")
            if key.is_integer():
                prev_key, prev_file = key, j
            lines = rename_block(lines, seqids, int(key) if key.is_integer() else None)
            out.write("".join(lines))
            summary.proteins += 1
            summary.segments += sum(1 for x in lines if not x.startswith("#"))
        out.write(identity_trailer(identity))
        out.close()
    except BaseException:
        out.abort()
        raise
    return summary
