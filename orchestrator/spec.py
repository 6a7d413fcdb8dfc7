"""The sweep spec: YAML schema, defaults, `--set` overrides and grid expansion.

Validated once at the edge; `expand` turns the grid into typed trials (`Trial`: key, flat config, spec),
and everything downstream receives those. A trial's flat config is a JSON-able dict with dotted keys
(`model.backbone`, `train.batch_per_gpu`): the same keys are MLflow params and `--set` targets.
This module never imports Ray, torch or MLflow, so a bad spec fails fast, before any of them start.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)

from orchestrator.errors import UsageError, cut, shown
from orchestrator.loss_spec import LOSS_GRAMMAR, LOSS_PATTERN, parse_loss
from orchestrator.masking import is_secret, masked, redact, redact_arg
from orchestrator.models.catalog import (
    BACKBONES,
    HEADS,
    check_model,
    default_head,
    norm_grammar,
    norm_pattern,
    output_strides,
    parse_norm,
)
from orchestrator.spec_yaml import read_yaml

MAX_POINT_ERRORS = 10  # lines about invalid grid combinations before the rest are counted
MAX_TRIALS_ENV = "ORCHESTRATOR_MAX_TRIALS"  # a grid of more trials is refused before it is expanded
MAX_TRIALS = 10_000


def absolute_url(url: str) -> str:
    """URLs with a scheme stay as they are; a plain local path becomes absolute, because Ray
    workers run in other working directories than the command that read the spec."""
    if not url.strip():
        raise ValueError("empty; give a path or a URL (or null where the field may be unset)")
    return url if "://" in url else str(Path(url).expanduser().resolve())


Url = Annotated[str, AfterValidator(absolute_url)]
# Numbers are numbers: true is no 1, and 2.0 no count of epochs (pydantic's lax mode takes both). A float
# field takes an integer; model_config refuses inf and nan.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]


class SpecError(UsageError):
    """A spec that cannot run; `lines` has one problem per line: field, value, what is allowed."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def _takes_text(annotation: Any) -> tuple[bool, bool]:
    """(whether a field takes nothing but text, whether it takes None too)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    nullable = type(None) in members

    def text(member: Any) -> bool:
        if typing.get_origin(member) is Annotated:
            member = typing.get_args(member)[0]
        if typing.get_origin(member) is Literal:
            return all(isinstance(v, str) for v in typing.get_args(member))
        return member is str

    others = [m for m in members if m is not type(None)]
    return bool(others) and all(map(text, others)), nullable


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _text_as_typed(cls, data: Any) -> Any:
        """A field that takes only text gets the text a user typed where YAML read a number, a boolean or
        null: `--set tracking.experiment=2024`, `name: true`. Null stays null where the field takes it."""
        if not isinstance(data, dict):
            return data
        typed = dict(data)
        for key, value in data.items():
            field = cls.model_fields.get(key)
            if field is None or not (value is None or isinstance(value, (bool, int, float))):
                continue
            text, nullable = _takes_text(field.annotation)
            if text and not (value is None and nullable):
                typed[key] = "null" if value is None else str(value).lower()  # True -> "true"
        return typed


class DataSpec(_Section):
    train: Url = Field(description="URL of the packed training split (a folder with manifest.json)")
    val: Url = Field(description="URL of the packed validation split")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (e.g. client_kwargs.endpoint_url); never logged"
    )
    loader_workers: Int = Field(2, ge=0, description="DataLoader worker processes per training worker")
    normalize: Literal["dataset", "imagenet"] = Field(
        "dataset",
        description="input mean/std: the training split's own (from its manifest, as the BDD100K report "
        "does) or ImageNet's",
    )
    augment_on: Literal["loader", "device"] = Field(
        "loader",
        description="where training augmentation runs: in the DataLoader worker processes, or on the "
        "training device (the workers then only decode; best on GPUs)",
    )


class ModelSpec(_Section):
    backbone: str = Field(
        "resnet50", description=f"one of {', '.join(BACKBONES)} (orchestrator/models/catalog.py)"
    )
    head: str | None = Field(
        None,
        description=f"one of {', '.join(HEADS)}; default: the backbone's own (deeplabv3plus; enet for enet)",
    )
    output_stride: Literal[8, 16] | None = Field(
        None, description="default: the backbone's own (16; 8 for DRN and ENet)"
    )
    multi_grid: tuple[Int, ...] | None = Field(
        None, description="unit rates of the last stage's blocks (DeepLabv3, e.g. [1, 2, 4]); ResNets only"
    )
    pretrained: Url | None = Field(
        None,
        description="URI of backbone weights in the backbone's key layout (torchvision/timm); "
        "`{backbone}` in it is replaced by the backbone's name, so one template serves a grid of backbones",
    )
    pretrained_strict: bool = Field(
        True,
        description="refuse a pretrained file that would leave a tensor of the backbone as initialized (one "
        "it lacks or has in another shape); false: load what fits, and the trial's log and its MLflow run "
        "(tag orchestrator.pretrained_left_out) name the rest",
    )

    @model_validator(mode="after")
    def _multi_grid_on_resnets(self) -> ModelSpec:
        if self.multi_grid is None:
            return self
        blocks = BACKBONES[self.backbone].multi_grid_blocks
        if blocks is None:
            takers = [b.name for b in BACKBONES.values() if b.multi_grid_blocks]
            raise ValueError(
                f"multi_grid is defined for ResNet backbones ({', '.join(takers)}), not {self.backbone!r}"
            )
        if len(self.multi_grid) != blocks or min(self.multi_grid) < 1:
            raise ValueError(
                f"multi_grid needs {blocks} positive unit rates for {self.backbone!r} (one per block of its "
                f"last stage), got {list(self.multi_grid)}"
            )
        return self

    @property
    def pretrained_uri(self) -> str | None:
        return self.pretrained and self.pretrained.replace("{backbone}", self.backbone)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, v: str) -> str:
        return _one_of("backbone", v, BACKBONES)

    @field_validator("head")
    @classmethod
    def _known_head(cls, v: str | None) -> str | None:
        return v and _one_of("head", v, HEADS)


class StageSpec(_Section):
    """One stage of progressive scaling (training-procedures paper, Table II): small crops with large
    batches and LR first, the full crop last."""

    epochs: Int = Field(ge=1)
    crop: tuple[Int, Int] = Field(description="[width, height]")
    batch_per_gpu: Int = Field(ge=1)
    lr: Float = Field(gt=0, description="the base LR of the stage; the schedule runs over the whole run")

    @field_validator("crop")
    @classmethod
    def _positive_crop(cls, v: tuple[int, int]) -> tuple[int, int]:
        return _check_crop(v)


def _check_crop(v: tuple[int, int]) -> tuple[int, int]:
    if min(v) < 32:
        raise ValueError(f"crop {list(v)} is too small; both sides must be >= 32 pixels")
    return v


def _batch_or_auto(value: Any, handler: ValidatorFunctionWrapHandler) -> int | str:
    """One error for a bad batch, not one per member of the union (and no batch of True)."""
    try:
        batch = handler(value)
    except ValidationError:
        batch = 0
    if isinstance(value, bool) or batch != "auto" and not (isinstance(batch, int) and batch >= 1):
        raise ValueError("allowed are whole numbers >= 1 and auto")
    return batch


BatchPerGpu = Annotated[Annotated[int, Field(ge=1)] | Literal["auto"], WrapValidator(_batch_or_auto)]


def _gpus_or_auto(value: Any, handler: ValidatorFunctionWrapHandler) -> float | str:
    """Ray's rule for a resource: a fraction up to 1, whole numbers above; one error, not one per member of
    the union (and no True)."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value > 1 and value % 1:
        raise ValueError("allowed are 0 (the CPU), a fraction of a GPU up to 1, whole GPUs, and auto")
    return float(value)


