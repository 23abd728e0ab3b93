"""Figures for the report: inline SVG/PNG for the HTML page and matplotlib PNGs for papers and slides.

Two renderers because they serve different readers. The HTML report must open offline on an HPC login node
and stay small for dozens of proteins, so its figures are hand-written SVG (crisp text, hover tooltips, no
JavaScript library) with heatmaps as tiny one-pixel-per-cell PNGs stretched by the browser. The ``--png-dir``
figures are matplotlib, which people already know how to restyle and drop into a manuscript.

Everything here takes plain numbers and strings and returns markup or writes files; reading the HDF5 file and
choosing what to show is report.py's job. Every string that came from data (protein ids, concept names) is
escaped here, at the point where it enters markup.
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protsae_cli.io.figures import PALETTE, color_for, save_png  # noqa: F401 (the report's figures use them)
from protsae_cli.io.figures import pyplot as _pyplot

HEAT_CMAP = "magma_r"

LABEL_W = 250          # px, left label column of the protein figure
PLOT_W = 860           # px, the residue axis (the whole protein always fits: no sideways scrolling)
PAD_L, PAD_R = 10, 14  # px around the residue axis so end ticks are not clipped
LETTER_PX = 7.0        # px per residue needed to spell the sequence out
RULER_H = 26
SEQ_H = 18
LANE_H = 30
HEAT_ROW_H = 13
GAP_H = 22
REF_H = 18             # px per reference track (report --annotations)
REF_COLOR = "#4b5563"  # reference tracks of concepts the run did not call


def esc(value: object) -> str:
    """HTML/SVG-escape any value (quotes included, so it is safe inside attributes too)."""
    return html.escape(str(value), quote=True)


# ---------------------------------------------------------------------------------------------------------
# PNG without matplotlib (heatmap cells, colour bars)
# ---------------------------------------------------------------------------------------------------------

def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an RGB uint8 image [h, w, 3] as PNG.

    A dozen lines of zlib instead of a matplotlib figure per heatmap: one pixel per (latent, residue) cell
    keeps the HTML small and the output byte-identical between runs (no timestamps or library versions).
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"expected a non-empty [h, w, 3] image, got shape {rgb.shape}")
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_LUT: np.ndarray | None = None


def heat_lut() -> np.ndarray:
    """256 x RGB lookup table of the heatmap colour map (matplotlib's, sampled once)."""
    global _LUT
    if _LUT is None:
        import matplotlib

        cmap = matplotlib.colormaps[HEAT_CMAP]
        _LUT = (np.asarray(cmap(np.linspace(0.0, 1.0, 256)))[:, :3] * 255 + 0.5).astype(np.uint8)
    return _LUT


def heat_rgb(values: np.ndarray, vmax: float) -> np.ndarray:
    """Colour a [rows, cols] activation matrix; exact zeros stay white so sparsity is visible at a glance."""
    lut = heat_lut()
    v = np.asarray(values, dtype=np.float32)
    scale = vmax if vmax > 0 else 1.0
    idx = np.clip(np.rint(12 + (v / scale) * 243), 12, 255).astype(np.int64)  # skip the palest shades
    img = lut[idx]
    img[v <= 0] = 255
    return img


def colorbar_uri(width: int = 160, height: int = 10) -> str:
    ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :].repeat(height, axis=0)
    ramp[:, 0] = 0.0
    return data_uri(png_bytes(heat_rgb(ramp, 1.0)))


# ---------------------------------------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------------------------------------

def nice_step(span: float, target_ticks: int) -> int:
    """A 1/2/5 x 10^n step giving about ``target_ticks`` ticks over ``span`` residues (at least 1)."""
    if span <= 0 or target_ticks <= 0:
        return 1
    raw = span / target_ticks
    mag = 10 ** math.floor(math.log10(max(raw, 1e-9)))
    for m in (1, 2, 5, 10):
        if m * mag >= raw:
            return max(1, int(m * mag))
    return max(1, int(10 * mag))


def pool_max(values: np.ndarray, bins: int) -> np.ndarray:
    """Max-pool the last axis into ``bins`` columns, so a peak one residue wide survives downsampling."""
    values = np.asarray(values, dtype=np.float32)
    n = values.shape[-1]
    if n <= bins:
        return values
    edges = np.linspace(0, n, bins + 1).astype(np.int64)
    edges[-1] = n
    return np.maximum.reduceat(values, edges[:-1], axis=-1)


def fmt(x: float) -> str:
    """Activations for humans: 3 significant digits, no scientific notation in the usual range."""
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 0.001:
        return f"{x:.2e}"
    return f"{x:.3g}"


def _clip_label(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 1] + "\u2026"


# ---------------------------------------------------------------------------------------------------------
# The per-protein figure (concept tracks + latent heatmap on one residue axis)
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Lane:
    """One concept lane: activation profile over encoded residues plus the called segments (1-based)."""

    label: str
    title: str
    color: str
    profile: np.ndarray
    segments: list[tuple[int, int, float, float]] = field(default_factory=list)  # start, end, max, mean
    vmax: float = 1.0
    threshold: float = 0.0
    note: str = ""        # second label line: the concept's measured reliability (docs/CALLS.md)
    note_warn: bool = False  # the reliability is below a calling floor, or was never measured


@dataclass
class RefTrack:
    """One reference track (``report --annotations``): labelled residues of one concept from one label file,
    drawn under the predicted lanes on the same residue axis so calls can be checked against known labels."""

    label: str
    title: str
    color: str
    source: str                                   # the label file(s), shown once above its tracks
    spans: list[tuple[int, int]] = field(default_factory=list)   # 1-based inclusive runs of labelled residues
    masked: list[tuple[int, int]] = field(default_factory=list)  # residues the source leaves unknown (TMbed U)


@dataclass
class Heatmap:
    values: np.ndarray               # [rows, residues]
    labels: list[str]
    titles: list[str]
    vmax: float


def _residue_px(length: int) -> tuple[float, bool]:
    """(pixels per residue, draw letters?).

    The whole protein always fits the width: a figure that scrolls sideways hides segments off-screen and
    prints badly. Letters are drawn when they fit (up to ~130 residues); longer sequences are read by hovering
    (the page's script shows the residue under the pointer).
    """
    if length <= 0:
        return PLOT_W, False
    px = PLOT_W / length
    return px, px >= LETTER_PX


def protein_figure(sequence: str, total_length: int, lanes: Sequence[Lane], heat: Heatmap | None,
                   max_lanes_note: str = "", refs: Sequence[RefTrack] = ()) -> str:
    """HTML for one protein: fixed label column + horizontally scrollable SVG sharing the residue axis.

    Tracks and heatmap share one x axis so a segment can be followed straight down to the latents behind it.
    ``sequence`` is what was encoded; ``total_length`` > len(sequence) marks a truncated tail, drawn hatched.
    ``refs`` (reference labels) go right under the predicted lanes, so a call and its label line up vertically.
    """
    n = len(sequence)
    L = max(total_length, n)
    px, letters = _residue_px(L)
    width = int(math.ceil(L * px))
    rows_left: list[str] = []
    rows_right: list[str] = []
    y = 0

    # Ruler.
    step = nice_step(L, max(2, int(width / 70)))
    ticks = [1] + [t for t in range(step, L + 1, step) if (t - 1) * px >= 28]
    if ticks[-1] != L and (L - ticks[-1]) * px > 30:
        ticks.append(L)
    rows_left.append(_left_text(y + RULER_H - 8, "residue", css="axis"))
    parts = [f'<line x1="0" y1="{RULER_H - 4}" x2="{width}" y2="{RULER_H - 4}" class="rule"/>']
    for t in ticks:
        x = (t - 0.5) * px
        anchor = "start" if x < 12 else ("end" if x > width - 12 else "middle")
        parts.append(f'<line x1="{x:.1f}" y1="{RULER_H - 8}" x2="{x:.1f}" y2="{RULER_H - 4}" class="rule"/>'
                     f'<text x="{x:.1f}" y="{RULER_H - 11}" text-anchor="{anchor}" class="tick">{t}</text>')
    rows_right.append("".join(parts))
    y += RULER_H

    # Sequence letters.
    if letters and n:
        rows_left.append(_left_text(y + SEQ_H - 5, "sequence", css="axis"))
        parts = []
        size = min(10.0, px * 1.3)
        for i, aa in enumerate(sequence):
            x = (i + 0.5) * px
            parts.append(f'<text x="{x:.1f}" y="{y + SEQ_H - 5}" class="aa aa-{_aa_class(aa)}" '
                         f'style="font-size:{size:.1f}px">{esc(aa)}</text>')
        rows_right.append("".join(parts))
        y += SEQ_H

    # Concept lanes.
    inner = LANE_H - 8
    for li, lane in enumerate(lanes):
        top = y
        if lane.note:  # two lines: the concept, then what its calls are worth
            text = (f'<text x="10" y="{top + 13}" class="lane">{esc(_clip_label(lane.label, 36))}</text>'
                    f'<text x="10" y="{top + 25}" class="lnote{" warn" if lane.note_warn else ""}">'
                    f'{esc(_clip_label(lane.note, 44))}</text>')
        else:
            text = (f'<text x="10" y="{top + LANE_H / 2 + 4:.1f}" class="lane">'
                    f'{esc(_clip_label(lane.label, 36))}</text>')
        rows_left.append(f'<g><title>{esc(lane.title)}</title>'
                         f'<rect x="0" y="{top + 3}" width="4" height="{LANE_H - 6}" fill="{lane.color}"/>'
                         f'{text}</g>')
        parts = [f'<rect x="0" y="{top}" width="{width}" height="{LANE_H}" class="{"band" if li % 2 else "band2"}"/>']
        prof = np.asarray(lane.profile, dtype=np.float32)
        if prof.size:
            cols = max(1, min(prof.size, width))
            pooled = pool_max(prof, cols)
            colw = prof.size * px / pooled.size
            vmax = lane.vmax if lane.vmax > 0 else float(pooled.max() or 1.0)
            base = top + LANE_H - 3
            parts.append(f'<path d="{_step_path(pooled, colw, base, inner, vmax)}" fill="{lane.color}" '
                         'fill-opacity="0.28" stroke="none"/>')
            if 0 < lane.threshold < vmax:
                ty = base - lane.threshold / vmax * inner  # dashed: where the concept is called
                parts.append(f'<line x1="0" x2="{n * px:.1f}" y1="{ty:.1f}" y2="{ty:.1f}" class="thr"/>')
        if lane.segments:  # colours set once per lane and inherited: a long protein has hundreds of segments
            parts.append(f'<g fill="{lane.color}" stroke="{lane.color}">')
            for (s, e, mx, mean) in lane.segments:
                x0, w = (s - 1) * px, max((e - s + 1) * px, 1.5)
                tip = f"{lane.title}\nresidues {s}\u2013{e} ({e - s + 1} aa)\nmax {fmt(mx)} \u00b7 mean {fmt(mean)}"
                parts.append(f'<g class="seg"><title>{esc(tip)}</title>'
                             f'<rect class="sb" x="{x0:.1f}" y="{top + 2}" width="{w:.1f}" height="{LANE_H - 4}"/>'
                             f'<rect class="sf" x="{x0:.1f}" y="{top + LANE_H - 7}" width="{w:.1f}" height="5"/></g>')
            parts.append("</g>")
        rows_right.append("".join(parts))
        y += LANE_H
    if not lanes:
        rows_left.append(_left_text(y + 18, "no concept segments", css="muted"))
        rows_right.append(f'<text x="8" y="{y + 18}" class="muted">No concept was called on this protein; '
                          f'the heatmap below shows its most active latents.</text>')
        y += LANE_H
    if max_lanes_note:
        rows_left.append(_left_text(y + 14, max_lanes_note, css="muted"))
        y += 20

    # Reference tracks, grouped by label file.
    source = None
    for ref in refs:
        if ref.source != source:
            source = ref.source
            y += 4
            rows_left.append(f'<text x="10" y="{y + 12}" class="axis">{esc(_clip_label("reference: " + source, 40))}'
                             f'<title>{esc("reference labels from " + source)}</title></text>')
            y += 16
        top = y
        rows_left.append(f'<g class="ref"><title>{esc(ref.title)}</title>'
                         f'<rect x="0" y="{top + 3}" width="4" height="{REF_H - 6}" fill="{ref.color}"/>'
                         f'<text x="10" y="{top + REF_H / 2 + 4:.1f}" class="rlane">'
                         f'{esc(_clip_label(ref.label, 40))}</text></g>')
        parts = [f'<g class="reftrack"><title>{esc(ref.title)}</title>'
                 f'<rect x="0" y="{top}" width="{width}" height="{REF_H}" class="band"/>'
                 f'<line x1="0" x2="{width}" y1="{top + REF_H / 2:.1f}" y2="{top + REF_H / 2:.1f}" class="rule"/>']
        for (s, e) in ref.masked:
            parts.append(f'<rect x="{(s - 1) * px:.1f}" y="{top + 3}" width="{max((e - s + 1) * px, 1.5):.1f}" '
                         f'height="{REF_H - 6}" fill="url(#hatch)"/>')
        if ref.spans:
            parts.append(f'<g fill="{ref.color}">')
            for (s, e) in ref.spans:
                parts.append(f'<rect class="rb" x="{(s - 1) * px:.1f}" y="{top + 4}" '
                             f'width="{max((e - s + 1) * px, 1.5):.1f}" height="{REF_H - 8}"/>')
            parts.append("</g>")
        parts.append("</g>")
        rows_right.append("".join(parts))
        y += REF_H

    # Heatmap.
    if heat is not None and heat.values.size:
        y += GAP_H // 2
        rows_left.append(_left_text(y + 10, "most active latents", css="axis"))
        y += GAP_H // 2 + 4
        h = len(heat.labels) * HEAT_ROW_H
        cols = min(heat.values.shape[1], max(width, 1), 4000)
        img = heat_rgb(pool_max(heat.values, cols), heat.vmax)
        hw = heat.values.shape[1] * px
        rows_right.append(f'<image x="0" y="{y}" width="{hw:.1f}" height="{h}" preserveAspectRatio="none" '
                          f'class="pix" href="{data_uri(png_bytes(img))}"/>'
                          f'<rect x="0" y="{y}" width="{hw:.1f}" height="{h}" fill="none" class="frame"/>')
        for r, (lab, tip) in enumerate(zip(heat.labels, heat.titles, strict=True)):
            ry = y + r * HEAT_ROW_H
            rows_left.append(f'<text x="10" y="{ry + HEAT_ROW_H - 3}" class="hrow"><title>{esc(tip)}</title>'
                             f'{esc(_clip_label(lab, 40))}</text>')
        y += h + 4

    height = y + 2
    if total_length > n:  # the unencoded tail of a truncated protein, drawn over everything else
        tail_x = n * px
        rows_right.append(f'<rect x="{tail_x:.1f}" y="0" width="{width - tail_x:.1f}" height="{height}" '
                          f'fill="url(#hatch)"><title>residues {n + 1}\u2013{total_length} were not encoded '
                          f'(truncated)</title></rect>')
    defs = ('<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="#c8c8c8" stroke-width="2"/>'
            '</pattern></defs>')
    right = "".join(rows_right)
    x0 = LABEL_W + PAD_L
    total_w = x0 + width + PAD_R
    # One SVG for labels and plot so rows stay aligned when the browser scales the figure to the page width.
    # data-* attributes feed the page's hover read-out (residue letter and number under the pointer).
    return (f'<div class="fig"><svg class="trk" width="{total_w}" height="{height}" '
            f'viewBox="0 0 {total_w} {height}" role="img" data-x0="{x0}" data-w="{width}" data-len="{L}" '
            f'data-seq="{esc(sequence)}">{defs}'
            f'<rect x="0" y="0" width="{LABEL_W}" height="{height}" class="lblbg"/>'
            f'<line x1="{LABEL_W - 0.5}" x2="{LABEL_W - 0.5}" y1="0" y2="{height}" class="frame"/>'
            f'<g>{"".join(rows_left)}</g><g transform="translate({x0},0)">{right}'
            f'<line class="xh" x1="-10" x2="-10" y1="0" y2="{height}"/></g></svg></div>')


