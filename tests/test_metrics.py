"""Metrics against an independent per-class formula (boolean masks, no confusion matrix)."""

import math

import numpy as np
import torch

from orchestrator import metrics


def reference_iou(pred: np.ndarray, target: np.ndarray, c: int) -> float:
    valid = target != 255
    p, t = (pred == c) & valid, (target == c) & valid
    union = (p | t).sum()
    return float((p & t).sum() / union) if union else float("nan")


def test_iou_matches_set_definition_and_ignores_255():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, (4, 37, 53))
    target[rng.random(target.shape) < 0.1] = 255
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 3, target.shape)) % 256
    pred[pred == 255] = 0
    cm = metrics.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target))
    assert int(cm.sum()) == int((target != 255).sum())
    expected = [reference_iou(pred, target, c) for c in range(3)]
    got = metrics.summarize(cm)
    for name, e in zip(("direct", "alternative", "background"), expected, strict=True):
        assert math.isclose(got[f"val_iou_{name}"], e, rel_tol=1e-12)
    assert math.isclose(got["val_miou"], sum(expected) / 3, rel_tol=1e-12)


def test_confusion_matrices_sum_across_shards_like_one_pass():
    rng = np.random.default_rng(1)
    pred, target = (torch.from_numpy(rng.integers(0, 3, (6, 8, 8))) for _ in range(2))
    whole = metrics.confusion_matrix(pred, target)
    parts = metrics.confusion_matrix(pred[:2], target[:2]) + metrics.confusion_matrix(pred[2:], target[2:])
    assert torch.equal(whole, parts)


def test_absent_class_is_left_out_of_the_mean():
    target = torch.tensor([[0, 0, 2, 2]])
    pred = torch.tensor([[0, 2, 2, 2]])
    got = metrics.summarize(metrics.confusion_matrix(pred, target))
    assert math.isnan(got["val_iou_alternative"])
    assert math.isclose(got["val_miou"], (1 / 2 + 2 / 3) / 2)
    assert math.isclose(got["val_pixel_acc"], 3 / 4)
