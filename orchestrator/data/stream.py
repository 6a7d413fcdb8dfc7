"""Stream (image, mask) batches from tar shards, split across DDP ranks and DataLoader workers.

The split happens twice with the same two functions (`bounds` cuts a count into contiguous ranges, `take`
maps a sample range onto shard pieces): the epoch's shard sequence is cut into one range per rank, and a
rank's range into one per worker. Each reader opens only the shards its range overlaps, so nothing is
downloaded twice or in advance.
"""

from __future__ import annotations

import math
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from orchestrator.data.shards import decode_pair, read_manifest
from orchestrator.data.storage import join, url_to_fs
from orchestrator.data.transforms import train_transform, val_transform

SHUFFLE_BUFFER = 256  # encoded samples per worker (~40 MB at 1280x720); decoded would be ~14x larger
_BLOCK_SIZE = 32 << 20  # one GET per shard; cache_type "none" would cost ~9 range GETs per member


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard; `shard` is its manifest index, stable across epochs and splits."""

    shard: int
    name: str
    start: int
    stop: int


def bounds(total: int, parts: int, index: int) -> tuple[int, int]:
    """The index-th of `parts` contiguous ranges of range(total); sizes differ by at most one."""
    return total * index // parts, total * (index + 1) // parts


def take(pieces: list[Piece], start: int, stop: int) -> list[Piece]:
    """The pieces covering samples [start, stop) of the concatenation of `pieces`."""
    out, offset = [], 0
    for piece in pieces:
        size = piece.stop - piece.start
        lo, hi = max(start - offset, 0), min(stop - offset, size)
        if lo < hi:
            out.append(replace(piece, start=piece.start + lo, stop=piece.start + hi))
        offset += size
    return out


@dataclass
class ShardStream(IterableDataset):
    """One rank's samples for one epoch; each DataLoader worker streams its own contiguous part."""

    url: str
    pieces: list[Piece]
    num_samples: int
    num_batches: int
    batch_size: int
    train: bool
    crop: tuple[int, int]
    scale: tuple[float, float]
    seed: int
    epoch: int
    rank: int
    storage_options: dict | None = field(default=None, repr=False)  # may hold credentials

    def worker_pieces(self, worker: int, workers: int) -> list[Piece]:
        # Workers split whole batches, not samples: each worker's DataLoader batches are then full, so the
        # rank yields exactly num_batches with at most one partial (validation) batch.
        lo, hi = bounds(self.num_batches, workers, worker)
        return take(self.pieces, lo * self.batch_size, min(hi * self.batch_size, self.num_samples))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # The filesystem is made here, inside the worker: a client built before fork is not safe to share.
        fs, root = url_to_fs(self.url, self.storage_options)
        samples = (
            s for p in self.worker_pieces(worker, workers) for s in _read_piece(fs, join(root, p.name), p)
        )
        if not self.train:
            for _, _, jpg, png in samples:
                yield val_transform(*decode_pair(jpg, png, check_labels=False))
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        for shard, index, jpg, png in _shuffled(samples, SHUFFLE_BUFFER, rng):
            # Seeded by the sample itself, so its augmentation does not depend on world size or workers.
            sample_rng = np.random.default_rng([self.seed, self.epoch, shard, index])
            yield train_transform(
                *decode_pair(jpg, png, check_labels=False), self.crop, sample_rng, self.scale
            )


@dataclass
class Loader:
    """One rank's batches for one epoch: iterable over (images [B,3,H,W] float32, masks [B,H,W] int64)."""

    dataloader: DataLoader
    num_batches: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.dataloader)

    def __len__(self) -> int:
        return self.num_batches


def make_loader(
    url: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    train: bool,
    crop: tuple[int, int] | None,
    epoch: int,
    seed: int,
    num_workers: int = 0,
    scale: tuple[float, float] = (0.5, 2.0),
    storage_options: dict | None = None,
) -> Loader:
    """A loader over the packed split at url (e.g. s3://bucket/shards/train) for this rank and epoch.

    Training: shard order shuffled by (seed, epoch), the same on every rank; shuffle buffer; augmentation;
    every rank yields exactly N // world_size // batch_size full batches, as DDP needs. crop=(width,
    height), None = the image size. Validation: manifest order, whole images, each rank yields all samples
    of its range (ranges differ by at most one sample), the last batch may be partial.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    manifest = read_manifest(url, storage_options)
    total = manifest["num_samples"]
    shards = [Piece(i, s["name"], 0, s["num_samples"]) for i, s in enumerate(manifest["shards"])]
    start, stop = bounds(total, world_size, rank)
    if train:
        shards = [shards[i] for i in np.random.default_rng([seed, epoch]).permutation(len(shards))]
        num_batches = total // world_size // batch_size
        if num_batches == 0:
            raise ValueError(
                f"{url} has {total} samples: too few for world_size {world_size} x batch_size {batch_size}"
            )
        stop = start + num_batches * batch_size  # drop_last, the same count on every rank
    else:
        num_batches = math.ceil((stop - start) / batch_size)
    stream = ShardStream(
        url=url,
        pieces=take(shards, start, stop),
        num_samples=stop - start,
        num_batches=num_batches,
        batch_size=batch_size,
        train=train,
        crop=tuple(crop or manifest["image_size"]),
        scale=scale,
        seed=seed,
        epoch=epoch,
        rank=rank,
        storage_options=storage_options,
    )
    return Loader(DataLoader(stream, batch_size=batch_size, num_workers=num_workers), num_batches)


def evaluation_loader(url: str, *, batch_size: int, storage_options: dict | None = None) -> Loader:
    """Every sample of a split, in order, whole images, in one process: evaluation outside training."""
    return make_loader(
        url,
        batch_size=batch_size,
        rank=0,
        world_size=1,
        train=False,
        crop=None,
        epoch=0,
        seed=0,
        storage_options=storage_options,
    )


def _read_piece(
    fs: fsspec.AbstractFileSystem, path: str, piece: Piece
) -> Iterator[tuple[int, int, bytes, bytes]]:
    """(shard, index, jpg, png) for samples [piece.start, piece.stop) of one shard, in one streaming pass."""
    with (
        fs.open(path, "rb", block_size=_BLOCK_SIZE, cache_type="readahead") as f,
        tarfile.open(fileobj=f, mode="r|") as tar,
    ):
        index, image = 0, None
        for member in tar:
            stem, ext = _member_name(path, member)
            wanted = index >= piece.start  # earlier members are skipped unread
            data = tar.extractfile(member).read() if wanted else b""
            if ext == ".jpg":
                image = (stem, data)
                continue
            if image is None or image[0] != stem:
                raise ValueError(f"{path}: {member.name} does not follow {stem}.jpg")
            if wanted:
                yield piece.shard, index, image[1], data
            image, index = None, index + 1
            if index == piece.stop:
                return
    raise ValueError(f"{path} holds {index} samples, its manifest entry needs {piece.stop}")


def _member_name(path: str, member: tarfile.TarInfo) -> tuple[str, str]:
    stem, ext = posixpath.splitext(member.name)
    if not member.isfile() or "/" in member.name or stem in ("", ".", "..") or ext not in (".jpg", ".png"):
        raise ValueError(
            f"{path}: member {member.name!r} is not a plain <id>.jpg or <id>.png "
            "(absolute paths, '..', folders and other files are refused)"
        )
    return stem, ext


def _shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Items in a random order, holding at most `size` of them at a time."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.integers(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer
