"""Predictions in the files BDD100K takes, one image at a time so any worker can write its own:

- masks: `<out>/<id>.png`, one-channel uint8 class ids in the current drivable format (0 direct,
  1 alternative, 2 background), as bdd100k's `to_mask` writes them;
- rle: one `<out>/predictions.json` in the Scalabel schema, what bdd100k's `to_rle` writes and its
  challenge reads: a frame per image named `<id>.jpg`, a label per road class present (id = the class id,
  category direct / alternative, `rle` = COCO run-length `counts` and `size` [height, width] of its
  pixels, as scalabel's mask_to_rle encodes them); background is what no label covers.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np

from orchestrator.data.labels import CATEGORY_IDS, encode_png
from orchestrator.storage import join, url_to_fs

Format = Literal["masks", "rle"]
RLE_FILE = "predictions.json"
ROAD_CATEGORIES = ("direct", "alternative")


def rle_frame(sample_id: str, mask: np.ndarray) -> dict:
    """The Scalabel frame of one image's predicted class ids [H, W]."""
    from pycocotools import mask as coco

    labels = []
    for category in ROAD_CATEGORIES:
        pixels = mask == CATEGORY_IDS[category]
        if pixels.any():
            rle = coco.encode(np.asfortranarray(pixels.astype(np.uint8)))
            rle = {"counts": rle["counts"].decode(), "size": [int(v) for v in rle["size"]]}
            labels.append({"id": str(CATEGORY_IDS[category]), "category": category, "rle": rle})
    return {"name": f"{sample_id}.jpg", "labels": labels}


class MaskWriter:
    """Writes `<id>.png` files under an fsspec URL; made where it writes (a worker makes its own client)."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.fs, self.root = url_to_fs(url, storage_options)
        self.fs.makedirs(self.root, exist_ok=True)

    def write(self, sample_id: str, mask: np.ndarray) -> None:
        self.fs.pipe_file(join(self.root, mask_name(sample_id)), encode_png(mask))


def mask_name(sample_id: str) -> str:
    return f"{sample_id}.png"


def write_rle(url: str, frames: list[dict], storage_options: dict | None = None) -> str:
    """`<url>/predictions.json` holding the frames in order; returns its URL."""
    fs, root = url_to_fs(url, storage_options)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(join(root, RLE_FILE), json.dumps({"frames": frames}).encode())
    return join(url, RLE_FILE)
