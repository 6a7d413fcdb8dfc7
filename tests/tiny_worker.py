"""A training worker on the tiny shards (conftest's `tiny_shards`): resnet18, decoding in the test's process,
for the in-process tests of the loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator import spec as specs
from orchestrator.train.loop import Worker


def tiny_worker(shards: Path, name: str, **train: Any) -> Worker:
    """A rank-0 worker of a 1-worker trial named `name`, its train section `train`."""
    raw = {
        "name": name,
        "data": {"train": f"{shards}/train", "val": f"{shards}/val", "loader_workers": 0},
        "model": {"backbone": "resnet18"},
        "train": train,
    }
    return Worker(specs.validate(raw))
