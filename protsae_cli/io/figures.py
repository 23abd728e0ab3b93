"""The one way protsae writes a figure: one colour-blind-safe palette, matplotlib without a display, and PNGs
that are atomic (temp + rename: an interrupted run leaves no half image) and reproducible (no software or date
metadata, so the same data give the same bytes). Used by `protsae report --png-dir` and `protsae eval --plots`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Colour-blind-safe categorical palette (Okabe-Ito first, then Paul Tol's muted set); a concept or an SAE keeps
# one colour across a report because its colour index comes from its run-level rank.
PALETTE: tuple[str, ...] = (
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#117733",
    "#332288", "#AA4499", "#44AA99", "#999933", "#661100", "#6699CC", "#888888",
)


def color_for(rank: int) -> str:
    return PALETTE[rank % len(PALETTE)]


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed on cluster nodes)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path, dpi: int = 150, tight: bool = True) -> Path:
    """Write `fig` to `path` atomically and reproducibly, then close it (also when writing fails)."""
    from protsae_cli.io.atomic import AtomicFile

    plt = pyplot()
    path = Path(path)
    atomic = AtomicFile(path, fsync=False)
    try:
        fig.savefig(atomic.tmp, format="png", dpi=dpi, metadata={"Software": None},
                    **({"bbox_inches": "tight"} if tight else {}))
        atomic.commit()
    except BaseException:
        atomic.discard()
        raise
    finally:
        plt.close(fig)
    return path
