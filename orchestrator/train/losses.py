"""The segmentation losses of `train.loss` (grammar: `loss_spec.LOSS_GRAMMAR`), as the survey of training
procedures for road segmentation defines them (Sec. IV-A, eqs. 2-7), on softmax probabilities.

- `ce`: cross-entropy, eq. 2: the mean over valid pixels of -log p(true class).
- `bce`: balanced CE, eq. 3: each pixel's CE times w_c of its true class, divided by the valid pixels N
  (eq. 3's 1/N, not PyTorch's division by the summed weights), with eq. 4's w_c = 1 / ln(1.02 + f_c) as
  written (not normalized); f_c = n_c / (n_0 + ... + n_{C-1}) from the training manifest's class pixel
  counts, the ignore label not counted.
- `focal:g<gamma>`: focal loss, eq. 5: CE times (1 - p(true class))^gamma, over N (no alpha weights).
- `ohem:t<t>,p<p>`: online hard example mining, eq. 6: the mean of the pixel CE losses l_i > t united with
  the N_p = ceil(p N) largest; t thresholds the loss, as eq. 6 does (a probability threshold q of other
  implementations is t = -ln q).
- `dice`: soft Dice, eq. 7 with two changes: the class sum is a mean (1/C), so that a perfect prediction
  gives 0 as the text says (eq. 7 as printed would give 1 - C), and numerator and denominator of each class
  carry +1 (`DICE_SMOOTH`), so that a class absent from both target and prediction counts as perfect
  rather than 0/0 or 0.

Every loss skips pixels labelled IGNORE_INDEX: they count in no N, no sum and no ranking.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from orchestrator.data.layout import IGNORE_INDEX, NUM_CLASSES
from orchestrator.loss_spec import LossSpec, LossTerm, parse_loss

DICE_SMOOTH = 1.0  # added to each class's Dice numerator and denominator (pixels)
_OHEM_ROUNDING = 1e-6  # p N that float arithmetic puts just above an integer keeps that integer


def balanced_weights(class_pixels: dict[str, int], num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Eq. 4's class weights w_c = 1 / ln(1.02 + f_c), f_c the class's share of the labelled pixels counted
    in `class_pixels` (a manifest's {"0": n_0, ...}; its "255" entry, the ignore label, is left out)."""
    missing = [str(c) for c in range(num_classes) if str(c) not in class_pixels]
    if missing:
        raise ValueError(
            f"class_pixels {class_pixels} lacks the counts of classes {', '.join(missing)}; balanced CE "
            f"needs the pixel count of every class 0..{num_classes - 1}"
        )
    counts = [class_pixels[str(c)] for c in range(num_classes)]
    if min(counts) < 0 or sum(counts) == 0:
        raise ValueError(f"class_pixels {class_pixels} must be non-negative counts, not all 0")
    total = sum(counts)
    return torch.tensor([1 / math.log(1.02 + n / total) for n in counts], dtype=torch.float64)


def cross_entropy_sum(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum over valid pixels of -log p(true class), times the true class's `weight` when given."""
    return F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="sum")


