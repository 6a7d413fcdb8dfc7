"""Stream (image, mask) batches from tar shards, split across DDP ranks and DataLoader workers.

The split happens twice with the same two functions (`bounds` cuts a count into contiguous ranges, `take`
maps a sample range onto shard pieces): the epoch's shard sequence is cut into one range per rank, and a
rank's range into one per worker. Each reader opens only the shards its range overlaps, so nothing is
downloaded twice or in advance.

Three promises hold whatever the data or the network do:
- every rank yields exactly `num_batches` batches (DDP hangs otherwise): a sample that cannot be read is
  replaced by another of the same worker (training) or by an all-ignore placeholder (validation), and
  flagged, so the trainer counts it;
- a loader started at batch k yields exactly what an uninterrupted one yields from batch k on, without
  decoding the first k (resuming a checkpoint taken mid-epoch neither replays nor skips a sample);
- a transient read error (reset, timeout, 5xx) reopens the shard after a backoff and resumes at the
  sample it stopped at.
"""

from __future__ import annotations

import itertools
import logging
import math
import posixpath
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from orchestrator.data.layout import IGNORE_INDEX
from orchestrator.data.resample import repeated, split_ids
from orchestrator.data.shards import decode_image, decode_pair, is_labeled, read_manifest
from orchestrator.data.transforms import (
    IMAGENET,
    MeanStd,
    augment,
    augment_batch,
    draw_aug,
    normalize,
    to_chw,
)
from orchestrator.errors import UsageError
from orchestrator.spec import DataSpec, TrainSpec
from orchestrator.storage import RETRIES, backoff, is_transient, join, url_to_fs

SHUFFLE_BUFFER = 256  # encoded samples per worker (~40 MB at 1280x720); decoded would be ~14x larger
_BLOCK_SIZE = 32 << 20  # one GET per shard; cache_type "none" would cost ~9 range GETs per member

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """Positions [start, stop) of one shard's epoch order; `shard` is its manifest index, stable across
    epochs and splits. The order is the shard's samples in member order, each once, or as many times as
    train.sample_weights_from says (0: dropped); a position names one copy of a sample."""

    shard: int
    name: str
    start: int
    stop: int
    order: tuple[int, ...] | None = None  # the sample at each position; None: position p is sample p

    def sample(self, position: int) -> int:
        return position if self.order is None else self.order[position]


class Encoded(NamedTuple):
    """One sample as read from a shard: its bytes, or (jpg=None) why it could not be read."""

    shard: int
    index: int  # its position in the shard's epoch order (the sample's index when nothing is repeated)
    name: str  # "<shard path>:<sample id>", for the log
    jpg: bytes | None
    png: bytes | str | None  # the mask bytes, or the problem; None in an unlabeled split


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


def delivered(counts: list[int], consumed: int) -> tuple[list[int], int]:
    """(batches each DataLoader worker had delivered, the worker asked next) once `consumed` were taken.

    A DataLoader over an iterable dataset asks its workers for batches round-robin, from worker 0, and
    passes over a worker once it is exhausted; `counts` are the workers' batch counts."""
    taken, worker = [0] * len(counts), 0
    for _ in range(consumed):
        while taken[worker] == counts[worker]:
            worker = (worker + 1) % len(counts)
        taken[worker] += 1
        worker = (worker + 1) % len(counts)
    return taken, worker