GpusPerWorker = Annotated[float | Literal["auto"], WrapValidator(_gpus_or_auto)]

BUDGET_GRAMMAR = "epochs, steps:N (optimizer steps) or images:N (training images seen, over all workers)"
BUDGET_PATTERN = r"^(epochs|(steps|images):[1-9][0-9]*)$"
BUDGET_MEANINGS = {  # what each unit holds equal, in words: the field's description, the report's protocol
    "epochs": "every trial trains its epochs over the same images, a larger batch in fewer optimizer steps",
    "steps": "every trial takes the same optimizer steps, a larger batch seeing more images",
    "images": "every trial sees the same number of images, a larger batch in fewer optimizer steps",
}


@dataclass(frozen=True)
class Budget:
    """What `train.budget` holds equal over a grid: `epochs` (passes over the split: a larger batch takes
    fewer optimizer steps), or a number of optimizer `steps` or training `images`, spread evenly over the
    epochs, which are then evaluation rounds that may span several passes or part of one."""

    unit: Literal["epochs", "steps", "images"]
    total: int | None = None  # None for epochs

    @classmethod
    def parse(cls, text: str) -> Budget:
        unit, _, total = text.partition(":")
        return cls(unit) if unit == "epochs" else cls(unit, int(total))

    @property
    def protocol(self) -> str:
        """The comparison it makes, in words: `steps-equal (1024 steps)`."""
        return "epochs-equal" if self.total is None else f"{self.unit}-equal ({self.total} {self.unit})"

    @property
    def meaning(self) -> str:
        return BUDGET_MEANINGS[self.unit]


