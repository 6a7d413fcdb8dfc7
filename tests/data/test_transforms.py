"""Augmentation: crop shape, ignore and mean-colour padding, joint flip, nearest mask resampling, Gaussian
blur, uint8 outputs, the draws and their tensor form, the batched (device) path and the float resize path;
normalization by a given mean/std."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orchestrator.data.transforms import (
    IMAGENET,
    Aug,
    MeanStd,
    _augment,
    augment,
    augment_batch,
    draw_aug,
    normalize,
    to_chw,
    train_transform,
)

H, W = 36, 64
BDD: MeanStd = ((0.28, 0.31, 0.29), (0.25, 0.26, 0.27))  # any non-ImageNet statistics


def _sample(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (H, W), dtype=np.uint8)
    return image, mask


def _normalized(image: np.ndarray, mean_std: MeanStd = IMAGENET) -> np.ndarray:
    """Independent reference: [3, H, W] float from the literal formula, for an [H, W, 3] image."""
    mean, std = (np.array(v) for v in mean_std)
    return ((image / 255.0 - mean) / std).transpose(2, 0, 1)


def _gaussian_2d(image: np.ndarray, sigma: float) -> np.ndarray:
    """Independent reference: direct (not separable) 2-D Gaussian of an [H, W, 3] image, mirror borders."""
    if sigma == 0:
        return image.astype(np.float64)
    r = math.ceil(3 * sigma)
    offsets = np.arange(-r, r + 1)
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    kernel /= kernel.sum()
    padded = np.pad(image.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")  # d c b | a b c d
    out = np.zeros(image.shape)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out += kernel[dy, dx] * padded[dy : dy + image.shape[0], dx : dx + image.shape[1]]
    return out


def test_train_output_shapes_and_types() -> None:
    image, mask = _sample()
    x, y = train_transform(image, mask, (48, 32), np.random.default_rng(0))
    assert x.shape == (3, 32, 48) and x.dtype == torch.uint8
    assert y.shape == (32, 48) and y.dtype == torch.uint8


def test_train_is_reproducible_per_seed() -> None:
    image, mask = _sample()
    a = train_transform(image, mask, (48, 32), np.random.default_rng(11))
    b = train_transform(image, mask, (48, 32), np.random.default_rng(11))
    c = train_transform(image, mask, (48, 32), np.random.default_rng(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("mean_std", [IMAGENET, BDD])
def test_padding_is_ignore_in_mask_and_the_mean_colour_in_image(mean_std: MeanStd) -> None:
    # Scale 1 and a crop larger than the image: the image sits in a corner (left or right after a flip).
    image, mask = _sample()
    seen = set()
    for seed in range(6):
        rng = np.random.default_rng(seed)
        x, y = train_transform(image, mask, (80, 50), rng, scale=(1.0, 1.0), blur_p=0.0, mean_std=mean_std)
        flipped = bool((y[:, 0] == 255).all())
        seen.add(flipped)
        cols = slice(80 - W, 80) if flipped else slice(0, W)
        expected_mask = mask[:, ::-1] if flipped else mask
        expected_image = (image[:, ::-1] if flipped else image).transpose(2, 0, 1)
        assert np.array_equal(y[:H, cols].numpy(), expected_mask)
        assert np.array_equal(x[:, :H, cols].numpy(), expected_image)
        pad = torch.ones(50, 80, dtype=torch.bool)
        pad[:H, cols] = False
        assert (y[pad] == 255).all()
        colour = [round(255 * m) for m in mean_std[0]]
        assert x[:, pad].T.tolist() == [colour] * int(pad.sum())
        # The rounded mean colour normalizes to within half a level of 0.
        half_level = 0.5 / (255 * min(mean_std[1]))
        assert normalize(x, mean_std)[:, pad].abs().max() <= half_level
    assert seen == {False, True}


@pytest.mark.parametrize("mean_std", [IMAGENET, BDD])
def test_flip_moves_image_and_mask_together(mean_std: MeanStd) -> None:
    image, mask = _sample()
    plain = (image.transpose(2, 0, 1), mask)
    mirrored = (image[:, ::-1].transpose(2, 0, 1), mask[:, ::-1])
    seen = set()
    for seed in range(12):
        rng = np.random.default_rng(seed)
        x, y = train_transform(image, mask, (W, H), rng, scale=(1.0, 1.0), blur_p=0.0, mean_std=mean_std)
        for name, (ref_x, ref_y) in (("plain", plain), ("mirrored", mirrored)):
            if np.array_equal(y.numpy(), ref_y):
                assert np.array_equal(x.numpy(), ref_x)
                seen.add(name)
    assert seen == {"plain", "mirrored"}


def test_scale_changes_the_content_size() -> None:
    image, mask = _sample()
    x, y = train_transform(image, mask, (W, H), np.random.default_rng(0), scale=(0.5, 0.5))
    assert int((y != 255).sum()) == (H // 2) * (W // 2)
    x, y = train_transform(image, mask, (W, H), np.random.default_rng(0), scale=(2.0, 2.0))
    assert not (y == 255).any()


@pytest.mark.parametrize("seed", range(5))
def test_mask_resampling_is_nearest(seed: int) -> None:
    # A 0/2 checkerboard: any interpolation between labels would produce a 1.
    image, _ = _sample(seed)
    mask = (np.indices((H, W)).sum(axis=0) % 2 * 2).astype(np.uint8)
    mask[:4] = 255
    _, y = train_transform(image, mask, (40, 30), np.random.default_rng(seed), blur_p=1.0)
    assert set(y.unique().tolist()) <= {0, 2, 255}


@pytest.mark.parametrize("mean_std", [IMAGENET, BDD])
def test_normalize_a_decoded_image(mean_std: MeanStd) -> None:
    image, _ = _sample()
    x = normalize(to_chw(image), mean_std)  # what validation does to a whole image
    np.testing.assert_allclose(x.numpy(), _normalized(image, mean_std), atol=1e-5)
    assert x.dtype == torch.float32 and x.is_contiguous()


def test_normalize_takes_batches_and_any_dtype_without_touching_the_input() -> None:
    images = [_sample(seed)[0] for seed in range(3)]
    batch = torch.stack([to_chw(image) for image in images]).double()
    before = batch.clone()
    x = normalize(batch, BDD)
    assert x.dtype == torch.float32 and x.shape == (3, 3, H, W) and torch.equal(batch, before)
    np.testing.assert_allclose(x.numpy(), np.stack([_normalized(i, BDD) for i in images]), atol=1e-5)


def test_aug_tensor_round_trip() -> None:
    augs = [draw_aug(np.random.default_rng(seed), (720, 1280), (720, 720)) for seed in range(20)]
    augs.append(Aug(1441, 2561, 7, 1838, True, 0.1234567890123456789))
    rows = torch.stack([aug.as_tensor() for aug in augs])  # what a DataLoader's collate makes
    assert rows.dtype == torch.float64 and rows.shape == (len(augs), 6)
    assert [Aug.from_tensor(row) for row in rows] == augs
    assert {a.flip for a in augs} == {False, True} and {a.blur_sigma > 0 for a in augs} == {False, True}


@pytest.mark.parametrize("seed", range(4))
def test_draw_aug_draws_in_the_documented_order(seed: int) -> None:
    aug = draw_aug(np.random.default_rng(seed), (H, W), (48, 32), (0.5, 2.0), blur_p=0.5, blur_sigma=2.0)
    assert aug == draw_aug(np.random.default_rng(seed), (H, W), (48, 32), blur_sigma=2.0)
    rng = np.random.default_rng(seed)
    factor = rng.uniform(0.5, 2.0)
    height, width = round(H * factor), round(W * factor)
    y0 = rng.integers(0, max(height - 32, 0) + 1)
    x0 = rng.integers(0, max(width - 48, 0) + 1)
    flip, blur, u = rng.random() < 0.5, rng.random() < 0.5, rng.random()
    assert aug == Aug(height, width, int(y0), int(x0), bool(flip), 2.0 * (1 - u) if blur else 0.0)


def test_draw_aug_respects_blur_p_and_sigma_range() -> None:
    def sigmas(blur_p: float) -> np.ndarray:
        rng = np.random.default_rng(0)
        augs = [draw_aug(rng, (H, W), (48, 32), blur_p=blur_p, blur_sigma=2.5) for _ in range(400)]
        return np.array([aug.blur_sigma for aug in augs])

    assert (sigmas(0.0) == 0).all()
    always = sigmas(1.0)
    assert (always > 0).all() and (always <= 2.5).all() and always.min() < 0.1 and always.max() > 2.4
    assert 0.4 < (sigmas(0.5) > 0).mean() < 0.6


@pytest.mark.parametrize(("sigma", "flip"), [(0.0, False), (0.4, False), (1.0, True), (1.7, False)])
def test_blur_matches_a_direct_2d_gaussian(sigma: float, flip: bool) -> None:
    # Scale 1, a crop larger than the image: only the valid region is blurred, the padding stays exact.
    image, mask = _sample(3)
    x, y = augment(to_chw(image), torch.from_numpy(mask), Aug(H, W, 0, 0, flip, sigma), (80, 50), BDD)
    cols = slice(80 - W, 80) if flip else slice(0, W)
    source = image[:, ::-1] if flip else image
    expected = _gaussian_2d(source, sigma).transpose(2, 0, 1)
    # Rounded to the nearest level (exact halves may go either way in float32).
    assert np.abs(x[:, :H, cols].numpy() - expected).max() <= 0.5 + 1e-3
    if sigma > 0:  # the blur did something measurable
        assert np.abs(expected - source.transpose(2, 0, 1)).max() > 10
    assert np.array_equal(y[:H, cols].numpy(), mask[:, ::-1] if flip else mask)
    pad = torch.ones(50, 80, dtype=torch.bool)
    pad[:H, cols] = False
    assert (y[pad] == 255).all()
    assert (x[:, pad] == torch.tensor([round(255 * m) for m in BDD[0]], dtype=torch.uint8)[:, None]).all()


def test_augment_batch_equals_per_sample_train_transform() -> None:
    samples = [_sample(seed) for seed in range(6)]
    crop, kwargs = (48, 32), {"blur_p": 0.5, "blur_sigma": 1.5}
    augs = [draw_aug(np.random.default_rng(seed), (H, W), crop, **kwargs) for seed in range(6)]
    assert {a.flip for a in augs} == {False, True} and {a.blur_sigma > 0 for a in augs} == {False, True}
    assert {a.height < 32 for a in augs} == {False, True}  # some samples need padding
    # A collated batch is contiguous [B, 3, H, W], the worker's image a channels-last view: same result.
    images = torch.stack([to_chw(image) for image, _ in samples])
    masks = torch.stack([torch.from_numpy(mask) for _, mask in samples])
    x, y = augment_batch(images, masks, torch.stack([a.as_tensor() for a in augs]), crop, BDD)
    assert x.shape == (6, 3, 32, 48) and y.shape == (6, 32, 48)
    for i, (image, mask) in enumerate(samples):
        ref_x, ref_y = train_transform(image, mask, crop, np.random.default_rng(i), mean_std=BDD, **kwargs)
        assert torch.equal(x[i], ref_x) and torch.equal(y[i], ref_y)


@pytest.mark.parametrize("seed", range(6))
def test_float_resize_path_agrees_with_the_uint8_path(seed: int) -> None:
    # The CUDA branch (float resize, then rounded) run on the CPU: within one uint8 level of the uint8 resize,
    # which uses fixed-point weights.
    image, mask = _sample(seed)
    aug = draw_aug(np.random.default_rng(seed), (H, W), (48, 32), blur_p=0.5)
    args = (to_chw(image), torch.from_numpy(mask), aug, (48, 32), BDD)
    x8, y8 = _augment(*args, uint8_resize=True)
    xf, yf = _augment(*args, uint8_resize=False)
    assert torch.equal(y8, yf)
    assert x8.dtype == xf.dtype == torch.uint8
    assert (xf.int() - x8.int()).abs().max() <= 1
    assert not torch.equal(x8, xf) or aug.height == H  # the flag does change the path
