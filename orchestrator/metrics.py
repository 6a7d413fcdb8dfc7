"""Segmentation metrics from a confusion matrix: summable across ranks and images, so the trial's
numbers are exact after one all-reduce (never rank 0's alone)."""

from __future__ import annotations

import torch

from orchestrator.data.layout import CLASS_NAMES, IGNORE_INDEX


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int = len(CLASS_NAMES)
) -> torch.Tensor:
    """[num_classes, num_classes] int64 counts, rows = ground truth, columns = prediction.
    Pixels labelled IGNORE_INDEX are not counted."""
    keep = target != IGNORE_INDEX
    index = target[keep].to(torch.int64) * num_classes + pred[keep].to(torch.int64)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """IoU = TP / (TP + FP + FN) per class; NaN for a class absent from both prediction and truth."""
    cm = cm.to(torch.float64)
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def summarize(cm: torch.Tensor, prefix: str = "val_") -> dict[str, float]:
    """mIoU over the classes present, per-class IoU and pixel accuracy, as flat metric names."""
    iou = iou_per_class(cm)
    out = {f"{prefix}miou": float(iou.nanmean())}
    out.update({f"{prefix}iou_{name}": float(v) for name, v in zip(CLASS_NAMES, iou, strict=True)})
    out[f"{prefix}pixel_acc"] = float(cm.diagonal().sum() / cm.sum().clamp(min=1))
    return out
