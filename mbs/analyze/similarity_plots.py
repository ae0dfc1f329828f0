"""What a run shows of its language similarity (mbs/analyze/similarity.py computes it): the heatmap of each layer's
cosine matrix, its CSV, and the W&B media; also used by the sweep-level analysis."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mbs.analyze.similarity import LEGACY_STATISTIC, STATISTICS
from mbs.atomic import atomic_write
from mbs.record.figures import save_figure
from mbs.record.results import RunResult


def model_label(result: RunResult) -> str:
    """The model's name for figure titles, saying when its dense weights are a de-quantized GGUF file (the embedded
    default)."""
    model = result.config.get("model") or {}
    dequantized = f" (dense = de-quantized {model['gguf_file']})" if model.get("source") == "gguf_package" else ""
    return result.model["name"] + dequantized


def layer_label(index: int | str, requested: int | None = None) -> str:
    return f"layer {index}" + (f" ({requested})" if requested is not None and requested != int(index) else "")


def matrix_csv(languages: list[str], matrix: list[list[float]]) -> str:
    lines = ["language," + ",".join(languages)]
    lines += [lang + "," + ",".join(f"{x:.6f}" for x in row) for lang, row in zip(languages, matrix)]
    return "\n".join(lines) + "\n"


def plot_heatmap(languages: list[str], matrix: list[list[float]], title: str):
    """Cosine similarities with every cell annotated; the colour scale spans the values shown (they are all close
    to 1 for mean-square vectors, so a 0-1 scale would show one colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    n = len(languages)
    off = m[~np.eye(n, dtype=bool)] if n > 1 else m.ravel()
    size = max(4.0, 0.36 * n + 1.8)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    image = ax.imshow(m, cmap="viridis", vmin=float(off.min()), vmax=1.0)
    ax.set_xticks(range(n), languages, rotation=90, fontsize=7)
    ax.set_yticks(range(n), languages, fontsize=7)
    mid = (float(off.min()) + 1.0) / 2
    digits = 2 if 1.0 - float(off.min()) > 0.1 else 3  # enough digits to tell the cells apart
    for i in range(n):
        for j in range(n):
            cell = "1" if m[i, j] >= 1 - 0.5 * 10 ** -digits else f"{m[i, j]:.{digits}f}".lstrip("0")
            ax.text(j, i, cell, ha="center", va="center", fontsize=4.5 if n > 12 else 6,
                    color="black" if m[i, j] > mid else "white")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="cosine similarity")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_similarity(output_dir: Path, record: dict[str, Any], model: str) -> list[Path]:
    """similarity_layer<i>.csv and .png (+ .pdf) per recorded layer."""

    written = []
    for index, layer in record["layers"].items():
        csv_path = Path(output_dir) / f"similarity_layer{index}.csv"
        atomic_write(csv_path, matrix_csv(layer["languages"], layer["matrix"]))
        title = heatmap_title(model, index, layer["requested"], record.get("statistic"))
        fig = plot_heatmap(layer["languages"], layer["matrix"], title)
        written += [csv_path, *save_figure(fig, csv_path.with_suffix(".png"))]
    return written


def heatmap_title(model: str, index: int | str, requested: int | None, statistic: str | None = None) -> str:
    name = statistic if statistic in STATISTICS else LEGACY_STATISTIC
    what = {"linear": "q/k/v input after the layer's input norm", "residual": "residual stream before the norm"}
    kind = STATISTICS[name]
    centred = ", centred on the evaluated languages' mean" if kind.centred else ""
    return (f"{model}\ncosine similarity of per-language {name} at the input of {layer_label(index, requested)}\n"
            f"({what[kind.source]}{centred}, dense model)")


def wandb_media(record: dict[str, Any], model: str) -> dict[str, Any]:
    """W&B items: per layer the heatmap image and a table of each language's similarity to the calibration mix."""
    import matplotlib.pyplot as plt
    import wandb

    logged = {}
    for index, layer in record["layers"].items():
        title = heatmap_title(model, index, layer["requested"], record.get("statistic"))
        fig = plot_heatmap(layer["languages"], layer["matrix"], title)
        logged[f"similarity/layer{index}/heatmap"] = wandb.Image(fig)
        plt.close(fig)
        logged[f"similarity/layer{index}/matrix"] = wandb.Table(
            columns=["language", *layer["languages"]],
            data=[[k, *row] for k, row in zip(layer["languages"], layer["matrix"])])
        logged[f"similarity/layer{index}/to_calibration"] = wandb.Table(
            columns=["language", "similarity_to_calibration"], data=list(map(list, layer["to_calibration"].items())))
    return logged
