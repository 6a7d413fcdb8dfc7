"""What a trial's Ray Train run tells Tune: its epoch-end reports.

A module of its own, importing nothing of ours: Ray Train's controller unpickles the run's callbacks
before it starts the workers, and importing the sweep module there (MLflow, the models, the training loop)
cost every trial about a second of CPU on its way to the first step.
"""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback


class EpochReportCallback(TuneReportCallback):
    """Forwards epoch-end reports to Tune. Mid-epoch checkpoints (train.checkpoint_every) are reported to
    Ray Train alone: they carry no validation metric, which Tune requires of every result."""

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if "val_miou" in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)
