"""The divergence guard: a trial that can no longer learn ends as `diverged` instead of spending its epochs.

Two signs, both settable in the spec (train.diverge_*): a loss that stays non-finite for K optimizer steps
in a row (each such step is skipped: no weight changes, so one bad batch costs nothing), and a validation
that predicts a single class over the whole split at E epochs in a row once warmup is over (the collapse
of a normalization that a loss alone does not show). Every rank sees the same all-reduced loss and
confusion matrix, so every rank decides alike, at the same step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.spec import TrainSpec


class NonFiniteLoss(ArithmeticError):
    """A non-finite loss with the guard off: the trial fails."""


class Diverged(ArithmeticError):
    """The guard ended the trial: its message says why, in one line."""


@dataclass
class DivergenceGuard:
    nonfinite_steps: int  # K; 0: the first non-finite loss fails the trial
    single_class_epochs: int  # E; 0: off
    warmup_steps: int = 0
    nonfinite_run: int = 0  # non-finite steps in a row so far
    single_class_run: int = 0  # single-class validations in a row so far

    @classmethod
    def of(cls, train: TrainSpec) -> DivergenceGuard:
        """The guard of a spec's train section (train.diverge_*)."""
        return cls(train.diverge_nonfinite_steps, train.diverge_single_class_epochs, train.warmup_steps)

    def step_is_finite(self, loss: float, epoch: int, step: int) -> bool:
        """Whether to apply the optimizer step whose (trial) loss is `loss`, at 1-based `epoch` and `step`;
        raises when the guard ends the trial."""
        if math.isfinite(loss):
            self.nonfinite_run = 0
            return True
        where = f"epoch {epoch} step {step}"
        if not self.nonfinite_steps:
            raise NonFiniteLoss(f"loss {loss} at {where}")
        self.nonfinite_run += 1
        if self.nonfinite_run >= self.nonfinite_steps:
            raise Diverged(f"loss {loss} at {self.nonfinite_run} steps in a row, the last at {where}")
        return False

    def validated(self, predicted_classes: int, epoch: int, steps_done: int) -> None:
        """After epoch `epoch`'s validation (1-based), which predicted `predicted_classes` distinct classes,
        `steps_done` optimizer steps into the trial; raises when the guard ends the trial."""
        if not self.single_class_epochs or steps_done < self.warmup_steps:
            return
        self.single_class_run = self.single_class_run + 1 if predicted_classes <= 1 else 0
        if self.single_class_run >= self.single_class_epochs:
            raise Diverged(
                f"validation predicted a single class over the whole split at {self.single_class_run} "
                f"epochs in a row, the last epoch {epoch}"
            )
