"""Resample the training split by a model's per-image scores (the BDD100K report, Section X).

The report scored every training image with its best model and found most low scores on confusing or
wrongly labelled images; it tried repeating the ~10k worst ones. `train.sample_weights_from` names the
evaluation run whose `per_image.csv` holds those scores; images below `repeat_below` are read
`repeat_times` times per epoch, images below `drop_below` not at all. The plan is a number of copies per
sample id; the reader (`make_loader`) splits the copies across ranks and workers exactly as it splits
samples, so every copy is read once per epoch and every rank keeps the same batch count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from orchestrator.data.shards import read_manifest, shard_ids
from orchestrator.spec import DataSpec, TrainSpec


def sample_repeats(
    scores: Mapping[str, float],
    ids: Iterable[str],
    *,
    repeat_below: float | None,
    repeat_times: int = 2,
    drop_below: float | None = None,
) -> dict[str, int]:
    """Copies per epoch of each training sample id whose count is not one: 0 for a score below
    drop_below, repeat_times for one below repeat_below. Images with no score (or a NaN one: no
    labelled pixel) keep one copy. Raises ValueError when the scores name none of the training ids (they
    were made on another split) or when nothing would be left."""
    ids = list(ids)
    scored = scores.keys() & set(ids)
    if not scored:
        example = next(iter(scores), None)
        raise ValueError(
            f"none of the {len(scores)} scored images (e.g. {example!r}) is in the training split "
            f"({len(ids)} samples): score the training split, `orchestrator evaluate RUN --data TRAIN_URL`"
        )
    plan = {}
    for sample_id in scored:
        score = scores[sample_id]
        if math.isnan(score):
            continue
        if drop_below is not None and score < drop_below:
            plan[sample_id] = 0
        elif repeat_below is not None and score < repeat_below:
            plan[sample_id] = repeat_times
    if sum(plan.get(i, 1) for i in ids) == 0:
        raise ValueError(f"drop_below {drop_below} leaves out all {len(ids)} training samples")
    return plan


def split_ids(manifest: Mapping, url: str) -> list[list[str]]:
    """Each shard's sample ids, in member order: what a resampled split needs its manifest to record."""
    ids = shard_ids(manifest)
    if ids is None:
        raise ValueError(
            f"{url}/manifest.json records no sample ids (packed by an earlier orchestrator): "
            "pack the split again to resample it by scores"
        )
    return ids


def repeated(ids: list[str], repeats: Mapping[str, int]) -> tuple[int, ...]:
    """A shard's epoch order: each sample index as many times as its id's copies, ascending."""
    return tuple(i for i, sample_id in enumerate(ids) for _ in range(repeats.get(sample_id, 1)))


def plan(
    data: DataSpec, train: TrainSpec, scores: Mapping[str, float]
) -> tuple[dict[str, int], dict[str, int]]:
    """`train.sample_weights_from` as copies per training sample id (what the workers' loaders take), and
    what it did to the split (a trial's resample.* params): from the spec's `data` and `train` sections."""
    t, d = train, data
    ids = [i for shard in split_ids(read_manifest(d.train, d.storage_options), d.train) for i in shard]
    repeats = sample_repeats(
        scores, ids, repeat_below=t.repeat_below, repeat_times=t.repeat_times, drop_below=t.drop_below
    )
    counts = list(repeats.values())
    summary = {
        "resample.scored": len(scores.keys() & set(ids)),
        "resample.repeated": sum(c > 1 for c in counts),
        "resample.dropped": counts.count(0),
        "resample.epoch_samples": len(ids) + sum(c - 1 for c in counts),
    }
    return repeats, summary
