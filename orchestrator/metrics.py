"""Segmentation metrics from confusion matrices: summable across ranks and images, so the trial's
numbers are exact after one all-reduce (never rank 0's alone). Every score accepts a stack of
matrices [..., C, C] (e.g. one per image) and gives one value per matrix.

Two mIoU rules:
- `miou` (the study's metric): the three classes, background included, each scored on every labelled
  pixel; a class absent from both prediction and truth is left out of the mean.
- `miou_official`: BDD100K's drivable-area rule (`bdd100k/eval/seg.py` of bdd100k/bdd100k, mode
  "drivable": background is its "ignored" class), see `official_iou`.
"""

from __future__ import annotations

import torch

from orchestrator.data.layout import CLASS_NAMES, IGNORE_INDEX

BACKGROUND = CLASS_NAMES.index("background")
ROADS = tuple(c for c in range(len(CLASS_NAMES)) if c != BACKGROUND)  # the classes the official rule scores


def confusion_matrices(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int = len(CLASS_NAMES)
) -> torch.Tensor:
    """One [num_classes, num_classes] int64 matrix per image of pred/target [B, H, W]: [B, C, C],
    rows = ground truth, columns = prediction. Pixels labelled IGNORE_INDEX are not counted."""
    images = pred.shape[0]
    keep = target != IGNORE_INDEX
    image = torch.arange(images, device=pred.device).view(-1, *[1] * (pred.dim() - 1)).expand_as(pred)
    index = (image[keep] * num_classes + target[keep].to(torch.int64)) * num_classes + pred[keep].to(
        torch.int64
    )
    counts = torch.bincount(index, minlength=images * num_classes * num_classes)
    return counts.reshape(images, num_classes, num_classes)


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int = len(CLASS_NAMES)
) -> torch.Tensor:
    """[num_classes, num_classes] int64 counts over all pixels of pred/target (any shape)."""
    return confusion_matrices(pred.reshape(1, -1), target.reshape(1, -1), num_classes)[0]


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """IoU = TP / (TP + FP + FN) per class, [..., C]; NaN for a class absent from both prediction and
    truth. TP = cm[c, c], FP = column c less TP, FN = row c less TP."""
    cm = cm.to(torch.float64)
    tp = cm.diagonal(dim1=-2, dim2=-1)
    union = cm.sum(-2) + cm.sum(-1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def official_iou(cm: torch.Tensor) -> torch.Tensor:
    """IoU of the road classes ROADS (direct, alternative), [..., 2], under BDD100K's drivable rule:
    pixels whose ground truth is background (or IGNORE_INDEX, which the official code maps to
    background) are not counted. From the 3x3 matrix, for road class c and the other road class o:
    TP = cm[c, c]; FP = cm[o, c] (a road pixel of the other class predicted c; predicting c on
    background costs nothing); FN = cm[c, o] + cm[c, background] (row c less TP).
    NaN where the union is empty."""
    road_rows = cm.clone()
    road_rows[..., BACKGROUND, :] = 0  # the official histogram has no background row
    return iou_per_class(road_rows)[..., ROADS]


def official_miou(cm: torch.Tensor) -> torch.Tensor:
    """Mean of `official_iou` over the road classes present in the ground truth (the official code's
    `gt_id_set`): a road class that is only predicted scores 0 but is left out of the mean. NaN when
    neither road class is in the ground truth (e.g. an image without road)."""
    present = cm[..., ROADS, :].sum(-1) > 0
    iou = official_iou(cm)
    return torch.where(present, iou, torch.full_like(iou, float("nan"))).nanmean(-1)


def scores(cm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every score of a confusion matrix stack [..., C, C] by name, each [...] float64: `miou` (3-class,
    over the classes present in prediction or truth), `iou_<class>`, `pixel_acc` (of the labelled
    pixels), `miou_official` and `iou_official_<road class>`."""
    iou, official = iou_per_class(cm), official_iou(cm)
    labelled = cm.sum((-2, -1)).to(torch.float64)
    return {
        "miou": iou.nanmean(-1),
        **{f"iou_{name}": iou[..., c] for c, name in enumerate(CLASS_NAMES)},
        "pixel_acc": cm.diagonal(dim1=-2, dim2=-1).sum(-1) / labelled,  # NaN when nothing is labelled
        "miou_official": official_miou(cm),
        **{f"iou_official_{CLASS_NAMES[c]}": official[..., i] for i, c in enumerate(ROADS)},
    }


def summarize(cm: torch.Tensor, prefix: str = "val_") -> dict[str, float]:
    """The `scores` of one confusion matrix as flat metric names, e.g. val_miou, val_miou_official."""
    return {f"{prefix}{name}": float(value) for name, value in scores(cm).items()}
