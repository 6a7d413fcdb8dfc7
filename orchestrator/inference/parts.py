"""One inference pass over a packed split, cut into parts of whole batches: what a part computes (each
image's confusion matrices per predictor, the images kept for overlays, the predictions written or
returned) and how parts merge. Parts run in this process or on Ray workers (execution/inference.py); the
merged result is the same to the bit either way: a batch holds the same images as in one process, the
integer sums are exact, and rows, frames and files come out in sample order.

Nothing is made up for an image that cannot be read: no mask, frame or per-image row; the pass fails
naming the shards, or (skip_bad) leaves those images out and lists them."""

from __future__ import annotations

import bisect
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from orchestrator import checkpoints
from orchestrator.checkpoints import Trained
from orchestrator.data.shards import read_manifest, shard_ids
from orchestrator.data.stream import evaluation_loader, part_samples
from orchestrator.errors import Unavailable, UsageError
from orchestrator.inference.evaluate import (
    Combine,
    Evaluation,
    Report,
    Unread,
    check_combine,
    evaluate,
    write_report,
)
from orchestrator.inference.predict import WHOLE, InferenceSettings
from orchestrator.inference.submission import Format, MaskWriter, rle_frame
from orchestrator.inference.visualize import Sample
from orchestrator.logs import Progress

Device = Literal["auto", "cuda", "cpu"]
DEVICES: tuple[Device, ...] = ("auto", "cuda", "cpu")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    """Where predictions go: masks are written by the part that predicts them; RLE frames come back."""

    url: str
    format: Format


@dataclass(frozen=True)
class Pass:
    """Everything a part needs, pickled once to each Ray worker: the members' checkpoints (as loaded by
    checkpoints.load), the split, how to predict and combine, and where predictions go."""

    states: tuple[dict, ...]
    data: str
    settings: InferenceSettings = WHOLE
    combine: Combine = "mean"
    weights: tuple[float, ...] | None = None
    batch_size: int = 2
    keep: int = 0  # best and worst images kept for overlays
    device: Device = "auto"
    output: Output | None = None
    storage_options: dict | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise UsageError(f"device {self.device!r}: allowed are {', '.join(DEVICES)}")

    def images(self) -> int:
        return read_manifest(self.data, self.storage_options)["num_samples"]

    def batches(self) -> int:
        return math.ceil(self.images() / self.batch_size)

    def load(self) -> list[Trained]:
        """The members on this process's device: the first CUDA GPU it sees (device auto or cuda), else the
        CPU."""
        cuda = self.device != "cpu" and torch.cuda.is_available()
        if self.device == "cuda" and not cuda:
            raise UsageError("device 'cuda': this process sees no CUDA GPU (use device auto or cpu)")
        members = [checkpoints.model_from_state(state) for state in self.states]
        for m in members:
            m.model.to("cuda" if cuda else "cpu")
        return members

    def run(
        self, members: list[Trained], part: tuple[int, int] = (0, 1), progress: Progress | None = None
    ) -> Part:
        """Part (index, parts) of the pass, with loaded members."""
        manifest = read_manifest(self.data, self.storage_options)
        first, stop = part_samples(manifest["num_samples"], self.batch_size, part)
        loader = evaluation_loader(
            self.data,
            batch_size=self.batch_size,
            part=part,
            need_labels=self.output is None,
            storage_options=self.storage_options,
        )
        ids = sample_ids(manifest)[first:stop]
        frames: list[dict] = []
        masks = self.output is not None and self.output.format == "masks"
        writer = MaskWriter(self.output.url, self.storage_options) if masks else None

        def sink(offset: int, labels: torch.Tensor) -> None:
            start = offset - first
            batch = enumerate(ids[start : start + len(labels)], start)
            for (position, sample_id), mask in zip(batch, labels.to(torch.uint8).cpu().numpy(), strict=True):
                if position in loader.unreadable:  # a placeholder's prediction: nothing to write
                    continue
                if writer is not None:
                    writer.write(sample_id, mask)
                else:
                    frames.append(rle_frame(sample_id, mask))

        result = evaluate(
            members,
            loader,
            ensemble=len(members) > 1,
            settings=self.settings,
            combine=self.combine,
            weights=self.weights,
            keep=self.keep,
            first=first,
            sink=sink if self.output is not None else None,
            progress=progress,
        )
        unreadable = [Unread(first + p, ids[p], why) for p, why in loader.unreadable.items()]
        return Part(result.per_image, result.best, result.worst, frames, unreadable)


@dataclass
class Part:
    per_image: torch.Tensor  # [P, n, C, C] of the part's n images
    best: list[Sample]
    worst: list[Sample]
    frames: list[dict]  # RLE frames of the part's images read (format rle)
    unreadable: list[Unread]  # the part's images that could not be read

    @property
    def images(self) -> int:
        return self.per_image.shape[1]


# Runs a pass's parts elsewhere, in order (execution.inference.on_ray: Ray workers), the progress bar moving
# as they come back. Given by the caller: this room does not reach up to Ray's.
PartsRunner = Callable[[Pass, Progress], list[Part]]


