"""Per-image evaluation artifacts: a CSV of per-image scores, a histogram of per-image mIoU (as the
report's Figs. 11-13) and overlays of chosen images in the report's Fig. 3 colours (direct road red,
alternative blue). Every writer returns the paths it wrote, for the caller to log as MLflow artifacts."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # the object API renders with Agg, no pyplot state or display
from PIL import Image

from orchestrator.data.layout import CLASS_NAMES

ALPHA = 0.5  # weight of the class colour over the image
COLOURS = {CLASS_NAMES.index("direct"): (255, 0, 0), CLASS_NAMES.index("alternative"): (0, 0, 255)}


@dataclass(frozen=True)
class Sample:
    """One image with its ground truth and prediction, kept for an overlay."""

    index: int  # position in the evaluated split (manifest order)
    score: float
    image: torch.Tensor  # uint8 [3, H, W]
    mask: torch.Tensor  # ground truth [H, W], IGNORE_INDEX where unlabelled
    pred: torch.Tensor  # predicted class ids [H, W]


def write_csv(path: str | Path, columns: dict[str, Sequence]) -> Path:
    """One row per entry of the equally long 1-D columns (tensors or lists), a header of their names."""
    path = Path(path)
    lists = [c.tolist() if isinstance(c, torch.Tensor) else list(c) for c in columns.values()]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*lists, strict=True))
    return path


def write_histogram(
    path: str | Path, series: dict[str, torch.Tensor], xlabel: str = "per-image mIoU"
) -> Path:
    """Histograms of per-image scores in [0, 1], one outline per series; images without a score (NaN)
    are left out. The legend gives each series' count and share >= 0.9, the report's threshold."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for name, values in series.items():
        v = values[~values.isnan()].numpy()
        share = float((v >= 0.9).mean()) if len(v) else float("nan")
        label = f"{name}: {len(v)} images, {share:.0%} >= 0.9"
        ax.hist(v, bins=np.linspace(0, 1, 21), histtype="step", linewidth=1.5, label=label)
    ax.set(xlabel=xlabel, ylabel="images", xlim=(0, 1))
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return Path(path)


def overlay(image: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """uint8 [H, W, 3]: image uint8 [3, H, W] with each class of COLOURS blended in where labels [H, W]
    hold it; other pixels (background, ignore) unchanged."""
    out = image.permute(1, 2, 0).numpy().astype(np.float32)
    labels = labels.numpy()
    for c, colour in COLOURS.items():
        where = labels == c
        out[where] = (1 - ALPHA) * out[where] + ALPHA * np.asarray(colour, np.float32)
    return out.round().astype(np.uint8)


def write_overlays(
    out_dir: str | Path, samples: Sequence[Sample], tag: str, ground_truth: bool = True
) -> list[Path]:
    """One PNG per sample, `<tag>-<rank>-image<index>-<score>.png` in the order given: the prediction
    overlay, with the ground truth's beside it (right) when asked."""
    paths = []
    for rank, s in enumerate(samples, 1):
        panels = [overlay(s.image, s.pred)] + ([overlay(s.image, s.mask)] if ground_truth else [])
        path = Path(out_dir) / f"{tag}-{rank:02d}-image{s.index:06d}-{s.score:.3f}.png"
        Image.fromarray(np.concatenate(panels, axis=1)).save(path)
        paths.append(path)
    return paths
