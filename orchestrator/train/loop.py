"""The per-worker training loop that Ray Train runs on every DDP rank of a trial.

Every rank computes; metrics are all-reduced before they are reported, so the numbers a trial
reports are the trial's, not rank 0's. Rank 0 alone writes checkpoints and logs to MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from orchestrator import metrics, tracking
from orchestrator.data.layout import IGNORE_INDEX, NUM_CLASSES
from orchestrator.data.stream import Loader, make_loader
from orchestrator.models.evalnorm import evalnorm_aux_loss, evalnorm_parameters
from orchestrator.spec import Spec, from_flat, public_params
from orchestrator.train import checkpoint
from orchestrator.train.distributed import all_reduce, average_buffers, unwrap
from orchestrator.train.precise_bn import precise_bn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Worker:
    """Who is running: the trial's spec, this rank, the world size, the device."""

    spec: Spec
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def loader(self, *, train: bool, epoch: int = 0) -> Loader:
        t = self.spec.train
        return make_loader(
            self.spec.data.train if train else self.spec.data.val,
            batch_size=t.batch_per_gpu,
            rank=self.rank,
            world_size=self.world,
            train=train,
            crop=tuple(t.crop) if train else None,
            epoch=epoch,
            seed=t.seed,
            num_workers=self.spec.data.loader_workers,
            scale=tuple(t.scale),
            storage_options=self.spec.data.storage_options,
        )

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: equal on every rank, as the loader's batch count is."""
        t = self.spec.train
        steps = len(self.loader(train=True)) // t.accumulate
        if steps == 0:
            raise ValueError(
                f"train.accumulate={t.accumulate} x train.batch_per_gpu={t.batch_per_gpu} x {self.world} "
                f"workers needs more training samples than {self.spec.data.train} holds"
            )
        return min(steps, t.steps_per_epoch or steps)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """`config`: {"trial": flat trial config, "mlflow_run_id": child run, "tracking_uri": MLflow store}."""
    ctx = ray.train.get_context()
    w = Worker(
        from_flat(config["trial"]), ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    )

    torch.manual_seed(w.spec.train.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = checkpoint.model_for(w.spec).to(w.device)
    # DDP when world > 1; each rank keeps its own BN running statistics (see average_buffers).
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    net = unwrap(model)
    optimizer = make_optimizer(w.spec, net)

    start_epoch, best = 0, -math.inf
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            state = checkpoint.load(Path(d) / tracking.CHECKPOINT_FILE)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = state["epoch"], state["best"]
        log.info("rank %d resumed after epoch %d", w.rank, start_epoch)

    steps = w.steps_per_epoch()
    for epoch in range(start_epoch, w.spec.train.epochs):
        report = {"epoch": epoch + 1, **train_epoch(w, model, optimizer, epoch, steps)}
        if w.spec.train.precise_bn_batches:
            images = (x.to(w.device) for x, _ in w.loader(train=True, epoch=epoch))
            precise_bn(net, images, w.spec.train.precise_bn_batches)
        report.update(validate(w, net))
        improved = report["val_miou"] > best
        best = report["best_val_miou"] = max(best, report["val_miou"])
        _report(w, config, net, optimizer, report, improved)


def make_optimizer(spec: Spec, net: nn.Module) -> torch.optim.Optimizer:
    """SGD over parameter groups: the head at `head_lr_mult` x the backbone's learning rate (set per
    step by train_epoch); no weight decay on norm weights and biases unless `decay_norm_and_bias`
    (decaying a norm's scale fights the normalization it follows); EvalNorm's alpha/beta never decay,
    since decay would pull them to 0, towards plain BN evaluation, whatever the data says."""
    t = spec.train
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
    return torch.optim.SGD(
        [g for g in groups if g["params"]], lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
    )


def train_epoch(
    w: Worker, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, steps: int
) -> dict[str, float]:
    """One epoch of `steps` optimizer steps of `train.accumulate` micro-batches each; loss and
    throughput are the trial's (all ranks), not this rank's."""
    t = w.spec.train
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=w.device)
    batches = iter(w.loader(train=True, epoch=epoch))
    started = time.perf_counter()
    for step in range(steps):
        progress = (epoch * steps + step) / (steps * t.epochs)
        for group in optimizer.param_groups:
            group["lr"] = t.lr * group["lr_mult"] * (1 - progress) ** 0.9  # poly schedule, per step
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, [next(batches) for _ in range(t.accumulate)], w.device, t.amp)
        optimizer.step()
        loss_sum += loss
        if w.rank == 0 and (step + 1) % 20 == 0:
            log.info("epoch %d step %d/%d loss %.4f", epoch + 1, step + 1, steps, loss.item())
    elapsed = torch.tensor(time.perf_counter() - started, dtype=torch.float64, device=w.device)
    all_reduce(loss_sum)
    all_reduce(elapsed, dist.ReduceOp.MAX)
    return {
        "train_loss": float(loss_sum) / (steps * w.world),
        "images_per_s": steps * t.accumulate * t.batch_per_gpu * w.world / float(elapsed),
        "lr": optimizer.param_groups[0]["lr"],
    }


