"""Prediction modes, ensembles, per-image records and their artifacts, on models whose answers are known:
a 1x1 convolution (per pixel, so windows, flips and scale 1 must agree with the whole image) and
constant-logit members (so mean and vote are computed by hand)."""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from orchestrator import checkpoints, metrics
from orchestrator import spec as specs
from orchestrator.checkpoints import Trained
from orchestrator.data.shards import pack
from orchestrator.data.synth import synthesize
from orchestrator.data.transforms import IMAGENET, normalize
from orchestrator.errors import UsageError
from orchestrator.inference.evaluate import Evaluation, ensemble_labels, evaluate, write_report
from orchestrator.inference.parts import evaluate_checkpoints
from orchestrator.inference.predict import InferenceSettings, predict_proba, windows
from orchestrator.inference.visualize import Sample, overlay, write_overlays
from orchestrator.logs import Progress


def pointwise(seed: int, kernel: tuple[int, int] = (1, 1)) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv2d(3, 3, kernel, padding=(kernel[0] // 2, kernel[1] // 2)).eval()


class Recording(nn.Module):
    """A model that remembers the spatial size of every input it was given."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        return self.model(x)


class Constant(nn.Module):
    """The same class probabilities at every pixel."""

    def __init__(self, probs: tuple[float, ...]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(probs).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.view(1, -1, 1, 1).expand(x.shape[0], -1, *x.shape[-2:])


def batch(seed: int = 0, size: tuple[int, int] = (37, 53), n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


# -- sliding windows ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "crop", "stride", "rows", "cols"),
    [
        ((720, 1280), (513, 513), (342, 342), [0, 207], [0, 342, 684, 767]),  # (h, w), (w, h), (x, y)
        ((37, 53), (20, 16), (7, 5), [0, 5, 10, 15, 20, 21], [0, 7, 14, 21, 28, 33]),
        ((37, 53), (53, 37), (10, 10), [0], [0]),  # one window, the image
        ((20, 30), (40, 40), (20, 20), [0], [0]),  # a crop larger than the image: the image
        ((24, 30), (10, 8), (10, 8), [0, 8, 16], [0, 10, 20]),  # stride == crop: an exact tiling
    ],
)
def test_windows_cover_every_pixel_and_the_last_is_flush(size, crop, stride, rows, cols):
    found = windows(size, crop, stride)
    assert [(r.start, c.start) for r, c in found] == [(y, x) for y in rows for x in cols]
    cover = torch.zeros(size)
    for r, c in found:
        cover[r, c] += 1
        assert (r.stop - r.start, c.stop - c.start) == (min(crop[1], size[0]), min(crop[0], size[1]))
    assert bool((cover > 0).all())
    assert max(r.stop for r, _ in found) == size[0] and max(c.stop for _, c in found) == size[1]


def test_amp_bf16_runs_the_model_in_bfloat16_and_averages_in_float32():
    model, seen = nn.Conv2d(3, 3, 1), []
    model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    images = torch.randn(2, 3, 8, 10)
    full = predict_proba(model, images, InferenceSettings(flip=True))
    half = predict_proba(model, images, InferenceSettings(flip=True, amp="bf16"))
    assert seen == [torch.float32] * 2 + [torch.bfloat16] * 2
    assert half.dtype == full.dtype == torch.float32
    assert torch.allclose(half, full, atol=2e-2) and not torch.equal(half, full)


def test_slide_equals_whole_on_a_pointwise_model():
    model, x = Recording(pointwise(0)), batch()
    whole = predict_proba(model, x)
    settings = InferenceSettings("slide", crop=(20, 16), stride=(7, 5))
    model.sizes.clear()
    slide = predict_proba(model, x, settings)
    assert slide.shape == whole.shape
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-6)
    assert model.sizes == [(16, 20)] * len(windows((37, 53), (20, 16), (7, 5)))


def test_slide_averages_overlapping_windows():
    """A model whose logits grow with the window's column: where two windows overlap, their mean."""

    class ByColumn(nn.Module):
        def forward(self, x):
            ramp = torch.arange(x.shape[-1], dtype=x.dtype)
            return (
                torch.stack([ramp, torch.zeros_like(ramp), torch.zeros_like(ramp)])
                .view(1, 3, 1, -1)
                .expand(x.shape[0], 3, x.shape[-2], -1)
            )

    x = batch(size=(4, 10), n=1)
    probs = predict_proba(ByColumn(), x, InferenceSettings("slide", crop=(6, 4), stride=(4, 4)))
    # windows at columns 0..5 and 4..9: column 4 has logit 4 in the first and 0 in the second
    logits = torch.tensor([0, 1, 2, 3, 2, 3, 2, 3, 4, 5], dtype=torch.float32)
    expected = torch.stack([logits, torch.zeros(10), torch.zeros(10)]).softmax(0)
    torch.testing.assert_close(probs[0, :, 0], expected)


# -- multi-scale and flip --------------------------------------------------------------------------


def test_scale_one_with_flip_equals_whole_on_a_pointwise_model():
    model, x = pointwise(1), batch()
    whole = predict_proba(model, x)
    torch.testing.assert_close(predict_proba(model, x, InferenceSettings("multiscale", flip=True)), whole)
    slid = InferenceSettings("multiscale", crop=(20, 16), stride=(10, 8), flip=True)
    torch.testing.assert_close(predict_proba(model, x, slid), whole, rtol=0, atol=1e-6)


def test_every_scale_agrees_on_a_constant_image_and_comes_back_at_input_size():
    model = Recording(pointwise(2))
    x = torch.full((2, 3, 37, 53), 0.3)
    x[1] = -0.7
    whole = predict_proba(model, x)
    model.sizes.clear()
    settings = InferenceSettings("multiscale", scales=(0.5, 0.75, 1.5, 2.0), flip=True)
    torch.testing.assert_close(predict_proba(model, x, settings), whole, rtol=0, atol=1e-6)
    assert model.sizes == [(18, 26)] * 2 + [(28, 40)] * 2 + [(56, 80)] * 2 + [(74, 106)] * 2


def test_flip_averages_the_mirrored_prediction():
    model, x = pointwise(3, kernel=(1, 3)), batch()  # a 1x3 kernel: not mirror-symmetric
    plain = model(x).softmax(1)
    mirrored = model(x.flip(-1)).softmax(1).flip(-1)
    got = predict_proba(model, x, InferenceSettings("multiscale", flip=True))
    torch.testing.assert_close(got, (plain + mirrored) / 2)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_settings_are_validated_with_what_to_do():
    with pytest.raises(UsageError, match="needs a crop"):
        InferenceSettings("slide")
    with pytest.raises(UsageError, match="multiscale"):
        InferenceSettings("whole", scales=(0.5, 1.0))
    with pytest.raises(UsageError, match="at most the crop"):
        InferenceSettings("slide", crop=(10, 10), stride=(11, 5))
    with pytest.raises(UsageError, match="both"):
        InferenceSettings("multiscale", crop=(10, 10))
    with pytest.raises(UsageError, match="allowed"):
        InferenceSettings("tiles")
    with pytest.raises(UsageError, match="two integers"):
        InferenceSettings("slide", crop=(10, 10, 3), stride=(5, 5))
    from_lists = InferenceSettings("slide", crop=[20, 16], stride=[7, 5])  # as argparse or YAML give them
    assert from_lists == InferenceSettings("slide", crop=(20, 16), stride=(7, 5))
    assert InferenceSettings("whole", scales=[1]) == InferenceSettings()
    params = InferenceSettings(
        "multiscale", crop=(513, 513), stride=(342, 342), scales=(0.75, 1.0), flip=True
    )
    assert params.as_params() == {
        "inference.mode": "multiscale",
        "inference.crop": "513x513",
        "inference.stride": "342x342",
        "inference.scales": "0.75,1",
        "inference.flip": "true",
        "inference.amp": "off",
    }
    with pytest.raises(UsageError, match="amp 'fp8': allowed are off, bf16"):
        InferenceSettings(amp="fp8")


# -- ensembles -------------------------------------------------------------------------------------


def loader(n_batches: int = 2, size: tuple[int, int] = (12, 16), seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, 256, (2, 3, *size), generator=g, dtype=torch.uint8),
            torch.randint(0, 3, (2, *size), generator=g),
        )
        for _ in range(n_batches)
    ]


