"""The official BDD100K drivable-area layout and its class definitions.

{root}/images/100k/{split}/<id>.jpg
{root}/labels/drivable/masks/{split}/<id>.png   (1 channel, uint8 class ids)
"""

from __future__ import annotations

import posixpath

import fsspec

from orchestrator.data.storage import join, url_to_fs

CLASS_NAMES = ("direct", "alternative", "background")
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_INDEX = 255
SPLITS = ("train", "val")


# The helpers below join strings only, so they take a URL or a path inside a filesystem alike.
def image_dir(root: str, split: str) -> str:
    return join(root, "images", "100k", split)


def mask_dir(root: str, split: str) -> str:
    return join(root, "labels", "drivable", "masks", split)


def image_path(root: str, split: str, sample_id: str) -> str:
    return join(image_dir(root, split), f"{sample_id}.jpg")


def mask_path(root: str, split: str, sample_id: str) -> str:
    return join(mask_dir(root, split), f"{sample_id}.png")


def present_splits(root: str, storage_options: dict | None = None) -> list[str]:
    """The splits of SPLITS that have an image or a mask directory under root."""
    fs, base = url_to_fs(root, storage_options)
    return [s for s in SPLITS if fs.isdir(image_dir(base, s)) or fs.isdir(mask_dir(base, s))]


def list_ids(root: str, split: str, storage_options: dict | None = None) -> list[str]:
    """Sorted ids of a split; raises if any image lacks its mask or any mask its image."""
    fs, base = url_to_fs(root, storage_options)
    images = _stems(fs, image_dir(base, split), ".jpg")
    masks = _stems(fs, mask_dir(base, split), ".png")
    if images != masks:
        raise ValueError(
            f"unpaired samples in {root} split {split!r}: images without masks "
            f"{sorted(images - masks)[:20]}, masks without images {sorted(masks - images)[:20]}"
        )
    return sorted(images)


def _stems(fs: fsspec.AbstractFileSystem, path: str, suffix: str) -> set[str]:
    if not fs.isdir(path):
        return set()
    names = (posixpath.basename(p) for p in fs.ls(path, detail=False))
    return {n[: -len(suffix)] for n in names if n.endswith(suffix)}
