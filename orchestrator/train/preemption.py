"""A preemption notice, acted on at a step boundary.

A cloud gives 30-120 s of notice before it takes a spot node; Ray drains the node (`ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N`) and Ray Train marks every worker of the group
(execution/ray_private.notice_left_s, handed to the loop). The training loop asks at every step, and the
ranks agree through the step's own all-reduce, so that all of them write one checkpoint at the same step:
the restarted trial goes on from there, not from its last interval checkpoint, and Ray counts the restart
against resources.max_preemptions, not max_failures. Then the workers wait to be taken: Ray Train tears the
group down at the deadline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from orchestrator.train.distributed import all_reduce

# A node still here this long past its deadline was not taken (the drain was called off); a drain without a
# deadline is waited on this long: then training goes on.
RECLAIM_MARGIN_S = 30.0
NO_DEADLINE_WAIT_S = 600.0


@dataclass
class Notices:
    """One attempt's preemption notices: `left` gives this rank's seconds before its group's node goes (inf
    without a deadline), or None before any notice. `checkpoint_s` is how long the last checkpoint took:
    whether one fits in what is left."""

    left: Callable[[], float | None]
    checkpoint_s: float = 0.0
    acted: bool = False  # once an attempt: a drain called off leaves the notice set

    def flag(self) -> float:
        """1.0 where this rank holds a notice not acted on yet: summed over the ranks with the step's loss."""
        return float(not self.acted and self.left() is not None)

    def agree(self, device: torch.device) -> tuple[float, float]:
        """(the least seconds left over the ranks, the longest last checkpoint): the same on every rank."""
        left = self.left()
        both = torch.tensor(
            [-(math.inf if left is None else left), self.checkpoint_s], dtype=torch.float64, device=device
        )
        all_reduce(both, dist.ReduceOp.MAX)
        return -float(both[0]), float(both[1])

    @staticmethod
    def await_reclaim(
        left_s: float,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Wait to be taken: Ray Train ends this process at the deadline. Returns where the node outlives its
        deadline by RECLAIM_MARGIN_S (or a drain without one, NO_DEADLINE_WAIT_S): training goes on."""
        end = clock() + (NO_DEADLINE_WAIT_S if math.isinf(left_s) else max(left_s, 0.0) + RECLAIM_MARGIN_S)
        while (rest := end - clock()) > 0:
            sleep(min(rest, 1.0))


def fits(left_s: float, checkpoint_s: float) -> bool:
    """Whether a checkpoint that took `checkpoint_s` last time fits in the `left_s` seconds a notice leaves:
    with room for one as long again (the next step's report, a slower store)."""
    return left_s > 2 * checkpoint_s
