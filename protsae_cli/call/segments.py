"""Topology decoding of region concepts: per-residue SAE activations -> one consistent path per protein.

Why: per-residue calls (``concepts.call_segments``) threshold each residue on its own, so TM helices run long,
neighbouring helices merge, sides appear on soluble proteins and "signal peptides" fire mid-sequence. TMbed
(Bernhofer & Rost 2022) fixes the same problem of its per-residue CNN with a Viterbi pass over a small state
model; this module does the same for an SAE's region concepts (docs/SEGMENTS.md).

State model (classes, with the concept each one emits as a segment):

* ``G`` globular / none: soluble protein, no span and no side is called (TMbed labels these residues
  "inside", which is why the per-residue "cytoplasmic side" covers soluble proteins).
* ``S`` signal peptide: only at the N-terminus (entered from the start only), length within a fitted range.
* ``I`` / ``O`` inside / outside loops of a membrane protein.
* ``H`` TM helix, ``B`` TM beta strand: explicit-duration chains (fitted length ranges, e.g. 16-33), each
  crossing flips the side: ``I -> H -> O -> H -> I ...``. A protein is either on the globular path (``G``
  only, after an optional ``S``) or on the membrane path (``I``/``O`` and spans), so sides exist only with spans
  and alternate across each span by construction. A class whose concept is withheld (the strand, by default)
  is still decoded and then left out of the calls; the sides are then decoded again across the reported spans
  (``SegmentDecoder.sides_across``), so they still alternate across what is shown.

Emissions: a multinomial logistic regression from the role concepts' activations (features ``a > 0`` and
``log1p(a)`` per concept) to the residue class, fitted on labelled proteins; the decoder uses
``log P(class | a) - log P(class)`` (scaled likelihoods, the hybrid HMM/ANN recipe) so that the class priors live
in the transitions; a loop residue may score as globular (``loop_globular_offset``: the large soluble domains of
single-span proteins). Durations, loop lengths, start and after-signal probabilities are counted on the same
labelled proteins. Everything is stored in the SAE's config (``segment_decoder``), so a user's SAE carries its
own fit (:func:`fit_decoder`, :func:`write_decoder`).

Cost: Viterbi is O(L * S * P) with S ~ 150 states and at most P = 4 predecessors each, one vectorised numpy
step per residue.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protsae_cli.errors import InputError
from protsae_cli.io.results import Segment

if TYPE_CHECKING:
    from protsae_cli.sae.config import ConceptEntry

DECODER_FORMAT = "protsae-segment-decoder"
DECODER_VERSION = 1
DECODE_MODES = ("viterbi", "none")

#: Decoder roles and the shipped ontology's concept for each (protsae_cli/models/residue_concepts.obo).
ROLE_CONCEPTS: dict[str, str] = {
    "helix": "PSC:0000101", "strand": "PSC:0000102", "signal": "PSC:0000120",
    "inside": "PSC:0000111", "outside": "PSC:0000112",
}
#: Residue classes; the role whose concept a class's runs are reported as.
CLASSES = ("G", "S", "I", "O", "H", "B")
CLASS_ROLE = {"S": "signal", "I": "inside", "O": "outside", "H": "helix", "B": "strand"}
_NEG = -1e30  # "impossible" in log space without inf arithmetic warnings


# ---------------------------------------------------------------------------------------------- labels
def tmbed_classes(labels: str) -> np.ndarray:
    """Residue classes (indices into CLASSES, -1 unresolved) of a TMbed label string.

    TMbed marks every non-membrane residue of a soluble protein as inside (``1``); here those become ``G``, so
    the decoder learns "inside" only where there is a membrane.
    """
    lab = np.frombuffer(labels.encode("ascii"), dtype=np.uint8)
    membrane = any(c in labels for c in "HhBb")
    out = np.full(lab.size, -1, dtype=np.int64)
    table = {"S": "S", "H": "H", "h": "H", "B": "B", "b": "B",
             "1": "I" if membrane else "G", "2": "O" if membrane else "G"}
    for ch, cls in table.items():
        out[lab == ord(ch)] = CLASSES.index(cls)
    return out


def classes_from_roles(roles: Mapping[str, np.ndarray], known: np.ndarray) -> np.ndarray:
    """Residue classes (indices into CLASSES, -1 unknown) from per-role boolean label tracks, for labels of any
    format that names the role concepts (TMbed, UniProt topology features ...).

    The rule of ``tmbed_classes``: a protein with a labelled span (helix or strand) is a membrane protein whose
    inside / outside residues are loops ``I`` / ``O``; a protein without one is globular (``G``), whatever its
    side labels say (TMbed marks soluble proteins "inside"). Residues outside ``known`` and residues of a
    membrane protein that no role labels are unknown (-1); a signal peptide is ``S`` either way.
    """
    known = np.asarray(known, dtype=bool)
    n = known.shape[0]
    track = {r: np.asarray(roles[r], dtype=bool) if r in roles else np.zeros(n, bool) for r in ROLE_CONCEPTS}
    membrane = bool((track["helix"] | track["strand"])[known].any())
    out = np.full(n, -1, dtype=np.int64)
    if membrane:
        out[track["inside"]] = CLASSES.index("I")
        out[track["outside"]] = CLASSES.index("O")
    else:
        out[:] = CLASSES.index("G")
    out[track["signal"]] = CLASSES.index("S")
    out[track["helix"]] = CLASSES.index("H")
    out[track["strand"]] = CLASSES.index("B")
    out[~known] = -1
    return out


def _runs(cls: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end exclusive, class) of maximal runs."""
    if cls.size == 0:
        z = np.zeros(0, np.int64)
        return z, z, z
    brk = np.flatnonzero(np.diff(cls)) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [cls.size]])
    return starts, ends, cls[starts]


