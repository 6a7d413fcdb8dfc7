"""The paired bootstrap of mIoU differences on constructed cases with a known answer."""

from __future__ import annotations

import pytest
import torch

from orchestrator import metrics
from orchestrator.bootstrap import Difference, miou, paired_difference


def images(n: int, accuracy: float, g: torch.Generator, pixels: int = 400) -> torch.Tensor:
    """[n, 3, 3] per-image matrices: each image's pixels spread over the 3 classes at random, each pixel
    predicted right with probability `accuracy`, else as one of the two other classes."""
    out = torch.zeros(n, 3, 3, dtype=torch.int64)
    truth = torch.randint(3, (n, pixels), generator=g)
    wrong = (truth + torch.randint(1, 3, (n, pixels), generator=g)) % 3
    pred = torch.where(torch.rand(n, pixels, generator=g) < accuracy, truth, wrong)
    return out.index_put_((torch.arange(n)[:, None], truth, pred), torch.ones_like(truth), accumulate=True)


def test_a_configuration_against_itself_differs_by_nothing() -> None:
    a = images(50, 0.7, torch.Generator().manual_seed(0))[None]
    d = paired_difference(a, a.clone(), resamples=300)
    assert d == Difference(0.0, 0.0, 0.0) and not d.finding


def test_better_on_every_image_is_a_finding() -> None:
    g = torch.Generator().manual_seed(1)
    truth = images(40, 1.0, g)  # perfect: the diagonal alone
    worse = images(40, 0.6, g)
    worse = worse * (truth.sum((1, 2)) / worse.sum((1, 2)))[:, None, None].round().long().clamp(min=1)
    d = paired_difference(truth[None], worse[None], resamples=300)
    assert d.estimate == pytest.approx(1.0 - miou(worse[None])) and d.finding and 0 < d.low <= d.high


def test_the_estimate_is_the_logged_metric_averaged_over_seeds() -> None:
    g = torch.Generator().manual_seed(2)
    seeds = torch.stack([images(20, 0.5, g), images(20, 0.8, g)])
    logged = [metrics.summarize(s.sum(0))["val_miou"] for s in seeds]  # what each trial logs
    assert miou(seeds) == pytest.approx(sum(logged) / 2)


def test_intervals_cover_a_null_difference_about_95_times_in_100() -> None:
    """A and B drawn alike (no true difference): about 95% of intervals hold 0; the same test has the
    power to see a 10-point difference."""
    g = torch.Generator().manual_seed(3)
    held = sum(
        not paired_difference(
            images(40, 0.7, g)[None], images(40, 0.7, g)[None], resamples=200, seed=i
        ).finding
        for i in range(80)
    )
    assert 70 <= held <= 80  # 95% of 80 is 76; binomial sd ~2
    seen = sum(
        paired_difference(images(40, 0.8, g)[None], images(40, 0.7, g)[None], resamples=200, seed=i).finding
        for i in range(20)
    )
    assert seen >= 18


def test_seeds_that_disagree_widen_the_interval() -> None:
    """Same images, seeds far apart: the difference of the means is no finding; one seed each would be."""
    g = torch.Generator().manual_seed(4)
    low, high, mid = images(60, 0.55, g), images(60, 0.95, g), images(60, 0.75, g)
    spread = paired_difference(torch.stack([low, high]), torch.stack([mid, mid]), resamples=400)
    alone = paired_difference(high[None], mid[None], resamples=400)
    assert not spread.finding and alone.finding
    assert spread.high - spread.low > 3 * (alone.high - alone.low)


def test_configurations_over_other_images_are_refused() -> None:
    g = torch.Generator().manual_seed(5)
    with pytest.raises(ValueError, match=r"not the same images: per-image matrices \(1, 30, 3, 3\)"):
        paired_difference(images(30, 0.7, g)[None], images(31, 0.7, g)[None])