@dataclass
class ShardStream(IterableDataset):
    """One rank's samples for one epoch; each DataLoader worker streams its own contiguous part.

    Yields dicts (collated by the DataLoader): "image" uint8 [3, h, w], "mask" uint8 [h, w], "problem"
    (why the sample it stands in for could not be read; "" for a sample that was read) and, when
    augmentation is left to the training device, "aug" (the sample's random draws) with the decoded image
    and mask. Nothing is normalized here: uint8 crosses the process boundary (a quarter of float32's
    bytes) and the Loader normalizes on the device."""

    url: str
    pieces: list[Piece]
    num_samples: int
    num_batches: int
    batch_size: int
    train: bool
    image_size: tuple[int, int]  # (width, height): every sample of the split has it
    crop: tuple[int, int]
    scale: tuple[float, float]
    blur: tuple[float, float]  # (probability, max sigma)
    mean_std: MeanStd
    seed: int
    epoch: int
    rank: int
    start_batch: int = 0  # batches of this rank's epoch already consumed
    on_device: bool = False  # ship uint8 + draws; the Loader augments on the training device
    labeled: bool = True  # False: shards of images alone, each yielded with an all-ignore mask
    storage_options: dict | None = field(default=None, repr=False)  # may hold credentials

    def worker_batches(self, worker: int, workers: int) -> tuple[int, int]:
        # Workers split whole batches, not samples: each worker's DataLoader batches are then full, so the
        # rank yields exactly num_batches with at most one partial (validation) batch.
        return bounds(self.num_batches, workers, worker)

    def worker_pieces(self, worker: int, workers: int) -> list[Piece]:
        lo, hi = self.worker_batches(worker, workers)
        return take(self.pieces, lo * self.batch_size, min(hi * self.batch_size, self.num_samples))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        counts = [hi - lo for lo, hi in (self.worker_batches(w, workers) for w in range(workers))]
        taken, next_worker = delivered(counts, self.start_batch)
        # A resumed DataLoader asks its worker 0 first: that process plays the part that was asked next.
        worker = ((info.id if info else 0) + next_worker) % workers
        # The filesystem is made here, inside the worker: a client built before fork is not safe to share.
        fs, root = url_to_fs(self.url, self.storage_options)
        members = 2 if self.labeled else 1
        samples: Iterable[Encoded] = (
            s
            for p in self.worker_pieces(worker, workers)
            for s in _read_piece(fs, join(root, p.name), p, members)
        )
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
            samples = _shuffled(samples, SHUFFLE_BUFFER, rng)
        # Samples before the resume point are passed over undecoded; the shuffle, the per-sample seeds and
        # the stand-in rule make the rest exactly what an uninterrupted epoch yields.
        skip = taken[worker] * self.batch_size
        if self.train:
            yield from _stand_ins(samples, skip, self._decode, self._train_item)
            return
        for sample in itertools.islice(samples, skip, None):
            pair = self._decode(sample)
            if isinstance(pair, str):
                log.warning("skipping %s: %s", sample.name, pair)
                yield self._placeholder(pair)
            else:
                yield self._decoded_item(*pair)

    def _decode(self, sample: Encoded) -> tuple[np.ndarray, np.ndarray] | str:
        """(image, mask), or why the sample cannot be used."""
        if sample.jpg is None:
            return sample.png
        try:
            if sample.png is None:
                image = decode_image(sample.jpg)
                mask = np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
            else:
                image, mask = decode_pair(sample.jpg, sample.png, check_labels=False)
        except ValueError as e:
            return str(e)
        if (image.shape[1], image.shape[0]) != self.image_size:
            return f"image shape {image.shape}, the split's images are {self.image_size} (w, h)"
        return image, mask

    def _train_item(self, sample: Encoded, image: np.ndarray, mask: np.ndarray, problem: str) -> dict:
        # Seeded by the sample itself, so its augmentation does not depend on world size or workers.
        rng = np.random.default_rng([self.seed, self.epoch, sample.shard, sample.index])
        aug = draw_aug(rng, mask.shape, self.crop, self.scale, *self.blur)
        if self.on_device:
            return self._decoded_item(image, mask, problem) | {"aug": aug.as_tensor()}
        x, y = augment(to_chw(image), torch.from_numpy(mask), aug, self.crop, self.mean_std)
        return {"image": x, "mask": y, "problem": problem}

    def _decoded_item(self, image: np.ndarray, mask: np.ndarray, problem: str = "") -> dict:
        return {"image": to_chw(image), "mask": torch.from_numpy(mask), "problem": problem}

    def _placeholder(self, problem: str) -> dict:
        """An all-ignore sample in place of an unreadable one: scored nowhere, counted as skipped."""
        width, height = self.image_size
        return self._decoded_item(
            np.zeros((height, width, 3), np.uint8), np.full((height, width), IGNORE_INDEX, np.uint8), problem
        )


