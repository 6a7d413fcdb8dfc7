"""Losses against their equations (road-segmentation-training-procedures, eqs. 2-7) on hand-made tensors,
the ignore label, combination weights, micro-batch accumulation, and the loss grammar."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import pydantic
import pytest
import torch
from torch import nn

from orchestrator import spec as specs
from orchestrator.checkpoints import model_for
from orchestrator.data.layout import IGNORE_INDEX
from orchestrator.data.shards import read_manifest
from orchestrator.loss_spec import (
    LOSS_GRAMMAR,
    LOSS_PATTERN,
    PER_BATCH,
    PIXELWISE,
    LossSpec,
    LossTerm,
    parse_loss,
)
from orchestrator.train.loop import Position, Worker, make_optimizer, train_epoch
from orchestrator.train.losses import TERMS, Loss, balanced_weights, make_loss

# The ignore label's count is large: a frequency that counted it would be far off.
CLASS_PIXELS = {"0": 300, "1": 100, "2": 600, "255": 5000}
WEIGHTS = [1 / math.log(1.02 + f) for f in (0.3, 0.1, 0.6)]  # eq. 4 by hand
ALL_SPECS = ["ce", "bce", "focal:g2", "ohem:t0.5,p0.25", "dice", "ce+0.5*dice", "2*focal:g1+0.3*ohem:t1,p0.5"]


def batch(seed: int = 0, shape: tuple[int, ...] = (2, 3, 5, 7), ignore: float = 0.25):
    """Float64 logits [B, C, H, W] and an int64 target [B, H, W] with about `ignore` of it IGNORE_INDEX."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    logits = 2 * torch.randn(shape, generator=g, dtype=torch.float64)
    target = torch.randint(0, c, (b, h, w), generator=g)
    target[torch.rand((b, h, w), generator=g) < ignore] = IGNORE_INDEX
    return logits, target


def pixels(logits: torch.Tensor, target: torch.Tensor) -> list[tuple[np.ndarray, int]]:
    """(softmax probabilities, label) of every valid pixel, computed by hand in float64."""
    z = logits.detach().double().numpy()
    e = np.exp(z - z.max(1, keepdims=True))
    p = e / e.sum(1, keepdims=True)
    t = target.numpy()
    return [(p[b, :, h, w], int(y)) for (b, h, w), y in np.ndenumerate(t) if y != IGNORE_INDEX]


def ce_by_hand(logits, target) -> float:  # eq. 2
    return float(np.mean([-math.log(p[y]) for p, y in pixels(logits, target)]))


def balanced_ce_by_hand(logits, target, weights) -> float:  # eq. 3: divided by N, not by the summed weights
    px = pixels(logits, target)
    return sum(-weights[y] * math.log(p[y]) for p, y in px) / len(px)


def focal_by_hand(logits, target, gamma: float) -> float:  # eq. 5
    return float(np.mean([-((1 - p[y]) ** gamma) * math.log(p[y]) for p, y in pixels(logits, target)]))


def dice_by_hand(logits, target, smooth: float = 1.0) -> float:  # eq. 7, a mean over classes, smoothed
    px = pixels(logits, target)
    classes = logits.shape[1]
    dice = []
    for c in range(classes):
        overlap = sum(p[c] for p, y in px if y == c)
        predicted = sum(p[c] for p, _ in px)
        true = sum(1 for _, y in px if y == c)
        dice.append((2 * overlap + smooth) / (predicted + true + smooth))
    return 1 - sum(dice) / classes


# --- the losses against their equations


def test_cross_entropy_is_eq_2() -> None:
    logits, target = batch()
    assert make_loss("ce")(logits, target).item() == pytest.approx(ce_by_hand(logits, target), rel=1e-12)


def test_balanced_weights_are_eq_4_of_the_labelled_pixels() -> None:
    assert balanced_weights(CLASS_PIXELS).tolist() == pytest.approx(WEIGHTS, rel=1e-12)
    # Not normalized: a rare class weighs up to 1 / ln(1.02) ~ 50.5, a class of all pixels 1 / ln(2.02).
    assert balanced_weights({"0": 0, "1": 0, "2": 7}).tolist() == pytest.approx(
        [1 / math.log(1.02), 1 / math.log(1.02), 1 / math.log(2.02)], rel=1e-12
    )


def test_balanced_cross_entropy_is_eq_3() -> None:
    logits, target = batch(1)
    got = make_loss("bce", CLASS_PIXELS)(logits, target).item()
    assert got == pytest.approx(balanced_ce_by_hand(logits, target, WEIGHTS), rel=1e-12)