def members(*models: nn.Module) -> list[Trained]:
    return [Trained(m, {}, IMAGENET) for m in models]


@pytest.mark.parametrize("combine", ["mean", "vote"])
def test_an_ensemble_of_identical_members_is_that_member(combine):
    model = pointwise(4)
    result = evaluate(members(model, model, model), loader(), ensemble=True, combine=combine)
    assert result.per_image.shape == (4, 4, 3, 3)
    assert torch.equal(result.per_image[-1], result.per_image[0])
    assert result.summary() == result.summary(0)


def test_progress_is_a_bar_over_images_on_a_terminal_and_about_ten_log_lines_elsewhere(
    monkeypatch, caplog, stderr_terminal
):
    caplog.set_level(logging.INFO, logger="test")
    terminal = stderr_terminal()

    def run() -> None:
        with Progress(50, "evaluate", "image", logging.getLogger("test")) as progress:
            evaluate(members(pointwise(0)), loader(n_batches=25, size=(4, 4)), progress=progress)

    run()
    bar = terminal.getvalue()
    assert "evaluate:" in bar and "| 0/50 [00:00<?, ?image/s]" in bar and not caplog.records

    monkeypatch.setattr("sys.stderr", io.StringIO())
    run()
    assert "50/50 [" not in sys.stderr.getvalue()
    # Batches of 2 images: a line at the first count past each tenth.
    expected = [f"evaluate {i}/50 images" for i in (6, 10, 16, 20, 26, 30, 36, 40, 46, 50)]
    assert [r.getMessage() for r in caplog.records] == expected


