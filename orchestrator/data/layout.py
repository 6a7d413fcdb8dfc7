"""The official BDD100K drivable-area tree: where the images are, where each label format is, and the classes.

{root}/images/100k/{split}/<id>.jpg
{root}/labels/drivable/masks/{split}/<id>.png             masks: ids 0 direct, 1 alternative, 2 background
{root}/labels/drivable/colormaps/{split}/<id>.png         colormaps: the ids as palette indices
{root}/labels/drivable/rles/drivable_{split}.json         rles: Scalabel frames, a COCO RLE per class
{root}/labels/drivable/polygons/drivable_{split}.json     polygons: Scalabel frames, poly2d per label
{root}/labels/bdd100k_labels_images_{split}.json          polygons: the 2018 all-labels file
{root}/drivable_maps/labels/{split}/<id>_drivable_id.png  ids2018: 0 background, 1 direct, 2 alternative

Every format reads as the current masks' ids (orchestrator.data.labels); where a split has several, the first
of that list is taken unless one is asked for.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import fsspec

from orchestrator.storage import join

CLASS_NAMES = ("direct", "alternative", "background")
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_INDEX = 255
LABELS = (*range(NUM_CLASSES), IGNORE_INDEX)
SPLITS = ("train", "val")  # the labelled splits, packed when no split is named
LABEL_FORMATS = ("masks", "colormaps", "rles", "polygons", "ids2018")  # the preference among those present


@dataclass(frozen=True)
class LabelSource:
    """Where one split's labels of one format are: a folder of one file per image, or one JSON file."""

    format: str  # one of LABEL_FORMATS
    path: str
    suffix: str = ""  # per-image files are <path>/<id><suffix>; "" for a JSON file of the whole split

    @property
    def per_image(self) -> bool:
        return bool(self.suffix)

    def file(self, sample_id: str) -> str:
        return join(self.path, f"{sample_id}{self.suffix}")

    def exists(self, fs: fsspec.AbstractFileSystem) -> bool:
        return fs.isdir(self.path) if self.per_image else fs.isfile(self.path)


# The helpers below join strings only, so they take a URL or a path inside a filesystem alike.
def image_dir(root: str, split: str) -> str:
    return join(root, "images", "100k", split)


def mask_dir(root: str, split: str) -> str:
    return join(root, "labels", "drivable", "masks", split)


def image_path(root: str, split: str, sample_id: str) -> str:
    return join(image_dir(root, split), f"{sample_id}.jpg")


def mask_path(root: str, split: str, sample_id: str) -> str:
    return join(mask_dir(root, split), f"{sample_id}.png")


def label_sources(root: str, split: str) -> list[LabelSource]:
    """Every place the official releases put a split's drivable labels, in LABEL_FORMATS order."""
    drivable = join(root, "labels", "drivable")
    return [
        LabelSource("masks", mask_dir(root, split), ".png"),
        LabelSource("colormaps", join(drivable, "colormaps", split), ".png"),
        LabelSource("rles", join(drivable, "rles", f"drivable_{split}.json")),
        LabelSource("polygons", join(drivable, "polygons", f"drivable_{split}.json")),
        LabelSource("polygons", join(root, "labels", f"bdd100k_labels_images_{split}.json")),
        LabelSource("ids2018", join(root, "drivable_maps", "labels", split), "_drivable_id.png"),
    ]


def find_labels(fs: fsspec.AbstractFileSystem, root: str, split: str) -> list[LabelSource]:
    """The label sources a split has, most preferred first (empty: an images-only split)."""
    return [source for source in label_sources(root, split) if source.exists(fs)]


def image_splits(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The split folders under images/100k, sorted."""
    return sorted(names(fs, join(root, "images", "100k")))


def names(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """The base names of a folder's entries; none if the folder does not exist."""
    return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)] if fs.isdir(path) else []