class TrainSpec(_Section):
    epochs: Int = Field(
        50,
        ge=1,
        description="epochs of the run (all stages together): passes over the split, or with a budget of "
        "steps or images the rounds it is spread over (each ends with a validation and a checkpoint)",
    )
    budget: str = Field(
        "epochs",
        description=f"what a grid holds equal: {BUDGET_GRAMMAR}. "
        + "; ".join(f"{unit}: {meaning}" for unit, meaning in BUDGET_MEANINGS.items()),
        json_schema_extra={"pattern": BUDGET_PATTERN},
    )
    batch_per_gpu: BatchPerGpu = Field(
        2,
        description="images per worker per forward: the normalization batch; auto: the largest that fits "
        "the GPU's memory by `orchestrator plan`'s estimate (the sweep's --gpu, else the cluster's GPU kind)",
    )
    accumulate: Int = Field(
        1,
        ge=1,
        description="micro-batches per optimizer step: the gradient batch is accumulate x batch_per_gpu",
    )
    precise_bn_batches: Int = Field(
        0, ge=0, description="recompute BN population statistics on this many batches before each evaluation"
    )
    crop: tuple[Int, Int] = Field((720, 720), description="training crop as [width, height]")
    scale: tuple[Float, Float] = Field((0.5, 2.0), description="random scale range before the crop")
    blur_p: Float = Field(0.5, ge=0, le=1, description="probability of a random Gaussian blur")
    blur_sigma: Float = Field(1.0, gt=0, description="the blur's sigma is drawn uniformly in (0, blur_sigma]")
    steps_per_epoch: Int | None = Field(
        None, ge=1, description="cap on optimizer steps per epoch (smoke runs; budget epochs only)"
    )
    stages: list[StageSpec] | None = Field(
        None,
        description="progressive scaling: consecutive stages of (epochs, crop, batch_per_gpu, lr) whose "
        "epochs add up to train.epochs; they replace crop, batch_per_gpu and lr epoch by epoch",
    )
    checkpoint_every: Int = Field(
        0, ge=0, description="also checkpoint every this many steps within an epoch (0: at epoch ends only)"
    )
    checkpoint_upload: Literal["background", "sync"] = Field(
        "background",
        description="how the checkpoints of checkpoint_every reach storage: uploaded while training goes on "
        "(one at a time), or with training waiting; those of epoch ends and preemption notices always wait",
    )
    lr: Float = Field(
        0.02, gt=0, description="the backbone's base learning rate (the head's: x head_lr_mult)"
    )
    lr_reference_batch: Int | None = Field(
        None,
        ge=1,
        description="linear scaling rule (as the GN and EvalNorm papers): lr and each stage's lr are meant "
        "for this many images per optimizer step over all workers, and scale with the actual number",
    )
    head_lr_mult: Float = Field(
        10.0, gt=0, description="learning-rate multiplier of the head (ASPP, decoder)"
    )
    momentum: Float = Field(0.9, ge=0, lt=1, description="SGD momentum; AdamW beta1 (one_cycle cycles it)")
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd", description="sgd: heavy-ball momentum; adamw: betas (momentum, 0.999), decoupled weight decay"
    )
    lr_schedule: Literal["poly", "one_cycle"] = Field(
        "poly",
        description="poly: lr x (1 - t)^0.9 after warmup_steps; one_cycle: lr is the peak (Smith)",
    )
    warmup_steps: Int = Field(0, ge=0, description="poly: linear warmup over this many optimizer steps")
    weight_decay: Float = Field(5e-4, ge=0, description="L2 (SGD) or decoupled (AdamW) weight decay")
    decay_norm_and_bias: bool = Field(False, description="also apply weight decay to norm weights and biases")
    loss: str = Field(
        "ce", description=f"loss spec string: {LOSS_GRAMMAR}", json_schema_extra={"pattern": LOSS_PATTERN}
    )
    mixup_alpha: Float = Field(
        0.0, ge=0, description="mixup: images mixed with lam ~ Beta(alpha, alpha), soft labels (0: off)"
    )
    sample_weights_from: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{32}$",
        description="MLflow run id of an `orchestrator evaluate` of the training split: its per-image "
        "scores repeat the worst images (repeat_below) or drop those below drop_below (the BDD100K report, "
        "Section X)",
    )
    sample_score: Literal["miou", "miou_official"] = Field(
        "miou", description="the per-image score of sample_weights_from that repeat_below and drop_below read"
    )
    repeat_below: Float | None = Field(
        None, gt=0, le=1, description="images scoring below this are read repeat_times times per epoch"
    )
    repeat_times: Int = Field(
        2, ge=1, description="copies per epoch of an image scoring below repeat_below (1: a grid's baseline)"
    )
    drop_below: Float | None = Field(
        None, gt=0, le=1, description="images scoring below this are left out (suspected wrong labels)"
    )
    amp: Literal["off", "bf16", "fp16"] = Field(
        "off",
        description="mixed precision: bf16 (CPU and GPU) or fp16 (with a gradient scaler); norms keep their "
        "statistics in fp32",
    )
    seed: Int = Field(
        0, description="seeds weights, augmentation, mixup and dropout: a CPU run is bit-identical"
    )
    diverge_nonfinite_steps: Int = Field(
        3,
        ge=0,
        description="the divergence guard: a step whose loss is not finite changes no weight, and this many "
        "in a row end the trial as diverged (0: the first fails the trial)",
    )
    diverge_single_class_epochs: Int = Field(
        2,
        ge=0,
        description="the divergence guard: a trial whose validation predicts one class over the whole split "
        "at this many epochs in a row, each ending after warmup_steps, ends as diverged (0: off)",
    )

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        parse_loss(v)
        return v

    @field_validator("budget")
    @classmethod
    def _known_budget(cls, v: str) -> str:
        if not re.fullmatch(BUDGET_PATTERN, v):
            raise ValueError(f"unknown budget; allowed: {BUDGET_GRAMMAR}")
        return v

    @model_validator(mode="after")
    def _budget_alone(self) -> TrainSpec:
        budget = Budget.parse(self.budget)
        if budget.total is None:
            return self
        if self.stages:
            raise ValueError(
                f"train.budget {self.budget} does not go with train.stages (their batches change the images "
                "of a step): use budget epochs"
            )
        if self.steps_per_epoch:
            raise ValueError(
                f"train.steps_per_epoch caps an epoch of budget epochs; train.budget {self.budget} sets the "
                "steps itself: remove one"
            )
        if budget.unit == "steps" and budget.total < self.epochs:
            raise ValueError(
                f"train.budget {self.budget} is fewer steps than train.epochs {self.epochs} (one per epoch "
                f"at least): raise it to {self.epochs} or more"
            )
        return self

    def images_per_step(self, workers: int) -> int:
        """Training images of one optimizer step over all workers (stage batches aside)."""
        return self.accumulate * self.batch_per_gpu * workers

    def budget_steps(self, workers: int) -> list[int] | None:
        """The optimizer steps of each epoch that train.budget fixes, its steps (or images) spread evenly
        over the epochs; None under `epochs`, where the data gives them (a pass each, steps_per_epoch at
        most)."""
        budget = Budget.parse(self.budget)
        if budget.total is None:
            return None
        total = budget.total if budget.unit == "steps" else budget.total // self.images_per_step(workers)
        return [total * (e + 1) // self.epochs - total * e // self.epochs for e in range(self.epochs)]

    @model_validator(mode="after")
    def _resampling_is_complete(self) -> TrainSpec:
        thresholds = {"repeat_below": self.repeat_below, "drop_below": self.drop_below}
        if self.sample_weights_from is None:
            given = [k for k, v in thresholds.items() if v is not None]
            if given:
                raise ValueError(
                    f"train.{given[0]} needs train.sample_weights_from, the run that scored the images"
                )
        elif all(v is None for v in thresholds.values()):
            raise ValueError("train.sample_weights_from needs train.repeat_below, train.drop_below or both")
        if None not in thresholds.values() and self.drop_below >= self.repeat_below:
            raise ValueError(
                f"train.drop_below ({self.drop_below}) must be below train.repeat_below "
                f"({self.repeat_below}): images below drop_below are left out, those between the two repeated"
            )
        return self

    @model_validator(mode="after")
    def _warmup_is_polys(self) -> TrainSpec:
        if self.warmup_steps and self.lr_schedule != "poly":
            raise ValueError("train.warmup_steps applies to lr_schedule poly; one_cycle has its own warmup")
        # Without steps_per_epoch the run's steps come from the data: the loop checks then.
        if self.steps_per_epoch and self.warmup_steps >= self.epochs * self.steps_per_epoch:
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} does not fit a run of {self.epochs} epochs x "
                f"{self.steps_per_epoch} steps: lower it below {self.epochs * self.steps_per_epoch}"
            )
        return self

    @field_validator("crop")
    @classmethod
    def _positive_crop(cls, v: tuple[int, int]) -> tuple[int, int]:
        return _check_crop(v)

    @model_validator(mode="after")
    def _auto_batch_without_stages(self) -> TrainSpec:
        if self.batch_per_gpu == "auto" and self.stages:
            raise ValueError(
                "train.batch_per_gpu: auto does not go with train.stages: each stage names its batch"
            )
        return self

    @model_validator(mode="after")
    def _stages_cover_the_epochs(self) -> TrainSpec:
        if self.stages and sum(s.epochs for s in self.stages) != self.epochs:
            raise ValueError(
                f"train.stages last {sum(s.epochs for s in self.stages)} epochs in all, train.epochs is "
                f"{self.epochs}: make them equal"
            )
        return self

    def stage(self, epoch: int) -> StageSpec:
        """The stage of a 0-based epoch; without stages, one stage of the train section's own values."""
        for stage in self.stages or ():
            if epoch < stage.epochs:
                return stage
            epoch -= stage.epochs
        return StageSpec(epochs=self.epochs, crop=self.crop, batch_per_gpu=self.batch_per_gpu, lr=self.lr)

    @field_validator("scale")
    @classmethod
    def _ordered_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"scale {list(v)} must be [low, high] with 0 < low <= high")
        return v


