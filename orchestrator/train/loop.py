"""The per-worker training loop that Ray Train runs on every DDP rank of a trial.

Every rank computes; metrics are all-reduced before they are reported, so the numbers a trial
reports are the trial's, not rank 0's. Rank 0 alone writes checkpoints and logs to MLflow.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any, NamedTuple

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from orchestrator import checkpoints, metrics
from orchestrator.data.layout import NUM_CLASSES
from orchestrator.data.shards import read_manifest
from orchestrator.data.stream import Loader, Passes, input_mean_std, spec_loader
from orchestrator.data.transforms import MeanStd
from orchestrator.loss_spec import parse_loss
from orchestrator.models.evalnorm import evalnorm_parameters
from orchestrator.models.pretrained import listed
from orchestrator.spec import Spec, TrainSpec, public_params
from orchestrator.train import schedules
from orchestrator.train.checkpoint_upload import CheckpointUploads
from orchestrator.train.distributed import (
    all_reduce,
    average_buffers,
    count_distinct,
    distribute,
    gather_rows,
    unwrap,
)
from orchestrator.train.divergence import Diverged, DivergenceGuard, NonFiniteLoss
from orchestrator.train.losses import Loss, make_loss
from orchestrator.train.precise_bn import precise_bn
from orchestrator.train.preemption import Notices, fits
from orchestrator.train.step import accumulate_gradients, autocast, out_of_memory
from orchestrator.train.stopping import Stopped, StopRequest

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where this worker process's attempt got: what Ray Train's controller asks the ranks still alive when
    the attempt ends (execution/trainer.py). The ranks step, and act on a notice, together: any of them
    answers for the attempt."""

    steps: int | None = None  # the trial's optimizer steps done (None before the attempt starts)
    notices: Notices | None = None  # the attempt's preemption notices

    def unheeded_notice_s(self) -> float | None:
        """The seconds left of a preemption notice the attempt never got to act on (no step ended between
        the notice and the end), else None."""
        if self.notices is None or self.notices.acted:
            return None
        return self.notices.left()


PROGRESS = Progress()


