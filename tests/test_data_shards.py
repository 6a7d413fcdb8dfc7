"""Packing the layout into tar shards: manifest counts and checksums, pair adjacency, failure modes."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from orchestrator.data import shards
from orchestrator.data.shards import pack, read_manifest
from orchestrator.data.synth import synthesize


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    synthesize(str(tmp_path / "raw"), train=5, val=3, size=(64, 36), seed=2)
    return tmp_path / "raw"


def test_pack_writes_shards_and_manifests(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    manifests = pack(str(raw), f"file://{out}", shard_size=2)
    assert sorted(manifests) == ["train", "val"]
    for split, expected_sizes in (("train", [2, 2, 1]), ("val", [2, 1])):
        manifest = manifests[split]
        assert json.loads((out / split / "manifest.json").read_text()) == manifest
        assert read_manifest(str(out / split)) == manifest
        assert manifest["format"] == "orchestrator-shards/1" and manifest["split"] == split
        assert manifest["image_size"] == [64, 36]
        assert [s["num_samples"] for s in manifest["shards"]] == expected_sizes
        assert manifest["num_samples"] == sum(expected_sizes)
        assert [s["name"] for s in manifest["shards"]] == [
            f"shard-{i:06d}.tar" for i in range(len(expected_sizes))
        ]
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(
            ["manifest.json"] + [s["name"] for s in manifest["shards"]]
        )

        ids = sorted(p.stem for p in (raw / "images/100k" / split).iterdir())
        members = []
        for entry in manifest["shards"]:
            data = (out / split / entry["name"]).read_bytes()
            assert entry["bytes"] == len(data)
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
            with tarfile.open(out / split / entry["name"]) as tar:
                for member in tar.getmembers():
                    members.append((member.name, tar.extractfile(member).read()))
        # Sorted ids, each image immediately followed by its mask, bytes unchanged.
        assert [name for name, _ in members] == [f"{i}{ext}" for i in ids for ext in (".jpg", ".png")]
        for name, data in members:
            folder = "images/100k" if name.endswith(".jpg") else "labels/drivable/masks"
            assert data == (raw / folder / split / name).read_bytes()


def test_pack_is_byte_reproducible(raw: Path, tmp_path: Path) -> None:
    first = pack(str(raw), str(tmp_path / "a"), shard_size=4)
    second = pack(str(raw), str(tmp_path / "b"), shard_size=4)
    assert first == second


@pytest.mark.parametrize("missing", ["mask", "image"])
def test_pack_refuses_unpaired_samples(raw: Path, tmp_path: Path, missing: str) -> None:
    victim = sorted(p.stem for p in (raw / "images/100k/val").iterdir())[1]
    if missing == "mask":
        (raw / "labels/drivable/masks/val" / f"{victim}.png").unlink()
    else:
        (raw / "images/100k/val" / f"{victim}.jpg").unlink()
    with pytest.raises(ValueError, match=victim):
        pack(str(raw), str(tmp_path / "shards"))


def test_manifest_is_written_after_the_shards(
    raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_tar = shards._tar

    def failing_tar(members: list[tuple[str, bytes]]) -> bytes:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_tar(members)

    monkeypatch.setattr(shards, "_tar", failing_tar)
    with pytest.raises(OSError, match="disk full"):
        pack(str(raw), str(tmp_path / "shards"), shard_size=2)
    assert (tmp_path / "shards/train/shard-000000.tar").exists()
    assert not (tmp_path / "shards/train/manifest.json").exists()


def test_read_manifest_errors_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pack"):
        read_manifest(str(tmp_path / "nowhere" / "train"))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ValueError, match="other/9"):
        read_manifest(str(tmp_path))


def test_pack_without_any_split_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="images/100k"):
        pack(str(tmp_path), str(tmp_path / "out"))