def accumulate_gradients(
    model: nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, amp: str
) -> torch.Tensor:
    """Forward and backward each micro-batch, adding up the gradients of one step over their union.

    Each micro-batch is normalized on its own (the small normalization batch of the papers) while
    the gradient is that of the whole: every pixel loss is divided by the valid pixels of all
    micro-batches together, exact even when crops are padded with the ignore label. DDP all-reduces
    the gradients once, on the last micro-batch. Returns the mean pixel loss."""
    valid = sum(int((masks != IGNORE_INDEX).sum()) for _, masks in micro_batches)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, (images, masks) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()
        with sync:
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX, reduction="sum")
            objective = loss / max(valid, 1)
            aux = evalnorm_aux_loss(unwrap(model))  # reaches only EvalNorm's alpha/beta (stop-gradients)
            if aux is not None:
                objective = objective + aux / len(micro_batches)
            objective.backward()
        total += loss.detach()
    return total / max(valid, 1)


@torch.no_grad()
def validate(w: Worker, net: nn.Module) -> dict[str, float]:
    """Whole-image validation on this rank's share; the confusion matrices are summed over ranks.
    Runs the unwrapped model: DDP's forward would sync buffers, a collective that hangs when ranks
    hold different numbers of validation batches."""
    net.eval()
    average_buffers(net)
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=w.device)
    for images, masks in w.loader(train=False):
        images, masks = images.to(w.device), masks.to(w.device)
        with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=w.spec.train.amp == "bf16"):
            logits = net(images)
        cm += metrics.confusion_matrix(logits.argmax(1), masks)
    all_reduce(cm)
    return metrics.summarize(cm.cpu())


def _report(
    w: Worker,
    config: dict[str, Any],
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    report: dict[str, float],
    improved: bool,
) -> None:
    """Every rank calls ray.train.report (a barrier); rank 0 attaches the checkpoint and logs MLflow."""
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if w.rank == 0:
            run_id, uri = config["mlflow_run_id"], config["tracking_uri"]
            trial = public_params(config["trial"])  # never store credentials in a checkpoint
            epoch, best = report["epoch"], report["best_val_miou"]
            path = Path(d) / tracking.CHECKPOINT_FILE
            checkpoint.save(path, net, trial, optimizer=optimizer.state_dict(), epoch=epoch, best=best)
            ckpt = ray.train.Checkpoint.from_directory(d)
            tracking.log_metrics(run_id, report, step=int(epoch), uri=uri)
            if improved:
                with tempfile.TemporaryDirectory() as best_dir:
                    best_path = Path(best_dir) / tracking.CHECKPOINT_FILE
                    checkpoint.save(best_path, net, trial, epoch=epoch, metrics=report)
                    tracking.log_checkpoint(run_id, best_path, uri)
            log.info(
                "%s epoch %d/%d: train_loss %.4f val_miou %.4f (%.1f img/s)",
                w.spec.name,
                epoch,
                w.spec.train.epochs,
                report["train_loss"],
                report["val_miou"],
                report["images_per_s"],
            )
        ray.train.report(report, checkpoint=ckpt)
