"""How sure a difference in mIoU is: a paired bootstrap over validation images, and over seeds where a
configuration has several (a hierarchical bootstrap).

A configuration's result is its seeds' per-image confusion matrices, [S, N, C, C] over the same N
validation images in the same order for every configuration. Its mIoU is the mean over seeds of each seed's
mIoU of the summed matrices (`metrics.scores`, the metric the trials log: not a mean of per-image scores).
One resample draws N images with replacement, the same draw for both configurations (paired: an image
that every model finds hard moves both), and each configuration's seeds with replacement, its own draw
(seeds are not paired: two norms share no initialization); the difference of the two resampled mIoUs is
one draw of the difference. The 95% interval is the 2.5th and 97.5th percentiles of the draws; a
difference is a finding when that interval excludes 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orchestrator import metrics

RESAMPLES = 2000
LEVEL = 0.95
_CHUNK = 250  # resamples drawn as one [chunk, N] product: bounded memory at BDD100K's 10k images


@dataclass(frozen=True)
class Difference:
    """mIoU of A less mIoU of B (0..1 units), and the bootstrap interval around it."""

    estimate: float
    low: float
    high: float

    @property
    def finding(self) -> bool:
        """The interval excludes 0: A and B differ at this level."""
        return self.low > 0 or self.high < 0


def miou(confusion: torch.Tensor) -> float:
    """A configuration's mIoU from its seeds' per-image matrices [S, N, C, C]: the mean over seeds."""
    return float(metrics.scores(confusion.sum(1))["miou"].mean())


def paired_difference(
    a: torch.Tensor, b: torch.Tensor, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> Difference:
    """mIoU(a) - mIoU(b) with its `level` interval, `a` [Sa, N, C, C] and `b` [Sb, N, C, C] the seeds'
    per-image confusion matrices of two configurations over the same N images."""
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"not the same images: per-image matrices {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    images = a.shape[1]
    draws = torch.empty(resamples, dtype=torch.float64)
    # In chunks: each resample's image draw as counts per image, [R, N], applied as one product.
    for start in range(0, resamples, _CHUNK):
        count = min(_CHUNK, resamples - start)
        picks = torch.randint(images, (count, images), generator=g)
        weights = torch.zeros(count, images, dtype=torch.float64).scatter_add_(
            1, picks, torch.ones(count, images, dtype=torch.float64)
        )
        draws[start : start + count] = _resampled(a, weights, g) - _resampled(b, weights, g)
    tail = (1 - level) / 2
    low, high = torch.quantile(draws, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Difference(miou(a) - miou(b), low, high)


def _resampled(confusion: torch.Tensor, weights: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """mIoU per resample [R]: the seeds drawn with replacement, each seed's matrices summed over the
    resampled images (`weights` [R, N], how often each image was drawn)."""
    seeds = confusion.shape[0]
    drawn = torch.randint(seeds, (weights.shape[0], seeds), generator=g)  # [R, S]
    summed = torch.einsum("rn,snij->rsij", weights, confusion.to(torch.float64))  # [R, S, C, C]
    per_seed = metrics.scores(summed)["miou"]  # [R, S]
    return per_seed.gather(1, drawn).mean(1)