# ---------------------------------------------------------------------------------------------- features
def features(acts: np.ndarray, context: Sequence[int] = (), n_extra: int = 0) -> np.ndarray:
    """[L, (2 + len(context)) * n_roles]: ``a > 0`` and ``log1p(a)`` per role concept (TopK codes are 0 for most
    residues, so the indicator carries the "fired at all" signal and the log the strength), then for each
    half-width w in ``context`` the mean of ``log1p(a)`` over residues i-w..i+w (clipped at the ends): a span's
    residues are recognised by their neighbours too, which steadies the boundaries. The last ``n_extra``
    columns are further SAE latents (not role concepts): only ``log1p(a)`` of each is appended, last."""
    a_all = np.maximum(np.asarray(acts, dtype=np.float64), 0.0)
    a = a_all[:, :a_all.shape[1] - n_extra] if n_extra else a_all
    la = np.log1p(a)
    parts = [(a > 0).astype(np.float64), la]
    L = la.shape[0]
    if context and L:
        cs = np.concatenate([np.zeros((1, la.shape[1])), np.cumsum(la, axis=0)])
        i = np.arange(L)
        for w in context:
            lo, hi = np.maximum(i - int(w), 0), np.minimum(i + int(w) + 1, L)
            parts.append((cs[hi] - cs[lo]) / (hi - lo)[:, None])
    if n_extra:
        parts.append(np.log1p(a_all[:, a_all.shape[1] - n_extra:]))
    return np.concatenate(parts, axis=1)


def role_activations(idx: np.ndarray, val: np.ndarray, latents: Sequence[int]) -> np.ndarray:
    """Dense [rows, n_roles] activations of the role latents from top-k codes (0 where a latent is not kept)."""
    idx = np.asarray(idx)
    val = np.asarray(val, dtype=np.float32)
    out = np.zeros((idx.shape[0], len(latents)), dtype=np.float32)
    for j, lat in enumerate(latents):
        out[:, j] = np.where(idx == lat, val, 0.0).sum(1)
    return out


# ---------------------------------------------------------------------------------------------- decoder
@dataclass
class Duration:
    """Explicit length distribution of a span class: log P(d) for d in min..max (fitted histogram)."""

    min: int
    max: int
    log_p: list[float]

    def check(self, where: str) -> None:
        if not (1 <= self.min <= self.max <= 200) or len(self.log_p) != self.max - self.min + 1:
            raise InputError(f"{where}: duration needs 1 <= min <= max <= 200 and max-min+1 log_p values, got "
                             f"min={self.min} max={self.max} with {len(self.log_p)} values")


class SignalGate:
    """Protein-level check of a decoded signal peptide: a logistic regression on the mean activation of a few
    SAE latents over the first ``window`` residues.

    Why: the signal-peptide latent also fires on mitochondrial and plastid transit peptides (N-terminal
    targeting sequences of similar length); TMbed has no transit-peptide label, so the distinction is learnt
    from DeepLoc's mitochondrial / plastid proteins as negatives (docs/SEGMENTS.md). Stored in the decoder block
    as ``signal_gate``: ``window``, ``latents``, ``coef``, ``intercept``, ``threshold``.
    """

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = dict(spec)
        self.window = int(spec["window"])
        self.latents = np.asarray(spec["latents"], dtype=np.int64)
        self.coef = np.asarray(spec["coef"], dtype=np.float64)
        self.intercept = float(spec["intercept"])
        self.threshold = float(spec["threshold"])
        if self.window < 1 or self.latents.ndim != 1 or self.coef.shape != self.latents.shape \
                or not np.isfinite(self.coef).all() or not math.isfinite(self.intercept) \
                or not 0.0 <= self.threshold <= 1.0:
            raise InputError("signal_gate needs window >= 1, one coef per latent (finite) and 0 <= threshold <= 1")

    def probability(self, idx: np.ndarray, val: np.ndarray) -> float:
        """P(signal peptide | the first ``window`` residues' codes)."""
        x = gate_features(idx, val, self.latents, self.window)
        z = float(x @ self.coef) + self.intercept
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0

    def allows(self, idx: np.ndarray, val: np.ndarray) -> bool:
        return self.probability(idx, val) >= self.threshold


def gate_features(idx: np.ndarray, val: np.ndarray, latents: np.ndarray, window: int) -> np.ndarray:
    """Mean activation of each of ``latents`` over the first ``window`` rows of top-k codes (0 where absent)."""
    idx = np.asarray(idx)[:window]
    val = np.asarray(val, dtype=np.float64)[:window]
    if idx.shape[0] == 0:
        return np.zeros(len(latents))
    hit = idx[:, :, None] == np.asarray(latents)[None, None, :]     # [w, k, n]
    return (hit * val[:, :, None]).sum((0, 1)) / idx.shape[0]


