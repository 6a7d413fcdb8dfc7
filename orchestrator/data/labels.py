"""Drivable-area labels in every official BDD100K format, read as the current masks' class ids.

What each format means comes from its makers' code (bdd100k: label/label.py, to_mask.py, to_color.py,
to_rle.py, palette.py; scalabel: label/transforms.py), checked against files the toolkit wrote
(tests/fixtures/bdd100k):
- masks: one-channel uint8 ids, 0 direct, 1 alternative, 2 background (255: ignore).
- ids2018: the 2018 release's maps, 0 background, 1 direct, 2 alternative, remapped to the ids above.
- colormaps: palette PNGs whose indices are the ids; an RGB colormap is read through the official palette.
- polygons: Scalabel frames; a label of category direct / alternative / background (in the 2018 all-labels
  file: 'drivable area', its class in attributes.areaType) fills its poly2d, closed, later labels over
  earlier ones, background elsewhere. The toolkit draws them with matplotlib's Agg without anti-aliasing,
  vertices snapped to the pixel grid, non-zero winding; so do we, through the same renderer.
- rles: Scalabel frames whose labels carry a COCO run-length encoding (`counts`, `size` [height, width]) of
  one class each, decoded by pycocotools.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError

from orchestrator.data.layout import CLASS_NAMES, IGNORE_INDEX, LABELS, LabelSource
from orchestrator.errors import UsageError

BACKGROUND = CLASS_NAMES.index("background")
CATEGORY_IDS = {name: i for i, name in enumerate(CLASS_NAMES)}
PALETTE = ((219, 94, 86), (86, 211, 219), (0, 0, 0))  # bdd100k's `drivables` colours, in id order
_DRIVABLE_2018 = "drivable area"  # the 2018 all-labels file's category; attributes.areaType names the class
_FROM_2018 = np.full(256, -1, np.int16)  # 2018 id -> current id; -1: not a 2018 id
_FROM_2018[0] = BACKGROUND
_FROM_2018[1] = CATEGORY_IDS["direct"]
_FROM_2018[2] = CATEGORY_IDS["alternative"]
_FROM_2018[IGNORE_INDEX] = IGNORE_INDEX


@dataclass(frozen=True)
class SampleLabel:
    """Where one sample's mask comes from: a file of its own, or its frame in the split's JSON file."""

    file: str
    bytes: int | None = None  # a file of its own: its size from the listing
    frame: tuple[tuple[str, Any], ...] | None = None  # JSON: its drivable labels, (category, poly2d or rle)
    problem: str | None = None  # why the file gives this sample no usable label, found while indexing

    @property
    def key(self) -> list:
        """What identifies the label's content for a resumed pack: the file's size, or the frame's digest."""
        if self.frame is None:
            return [self.file, self.bytes]
        return [self.file, hashlib.sha256(json.dumps(self.frame).encode()).hexdigest()]


def index(fs: fsspec.AbstractFileSystem, source: LabelSource) -> dict[str, SampleLabel]:
    """{sample id: its label} for one split: one listing of a folder, or one read of a JSON file."""
    if not source.per_image:
        return _frames(fs, source)
    labels = {}
    for entry in fs.ls(source.path, detail=True):
        name = posixpath.basename(entry["name"].rstrip("/"))
        if name.endswith(source.suffix):
            sample_id = name[: -len(source.suffix)]
            labels[sample_id] = SampleLabel(source.file(sample_id), entry["size"])
    return labels


