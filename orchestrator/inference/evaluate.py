"""Score models on a validation loader in one pass: one confusion matrix per image and predictor (each
member, and optionally their ensemble), from which every total and per-image score follows, and the
best and worst images of the last predictor for overlays; the per-image artifacts of a report. Running
it over a packed split, whole or in parts: inference/parts.py."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, get_args

import torch

from orchestrator import metrics
from orchestrator.checkpoints import Trained
from orchestrator.data.layout import NUM_CLASSES
from orchestrator.data.transforms import normalize
from orchestrator.errors import UsageError
from orchestrator.inference import visualize
from orchestrator.inference.predict import WHOLE, InferenceSettings, predict_proba
from orchestrator.inference.visualize import Sample
from orchestrator.logs import Progress

Combine = Literal["mean", "weighted", "vote"]
SKIPPED_FILE = "skipped.txt"  # beside a pass's outputs: the unreadable images left out, "<id>\t<why>" lines


class Unread(NamedTuple):
    """An image of the split that could not be read (the loader stood an all-ignore placeholder in)."""

    index: int  # in the split
    id: str  # its sample id (its position, 000123, where the manifest records none)
    why: str


@dataclass(frozen=True)
class Coverage:
    """How many of the split's images a pass scored or predicted: all of them, or all but the unreadable
    ones that --skip-bad left out."""

    total: int
    skipped: tuple[str, ...] = ()  # their sample ids

    @property
    def scored(self) -> int:
        return self.total - len(self.skipped)

    def params(self) -> dict[str, int]:
        return {"images_scored": self.scored, "images_total": self.total}

    def __str__(self) -> str:
        return f"over {self.scored} of {self.total} images"


@dataclass
class Evaluation:
    """Confusion matrices per predictor and image, rows = truth: the members in order, then (when
    ensembled) the ensemble; images in loader order (the split's manifest order). An unreadable image
    has a row of zeros (its placeholder's mask is all ignore) and is listed in `unreadable`."""

    per_image: torch.Tensor  # [P, N, C, C] int64
    members: int
    best: list[Sample] = field(default_factory=list)  # the last predictor's, highest per-image mIoU first
    worst: list[Sample] = field(default_factory=list)  # lowest first
    ids: list[str] | None = None  # the images' sample ids, where the split's manifest records them
    unreadable: list[Unread] = field(default_factory=list)  # in split order; filled by a pass (parts.py)

    @property
    def cms(self) -> torch.Tensor:
        """[P, C, C]: each predictor's matrix over the images read."""
        return self.per_image.sum(1)

    @property
    def coverage(self) -> Coverage:
        return Coverage(self.per_image.shape[1], tuple(u.id for u in self.unreadable))

    def summary(self, predictor: int = -1, prefix: str = "val_") -> dict[str, float]:
        """metrics.summarize of a predictor (default: the last, i.e. the ensemble when there is one)."""
        return metrics.summarize(self.cms[predictor], prefix)

    def images(self, predictor: int = -1) -> dict[str, Sequence]:
        """Per-image columns of the images read: `index` (in the split), `id` (where known: what
        train.sample_weights_from keys on) and every metrics.scores name (NaN where an image has no score)."""
        read = torch.ones(self.per_image.shape[1], dtype=torch.bool)
        read[[u.index for u in self.unreadable]] = False
        index = torch.arange(len(read))[read]
        ids = {"id": [self.ids[i] for i in index.tolist()]} if self.ids is not None else {}
        return {"index": index, **ids, **metrics.scores(self.per_image[predictor][read])}


@dataclass
class Report:
    data: str  # the split scored
    evaluation: Evaluation
    files: list[Path]  # per-image CSV, histogram, overlays: for the caller to log as artifacts

    @property
    def metrics(self) -> dict[str, float]:
        """The scored predictor's: the ensemble's, or the single model's."""
        return self.evaluation.summary()

    @property
    def member_metrics(self) -> list[dict[str, float]]:
        return [self.evaluation.summary(i) for i in range(self.evaluation.members)]


def ensemble_labels(
    probs: Sequence[torch.Tensor], combine: Combine = "mean", weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Class ids [B, H, W] from the members' probabilities [B, C, H, W]: "mean" of the softmax;
    "weighted" mean by `weights`; "vote": per-pixel majority of the members' argmax, ties broken by
    the mean softmax (among the tied classes only)."""
    stacked = torch.stack(list(probs))
    if combine == "weighted":
        w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
        return torch.einsum("m,mbchw->bchw", w / w.sum(), stacked).argmax(1)
    mean = stacked.mean(0)
    if combine == "mean":
        return mean.argmax(1)
    classes = torch.arange(stacked.shape[2], device=stacked.device).view(-1, 1, 1)
    votes = (stacked.argmax(2, keepdim=True) == classes).sum(0)  # [B, C, H, W]
    tied = votes == votes.amax(1, keepdim=True)
    return torch.where(tied, mean, -1.0).argmax(1)


def predict_labels(
    members: Sequence[Trained],
    images: torch.Tensor,
    settings: InferenceSettings = WHOLE,
    *,
    ensemble: bool = False,
    combine: Combine = "mean",
    weights: Sequence[float] | None = None,
) -> list[torch.Tensor]:
    """Class ids [B, H, W] of each member for uint8 images [B, 3, H, W] (on the members' device), each
    normalized as its member was trained, then (with `ensemble`) of their combination."""
    inputs = {m.mean_std: normalize(images, m.mean_std) for m in members}  # once per distinct mean/std
    probs = [predict_proba(m.model, inputs[m.mean_std], settings) for m in members]
    labels = [p.argmax(1) for p in probs]
    if ensemble:
        labels.append(ensemble_labels(probs, combine, weights))
    return labels


def evaluate(
    members: list[Trained],
    loader: Iterable,
    *,
    ensemble: bool = False,
    settings: InferenceSettings = WHOLE,
    combine: Combine = "mean",
    weights: Sequence[float] | None = None,
    keep: int = 0,
    first: int = 0,
    sink: Callable[[int, torch.Tensor], None] | None = None,
    progress: Progress | None = None,
) -> Evaluation:
    """Score each member (and, with `ensemble`, their combination) predicting in `settings`' mode. The
    loader yields uint8 images (evaluation_loader) and masks; each member sees the images normalized as
    it was trained, on the device of the first member's parameters. `keep`: how many best and worst
    images (by per-image 3-class mIoU) of the last predictor to keep for overlays. `first`: the split's
    index of the loader's first image. `sink(index, labels)` gets the last predictor's class ids [B, H, W]
    of each batch, `index` that of its first image; `progress` is advanced by each batch's images."""
    check_combine(combine, weights, len(members))
    device = next(members[0].model.parameters()).device
    extremes = _Extremes(keep)
    batches, offset = [], first
    for images, masks in loader:
        images, masks = images.to(device), masks.to(device)
        labels = predict_labels(
            members, images, settings, ensemble=ensemble, combine=combine, weights=weights
        )
        if sink is not None:
            sink(offset, labels[-1])
        cms = torch.stack([metrics.confusion_matrices(y, masks, NUM_CLASSES) for y in labels])
        batches.append(cms.cpu())
        extremes.add(offset, metrics.scores(batches[-1][-1])["miou"].tolist(), images, masks, labels[-1])
        offset += len(images)
        if progress is not None:
            progress.update(len(images))
    return Evaluation(torch.cat(batches, 1), len(members), _ranked(extremes.best), _ranked(extremes.worst))


def write_report(evaluation: Evaluation, out_dir: str | Path) -> list[Path]:
    """The last predictor's per_image.csv, per_image_miou.png and best-/worst- overlays in out_dir, and
    the unreadable images left out (SKIPPED_FILE) where there are any."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = evaluation.images()
    series = {"mIoU, 3 classes": columns["miou"], "official mIoU": columns["miou_official"]}
    files = [
        visualize.write_csv(out / "per_image.csv", columns),
        visualize.write_histogram(out / "per_image_miou.png", series),
        *visualize.write_overlays(out, evaluation.best, "best"),
        *visualize.write_overlays(out, evaluation.worst, "worst"),
    ]
    if evaluation.unreadable:
        files.append(out / SKIPPED_FILE)
        files[-1].write_bytes(skipped_text(evaluation.unreadable))
    return files


def skipped_text(unreadable: Sequence[Unread]) -> bytes:
    """SKIPPED_FILE's content: a line per image left out, its sample id and why it could not be read."""
    return "".join(f"{u.id}\t{u.why}\n" for u in unreadable).encode()


def check_combine(combine: str, weights: Sequence[float] | None, members: int) -> None:
    if combine not in get_args(Combine):
        raise UsageError(f"combine {combine!r}: allowed are {', '.join(get_args(Combine))}")
    if (combine == "weighted") != (weights is not None):
        raise UsageError(
            f"weights {weights} go with combine 'weighted' and only with it (combine is {combine!r})"
        )
    if weights is not None and (len(weights) != members or min(weights) < 0 or sum(weights) <= 0):
        raise UsageError(f"weights {list(weights)}: want {members} non-negative numbers, not all 0")


@dataclass
class _Extremes:
    """The `keep` highest and lowest scored images added so far, each in a min-heap of
    (key, -index, Sample): key = score (best) or -score (worst); the earlier image wins a tie."""

    keep: int
    best: list = field(default_factory=list)
    worst: list = field(default_factory=list)

    def add(
        self,
        offset: int,
        scores: list[float],
        images: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
    ) -> None:
        """A batch of images (offset, offset + 1, ... of the split) with their scores and predictions."""
        for j, score in enumerate(scores):
            if not self.keep or math.isnan(score):  # an image with nothing labelled has no score
                continue
            index, sample = offset + j, None
            for heap, key in ((self.best, score), (self.worst, -score)):
                if len(heap) < self.keep or (key, -index) > heap[0][:2]:
                    if sample is None:  # copied off the device only when kept; class ids as uint8
                        mask, pred = (t[j].to(torch.uint8).cpu() for t in (masks, labels))
                        sample = Sample(index, score, images[j].cpu(), mask, pred)
                    push = heapq.heappush if len(heap) < self.keep else heapq.heapreplace
                    push(heap, (key, -index, sample))


def _ranked(heap: list) -> list[Sample]:
    return [entry[2] for entry in sorted(heap, key=lambda e: e[:2], reverse=True)]
