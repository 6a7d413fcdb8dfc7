"""The per-worker training loop that Ray Train runs on every DDP rank of a trial.

Every rank computes; metrics are all-reduced before they are reported, so the numbers a trial
reports are the trial's, not rank 0's. Rank 0 alone writes checkpoints and logs to MLflow.
"""

from __future__ import annotations

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

from orchestrator import metrics, tracking
from orchestrator.data.layout import IGNORE_INDEX, NUM_CLASSES
from orchestrator.data.stream import Loader, make_loader
from orchestrator.spec import Spec, from_flat, public_params
from orchestrator.train import checkpoint
from orchestrator.train.distributed import all_reduce, broadcast_buffers, unwrap

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
        steps = len(self.loader(train=True))  # equal on every rank by construction
        return min(steps, self.spec.train.steps_per_epoch or steps)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """`config`: {"trial": flat trial config, "mlflow_run_id": child run, "tracking_uri": MLflow store}."""
    ctx = ray.train.get_context()
    w = Worker(
        from_flat(config["trial"]), ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    )

    torch.manual_seed(w.spec.train.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = checkpoint.model_for(w.spec).to(w.device)
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1
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
        report = {"epoch": epoch + 1, **train_epoch(w, model, optimizer, epoch, steps), **validate(w, net)}
        improved = report["val_miou"] > best
        best = report["best_val_miou"] = max(best, report["val_miou"])
        _report(w, config, net, optimizer, report, improved)


def make_optimizer(spec: Spec, net: nn.Module) -> torch.optim.Optimizer:
    """SGD, the head at `head_lr_mult` x the backbone's learning rate (set per step by train_epoch)."""
    return torch.optim.SGD(
        [
            {"params": net.backbone.parameters(), "lr_mult": 1.0},
            {"params": net.head.parameters(), "lr_mult": spec.train.head_lr_mult},
        ],
        lr=spec.train.lr,
        momentum=spec.train.momentum,
        weight_decay=spec.train.weight_decay,
    )


def train_epoch(
    w: Worker, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, steps: int
) -> dict[str, float]:
    """One epoch of `steps` steps; loss and throughput are the trial's (all ranks), not this rank's."""
    t = w.spec.train
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=w.device)
    total_steps = steps * t.epochs
    started = time.perf_counter()
    for i, (images, masks) in enumerate(w.loader(train=True, epoch=epoch)):
        if i == steps:
            break
        progress = (epoch * steps + i) / total_steps
        for group in optimizer.param_groups:
            group["lr"] = t.lr * group["lr_mult"] * (1 - progress) ** 0.9  # poly schedule, per step
        images, masks = images.to(w.device, non_blocking=True), masks.to(w.device, non_blocking=True)
        with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=t.amp == "bf16"):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        if w.rank == 0 and (i + 1) % 20 == 0:
            log.info("epoch %d step %d/%d loss %.4f", epoch + 1, i + 1, steps, loss.item())
    elapsed = torch.tensor(time.perf_counter() - started, dtype=torch.float64, device=w.device)
    all_reduce(loss_sum)
    all_reduce(elapsed, dist.ReduceOp.MAX)
    return {
        "train_loss": float(loss_sum) / (steps * w.world),
        "images_per_s": steps * t.batch_per_gpu * w.world / float(elapsed),
        "lr": optimizer.param_groups[0]["lr"],
    }


@torch.no_grad()
def validate(w: Worker, net: nn.Module) -> dict[str, float]:
    """Whole-image validation on this rank's share; the confusion matrices are summed over ranks.
    Runs the unwrapped model: DDP's forward would sync buffers, a collective that hangs when ranks
    hold different numbers of validation batches."""
    net.eval()
    broadcast_buffers(net)
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
