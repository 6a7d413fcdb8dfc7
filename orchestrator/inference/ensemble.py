"""Ensembles of the best trials: average the members' softmax, score members and ensemble together
in one pass over the validation set, and log the ensemble as its own MLflow run."""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator import metrics, tracking
from orchestrator.data.stream import evaluation_loader
from orchestrator.inference.evaluate import evaluate
from orchestrator.train import checkpoint


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
    members = [checkpoint.load_model(tracking.download_checkpoint(run.info.run_id)) for run in runs]
    val_url = data or members[0].config["data.val"]
    loader = evaluation_loader(val_url, batch_size=batch_size, storage_options=storage_options)
    cms = evaluate(members, loader, ensemble=True).cms
    member_metrics = [metrics.summarize(cm) for cm in cms[:-1]]
    ensemble_metrics = metrics.summarize(cms[-1])
    ids = [r.info.run_id for r in runs]
    run_id = tracking.log_derived_run(
        experiment,
        kind="ensemble",
        name=f"ensemble-top{len(ids)}",
        params={"metric": metric, "top": top, "data.val": val_url, "mode": "whole", "members": ",".join(ids)},
        metrics={
            **ensemble_metrics,
            **{f"member{i}_val_miou": m["val_miou"] for i, m in enumerate(member_metrics)},
        },
        tags={"orchestrator.members": ",".join(ids)},
    )
    scores = [(r.info.run_id, r.info.run_name, m) for r, m in zip(runs, member_metrics, strict=True)]
    return EnsembleResult(scores, ensemble_metrics, run_id)