def test_mean_and_vote_differ_where_one_member_is_sure():
    weak, sure = (0.40, 0.35, 0.25), (0.02, 0.96, 0.02)
    team = members(Constant(weak), Constant(weak), Constant(sure))
    data = [(torch.zeros(1, 3, 4, 5, dtype=torch.uint8), torch.zeros(1, 4, 5, dtype=torch.long))]
    mean = evaluate(team, data, ensemble=True, combine="mean").cms[-1]
    vote = evaluate(team, data, ensemble=True, combine="vote").cms[-1]
    assert mean[0, 1] == 20 and mean.sum() == 20  # mean: (0.40+0.40+0.02)/3 < (0.35+0.35+0.96)/3
    assert vote[0, 0] == 20 and vote.sum() == 20  # two votes for class 0


def test_a_tied_vote_goes_to_the_higher_mean_among_the_tied():
    probs = [torch.tensor(p).view(1, 3, 1, 1) for p in [(0.40, 0.35, 0.25), (0.05, 0.50, 0.45)]]
    assert ensemble_labels(probs, "vote").item() == 1  # 1-1 tie, mean 0.225 vs 0.425
    probs = [torch.tensor(p).view(1, 3, 1, 1) for p in [(0.90, 0.05, 0.05), (0.05, 0.50, 0.45)]]
    assert ensemble_labels(probs, "vote").item() == 0
    # class 2 has the highest mean (0.335) but no vote: the tie is between 0 (0.185) and 1 (0.18) only
    probs = [torch.tensor(p).view(1, 3, 1, 1) for p in [(0.37, 0.0, 0.33), (0.0, 0.36, 0.34)]]
    assert ensemble_labels(probs, "vote").item() == 0
    assert ensemble_labels(probs, "mean").item() == 2