@pytest.mark.parametrize(
    ("class_pixels", "message"),
    [
        (None, "pass the class pixel counts of its manifest"),
        ({"0": 3, "2": 4, "255": 1}, "lacks the counts of classes 1"),
        ({"0": 0, "1": 0, "2": 0, "255": 9}, "not all 0"),
        ({"0": 5, "1": -1, "2": 3}, "non-negative"),
    ],
)
def test_balanced_cross_entropy_needs_the_class_pixels(class_pixels, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_loss("ce+bce", class_pixels)
    make_loss("ce+dice", class_pixels)  # the other losses never ask for them


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.5])
def test_focal_is_eq_5(gamma: float) -> None:
    logits, target = batch(2)
    got = make_loss(f"focal:g{gamma}")(logits, target).item()
    assert got == pytest.approx(focal_by_hand(logits, target, gamma), rel=1e-12)
    if gamma == 0:
        assert got == pytest.approx(ce_by_hand(logits, target), rel=1e-12)
    else:
        assert got < ce_by_hand(logits, target)  # every pixel's loss is scaled down by (1 - p)^gamma < 1


def test_focal_gradient_stays_finite_on_a_certain_pixel() -> None:
    # p == 1 in float32: d/dp (1 - p)^gamma is infinite there for gamma < 1.
    logits = torch.tensor([[[[60.0]], [[0.0]], [[0.0]]]], requires_grad=True)
    loss = make_loss("focal:g0.5")(logits, torch.zeros(1, 1, 1, dtype=torch.int64))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


# OHEM on a constructed image: 10 valid pixels whose CE losses are log(1 + 2 e^-s) for the logit s of the
# true class (the others 0), so the ranking is known: the loss falls as s rises. Two ignored pixels would be
# the hardest of all if they counted.
OHEM_S = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]


def ohem_image() -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    order = [7, 2, 11, 0, 9, 4, 6, 1, 10, 3, 8, 5]  # pixel i of OHEM_S sits at position order[i]
    logits = torch.zeros(1, 3, 12, dtype=torch.float64)
    target = torch.full((1, 12), IGNORE_INDEX)
    for i, s in enumerate(OHEM_S):
        logits[0, 0, order[i]], target[0, order[i]] = s, 0
    logits[0, 0, order[10:]] = -10.0
    losses = [math.log(1 + 2 * math.exp(-s)) for s in OHEM_S]
    return logits.view(1, 3, 3, 4), target.view(1, 3, 4), losses


@pytest.mark.parametrize(
    ("threshold", "fraction", "kept"),
    [
        (1.5, 0.2, {-4, -3, -2, -1}),  # 4 losses above t, N_p = 2: the threshold decides
        (3.0, 0.5, {-4, -3, -2, -1, 0}),  # 2 losses above t, N_p = 5 (of 10 valid pixels, not 12)
        (10.0, 0.25, {-4, -3, -2}),  # N_p = ceil(2.5) = 3
        (10.0, 0.7, {-4, -3, -2, -1, 0, 1, 2}),  # N_p = 7
        (0.0, 0.1, set(OHEM_S)),  # every loss is > 0
        (20.0, 1.0, set(OHEM_S)),
        (0.1, 0.1, {-4, -3, -2, -1, 0, 1, 2}),  # log(1 + 2 e^-3) = 0.095 is not above 0.1
    ],
)
def test_ohem_keeps_exactly_the_pixels_of_eq_6(threshold: float, fraction: float, kept: set[float]) -> None:
    logits, target, losses = ohem_image()
    logits.requires_grad_()
    loss = make_loss(f"ohem:t{threshold},p{fraction}")(logits, target)
    loss.backward()
    want = np.mean([v for s, v in zip(OHEM_S, losses, strict=True) if s in kept])
    assert loss.item() == pytest.approx(want, rel=1e-12)
    # The pixels that reach the loss are exactly those with a gradient.
    touched = logits.grad.abs().sum(1).flatten() > 0
    s_at = logits.detach()[0, 0].flatten()
    assert {float(s) for s in s_at[touched]} == kept


