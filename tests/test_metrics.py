"""Metrics against an independent per-class formula (boolean masks, no confusion matrix)."""

import math

import numpy as np
import pytest
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


# The official BDD100K drivable rule (bdd100k/eval/seg.py, mode "drivable"): background is the ignored class.
HAND = torch.tensor(
    [
        [50, 5, 10],  # truth direct: predicted direct, alternative, background
        [4, 30, 6],  # truth alternative
        [7, 3, 100],  # truth background: not counted by the official rule
    ]
)


def test_official_rule_on_a_hand_computed_matrix():
    got = metrics.summarize(HAND)
    # direct: TP 50, FP 4 (alternative truth only; the 7 on background cost nothing), FN 5 + 10
    # alternative: TP 30, FP 5, FN 4 + 6
    assert math.isclose(got["val_iou_official_direct"], 50 / 69, rel_tol=1e-12)
    assert math.isclose(got["val_iou_official_alternative"], 30 / 45, rel_tol=1e-12)
    assert math.isclose(got["val_miou_official"], (50 / 69 + 30 / 45) / 2, rel_tol=1e-12)
    # The 3-class rule on the same matrix counts every labelled pixel.
    three = [50 / (65 + 61 - 50), 30 / (40 + 38 - 30), 100 / (110 + 116 - 100)]
    assert math.isclose(got["val_miou"], sum(three) / 3, rel_tol=1e-12)
    assert math.isclose(got["val_pixel_acc"], 180 / 215, rel_tol=1e-12)


def test_official_mean_leaves_out_a_road_class_absent_from_the_truth():
    cm = torch.tensor([[50, 5, 0], [0, 0, 0], [0, 0, 10]])  # alternative predicted, never true
    got = metrics.summarize(cm)
    assert got["val_iou_official_alternative"] == 0.0
    assert math.isclose(got["val_miou_official"], 50 / 55, rel_tol=1e-12)
    assert math.isclose(got["val_miou"], (50 / 55 + 0 + 1) / 3, rel_tol=1e-12)  # 3-class counts its 0
    assert math.isnan(
        metrics.summarize(torch.tensor([[0, 0, 0], [0, 0, 0], [5, 1, 10]]))["val_miou_official"]
    )


def bdd100k_official(preds: list[np.ndarray], gts: list[np.ndarray]) -> tuple[list[float], float]:
    """The official drivable evaluation's procedure, re-done here: 255 -> background, a 3x3 histogram
    of the road-truth pixels only, IoU per road class (NaN -> 0), mean over the road ids in any truth."""
    hist, ids = np.zeros((3, 3)), set()
    for pred, gt in zip(preds, gts, strict=True):
        gt = np.where(gt == 255, 2, gt)
        ids |= set(np.unique(gt).tolist()) - {2}
        k = gt < 2
        hist += np.bincount(3 * gt[k] + pred[k], minlength=9).reshape(3, 3)
    with np.errstate(invalid="ignore"):
        ious = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    ious = np.nan_to_num(ious)[:2]
    return ious.tolist(), float(np.mean(ious[sorted(ids)]))


def test_official_rule_matches_the_bdd100k_procedure():
    rng = np.random.default_rng(2)
    gts = [rng.choice([0, 1, 2, 255], size=(23, 31), p=[0.3, 0.2, 0.4, 0.1]) for _ in range(3)]
    gts[1][gts[1] == 1] = 0  # an image without alternative road
    preds = [np.where(rng.random(g.shape) < 0.6, g % 255, rng.integers(0, 3, g.shape)) for g in gts]
    ious, miou = bdd100k_official(preds, gts)
    pred, target = torch.from_numpy(np.stack(preds)), torch.from_numpy(np.stack(gts))
    got = metrics.summarize(metrics.confusion_matrix(pred, target))
    assert math.isclose(got["val_miou_official"], miou, rel_tol=1e-12)
    assert [got["val_iou_official_direct"], got["val_iou_official_alternative"]] == pytest.approx(
        ious, rel=1e-12
    )
    assert not math.isclose(got["val_miou"], miou, rel_tol=1e-3)  # the two rules do differ here
    per_image = metrics.scores(metrics.confusion_matrices(pred, target))["miou_official"]
    assert per_image.tolist() == pytest.approx(
        [bdd100k_official([p], [g])[1] for p, g in zip(preds, gts, strict=True)]
    )


def test_per_image_matrices_are_each_images_own():
    rng = np.random.default_rng(3)
    target = torch.from_numpy(rng.choice([0, 1, 2, 255], size=(4, 9, 11)))
    pred = torch.from_numpy(rng.integers(0, 3, (4, 9, 11)))
    per_image = metrics.confusion_matrices(pred, target)
    assert per_image.shape == (4, 3, 3)
    for i in range(4):
        assert torch.equal(per_image[i], metrics.confusion_matrix(pred[i], target[i]))
    assert torch.equal(per_image.sum(0), metrics.confusion_matrix(pred, target))
    batched = metrics.scores(per_image)
    for i in range(4):
        one = metrics.summarize(per_image[i], prefix="")
        assert [float(v[i]) for v in batched.values()] == pytest.approx(list(one.values()), nan_ok=True)


def test_an_image_with_nothing_labelled_has_no_score():
    empty = metrics.confusion_matrix(torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), 255))
    assert all(math.isnan(v) for v in metrics.summarize(empty).values())