@pytest.mark.parametrize(("weights", "member"), [((1.0, 0.0, 0.0), 0), ((0.0, 2.0, 0.0), 1)])
def test_weighted_with_one_weight_is_that_member(weights, member):
    team = members(pointwise(5), pointwise(6), pointwise(7))
    result = evaluate(team, loader(), ensemble=True, combine="weighted", weights=weights)
    assert torch.equal(result.per_image[-1], result.per_image[member])
    assert not torch.equal(result.per_image[0], result.per_image[1])  # the members do differ


def test_combine_arguments_are_checked():
    team = members(pointwise(5), pointwise(6))
    with pytest.raises(UsageError, match="weighted"):
        evaluate(team, loader(), ensemble=True, weights=(1, 1))
    with pytest.raises(UsageError, match="want 2"):
        evaluate(team, loader(), ensemble=True, combine="weighted", weights=(1, 1, 1))
    with pytest.raises(UsageError, match="allowed"):
        evaluate(team, loader(), ensemble=True, combine="median")


# -- per-image records -----------------------------------------------------------------------------


def test_per_image_records_and_the_best_and_worst_images():
    data, model = loader(n_batches=3), pointwise(8)
    result = evaluate(members(model), data, keep=2)
    images = torch.cat([x for x, _ in data])
    masks = torch.cat([y for _, y in data])
    pred = predict_proba(model, normalize(images)).argmax(1)
    for i in range(6):
        assert torch.equal(result.per_image[0, i], metrics.confusion_matrix(pred[i], masks[i]))
    columns = result.images()
    assert columns["index"].tolist() == list(range(6))
    order = columns["miou"].argsort(descending=True).tolist()
    assert [s.index for s in result.best] == order[:2]
    assert [s.index for s in result.worst] == order[::-1][:2]
    best = result.best[0]
    assert best.score == pytest.approx(float(columns["miou"].max()))
    assert torch.equal(best.image, images[best.index]) and torch.equal(best.pred.long(), pred[best.index])
    assert torch.equal(best.mask.long(), masks[best.index])
    assert evaluate(members(model), data).best == []


# -- artifacts -------------------------------------------------------------------------------------


def test_overlay_colours_direct_red_and_alternative_blue():
    image = torch.zeros(3, 2, 3, dtype=torch.uint8)
    image[:, 1] = 100
    labels = torch.tensor([[0, 1, 2], [255, 0, 1]])
    out = overlay(image, labels)
    assert out[0, 0].tolist() == [128, 0, 0]
    assert out[0, 1].tolist() == [0, 0, 128]
    assert out[0, 2].tolist() == [0, 0, 0]  # background: the image
    assert out[1, 0].tolist() == [100, 100, 100]  # ignore: the image
    assert out[1, 1].tolist() == [178, 50, 50] and out[1, 2].tolist() == [50, 50, 178]


