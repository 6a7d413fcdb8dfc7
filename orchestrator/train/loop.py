"""The per-worker training loop that Ray Train runs on every DDP rank of a trial.

Every rank computes; metrics are all-reduced before they are reported, so the numbers a trial
reports are the trial's, not rank 0's. Rank 0 alone writes checkpoints and logs to MLflow.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
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
from orchestrator.data.stream import make_loader
from orchestrator.spec import Spec, from_flat, public_params
from orchestrator.train import checkpoint
from orchestrator.train.distributed import all_reduce, broadcast_buffers, unwrap

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """`config`: {"trial": flat trial config, "mlflow_run_id": child run, "tracking_uri": MLflow store}."""
    spec = from_flat(config["trial"])
    run_id, uri = config["mlflow_run_id"], config["tracking_uri"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    torch.manual_seed(spec.train.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model = checkpoint.model_for(spec).to(device)
    model = ray.train.torch.prepare_model(model)  # DDP when world > 1
    net = unwrap(model)
    optimizer = torch.optim.SGD(
        [
            {"params": net.backbone.parameters(), "lr_mult": 1.0},
            {"params": net.head.parameters(), "lr_mult": spec.train.head_lr_mult},
        ],
        lr=spec.train.lr,
        momentum=spec.train.momentum,
        weight_decay=spec.train.weight_decay,
    )

    start_epoch, best = 0, -math.inf
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            state = checkpoint.load(Path(d) / tracking.CHECKPOINT_FILE)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best = state["epoch"], state["best"]
        log.info("rank %d resumed after epoch %d", rank, start_epoch)

    steps = _steps_per_epoch(spec, rank, world)
    for epoch in range(start_epoch, spec.train.epochs):
        train_stats = _train_epoch(spec, model, optimizer, device, rank, world, epoch, steps)
        val_stats = _validate(spec, net, device, rank, world)
        report = {"epoch": epoch + 1, **train_stats, **val_stats}
        improved = report["val_miou"] > best
        best = max(best, report["val_miou"])
        report["best_val_miou"] = best
        _report(spec, config["trial"], net, optimizer, report, rank, run_id, uri, improved, best)


def _train_epoch(
    spec: Spec,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    rank: int,
    world: int,
    epoch: int,
    steps: int,
) -> dict[str, float]:
    t = spec.train
    loader = _loader(spec, rank, world, train=True, epoch=epoch)
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    total_steps = steps * t.epochs
    started = time.perf_counter()
    for i, (images, masks) in enumerate(loader):
        if i == steps:
            break
        progress = (epoch * steps + i) / total_steps
        for group in optimizer.param_groups:
            group["lr"] = t.lr * group["lr_mult"] * (1 - progress) ** 0.9  # poly schedule, per step
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.amp == "bf16"):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), masks, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        if rank == 0 and (i + 1) % 20 == 0:
            log.info("epoch %d step %d/%d loss %.4f", epoch + 1, i + 1, steps, loss.item())
    elapsed = torch.tensor(time.perf_counter() - started, dtype=torch.float64, device=device)
    all_reduce(loss_sum)
    all_reduce(elapsed, dist.ReduceOp.MAX)
    images_seen = steps * t.batch_per_gpu * world
    return {
        "train_loss": float(loss_sum) / (steps * world),
        "images_per_s": images_seen / float(elapsed),
        "lr": optimizer.param_groups[0]["lr"],
    }


@torch.no_grad()
def _validate(spec: Spec, net: nn.Module, device: torch.device, rank: int, world: int) -> dict[str, float]:
    """Whole-image validation on this rank's share; the confusion matrices are summed over ranks.
    Runs the unwrapped model: DDP's forward would sync buffers, a collective that hangs when ranks
    hold different numbers of validation batches."""
    net.eval()
    broadcast_buffers(net)
    cm = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64, device=device)
    for images, masks in _loader(spec, rank, world, train=False, epoch=0):
        images, masks = images.to(device), masks.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.train.amp == "bf16"):
            logits = net(images)
        cm += metrics.confusion_matrix(logits.argmax(1), masks)
    all_reduce(cm)
    return metrics.summarize(cm.cpu())


def _report(
    spec: Spec,
    trial: dict[str, Any],
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    report: dict[str, float],
    rank: int,
    run_id: str,
    uri: str,
    improved: bool,
    best: float,
) -> None:
    """Every rank calls ray.train.report (a barrier); rank 0 attaches the checkpoint and logs MLflow."""
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0:
            config = public_params(trial)  # never store credentials in a checkpoint
            path = Path(d) / tracking.CHECKPOINT_FILE
            checkpoint.save(
                path, net, config, optimizer=optimizer.state_dict(), epoch=report["epoch"], best=best
            )
            ckpt = ray.train.Checkpoint.from_directory(d)
            tracking.log_metrics(run_id, report, step=int(report["epoch"]), uri=uri)
            if improved:
                with tempfile.TemporaryDirectory() as best_dir:
                    best_path = Path(best_dir) / tracking.CHECKPOINT_FILE
                    checkpoint.save(best_path, net, config, epoch=report["epoch"], metrics=report)
                    tracking.log_checkpoint(run_id, best_path, uri)
            log.info(
                "%s epoch %d/%d: train_loss %.4f val_miou %.4f (%.1f img/s)",
                spec.name,
                report["epoch"],
                spec.train.epochs,
                report["train_loss"],
                report["val_miou"],
                report["images_per_s"],
            )
        ray.train.report(report, checkpoint=ckpt)


def _loader(spec: Spec, rank: int, world: int, *, train: bool, epoch: int):
    return make_loader(
        spec.data.train if train else spec.data.val,
        batch_size=spec.train.batch_per_gpu,
        rank=rank,
        world_size=world,
        train=train,
        crop=tuple(spec.train.crop) if train else None,
        epoch=epoch,
        seed=spec.train.seed,
        num_workers=spec.data.loader_workers,
        scale=tuple(spec.train.scale),
        storage_options=spec.data.storage_options,
    )


def _steps_per_epoch(spec: Spec, rank: int, world: int) -> int:
    steps = len(_loader(spec, rank, world, train=True, epoch=0))  # equal on every rank by construction
    if spec.train.steps_per_epoch:
        steps = min(steps, spec.train.steps_per_epoch)
    if steps == 0:
        raise ValueError(
            f"train.batch_per_gpu={spec.train.batch_per_gpu} x {world} workers needs more training samples "
            f"than {spec.data.train} holds"
        )
    return steps
