"""A Ray job test_multihost.py submits to cluster/netns.sh's head: a 2-worker Ray Train run, one worker per
host, through orchestrator's process group, whose ranks each put half of one seeded batch through a `syncbn`
layer. Prints rank 0's running statistics and every rank's node address as JSON, for the test to compare
with single-process BatchNorm on the whole batch."""

from __future__ import annotations

import json

import ray
from ray.train import RunConfig, ScalingConfig

from orchestrator.execution.trainer import Trainer

BATCH, SEED = 4, 0


def batch():
    import torch

    return torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(SEED)) * 3 + 5


def syncbn_on_half_the_batch(config: dict) -> dict:
    import torch.distributed as dist

    from orchestrator.models.norms import make_norm

    rank, world = dist.get_rank(), dist.get_world_size()
    rows = BATCH // world
    layer = make_norm("syncbn", 3)
    layer(batch()[rank * rows : (rank + 1) * rows])
    nodes = [None] * world
    dist.all_gather_object(nodes, ray.util.get_node_ip_address())
    ray.train.report({})
    return {"mean": layer.running_mean.tolist(), "var": layer.running_var.tolist(), "nodes": nodes}


if __name__ == "__main__":
    result = Trainer(
        syncbn_on_half_the_batch,
        scaling_config=ScalingConfig(num_workers=2, placement_strategy="STRICT_SPREAD"),
        run_config=RunConfig(storage_path="s3://orchestrator/syncbn", name="syncbn"),
    ).fit()
    print("RESULT " + json.dumps(result.return_value))