@dataclass(frozen=True)
class Worker:
    """Who is running: the trial's spec, this rank, the world size, the device, the nodes of the group."""

    spec: Spec
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    repeats: dict[str, int] | None = None  # train.sample_weights_from, resolved by the trial's driver
    nodes: int = 1  # distinct Ray nodes the ranks run on (placement: pack | spread | strict_spread)

    def __post_init__(self) -> None:
        if self.spec.train.sample_weights_from and self.repeats is None:
            raise ValueError("train.sample_weights_from is set: pass the driver's plan as repeats")

    @cached_property
    def device_name(self) -> str:
        """The device's kind as torch names it ("NVIDIA A10G"), or cpu: `orchestrator plan` reads the
        throughput of finished trials by it."""
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type

    @cached_property
    def mean_std(self) -> MeanStd:
        """The input normalization: the training split's RGB statistics or ImageNet's."""
        return input_mean_std(self.spec.data)

    def loader(self, *, train: bool, epoch: int = 0, start_batch: int = 0) -> Loader:
        """This rank's loader of an epoch (see data.stream.spec_loader)."""
        return spec_loader(
            self.spec.data,
            self.spec.train,
            train=train,
            mean_std=self.mean_std,
            rank=self.rank,
            world_size=self.world,
            epoch=epoch,
            start_batch=start_batch,
            device=self.device,
            repeats=self.repeats,
        )

    def train_batches(self, position: Position) -> Loader | Passes:
        """This rank's training batches of `position`'s epoch from its step on: the epoch's pass, or under
        a budget of steps or images the run of passes its steps take up where the last epoch's ended."""
        t = self.spec.train
        if t.budget_steps(self.world) is None:
            return self.loader(train=True, epoch=position.epoch, start_batch=position.step * t.accumulate)
        start = self.global_step(position) * t.accumulate
        return Passes(lambda index, batch: self.loader(train=True, epoch=index, start_batch=batch),
                      self.pass_batches, start)  # fmt: skip

    @cached_property
    def pass_batches(self) -> int:
        """This rank's batches in one pass over the training split (at the first stage's batch)."""
        return len(self.loader(train=True))

    def base_lr(self, epoch: int) -> float:
        """The epoch's stage LR, scaled by train.lr_reference_batch's linear rule where that is set."""
        t = self.spec.train
        stage = t.stage(epoch)
        if t.lr_reference_batch is None:
            return stage.lr
        return stage.lr * stage.batch_per_gpu * t.accumulate * self.world / t.lr_reference_batch

    @cached_property
    def loss(self) -> Loss:
        """The training objective of `train.loss`; balanced CE weighs classes by the training manifest."""
        spec, d = parse_loss(self.spec.train.loss), self.spec.data
        if not spec.needs_class_pixels:
            return make_loss(spec)
        return make_loss(spec, read_manifest(d.train, d.storage_options)["class_pixels"])

    def global_step(self, position: Position) -> int:
        """The optimizer steps of the whole trial done at `position`."""
        return sum(self.epoch_steps[: position.epoch]) + position.step

    def images_trained(self, epochs: int) -> int:
        """The images the trial's schedule trains on in its first `epochs` epochs, over all ranks: what its
        GPU-seconds bought (`orchestrator plan` learns a point's throughput from the two)."""
        t = self.spec.train
        return sum(
            steps * t.accumulate * t.stage(epoch).batch_per_gpu * self.world
            for epoch, steps in enumerate(self.epoch_steps[:epochs])
        )

    @cached_property
    def epoch_steps(self) -> list[int]:
        """Optimizer steps of each epoch: train.budget's steps or images, or under budget epochs a pass each
        (stages change the batch, hence the count), equal on every rank as the loader's batch count is. The
        LR schedule runs over their sum."""
        t = self.spec.train
        fixed = t.budget_steps(self.world)
        if fixed is not None:  # the budget's, from the spec alone: its epochs need not be passes
            return fixed
        batches = [t.stage(epoch).batch_per_gpu for epoch in range(t.epochs)]
        steps: dict[int, int] = {}  # one loader (a manifest read) per distinct batch, not per epoch
        for epoch, batch in enumerate(batches):
            if batch in steps:
                continue
            count = len(self.loader(train=True, epoch=epoch)) // t.accumulate
            if count == 0:
                raise ValueError(
                    f"train.accumulate={t.accumulate} x batch_per_gpu={batch} x {self.world} workers needs "
                    f"more training samples than {self.spec.data.train} holds"
                )
            steps[batch] = min(count, t.steps_per_epoch or count)
        return [steps[batch] for batch in batches]


@dataclass
class Position:
    """Where training stands: `step` optimizer steps into `epoch` (0-based), with the trial's sums over
    those steps. Saved in every checkpoint, so a trial resumed mid-epoch neither replays nor skips a batch
    and still reports the whole epoch's loss and skipped samples."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    skipped: int = 0
    nonfinite: int = 0  # steps of the epoch skipped for a non-finite loss (the divergence guard)


STAGED = ("batch_per_gpu", "crop_width", "crop_height")  # what stages change: per epoch in MLflow, if staged


class Best(NamedTuple):
    """The trial's best validation so far: its mIoU and its epoch (1-based; 0 before any)."""

    miou: float
    epoch: int