def _frames(fs: fsspec.AbstractFileSystem, source: LabelSource) -> dict[str, SampleLabel]:
    try:
        content = json.loads(fs.cat_file(source.path))
    except ValueError as e:
        raise UsageError(f"{source.path} is not JSON ({e})") from None
    frames = content.get("frames") if isinstance(content, dict) else content  # Scalabel writes either
    if not isinstance(frames, list) or not all(isinstance(f, dict) and "name" in f for f in frames):
        raise UsageError(
            f"{source.path} holds no Scalabel frames: want a list of {{'name': '<id>.jpg', 'labels': [...]}} "
            "or {'frames': [...]}"
        )
    geometry = "rle" if source.format == "rles" else "poly2d"
    labels, seen = {}, set()
    for frame in frames:
        sample_id = posixpath.basename(str(frame["name"])).removesuffix(".jpg")  # names may carry a folder
        kept = []
        for label in frame.get("labels") or ():
            category = _category(label) if isinstance(label, dict) else None
            if category is not None and label.get(geometry) is not None:  # as the toolkit skips them
                kept.append((category, label[geometry]))
        labels[sample_id] = SampleLabel(source.path, frame=tuple(kept))
        if sample_id in seen:
            labels[sample_id] = SampleLabel(source.path, problem=f"frame {frame['name']!r} is listed twice")
        seen.add(sample_id)
    return labels


def _category(label: dict) -> str | None:
    """A label's drivable class name (maybe not one we know, which decoding refuses); None: not drivable area
    (the 2018 file's cars, lanes, ...; the toolkit skips categories it does not know)."""
    category = label.get("category")
    if category == _DRIVABLE_2018:
        return str((label.get("attributes") or {}).get("areaType"))
    return category if category in CATEGORY_IDS else None


def file_mask(source_format: str, data: bytes) -> np.ndarray:
    """The [H, W] uint8 ids of a per-image label file (masks, colormaps, ids2018); ValueError says what is
    wrong with it."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:  # its message holds the buffer's repr, nothing about the file
        raise ValueError("does not decode as PNG (not an image format PIL knows)") from None
    except OSError as e:
        raise ValueError(f"does not decode as PNG ({e})") from None
    if source_format == "colormaps" and image.mode != "P":
        return _from_rgb(image)
    mask = np.array(image)  # a writable copy: torch warns on read-only arrays
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(
            f"is a {image.mode} image of shape {mask.shape}: want one channel of uint8 class ids"
        )
    if source_format == "ids2018":
        ids = _FROM_2018[mask]
        if (ids < 0).any():
            bad = np.unique(mask[ids < 0]).tolist()
            raise ValueError(f"has label values {bad}, the 2018 maps' are [0, 1, 2] (and 255)")
        mask = ids.astype(np.uint8)
    return mask


def _from_rgb(image: Image.Image) -> np.ndarray:
    """An RGB colormap's ids through the official palette; colours not in it are refused with their counts."""
    if image.mode not in ("RGB", "RGBA"):
        raise ValueError(f"is a {image.mode} image: want a palette (P) or RGB colormap")
    rgb = np.asarray(image.convert("RGB")).astype(np.int32)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    palette = np.array([(r << 16) | (g << 8) | b for r, g, b in PALETTE])
    known = np.isin(codes, palette)
    if not known.all():
        colours, counts = np.unique(codes[~known], return_counts=True)
        listed = ", ".join(
            f"{(c >> 16, (c >> 8) & 255, c & 255)} x {n} px"
            for c, n in zip(colours[:5].tolist(), counts[:5].tolist(), strict=True)
        )
        more = f" and {len(colours) - 5} more colours" if len(colours) > 5 else ""
        official = ", ".join(f"{name} {colour}" for name, colour in zip(CLASS_NAMES, PALETTE, strict=True))
        raise ValueError(
            f"has colours outside the drivable palette: {listed}{more}; the palette is {official}"
        )
    return np.argmax(codes[..., None] == palette, axis=-1).astype(np.uint8)


def frame_mask(source_format: str, frame: tuple, width: int, height: int) -> np.ndarray:
    """The [height, width] uint8 ids of a JSON frame's labels (polygons or rles); ValueError says which
    label is wrong and how."""
    mask = np.full((height, width), BACKGROUND, np.uint8)
    draw = _rasterize if source_format == "polygons" else _decode_rles
    draw(mask, frame)
    return mask


def _class_id(n: int, category: str) -> int:
    if category not in CATEGORY_IDS:
        raise ValueError(f"label {n}: drivable area type {category!r}, want one of {list(CATEGORY_IDS)}")
    return CATEGORY_IDS[category]