class ResourcesSpec(_Section):
    workers_per_trial: Int = Field(2, ge=1, description="Ray Train workers (DDP ranks) per trial")
    gpus_per_worker: GpusPerWorker = Field(
        0,
        description="0 runs on CPU with gloo; >0 on CUDA with nccl. A fraction packs workers of several "
        "trials on one GPU, each within its fraction of the GPU's memory less 10% by `orchestrator plan`'s "
        "estimate (a point that would not fit is refused); auto: the smallest fraction 1/n that holds the "
        "worker, n at most 8 (a trial of several workers takes whole GPUs unless placement is strict_spread)",
    )
    cpus_per_worker: Float = Field(
        1,
        gt=0,
        description="CPUs each worker holds (its DataLoader processes run on them); on the CPU, their share "
        "of a node's memory (Ray's) less 10% must hold the worker by `orchestrator plan`'s estimate",
    )
    max_concurrent_trials: Int = Field(1, ge=1, description="trials Tune runs at once")
    max_failures: Int = Field(
        2,
        ge=-1,
        description="restarts of a trial from its last checkpoint after a worker or node dies (-1: no limit)",
    )
    max_preemptions: Int = Field(
        -1,
        ge=-1,
        description="restarts after a node the trial ran on was preempted (drained by the cloud's notice): "
        "counted apart from max_failures, as nothing in the trial was wrong (-1: no limit)",
    )
    placement: Literal["pack", "spread", "strict_spread"] = Field(
        "pack",
        description="a trial's workers: packed on few nodes, spread over nodes where possible, or each on "
        "its own node (strict_spread)",
    )
    wait_for_nodes: bool = Field(
        False,
        description="on an autoscaling cluster: a trial the current nodes cannot place waits for the nodes "
        "it needs, instead of the sweep being refused",
    )

    @model_validator(mode="after")
    def _one_gpu_per_rank(self) -> ResourcesSpec:
        g = self.gpus_per_worker
        if self.workers_per_trial > 1 and g != "auto" and 0 < g < 1 and self.placement != "strict_spread":
            raise ValueError(
                f"resources.gpus_per_worker {g:g} with workers_per_trial {self.workers_per_trial}: Ray may "
                "put two ranks of the trial on one GPU, which NCCL refuses; pack trials of one worker, or "
                "set placement: strict_spread (one worker per node)"
            )
        return self