class SegmentDecoder:
    """A fitted state model: emission weights, durations and transitions; decodes one protein at a time."""

    def __init__(self, params: Mapping[str, Any], where: str = "segment_decoder") -> None:
        self.params = dict(params)
        self.where = where
        try:
            if params.get("format") != DECODER_FORMAT:
                raise InputError(f"not a {DECODER_FORMAT} (format={params.get('format')!r})")
            if int(params.get("format_version", 0)) > DECODER_VERSION:
                raise InputError(f"format_version {params['format_version']} is newer than this protsae supports")
            self.roles: dict[str, dict[str, Any]] = {r: dict(v) for r, v in params["roles"].items()}
            unknown = set(self.roles) - set(ROLE_CONCEPTS)
            if unknown:
                raise InputError(f"unknown roles {sorted(unknown)}")
            self.role_order: list[str] = list(params["role_order"])
            if sorted(self.role_order) != sorted(self.roles):
                raise InputError("role_order must list each role once")
            self.classes: list[str] = list(params["classes"])
            if not set(self.classes) <= set(CLASSES) or "G" not in self.classes:
                raise InputError(f"classes must be a subset of {CLASSES} including G, got {self.classes}")
            em = params["emission"]
            self.W = np.asarray(em["coef"], dtype=np.float64)
            self.b = np.asarray(em["intercept"], dtype=np.float64)
            self.log_prior = np.asarray(em["log_prior"], dtype=np.float64)
            self.context = [int(w) for w in em.get("context", [])]
            # Emission = log P(c | a) - prior_weight * log P(c): 1 is the hybrid HMM/ANN scaled likelihood, lower
            # keeps part of the class prior per residue (rare membrane classes must then be earned residue by
            # residue; chosen on validation proteins, docs/SEGMENTS.md).
            self.prior_weight = float(em.get("prior_weight", 1.0))
            if not 0.0 <= self.prior_weight <= 1.0:
                raise InputError(f"emission prior_weight must be in [0, 1], got {self.prior_weight}")
            if any(w < 1 or w > 50 for w in self.context):
                raise InputError(f"emission context half-widths must be 1-50, got {self.context}")
            # A loop residue of a membrane protein may read as globular: its inside/outside score is at least the
            # globular score plus this offset (None: off). Why: loops are learnt from membrane proteins' loops,
            # mostly short; the large soluble domains of single-span proteins look globular, and without this
            # the membrane path pays for every such residue and single-span proteins decode as globular (TMHMM
            # has globular-domain states in its loops for the same reason). Chosen on validation proteins.
            lg_off = em.get("loop_globular_offset")
            self.loop_globular_offset = None if lg_off is None else float(lg_off)
            if self.loop_globular_offset is not None and not math.isfinite(self.loop_globular_offset):
                raise InputError("emission loop_globular_offset must be finite or null")
            # Further SAE latents whose log1p(activation) the emission also reads (chosen on fitting data).
            self.extra_latents = [int(x) for x in em.get("extra_latents", [])]
            nf = (2 + len(self.context)) * len(self.role_order) + len(self.extra_latents)
            if self.W.shape != (len(self.classes), nf) or self.b.shape != (len(self.classes),) \
                    or self.log_prior.shape != (len(self.classes),):
                raise InputError(f"emission shapes {self.W.shape}/{self.b.shape}/{self.log_prior.shape} do not "
                                 f"match {len(self.classes)} classes x {nf} features")
            if not (np.isfinite(self.W).all() and np.isfinite(self.b).all() and np.isfinite(self.log_prior).all()):
                raise InputError("emission parameters must be finite")
            self.durations: dict[str, Duration] = {c: Duration(**params["durations"][c])
                                                   for c in ("S", "H", "B") if c in self.classes}
            for c, d in self.durations.items():
                d.check(f"duration {c}")
            self.trans = {k: float(v) for k, v in params["transitions"].items()}
            # Log-space biases chosen on validation proteins (0 = the counted transitions as they are):
            # "membrane" is added to starting on the membrane path (a globular-vs-membrane prior), "span" to
            # every entry into a TM span (a transition penalty against extra spans);
            # "strand" is added to entries into a TM beta strand only (beta barrels are rare, and a weak strand
            # concept otherwise decodes soluble proteins as barrels).
            self.penalties = {k: float(params.get("penalties", {}).get(k, 0.0))
                              for k in ("membrane", "span", "strand")}
            if not all(math.isfinite(v) for v in self.penalties.values()):
                raise InputError("penalties must be finite")
            self.gate = SignalGate(params["signal_gate"]) if params.get("signal_gate") else None
            # Membrane gate: a decoded membrane path whose best span the emission model is less sure of than this
            # (mean P(span class | a)) is decoded again as globular; 0 = off. Chosen on validation proteins.
            self.min_span_confidence = float(params.get("membrane_gate", {}).get("min_span_confidence", 0.0))
            if not 0.0 <= self.min_span_confidence <= 1.0:
                raise InputError("membrane_gate min_span_confidence must be in [0, 1]")
            # Residues added to each decoded span's start and end (class -> [start, end]; e.g. "H": [0, -2]
            # ends every helix two residues earlier): the systematic offset of the decoded ends measured on the
            # fitting proteins (fit_boundary_shift). Why: the SAE's helix evidence outlasts the helix at its
            # C-terminal end, so decoded helices end late by the same amount protein after protein.
            self.boundary_shift: dict[str, tuple[int, int]] = {}
            for c, v in (params.get("boundary_shift") or {}).items():
                if c not in ("H", "B") or len(v) != 2 or any(int(x) != x or abs(int(x)) > 10 for x in v):
                    raise InputError(f"boundary_shift {c}: {v!r} (span class H or B -> [start, end], integers "
                                     "within +-10)")
                self.boundary_shift[c] = (int(v[0]), int(v[1]))
        except InputError as e:
            raise InputError(f"{where}: {e}") from e
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{where}: malformed segment decoder ({e!r})") from e
        self._build()

    @property
    def input_latents(self) -> list[int]:
        """The latents whose activations the decoder reads, in column order: roles, then extra latents."""
        return [int(self.roles[r]["latent"]) for r in self.role_order] + self.extra_latents

    # -- state space -------------------------------------------------------------------------------
    def _build(self) -> None:
        """States, their class, predecessor table [S, P] and log transition weights, start and end masks."""
        t = self.trans
        lg = lambda p: math.log(p) if p > 0 else _NEG  # noqa: E731
        states: list[str] = []          # class letter per state
        preds: list[list[tuple[int, float]]] = []
        start: list[float] = []

        def add(cls: str, st: float = _NEG) -> int:
            states.append(cls)
            preds.append([])
            start.append(st)
            return len(states) - 1

        G = add("G", lg(t["start_G"]))
        has_tm = "I" in self.classes
        # Sides before the first span (I0/O0) cannot end a protein: a membrane path has at least one span.
        pm, ps = self.penalties["membrane"], self.penalties["span"]
        I0 = add("I", lg(t["start_I"]) + pm) if has_tm else -1
        O0 = add("O", lg(t["start_O"]) + pm) if has_tm else -1
        I = add("I") if has_tm else -1
        O = add("O") if has_tm else -1
        chains: dict[str, tuple[int, int]] = {}   # name -> (first state, last state)

        def chain(name: str, cls: str) -> tuple[int, int]:
            d = self.durations[cls]
            first = len(states)
            for j in range(d.max):
                s = add(cls)
                if j > 0:
                    preds[s].append((s - 1, 0.0))
            chains[name] = (first, first + d.max - 1)
            return chains[name]

        def enter(name: str, cls: str, src: int, logp: float) -> None:
            """Entering the chain at position j means a span of length max - j (0-based j)."""
            d = self.durations[cls]
            first, _ = chains[name]
            for length in range(d.min, d.max + 1):
                j = d.max - length
                preds[first + j].append((src, logp + d.log_p[length - d.min]))

        end_ok = [G] + ([I, O] if has_tm else [])
        if has_tm:
            for side, stay in ((I0, "stay_I"), (O0, "stay_O"), (I, "stay_I"), (O, "stay_O")):
                preds[side].append((side, lg(t[stay])))
            for span in ("H", "B"):
                if span not in self.classes:
                    continue
                q = t["span_H"] if span == "H" else 1.0 - t["span_H"]
                pen = ps + (self.penalties["strand"] if span == "B" else 0.0)
                _, last_io = chain(span + "io", span)
                _, last_oi = chain(span + "oi", span)
                for src_i, src_o in ((I0, O0), (I, O)):
                    enter(span + "io", span, src_i, lg((1.0 - t["stay_I"]) * q) + pen)
                    enter(span + "oi", span, src_o, lg((1.0 - t["stay_O"]) * q) + pen)
                preds[O].append((last_io, 0.0))
                preds[I].append((last_oi, 0.0))
                end_ok += [last_io, last_oi]
        preds[G].append((G, lg(t["stay_G"])))
        if "S" in self.classes:
            d = self.durations["S"]
            first, last = chain("S", "S")
            for length in range(d.min, d.max + 1):
                start[first + d.max - length] = lg(t["start_S"]) + d.log_p[length - d.min]
            preds[G].append((last, lg(t["after_S_G"])))
            if has_tm:
                preds[I0].append((last, lg(t["after_S_I"]) + pm))
                preds[O0].append((last, lg(t["after_S_O"]) + pm))
        n = len(states)
        P = max(len(p) for p in preds)
        self.pred = np.zeros((n, P), dtype=np.int64)
        self.logT = np.full((n, P), _NEG, dtype=np.float64)
        for s, state_preds in enumerate(preds):
            for j, (src, lp) in enumerate(state_preds):
                self.pred[s, j] = src
                self.logT[s, j] = lp
        self.state_class = np.array([self.classes.index(c) for c in states], dtype=np.int64)
        self.log_start = np.array(start, dtype=np.float64)
        self.end_mask = np.full(n, _NEG)
        self.end_mask[end_ok] = 0.0
        self.n_states = n

    # -- decoding ----------------------------------------------------------------------------------
    def class_scores(self, acts: np.ndarray) -> np.ndarray:
        """[L, classes] scaled log-likelihoods log P(c | a) - w log P(c) from activations [L, n_roles + n_extra]
        (role latents in ``role_order``, then ``extra_latents``)."""
        E = self.log_posterior(acts) - self.prior_weight * self.log_prior
        if self.loop_globular_offset is not None and "G" in self.classes:
            g = E[:, self.classes.index("G")] + self.loop_globular_offset
            for c in ("I", "O"):
                if c in self.classes:
                    j = self.classes.index(c)
                    E[:, j] = np.maximum(E[:, j], g)
        return E

    def log_posterior(self, acts: np.ndarray) -> np.ndarray:
        """[L, classes] log P(c | a) of the emission model."""
        z = features(acts, self.context, len(self.extra_latents)) @ self.W.T + self.b
        z -= z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    def span_confidence(self, acts: np.ndarray, cls: np.ndarray, span_classes: Sequence[str] = ("H", "B")) -> float:
        """The best decoded span's mean P(span class | a) (0 without a span), over spans of ``span_classes``:
        how sure the emission model is of the strongest membrane span, which the membrane gate compares with
        ``min_span_confidence``."""
        starts, ends, kinds = _runs(cls)
        spans = [(s, e, k) for s, e, k in zip(starts, ends, kinds, strict=True) if self.classes[k] in span_classes]
        if not spans:
            return 0.0
        post = np.exp(self.log_posterior(acts))
        return float(max(post[s:e, k].mean() for s, e, k in spans))

    def decode(self, acts: np.ndarray, allow_signal: bool = True, allow_membrane: bool = True,
               allowed: np.ndarray | None = None) -> np.ndarray:
        """Most likely residue classes (indices into ``self.classes``) of one protein; ``allow_signal=False``
        decodes the best path without a signal peptide (what the signal gate asks for), ``allow_membrane=False``
        the best globular path (what the membrane gate asks for); ``allowed`` ([L, classes] bool) restricts each residue to some classes (``sides_across``)."""
        acts = np.asarray(acts)
        L = acts.shape[0]
        if L == 0:
            return np.zeros(0, dtype=np.int64)
        E = self.class_scores(acts)[:, self.state_class]      # [L, S]
        off = [c for c in "IOHB" if c in self.classes] if not allow_membrane else []
        if off:
            E = np.where(np.isin(self.state_class, [self.classes.index(c) for c in off]), _NEG, E)
        if allowed is not None:
            E = np.where(np.asarray(allowed, bool)[:, self.state_class], E, _NEG)
        pred, logT = self.pred, self.logT
        ar = np.arange(self.n_states)
        bp = np.empty((L, self.n_states), dtype=np.int8)
        start = self.log_start
        if not allow_signal and "S" in self.classes:
            start = np.where(self.state_class == self.classes.index("S"), _NEG, start)
        delta = start + E[0]
        for t in range(1, L):
            cand = delta[pred] + logT
            b = cand.argmax(1)
            bp[t] = b
            delta = cand[ar, b] + E[t]
        s = int(np.argmax(delta + self.end_mask))
        path = np.empty(L, dtype=np.int64)
        path[L - 1] = s
        predl = pred.tolist()
        for t in range(L - 1, 0, -1):
            s = predl[s][bp[t, s]]
            path[t - 1] = s
        return self.state_class[path]

    def decode_protein(self, idx: np.ndarray, val: np.ndarray, acts: np.ndarray | None = None,
                       shown: Sequence[str] = ("H", "B")) -> np.ndarray:
        """``decode`` plus the gates: a membrane path whose best span of the ``shown`` (reported) span classes
        is unsure is decoded again as globular (membrane gate: a confident span that is not reported does not
        vouch for the ones that are), and a decoded signal peptide the signal gate rejects (e.g. a mitochondrial
        or plastid transit peptide) is decoded again without one."""
        if acts is None:
            acts = role_activations(idx, val, self.input_latents)
        cls = self.decode(acts)
        membrane = True
        if self.min_span_confidence > 0 and self.span_confidence(acts, cls, shown) < self.min_span_confidence \
                and bool(np.isin(cls, [self.classes.index(c) for c in "HB" if c in self.classes]).any()):
            membrane = False
            cls = self.decode(acts, allow_membrane=False)
        if self.gate is not None and "S" in self.classes and cls.size and cls[0] == self.classes.index("S") \
                and not self.gate.allows(idx, val):
            cls = self.decode(acts, allow_signal=False, allow_membrane=membrane)
        return self.shift_boundaries(cls)

    def shift_boundaries(self, cls: np.ndarray) -> np.ndarray:
        """``cls`` with each span's ends moved by ``boundary_shift``. An end moves only into or out of the side
        loop next to it, which keeps at least one residue (also when the spans on both of its sides grow into
        it), and a span stays within its fitted length range (or keeps its length, if decoded outside it); so
        the path stays a valid topology (the residues a span gives up join the loop beside them)."""
        if not self.boundary_shift or cls.size == 0:
            return cls
        out = cls.copy()
        loops = [self.classes.index(c) for c in "IO" if c in self.classes]
        starts, ends, kinds = _runs(cls)
        run_start, run_end = starts.astype(np.int64), ends.astype(np.int64)  # loops' bounds as spans move
        n = len(starts)
        for r in range(n):
            c = self.classes[int(kinds[r])]
            if c not in self.boundary_shift:
                continue
            ds, de = self.boundary_shift[c]
            s, e = int(starts[r]), int(ends[r])
            d = self.durations[c]
            lo, hi = min(d.min, e - s), max(d.max, e - s)
            if ds and r > 0 and int(kinds[r - 1]) in loops:
                s2 = min(max(s + ds, int(run_start[r - 1]) + 1, e - hi), e - lo)
                out[min(s, s2):max(s, s2)] = kinds[r] if s2 < s else kinds[r - 1]
                run_end[r - 1] = s = s2
            if de and r + 1 < n and int(kinds[r + 1]) in loops:
                e2 = max(min(e + de, int(run_end[r + 1]) - 1, s + hi), s + lo)
                out[min(e, e2):max(e, e2)] = kinds[r] if e2 > e else kinds[r + 1]
                run_start[r + 1] = e2
        return out

    def sides_across(self, acts: np.ndarray, cls: np.ndarray, shown: Sequence[str]) -> np.ndarray | None:
        """``cls`` with its sides decoded again across the spans of the ``shown`` classes only: the path keeps
        every residue of a shown span or signal peptide where it is, and each other residue becomes the
        inside or outside loop that best fits the evidence, alternating across the shown spans. None if no
        such path exists. Why: a decoded span of a withheld class (e.g. a 5-residue strand beside a helix)
        flips the side too, so dropping it leaves two sides of one kind facing each other."""
        fixed = np.isin(cls, [self.classes.index(c) for c in ("S", *shown) if c in self.classes])
        allowed = np.zeros((cls.shape[0], len(self.classes)), bool)
        allowed[np.flatnonzero(fixed), cls[fixed]] = True
        loops = [self.classes.index(c) for c in "IO" if c in self.classes]
        for k in loops:
            allowed[~fixed, k] = True
        out = self.decode(acts, allowed=allowed)
        if not (np.array_equal(out[fixed], cls[fixed]) and np.isin(out[~fixed], loops).all()):
            return None
        return out

    def constraints(self) -> list[str]:
        """The hard facts this decoder imposes on every call, in words (recorded in the outputs' provenance)."""
        out = ["topology sides only on proteins with a reported membrane span (soluble proteins get none)",
               "sides alternate across every membrane span"]
        d = self.durations
        if "S" in d:
            out.append(f"signal peptide only at the N-terminus (starts at residue 1), {d['S'].min}-{d['S'].max} "
                       f"residues")
        for c, name in (("H", "TM helix"), ("B", "TM beta strand")):
            if c in d:
                out.append(f"{name} {d[c].min}-{d[c].max} residues")
        for c, name in (("H", "TM helix"), ("B", "TM beta strand")):
            if c in self.boundary_shift:
                ds, de = self.boundary_shift[c]
                out.append(f"{name} ends moved by the fitted offset (start {ds:+d}, end {de:+d} residues)")
        if self.loop_globular_offset is not None:
            out.append("loop residues may read as soluble (globular-domain floor)")
        if self.min_span_confidence > 0:
            out.append(f"membrane path only with a span of mean P(span) >= {self.min_span_confidence:g}")
        if self.gate is not None:
            out.append(f"signal peptide gated against transit peptides (first {self.gate.window} residues, "
                       f"p >= {self.gate.threshold:g})")
        out.append("site concepts per residue")
        return out

    def segments(self, idx: np.ndarray, val: np.ndarray,
                 entries: Mapping[str, ConceptEntry]) -> list[Segment]:
        """Decoded segments of one protein for the called role concepts (``entries``: role -> entry)."""
        acts = role_activations(idx, val, self.input_latents)
        # The whole model is decoded, withheld classes included, and their segments are then left out: a
        # stretch the model reads as a beta strand stays out of the reported helices instead of being forced
        # into the nearest reported class (often an extra helix; docs/SEGMENTS.md measures both). Withholding
        # says the concept's calls are not reliable enough to report, not that its evidence is useless.
        shown = [c for c in ("H", "B") if c in self.classes and CLASS_ROLE[c] in entries]
        cls = self.decode_protein(idx, val, acts, shown=shown)
        unshown = [self.classes.index(c) for c in ("H", "B") if c in self.classes and c not in shown]
        span_shown = bool(np.isin(cls, [self.classes.index(c) for c in shown]).any())
        if span_shown and np.isin(cls, unshown).any():
            # Sides alternate across each span: with an unreported span left out, they are decoded again
            # across the reported spans (which stay where they are); if that fails, no side is reported.
            again = self.sides_across(acts, cls, shown)
            span_shown = again is not None
            if again is not None:
                cls = again
        starts, ends, kinds = _runs(cls)
        letters = [self.classes[k] for k in kinds.tolist()]
        out: list[Segment] = []
        for s, e, c in zip(starts.tolist(), ends.tolist(), letters, strict=True):
            role = CLASS_ROLE.get(c)
            entry = entries.get(role) if role else None
            if role is None or entry is None or (c in ("I", "O") and not span_shown):
                continue
            a = acts[s:e, self.role_order.index(role)]
            on = a[(a > 0) & (a >= np.float32(entry.threshold))]
            out.append(Segment(latent=int(entry.latent), start=s + 1, end=e, threshold=entry.threshold,
                               max_act=float(on.max()) if on.size else 0.0,
                               mean_act=float(on.astype(np.float64).mean()) if on.size else 0.0))
        return out


