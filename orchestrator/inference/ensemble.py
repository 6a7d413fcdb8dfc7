"""Ensembles of the best trials: average the members' softmax, score members and ensemble together
in one pass over the validation set, and log the ensemble as its own MLflow run."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from orchestrator import metrics, tracking
from orchestrator.data.layout import NUM_CLASSES
from orchestrator.data.stream import make_loader
from orchestrator.inference.predict import predict_proba
from orchestrator.train import checkpoint

log = logging.getLogger(__name__)


@dataclass
class EnsembleResult:
    members: list[tuple[str, str, dict[str, float]]]  # (run id, run name, metrics)
    metrics: dict[str, float]
    run_id: str


def run_ensemble(
    experiment: str,
    top: int = 3,
    metric: str = "val_miou",
    data: str | None = None,
    batch_size: int = 2,
    storage_options: dict | None = None,
) -> EnsembleResult:
    """Pick the `top` finished trials by `metric`, ensemble them on the validation split
    (`data`, default: the best member's `data.val`), and log the ensemble run."""
    runs = tracking.top_trial_runs(experiment, metric, top)
    if not runs:
        raise LookupError(
            f"experiment {experiment!r} has no finished trial run with metric {metric!r} and a checkpoint"
        )
    models, configs = [], []
    for run in runs:
        model, config = checkpoint.load_model(tracking.download_checkpoint(run.info.run_id))
        models.append(model)
        configs.append(config)
    val_url = data or configs[0]["data.val"]
    loader = make_loader(
        val_url,
        batch_size=batch_size,
        rank=0,
        world_size=1,
        train=False,
        crop=None,
        epoch=0,
        seed=0,
        storage_options=storage_options,
    )
    cms = torch.zeros(len(models) + 1, NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    every = max(1, len(loader) // 10)
    for i, (images, masks) in enumerate(loader, 1):
        probs = [predict_proba(m, images) for m in models]
        for j, p in enumerate([*probs, torch.stack(probs).mean(0)]):
            cms[j] += metrics.confusion_matrix(p.argmax(1), masks)
        if i % every == 0 or i == len(loader):
            log.info("ensemble of %d: %d/%d validation batches", len(models), i, len(loader))
    member_metrics = [metrics.summarize(cm) for cm in cms[:-1]]
    ensemble_metrics = metrics.summarize(cms[-1])
    ids = [r.info.run_id for r in runs]
    run_id = tracking.log_ensemble_run(
        experiment,
        ids,
        params={"metric": metric, "top": top, "data.val": val_url, "mode": "whole"},
        metrics={
            **ensemble_metrics,
            **{f"member{i}_val_miou": m["val_miou"] for i, m in enumerate(member_metrics)},
        },
    )
    members = [(r.info.run_id, r.info.run_name, m) for r, m in zip(runs, member_metrics, strict=True)]
    return EnsembleResult(members, ensemble_metrics, run_id)