@pytest.mark.parametrize(("fraction", "n_p"), [(0.28, 7), (0.56, 14), (0.3, 8), (0.01, 1), (1, 25)])
def test_ohem_keeps_ceil_p_n_pixels_however_floats_round_p_n(fraction: float, n_p: int) -> None:
    # Of 25 pixels: 0.28 * 25 == 7.000000000000001 and 0.56 * 25 == 14.000000000000002 in floats; N_p is
    # still 7 and 14. 0.3 * 25 = 7.5: N_p = 8.
    logits, target = batch(11, (1, 3, 5, 5), ignore=0)
    logits.requires_grad_()
    loss = make_loss(f"ohem:t100,p{fraction}")(logits, target)
    loss.backward()
    assert int((logits.grad.abs().sum(1) > 0).sum()) == n_p
    hardest = sorted((-math.log(p[y]) for p, y in pixels(logits, target)), reverse=True)
    assert loss.item() == pytest.approx(np.mean(hardest[:n_p]), rel=1e-12)


def test_dice_of_a_perfect_prediction_is_0() -> None:
    # Class 1 is absent, ignored pixels hold confident wrong logits: neither may count against a perfect
    # prediction.
    logits, target = batch(3, (2, 3, 6, 6), ignore=0.3)
    target[target == 1] = 2
    logits = logits.float()
    valid = target != IGNORE_INDEX
    perfect = 100 * torch.nn.functional.one_hot(target.masked_fill(~valid, 0), 3).movedim(-1, 1).float()
    logits = torch.where(valid.unsqueeze(1), perfect, 50 * logits)
    assert make_loss("dice")(logits, target).item() == pytest.approx(0, abs=1e-6)
    # ... and a confidently wrong one (0 taken for 1, 2 for 0) near 1, short of it by the smoothing only.
    wrong = torch.where(valid.unsqueeze(1), perfect.roll(1, dims=1), logits)
    assert 0.95 < make_loss("dice")(wrong, target).item() < 1