def _step_path(values: np.ndarray, colw: float, base: float, inner: float, vmax: float) -> str:
    """Closed step-area path of a profile, one vertex pair per run of equal height.

    Runs rather than one step per residue: SAE profiles are mostly exact zeros, so this keeps a long protein's
    lanes to a few hundred bytes instead of tens of kilobytes each.
    """
    h = np.round(np.minimum(np.asarray(values, np.float64) / vmax, 1.0) * inner, 1)
    if h.size == 0:
        return f"M0,{base}Z"
    change = np.flatnonzero(np.diff(h)) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [h.size]))
    out = [f"M0,{base:g}"]
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        out.append(f"V{base - h[a]:.1f}H{b * colw:.1f}")
    out.append(f"V{base:g}Z")
    return "".join(out)


def _left_text(y: float, text: str, css: str) -> str:
    return f'<text x="10" y="{y:.1f}" class="{css}">{esc(text)}</text>'


def _aa_class(aa: str) -> str:
    """Residue class for letter colouring (the usual physico-chemical groups)."""
    a = aa.upper()
    if a in "DE":
        return "acid"
    if a in "KRH":
        return "base"
    if a in "STNQ":
        return "polar"
    if a in "AVLIMFWYC":
        return "hyd"
    if a in "GP":
        return "special"
    return "other"


