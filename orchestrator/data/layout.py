"""The official BDD100K drivable-area layout and its class definitions.

{root}/images/100k/{split}/<id>.jpg
{root}/labels/drivable/masks/{split}/<id>.png   (1 channel, uint8 class ids)

The older release put the masks at {root}/drivable_maps/labels/{split}/<id>_drivable_id.png; it is read
when the official mask folder of a split is absent.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

import fsspec

from orchestrator.data.storage import join, url_to_fs

CLASS_NAMES = ("direct", "alternative", "background")
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_INDEX = 255
LABELS = (*range(NUM_CLASSES), IGNORE_INDEX)
SPLITS = ("train", "val")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Masks:
    """Where the masks of one split are: <dir>/<id><suffix>."""

    dir: str
    suffix: str

    def path(self, sample_id: str) -> str:
        return join(self.dir, f"{sample_id}{self.suffix}")


# The helpers below join strings only, so they take a URL or a path inside a filesystem alike.
def image_dir(root: str, split: str) -> str:
    return join(root, "images", "100k", split)


def mask_dir(root: str, split: str) -> str:
    return join(root, "labels", "drivable", "masks", split)


def old_mask_dir(root: str, split: str) -> str:
    return join(root, "drivable_maps", "labels", split)


def image_path(root: str, split: str, sample_id: str) -> str:
    return join(image_dir(root, split), f"{sample_id}.jpg")


def mask_path(root: str, split: str, sample_id: str) -> str:
    return join(mask_dir(root, split), f"{sample_id}.png")


def find_masks(fs: fsspec.AbstractFileSystem, root: str, split: str) -> Masks:
    """The official mask folder of a split, or the older one when only that exists."""
    if not fs.isdir(mask_dir(root, split)) and fs.isdir(old_mask_dir(root, split)):
        return Masks(old_mask_dir(root, split), "_drivable_id.png")
    return Masks(mask_dir(root, split), ".png")


def present_splits(root: str, storage_options: dict | None = None) -> list[str]:
    """The splits of SPLITS that have an image or a mask directory under root."""
    fs, base = url_to_fs(root, storage_options)
    others = set(_names(fs, join(base, "images", "100k"))) - set(SPLITS)
    for name in sorted(others):  # e.g. the unlabelled test split: nothing to train or score on
        log.info("skipping %s: only %s have drivable-area masks", image_dir(root, name), "/".join(SPLITS))
    return [s for s in SPLITS if fs.isdir(image_dir(base, s)) or fs.isdir(find_masks(fs, base, s).dir)]


def list_ids(root: str, split: str, storage_options: dict | None = None) -> list[str]:
    """Sorted ids of a split; raises if any image lacks its mask or any mask its image."""
    fs, base = url_to_fs(root, storage_options)
    masks = find_masks(fs, base, split)
    image_ids = _stems(fs, image_dir(base, split), ".jpg")
    mask_ids = _stems(fs, masks.dir, masks.suffix)
    if image_ids != mask_ids:
        raise ValueError(
            f"unpaired samples in {root} split {split!r}: images without masks "
            f"{sorted(image_ids - mask_ids)[:20]}, masks without images {sorted(mask_ids - image_ids)[:20]}"
        )
    return sorted(image_ids)


def _names(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)] if fs.isdir(path) else []


def _stems(fs: fsspec.AbstractFileSystem, path: str, suffix: str) -> set[str]:
    return {n[: -len(suffix)] for n in _names(fs, path) if n.endswith(suffix)}
