"""`protsae label`: name the concepts of any SAE from the user's labelled proteins (docs/LABEL.md).

A published SAE (InterPLM, InterProt, SAELens, sparsify) or a TopK SAE trained without labels has latents but
no concept table, so `annotate` writes its codes and calls nothing. This module binds latents to the concepts
of residue-level label files and writes a protsae SAE directory whose concept table `annotate` calls from:

1. The labelled proteins are encoded exactly as `annotate` encodes them (`Annotator.iter_results`: same
   windows, same encoder), so thresholds and metrics describe the calls annotate will make.
2. They are split by protein (seeded, `assign_splits` of eval) into an **association** part and a
   **validation** part; no protein is in both.
3. Association, on the association part, is eval's InterPLM protocol (`metrics.concept_counts`): activations
   divided by each latent's maximum over the association proteins, F1 of "a > tau" on a threshold grid; per
   concept the `candidates` latents with the best grid F1 (`metrics.top_relevance_f1`'s ranking) go on:
   by default one, the latent InterPLM's protocol selects.
4. On the validation part, each candidate's raw-activation threshold is chosen for the operating point
   (`--calling`, calibrate's `choose_threshold`: best F1, precision:P, recall:R) and, with several
   candidates, the one whose choice scores best is kept. Its entry is written by calibrate's `apply_choice`, so latent, threshold,
   precision, recall, F1, positives, label source, operating point, score curve and kind are exactly what
   `protsae calibrate` records. Concepts below the floors (`concepts.CallPolicy`) are written too and are
   withheld by `annotate` unless `--call-withheld`, as for a calibrated SAE; the report lists them.

The validation numbers are measured on the proteins the threshold (and with several candidates, the latent)
was chosen on, as calibrate's are; the association proteins never enter them. For numbers on proteins neither
step saw, run `protsae calibrate --sae OUT --measure-only` on a held-out set (docs/LABEL.md does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from protsae_cli.errors import InputError, OutputError
from protsae_cli.evaluate.options import LabelOptions  # noqa: F401 (public here too; defaults live there)

log = logging.getLogger("protsae.label")

REPORT_NAME = "label_report.json"


# ===================================================================================================== output
def check_output(output: str, sae: str | None, force: bool) -> Path:
    """Refuse, before any model loads, an -o that is a file, the --sae itself, or a non-empty directory
    without --force (a half-replaced SAE directory would pair new weights with an old concept table)."""
    from protsae_cli.sae.foreign import split_options
    from protsae_cli.io.atomic import check_output_dir

    check_output_dir(output)
    out = Path(output)
    if sae:
        src, _ = split_options(sae)
        src_dir = src if src.is_dir() else src.parent
        if out.exists() and out.resolve() in (src.resolve(), src_dir.resolve()):
            raise InputError(f"-o {output}: is where the --sae {src} lives; write the labelled SAE to a new "
                             "directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"-o {output}: directory exists and is not empty; pass --force to replace it, or "
                          "choose a new directory")
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished directory `tmp` to `out` by rename; an existing `out` (empty, or --force) is moved
    aside first and removed only after the new one is in place."""
    from protsae_cli.io.atomic import atomic_path

    old = None
    if out.exists():
        if any(out.iterdir()):
            old = atomic_path(out)
            os.replace(out, old)
        else:
            out.rmdir()
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_labelled_sae(ann: Any, cfg: Any, report: dict[str, Any], out: Path) -> Path:
    """The SAE of `ann` with config `cfg` at `out`: a protsae directory's weights byte for byte; anything else
    (a published format) saved in protsae's layout (`foreign_topk` where it is more than affine + TopK)."""
    from protsae_cli.evaluate.calibrate import write_sae_copy
    from protsae_cli.sae.foreign import detect
    from protsae_cli.sae.checkpoint import save_sae
    from protsae_cli.io.atomic import atomic_path

    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(out.absolute())
    try:
        if detect(ann.sae_path) is None:
            write_sae_copy(ann.sae_path, cfg, tmp)
        else:
            saved, ann.sae.cfg = ann.sae.cfg, cfg
            try:
                save_sae(ann.sae, tmp)
            finally:
                ann.sae.cfg = saved
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        _publish(tmp, out)
    except OSError as e:
        raise OutputError(f"cannot write the labelled SAE to {out}: {e.strerror or e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ================================================================================================= the method
@dataclass
class _Bound:
    """One concept to label: its label source, column there, and what association and validation found."""

    source: Any
    col: int
    concept: str
    name: str
    candidates: list[int] = field(default_factory=list)
    assoc_f1: list[float] = field(default_factory=list)
    act: dict[int, list[np.ndarray]] = field(default_factory=dict)    # candidate -> active validation acts
    lab: dict[int, list[np.ndarray]] = field(default_factory=dict)    # candidate -> labels there
    n_pos: int = 0
    n_res: int = 0
    proteins: int = 0
    why_none: str = "no latent fires on its positive residues of the association proteins"


def _objective(choice: Any, point: Any) -> tuple:
    """Larger is better: how one candidate's threshold choice compares with another's for `point`."""
    f = lambda v: -1.0 if v is None else float(v)  # noqa: E731
    if point.kind == "precision":
        return (choice.reached, f(choice.recall), f(choice.precision))
    if point.kind == "recall":
        return (choice.reached, f(choice.precision), f(choice.recall))
    return (f(choice.f1),)


def label_sae(opts: LabelOptions) -> dict[str, Any]:
    """Bind latents of `opts.sae` to the concepts of `opts.annotations`, write the labelled SAE directory to
    `opts.output` and return the report (also written there as label_report.json, and to `opts.json_out`)."""
    from protsae_cli.annotate.pipeline import AnnotateOptions, Annotator
    from protsae_cli.evaluate.calibrate import ConceptCounts as ValueCounts
    from protsae_cli.evaluate.calibrate import OperatingPoint, _records, apply_choice, choose_threshold
    from protsae_cli.call.concepts import CallPolicy, below_floor, standardize
    from protsae_cli.evaluate.pipeline import (CHUNK_ROWS, TEST, VALID, _chunks, _CodeSpill, _source_rows,
                                               assign_splits)
    from protsae_cli.labels.sources import load_label_sources
    from protsae_cli.evaluate.metrics import concept_counts, latent_max, normalisation_scales, top_relevance_f1
    from protsae_cli.progress import Progress
    from protsae_cli.sae.config import ConceptEntry
    import tempfile

    point = OperatingPoint.parse(opts.calling)
    if not 0 < opts.valid_fraction < 1:
        raise InputError(f"--valid-fraction must be in (0, 1), got {opts.valid_fraction}")
    if opts.candidates < 1:
        raise InputError(f"--candidates must be at least 1, got {opts.candidates}")
    if not opts.annotations:
        raise InputError("label needs residue-level labels: -a FILE (TMbed, binding lists, Swiss-Prot ...)")
    out = check_output(opts.output, opts.sae, opts.force)
    records, seqs = _records(opts.fasta)
    sources = load_label_sources(opts.annotations, seqs, opts.ontologies, opts.propagate, against=opts.fasta)
    for s in sources:
        if s.kind != "residue":
            raise InputError(f"{s.name}: {s.fmt} labels are protein-level; label binds latents to residue labels")
    bound: list[_Bound] = []
    seen: dict[str, str] = {}
    for s in sources:
        if not s.labels.protein_ids:
            log.warning("%s: labels none of the proteins in %s; ignored", s.name, opts.fasta)
            continue
        for j, c in enumerate(s.concepts):
            if c in seen:
                log.warning("concept %s is labelled by %s and %s; %s is used", c, seen[c], s.name, seen[c])
                continue
            seen[c] = s.name
            bound.append(_Bound(s, j, c, s.names.get(c, c)))
    if not bound:
        raise InputError(f"{', '.join(s.name for s in sources)}: the labels name no concept with a positive "
                         f"residue among the proteins of {opts.fasta}")

    labelled = {pid for s in sources for pid in s.labels.protein_ids}
    chosen = [r for r in records if r.id in labelled]
    ids = [r.id for r in chosen]
    if len(ids) < 2:
        raise InputError(f"{opts.fasta}: only {len(ids)} labelled protein; label needs at least 2 (one for "
                         "association, one for validation)")
    # eval's seeded protein split: its "valid" part is the association part here, its "test" part validation.
    split, split_info = assign_splits(ids, None, 1.0 - opts.valid_fraction, opts.seed)
    if split.count(VALID) == 0 or split.count(TEST) == 0:
        split[0], split[-1] = VALID, TEST
    part = {pid: ("association" if s == VALID else "validation") for pid, s in zip(ids, split, strict=True)}

    ann = Annotator(opts.model, opts.sae, opts.device, "auto", opts.check_plm, opts.threads)
    cfg = ann.sae.cfg
    if cfg.arch == "protsae":
        raise InputError(f"--sae {opts.sae}: a ProtSAE binds its concepts to defined latents in training; "
                         "re-measure them with protsae calibrate instead")
    d_sae = cfg.d_sae
    ann.concepts = []  # codes only: no segments are needed here
    aopts = AnnotateOptions(input=opts.fasta, output_prefix="-", formats=("tsv",), toks_per_batch=opts.toks_per_batch,
                            long_policy=opts.long_policy, progress=False, command=opts.command)
    log.info("labelling %s (d_sae %d, %s@%d) on %d labelled proteins of %s: %d association, %d validation "
             "(seed %d); %d concepts", opts.sae, d_sae, cfg.hook_point, cfg.layer, len(ids), opts.fasta,
             split.count(VALID), split.count(TEST), opts.seed, len(bound))

    tmpdir = tempfile.TemporaryDirectory(prefix="protsae-label-")
    spill = _CodeSpill(Path(tmpdir.name), ann.code_width, 0)
    pos = {pid: i for i, pid in enumerate(ids)}
    rows_of: dict[int, int] = {}
    max_assoc = np.zeros(d_sae, np.float64)
    try:
        with Progress("labelling: encoding", len(chosen), unit="proteins", enabled=opts.progress) as bar:
            for res in ann.iter_results(iter(chosen), aopts):
                bar(1, residues=len(res.sequence))
                if res.status not in ("ok", "windowed", "truncated") or res.idx.shape[0] == 0:
                    log.warning("protein %s: %s (%s); left out", res.id, res.status, res.status_detail)
                    continue
                p = pos[res.id]
                spill.write(p, res.idx, res.val, None)
                rows_of[p] = res.idx.shape[0]
                if part[res.id] == "association":
                    latent_max(res.idx, res.val, d_sae, out=max_assoc)
        spill.finish()
        scales, alive = normalisation_scales(max_assoc)
        # -- association: eval's InterPLM counts on the association proteins, per label source -----------------
        thresholds = np.asarray(opts.thresholds, np.float64)
        by_source: dict[str, list[_Bound]] = {}
        for b in bound:
            by_source.setdefault(b.source.name, []).append(b)
        for bs in by_source.values():
            src = bs[0].source
            members = [pos[pid] for pid in ids if part[pid] == "association" and pid in src.labels.positions
                       and pos[pid] in rows_of]
            counts = None
            for chunk in _chunks(members, rows_of, CHUNK_ROWS):
                ys, idxs, vals = [], [], []
                for p in chunk:
                    y, _, keep = _source_rows(src, ids[p], rows_of[p], len(seqs[ids[p]]))
                    idx, val, _ = spill.read(p)
                    ys.append(y[keep]); idxs.append(idx[keep]); vals.append(val[keep])
                cc = concept_counts(np.concatenate(idxs), np.concatenate(vals), np.concatenate(ys), scales,
                                    thresholds, alive=alive)
                counts = cc if counts is None else counts + cc
            if counts is None:
                for b in bs:
                    b.why_none = f"no association protein is labelled by {src.name}"
                continue
            top = top_relevance_f1(counts, counts, top=opts.candidates)["latents"]   # [C, n] ranked by grid F1
            f1 = np.where(counts.alive[None, :, None], counts.f1("residue"), -np.inf).max(0)  # [L, C]
            for b in bs:
                if counts.positives[b.col] == 0:
                    b.why_none = "no positive residue among the association proteins"
                    continue
                lat = [int(l) for l in top[b.col] if f1[l, b.col] > 0]
                b.candidates = lat
                b.assoc_f1 = [float(f1[l, b.col]) for l in lat]
                b.act = {l: [] for l in lat}
                b.lab = {l: [] for l in lat}
        # -- validation: exact activations of each candidate on the validation proteins ----------------------------
        for bs in by_source.values():
            src = bs[0].source
            live = [b for b in bs if b.candidates]
            if not live:
                continue
            union = sorted({l for b in live for l in b.candidates})
            col_of = np.full(d_sae, -1, np.int64)
            col_of[union] = np.arange(len(union))
            for pid in ids:
                p = pos[pid]
                if part[pid] != "validation" or pid not in src.labels.positions or p not in rows_of:
                    continue
                y, _, keep = _source_rows(src, pid, rows_of[p], len(seqs[pid]))
                idx, val, _ = spill.read(p)
                dense = np.zeros((idx.shape[0], len(union)), np.float32)
                cols = np.where(idx >= 0, col_of[np.clip(idx, 0, d_sae - 1)], -1)
                r, k = np.nonzero(cols >= 0)
                np.maximum.at(dense, (r, cols[r, k]), val[r, k])
                for b in live:
                    yc = y[:, b.col].astype(bool)
                    b.n_pos += int(yc[keep].sum())
                    b.n_res += int(keep.sum())
                    b.proteins += 1
                    for l in b.candidates:
                        a = dense[:, col_of[l]]
                        on = keep & (a > 0)
                        b.act[l].append(a[on])
                        b.lab[l].append(yc[on])
    finally:
        spill.close()
        tmpdir.cleanup()

    # -- choose per concept: the candidate whose operating-point choice is best on validation ----------------------
    policy = CallPolicy()
    entries: list[Any] = []
    rows: list[dict[str, Any]] = []
    for b in bound:
        row: dict[str, Any] = {"concept": b.concept, "name": b.name, "source": b.source.name,
                               "candidates": [{"latent": l, "association_f1": round(f, 4)}
                                              for l, f in zip(b.candidates, b.assoc_f1, strict=True)]}
        best = None
        for rank, l in enumerate(b.candidates):
            act = np.concatenate(b.act[l]) if b.act[l] else np.zeros(0, np.float32)
            lab = np.concatenate(b.lab[l]) if b.lab[l] else np.zeros(0, bool)
            vcounts = ValueCounts.from_values(act, lab, b.n_pos, b.n_res)
            choice = choose_threshold(vcounts, point)
            row["candidates"][rank]["validation_f1"] = None if choice is None else _r(choice.f1)
            if choice is not None and (best is None or _objective(choice, point) > _objective(best[1], point)):
                best = (l, choice, vcounts)
        if best is None:
            row["skipped"] = (b.why_none if not b.candidates
                              else "no validation positive" if b.n_pos == 0
                              else "no candidate latent is active on the validation proteins")
            log.warning("concept %s (%s): %s; not labelled", b.concept, b.name, row["skipped"])
            rows.append(row)
            continue
        l, _, vcounts = best
        entry = standardize([ConceptEntry(latent=l, concept_id=b.concept, name=b.name, source="protsae label")])[0]
        validation = (f"{Path(opts.fasta).name}: {b.proteins} validation proteins (label split seed {opts.seed}), "
                      f"{b.n_res} labelled residues")
        rec = apply_choice(entry, vcounts, point, b.source.name, validation)
        why = below_floor(entry, policy)
        row.update(latent=l, threshold=entry.threshold, precision=entry.precision, recall=entry.recall,
                   f1=entry.f1, positives=entry.positives, kind=entry.kind, operating_point=entry.operating_point,
                   withheld=why, **({"note": rec["note"]} if rec.get("note") else {}))
        entries.append(entry)
        rows.append(row)
        log.info("%s %s -> latent %d (association F1 %.3f; %d candidates): threshold %.4g (%s): precision %s "
                 "recall %s F1 %s on %d validation positives%s", b.concept, b.name, l,
                 b.assoc_f1[b.candidates.index(l)], len(b.candidates), entry.threshold, entry.operating_point,
                 _fmt(entry.precision), _fmt(entry.recall), _fmt(entry.f1), entry.positives,
                 f"; withheld by default ({why})" if why else "")
    if not entries:
        raise InputError(f"no concept of {', '.join(s.name for s in sources)} could be bound to a latent of "
                         f"{opts.sae} (see the warnings above)")

    labelled_ids = {e.concept_id for e in entries}
    kept = [e for e in cfg.concepts if e.concept_id not in labelled_ids]
    if kept:
        log.info("keeping %d concept(s) the labels do not name: %s", len(kept),
                 ", ".join(e.concept_id for e in kept[:8]))
    provenance = {"command": opts.command, "fasta": opts.fasta, "labels": [s.name for s in sources],
                  "operating_point": str(point), "seed": opts.seed, "valid_fraction": opts.valid_fraction,
                  "split": {"association": split.count(VALID), "validation": split.count(TEST)},
                  "candidates": opts.candidates, "thresholds": [float(t) for t in thresholds],
                  "source_sae": {"path": str(ann.sae_path), "sha256": ann.sae_sha256},
                  "method": "protsae label: InterPLM association (activation / latent max over association "
                            "proteins, F1 on a threshold grid) picks candidate latents; threshold and latent "
                            "chosen, and precision/recall/F1 measured, on the validation proteins (docs/LABEL.md)"}
    new_cfg = cfg
    from protsae_cli.sae.foreign import ForeignTopKSAE, detect

    if isinstance(ann.sae, ForeignTopKSAE) and not ann.sae.supports_affine_encode:
        new_cfg = ann.sae.protsae_config()
    new_cfg = dataclasses.replace(new_cfg, concepts=[*kept, *entries], training={**cfg.training, "label": provenance})
    if detect(ann.sae_path) is not None or not new_cfg.plm_sha256:
        # The thresholds were measured on this PLM: record it, so annotate's pairing check refuses another.
        new_cfg = dataclasses.replace(new_cfg, plm_name=ann.plm.name, plm_sha256=ann.plm.sha256,
                                      plm_num_layers=ann.plm.num_layers)
    report = {"format": "protsae-label", "format_version": 1, "command": opts.command, "sae": opts.sae,
              "sae_sha256": ann.sae_sha256, "fasta": opts.fasta, "operating_point": str(point),
              "split": {**split_info, "association": split.count(VALID), "validation": split.count(TEST),
                        # By id, so a held-out check can leave both parts out (docs/LABEL.md).
                        "association_ids": [pid for pid in ids if part[pid] == "association"],
                        "validation_ids": [pid for pid in ids if part[pid] == "validation"]},
              "plm": {"name": ann.plm.name, "sha256": ann.plm.sha256}, "output": str(out), "per_concept": rows}
    write_labelled_sae(ann, new_cfg, report, out)
    if opts.json_out:
        from protsae_cli.evaluate.calibrate import _write_json

        _write_json(opts.json_out, report)
    return report


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