def train_loop_per_worker(
    config: dict[str, Any],
    *,
    notice_left_s: Callable[[float], float | None],
    persist_checkpoint: Callable[[ray.train.Checkpoint, str], ray.train.Checkpoint],
) -> None:
    """`config`: {"trial": the spec.Trial, "mlflow_run_id": child run, "tracking_uri": MLflow store,
    "repeats": the resampling plan or None, "stop_requests": the sweep's (train/stopping.py) or None}.

    What the loop takes from Ray Train's private API comes from the caller (execution/trainer.py, where
    that API's adapter lives): `notice_left_s(now_ms)`, the seconds this worker has left after a
    preemption notice, and `persist_checkpoint`, Ray Train's own copy of a checkpoint folder to storage."""
    ctx = ray.train.get_context()
    w = Worker(
        config["trial"].spec,
        ctx.get_world_rank(),
        ctx.get_world_size(),
        ray.train.torch.get_device(),
        config.get("repeats"),
        count_distinct(ray.get_runtime_context().get_node_id()),
    )

    torch.manual_seed(w.spec.train.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = distribute(checkpoints.model_for(w.spec), w.device)
    net = unwrap(model)
    # Only model.pretrained_strict: false leaves something out; ENet, a whole model, takes no pretrained file.
    if w.rank == 0 and w.spec.model.pretrained_uri and net.pretrained_left_out:
        _tag_pretrained_left_out(config, net.pretrained_left_out)
    optimizer = make_optimizer(w.spec.train, net)

    scaler = torch.amp.GradScaler(w.device.type) if w.spec.train.amp == "fp16" else None
    position, best = Position(), Best(-math.inf, 0)
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            state = checkpoints.load(Path(d) / checkpoints.FILE)
        position, best = restore(state, net, optimizer, scaler, w.device)
        log.info("rank %d resumed at epoch %d step %d", w.rank, position.epoch + 1, position.step)
        if w.rank == 0:
            _log_resume(w, config, position, preempted=state.get("preempted", False))
            if state.get("report"):  # the attempt before may have died before logging it
                _log_epoch(w, config, net, state["report"], state["improved"])
    PROGRESS.steps = w.global_step(position)
    # An attempt from scratch may follow one that died before its first checkpoint: rank 0 looks once it
    # has MLflow imported, at its first epoch's end.
    fresh = not resumed
    notices = PROGRESS.notices = Notices(lambda: notice_left_s(time.time() * 1000))
    uploads = CheckpointUploads(persist_checkpoint)
    guard = DivergenceGuard.of(w.spec.train)
    stop = StopRequest.of(config.get("stop_requests"), config["trial"].key)

    def save(
        p: Position,
        report: dict[str, float] | None = None,
        improved: bool = False,
        preempted: bool = False,
        per_image: torch.Tensor | None = None,
    ) -> None:
        background = upload_in_background(w.spec.train, epoch_end=report is not None, preempted=preempted)
        started = time.monotonic()
        state = {**resume_state(optimizer, scaler, p, best, w.device), "preempted": preempted}
        _report(w, config, net, state, report, improved, uploads, background, per_image)
        if not background:  # what a notice's checkpoint would take: the upload included
            notices.checkpoint_s = time.monotonic() - started

    def noticed(p: Position) -> None:
        _on_notice(w, config, notices, save, p)

    try:
        while position.epoch < w.spec.train.epochs:
            trained = train_epoch(
                w, model, optimizer, position, save, scaler, noticed, notices, guard=guard, stop=stop
            )
            report = {
                "epoch": position.epoch + 1,
                **trained,
                "images_trained": w.images_trained(position.epoch + 1),
            }
            if w.spec.train.precise_bn_batches:
                images = (x for x, _ in w.loader(train=True, epoch=position.epoch))
                precise_bn(net, images, w.spec.train.precise_bn_batches)
            scores, per_image = validate(w, net)
            report.update(scores)
            improved = report["val_miou"] > best.miou
            if improved:
                best = Best(report["val_miou"], report["epoch"])
            report["best_val_miou"], report["best_epoch"] = best  # the headline: what the UI leads with
            position = Position(epoch=position.epoch + 1)
            save(position, report, improved, per_image=per_image)
            if fresh and w.rank == 0:
                _log_resume(w, config, Position(), preempted=False, fresh=True)
            fresh = False
            guard.validated(report["val_predicted_classes"], position.epoch, w.global_step(position))
    except (Diverged, Stopped) as e:
        # Every rank ends here, at the same step: the trial ended early, its checkpoints kept. Rank 0 says why
        # on its run; the trial's driver ends the run with it.
        outcome = "diverged" if isinstance(e, Diverged) else "stopped"
        log.warning("%s: %s: %s", w.spec.name, outcome, e)
        if w.rank == 0:
            from orchestrator import tracking  # see _log_epoch

            tracking.end_early(config["mlflow_run_id"], outcome, str(e), config["tracking_uri"])
    except Exception as e:
        if not (isinstance(e, NonFiniteLoss) or out_of_memory(e)):
            raise  # a worker or node failure: Ray Train restarts the trial from its checkpoint
        # Deterministic: a restart from the last checkpoint would fail the same way, so the workers end
        # normally (no retry) and rank 0 records why; the trial driver then fails the trial with it.
        # Every rank meets a non-finite loss at the same step: the loss is all-reduced.
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        log.error("%s: %s", w.spec.name, reason)
        if w.rank == 0:
            from orchestrator import tracking  # see _log_epoch

            tracking.set_tags(config["mlflow_run_id"], {tracking.FAILURE: reason}, config["tracking_uri"])


def upload_in_background(train: TrainSpec, epoch_end: bool, preempted: bool) -> bool:
    """Whether a checkpoint's upload may run while training goes on: only an interval checkpoint's. An epoch's
    metrics reach MLflow once its checkpoint is stored, and a preempted node must not go before its
    checkpoint does."""
    return train.checkpoint_upload == "background" and not (epoch_end or preempted)


def resume_state(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    position: Position,
    best: Best,
    device: torch.device,
) -> dict[str, Any]:
    """What a checkpoint holds, besides the weights, to go on exactly where training stands: the optimizer,
    the fp16 loss scale, the position and the RNG that mixup, dropout and randperm draw from (augmentation
    draws from generators seeded by sample position, and the loaders keep off the global RNG)."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return {
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "rng": rng,
        "position": asdict(position),
        "best": best.miou,
        "best_epoch": best.epoch,
    }


def restore(
    state: dict[str, Any],
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
) -> tuple[Position, Best]:
    """Put a checkpoint's weights and resume_state back; returns where training stands and the best
    val_miou so far. Checkpoints written before the scaler, RNG and best epoch were saved resume with fresh
    ones (the best epoch 0: unknown)."""
    net.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if state.get("rng"):
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return Position(**state["position"]), Best(state["best"], state.get("best_epoch", 0))


def make_optimizer(t: TrainSpec, net: nn.Module) -> torch.optim.Optimizer:
    """SGD or AdamW (`train.optimizer`) over parameter groups: the head at `head_lr_mult` x the
    backbone's learning rate (set per step by train_epoch from `train.lr_schedule`); no weight decay on
    norm weights and biases unless `decay_norm_and_bias` (decaying a norm's scale fights the
    normalization it follows); EvalNorm's alpha/beta never decay, since decay would pull them to 0,
    towards plain BN evaluation, whatever the data says."""
    estimators = {id(p) for p in evalnorm_parameters(net)}
    groups = []
    for part, lr_mult in ((net.backbone, 1.0), (net.head, t.head_lr_mult)):
        params = [p for p in part.parameters() if p.requires_grad and id(p) not in estimators]
        # Norm weights and biases are the 1-D parameters (PReLU slopes too).
        no_decay = {id(p) for p in params if p.ndim <= 1 and not t.decay_norm_and_bias}
        groups.append({"params": [p for p in params if id(p) not in no_decay], "lr_mult": lr_mult})
        groups.append(
            {"params": [p for p in params if id(p) in no_decay], "lr_mult": lr_mult, "weight_decay": 0.0}
        )
    groups.append({"params": evalnorm_parameters(net), "lr_mult": 1.0, "weight_decay": 0.0})
    return schedules.build_optimizer(
        t.optimizer,
        [g for g in groups if g["params"]],
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
    )


def train_epoch(
    w: Worker,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    position: Position,
    save: Callable[[Position], None] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    noticed: Callable[[Position], None] | None = None,
    notices: Notices | None = None,
    *,
    guard: DivergenceGuard | None = None,
    stop: StopRequest | None = None,
) -> dict[str, float]:
    """The epoch's optimizer steps (at its stage's crop, batch and LR) from `position` on,
    `train.accumulate` micro-batches each, calling
    `save` every `train.checkpoint_every` steps, and `noticed` at the step where any rank holds one of
    `notices` (a preemption notice: agreed through the step's all-reduce); loss, skipped samples and
    throughput are the trial's (all ranks), not this rank's. fp16 runs scale the loss with `scaler` (kept
    across epochs by the caller; a fresh one otherwise). `guard` skips the steps of a non-finite loss and
    raises Diverged after too many (one of the spec's, else); a `stop` request (a Tune scheduler's) raises
    Stopped on every rank at the step where any of them holds it."""
    t = w.spec.train
    stage, steps = t.stage(position.epoch), w.epoch_steps[position.epoch]
    done, total = sum(w.epoch_steps[: position.epoch]), sum(w.epoch_steps)  # the schedule's steps
    model.train()
    loader = w.train_batches(position)
    batches = iter(loader)
    # Sums carried over a resume are already the trial's: they enter on rank 0 only, once.
    carried = w.rank == 0
    sums = torch.tensor(
        [position.loss_sum, position.skipped] if carried else [0.0, 0.0], dtype=torch.float64, device=w.device
    )
    started = time.perf_counter()
    schedule, base_lr = schedules.Schedule(t.lr_schedule, warmup=t.warmup_steps), w.base_lr(position.epoch)
    if scaler is None and t.amp == "fp16":  # fp16 gradients underflow without loss scaling
        scaler = torch.amp.GradScaler(w.device.type)
    guard = guard or DivergenceGuard.of(t)
    nonfinite = position.nonfinite
    for step in range(position.step, steps):
        schedules.apply(optimizer, done + step, total, schedule, base_lr)
        optimizer.zero_grad(set_to_none=True)
        micro = [next(batches) for _ in range(t.accumulate)]
        loss = accumulate_gradients(model, micro, w.device, t.amp, w.loss, scaler, t.mixup_alpha)
        # [loss, ranks holding a preemption notice, ranks asked to stop]: every rank sees a non-finite
        # loss, a notice and a stop request at the same step.
        flags = [notices.flag() if notices else 0.0, stop.flag() if stop else 0.0]
        trial = torch.cat([loss.detach().double().reshape(1), loss.new_tensor(flags, dtype=torch.float64)])
        all_reduce(trial)
        finite = guard.step_is_finite(float(trial[0]), position.epoch + 1, step + 1)
        if scaler:
            # Skips a step whose fp16 gradients overflowed, then lowers the scale: a non-finite loss too.
            scaler.step(optimizer)
            scaler.update()
        elif finite:
            optimizer.step()
        PROGRESS.steps = done + step + 1
        if finite:
            sums[0] += loss
        else:
            nonfinite += 1
        if w.rank == 0 and (step + 1) % 20 == 0:
            log.info("epoch %d step %d/%d loss %.4f", position.epoch + 1, step + 1, steps, loss.item())
        if save and t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < steps:
            totals = _trial_sums(sums, loader.skipped)
            save(Position(position.epoch, step + 1, float(totals[0]), int(totals[1]), nonfinite))
        if noticed and trial[1] > 0:
            totals = _trial_sums(sums, loader.skipped)
            noticed(Position(position.epoch, step + 1, float(totals[0]), int(totals[1]), nonfinite))
        if stop and trial[2] > 0:
            raise Stopped(stop.reason())
    elapsed = torch.tensor(time.perf_counter() - started, dtype=torch.float64, device=w.device)
    totals = _trial_sums(sums, loader.skipped)
    all_reduce(elapsed, dist.ReduceOp.MAX)
    applied = steps - nonfinite  # the steps whose loss was finite: the others changed nothing
    return {
        "train_loss": float(totals[0]) / (applied * w.world) if applied else math.nan,
        "skipped_samples": int(totals[1]),
        "nonfinite_steps": nonfinite,
        "images_per_s": (steps - position.step)
        * t.accumulate
        * stage.batch_per_gpu
        * w.world
        / float(elapsed),
        "lr": optimizer.param_groups[0]["lr"],
        **dict(zip(STAGED, (stage.batch_per_gpu, *stage.crop), strict=True)),
    }


def _trial_sums(sums: torch.Tensor, skipped: int) -> torch.Tensor:
    """[loss sum, skipped samples] of all ranks: this rank's running sums plus the loader's count."""
    totals = sums.clone()
    totals[1] += skipped
    all_reduce(totals)
    return totals


@torch.no_grad()
def validate(w: Worker, net: nn.Module) -> tuple[dict[str, float], torch.Tensor | None]:
    """Whole-image validation on this rank's share: the scores of the confusion matrices summed over ranks,
    and every image's own matrix [N, C, C] in the split's order (what `orchestrator report` bootstraps its
    intervals from), or None where an image could not be read (the images would not pair with another
    trial's). Runs the unwrapped model: DDP's forward would sync buffers, a collective that hangs when
    ranks hold different numbers of validation batches."""
    net.eval()
    average_buffers(net)
    per_image = [torch.zeros(0, NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=w.device)]
    loader = w.loader(train=False)
    for images, masks in loader:
        with autocast(w.device, w.spec.train.amp):
            logits = net(images)
        per_image.append(metrics.confusion_matrices(logits.argmax(1), masks))
    mine = torch.cat(per_image)
    cm = mine.sum(0)
    all_reduce(cm)
    skipped = torch.tensor(loader.skipped, device=w.device)
    all_reduce(skipped)
    predicted = int((cm.sum(0) > 0).sum())  # the columns are predictions: the divergence guard's sign
    scores = {
        **metrics.summarize(cm.cpu()),
        "val_skipped_samples": int(skipped),
        "val_predicted_classes": predicted,
    }
    return scores, None if skipped else gather_rows(mine).cpu()


def _report(
    w: Worker,
    config: dict[str, Any],
    net: nn.Module,
    state: dict[str, Any],
    report: dict[str, float] | None,
    improved: bool,
    uploads: CheckpointUploads,
    background: bool,
    per_image: torch.Tensor | None = None,
) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint, written and stored before this returns
    unless `background`. At an epoch's end (`report` given) rank 0 then logs the metrics to MLflow, after the
    checkpoint is stored: a trial that dies in between finds the report in its checkpoint on restart and logs
    it then (see log_epoch), without the validation's per-image matrices (`per_image`)."""
    write = None
    if w.rank == 0:
        trial = public_params(config["trial"].config)  # never store credentials in a checkpoint
        contents = checkpoints.contents(net, trial, w.mean_std, **state, report=report, improved=improved)
        if background:  # written while training goes on: from a copy
            contents = checkpoints.host_copy(contents)
        write = partial(_write_checkpoint, contents)
    # Tune sees epoch ends only (execution/tune_report.py); Ray Train keeps every checkpoint's position.
    position = state["position"]
    uploads.report(report or {"epoch": position["epoch"], "step": position["step"]}, write, background)
    if w.rank == 0 and report:
        _log_epoch(w, config, net, report, improved, per_image)


def _write_checkpoint(contents: dict[str, Any], folder: Path) -> None:
    torch.save(contents, folder / checkpoints.FILE)


def _tag_pretrained_left_out(config: dict[str, Any], names: list[str]) -> None:
    """Record on the trial's run the backbone tensors its pretrained file left as initialized
    (model.pretrained_strict: false), where whoever reads the study finds them, not in a worker's log."""
    from orchestrator import tracking  # see _log_epoch; a trial that loaded every tensor does not get here

    value = f"{len(names)}: {listed(names)}"
    tracking.set_tags(config["mlflow_run_id"], {tracking.PRETRAINED_LEFT_OUT: value}, config["tracking_uri"])


def _log_resume(
    w: Worker, config: dict[str, Any], position: Position, preempted: bool, fresh: bool = False
) -> None:
    """Record on the trial's run where an attempt resumed: the optimizer steps done before it; the steps
    the attempt before did past them, lost (where a rank of it lived to say how far it got: the ledger's
    `attempt_steps`); and, where it resumed from a checkpoint written on a preemption notice, one more
    preemption. An attempt from scratch (`fresh`) records this only where an attempt came before it."""
    from orchestrator import tracking  # see _log_epoch

    run_id, uri = config["mlflow_run_id"], config["tracking_uri"]
    step = w.global_step(position)
    client = tracking.client(uri)
    before = client.get_run(run_id).data.metrics
    metrics = {"resumed_at_step": step}
    last = int(before.get("attempts", 0))  # the attempt before this one, charged when it ended
    if fresh and not last:
        return  # the trial's first attempt
    reached = [m.value for m in client.get_metric_history(run_id, "attempt_steps") if m.step == last]
    if reached:
        metrics["lost_steps"] = before.get("lost_steps", 0) + max(0, int(reached[0]) - step)
    if preempted:
        metrics["preemptions"] = before.get("preemptions", 0) + 1
    tracking.log_metrics(run_id, metrics, step, uri)


def _on_notice(
    w: Worker, config: dict[str, Any], notices: Notices, save: Callable[..., None], position: Position
) -> None:
    """A preemption notice reached the group: checkpoint at this step and wait to be taken, where a
    checkpoint fits in the time left; else say that the restart goes back to the last one. Either way in
    the worker's log and, on the trial's run, as the tag orchestrator.preemption."""
    left, checkpoint_s = notices.agree(w.device)
    notices.acted = True
    at = f"epoch {position.epoch + 1} step {position.step} (step {w.global_step(position)} of the trial)"
    if fits(left, checkpoint_s):
        started = time.monotonic()
        save(position, preempted=True)
        took = time.monotonic() - started
        note = f"preemption notice {left:.0f} s before the node goes: checkpointed at {at} in {took:.1f} s"
    else:
        note = (
            f"preemption notice {left:.1f} s before the node goes, at {at}: too short for a checkpoint (the "
            f"last took {checkpoint_s:.1f} s); a restart goes back to the last checkpoint"
        )
    log.warning("%s: %s", w.spec.name, note)
    if w.rank == 0:
        from orchestrator import tracking  # see _log_epoch

        tracking.set_tags(config["mlflow_run_id"], {tracking.PREEMPTION: note}, config["tracking_uri"])
    if fits(left, checkpoint_s):
        Notices.await_reclaim(left - took)


def _log_epoch(
    w: Worker,
    config: dict[str, Any],
    net: nn.Module,
    report: dict[str, float],
    improved: bool,
    per_image: torch.Tensor | None = None,
) -> None:
    # MLflow is imported here, not with the module: its ~1 s of imports is rank 0's alone, and comes
    # after the first epoch rather than before the first step.
    from orchestrator import tracking

    run_id, uri = config["mlflow_run_id"], config["tracking_uri"]
    epoch = report["epoch"]
    # The nodes tag goes with every epoch: a restarted worker group may be placed on other nodes.
    tags = {"orchestrator.nodes": w.nodes, tracking.DEVICE: w.device_name}
    # Settings are the run's params, and the step is the epoch: per epoch, only what a staged run changes.
    settings = {"epoch"} | (set() if w.spec.train.stages else set(STAGED))
    metrics = {k: v for k, v in report.items() if k not in settings}
    if not tracking.log_epoch(run_id, metrics, int(epoch), uri, tags=tags):
        return  # logged by an earlier attempt of this trial
    if improved:
        with tempfile.TemporaryDirectory() as best_dir:
            best_path = Path(best_dir) / tracking.CHECKPOINT_FILE
            checkpoints.save(
                best_path, net, public_params(config["trial"].config), w.mean_std, epoch=epoch, metrics=report
            )
            tracking.log_checkpoint(run_id, best_path, uri)
        if per_image is not None:  # the best epoch's, as its checkpoint
            tracking.log_per_image_confusion(run_id, per_image.numpy(), uri)
    log.info(
        "%s epoch %d/%d: train_loss %.4f val_miou %.4f (%.1f img/s, %d+%d samples skipped)",
        w.spec.name,
        epoch,
        w.spec.train.epochs,
        report["train_loss"],
        report["val_miou"],
        report["images_per_s"],
        report["skipped_samples"],
        report["val_skipped_samples"],
    )