def decoder_entries(decoder: SegmentDecoder, concepts: Sequence[ConceptEntry]) -> dict[str, ConceptEntry]:
    """Role -> the called entry the decoder reports it as (same concept id and latent as fitted)."""
    out: dict[str, ConceptEntry] = {}
    for role, spec in decoder.roles.items():
        for c in concepts:
            if c.concept_id == spec["concept_id"] and int(c.latent) == int(spec["latent"]):
                out.setdefault(role, c)
    return out


class RegionCaller:
    """What annotate calls per protein: decoded region roles plus per-residue calls for everything else.

    ``decode="none"`` (or an SAE without a fitted decoder) is exactly ``call_segments`` over all concepts.
    """

    def __init__(self, concepts: Sequence[ConceptEntry], params: Mapping[str, Any] | None,
                 decode: str = "viterbi", where: str = "segment_decoder") -> None:
        if decode not in DECODE_MODES:
            raise InputError(f"--decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        self.concepts = list(concepts)
        self.decoder = SegmentDecoder(params, where) if (decode == "viterbi" and params) else None
        self.entries: dict[str, ConceptEntry] = {}
        decoded_ids: set[int] = set()
        if self.decoder is not None:
            self.entries = decoder_entries(self.decoder, self.concepts)
            decoded_ids = {id(e) for e in self.entries.values()}
            # Every entry sharing a decoded entry's concept and latent is decoded, not per residue.
            keys = {(e.concept_id, int(e.latent)) for e in self.entries.values()}
            decoded_ids |= {id(c) for c in self.concepts if (c.concept_id, int(c.latent)) in keys}
        self.per_residue = [c for c in self.concepts if id(c) not in decoded_ids]
        self.active = self.decoder is not None and bool(self.entries)

    def describe(self) -> str:
        """``none`` or ``viterbi: role=concept, ...`` (the provenance's ``decode``)."""
        if not self.active:
            return "none"
        return "viterbi: " + ", ".join(f"{r}={e.concept_id}" for r, e in sorted(self.entries.items()))

    def constraints(self) -> str:
        """The constraints applied to the calls ("; "-separated; empty for per-residue calls)."""
        return "; ".join(self.decoder.constraints()) if self.active and self.decoder is not None else ""

    def __call__(self, idx: np.ndarray, val: np.ndarray, min_segment_len: int = 1,
                 merge_gap: int = 0) -> list[Segment]:
        from protsae_cli.call.concepts import call_segments

        if not self.active:
            return call_segments(idx, val, self.concepts, min_segment_len=min_segment_len, merge_gap=merge_gap)
        segs = call_segments(idx, val, self.per_residue, min_segment_len=min_segment_len, merge_gap=merge_gap) \
            if self.per_residue else []
        if np.asarray(idx).shape[0]:
            assert self.decoder is not None  # self.active implies a decoder
            segs = segs + self.decoder.segments(idx, val, self.entries)
            segs.sort(key=lambda s: (s.start, s.latent, np.float32(s.threshold)))
        return segs


# ---------------------------------------------------------------------------------------------- fitting
def _duration(lengths: Sequence[int], lo_q: float = 1.0, hi_q: float = 99.0, cap: int = 60) -> Duration:
    """Length range from the 1st-99th percentile of labelled spans, add-one smoothed histogram inside it."""
    arr = np.asarray(lengths, dtype=np.int64)
    lo = max(1, int(np.floor(np.percentile(arr, lo_q))))
    hi = min(cap, max(lo, int(np.ceil(np.percentile(arr, hi_q)))))
    counts = np.array([np.sum(arr == d) for d in range(lo, hi + 1)], dtype=np.float64) + 1.0
    # Light smoothing over neighbouring lengths: a short span histogram is bumpy, span lengths are not.
    if counts.size >= 3:
        counts = np.convolve(np.pad(counts, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    return Duration(min=lo, max=hi, log_p=[float(x) for x in np.log(counts / counts.sum())])


def _fit_logistic(X: np.ndarray, y: np.ndarray, n_classes: int, l2: float = 1e-3,
                  max_iter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression (L-BFGS, torch) -> (coef [C, F], intercept [C])."""
    import torch

    Xt = torch.as_tensor(X, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.long)
    W = torch.zeros((n_classes, X.shape[1]), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Xt @ W.T + b, yt) + l2 * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy(), b.detach().numpy()


def fit_decoder(acts: Sequence[np.ndarray], labels: Sequence[np.ndarray], roles: Mapping[str, ConceptEntry],
                role_order: Sequence[str], fitted_on: str = "", max_residues: int = 400_000,
                seed: int = 0, context: Sequence[int] = (), duration_q: tuple[float, float] = (1.0, 99.0),
                penalties: Mapping[str, float] | None = None,
                extra_latents: Sequence[int] = ()) -> dict[str, Any]:
    """Fit a decoder from per-protein role activations [L, n_roles] and residue classes (``tmbed_classes``).

    Classes whose role has no concept in the SAE are left out of the model (their proteins' residues are not
    used for emissions); ``H``/``B`` need at least 10 labelled spans, ``S`` 10 signal peptides.
    """
    role_order = list(role_order)
    if not acts or len(acts) != len(labels):
        raise InputError("fit_decoder needs as many label arrays as activation arrays (and at least one)")
    present = set(role_order)
    classes = ["G"]
    counts: dict[str, list[int]] = {"S": [], "H": [], "B": []}
    loop: dict[str, list[int]] = {"I": [], "O": []}
    glob_len: list[int] = []
    first: dict[str, int] = {"G": 0, "S": 0, "I": 0, "O": 0}
    after_s: dict[str, int] = {"G": 0, "I": 0, "O": 0}
    span_kind = {"H": 0, "B": 0}
    for y in labels:
        starts, ends, kinds = _runs(np.asarray(y))
        letters = [CLASSES[k] if k >= 0 else "U" for k in kinds]
        membrane = any(c in ("H", "B") for c in letters)
        if not membrane:
            glob_len.append(int(len(y)))
        known = [(s, e, c) for s, e, c in zip(starts, ends, letters, strict=True) if c != "U"]
        if known and known[0][2] in first and known[0][0] == 0:
            first[known[0][2]] += 1
        for i, (s, e, c) in enumerate(known):
            if c in counts:
                if c == "S" and s != 0:
                    continue
                counts[c].append(int(e - s))
                if c in span_kind:
                    span_kind[c] += 1
            elif c in loop:
                loop[c].append(int(e - s))
            if c == "S" and i + 1 < len(known) and known[i + 1][2] in after_s:
                after_s[known[i + 1][2]] += 1
    if "signal" in present and len(counts["S"]) >= 10:
        classes.append("S")
    tm = [c for c, r in (("H", "helix"), ("B", "strand")) if r in present and len(counts[c]) >= 10]
    if tm and "inside" in present and "outside" in present:
        classes += ["I", "O"] + tm
    elif tm:
        classes += ["I", "O"] + tm  # sides as loop states even when the SAE has no side concepts
    cls_index = {c: i for i, c in enumerate(classes)}

    # Emission data: residues whose class is modelled; unresolved and unmodelled residues are skipped.
    X_parts, y_parts = [], []
    remap = np.full(len(CLASSES) + 1, -1, dtype=np.int64)
    for c, i in cls_index.items():
        remap[CLASSES.index(c)] = i
    for a, y in zip(acts, labels, strict=True):
        y = np.asarray(y)
        nc = len(role_order) + len(extra_latents)
        if a.ndim != 2 or a.shape[1] != nc:
            raise InputError(f"activations must be [rows, {nc}] (one column per role, then per extra latent), "
                             f"got {a.shape}")
        if a.shape[0] != y.shape[0]:
            raise InputError(f"activations have {a.shape[0]} rows but labels {y.shape[0]} residues")
        yy = remap[np.where(y >= 0, y, len(CLASSES))]
        keep = yy >= 0
        X_parts.append(features(a, context, len(extra_latents))[keep])
        y_parts.append(yy[keep])
    X = np.concatenate(X_parts)
    yv = np.concatenate(y_parts)
    if X.shape[0] > max_residues:  # subsample residues for the fit, stratified by nothing: uniform
        sel = np.random.default_rng(seed).choice(X.shape[0], max_residues, replace=False)
        X, yv = X[sel], yv[sel]
    coef, intercept = _fit_logistic(X, yv, len(classes))
    prior = np.bincount(yv, minlength=len(classes)).astype(np.float64) + 1.0
    log_prior = np.log(prior / prior.sum())

    def frac(a: float, b: float) -> float:
        return float(a) / float(b) if b else 0.0

    mean_loop_i = float(np.mean(loop["I"])) if loop["I"] else 30.0
    mean_loop_o = float(np.mean(loop["O"])) if loop["O"] else 30.0
    mean_glob = float(np.mean(glob_len)) if glob_len else 300.0
    n_start = sum(first.values()) + 4.0
    n_after = sum(after_s.values()) + 3.0
    n_span = span_kind["H"] + span_kind["B"] + 2.0
    params: dict[str, Any] = {
        "format": DECODER_FORMAT, "format_version": DECODER_VERSION, "method": "viterbi",
        "roles": {r: {"concept_id": e.concept_id, "latent": int(e.latent)} for r, e in roles.items()},
        "role_order": role_order,
        "classes": classes,
        "emission": {"features": "per role in role_order: [a > 0], [log1p(a)], then per context half-width w "
                                 "the mean of log1p(a) over residues i-w..i+w",
                     "context": [int(w) for w in context], "extra_latents": [int(x) for x in extra_latents],
                     "coef": coef.round(6).tolist(), "intercept": intercept.round(6).tolist(),
                     "log_prior": log_prior.round(6).tolist()},
        "penalties": {k: float(v) for k, v in (penalties or {}).items()},
        "durations": {},
        "transitions": {
            "start_G": frac(first["G"] + 1, n_start), "start_S": frac(first["S"] + 1, n_start),
            "start_I": frac(first["I"] + 1, n_start), "start_O": frac(first["O"] + 1, n_start),
            "stay_G": 1.0 - 1.0 / max(mean_glob, 2.0),
            "stay_I": 1.0 - 1.0 / max(mean_loop_i, 2.0), "stay_O": 1.0 - 1.0 / max(mean_loop_o, 2.0),
            "after_S_G": frac(after_s["G"] + 1, n_after), "after_S_I": frac(after_s["I"] + 1, n_after),
            "after_S_O": frac(after_s["O"] + 1, n_after),
            "span_H": frac(span_kind["H"] + 1, n_span),
        },
        "fitted_on": fitted_on,
        "counts": {"proteins": len(labels), "emission_residues": int(X.shape[0]),
                   "signal_peptides": len(counts["S"]), "helices": len(counts["H"]), "strands": len(counts["B"])},
    }
    for c in ("S", "H", "B"):
        if c in classes:
            d = _duration(counts[c], lo_q=duration_q[0], hi_q=duration_q[1])
            params["durations"][c] = dataclasses.asdict(d) | {"log_p": [round(x, 6) for x in d.log_p]}
    params["transitions"] = {k: round(v, 6) for k, v in params["transitions"].items()}
    SegmentDecoder(params)  # refuse to return something annotate could not load
    return params


#: How many further SAE latents the emission reads by default, the membrane gate's default cut and the loop
#: residues' globular floor: the values chosen for the bundled SAE on its validation proteins (docs/SEGMENTS.md,
#: ``selection`` in its decoder block).
DEFAULT_EXTRA_LATENTS = 192
DEFAULT_MIN_SPAN_CONFIDENCE = 0.4
DEFAULT_LOOP_GLOBULAR_OFFSET = 0.0


def screen_latents(codes: Sequence[tuple[np.ndarray, np.ndarray]], labels: Sequence[np.ndarray],
                   exclude: Sequence[int], n: int) -> list[int]:
    """Further emission latents: per residue class, the latents whose firing rate differs most between that
    class and the rest of the labelled residues; ``n`` in all, shared out over the classes present.

    Why: the role concepts alone miss what other latents know about a span's ends (the bundled SAE's
    unsupervised latents raise per-helix recall on validation proteins, docs/SEGMENTS.md); screening by firing
    rate needs no model fit and sees every latent once.
    """
    if n <= 0:
        return []
    d = 1 + max((int(np.asarray(i).max(initial=0)) for i, _ in codes), default=0)
    fire = np.zeros((len(CLASSES), d))
    count = np.zeros(len(CLASSES))
    for (idx, _), y in zip(codes, labels, strict=True):
        y = np.asarray(y)
        ok = y >= 0
        count += np.bincount(y[ok], minlength=len(CLASSES))
        rows = np.repeat(y[ok], np.asarray(idx).shape[1])
        cols = np.asarray(idx)[ok].ravel()
        good = cols >= 0
        np.add.at(fire, (rows[good], cols[good]), 1.0)
    present = count > 0
    if present.sum() < 2:
        return []
    rate = fire[present] / count[present][:, None]
    rest = (fire.sum(0) - fire[present]) / (count.sum() - count[present])[:, None]
    diff = np.abs(rate - rest)
    diff[:, [int(x) for x in exclude if 0 <= int(x) < d]] = -1
    chosen: list[int] = []
    per = max(1, n // int(present.sum()))
    for c in range(diff.shape[0]):
        chosen += [int(j) for j in np.argsort(-diff[c])[:per] if diff[c, j] > 0]
    return sorted(set(chosen))[:n]


def fit_decoder_from_codes(codes: Sequence[tuple[np.ndarray, np.ndarray]], labels: Sequence[np.ndarray],
                           concepts: Sequence[ConceptEntry], fitted_on: str = "",
                           extra_latents: int = DEFAULT_EXTRA_LATENTS,
                           min_span_confidence: float = DEFAULT_MIN_SPAN_CONFIDENCE, prior_weight: float = 1.0,
                           signal_gate: Mapping[str, Any] | None = None,
                           loop_globular_offset: float | None = DEFAULT_LOOP_GLOBULAR_OFFSET,
                           boundary_shift: bool = True) -> dict[str, Any]:
    """A decoder for an SAE from its top-k codes (``(idx, val)`` per protein, as annotate encodes them) and
    residue classes per protein (``classes_from_roles`` / ``tmbed_classes``): what ``protsae calibrate
    --segment-decoder fit`` stores, so a user's own SAE gets its own fit.

    The emission reads the role concepts' latents plus ``extra_latents`` screened latents; the membrane gate,
    prior weight and loop residues' globular floor default to the values chosen for the bundled SAE on
    validation proteins; with ``boundary_shift`` the helix ends' systematic offset on these proteins is
    measured and corrected (``fit_boundary_shift``). ``signal_gate``
    (a fitted ``SignalGate`` spec) is stored as given: it needs transit-peptide negatives that topology labels
    do not have, so it is only carried over from an earlier fit of the same SAE.
    """
    roles, order = role_entries(concepts)
    if "helix" not in roles and "strand" not in roles and "signal" not in roles:
        raise InputError("the SAE's concept table has none of the region concepts the decoder reports "
                         f"({', '.join(ROLE_CONCEPTS.values())})")
    role_lat = [int(roles[r].latent) for r in order]
    extra = screen_latents(codes, labels, role_lat, extra_latents)
    acts = [role_activations(i, v, role_lat + extra) for i, v in codes]
    params = fit_decoder(acts, list(labels), roles, order, fitted_on=fitted_on or f"{len(labels)} proteins",
                         extra_latents=extra, max_residues=200_000 if extra else 400_000)
    if params["classes"] == ["G"]:
        c = params["counts"]
        raise InputError(f"too few labelled segments to fit a decoder ({c['helices']} TM helices, {c['strands']} "
                         f"TM strands, {c['signal_peptides']} N-terminal signal peptides; at least 10 of one kind "
                         "whose concept the SAE has)")
    params["emission"]["prior_weight"] = float(prior_weight)
    params["emission"]["loop_globular_offset"] = None if loop_globular_offset is None else float(loop_globular_offset)
    params["membrane_gate"] = {"min_span_confidence": float(min_span_confidence)}
    if signal_gate:
        params["signal_gate"] = dict(signal_gate)
    if boundary_shift:
        params |= fit_boundary_shift(params, codes, labels)
    SegmentDecoder(params, where="fitted decoder")  # refuse to return something annotate could not load
    return params


#: Smallest median end offset (residues) that ``fit_boundary_shift`` corrects: a 1-residue median is within the
#: boundary labels' own spread and, on the bundled SAE's validation halves, did not carry from one half to the
#: other (docs/SEGMENTS.md "Helix ends").
MIN_BOUNDARY_SHIFT = 2


def fit_boundary_shift(params: Mapping[str, Any], codes: Sequence[tuple[np.ndarray, np.ndarray]],
                       labels: Sequence[np.ndarray]) -> dict[str, Any]:
    """The decoder's systematic end offsets on its fitting proteins, and the shift that corrects them.

    Each labelled helix is paired with the decoded helix that overlaps it most (the decoder as fitted, the gates
    included); the median start and end offsets are measured, and an end whose median is at least
    ``MIN_BOUNDARY_SHIFT`` residues off is moved back by it. Returns ``{"boundary_shift": {"H": [ds, de]},
    "boundary_offsets": {...}}`` to merge into ``params`` (an empty shift when no end is off)."""
    dec = SegmentDecoder({k: v for k, v in params.items() if k != "boundary_shift"}, where="fitted decoder")
    H, B = CLASSES.index("H"), CLASSES.index("B")          # label classes
    hk = dec.classes.index("H") if "H" in dec.classes else -1  # the decoder's index of the same class
    d_start: list[int] = []
    d_end: list[int] = []
    for (idx, val), y in zip(codes, labels, strict=True):
        y = np.asarray(y)
        if not (y == H).any() or (y == B).any():
            continue
        got = dec.decode_protein(idx, val)
        pred = [(int(s), int(e)) for s, e, k in zip(*_runs(got), strict=True) if int(k) == hk]
        for s, e, k in zip(*_runs(y), strict=True):
            if int(k) != H:
                continue
            best = max(((min(e, pe) - max(s, ps), ps, pe) for ps, pe in pred), default=(0, 0, 0))
            if best[0] > 0:
                d_start.append(best[1] - int(s))
                if best[2] < len(got):  # an end at the C-terminus has no loop to move into: not counted
                    d_end.append(best[2] - int(e))
    out: dict[str, Any] = {"boundary_offsets": {"helices": len(d_start)}}
    if not d_start:
        return out | {"boundary_shift": {}}
    med = (float(np.median(d_start)), float(np.median(d_end)) if d_end else 0.0)
    out["boundary_offsets"] |= {"median_start": med[0], "median_end": med[1],
                                "min_corrected": MIN_BOUNDARY_SHIFT}
    shift = [-int(round(m)) if abs(m) >= MIN_BOUNDARY_SHIFT else 0 for m in med]
    return out | {"boundary_shift": {"H": shift} if any(shift) else {}}


def role_entries(concepts: Sequence[ConceptEntry]) -> tuple[dict[str, ConceptEntry], list[str]]:
    """Role -> first concept entry with the role's shipped concept id, and the role order used for features."""
    roles: dict[str, ConceptEntry] = {}
    for role, cid in ROLE_CONCEPTS.items():
        for c in concepts:
            if c.concept_id == cid:
                roles.setdefault(role, c)
    return roles, [r for r in ROLE_CONCEPTS if r in roles]


def write_decoder(sae_dir: str | os.PathLike, params: Mapping[str, Any]) -> Path:
    """Store a fitted decoder in an SAE directory's config.json (the weights are not touched)."""
    from protsae_cli.sae.config import CONFIG_NAME, SAEConfig

    path = Path(sae_dir) / CONFIG_NAME
    try:
        cfg = SAEConfig.from_json_dict(json.loads(path.read_text()), where=str(path))
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read the SAE config ({e})") from e
    cfg.segment_decoder = dict(params)
    from protsae_cli.io.atomic import atomic_write_text

    return atomic_write_text(path, json.dumps(cfg.to_json_dict(), indent=2) + "\n")