def test_dice_is_eq_7_averaged_over_classes() -> None:
    logits, target = batch(4)
    assert make_loss("dice")(logits, target).item() == pytest.approx(dice_by_hand(logits, target), rel=1e-12)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_ignored_pixels_never_contribute(spec: str) -> None:
    logits, target = batch(5)
    ignored = (target == IGNORE_INDEX).unsqueeze(1).expand_as(logits)
    assert ignored.any()
    changed = torch.where(ignored, 40 * torch.randn_like(logits), logits)
    loss = make_loss(spec, CLASS_PIXELS)
    a, b = logits.clone().requires_grad_(), changed.clone().requires_grad_()
    la, lb = loss(a, target), loss(b, target)
    (la + lb).backward()
    assert la.item() == pytest.approx(lb.item(), rel=1e-12)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)
    assert (a.grad[ignored] == 0).all()


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_a_batch_of_ignored_pixels_gives_0(spec: str) -> None:
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = make_loss(spec, CLASS_PIXELS)(logits, torch.full((2, 4, 4), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and (logits.grad == 0).all()


def test_terms_combine_with_their_weights() -> None:
    logits, target = batch(6)
    got = make_loss("ce+0.5*dice")(logits, target).item()
    assert got == pytest.approx(ce_by_hand(logits, target) + 0.5 * dice_by_hand(logits, target), rel=1e-12)
    got = make_loss("2*focal:g2+0.25*bce+dice", CLASS_PIXELS)(logits, target).item()
    want = (
        2 * focal_by_hand(logits, target, 2)
        + 0.25 * balanced_ce_by_hand(logits, target, WEIGHTS)
        + dice_by_hand(logits, target)
    )
    assert got == pytest.approx(want, rel=1e-12)


def test_half_precision_logits_are_computed_in_float32() -> None:
    logits, target = batch(7)
    half = logits.to(torch.bfloat16)
    for spec in ALL_SPECS:
        loss = make_loss(spec, CLASS_PIXELS)
        got = loss(half, target)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(loss(half.float(), target).item(), rel=1e-6)


# --- micro-batches


def micro_batch_case(seed: int):
    """A 1x1-conv "model" (no norm: its gradient over a union is the sum over the parts), 3 images and
    uneven micro-batches [0:1] and [1:3], the first mostly ignored."""
    torch.manual_seed(seed)
    model = nn.Conv2d(4, 3, 1).double()
    images = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    _, target = batch(seed, (3, 3, 5, 6), ignore=0.1)
    target[0, :4] = IGNORE_INDEX
    return model, images, target, [(0, 1), (1, 3)]


def accumulate(loss: Loss, model: nn.Module, images, target, parts) -> tuple[float, list[torch.Tensor]]:
    """What the training loop does: one backward per micro-batch, the shares of the step summed."""
    model.zero_grad()
    valid = int((target != IGNORE_INDEX).sum())
    total = 0.0
    for a, b in parts:
        share = loss(model(images[a:b]), target[a:b], valid_pixels=valid, micro_batches=len(parts))
        share.backward()
        total += share.item()
    return total, [p.grad.clone() for p in model.parameters()]


def whole(loss: Loss, model: nn.Module, images, target) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    value = loss(model(images), target)
    value.backward()
    return value.item(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("spec", ["ce", "bce", "focal:g2", "0.3*ce+bce+2*focal:g0.5"])
def test_pixelwise_micro_batches_add_up_to_their_union(spec: str) -> None:
    model, images, target, parts = micro_batch_case(8)
    loss = make_loss(spec, CLASS_PIXELS)
    total, grads = accumulate(loss, model, images, target, parts)
    union, union_grads = whole(loss, model, images, target)
    assert total == pytest.approx(union, rel=1e-12)
    for g, u in zip(grads, union_grads, strict=True):
        torch.testing.assert_close(g, u, rtol=1e-10, atol=1e-14)
    # The parts' own means would not: the micro-batches hold different numbers of valid pixels.
    own = np.mean([loss(model(images[a:b]), target[a:b]).item() for a, b in parts])
    assert own != pytest.approx(union, rel=1e-3)


@pytest.mark.parametrize("spec", ["ohem:t0.5,p0.25", "dice"])
def test_per_batch_terms_weigh_each_micro_batch_equally(spec: str) -> None:
    model, images, target, parts = micro_batch_case(9)
    loss = make_loss(spec)
    total, grads = accumulate(loss, model, images, target, parts)
    means = [whole(loss, model, images[a:b], target[a:b]) for a, b in parts]
    assert total == pytest.approx(np.mean([m for m, _ in means]), rel=1e-12)
    for i, g in enumerate(grads):
        torch.testing.assert_close(g, (means[0][1][i] + means[1][1][i]) / 2, rtol=1e-10, atol=1e-14)


def test_mixed_terms_accumulate_each_their_own_way() -> None:
    model, images, target, parts = micro_batch_case(10)
    total, _ = accumulate(make_loss("ce+0.5*dice"), model, images, target, parts)
    ce, _ = whole(make_loss("ce"), model, images, target)
    dice = np.mean([whole(make_loss("dice"), model, images[a:b], target[a:b])[0] for a, b in parts])
    assert total == pytest.approx(ce + 0.5 * dice, rel=1e-12)


# --- the grammar

VALID_LOSSES = [
    ("ce", (LossTerm("ce"),)),
    ("bce", (LossTerm("bce"),)),
    ("dice", (LossTerm("dice"),)),
    ("focal:g2", (LossTerm("focal", gamma=2.0),)),
    ("focal:g0", (LossTerm("focal", gamma=0.0),)),
    ("focal:g0.5", (LossTerm("focal", gamma=0.5),)),
    ("ohem:t0.7,p0.25", (LossTerm("ohem", threshold=0.7, fraction=0.25),)),
    ("ohem:t0,p1", (LossTerm("ohem", threshold=0.0, fraction=1.0),)),
    ("ce+0.5*dice", (LossTerm("ce"), LossTerm("dice", 0.5))),
    ("ohem:t0.7,p0.25+dice", (LossTerm("ohem", threshold=0.7, fraction=0.25), LossTerm("dice"))),
    ("2*focal:g2+0.05*dice+bce", (LossTerm("focal", 2, gamma=2), LossTerm("dice", 0.05), LossTerm("bce"))),
    ("10*ce+0.125*ohem:t12.5,p0.01", (LossTerm("ce", 10), LossTerm("ohem", 0.125, None, 12.5, 0.01))),
]
INVALID_LOSSES = [
    *("", "+", "ce+", "+ce", "ce++dice", "CE", " ce", "ce ", "ce + dice", "ce\n", "xe", "bce2", "cedice"),
    *("0*ce", "0.0*dice", "-1*ce", "+1*ce", "1e-2*ce", ".5*ce", "0.5*", "*ce", "0.5**ce", "1*1*ce", "2ce"),
    *("ce:g2", "dice:s1", "bce:", "focal", "focal:", "focal:2", "focal:g", "focal:g-1", "focal:p2"),
    *("focal:g1e2", "focal:g2,p1", "ohem", "ohem:t0.7", "ohem:p0.2", "ohem:p0.2,t0.7", "ohem:t0.7,p0"),
    *("ohem:t0.7,p1.5", "ohem:t0.7,p0.0", "ohem:t-1,p0.2", "ohem:t0.7,p.5", "ohem:t0.7;p0.2"),
    "ohem:t0.7, p0.2",
]


@pytest.mark.parametrize(("text", "terms"), VALID_LOSSES)
def test_parse_loss_accepts_the_grammar(text: str, terms: tuple[LossTerm, ...]) -> None:
    assert parse_loss(text) == LossSpec(terms)
    assert parse_loss(str(parse_loss(text))) == parse_loss(text)  # the canonical string parses back
    assert parse_loss(LossSpec(terms)) == LossSpec(terms)


def test_canonical_strings() -> None:
    assert str(parse_loss("1*ce+0.50*dice+focal:g2.0")) == "ce+0.5*dice+focal:g2"
    assert str(LossTerm("ohem", 1e-05, threshold=0.7, fraction=1.0)) == "0.00001*ohem:t0.7,p1"


@pytest.mark.parametrize("text", INVALID_LOSSES)
def test_parse_loss_rejects_with_the_term_and_what_is_allowed(text: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_loss(text)
    message = str(err.value)
    assert repr(text) in message
    assert LOSS_GRAMMAR in message or " is written " in message or "positive decimal" in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ce+dize", r"term 'dize' in loss 'ce\+dize': unknown loss 'dize'; allowed: terms joined by \+"),
        ("ce+0*dice", r"term '0\*dice' .*: weight '0' must be a positive decimal number"),
        ("focal:g-2+ce", r"term 'focal:g-2' .*: focal is written focal:g<gamma>, gamma >= 0"),
        ("ohem:t0.7,p2", r"term 'ohem:t0.7,p2' .*: ohem is written ohem:t<threshold>,p<fraction>"),
        ("dice:s1", r"term 'dice:s1' .*: dice is written dice, with no arguments"),
        ("ce+dice+ce", r"loss 'ce\+dice\+ce' names ce more than once"),
        ("ce++dice", r"empty term in loss 'ce\+\+dice'"),
    ],
)
def test_parse_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_loss(text)


def test_loss_pattern_is_the_grammar_as_a_schema_pattern() -> None:
    # Pydantic's engine (Rust regex), as a spec field would use it; a name given twice is the parser's.
    assert "(?P<" not in LOSS_PATTERN
    loss = pydantic.TypeAdapter(Annotated[str, pydantic.Field(pattern=LOSS_PATTERN)])
    for text, _ in VALID_LOSSES:
        loss.validate_python(text)
    for text in INVALID_LOSSES:
        with pytest.raises(pydantic.ValidationError):
            loss.validate_python(text)
    loss.validate_python("ce+ce")
    with pytest.raises(ValueError, match="more than once"):
        parse_loss("ce+ce")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "focal"},
        {"name": "ce", "gamma": 2.0},
        {"name": "ohem", "threshold": 0.7},
        {"name": "ohem", "threshold": 0.7, "fraction": 0.0},
        {"name": "dice", "weight": 0.0},
        {"name": "dice", "weight": -1.0},
        {"name": "dice", "weight": math.inf},
        {"name": "focal", "gamma": math.nan},
        {"name": "lovasz"},
    ],
)
def test_loss_term_rejects_what_the_grammar_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="invalid loss term"):
        LossTerm(**kwargs)