def _decode_rles(mask: np.ndarray, frame: tuple) -> None:
    from pycocotools import mask as coco

    height, width = mask.shape
    for n, (category, rle) in enumerate(frame):
        class_id = _class_id(n, category)
        try:
            size = [int(v) for v in rle["size"]]
            counts = rle["counts"]
            coded = (
                coco.frPyObjects(rle, *size) if isinstance(counts, list) else {"size": size, "counts": counts}
            )
            if isinstance(coded["counts"], str):
                coded = {"size": size, "counts": coded["counts"].encode()}
            drawn = coco.decode(coded)
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(
                f"label {n}: not a COCO RLE {{'counts', 'size'}} ({type(e).__name__}: {e})"
            ) from None
        if size != [height, width]:
            raise ValueError(f"label {n}: RLE size {size} (height, width), the image is [{height}, {width}]")
        mask[drawn.astype(bool)] = class_id  # later labels over earlier ones


def _rasterize(mask: np.ndarray, frame: tuple) -> None:
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.path import Path
    from matplotlib.transforms import Affine2D

    height, width = mask.shape
    renderer = RendererAgg(width, height, 72)
    gc = renderer.new_gc()
    gc.set_antialiased(False)
    gc.set_snap(True)  # vertices rounded to whole pixels, as the toolkit's PathPatch(snap=True) draws
    gc.set_linewidth(0)  # fill only: the toolkit's closed patches have lw=0
    to_display = Affine2D().scale(1, -1).translate(0, height)  # image rows go down; Agg flips display y back
    for n, (category, polygons) in enumerate(frame):
        colour = ((_class_id(n, category) + 1) / 255, 0.0, 0.0, 1.0)  # red = id + 1; 0 where nothing is drawn
        for vertices, codes in _paths(n, polygons, Path):
            renderer.draw_path(gc, Path(vertices, codes), to_display, colour)
    rgba = np.asarray(renderer.buffer_rgba())
    drawn = rgba[..., 3] > 0
    mask[drawn] = rgba[..., 0][drawn] - 1


def _paths(n: int, polygons: Any, path: Any) -> list[tuple[np.ndarray, list[int]]]:
    """(vertices, matplotlib codes) of a label's poly2d, closed as the toolkit closes drivable areas (the
    first vertex again, by a line). 'C' starts a cubic Bezier: that vertex and the next two are its two
    control points and its end (what Agg reads for a CURVE4 code)."""
    try:
        shapes = [(np.asarray(p["vertices"], np.float64).reshape(-1, 2), str(p["types"])) for p in polygons]
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"label {n}: poly2d is not a list of {{'vertices', 'types'}} ({e})") from None
    paths = []
    for vertices, types in shapes:
        if len(types) != len(vertices) or set(types) - {"L", "C"} or not np.isfinite(vertices).all():
            raise ValueError(
                f"label {n}: types {types!r} for {len(vertices)} vertices: "
                "want one 'L' or 'C' per finite vertex"
            )
        codes = [path.CURVE4 if t == "C" else path.LINETO for t in types] + [path.LINETO]
        codes[0] = path.MOVETO
        i = 1
        while i < len(codes):  # a 'C' and the two vertices after it (the closing one counts) are one curve
            if codes[i] == path.CURVE4 and i + 2 >= len(codes):
                raise ValueError(
                    f"label {n}: types {types!r}: the 'C' at vertex {i} lacks two vertices after it"
                )
            i += 3 if codes[i] == path.CURVE4 else 1
        paths.append((np.vstack([vertices, vertices[:1]]), codes))
    return paths


def check_mask(mask: np.ndarray, image_shape: tuple[int, ...], *, values: bool = True) -> None:
    """Refuse a mask that does not fit its image or (values: a scan of every pixel) holds ids other than
    LABELS."""
    if mask.shape != image_shape[:2]:
        raise ValueError(
            f"mask shape {mask.shape} does not match image shape {image_shape}: "
            "want the image's height and width"
        )
    bad = np.setdiff1d(np.unique(mask), LABELS).tolist() if values else []
    if bad:
        raise ValueError(f"mask has label values {bad}, allowed are {list(LABELS)}")


def encode_png(mask: np.ndarray) -> bytes:
    """A one-channel PNG of class ids, the current masks' format."""
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
