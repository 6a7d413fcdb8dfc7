"""Procedural road scenes in the BDD100K drivable layout: a stand-in dataset a small net can learn.

Each scene is a pinhole view of a flat road: lanes are intervals of a lateral ground coordinate u (the
bottom-row x a pixel projects to along its ray to the vanishing point), so all geometry is a few vectorized
comparisons. Direct and alternative lanes share the asphalt; only position, markings and context tell them
apart. Cars on the road are background, as in BDD100K where the drivable area stops at vehicles.
"""

from __future__ import annotations

import numpy as np
import simplejpeg

from orchestrator.data import layout
from orchestrator.data.labels import encode_png
from orchestrator.storage import url_to_fs

_WRITE_BATCH = 64  # samples per fs.pipe call: concurrent uploads on S3, bounded memory
_WHITE, _YELLOW = (235.0, 235.0, 230.0), (230.0, 190.0, 40.0)


def synthesize(
    dst: str,
    train: int,
    val: int,
    size: tuple[int, int] = (1280, 720),
    seed: int = 0,
    storage_options: dict | None = None,
) -> None:
    """Write `train` and `val` scenes of size (width, height) under dst in the BDD100K layout."""
    fs, root = url_to_fs(dst, storage_options)
    for split_index, (split, count) in enumerate((("train", train), ("val", val))):
        if count <= 0:
            continue
        fs.makedirs(layout.image_dir(root, split), exist_ok=True)
        fs.makedirs(layout.mask_dir(root, split), exist_ok=True)
        for start in range(0, count, _WRITE_BATCH):
            files = {}
            for i in range(start, min(count, start + _WRITE_BATCH)):
                image, mask = render(np.random.default_rng([seed, split_index, i]), *size)
                sample_id = f"synth-{split}-{i:07d}"
                files[layout.image_path(root, split, sample_id)] = simplejpeg.encode_jpeg(
                    image, quality=90, colorspace="RGB"
                )
                files[layout.mask_path(root, split, sample_id)] = encode_png(mask)
            fs.pipe(files)