def merge(parts: Sequence[Part], members: int, keep: int) -> tuple[Evaluation, list[dict]]:
    """The evaluation (and RLE frames) of the whole pass from its parts, in part order."""
    best = [s for p in parts for s in p.best]
    worst = [s for p in parts for s in p.worst]
    evaluation = Evaluation(
        torch.cat([p.per_image for p in parts], 1),
        members,
        sorted(best, key=lambda s: (s.score, -s.index), reverse=True)[:keep],
        sorted(worst, key=lambda s: (-s.score, -s.index), reverse=True)[:keep],
        unreadable=[u for p in parts for u in p.unreadable],
    )
    return evaluation, [f for p in parts for f in p.frames]


def sample_ids(manifest: dict) -> list[str]:
    """The split's sample ids in order; positions (000000, ...) for a manifest from before ids were kept."""
    ids = shard_ids(manifest)
    if ids is None:
        return [f"{i:06d}" for i in range(manifest["num_samples"])]
    return [i for shard in ids for i in shard]


def evaluate_checkpoints(
    paths: Sequence[str | Path],
    data: str | None = None,
    settings: InferenceSettings = WHOLE,
    *,
    combine: Combine = "mean",
    weights: Sequence[float] | None = None,
    batch_size: int = 2,
    out_dir: str | Path | None = None,
    keep: int = 4,
    device: Device = "auto",
    runner: PartsRunner | None = None,
    storage_options: dict | None = None,
    skip_bad: bool = False,
) -> Report:
    """Score local checkpoint files on the packed split `data` (default: the first member's `data.val`):
    each member, and their ensemble when there are several; in this process, or where `runner` runs the
    pass's parts (the same result). With `out_dir`, the scored predictor's (the ensemble's, or the single
    model's) per-image CSV, histogram and `keep` best and worst overlays are written there and listed in
    `Report.files`. Unreadable images fail it, or with `skip_bad` are left out (run_pass)."""
    check_combine(combine, weights, len(paths))
    states = tuple(checkpoints.load(c) for c in paths)
    data = data or states[0]["config"]["data.val"]
    job = Pass(
        states, data, settings, combine, None if weights is None else tuple(weights), batch_size,
        keep if out_dir is not None else 0, device, storage_options=storage_options,
    )  # fmt: skip
    result, _ = run_pass(job, runner=runner, skip_bad=skip_bad)
    return Report(data, result, [] if out_dir is None else write_report(result, out_dir))


def run_pass(
    job: Pass, *, runner: PartsRunner | None = None, skip_bad: bool = False
) -> tuple[Evaluation, list[dict]]:
    """The whole pass: in this process (runner None), or its parts where `runner` runs them (Ray workers:
    `execution.inference.on_ray`). Images that cannot be read raise Unavailable naming their shards once the
    pass is over (so that every broken shard is named, not the first), unless `skip_bad`: then they are
    left out of the result, listed in `Evaluation.unreadable`."""
    manifest = read_manifest(job.data, job.storage_options)
    with Progress(manifest["num_samples"], "predict" if job.output else "evaluate", "image", log) as progress:
        parts = [job.run(job.load(), progress=progress)] if runner is None else runner(job, progress)
    evaluation, frames = merge(parts, len(job.states), job.keep)
    if evaluation.unreadable and not skip_bad:
        raise Unavailable(_unreadable_message(job, manifest, evaluation.unreadable))
    evaluation.ids = None if shard_ids(manifest) is None else sample_ids(manifest)
    return evaluation, frames


MAX_SHARDS_NAMED = 5  # the error names this many shards, then counts the rest


def _unreadable_message(job: Pass, manifest: dict, unreadable: list[Unread]) -> str:
    """'3 of 96 images of URL are unreadable:', a line per shard, 'shard-000002.tar (2: why the first)', and
    what to do: short lines, as the console shows an error's lines, each cut to errors.MAX_VALUE_CHARS."""
    ends = list(itertools.accumulate(s["num_samples"] for s in manifest["shards"]))
    by_shard: dict[str, list[Unread]] = {}
    for u in unreadable:
        by_shard.setdefault(manifest["shards"][bisect.bisect_right(ends, u.index)]["name"], []).append(u)
    lines = [f"{len(unreadable)} of {manifest['num_samples']} images of {job.data} are unreadable:"]
    # The first image's problem alone: how a part words the others depends on where in the shard it began.
    first = itertools.islice(by_shard.items(), MAX_SHARDS_NAMED)
    lines += [f"  {name} ({len(lost)}: {lost[0].why})" for name, lost in first]
    if len(by_shard) > MAX_SHARDS_NAMED:
        lines.append(f"  and {len(by_shard) - MAX_SHARDS_NAMED} more shard(s)")
    lines.append(
        "restore or re-pack those shards (`orchestrator data verify` checks a split), "
        "or pass --skip-bad to leave these images out and list them"
    )
    if job.output is not None and job.output.format == "masks":
        lines.append(f"the other images' masks are in {job.output.url}: --overwrite writes there again")
    return "\n".join(lines)