def _stand_ins(
    samples: Iterable[Encoded],
    skip: int,
    decode: Callable[[Encoded], tuple[np.ndarray, np.ndarray] | str],
    item: Callable[[Encoded, np.ndarray, np.ndarray, str], dict],
) -> Iterator[dict]:
    """One item per sample after the first `skip`, in order. An unreadable sample is stood in for by the
    next readable one (at the end of the stream: the last one before it), augmented with the unreadable
    sample's own draws, and flagged. The rule looks at the stream alone, never at where reading began,
    and output i always flags sample i: a resumed epoch yields the same items and the same count."""
    samples = iter(samples)
    passed = deque(itertools.islice(samples, skip), maxlen=64)  # undecoded; kept for a trailing stand-in
    owed, last = [], None
    for sample in samples:
        pair = decode(sample)
        if isinstance(pair, str):
            owed.append((sample, pair))
            continue
        yield from _stand_in(owed, pair, item)
        last = pair
        yield item(sample, *pair, "")
    if owed:
        readable = (p for p in map(decode, reversed(passed)) if not isinstance(p, str))
        last = last or next(readable, None)
        if last is None:
            raise RuntimeError(f"none of the samples of this data loader worker could be read: {owed[0][1]}")
        yield from _stand_in(owed, last, item)


def _stand_in(owed: list, pair: tuple[np.ndarray, np.ndarray], item: Callable) -> Iterator[dict]:
    for sample, problem in owed:
        log.warning("skipping %s: %s", sample.name, problem)
        yield item(sample, *pair, problem)
    owed.clear()


@dataclass
class Loader:
    """One rank's batches for one epoch: (images [B,3,H,W] float32, masks [B,H,W] int64) on `device`,
    from `start_batch` on. `unreadable` holds the samples stood in for so far: their position among the
    samples yielded, and why each could not be read."""

    dataloader: DataLoader
    num_batches: int
    device: torch.device = torch.device("cpu")
    raw: bool = False  # uint8 images: the caller normalizes (models trained with different mean/std)
    unreadable: dict[int, str] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return len(self.unreadable)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream: ShardStream = self.dataloader.dataset
        position = 0
        for batch in self.dataloader:
            # Recorded before the batch is yielded, so whoever takes it can tell which images stand in.
            problems = batch["problem"]
            self.unreadable.update((position + i, p) for i, p in enumerate(problems) if p)
            position += len(problems)
            images = batch["image"].to(self.device, non_blocking=True)
            masks = batch["mask"].to(self.device, non_blocking=True)
            if "aug" in batch:
                images, masks = augment_batch(images, masks, batch["aug"], stream.crop, stream.mean_std)
            if not self.raw:
                images = normalize(images, stream.mean_std)
            yield images, masks.long()

    def __len__(self) -> int:
        """Batches still to come (the epoch's, less those consumed before a resume)."""
        return self.num_batches - self.dataloader.dataset.start_batch


@dataclass
class Passes:
    """One rank's training batches from batch `start` of an endless run of passes over the split, each
    pass its own loader (`open_pass(pass, start_batch)`: shuffled by its index) of `per_pass` batches: an
    epoch of a steps or images budget, which may end inside a pass or span several. `skipped` counts the
    stand-ins of every pass it opened."""

    open_pass: Callable[[int, int], Loader]
    per_pass: int
    start: int
    opened: list[Loader] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return sum(loader.skipped for loader in self.opened)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        first, batch = divmod(self.start, self.per_pass)
        for index in itertools.count(first):
            self.opened.append(self.open_pass(index, batch))
            yield from self.opened[-1]
            batch = 0


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
    blur: tuple[float, float] = (0.5, 1.0),
    mean_std: MeanStd = IMAGENET,
    start_batch: int = 0,
    device: torch.device | None = None,
    augment_on_device: bool = False,
    repeats: Mapping[str, int] | None = None,
    part: tuple[int, int] | None = None,
    need_labels: bool = True,
    storage_options: dict | None = None,
) -> Loader:
    """A loader over the packed split at url (e.g. s3://bucket/shards/train) for this rank and epoch.

    Training: shard order shuffled by (seed, epoch), the same on every rank; shuffle buffer; augmentation
    (random scale, crop=(width, height), flip, blur=(probability, max sigma)), on the CPU workers or, with
    augment_on_device, on `device`; every rank yields exactly N // world_size // batch_size full batches,
    as DDP needs. Validation: manifest order, whole images, each rank yields all samples of its range
    (ranges differ by at most one sample), the last batch may be partial. start_batch resumes an epoch.
    repeats: training copies per sample id (0 drops a sample; ids not named are read once), from
    `data.resample.sample_repeats`; the split then works on the copies as it does on the samples.
    part: validation of part (index, parts) of the split's whole batches (part_samples) instead of this
    rank's range.
    need_labels=False reads a split packed from its images alone, every mask all IGNORE_INDEX.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    manifest = read_manifest(url, storage_options)
    labeled = is_labeled(manifest)
    if need_labels and not labeled:
        raise UsageError(
            f"{url} was packed from its images alone (unlabeled): there is nothing to train on or score"
        )
    if repeats is None or not train:
        shards = [Piece(i, s["name"], 0, s["num_samples"]) for i, s in enumerate(manifest["shards"])]
    else:
        orders = [repeated(shard, repeats) for shard in split_ids(manifest, url)]
        entries = enumerate(zip(manifest["shards"], orders, strict=True))
        shards = [Piece(i, entry["name"], 0, len(order), order) for i, (entry, order) in entries]
    total = sum(p.stop for p in shards)
    if part is None or train:
        start, stop = bounds(total, world_size, rank)
    else:
        start, stop = part_samples(total, batch_size, part)
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
    if not 0 <= start_batch <= num_batches:
        raise ValueError(f"start_batch {start_batch} is outside this epoch's {num_batches} batches")
    device = device or torch.device("cpu")
    stream = ShardStream(
        url=url,
        pieces=take(shards, start, stop),
        num_samples=stop - start,
        num_batches=num_batches,
        batch_size=batch_size,
        train=train,
        image_size=tuple(manifest["image_size"]),
        crop=tuple(crop or manifest["image_size"]),
        scale=scale,
        blur=blur,
        mean_std=mean_std,
        seed=seed,
        epoch=epoch,
        rank=rank,
        start_batch=start_batch,
        on_device=augment_on_device,
        labeled=labeled,
        storage_options=storage_options,
    )
    dataloader = DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        # A DataLoader draws its workers' base seed from this generator each epoch; the global one would
        # shift every later mixup/dropout draw, and a resumed run (one draw fewer) would not replay them.
        # The stream seeds its own augmentation by sample position.
        generator=torch.Generator(),
    )
    return Loader(dataloader, num_batches, device)


def input_mean_std(data: DataSpec) -> MeanStd:
    """The input normalization a spec's `data` trains with: its training split's RGB statistics or
    ImageNet's."""
    if data.normalize == "imagenet":
        return IMAGENET
    return dataset_mean_std(data.train, data.storage_options)