def render(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image [H, W, 3] uint8, mask [H, W] uint8 with class ids 0/1/2)."""
    h, w = height, width
    horizon = h * rng.uniform(0.35, 0.5)
    vx = w * rng.uniform(0.35, 0.65)
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    t = (ys - horizon) / (h - horizon)  # 0 at the horizon, 1 at the bottom row; proportional to 1/depth
    below = t > 0.02  # rows just under the horizon are too thin to label
    u = vx + (xs - vx) / np.maximum(t, 1e-3)

    # Lane edges in bottom-row pixels: ego lane around the camera, one or two side lanes next to it.
    ego_width = w * rng.uniform(0.35, 0.55)
    left = w * rng.uniform(0.46, 0.54) - ego_width / 2
    right = left + ego_width
    side_width = ego_width * rng.uniform(0.8, 1.05)
    sides = [("left",), ("right",), ("left", "right")][rng.integers(3)]
    lo = left - side_width if "left" in sides else left
    hi = right + side_width if "right" in sides else right

    ego = below & (u >= left) & (u < right)
    alt = below & (u >= lo) & (u < hi) & ~ego
    mask = np.full((h, w), 2, np.uint8)
    mask[ego] = 0
    mask[alt] = 1

    # Surfaces: asphalt on every lane, a ground texture (sometimes a grey sidewalk) beside the road, sky.
    # float32 colours: a float64 one would silently promote every full-image operation below.
    asphalt = _colour(rng.uniform(55, 125) + rng.uniform(-8, 8, 3))
    ground = _colour(rng.uniform([40, 60, 20], [150, 140, 90]))
    sidewalk = asphalt + rng.uniform(20, 50)
    coarse = _coarse_noise(rng, h, w, cell=max(2, w // 24))
    fine = rng.standard_normal((h, w, 1), dtype=np.float32)
    road = (ego | alt)[..., None]
    texture = np.where(road, 6 * (fine + coarse), 14 * fine + 22 * coarse)  # grey noise, one channel
    image = np.where(road, asphalt, ground) + texture
    if rng.random() < 0.5:
        curb = rng.uniform(0.1, 0.3) * ego_width
        walk = below & ~(ego | alt) & (((u >= lo - curb) & (u < lo)) | ((u >= hi) & (u < hi + curb)))
        image[walk] = sidewalk + 5 * fine[walk]
    sky_top = _colour(rng.uniform([40, 90, 150], [120, 170, 240]))
    sky_low = _colour(rng.uniform([170, 180, 190], [240, 240, 250]))
    sky_rows = int(np.count_nonzero(ys < horizon))
    a = (ys[:sky_rows] / horizon)[..., None]
    image[:sky_rows] = (1 - a) * sky_top + a * sky_low
    _draw_buildings(rng, image, horizon)

    # Markings: paint only, the mask keeps the lane they lie in. Some roads have none.
    line = w * rng.uniform(0.008, 0.015)
    dash = ((rng.uniform(1.5, 3.0) / np.maximum(t, 1e-3) + rng.random()) % 1.0) < 0.5
    for edge in sorted({lo, left, right, hi}):
        if rng.random() < 0.15:
            continue
        outer = edge in (lo, hi)
        paint = below & (np.abs(u - edge) < line / 2) & (outer | dash | (rng.random() < 0.3))
        image[paint] = _YELLOW if not outer and rng.random() < 0.3 else _WHITE

    _draw_cars(rng, image, mask, horizon, vx, lo, hi)

    # Lighting: haze towards the horizon, then a global gain and colour cast per image.
    haze = ((1 - np.clip(t, 0, 1)) ** 3 * rng.uniform(0, 0.5))[..., None]
    image = (1 - haze) * image + haze * sky_low
    image = image * _colour(rng.uniform(0.6, 1.3) * rng.uniform(0.9, 1.1, 3)) + rng.uniform(-15, 15)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _colour(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def _coarse_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Blotchy low-frequency noise [h, w, 1]: a small random grid upsampled by repetition."""
    grid = rng.standard_normal((h // cell + 1, w // cell + 1), dtype=np.float32)
    return grid.repeat(cell, 0).repeat(cell, 1)[:h, :w, None]


def _draw_buildings(rng: np.random.Generator, image: np.ndarray, horizon: float) -> None:
    w = image.shape[1]
    for _ in range(rng.integers(2, 7)):
        x0 = int(rng.uniform(-0.1, 1.0) * w)
        x1 = x0 + int(w * rng.uniform(0.05, 0.2))
        top = int(horizon * rng.uniform(0.3, 0.9))
        image[top : int(horizon), max(x0, 0) : max(x1, 0)] = rng.uniform(50, 200) + rng.uniform(-20, 20, 3)


def _draw_cars(
    rng: np.random.Generator,
    image: np.ndarray,
    mask: np.ndarray,
    horizon: float,
    vx: float,
    lo: float,
    hi: float,
) -> None:
    """Boxes on the road, far to near so near cars occlude far ones; their pixels are background."""
    h, w = mask.shape
    for depth in np.sort(rng.uniform(0.12, 0.6, rng.integers(0, 4))):
        size = rng.uniform(0.15, 0.25) * w * depth  # width in pixels shrinks with distance
        cx = vx + depth * (rng.uniform(lo, hi) - vx)
        bottom = horizon + depth * (h - horizon)
        x0, x1 = int(max(cx - size / 2, 0)), int(min(cx + size / 2, w))
        y0, y1 = int(max(bottom - size * rng.uniform(0.6, 0.9), 0)), int(min(bottom, h))
        if x1 <= x0 or y1 <= y0:
            continue
        image[y0:y1, x0:x1] = rng.uniform(10, 230, 3)
        image[y0 + (y1 - y0) * 3 // 4 : y1, x0:x1] *= 0.3  # dark underbody and shadow
        mask[y0:y1, x0:x1] = 2