def histogram_svg(counts: np.ndarray, edges: np.ndarray, color: str, title: str, subtitle: str,
                  width: int = 250, height: int = 120) -> str:
    """A small bar chart of one latent's nonzero activations (log-scaled counts: the tail is what matters)."""
    counts = np.asarray(counts, dtype=np.float64)
    pad_l, pad_b, pad_t = 6, 18, 4
    pw, ph = width - 2 * pad_l, height - pad_b - pad_t
    logc = np.log10(counts + 1)
    top = float(logc.max()) if logc.size and logc.max() > 0 else 1.0
    bw = pw / max(1, counts.size)
    bars = []
    for i, (c, lc) in enumerate(zip(counts, logc, strict=True)):
        if c <= 0:
            continue
        h = lc / top * ph
        lo, hi = float(edges[i]), float(edges[i + 1])
        bars.append(f'<rect x="{pad_l + i * bw:.1f}" y="{pad_t + ph - h:.1f}" width="{max(bw - 1, 1):.1f}" '
                    f'height="{h:.1f}" fill="{color}"><title>{fmt(lo)}\u2013{fmt(hi)}: {int(c)} residues</title>'
                    f'</rect>')
    axis = (f'<line x1="{pad_l}" y1="{pad_t + ph}" x2="{pad_l + pw}" y2="{pad_t + ph}" class="rule"/>'
            f'<text x="{pad_l}" y="{height - 4}" class="tick">{fmt(float(edges[0]))}</text>'
            f'<text x="{pad_l + pw}" y="{height - 4}" text-anchor="end" class="tick">{fmt(float(edges[-1]))}</text>'
            f'<text x="{pad_l + pw / 2}" y="{height - 4}" text-anchor="middle" class="tick">activation</text>')
    return (f'<figure class="hist"><figcaption><b>{esc(title)}</b><br><span class="muted">{esc(subtitle)}'
            f'</span></figcaption><svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            f'{"".join(bars)}{axis}</svg></figure>')


# ---------------------------------------------------------------------------------------------------------
# matplotlib figures (--png-dir)
# ---------------------------------------------------------------------------------------------------------

def tracks_png(path: Path, title: str, sequence: str, total_length: int, lanes: Sequence[Lane],
               refs: Sequence[RefTrack] = ()) -> Path:
    """Concept lanes along the sequence (activation profile + called segments), one row per concept; reference
    tracks (solid bars of labelled residues) in rows below them."""
    plt = _pyplot()
    n = len(sequence)
    L = max(total_length, n, 1)
    rows = max(1, len(lanes) + len(refs))
    show_letters = L <= 80
    fig_h = 1.1 + 0.42 * rows + (0.25 if show_letters else 0)
    fig, ax = plt.subplots(figsize=(11, fig_h))
    for r, lane in enumerate(lanes):
        base = rows - 1 - r
        prof = np.asarray(lane.profile, dtype=np.float32)
        vmax = lane.vmax if lane.vmax > 0 else float(prof.max() or 1.0)
        if prof.size:
            xs = np.arange(1, prof.size + 1)
            ax.fill_between(xs, base, base + 0.8 * np.minimum(prof / vmax, 1.0), step="mid", color=lane.color,
                            alpha=0.3, linewidth=0)
        for (s, e, _mx, _mean) in lane.segments:
            ax.add_patch(plt.Rectangle((s - 0.5, base), e - s + 1, 0.85, facecolor=lane.color, alpha=0.15,
                                       edgecolor=lane.color, linewidth=0.8))
            ax.add_patch(plt.Rectangle((s - 0.5, base), e - s + 1, 0.14, facecolor=lane.color, linewidth=0))
    for r, ref in enumerate(refs):
        base = rows - 1 - (len(lanes) + r)
        for (s, e) in ref.masked:
            ax.add_patch(plt.Rectangle((s - 0.5, base + 0.15), e - s + 1, 0.55, facecolor="none", hatch="//",
                                       edgecolor="0.7", linewidth=0))
        for (s, e) in ref.spans:
            ax.add_patch(plt.Rectangle((s - 0.5, base + 0.2), e - s + 1, 0.45, facecolor=ref.color, linewidth=0))
    if total_length > n:
        ax.axvspan(n + 0.5, total_length + 0.5, color="0.85", hatch="//", alpha=0.5, linewidth=0,
                   label="not encoded (truncated)")
        ax.legend(loc="upper right", fontsize=7, frameon=False)
    ax.set_xlim(0.5, L + 0.5)
    ax.set_ylim(-0.1, rows)
    names = [_clip_label(l.label, 40) + (f"\n{_clip_label(l.note, 44)}" if l.note else "") for l in lanes]
    names += [_clip_label("ref: " + ref.label, 40) for ref in refs]
    ax.set_yticks([rows - 1 - r + 0.4 for r in range(len(lanes) + len(refs))])
    ax.set_yticklabels(names, fontsize=8)
    for tick, color in zip(ax.get_yticklabels(), [l.color for l in lanes] + [ref.color for ref in refs], strict=True):
        tick.set_color(color)
    if not lanes and not refs:
        ax.text(L / 2, rows / 2, "no concept segments on this protein", ha="center", va="center", color="0.4")
        ax.set_yticks([])
    if show_letters and n:
        ax.set_xticks(range(1, n + 1))
        ax.set_xticklabels(list(sequence), fontsize=6, family="monospace")
        ax.tick_params(axis="x", length=0)
        sec = ax.secondary_xaxis("top")
        sec.set_xlabel("residue", fontsize=8)
        sec.tick_params(labelsize=7)
    else:
        ax.set_xlabel("residue")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title, fontsize=10, loc="left")
    return save_png(fig, path)