def test_overlays_show_prediction_and_ground_truth_side_by_side(tmp_path):
    pred = torch.zeros(4, 6, dtype=torch.uint8)
    pred[:, 3:] = 2
    sample = Sample(
        7, 0.25, torch.zeros(3, 4, 6, dtype=torch.uint8), torch.ones(4, 6, dtype=torch.uint8), pred
    )
    (path,) = write_overlays(tmp_path, [sample], "worst")
    assert path.name == "worst-01-image000007-0.250.png"
    picture = np.asarray(Image.open(path))
    assert picture.shape == (4, 12, 3)
    assert picture[0, 0].tolist() == [128, 0, 0] and picture[0, 5].tolist() == [0, 0, 0]  # prediction
    assert picture[0, 6].tolist() == [0, 0, 128] and picture[3, 11].tolist() == [0, 0, 128]  # ground truth


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_report_files_hold_one_row_per_image(tmp_path):
    per_image = torch.tensor([[[[3, 1, 0], [0, 2, 0], [0, 0, 4]], [[0, 0, 0], [0, 0, 0], [1, 0, 5]]]])
    sample = Sample(0, 0.5, torch.zeros(3, 2, 2, dtype=torch.uint8), torch.zeros(2, 2), torch.zeros(2, 2))
    files = write_report(Evaluation(per_image, 1, [sample], [sample, sample]), tmp_path / "out")
    names = [p.name for p in files]
    assert names[:2] == ["per_image.csv", "per_image_miou.png"]
    assert names[2:] == [
        "best-01-image000000-0.500.png",
        "worst-01-image000000-0.500.png",
        "worst-02-image000000-0.500.png",
    ]
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in files)
    rows = read_csv(files[0])
    assert [r["index"] for r in rows] == ["0", "1"]
    expected = metrics.summarize(per_image[0, 0], prefix="")
    assert {k: float(v) for k, v in rows[0].items() if k != "index"} == pytest.approx(expected)
    assert math.isnan(float(rows[1]["miou_official"]))  # no road in that image's truth
    assert Image.open(files[1]).format == "PNG"


# -- evaluate_checkpoints on packed data ------------------------------------------------------------


def test_evaluate_checkpoints_scores_members_and_ensemble_and_writes_the_report(tmp_path):
    synthesize(str(tmp_path / "synth"), train=2, val=5, size=(96, 64))
    pack(str(tmp_path / "synth"), str(tmp_path / "shards"), shard_size=2, workers=1)
    spec = specs.validate(
        {
            "name": "eval",
            "data": {
                "train": f"{tmp_path}/shards/train",
                "val": f"{tmp_path}/shards/val",
                "loader_workers": 0,
            },
            "model": {"backbone": "resnet18"},
            "norm": "bn",
            "train": {"epochs": 1, "batch_per_gpu": 2, "crop": [64, 64]},
        }
    )
    torch.manual_seed(0)
    config = specs.public_params(specs.flatten(spec))
    path = checkpoints.save(
        tmp_path / "model.pt", checkpoints.model_for(spec, pretrained=False), config, IMAGENET
    )
    settings = InferenceSettings("slide", crop=(64, 64), stride=(32, 32))
    report = evaluate_checkpoints([path, path], settings=settings, out_dir=tmp_path / "eval", keep=2)
    assert report.data == f"{tmp_path}/shards/val"
    per_image = report.evaluation.per_image
    assert per_image.shape == (3, 5, 3, 3)  # two members and their ensemble, five images
    assert torch.equal(per_image[2], per_image[0]) and torch.equal(per_image[1], per_image[0])
    assert report.metrics == pytest.approx(report.member_metrics[1], nan_ok=True)
    assert len(read_csv(tmp_path / "eval" / "per_image.csv")) == 5
    assert sorted(p.name.split("-")[0] for p in report.files[2:]) == ["best", "best", "worst", "worst"]
    assert all(p.is_file() for p in report.files)
    single = evaluate_checkpoints([path], settings=settings)
    assert single.files == [] and torch.equal(single.evaluation.per_image[0], per_image[0])


def test_a_checkpoint_from_before_dataset_normalization_loads_with_imagenet_statistics(tmp_path) -> None:
    raw = {"name": "old", "data": {"train": "t", "val": "v"}, "model": {"backbone": "resnet18"}}
    spec = specs.validate(raw)
    config = specs.flatten(spec)
    model = checkpoints.model_for(spec)
    torch.save({"model": model.state_dict(), "config": config}, tmp_path / "old.pt")  # no "mean_std"
    assert checkpoints.load_model(tmp_path / "old.pt").mean_std == IMAGENET
    checkpoints.save(tmp_path / "new.pt", model, config, ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)))
    assert checkpoints.load_model(tmp_path / "new.pt").mean_std == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
