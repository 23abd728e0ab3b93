"""TMbed's protocol for decoded topologies: what `protsae calibrate` reports for region calls (docs/SEGMENTS.md).

Why a protein-level protocol: residue precision and recall say little about whether a biologist can count a
protein's TM helices; TMbed (Bernhofer & Rost 2022) scores segments instead. A predicted TM helix is correct
when both of its ends are within 5 residues of an observed helix (one-to-one, greedy in sequence order);
per-helix recall and precision are over alpha-helical TM proteins (a helix and no beta strand labelled); Qok is
the share of those whose observed helices are all matched with no extra prediction; false TM calls are the
share of globular proteins (no span labelled) with any TM helix or strand call; signal peptides are counted per
protein. `tools/eval_topology.py` adds length and residue statistics on top of the same functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from protsae_cli.call.segments import CLASSES

#: Tolerance of TMbed's segment match, residues at each end.
END_TOLERANCE = 5

Span = tuple[int, int]  # 1-based, inclusive


def class_runs(classes: np.ndarray, letter: str) -> list[Span]:
    """1-based inclusive runs of one residue class (a letter of ``segments.CLASSES``)."""
    on = np.asarray(classes) == CLASSES.index(letter)
    if not on.any():
        return []
    d = np.diff(np.concatenate([[0], on.astype(np.int8), [0]]))
    return [(int(s) + 1, int(e)) for s, e in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True)]


def match_segments(observed: Sequence[Span], predicted: Sequence[Span], tol: int = END_TOLERANCE) -> int:
    """How many observed segments have a predicted one with both ends within ``tol`` (one-to-one)."""
    used = [False] * len(predicted)
    n = 0
    for s, e in observed:
        for j, (ps, pe) in enumerate(predicted):
            if not used[j] and abs(ps - s) <= tol and abs(pe - e) <= tol:
                used[j] = True
                n += 1
                break
    return n


def tmbed_protocol(proteins: Iterable[tuple[np.ndarray, Mapping[str, Sequence[Span]]]]) -> dict[str, float | int]:
    """TMbed-protocol numbers from (true residue classes, predicted segments by role) per protein; roles are
    ``segments.ROLE_CONCEPTS``' keys (``helix``, ``strand``, ``signal``; sides are not scored here)."""
    n_obs = n_pred = n_match = n_alpha = n_ok = detected = 0
    glob = glob_fp = sp_pos = sp_tp = sp_pred = sp_neg = sp_fp = 0
    for truth, calls in proteins:
        helices = list(calls.get("helix", ()))
        spans = bool(helices or calls.get("strand"))
        obs = class_runs(truth, "H")
        beta = bool(class_runs(truth, "B"))
        if obs and not beta:
            m = match_segments(obs, helices)
            n_alpha += 1
            n_obs += len(obs)
            n_pred += len(helices)
            n_match += m
            n_ok += int(m == len(obs) == len(helices))
            detected += int(bool(helices))
        elif not obs and not beta:
            glob += 1
            glob_fp += int(spans)
        has_sp = bool(class_runs(truth, "S"))
        called_sp = bool(calls.get("signal"))
        sp_pos += has_sp
        sp_tp += has_sp and called_sp
        sp_pred += called_sp
        sp_neg += not has_sp
        sp_fp += (not has_sp) and called_sp

    def ratio(a: int, b: int) -> float:
        return round(a / b, 4) if b else 0.0

    return {"alpha_tm_proteins": n_alpha, "observed_helices": n_obs, "predicted_helices": n_pred,
            "helix_recall_5": ratio(n_match, n_obs), "helix_precision_5": ratio(n_match, n_pred),
            "qok": ratio(n_ok, n_alpha), "alpha_tm_detected": ratio(detected, n_alpha),
            "globular_proteins": glob, "globular_with_tm_call": ratio(glob_fp, glob),
            "signal_proteins": sp_pos, "signal_recall": ratio(sp_tp, sp_pos),
            "signal_precision": ratio(sp_tp, sp_pred), "signal_false_rate": ratio(sp_fp, sp_neg)}
