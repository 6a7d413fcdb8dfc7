"""Streaming loaders over local and S3 shards: rank/worker partition, equal DDP batch counts, seeding."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from orchestrator.data import layout
from orchestrator.data.shards import FORMAT, pack
from orchestrator.data.stream import make_loader
from orchestrator.data.synth import synthesize
from orchestrator.data.transforms import IMAGENET_MEAN as MEAN
from orchestrator.data.transforms import IMAGENET_STD as STD
from orchestrator.data.transforms import normalize

TRAIN, VAL, SIZE, SHARD = 22, 13, (64, 36), 5  # shards of 5 so ranges start and end inside shards


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    synthesize(str(root), train=TRAIN, val=VAL, size=SIZE, seed=3)
    return root


@pytest.fixture(scope="module")
def local_shards(raw: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("shards"))
    pack(str(raw), out, shard_size=SHARD)
    return out


def _key(image: np.ndarray, mask: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes() + mask.tobytes()).hexdigest()


def _source_keys(raw: Path, split: str) -> Counter:
    """Samples identified by content, decoded straight from the BDD layout."""
    keys = Counter()
    for sample_id in sorted(p.stem for p in (raw / "images/100k" / split).iterdir()):
        image = simplejpeg.decode_jpeg(Path(layout.image_path(str(raw), split, sample_id)).read_bytes())
        mask = np.asarray(Image.open(layout.mask_path(str(raw), split, sample_id)))
        keys[_key(image, mask)] += 1
    return keys


def _loaded_keys(loader) -> Counter:
    """Undo normalization back to uint8 and identify each loaded sample by content."""
    keys, batches = Counter(), 0
    std, mean = torch.tensor(STD).view(1, 3, 1, 1), torch.tensor(MEAN).view(1, 3, 1, 1)
    for images, masks in loader:
        batches += 1
        pixels = ((images * std + mean) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        for image, mask in zip(pixels.numpy(), masks.to(torch.uint8).numpy(), strict=True):
            keys[_key(np.ascontiguousarray(image), mask)] += 1
    assert batches == len(loader)
    return keys


def _val_keys_over_ranks(url: str, storage_options: dict | None, world_size: int = 2) -> Counter:
    keys = Counter()
    for rank in range(world_size):
        loader = make_loader(
            url, batch_size=3, rank=rank, world_size=world_size, train=False, crop=None, epoch=0, seed=0,
            num_workers=2, storage_options=storage_options,
        )  # fmt: skip
        keys += _loaded_keys(loader)
    return keys


def _train_batches(
    url: str, rank: int, epoch: int, seed: int = 0, storage_options: dict | None = None
) -> list:
    loader = make_loader(
        url, batch_size=4, rank=rank, world_size=2, train=True, crop=(48, 32), epoch=epoch, seed=seed,
        num_workers=2, storage_options=storage_options,
    )  # fmt: skip
    batches = list(loader)
    assert len(batches) == len(loader) == TRAIN // 2 // 4
    for images, masks in batches:
        assert images.shape == (4, 3, 32, 48) and images.dtype == torch.float32
        assert masks.shape == (4, 32, 48) and masks.dtype == torch.int64
        assert set(masks.unique().tolist()) <= {0, 1, 2, 255}
    return batches


def _same(a: list, b: list) -> bool:
    pairs = zip(a, b, strict=False)  # lengths compared first
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in pairs
    )


def test_validation_reads_every_sample_once_across_ranks(raw: Path, local_shards: str) -> None:
    expected = _source_keys(raw, "val")
    assert sum(expected.values()) == VAL
    assert _val_keys_over_ranks(f"{local_shards}/val", None) == expected


def test_validation_lengths_and_partial_batch(local_shards: str) -> None:
    # 13 samples over 2 ranks: ranges of 6 and 7; batches of 3 -> 2 and 3 batches, rank 1's last holds one.
    sizes = []
    for rank in range(2):
        loader = make_loader(
            f"{local_shards}/val", batch_size=3, rank=rank, world_size=2, train=False, crop=None, epoch=0,
            seed=0, num_workers=2,
        )  # fmt: skip
        batches = [tuple(images.shape) for images, _ in loader]
        assert len(batches) == len(loader)
        assert all(shape[1:] == (3, SIZE[1], SIZE[0]) for shape in batches)
        sizes.append(sorted(shape[0] for shape in batches))
    assert sizes == [[3, 3], [1, 3, 3]]


@pytest.mark.parametrize("split", ["train", "val"])
def test_workers_hand_over_uint8_and_the_loader_normalizes(local_shards: str, split: str) -> None:
    loader = make_loader(
        f"{local_shards}/{split}", batch_size=2, rank=0, world_size=1, train=split == "train",
        crop=(48, 32) if split == "train" else None, epoch=0, seed=0, num_workers=1,
    )  # fmt: skip
    handed = next(iter(loader.dataloader))  # what crossed the process boundary
    assert handed["image"].dtype == handed["mask"].dtype == torch.uint8
    images, masks = next(iter(loader))
    assert images.dtype == torch.float32 and masks.dtype == torch.int64
    assert torch.equal(images, normalize(handed["image"], loader.dataloader.dataset.mean_std))
    assert torch.equal(masks, handed["mask"].long())


def test_training_equal_lengths_and_seeding(local_shards: str) -> None:
    url = f"{local_shards}/train"
    ranks = [_train_batches(url, rank, epoch=0) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    assert _same(_train_batches(url, 0, epoch=0), ranks[0])
    assert not _same(_train_batches(url, 0, epoch=1), ranks[0])
    assert not _same(_train_batches(url, 0, epoch=0, seed=1), ranks[0])
    assert not _same(ranks[1], ranks[0])


def _write_fake_split(root: Path, sizes: list[int]) -> str:
    shards = [
        {"name": f"shard-{i:06d}.tar", "num_samples": n, "bytes": 0, "sha256": ""}
        for i, n in enumerate(sizes)
    ]
    manifest = {
        "format": FORMAT,
        "split": "train",
        "num_samples": sum(sizes),
        "image_size": [8, 8],
        "shards": shards,
    }
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [1, 2, 3])
@pytest.mark.parametrize("train", [False, True])
def test_plan_partitions_samples_over_ranks_and_workers(
    tmp_path: Path, world_size: int, num_workers: int, train: bool
) -> None:
    # The plan alone (no shard is opened): which (shard, index) each rank's workers will read.
    sizes, batch = [5, 3, 8, 1, 7, 6], 3
    url = _write_fake_split(tmp_path / "split", sizes)
    total, seen, lengths = sum(sizes), Counter(), []
    for rank in range(world_size):
        loader = make_loader(
            url, batch_size=batch, rank=rank, world_size=world_size, train=train, crop=None, epoch=4, seed=1,
        )  # fmt: skip
        stream = loader.dataloader.dataset
        rank_samples, batches = 0, 0
        for worker in range(num_workers):
            pieces = stream.worker_pieces(worker, num_workers)
            count = sum(p.stop - p.start for p in pieces)
            assert all(0 <= p.start < p.stop <= sizes[p.shard] for p in pieces)
            assert not train or count % batch == 0  # full batches only
            seen.update((p.shard, i) for p in pieces for i in range(p.start, p.stop))
            rank_samples += count
            batches += math.ceil(count / batch)
        assert batches == len(loader)
        lengths.append(rank_samples)
    assert max(seen.values()) == 1  # no sample read twice
    if train:
        assert lengths == [total // world_size // batch * batch] * world_size
    else:
        assert sum(lengths) == total == len(seen) and max(lengths) - min(lengths) <= 1


def test_training_shard_order_follows_seed_and_epoch(tmp_path: Path) -> None:
    url = _write_fake_split(tmp_path / "split", [4] * 8)

    def rank_shards(rank: int, epoch: int, seed: int = 0) -> list[int]:
        loader = make_loader(
            url, batch_size=2, rank=rank, world_size=2, train=True, crop=None, epoch=epoch, seed=seed
        )
        return [p.shard for p in loader.dataloader.dataset.pieces]

    assert rank_shards(0, epoch=3) == rank_shards(0, epoch=3)
    assert len({tuple(rank_shards(0, epoch)) for epoch in range(4)}) > 1
    assert rank_shards(0, epoch=0) != rank_shards(0, epoch=0, seed=1)
    # Ranks agree on the order, so their shards never overlap.
    assert sorted(rank_shards(0, 5) + rank_shards(1, 5)) == list(range(8))


def test_training_with_too_little_data_fails_clearly(tmp_path: Path) -> None:
    url = _write_fake_split(tmp_path / "split", [5])
    with pytest.raises(ValueError, match="too few"):
        make_loader(url, batch_size=4, rank=0, world_size=2, train=True, crop=None, epoch=0, seed=0)


@pytest.mark.parametrize("name", ["../evil.jpg", "/etc/evil.jpg", "sub/x.jpg", "x.txt"])
def test_unsafe_member_names_are_refused(tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    url = _write_fake_split(tmp_path / "split", [1])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member in (name, "x.png"):
            info = tarfile.TarInfo(member)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "split" / "shard-000000.tar").write_bytes(buf.getvalue())
    loader = make_loader(url, batch_size=1, rank=0, world_size=1, train=False, crop=None, epoch=0, seed=0)
    ((_, mask),) = list(loader)
    assert loader.skipped == 1 and bool((mask == 255).all())  # an all-ignore placeholder, counted
    assert f"members {name!r} + 'x.png' refused" in caplog.text


@pytest.fixture
def s3_shards(raw: Path, s3_server, s3_bucket: str) -> str:
    url = f"s3://{s3_bucket}/shards"
    pack(str(raw), url, shard_size=SHARD, storage_options=s3_server.storage_options)
    return url


@pytest.mark.slow
def test_s3_streaming_matches_local(raw: Path, local_shards: str, s3_server, s3_shards: str) -> None:
    options = s3_server.storage_options
    assert _val_keys_over_ranks(f"{s3_shards}/val", options) == _source_keys(raw, "val")
    for rank in range(2):
        assert _same(
            _train_batches(f"{s3_shards}/train", rank, epoch=2, storage_options=options),
            _train_batches(f"{local_shards}/train", rank, epoch=2),
        )


@pytest.mark.slow
def test_s3_training_epoch_reads_each_sample_once_over_ranks_and_workers(
    raw: Path, s3_server, s3_shards: str
) -> None:
    # With augmentation left to the device, the workers' batches hold the decoded samples themselves.
    source, seen = _source_keys(raw, "train"), Counter()
    for rank in range(2):
        loader = make_loader(
            f"{s3_shards}/train", batch_size=2, rank=rank, world_size=2, train=True, crop=(48, 32), epoch=3,
            seed=0, num_workers=2, augment_on_device=True, storage_options=s3_server.storage_options,
        )  # fmt: skip
        for batch in loader.dataloader:
            for image, mask in zip(
                batch["image"].permute(0, 2, 3, 1).numpy(), batch["mask"].numpy(), strict=True
            ):
                seen[_key(np.ascontiguousarray(image), mask)] += 1
    assert sum(seen.values()) == TRAIN // 2 // 2 * 2 * 2  # drop_last: 20 of the 22
    assert max(seen.values()) == 1 and set(seen) <= set(source)


@pytest.mark.slow
def test_s3_endpoint_from_environment(
    raw: Path, s3_server, s3_shards: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    assert _val_keys_over_ranks(f"{s3_shards}/val", None) == _source_keys(raw, "val")


@pytest.mark.slow
def test_synthesize_and_pack_directly_on_s3(s3_server, s3_bucket: str) -> None:
    options = s3_server.storage_options
    synthesize(f"s3://{s3_bucket}/raw", train=3, val=2, size=(32, 18), storage_options=options)
    manifests = pack(
        f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/shards", shard_size=2, storage_options=options
    )
    assert {s: m["num_samples"] for s, m in manifests.items()} == {"train": 3, "val": 2}
    loader = make_loader(
        f"s3://{s3_bucket}/shards/val", batch_size=2, rank=0, world_size=1, train=False, crop=None, epoch=0,
        seed=0, storage_options=options,
    )  # fmt: skip
    assert [tuple(m.shape) for _, m in loader] == [(2, 18, 32)]