def heatmap_png(path: Path, title: str, heat: Heatmap, length: int) -> Path:
    """Top latents x residues; zeros white (the codes are sparse), colour = activation."""
    plt = _pyplot()
    import matplotlib

    rows = max(1, len(heat.labels))
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.2 * rows))
    cmap = matplotlib.colormaps[HEAT_CMAP].with_extremes(under="white")
    vmax = heat.vmax if heat.vmax > 0 else 1.0
    values = np.asarray(heat.values, dtype=np.float32)
    im = ax.imshow(np.where(values > 0, values, -1.0), aspect="auto", interpolation="nearest", cmap=cmap,
                   vmin=1e-9, vmax=vmax, extent=(0.5, values.shape[1] + 0.5, rows - 0.5, -0.5))
    ax.set_xlim(0.5, max(length, values.shape[1]) + 0.5)
    if length > values.shape[1]:
        ax.axvspan(values.shape[1] + 0.5, length + 0.5, facecolor="0.92", hatch="//", edgecolor="0.75",
                   linewidth=0, label="not encoded (truncated)")
        ax.legend(loc="upper right", fontsize=7, frameon=False)
    ax.set_yticks(range(len(heat.labels)))
    ax.set_yticklabels([_clip_label(lab, 44) for lab in heat.labels], fontsize=7)
    ax.set_xlabel("residue")
    cb = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    cb.set_label("activation", fontsize=8)
    ax.set_title(title, fontsize=10, loc="left")
    return save_png(fig, path)


def concepts_png(path: Path, labels: Sequence[str], segments: Sequence[int], residues: Sequence[int],
                 colors: Sequence[str], title: str) -> Path:
    """Horizontal bars of segments and residues covered for the top concepts."""
    plt = _pyplot()
    n = max(1, len(labels))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 0.9 + 0.3 * n), sharey=True)
    ys = np.arange(len(labels))
    a1.barh(ys, segments, color=colors)
    a2.barh(ys, residues, color=colors, alpha=0.7)
    a1.set_yticks(ys)
    a1.set_yticklabels([_clip_label(l, 46) for l in labels], fontsize=8)
    a1.invert_yaxis()
    a1.set_xlabel("segments")
    a2.set_xlabel("residues covered")
    for a in (a1, a2):
        a.spines[["top", "right"]].set_visible(False)
    if not labels:
        a1.text(0.5, 0.5, "no concept segments in this run", transform=a1.transAxes, ha="center")
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    return save_png(fig, path)


def histograms_png(path: Path, panels: Sequence[tuple[str, np.ndarray, np.ndarray, str]], title: str) -> Path:
    """Grid of per-latent activation histograms: (title, counts, edges, colour) per panel."""
    plt = _pyplot()
    from matplotlib import ticker

    n = max(1, len(panels))
    ncol = min(4, n)
    nrow = int(math.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.9 * ncol, 2.1 * nrow), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    # strict=False: the last grid row may have more axes than panels are left; those stay hidden.
    for ax, (ptitle, counts, edges, color) in zip(axes.flat, panels, strict=False):
        ax.set_visible(True)
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=color, linewidth=0)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(_clip_label(ptitle, 34), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
    fig.supxlabel("activation (nonzero residues)", fontsize=8)
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
    fig.tight_layout()
    return save_png(fig, path)