SCHEDULER_METRICS = {"val_miou": "max", "val_miou_official": "max", "train_loss": "min"}  # -> Tune's mode


class SearchSpec(_Section):
    """How Tune schedules the grid's trials: the sweep's, one for all of them."""

    scheduler: Literal["none", "asha", "median"] = Field(
        "none",
        description="none: every trial runs its epochs (a study completes its grid); asha: asynchronous "
        "successive halving stops the trials below the best 1/reduction_factor at each rung; median: stops "
        "a trial whose best is below the median of the others' running averages at the same epoch",
    )
    metric: Literal[tuple(SCHEDULER_METRICS)] = Field(
        "val_miou", description="the epoch-end metric the scheduler compares (its direction is known)"
    )
    grace_epochs: Int = Field(1, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: Float = Field(
        2, gt=1, description="asha: the fraction 1/reduction_factor of the trials at a rung goes on"
    )
    min_samples: Int = Field(
        3, ge=1, description="median: trials that must have reached an epoch before one is stopped there"
    )


class TrackingSpec(_Section):
    experiment: str | None = Field(None, description="MLflow experiment; defaults to the spec's name")


class Spec(_Section):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the sweep's name (and MLflow experiment)"
    )
    data: DataSpec
    model: ModelSpec = Field(default_factory=ModelSpec)
    norm: str = Field(
        "bn", description=f"norm spec string: {norm_grammar()}", json_schema_extra={"pattern": norm_pattern()}
    )
    train: TrainSpec = Field(default_factory=TrainSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage: Url | None = Field(None, description="URI for Ray Train checkpoints and Tune state")
    storage_shared: bool = Field(
        False,
        description="storage (and a SQLite or file MLflow store) is on a filesystem every node mounts: "
        "a cluster of many nodes then accepts a local path",
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="dotted keys of the fields above -> lists of values"
    )

    @field_validator("norm")
    @classmethod
    def _known_norm(cls, v: str) -> str:
        parse_norm(v)
        return v

    @model_validator(mode="after")
    def _budget_fits(self) -> Spec:
        t, workers = self.train, self.resources.workers_per_trial
        budget = Budget.parse(t.budget)
        if budget.unit == "images":
            if t.batch_per_gpu == "auto":
                raise ValueError(
                    f"train.budget {t.budget} needs a fixed train.batch_per_gpu: its images make a number of "
                    "steps only at a known batch (auto picks it later)"
                )
            step = t.images_per_step(workers)
            if budget.total % step or budget.total // step < t.epochs:
                at_least = step * t.epochs
                nearest = max(at_least, round(budget.total / step) * step)
                raise ValueError(
                    f"train.budget {t.budget}: a step trains {step} images (train.accumulate "
                    f"{t.accumulate} x batch_per_gpu {t.batch_per_gpu} x {workers} workers), and the budget "
                    f"must be whole steps, one per epoch at least: e.g. images:{nearest}"
                )
        steps = t.budget_steps(workers)
        if steps and t.warmup_steps >= sum(steps):
            raise ValueError(
                f"train.warmup_steps={t.warmup_steps} does not fit train.budget {t.budget} "
                f"({sum(steps)} steps): lower it below {sum(steps)}"
            )
        return self

    @model_validator(mode="after")
    def _model_fits(self) -> Spec:
        m = self.model
        config = resolve({"model.backbone": m.backbone, "model.head": m.head,
                          "model.output_stride": m.output_stride})  # fmt: skip
        try:
            norm = parse_norm(self.norm)
            check_model(m.backbone, config["model.head"], config["model.output_stride"], norm)
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
        return self

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name


def _one_of(field: str, value: str, allowed: Iterable[str]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {field} {shown(value)}; allowed: {', '.join(allowed)}")
    return value


# ---------------------------------------------------------------- flat configs


def flatten(spec: Spec) -> dict[str, Any]:
    """The spec without its grid as a flat dict of dotted keys (dict-valued fields stay whole)."""
    flat: dict[str, Any] = {}

    def walk(model: BaseModel, prefix: str) -> None:
        for key in type(model).model_fields:
            if key == "grid":
                continue
            value = getattr(model, key)
            if isinstance(value, BaseModel):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
                flat[prefix + key] = [v.model_dump(mode="json") for v in value]  # JSON-able, e.g. stages
            else:
                flat[prefix + key] = list(value) if isinstance(value, tuple) else value

    walk(spec, "")
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        _set_path(nested, key.split("."), value)
    return nested


def from_flat(flat: dict[str, Any]) -> Spec:
    """Rebuild a validated Spec from a trial config (its grid is empty: the point is fixed)."""
    return Spec.model_validate(unflatten(flat))


def grid_keys() -> list[str]:
    """Every key a grid may sweep over."""
    example = Spec(name="x", data=DataSpec(train="x", val="x"))
    return [k for k in flatten(example) if k != "name"]


@dataclass(frozen=True, repr=False)
class Trial:
    """One grid point: its key, its flat config (the form at the edges: Tune shows the key, MLflow the
    config's params) and its validated spec, which travels to the trial's driver and workers as it is."""

    key: str  # `norm=bn,train.batch_per_gpu=2`, `base` without a grid
    config: dict[str, Any]  # flat, dotted keys, the backbone's defaults filled in
    spec: Spec
    name: str = "base"  # its swept values, `bn 2`: its MLflow run's name, short enough to show whole

    def __str__(self) -> str:
        return self.key

    def __repr__(self) -> str:  # what Tune prints of a trial's params: the key, never the whole config
        return f"Trial({self.key!r})"

    def without_secrets(self) -> Trial:
        """This trial less `data.storage_options` (where s3fs credentials can go): what Tune's config holds,
        which Tune prints and saves on storage. `with_storage_options` puts them back."""
        return self.with_storage_options({})

    def with_batch(self, batch: int) -> Trial:
        """This trial at `batch` images per GPU (what `train.batch_per_gpu: auto` chose); its key keeps
        `auto`."""
        train = self.spec.train.model_copy(update={"batch_per_gpu": batch})
        config = {**self.config, "train.batch_per_gpu": batch}
        return replace(self, config=config, spec=self.spec.model_copy(update={"train": train}))

    def with_gpus_per_worker(self, share: float) -> Trial:
        """This trial at `share` of a GPU per worker (what `resources.gpus_per_worker: auto` chose); its key
        keeps `auto`."""
        resources = self.spec.resources.model_copy(update={"gpus_per_worker": share})
        config = {**self.config, "resources.gpus_per_worker": share}
        return replace(self, config=config, spec=self.spec.model_copy(update={"resources": resources}))

    def with_storage_options(self, options: dict[str, Any]) -> Trial:
        config = {**self.config, "data.storage_options": options}
        data = self.spec.data.model_copy(update={"storage_options": options})
        return replace(self, config=config, spec=self.spec.model_copy(update={"data": data}))


def expand(spec: Spec) -> list[Trial]:
    """The trials of the spec's grid, in the order of the grid's keys (last varies fastest): the one place
    trials are enumerated."""
    return [
        Trial(trial_key(config, spec.grid), config, from_flat(config), trial_name(config, spec.grid))
        for config in _points(spec)
    ]


def _points(spec: Spec) -> list[dict[str, Any]]:
    """One flat config per grid point."""
    base = flatten(spec)
    keys = list(spec.grid)
    points = itertools.product(*(spec.grid[k] for k in keys)) if keys else [()]
    return [resolve({**base, **dict(zip(keys, point, strict=True))}) for point in points]


def resolve(config: dict[str, Any]) -> dict[str, Any]:
    """The trial config with the model defaults that depend on its backbone filled in (head, output
    stride), so that a grid over backbones gives each its own and MLflow shows what ran."""
    backbone = config["model.backbone"]
    return {
        **config,
        "model.head": config["model.head"] or default_head(backbone),
        "model.output_stride": config["model.output_stride"] or output_strides(backbone)[0],
    }


def trial_name(config: dict[str, Any], grid_keys: Iterable[str]) -> str:
    """The swept values of a grid point, `bn 2` (`base` without a grid): distinct as the keys are, and short
    enough for the MLflow runs table to show whole; the key, which names the fields, is the run's tag."""
    return " ".join(_compact(config[k]) for k in grid_keys) or "base"


def trial_key(config: dict[str, Any], grid_keys: Iterable[str]) -> str:
    """A short, stable name of a grid point: `norm=bn,train.batch_per_gpu=2` (`base` without a grid)."""
    return ",".join(f"{k}={_compact(config[k])}" for k in grid_keys) or "base"


def public_params(config: dict[str, Any]) -> dict[str, Any]:
    """The trial config less its secret keys, secrets inside other values and passwords written into URLs
    masked (orchestrator/masking.py): what MLflow, checkpoints and tables show. Credentials belong in the
    environment."""
    return {k: masked(k, v) for k, v in config.items() if not is_secret(k)}


def _compact(value: Any) -> str:
    """[720, 720] -> 720x720; a stage {epochs, crop, batch_per_gpu, lr} -> 100:384x384:16:0.04, stages
    joined by |. Keys are run names and MLflow filter values: no quotes, no spaces."""
    if isinstance(value, dict):
        return ":".join(_compact(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return ("|" if any(isinstance(v, dict) for v in value) else "x").join(_compact(v) for v in value)
    return str(redact(value))


# ---------------------------------------------------------------- loading and validation


def load(path: str | Path, overrides: Iterable[str] = ()) -> Spec:
    """Read, override and validate a spec file; raise SpecError with one line per problem."""
    path = Path(path)
    try:
        raw = read_yaml(path.read_text(), str(path))
    except (FileNotFoundError, IsADirectoryError):
        raise SpecError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([f"{path}: cannot be read as text: {e}"]) from None
    except UsageError as e:
        raise SpecError([str(e)]) from None
    if not isinstance(raw, dict):
        raise SpecError([f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}"])
    raw = apply_overrides(raw, overrides)
    return validate(raw)


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """`key=value` pairs (values parsed as YAML 1.2: `off` is text) set on the raw spec. Setting a key
    the grid sweeps over fixes it to that value (the grid axis is dropped); `grid.<key>=[...]` replaces an
    axis."""
    raw = copy.deepcopy(raw)
    errors = []
    for item in overrides:
        key, sep, text = item.partition("=")
        where = f"--set {cut(redact_arg(item))}"
        if not sep or not key:
            errors.append(f"--set {shown(item)}: expected key=value, e.g. --set train.epochs=2")
            continue
        if not text.strip():
            errors.append(f"{where}: no value; write null to unset a field")
            continue
        try:
            value = read_yaml(text, where)
        except UsageError as e:
            errors.append(str(e))
            continue
        if key.startswith("grid."):
            raw.setdefault("grid", {})[key[len("grid.") :]] = value
            continue
        grid = raw.get("grid")
        if isinstance(grid, dict) and key in grid:
            del grid[key]
            if not grid:  # the last axis was fixed: one trial, not an "empty grid" error
                del raw["grid"]
        _set_path(raw, key.split("."), value)
    if errors:
        raise SpecError(errors)
    return raw


def validate(raw: dict[str, Any]) -> Spec:
    errors: list[str] = []
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_describe(e, prefix="")) from None
    if "grid" in raw and not spec.grid:
        errors.append("grid: empty; list values for at least one key, or remove `grid` to run one trial")
    size = _grid_size_problem(spec.grid)
    if size:  # before any value is validated: a long axis would take minutes
        raise SpecError([*errors, size])
    allowed, base = grid_keys(), flatten(spec)
    for key, values in spec.grid.items():
        if key not in allowed:
            errors.append(f"grid.{cut(key)}: unknown key; allowed: {', '.join(allowed)}")
        elif key.startswith("search.") or key == "resources.max_concurrent_trials":
            errors.append(f"grid.{key}: the sweep's, one for all of its trials")
        elif is_secret(key):
            errors.append(
                f"grid.{key}: credentials are no grid axis (a trial's key shows in run names, the console "
                f"and Tune's files); set {key} once, outside the grid"
            )
        elif not values:
            errors.append(f"grid.{key}: empty list; give at least one value")
        else:
            for i, value in enumerate(values):
                try:
                    from_flat({**base, key: value})
                except ValidationError as e:
                    errors += _describe(e, prefix=f"grid.{key}[{i}] -> ", only=key)
    if not errors:  # each value is valid alone: now every combination the grid makes
        for config in _points(spec):
            try:
                from_flat(config)
            except ValidationError as e:
                errors += _describe(e, prefix=f"grid point {trial_key(config, spec.grid)}: ")
        if len(errors) > MAX_POINT_ERRORS:
            errors[MAX_POINT_ERRORS:] = [f"... and {len(errors) - MAX_POINT_ERRORS} more invalid grid points"]
    if errors:
        raise SpecError(errors)
    return spec


def _grid_size_problem(grid: dict[str, list[Any]]) -> str | None:
    """Why the grid has too many trials (more than ORCHESTRATOR_MAX_TRIALS, default MAX_TRIALS), from its
    axes' lengths alone: a grid of many axes would not fit in memory once expanded."""
    text = os.environ.get(MAX_TRIALS_ENV, str(MAX_TRIALS))
    if not text.isdecimal() or int(text) < 1:
        return f"{MAX_TRIALS_ENV}={shown(text)}: expected a whole number >= 1"
    limit, trials = int(text), math.prod(len(values) for values in grid.values())
    if trials <= limit:
        return None
    axes = " x ".join(f"{len(values):,} {cut(key, 40)}" for key, values in grid.items())
    return f"grid: {axes} make {trials:,} trials, more than {limit:,} ({MAX_TRIALS_ENV} raises the limit)"


def _describe(error: ValidationError, prefix: str, only: str | None = None) -> list[str]:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if only is not None and not (loc == only or loc.startswith(only + ".")):
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:  # a check across sections: its message names the fields and values
            lines.append(f"{prefix}{msg}")
            continue
        if err["type"] == "extra_forbidden":
            msg = f"unknown key; allowed: {', '.join(_fields_at(err['loc'][:-1]))}"
            loc = ".".join([*map(str, err["loc"][:-1]), cut(str(err["loc"][-1]))])
        elif err["type"] == "missing":
            msg = "required, missing"
        shown_ = err["type"] != "missing" and not isinstance(err["input"], dict)  # not a whole section
        value = f" (got {shown(masked(loc, err['input']))})" if shown_ else ""
        lines.append(f"{prefix}{loc}: {msg}{value}")
    return lines


def _fields_at(loc: tuple) -> list[str]:
    model: type[BaseModel] = Spec
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def _set_path(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        child = tree.get(part)
        if not isinstance(child, dict):
            child = tree[part] = {}
        tree = child
    tree[parts[-1]] = value


def json_schema() -> dict[str, Any]:
    """The spec's JSON Schema, with the grid's keys enumerated so editors complete them."""
    schema = Spec.model_json_schema()
    schema["properties"]["grid"]["propertyNames"] = {"enum": grid_keys()}
    return schema


def public_document(spec: Spec) -> dict[str, Any]:
    """The spec as a nested document of every field (defaults filled in) and its grid, less its secrets
    (public_params): what a sweep's MLflow run keeps as the spec it ran, loadable as a spec again."""
    doc: dict[str, Any] = {}
    for key, value in public_params(flatten(spec)).items():
        *sections, field = key.split(".")
        node = doc
        for section in sections:
            node = node.setdefault(section, {})
        node[field] = value
    if spec.grid:
        doc["grid"] = {k: v for k, v in spec.grid.items() if not is_secret(k)}
    return doc


def describe_grid(spec: Spec) -> str:
    """A human table of the expanded grid (what `orchestrator spec SPEC` prints)."""
    trials = expand(spec)
    lines = [f"{spec.name}: {len(trials)} trial(s), experiment {spec.experiment!r}"]
    lines += [f"  {i:3d}  {trial.key}" for i, trial in enumerate(trials)]
    return "\n".join(lines)