def focal_sum(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Sum over valid pixels of -(1 - p)^gamma log p, p the probability of the true class."""
    valid = target != IGNORE_INDEX
    log_p = F.log_softmax(logits, 1).gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    # 1 - p without cancellation; at p == 1 the floor keeps d/dp (1 - p)^gamma finite for gamma < 1.
    miss = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny)
    return torch.where(valid, -(miss**gamma) * log_p, 0).sum()


def ohem_mean(logits: torch.Tensor, target: torch.Tensor, threshold: float, fraction: float) -> torch.Tensor:
    """Eq. 6: the mean pixel CE over {l_i > threshold} united with the ceil(fraction N) largest l_i, N the
    valid pixels. Sorted in descending order, both sets are prefixes, so their union is the longer one.
    0 (still a function of the logits) without valid pixels."""
    losses = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    losses = losses[target != IGNORE_INDEX]
    if losses.numel() == 0:
        return losses.sum()
    hardest = losses.sort(descending=True).values
    n_p = max(1, math.ceil(fraction * losses.numel() - _OHEM_ROUNDING))
    return hardest[: max(n_p, int((hardest > threshold).sum()))].mean()


def soft_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """1 - the mean over classes c of (2 sum_i p_ic g_ic + smooth) / (sum_i p_ic + sum_i g_ic + smooth),
    p the softmax probabilities, g the one-hot target, i over the valid pixels of the whole batch."""
    valid = (target != IGNORE_INDEX).unsqueeze(1)
    probs = F.softmax(logits, 1) * valid
    truth = F.one_hot(target.masked_fill(~valid.squeeze(1), 0), logits.shape[1]).movedim(-1, 1)
    truth = truth.to(probs.dtype) * valid
    dims = (0, *range(2, logits.ndim))
    overlap = (probs * truth).sum(dims)
    dice = (2 * overlap + smooth) / (probs.sum(dims) + truth.sum(dims) + smooth)
    return 1 - dice.mean()


# The code of each name of loss_spec (a test checks they agree): (term, logits, target, class weights).
TERMS: dict[str, Callable[[LossTerm, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "ce": lambda term, x, y, w: cross_entropy_sum(x, y),
    "bce": lambda term, x, y, w: cross_entropy_sum(x, y, w),
    "focal": lambda term, x, y, w: focal_sum(x, y, term.gamma),
    "ohem": lambda term, x, y, w: ohem_mean(x, y, term.threshold, term.fraction),
    "dice": lambda term, x, y, w: soft_dice(x, y),
}


class Loss:
    """A weighted sum of loss terms, called on one micro-batch of an optimizer step.

    `loss(logits [B, C, H, W], target [B, H, W] int64, valid_pixels=V, micro_batches=K)` returns this
    micro-batch's share of the step's objective: summed over the step's K micro-batches, the shares give
    the step's loss, and their backward passes its gradient.
    - Per-pixel terms (ce, bce, focal): the sum over this micro-batch's valid pixels divided by V, the valid
      pixels of all K micro-batches; the K shares add up to the term on their union, exactly.
    - Per-batch terms (ohem, dice; a ranking, a ratio of sums): the term on this micro-batch alone, divided
      by K; the step takes their mean over micro-batches, each weighing the same whatever its valid pixels.
    With the defaults (V: this batch's valid pixels, K = 1) it is the plain loss of one batch.
    """

    def __init__(self, spec: LossSpec, class_weights: torch.Tensor | None = None) -> None:
        if spec.needs_class_pixels and class_weights is None:
            raise ValueError(f"loss {str(spec)!r}: balanced CE (bce) needs class weights")
        self.spec = spec
        self.class_weights = class_weights

    def __call__(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        *,
        valid_pixels: int | None = None,
        micro_batches: int = 1,
    ) -> torch.Tensor:
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, not {micro_batches}")
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 under autocast: float32
        if valid_pixels is None:
            valid_pixels = int((target != IGNORE_INDEX).sum())
        weights = self.class_weights
        if weights is not None:
            weights = weights.to(logits.device, logits.dtype)
        total = None
        for term in self.spec.terms:
            value = TERMS[term.name](term, logits, target, weights)
            share = term.weight * (value / max(valid_pixels, 1) if term.pixelwise else value / micro_batches)
            total = share if total is None else total + share
        return total

    def __repr__(self) -> str:
        return f"Loss({str(self.spec)!r})"


def make_loss(
    spec: str | LossSpec, class_pixels: dict[str, int] | None = None, num_classes: int = NUM_CLASSES
) -> Loss:
    """The Loss of a `train.loss` string; `class_pixels` (the training manifest's) is needed by `bce` only."""
    spec = parse_loss(spec)
    weights = None
    if spec.needs_class_pixels:
        if class_pixels is None:
            raise ValueError(
                f"loss {str(spec)!r}: balanced CE (bce) weighs classes by their frequency in the training "
                "split; pass the class pixel counts of its manifest (class_pixels)"
            )
        weights = balanced_weights(class_pixels, num_classes)
    return Loss(spec, weights)