def spec_loader(
    data: DataSpec,
    recipe: TrainSpec,
    *,
    train: bool,
    mean_std: MeanStd,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    start_batch: int = 0,
    device: torch.device | None = None,
    repeats: Mapping[str, int] | None = None,
) -> Loader:
    """A rank's loader of an epoch as a spec's `data` and `train` (`recipe`) sections ask: training at the
    epoch's stage (crop, batch) with the recipe's augmentation, validation of whole images at
    train.batch_per_gpu."""
    t, d = recipe, data
    stage = t.stage(epoch)
    return make_loader(
        d.train if train else d.val,
        batch_size=stage.batch_per_gpu if train else t.batch_per_gpu,
        rank=rank,
        world_size=world_size,
        train=train,
        crop=tuple(stage.crop) if train else None,
        epoch=epoch,
        seed=t.seed,
        num_workers=d.loader_workers,
        scale=tuple(t.scale),
        blur=(t.blur_p, t.blur_sigma),
        mean_std=mean_std,
        start_batch=start_batch,
        device=device,
        augment_on_device=d.augment_on == "device",
        repeats=repeats if train else None,
        storage_options=d.storage_options,
    )


def dataset_mean_std(url: str, storage_options: dict | None = None) -> MeanStd:
    """The RGB mean/std (0..1 scale) that `pack` measured over the split at url."""
    manifest = read_manifest(url, storage_options)
    if not manifest.get("rgb_mean"):
        raise ValueError(
            f"{url}/manifest.json has no RGB statistics: pack the split again, "
            "or set data.normalize: imagenet"
        )
    return tuple(manifest["rgb_mean"]), tuple(manifest["rgb_std"])


def part_samples(total: int, batch_size: int, part: tuple[int, int]) -> tuple[int, int]:
    """Samples [start, stop) of part (index, parts) of a split of `total` samples cut into whole batches."""
    index, parts = part
    if not 0 <= index < parts:
        raise ValueError(f"part {index} is outside {parts} parts")
    lo, hi = bounds(math.ceil(total / batch_size), parts, index)
    return lo * batch_size, min(hi * batch_size, total)


