"""Synthetic scenes: the exact BDD100K layout, valid masks, determinism; plus URL helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.data.synth import render, synthesize
from orchestrator.storage import join, url_to_fs


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthesize_writes_the_bdd100k_layout(tmp_path: Path) -> None:
    synthesize(str(tmp_path), train=3, val=2, size=(96, 54), seed=1)
    files = _files(tmp_path)
    for split, count in (("train", 3), ("val", 2)):
        images = sorted(Path(f).stem for f in files if f.startswith(f"images/100k/{split}/"))
        masks = sorted(Path(f).stem for f in files if f.startswith(f"labels/drivable/masks/{split}/"))
        assert len(images) == count and images == masks
        assert all(f"images/100k/{split}/{i}.jpg" in files for i in images)
        for sample_id in images:
            image = Image.open(tmp_path / f"images/100k/{split}/{sample_id}.jpg")
            mask = Image.open(tmp_path / f"labels/drivable/masks/{split}/{sample_id}.png")
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (96, 54))
            assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (96, 54))
            assert set(np.unique(np.asarray(mask))) == {0, 1, 2}
    assert len(files) == 2 * (3 + 2)


def test_synthesize_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        synthesize(str(tmp_path / name), train=2, val=1, size=(64, 36), seed=seed)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_render_road_geometry() -> None:
    image, mask = render(np.random.default_rng(3), 256, 144)
    assert image.shape == (144, 256, 3) and image.dtype == np.uint8
    assert mask.shape == (144, 256) and mask.dtype == np.uint8
    # The road lies below the horizon and widens towards the camera; the ego lane is centred at the bottom.
    road_rows = np.flatnonzero((mask != 2).any(axis=1))
    assert road_rows.min() > 144 * 0.35 and road_rows.max() == 143
    widths = (mask != 2).sum(axis=1)
    assert widths[road_rows.min()] < widths[-1]
    assert 0.45 * 256 < np.flatnonzero(mask[-1] == 0).mean() < 0.55 * 256


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_direct_and_alternative_share_the_road_colours(seed: int) -> None:
    # Separable by position and markings, not by colour: the two lanes' median colours are close.
    image, mask = render(np.random.default_rng(seed), 256, 144)
    direct, alternative = (np.median(image[mask == c], axis=0) for c in (0, 1))
    assert np.abs(direct - alternative).max() < 25


def test_join_keeps_the_scheme() -> None:
    assert join("s3://bucket/", "shards/", "/train") == "s3://bucket/shards/train"
    assert join("/data", "a", "", "b.tar") == "/data/a/b.tar"


def test_url_to_fs_local_and_s3(tmp_path: Path) -> None:
    fs, path = url_to_fs(f"file://{tmp_path}/x")
    assert fs.protocol[0] == "file" and path == f"{tmp_path}/x"
    fs, path = url_to_fs(
        "s3://bucket/key", {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://h:1"}}
    )
    assert "s3" in fs.protocol and path == "bucket/key"
