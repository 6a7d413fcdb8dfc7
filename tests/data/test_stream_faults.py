"""The reader's promises under bad data and restarts: damaged samples are stood in for and counted while
every rank still yields the same number of batches, and a loader resumed at batch k yields exactly what an
uninterrupted one yields from k on (also where augmentation runs on the device)."""

from __future__ import annotations

import logging
from copy import deepcopy
from pathlib import Path

import broken_shards as broken
import pytest
import s3fs
import torch

from orchestrator.checkpoints import model_for
from orchestrator.data.layout import IGNORE_INDEX
from orchestrator.data.shards import pack, read_manifest
from orchestrator.data.stream import delivered, make_loader
from orchestrator.data.synth import synthesize
from orchestrator.spec import DataSpec, ModelSpec, Spec, TrainSpec
from orchestrator.train.loop import Position, Worker, make_optimizer, train_epoch

TRAIN, VAL, SIZE, SHARD = 22, 22, (64, 36), 5  # shards of 5, 5, 5, 5, 2


def damage(split: Path) -> set[tuple[int, int]]:
    """Break samples of a packed split in every way the reader must survive; returns their (shard, index)."""
    changes = [
        (0, lambda shard: broken.edit(shard, 1, 0, broken.truncate), {1}),
        (1, lambda shard: broken.edit(shard, 0, 1, broken.garbage), {0}),
        (1, lambda shard: broken.edit(shard, 3, 1, broken.resized_png(SIZE[0] // 2, SIZE[1])), {3}),
        (2, lambda shard: broken.edit(shard, 2, 0, broken.traverse), {2}),
        (3, lambda shard: broken.break_header(shard, 2), {2, 3, 4}),  # the rest of the shard is lost
    ]
    bad = set()
    for shard, change, samples in changes:
        path = split / f"shard-{shard:06d}.tar"
        path.write_bytes(change(path.read_bytes()))
        bad |= {(shard, i) for i in samples}
    return bad


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    synthesize(str(raw), train=TRAIN, val=VAL, size=SIZE, seed=5)
    out = tmp_path_factory.mktemp("shards")
    pack(str(raw), str(out), shard_size=SHARD, workers=1)
    return out


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[tuple[int, int]]]:
    raw = tmp_path_factory.mktemp("raw")
    synthesize(str(raw), train=TRAIN, val=VAL, size=SIZE, seed=5)
    out = tmp_path_factory.mktemp("damaged")
    pack(str(raw), str(out), shard_size=SHARD, workers=1)
    damage(out / "train")
    return out, damage(out / "val")


def _loader(url: str, rank: int = 0, **kwargs):
    args = dict(batch_size=2, rank=rank, world_size=2, train=True, crop=(40, 32), epoch=1, seed=0)
    return make_loader(url, **(args | kwargs))


def _planned(loader) -> set[tuple[int, int]]:
    return {(p.shard, i) for p in loader.dataloader.dataset.pieces for i in range(p.start, p.stop)}


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_training_data_keeps_equal_batches_and_counts_what_it_skips(damaged, workers: int) -> None:
    split, bad = damaged
    counts, skipped = [], 0
    for rank in range(2):
        loader = _loader(str(split / "train"), rank, num_workers=workers)
        batches = list(loader)
        assert all(x.shape == (2, 3, 32, 40) and y.shape == (2, 32, 40) for x, y in batches)
        counts.append(len(batches))
        skipped += loader.skipped
        assert loader.skipped == len(_planned(loader) & bad)
    assert counts == [TRAIN // 2 // 2] * 2
    assert 0 < skipped <= len(bad)


def test_damaged_validation_data_is_ignored_and_counted(damaged, shards: Path) -> None:
    split, bad = damaged
    seen, placeholders, skipped = 0, 0, 0
    for rank in range(2):
        loader = _loader(str(split / "val"), rank, train=False, num_workers=2)
        clean = _loader(str(shards / "val"), rank, train=False, num_workers=2)
        for (x, y), (x_clean, y_clean) in zip(loader, clean, strict=True):
            # The damaged samples become all-ignore placeholders; every other one is intact.
            placeholder = (y == IGNORE_INDEX).flatten(1).all(1)
            assert torch.equal(x[~placeholder], x_clean[~placeholder])
            assert torch.equal(y[~placeholder], y_clean[~placeholder])
            seen += len(y)
            placeholders += int(placeholder.sum())
        skipped += loader.skipped
    assert seen == VAL and placeholders == skipped == len(bad) == 7


def test_each_skipped_sample_is_named_in_the_log(damaged, caplog: pytest.LogCaptureFixture) -> None:
    split, _ = damaged
    with caplog.at_level(logging.WARNING, logger="orchestrator.data.stream"):
        list(make_loader(str(split / "val"), batch_size=4, rank=0, world_size=1, train=False, crop=None,
                         epoch=0, seed=0))  # fmt: skip
    text = caplog.text
    assert "does not decode as JPEG" in text and "does not decode as PNG" in text
    assert "mask shape" in text and "'../" in text and "refused" in text
    assert "shard-000003.tar is unreadable from sample 2 on" in text and "3 sample(s) lost" in text


def test_a_worker_with_nothing_readable_fails_clearly(tmp_path: Path, shards: Path) -> None:
    split = tmp_path / "train"
    split.mkdir()
    for f in (shards / "train").iterdir():
        (split / f.name).write_bytes(f.read_bytes() if f.suffix == ".json" else b"not a tar")
    with pytest.raises(RuntimeError, match="none of the samples"):
        list(_loader(str(split), num_workers=0))


@pytest.mark.parametrize(
    ("counts", "consumed", "expected"),
    [
        ([3, 3], 3, ([2, 1], 1)),
        ([1, 2, 2], 4, ([1, 2, 1], 2)),
        ([1, 2, 2], 5, ([1, 2, 2], 0)),
        ([0, 2], 1, ([0, 1], 0)),
    ],
)
def test_delivered_follows_dataloader_round_robin(counts, consumed, expected) -> None:
    assert delivered(counts, consumed) == expected


@pytest.mark.parametrize(
    ("workers", "on_device", "resampled"),
    [(0, False, False), (2, False, False), (3, False, False), (0, True, False), (2, True, False),
     (3, True, False), (2, False, True), (3, True, True)],
)  # fmt: skip
def test_resumed_loader_yields_exactly_the_rest_of_the_epoch(
    damaged, workers: int, on_device: bool, resampled: bool
) -> None:
    # 5 batches per rank; 3 workers hold 1, 2 and 2 of them, so the DataLoader's round-robin is uneven.
    # Resampled: 4 samples read 3 times, 2 dropped, so copies of one sample straddle ranks and workers.
    url = str(damaged[0] / "train")
    ids = [i for shard in read_manifest(url)["shards"] for i in shard["ids"]]
    repeats = {i: 3 for i in ids[1:17:4]} | {ids[7]: 0, ids[20]: 0} if resampled else None
    args = {"num_workers": workers, "augment_on_device": on_device, "repeats": repeats}
    full_loader = _loader(url, 1, **args)
    full = list(full_loader)
    assert len(full) == (7 if resampled else 5)  # (22 + 4 x 2 - 2) copies // 2 ranks // 2
    for start in range(len(full) + 1):
        loader = _loader(url, 1, start_batch=start, **args)
        assert len(loader) == len(full) - start
        assert _same(list(loader), full[start:]), start
        prefix = _loader(url, 1, **args)
        for _ in zip(range(start), prefix, strict=False):
            pass
        assert prefix.skipped + loader.skipped == full_loader.skipped  # counts add up across a resume


def test_augmentation_on_the_device_equals_the_loaders(shards: Path) -> None:
    url = str(shards / "train")
    on_workers = list(_loader(url, num_workers=2, blur=(1.0, 1.5)))
    on_device = list(_loader(url, num_workers=2, blur=(1.0, 1.5), augment_on_device=True))
    assert _same(on_device, on_workers)
    assert not _same(on_workers, list(_loader(url, num_workers=2, blur=(0.0, 1.5))))  # blur is applied


def test_start_batch_outside_the_epoch_is_refused(shards: Path) -> None:
    with pytest.raises(ValueError, match="start_batch 6"):
        _loader(str(shards / "train"), start_batch=6)


class Crash(Exception):
    pass


def test_training_resumed_mid_epoch_ends_exactly_as_an_uninterrupted_epoch(damaged) -> None:
    split = damaged[0]
    spec = Spec(
        name="resume",
        data=DataSpec(train=str(split / "train"), val=str(split / "val"), loader_workers=2),
        model=ModelSpec(backbone="resnet18"),
        train=TrainSpec(epochs=2, batch_per_gpu=2, crop=(40, 32), checkpoint_every=2, lr=0.01),
    )
    w = Worker(spec)
    steps = w.epoch_steps[1]

    def fresh():
        torch.manual_seed(0)
        model = model_for(spec)
        return model, make_optimizer(spec.train, model)

    uninterrupted, optimizer = fresh()
    saved: list[Position] = []
    full = train_epoch(w, uninterrupted, optimizer, Position(epoch=1), saved.append)
    assert [p.step for p in saved] == list(range(2, steps, 2))

    # The same epoch, killed right after its second mid-epoch checkpoint, then resumed from it.
    model, optimizer = fresh()
    state = {}

    def crash_on_second(p: Position) -> None:
        if p.step == 4:
            state.update(model=deepcopy(model.state_dict()), optimizer=deepcopy(optimizer.state_dict()), at=p)
            raise Crash

    with pytest.raises(Crash):
        train_epoch(w, model, optimizer, Position(epoch=1), crash_on_second)
    assert state["at"] == saved[1]
    resumed, resumed_optimizer = fresh()
    resumed.load_state_dict(state["model"])
    resumed_optimizer.load_state_dict(state["optimizer"])
    rest = train_epoch(w, resumed, resumed_optimizer, state["at"])
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name  # no batch replayed, none skipped
    assert rest["train_loss"] == pytest.approx(full["train_loss"], rel=1e-12)
    assert rest["skipped_samples"] == full["skipped_samples"] > 0


@pytest.mark.slow
def test_reads_outlast_faults(shards: Path, s3_server, s3_bucket: str, flaky_s3, caplog) -> None:
    # More resets in a row than s3fs retries (5) on its own: the reader reopens the shard after a backoff
    # and goes on where it stopped, so the samples and their order are those of the local shards.
    s3fs.S3FileSystem(**s3_server.storage_options).put(
        str(shards / "val"), f"{s3_bucket}/val", recursive=True
    )
    flaky_s3.inject(f"{s3_bucket}/val/shard-000001.tar", "reset", times=7)
    args = dict(batch_size=3, rank=0, world_size=1, train=False, crop=None, epoch=0, seed=0)
    remote = make_loader(f"s3://{s3_bucket}/val", storage_options=flaky_s3.storage_options, **args)
    with caplog.at_level(logging.WARNING, logger="orchestrator.data.stream"):
        batches = list(remote)
    assert _same(batches, list(make_loader(str(shards / "val"), **args)))
    assert remote.skipped == 0 and flaky_s3.injected["reset"] == 7
    assert "retry 1/5" in caplog.text


@pytest.mark.slow
def test_resume_on_s3(damaged, s3_server, s3_bucket: str) -> None:
    s3fs.S3FileSystem(**s3_server.storage_options).put(
        str(damaged[0] / "train"), f"{s3_bucket}/t", recursive=True
    )
    url, options = f"s3://{s3_bucket}/t", s3_server.storage_options
    full = list(_loader(url, 1, num_workers=2, storage_options=options))
    rest = _loader(url, 1, num_workers=2, storage_options=options, start_batch=3)
    assert _same(list(rest), full[3:])
    assert _same(full, list(_loader(str(damaged[0] / "train"), 1, num_workers=2)))  # S3 reads as local