def evaluation_loader(
    url: str,
    *,
    batch_size: int,
    part: tuple[int, int] = (0, 1),
    need_labels: bool = True,
    storage_options: dict | None = None,
) -> Loader:
    """The samples of a split in order, whole images, for evaluation outside training: all of them, or
    part (index, parts) of its batches. Parts split whole batches, so each batch holds the images one
    process would batch together and the parts' results concatenate to that process's exactly.
    Images stay uint8 [B,3,H,W] (masks int64): each model normalizes them with its own mean/std."""
    loader = make_loader(
        url,
        batch_size=batch_size,
        rank=0,
        world_size=1,
        train=False,
        crop=None,
        epoch=0,
        seed=0,
        part=part,
        need_labels=need_labels,
        storage_options=storage_options,
    )
    return replace(loader, raw=True)


def _read_piece(
    fs: fsspec.AbstractFileSystem, path: str, piece: Piece, members: int = 2
) -> Iterator[Encoded]:
    """Positions [piece.start, piece.stop) of one shard, in one streaming pass; `members` per sample.

    A transient error reopens the shard after a backoff and goes on at the next position (RETRIES times,
    then it is raised: an unreachable store is not bad data). Anything else (a corrupt tar, a missing
    shard) ends the shard: its remaining samples come out unreadable, to be counted and stood in for."""
    start, attempt = piece.start, 0
    while start < piece.stop:
        try:
            for sample in _scan(fs, path, piece, start, members):
                yield sample
                start = sample.index + 1
            return
        except PermissionError:
            raise
        except Exception as e:
            if is_transient(e) and attempt < RETRIES:
                attempt += 1
                delay = backoff(attempt)
                log.warning(
                    "%s: %r at sample %d; retry %d/%d in %.1f s", path, e, start, attempt, RETRIES, delay
                )
                time.sleep(delay)
                continue
            if is_transient(e):
                raise
            problem = f"{posixpath.basename(path)} is unreadable from sample {piece.sample(start)} on ({e!r})"
            log.warning("%s: %d sample(s) lost", problem, piece.stop - start)
            for index in range(start, piece.stop):
                yield Encoded(piece.shard, index, f"{path}:#{index}", None, problem)
            return


def _scan(
    fs: fsspec.AbstractFileSystem, path: str, piece: Piece, start: int, members: int
) -> Iterator[Encoded]:
    """Positions [start, piece.stop) of a shard: members 2i and 2i+1 are sample i's <id>.jpg and <id>.png
    (member i its <id>.jpg where `members` is 1: an unlabeled split). Pairing by position keeps every later
    sample in place when one member is misnamed. The order is ascending, so a repeated sample is read once
    and yielded for each of its positions."""
    with (
        fs.open(path, "rb", block_size=_BLOCK_SIZE, cache_type="readahead") as f,
        tarfile.open(fileobj=f, mode="r|") as tar,
    ):
        entries, index, group, data = iter(tar), -1, [], []
        for position in range(start, piece.stop):
            wanted = piece.sample(position)
            while index < wanted:
                index, group, data = index + 1, [], []
                for member in itertools.islice(entries, members):
                    # A stream-mode tar can read a member only before moving on; others are passed over.
                    read = index == wanted and member.isfile()
                    group.append(member)
                    data.append(tar.extractfile(member).read() if read else b"")
                if len(group) < members:
                    found, needed = members * index + len(group), members * (wanted + 1)
                    raise EOFError(f"{found} members, the manifest needs {needed}")
            name, problem = _sample_name(group)
            jpg, png = (None, problem) if problem else (data[0], data[1] if members == 2 else None)
            yield Encoded(piece.shard, position, f"{path}:{name}", jpg, png)


def _sample_name(group: list[tarfile.TarInfo]) -> tuple[str, str | None]:
    """(sample id, None) for a well-formed <id>.jpg + <id>.png (or a lone <id>.jpg), else (what was
    found, the problem). Absolute paths, '..' and folders are refused outright: nothing here is ever
    extracted to disk, but a shard holding them was not written by `pack`."""
    stems, exts = zip(*(posixpath.splitext(m.name) for m in group), strict=True)
    safe = all(m.isfile() and "/" not in m.name and m.name not in (".", "..") for m in group)
    want = (".jpg", ".png")[: len(group)]
    if safe and stems[0] and len(set(stems)) == 1 and exts == want:
        return stems[0], None
    names = " + ".join(repr(m.name) for m in group)
    return names, f"members {names} refused: want plain {' + '.join(f'<id>{e}' for e in want)}"


def _shuffled(items: Iterable, size: int, rng: np.random.Generator) -> Iterator:
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
