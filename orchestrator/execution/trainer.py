"""What a trial's driver hands Ray Train: the trainer, the workers' entry point and the torch.distributed
backend, all importable without torch.

Ray's TorchTrainer imports torch in the trial's driver and, through its pickled TorchConfig, in Ray Train's
controller: two processes per trial that never touch a tensor, each paying ~1.4 CPU-s of imports while the
trial waits for its first step. Here the process group is opened by a backend whose torch imports run on
the workers alone, and the training loop is imported where it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.train.backend import Backend, BackendConfig

from orchestrator.execution.ray_private import (
    TrainerWithoutDatasets,
    TrainingFramework,
    notice_left_s,
    persist_checkpoint,
    rank_zero_url,
)

logger = logging.getLogger(__name__)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every rank: the training loop, given what it needs of Ray's private API."""
    from orchestrator.train.loop import train_loop_per_worker as run

    run(config, notice_left_s=notice_left_s, persist_checkpoint=persist_checkpoint)


class Trainer(TrainerWithoutDatasets):
    """Ray's TorchTrainer for a run without Ray Datasets, leaving torch to the workers; each attempt (a
    worker group, from its start to its shutdown) is charged to `ledger` where one is given."""

    def __init__(
        self,
        train_loop_per_worker: Callable[[dict[str, Any]], None],
        ledger: Ledger | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(train_loop_per_worker, backend_config=ProcessGroupConfig(ledger=ledger), **kwargs)


@dataclass(frozen=True)
class Ledger:
    """The MLflow run a trial's attempts are charged to (tracking.log_attempt)."""

    run_id: str
    tracking_uri: str


@dataclass
class ProcessGroupConfig(BackendConfig):
    """NCCL when the workers have GPUs, else gloo; `timeout_s` bounds every collective."""

    timeout_s: int = 1800
    ledger: Ledger | None = None

    @property
    def backend_cls(self) -> type[Backend]:
        return ProcessGroup

    @property
    def train_func_context(self):
        return _own_cuda_device

    @property
    def framework(self) -> TrainingFramework:
        return TrainingFramework.TORCH


class ProcessGroup(Backend):
    """Opens the process group on the workers before the loop starts and closes it after; runs in Ray
    Train's controller, one instance for a run's every attempt, and the functions it sends the workers
    import torch there. It times each attempt, from the worker group's start to its shutdown (a failure's
    restart shuts it down too), for the ledger."""

    share_cuda_visible_devices = True  # every rank of a node sees the node's GPUs: NCCL peer-to-peer
    _attempt: tuple[float, int, float] | None = None  # (started, workers, GPUs per worker)

    def on_start(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        self._attempt = (time.monotonic(), len(worker_group), gpus)
        backend = "nccl" if gpus > 0 else "gloo"
        url, world = rank_zero_url(worker_group), len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank, _init_process_group, backend, url, rank, world, backend_config.timeout_s
                )
                for rank in range(world)
            ]
        )

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        steps, unheeded_s = _attempt_end(worker_group)
        try:
            # Bounded: a rank stuck in a collective with a dead peer must not hold the restart.
            futures = worker_group.execute_async(_destroy_process_group)
            with contextlib.suppress(ray.exceptions.GetTimeoutError):
                ray.get(futures, timeout=30)
        finally:  # also when the workers are gone: their GPUs were held until now
            self._charge(backend_config.ledger, steps, unheeded_s)

    def _charge(self, ledger: Ledger | None, steps: int | None, unheeded_s: float | None) -> None:
        if ledger is None or self._attempt is None:
            return
        started, workers, gpus = self._attempt
        self._attempt = None
        from orchestrator import tracking  # MLflow's imports: in the controller, once an attempt has ended

        try:
            seconds = time.monotonic() - started
            tracking.log_attempt(ledger.run_id, ledger.tracking_uri, workers, gpus, seconds, steps)
            if unheeded_s is not None:  # the workers had no step in which to say so themselves
                left = max(unheeded_s, 0.0)
                note = (
                    f"preemption notice {left:.1f} s before the node goes, at the attempt's end "
                    f"(step {steps} of the trial): too short for a checkpoint (no step ended in time); "
                    "a restart goes back to the last checkpoint"
                )
                tracking.set_tags(ledger.run_id, {tracking.PREEMPTION: note}, ledger.tracking_uri)
        except Exception:  # the count is worth less than the restart it would hold
            logger.warning("could not charge the attempt to MLflow run %s", ledger.run_id, exc_info=True)


def _init_process_group(backend: str, url: str, rank: int, world: int, timeout_s: int) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    if backend == "nccl":
        # A collective that times out (a dead peer) tears the process down instead of hanging, so Ray
        # Train sees the failure and restarts the group.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    elif "GLOO_SOCKET_IFNAME" not in os.environ:
        # Gloo listens on the address the host's name resolves to, which many Linux hosts map to loopback
        # (Debian's /etc/hosts: 127.0.1.1): peers on other nodes then cannot connect. Ray's node address is
        # the one the other nodes reach.
        interface = interface_of(ray.util.get_node_ip_address())
        if interface:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
    dist.init_process_group(
        backend, init_method=url, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )


def interface_of(address: str) -> str | None:
    """The network interface whose (first) IPv4 address is `address`, or None (Linux's SIOCGIFADDR)."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                ifreq = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address
                continue
            if socket.inet_ntoa(ifreq[20:24]) == address:
                return name
    return None


def _attempt_end(worker_group, timeout_s: float = 5) -> tuple[int | None, float | None]:
    """Where the attempt's workers got (train.loop.PROGRESS), as the ranks still alive say (they step
    together), None for what none answers in time: the trial's optimizer steps done, and the seconds left
    of a preemption notice the attempt never got to act on."""
    answers = []
    try:
        futures = worker_group.execute_async(_progress)
        ready, _ = ray.wait(futures, num_returns=len(futures), timeout=timeout_s)
        for future in ready:
            with contextlib.suppress(ray.exceptions.RayError):
                answers.append(ray.get(future))
    except Exception:  # the count is worth less than the shutdown it would hold
        logger.warning("could not ask the workers how far the attempt got", exc_info=True)
    steps = [s for s, _ in answers if s is not None]
    unheeded = [left for _, left in answers if left is not None]
    return max(steps, default=None), min(unheeded, default=None)


def _progress() -> tuple[int | None, float | None]:
    from orchestrator.train.loop import PROGRESS

    return PROGRESS.steps, PROGRESS.unheeded_notice_s()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def _own_cuda_device() -> Iterator[None]:
    """Makes the rank's GPU the current CUDA device while its loop runs (NCCL and SyncBatchNorm use it)."""
    import torch

    if torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
    yield