def test_every_name_has_its_code() -> None:
    assert set(TERMS) == set(PIXELWISE) | set(PER_BATCH)
    assert not set(PIXELWISE) & set(PER_BATCH)
    assert parse_loss("ce+bce").needs_class_pixels and not parse_loss("ce+focal:g2+dice").needs_class_pixels


def test_loss_spec_does_not_import_torch() -> None:
    code = "import sys, orchestrator.loss_spec; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize("loss", ["bce", "ohem:t0.7,p0.25+0.5*dice", "focal:g2"])
def test_the_training_loop_uses_train_loss_with_the_manifests_class_pixels(
    tiny_shards: Path, loss: str
) -> None:
    raw = {
        "name": "losses",
        "data": {"train": f"{tiny_shards}/train", "val": f"{tiny_shards}/val", "loader_workers": 0},
        "model": {"backbone": "resnet18"},
        "train": {"epochs": 1, "batch_per_gpu": 2, "accumulate": 2, "crop": [32, 32], "loss": loss},
    }
    w = Worker(specs.validate(raw))
    assert str(w.loss.spec) == str(parse_loss(loss))
    if loss == "bce":
        pixels = read_manifest(f"{tiny_shards}/train")["class_pixels"]
        assert torch.equal(w.loss.class_weights, balanced_weights(pixels))
    model = model_for(w.spec)
    report = train_epoch(w, model, make_optimizer(w.spec.train, model), Position())
    assert math.isfinite(report["train_loss"]) and report["train_loss"] > 0
