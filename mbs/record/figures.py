"""One way to save a figure, so every plot the project writes is publishable: a 300-dpi PNG to look at and a PDF
(vector) beside it to put in a paper, each written atomically."""
from __future__ import annotations

from pathlib import Path

from mbs.atomic import atomic_path

DPI = 300


def save_figure(fig, path: str | Path, close: bool = True) -> list[Path]:
    """Write ``fig`` to ``path`` (a .png) and to the same name with .pdf; returns both paths."""
    import matplotlib.pyplot as plt

    png = Path(path).with_suffix(".png")
    written = []
    for target, fmt in ((png, "png"), (png.with_suffix(".pdf"), "pdf")):
        with atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=DPI, format=fmt, bbox_inches="tight")
        written.append(target)
    if close:
        plt.close(fig)
    return written
