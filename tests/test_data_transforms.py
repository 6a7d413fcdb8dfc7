"""Augmentation: crop shape, ignore padding, joint flip, nearest mask resampling; validation normalization."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.data.transforms import MEAN, STD, train_transform, val_transform

H, W = 36, 64


def _sample(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    mask = rng.integers(0, 3, (H, W), dtype=np.uint8)
    return image, mask


def _normalized(image: np.ndarray) -> np.ndarray:
    """Independent reference: [3, H, W] float from the literal formula."""
    return ((image / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)


def test_train_output_shapes_and_types() -> None:
    image, mask = _sample()
    x, y = train_transform(image, mask, (48, 32), np.random.default_rng(0))
    assert x.shape == (3, 32, 48) and x.dtype == torch.float32
    assert y.shape == (32, 48) and y.dtype == torch.int64


def test_train_is_reproducible_per_seed() -> None:
    image, mask = _sample()
    a = train_transform(image, mask, (48, 32), np.random.default_rng(11))
    b = train_transform(image, mask, (48, 32), np.random.default_rng(11))
    c = train_transform(image, mask, (48, 32), np.random.default_rng(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_padding_is_ignore_in_mask_and_zero_in_image() -> None:
    # Scale 1 and a crop larger than the image: the image sits in a corner (left or right after a flip).
    image, mask = _sample()
    for seed in range(6):
        x, y = train_transform(image, mask, (80, 50), np.random.default_rng(seed), scale=(1.0, 1.0))
        flipped = bool((y[:, 0] == 255).all())
        cols = slice(80 - W, 80) if flipped else slice(0, W)
        expected_mask = mask[:, ::-1] if flipped else mask
        expected_image = _normalized(image[:, ::-1] if flipped else image)
        assert torch.equal(y[:H, cols], torch.from_numpy(expected_mask.copy()).long())
        np.testing.assert_allclose(x[:, :H, cols].numpy(), expected_image, atol=1e-5)
        pad = torch.ones(50, 80, dtype=torch.bool)
        pad[:H, cols] = False
        assert (y[pad] == 255).all() and (x[:, pad] == 0).all()


def test_flip_moves_image_and_mask_together() -> None:
    image, mask = _sample()
    plain = (_normalized(image), mask)
    mirrored = (_normalized(image[:, ::-1]), mask[:, ::-1])
    seen = set()
    for seed in range(12):
        x, y = train_transform(image, mask, (W, H), np.random.default_rng(seed), scale=(1.0, 1.0))
        for name, (ref_x, ref_y) in (("plain", plain), ("mirrored", mirrored)):
            if np.array_equal(y.numpy(), ref_y):
                np.testing.assert_allclose(x.numpy(), ref_x, atol=1e-5)
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
    _, y = train_transform(image, mask, (40, 30), np.random.default_rng(seed))
    assert set(y.unique().tolist()) <= {0, 2, 255}


def test_val_transform_normalizes_only() -> None:
    image, mask = _sample()
    x, y = val_transform(image, mask)
    np.testing.assert_allclose(x.numpy(), _normalized(image), atol=1e-5)
    assert x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(y, torch.from_numpy(mask).long())
