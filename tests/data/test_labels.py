"""Every official drivable-label format packs to the masks the BDD100K toolkit writes from the same labels.

tests/fixtures/bdd100k/labels is an official tree the toolkit itself wrote (make_official.py there): polygons
(hand-made, in the Scalabel schema) and, from them, masks, palette colormaps and RLE JSON. The 2018 formats,
RGB colormaps and our own RLE file are written here from those, by their documented definitions.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from orchestrator.cli import main
from orchestrator.data.layout import IGNORE_INDEX
from orchestrator.data.shards import pack
from orchestrator.data.stream import evaluation_loader
from orchestrator.data.verify import verify
from orchestrator.errors import UsageError

OFFICIAL = Path(__file__).resolve().parents[1] / "fixtures" / "bdd100k" / "labels" / "drivable"
SPLITS = ("train", "val")
DIRECT, ALTERNATIVE, BACKGROUND = 0, 1, 2
PALETTE = {DIRECT: (219, 94, 86), ALTERNATIVE: (86, 211, 219), BACKGROUND: (0, 0, 0)}  # bdd100k label.py
IDS_2018 = {
    BACKGROUND: 0,
    DIRECT: 1,
    ALTERNATIVE: 2,
}  # the 2018 README: 0 background, 1 direct, 2 alternative


def official_masks(split: str) -> dict[str, np.ndarray]:
    return {p.stem: np.array(Image.open(p)) for p in sorted((OFFICIAL / "masks" / split).iterdir())}


def images_for(root: Path, split: str, masks: dict[str, np.ndarray]) -> None:
    """A JPEG per mask, of its size (content: a gradient, so the RGB statistics are not trivial)."""
    folder = root / "images/100k" / split
    folder.mkdir(parents=True)
    for sample_id, mask in masks.items():
        h, w = mask.shape
        image = np.stack(np.broadcast_arrays(np.arange(w)[None] % 256, np.arange(h)[:, None] % 256, 90), -1)
        (folder / f"{sample_id}.jpg").write_bytes(simplejpeg.encode_jpeg(image.astype(np.uint8)))


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE, from its definition: run lengths of the column-major pixels, zeros first."""
    flat = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def write_labels(root: Path, fmt: str) -> None:
    """The official labels of both splits in one format under root."""
    drivable = root / "labels/drivable"
    for split in SPLITS:
        masks = official_masks(split)
        if fmt in ("masks", "colormaps", "rles", "polygons"):  # as the toolkit wrote them
            source = OFFICIAL / fmt / (split if fmt in ("masks", "colormaps") else f"drivable_{split}.json")
            (drivable / source.relative_to(OFFICIAL)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(
                source, drivable / source.relative_to(OFFICIAL)
            ) if source.is_file() else shutil.copytree(source, drivable / source.relative_to(OFFICIAL))
        elif fmt == "colormaps-rgb":  # an RGB colormap of the official colours
            folder = drivable / "colormaps" / split
            folder.mkdir(parents=True)
            for sample_id, mask in masks.items():
                rgb = np.zeros((*mask.shape, 3), np.uint8)
                for class_id, colour in PALETTE.items():
                    rgb[mask == class_id] = colour
                Image.fromarray(rgb).save(folder / f"{sample_id}.png")
        elif fmt == "rles-ours":  # our own RLE file: a plain list of frames, uncompressed counts
            frames = [
                {
                    "name": f"{sample_id}.jpg",
                    "labels": [
                        {
                            "id": str(c),
                            "category": name,
                            "rle": {"counts": rle_counts(mask == c), "size": list(mask.shape)},
                        }
                        for c, name in ((DIRECT, "direct"), (ALTERNATIVE, "alternative"))
                        if (mask == c).any()
                    ],
                }
                for sample_id, mask in masks.items()
            ]
            (drivable / "rles").mkdir(parents=True, exist_ok=True)
            (drivable / "rles" / f"drivable_{split}.json").write_text(json.dumps(frames))
        elif (
            fmt == "polygons2018"
        ):  # the 2018 all-labels file: 'drivable area' + areaType, among other labels
            frames = json.loads((OFFICIAL / "polygons" / f"drivable_{split}.json").read_text())
            for frame in frames:
                frame["attributes"] = {"weather": "clear", "scene": "city street", "timeofday": "daytime"}
                labels = [
                    {**label, "category": "drivable area", "attributes": {"areaType": label["category"]}}
                    for label in frame["labels"]
                    if label["category"] != "background"  # the 2018 file has none: cover it with the others
                ]
                frame["labels"] = [
                    {"id": 100, "category": "car", "box2d": {"x1": 1, "y1": 1, "x2": 9, "y2": 9}},
                    *labels,
                    {"id": 101, "category": "lane", "attributes": {"laneDirection": "parallel"},
                     "poly2d": [{"vertices": [[0, 0], [50, 60]], "types": "LL", "closed": False}]},
                ]  # fmt: skip
            (root / "labels").mkdir(exist_ok=True)
            (root / "labels" / f"bdd100k_labels_images_{split}.json").write_text(json.dumps(frames))
        elif fmt == "ids2018":
            folder = root / "drivable_maps/labels" / split
            folder.mkdir(parents=True)
            for sample_id, mask in masks.items():
                old = np.zeros_like(mask)
                for class_id, old_id in IDS_2018.items():
                    old[mask == class_id] = old_id
                Image.fromarray(old).save(folder / f"{sample_id}_drivable_id.png")


def official_tree(root: Path, fmt: str) -> Path:
    for split in SPLITS:
        images_for(root, split, official_masks(split))
    write_labels(root, fmt)
    return root


def packed_masks(out: Path, manifest: dict) -> dict[str, np.ndarray]:
    masks = {}
    for entry in manifest["shards"]:
        with tarfile.open(out / manifest["split"] / entry["name"]) as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    masks[member.name[:-4]] = np.array(Image.open(io.BytesIO(tar.extractfile(member).read())))
    return masks


def expected_masks(split: str, fmt: str) -> dict[str, np.ndarray]:
    masks = official_masks(split)
    if fmt == "polygons2018":  # the background polygon of one train frame is not in the 2018 file
        masks = {
            i: np.where(m == BACKGROUND, DIRECT, m) if i == "0a3c9f1e-77b2d4e8" else m
            for i, m in masks.items()
        }
    return masks


FORMATS = {  # what each tree is packed as: (its label format, the source the manifest names for train)
    "masks": ("masks", "labels/drivable/masks/train"),
    "colormaps": ("colormaps", "labels/drivable/colormaps/train"),
    "colormaps-rgb": ("colormaps", "labels/drivable/colormaps/train"),
    "rles": ("rles", "labels/drivable/rles/drivable_train.json"),
    "rles-ours": ("rles", "labels/drivable/rles/drivable_train.json"),
    "polygons": ("polygons", "labels/drivable/polygons/drivable_train.json"),
    "polygons2018": ("polygons", "labels/bdd100k_labels_images_train.json"),
    "ids2018": ("ids2018", "drivable_maps/labels/train"),
}


@pytest.mark.parametrize("tree", FORMATS)
def test_every_format_packs_to_the_toolkits_masks_bit_for_bit(tree: str, tmp_path: Path) -> None:
    """Polygons included: drawn as the toolkit draws them, no boundary pixel differs (0 of 1,915,200)."""
    manifests = pack(
        str(official_tree(tmp_path / "raw", tree)), str(tmp_path / "out"), shard_size=3, workers=1
    )
    fmt, source = FORMATS[tree]
    assert manifests["train"]["labels"] == {"format": fmt, "source": source}
    for split in SPLITS:
        expected, packed = expected_masks(split, tree), packed_masks(tmp_path / "out", manifests[split])
        assert sorted(packed) == sorted(expected)
        for sample_id, mask in expected.items():
            assert packed[sample_id].dtype == np.uint8
            assert np.array_equal(packed[sample_id], mask), f"{tree} {split}/{sample_id}"
        counts = {str(c): int(sum((m == c).sum() for m in expected.values())) for c in (0, 1, 2, 255)}
        assert manifests[split]["class_pixels"] == counts
        assert manifests[split]["skipped"] == []
    assert verify(str(tmp_path / "out")).problems == []


def test_the_fixtures_hold_every_class_and_the_hard_cases() -> None:
    """The toolkit's masks are not trivial: every class in both splits, and the star's centre filled (non-zero
    winding), so a rasterizer that gets either wrong fails the test above."""
    for split in SPLITS:
        assert set(np.unique(np.concatenate([m.ravel() for m in official_masks(split).values()]))) == {
            0,
            1,
            2,
        }
    star = official_masks("train")["0a2b7e6d-1f3c5a70"]
    assert star[45, 80] == DIRECT  # inside the pentagon where the star's edges cross
    assert star[90 - 1, 0] == BACKGROUND


def test_2018_id_maps_are_remapped_pixel_by_pixel(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    images_for(raw, "train", {"a": np.zeros((2, 4), np.uint8)})
    folder = raw / "drivable_maps/labels/train"
    folder.mkdir(parents=True)
    # The 2018 ids: 0 background, 1 direct, 2 alternative; 255 stays ignore.
    Image.fromarray(np.array([[0, 1, 2, 255], [2, 1, 0, 0]], np.uint8)).save(folder / "a_drivable_id.png")
    manifest = pack(str(raw), str(tmp_path / "out"), workers=1)["train"]
    (mask,) = packed_masks(tmp_path / "out", manifest).values()
    assert mask.tolist() == [
        [BACKGROUND, DIRECT, ALTERNATIVE, 255],
        [ALTERNATIVE, DIRECT, BACKGROUND, BACKGROUND],
    ]
    assert manifest["class_pixels"] == {"0": 2, "1": 2, "2": 3, "255": 1}


def test_a_colormap_with_a_foreign_colour_is_refused_with_its_pixel_count(tmp_path: Path) -> None:
    raw = official_tree(tmp_path / "raw", "colormaps-rgb")
    victim = raw / "labels/drivable/colormaps/train/0a0c3694-487a156f.png"
    rgb = np.array(Image.open(victim))
    rgb[:3, :4] = 255, 0, 0  # 12 pixels of a colour the palette lacks
    rgb[10, 10] = 219, 94, 87  # one off by one: what a lossy save leaves
    Image.fromarray(rgb).save(victim)
    with pytest.raises(UsageError) as error:
        pack(str(raw), str(tmp_path / "out"), workers=1)
    assert str(error.value).splitlines()[1] == (
        "labels/drivable/colormaps/train/0a0c3694-487a156f.png: has colours outside the drivable palette: "
        "(219, 94, 87) x 1 px, (255, 0, 0) x 12 px; the palette is direct (219, 94, 86), "
        "alternative (86, 211, 219), background (0, 0, 0)"
    )


def test_the_first_format_present_is_taken_unless_one_is_asked_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = official_tree(tmp_path / "raw", "rles")
    write_labels(raw, "polygons")
    write_labels(raw, "ids2018")
    with caplog.at_level(logging.INFO, logger="orchestrator.data.shards"):
        taken = pack(str(raw), str(tmp_path / "default"), workers=1)
    assert taken["val"]["labels"] == {"format": "rles", "source": "labels/drivable/rles/drivable_val.json"}
    assert (
        "val: rles labels from labels/drivable/rles/drivable_val.json; also present: ids2018, polygons "
        "(choose with --labels)" in caplog.text
    )
    asked = pack(str(raw), str(tmp_path / "asked"), workers=1, labels_format="ids2018")
    assert asked["val"]["labels"] == {"format": "ids2018", "source": "drivable_maps/labels/val"}
    assert asked["val"]["class_pixels"] == taken["val"]["class_pixels"]
    with pytest.raises(UsageError, match=r"--labels colormaps: split train has none \(looked for "):
        pack(str(raw), str(tmp_path / "none"), workers=1, labels_format="colormaps")


def test_a_split_without_labels_is_refused_unless_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = official_tree(tmp_path / "raw", "masks")
    shutil.copytree(raw / "images/100k/val", raw / "images/100k/test")
    shutil.rmtree(raw / "labels/drivable/masks/val")
    with pytest.raises(UsageError, match=r"split val has no drivable-area labels .* --splits val"):
        pack(str(raw), str(tmp_path / "out"), workers=1)
    with caplog.at_level(logging.INFO, logger="orchestrator.data.shards"):
        manifests = pack(str(raw), str(tmp_path / "out"), workers=1, splits=["train"])
    assert list(manifests) == ["train"]
    assert "pack it from its images alone with --splits" not in caplog.text  # named splits: nothing skipped


def test_the_test_split_packs_from_its_images_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    raw = official_tree(tmp_path / "raw", "polygons")
    shutil.copytree(raw / "images/100k/val", raw / "images/100k/test")
    with caplog.at_level(logging.INFO, logger="orchestrator.data.shards"):
        assert sorted(pack(str(raw), str(tmp_path / "default"), workers=1)) == ["train", "val"]
    assert f"skipping {raw}/images/100k/test: pack it from its images alone with --splits test" in caplog.text

    out = tmp_path / "out"
    manifests = pack(str(raw), str(out), workers=1, splits=["val", "test"], labels_format="polygons")
    test = manifests["test"]
    assert test["labels"] is None and test["class_pixels"] is None and test["num_samples"] == 2
    assert test["image_size"] == [1280, 720] and test["rgb_mean"] == manifests["val"]["rgb_mean"]
    with tarfile.open(out / "test" / test["shards"][0]["name"]) as tar:
        assert tar.getnames() == ["b1c66a42-6f7d68ca.jpg", "b1d0a191-2ed2269e.jpg"]
    assert verify(str(out)).problems == []
    with pytest.raises(UsageError, match="packed from its images alone"):
        evaluation_loader(str(out / "test"), batch_size=1)
    # Prediction reads it: the images in order, each with a mask of nothing labelled.
    ((images, masks),) = evaluation_loader(str(out / "test"), batch_size=2, need_labels=False)
    ((val_images, _),) = evaluation_loader(str(out / "val"), batch_size=2)
    assert torch.equal(images, val_images) and (masks == IGNORE_INDEX).all()
    with pytest.raises(UsageError, match=r"no images for split\(s\) tset under .* it has test, train, val"):
        pack(str(raw), str(out), workers=1, splits=["tset"])


def test_skip_bad_packs_the_good_samples_and_lists_every_other_file(tmp_path: Path, capsys) -> None:
    raw = official_tree(tmp_path / "raw", "polygons")
    images, polygons = raw / "images/100k/train", raw / "labels/drivable/polygons/drivable_train.json"
    (images / "0a0c3694-487a156f.jpg").write_bytes(b"not a jpeg")
    shutil.copy(images / "0a1a0b1a-5a6a5e9c.jpg", images / "ffffffff-00000000.jpg")  # no frame for it
    small = simplejpeg.encode_jpeg(np.zeros((45, 80, 3), np.uint8))
    (images / "0a3c9f1e-77b2d4e8.jpg").write_bytes(small)  # another size than the split's other images
    frames = json.loads(polygons.read_text())
    frames[1]["labels"][0]["poly2d"][0]["types"] = "LCC"  # 7 vertices
    frames.append({"name": "eeeeeeee-00000000.jpg", "labels": []})  # no image for it
    polygons.write_text(json.dumps(frames))

    expected = [
        ("ffffffff-00000000", "images/100k/train/ffffffff-00000000.jpg",
         "no label in labels/drivable/polygons/drivable_train.json"),
        ("eeeeeeee-00000000", "labels/drivable/polygons/drivable_train.json",
         "no image images/100k/train/eeeeeeee-00000000.jpg"),
        ("0a0c3694-487a156f", "images/100k/train/0a0c3694-487a156f.jpg",
         "image does not decode as JPEG (tjDecompressHeader3(): Could not determine subsampling level of "
         "JPEG image)"),
        ("0a0eaeaf-9ad0c6dd", "labels/drivable/polygons/drivable_train.json",
         "frame 0a0eaeaf-9ad0c6dd.jpg: label 0: types 'LCC' for 7 vertices: "
         "want one 'L' or 'C' per finite vertex"),
        ("0a3c9f1e-77b2d4e8", "images/100k/train/0a3c9f1e-77b2d4e8.jpg",
         "image is 80x45, most of the split's images are 160x90"),
    ]  # fmt: skip
    with pytest.raises(UsageError) as refused:  # the default: nothing packed, every problem listed
        pack(str(raw), str(tmp_path / "out"), shard_size=2, workers=1)
    assert str(refused.value).splitlines()[1:] == [f"{f}: {r}" for _, f, r in expected[:4]] + [
        "train: images differ in size (width, height): [[80, 45], [160, 90]]"
    ]
    assert not (tmp_path / "out/train/manifest.json").exists()

    out = tmp_path / "out"
    assert (
        main(["data", "pack", str(raw), str(out), "--shard-size", "2", "--workers", "1", "--skip-bad"]) == 0
    )
    manifest = json.loads((out / "train/manifest.json").read_text())
    assert [(r["id"], r["file"], r["reason"]) for r in manifest["skipped"]] == expected
    assert [i for s in manifest["shards"] for i in s["ids"]] == ["0a1a0b1a-5a6a5e9c", "0a2b7e6d-1f3c5a70"]
    assert manifest["num_samples"] == 2 and manifest["image_size"] == [160, 90]
    assert (
        packed_masks(out, manifest)["0a2b7e6d-1f3c5a70"].tolist()
        == official_masks("train")["0a2b7e6d-1f3c5a70"].tolist()
    )
    assert verify(str(out)).problems == []
    loaded = [mask for _, mask in evaluation_loader(str(out / "train"), batch_size=1)]  # one shard is empty
    assert [m.shape for m in loaded] == [(1, 90, 160)] * 2
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == (
        f"train: 2 samples in 3 shards -> {out}/train (polygons labels from "
        "labels/drivable/polygons/drivable_train.json)"
    )
    assert printed[1] == "train: left out (listed in its manifest's 'skipped'): 5 problem(s)"
    assert printed[2:7] == [f"{f}: {r}" for _, f, r in expected]
