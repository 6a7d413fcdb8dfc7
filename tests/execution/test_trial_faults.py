"""Faults with real processes: a killed Ray Train worker, a killed sweep driver (`--resume`), a trial whose
loss turns NaN, one that diverges and one a scheduler stops. What must hold: finished work is kept, each
MLflow run has one value per epoch (no step logged twice, none missing), a trial failing for its own
reasons fails alone, a trial ended early ends on every rank, its checkpoints kept, and a resumed sweep runs
no more trials at once than it may."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.data.shards import pack
from orchestrator.data.synth import synthesize
from orchestrator.models.resnet import ResNet

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "orchestrator"]
EPOCHS = 3


@pytest.fixture
def workdir(tmp_path: Path, cli_env: dict[str, str]):
    env = cli_env
    synthesize(str(tmp_path / "synth"), train=16, val=4, size=(128, 72))
    pack(str(tmp_path / "synth"), str(tmp_path / "shards"), shard_size=4, workers=1)
    spec = {
        "name": "faults",
        "data": {"train": "shards/train", "val": "shards/val", "loader_workers": 0},
        "model": {"backbone": "resnet18"},
        "train": {
            "epochs": EPOCHS,
            "steps_per_epoch": 4,
            "checkpoint_every": 2,
            "batch_per_gpu": 2,
            "crop": [64, 64],
            "lr": 0.01,
            # These few steps on a few synthetic scenes often predict one class: no collapse to end on.
            "diverge_single_class_epochs": 0,
        },  # fmt: skip
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1, "max_failures": 2},
        "storage": str(tmp_path / "runs"),
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path, env


def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    # Its own session: killing the process group takes the local Ray it started along.
    return subprocess.Popen(
        CLI + args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: int = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def trial_runs(env: dict[str, str]) -> list:
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("faults")
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`orchestrator.kind` = 'trial'")


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} first:\n{proc.stdout.read()[-6000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every process below pid, from /proc."""
    parents, cmdlines = {}, {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdlines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (ValueError, OSError):
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = cmdlines[child]
                frontier.append(child)
    return found


def resumed_at(env: dict[str, str], run_id: str) -> list[int]:
    """The optimizer steps done before each resumed attempt of a trial (the loop's resumed_at_step)."""
    history = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_metric_history(run_id, "resumed_at_step")
    return [int(m.value) for m in history]


def epochs_logged(env: dict[str, str], run_id: str) -> list[int]:
    return [m.step for m in MlflowClient(env["MLFLOW_TRACKING_URI"]).get_metric_history(run_id, "val_miou")]


class Lifetimes(threading.Thread):
    """When each Ray Train worker process below `pid` was first and last seen (every 0.1 s): an attempt's
    worker group, as the operating system sees it."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.seen, self.done = pid, {}, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            now = time.monotonic()
            for worker, cmdline in descendants(self.pid).items():
                if "RayTrainWorker" in cmdline:
                    self.seen[worker] = (self.seen.get(worker, (now, now))[0], now)
            time.sleep(0.1)

    def attempts(self, size: int) -> list[float]:
        """Seconds of each attempt: from its first worker seen to its last one gone, `size` workers each."""
        spans = sorted(self.seen.values())
        groups = [spans[i : i + size] for i in range(0, len(spans), size)]
        return [max(end for _, end in g) - min(start for start, _ in g) for g in groups]


def test_a_killed_worker_restarts_from_its_checkpoint_and_logs_each_epoch_once(workdir) -> None:
    cwd, env = workdir
    proc = start(["train", "spec.yaml"], cwd, env)
    lifetimes = Lifetimes(proc.pid)
    lifetimes.start()
    wait_for(lambda: any(epochs_logged(env, r.info.run_id) for r in trial_runs(env)), proc)
    workers = [pid for pid, cmdline in descendants(proc.pid).items() if "RayTrainWorker" in cmdline]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    code, out = finish(proc)
    lifetimes.done.set()
    assert code == 0, out[-6000:]
    assert "resumed at epoch" in out
    (run,) = trial_runs(env)
    assert run.info.status == "FINISHED"
    assert epochs_logged(env, run.info.run_id) == list(range(1, EPOCHS + 1))
    # From a checkpoint (epoch 1's at least, 4 steps in), not from scratch.
    (resumed,) = resumed_at(env, run.info.run_id)
    assert resumed >= 4
    # Both attempts were charged to the run, each as long as its workers lived (within a second: the
    # ledger counts from the group's start to its shutdown, the processes live a little longer).
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    charged = [m.value for m in client.get_metric_history(run.info.run_id, "attempt_seconds")]
    lived = lifetimes.attempts(2)
    assert len(charged) == len(lived) == 2, (charged, lived)
    for ledger, workers_lived in zip(charged, lived, strict=True):
        assert workers_lived - 1.5 < ledger <= workers_lived + 0.2, (charged, lived)
    metrics = client.get_run(run.info.run_id).data.metrics
    assert metrics["attempts"] == 2 and metrics["restarts"] == 1 and metrics["gpu_seconds"] == 0
    # The rank left alive said how far the first attempt got; the second ended the schedule. Lost: the
    # steps past the checkpoint it resumed from (checkpoint_every 2; one more interval with its upload
    # still in flight).
    reached = [int(m.value) for m in client.get_metric_history(run.info.run_id, "attempt_steps")]
    assert len(reached) == 2 and reached[1] == EPOCHS * 4
    assert metrics["lost_steps"] == reached[0] - resumed and 0 <= reached[0] - resumed <= 4
    assert metrics["worker_seconds"] == pytest.approx(2 * sum(charged))
    (sweep,) = client.search_runs([run.info.experiment_id], "tags.`orchestrator.kind` = 'sweep'")
    assert sweep.data.metrics["worker_seconds"] == metrics["worker_seconds"]


def test_a_killed_driver_resumes_without_rerunning_finished_trials(workdir) -> None:
    cwd, env = workdir
    overrides = ["--set", "grid.norm=[bn,gn:g8]", "--set", "train.epochs=2"]
    proc = start(["sweep", "spec.yaml", *overrides], cwd, env)

    def second_trial_checkpointed() -> bool:  # the first finished, the second past its first epoch
        runs = trial_runs(env)
        return any(r.info.status == "FINISHED" for r in runs) and any(
            r.info.status == "RUNNING" and epochs_logged(env, r.info.run_id) for r in runs
        )

    wait_for(second_trial_checkpointed, proc)
    (done,) = [r for r in trial_runs(env) if r.info.status == "FINISHED"]
    (interrupted,) = [r for r in trial_runs(env) if r.info.status == "RUNNING"]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    code, out = finish(start(["sweep", "spec.yaml", *overrides, "--resume"], cwd, env))
    assert code == 0, out[-6000:]
    runs = trial_runs(env)
    assert sorted(r.data.params["norm"] for r in runs) == ["bn", "gn:g8"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert epochs_logged(env, run.info.run_id) == [1, 2]
    (again,) = [r for r in runs if r.info.run_id == done.info.run_id]
    assert again.info.end_time == done.info.end_time  # the finished trial did not run again
    assert resumed_at(env, done.info.run_id) == []
    # The interrupted trial went on from its checkpoint (epoch 1's, 4 steps in), not from scratch.
    assert resumed_at(env, interrupted.info.run_id)[0] >= 4
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    sweeps = client.search_runs([runs[0].info.experiment_id], "tags.`orchestrator.kind` = 'sweep'")
    assert [s.info.status for s in sweeps] == ["FINISHED"]  # the same parent run, finished


def test_resume_without_a_sweep_to_resume_says_so(workdir) -> None:
    cwd, env = workdir
    code, out = finish(start(["sweep", "spec.yaml", "--resume"], cwd, env))
    assert code == 2 and "nothing to resume" in out


def test_a_trial_whose_loss_turns_nan_fails_alone(workdir) -> None:
    cwd, env = workdir
    weights = ResNet("resnet18").state_dict()
    weights["conv1.weight"].fill_(float("nan"))
    torch.save(weights, cwd / "nan.pth")
    overrides = ["--set", f"grid.model.pretrained=[null,{cwd / 'nan.pth'}]", "--set", "train.epochs=1"]
    overrides += ["--set", "train.diverge_nonfinite_steps=0"]  # the divergence guard off: fail at once
    code, out = finish(start(["sweep", "spec.yaml", *overrides], cwd, env))
    assert code == 1
    assert "NonFiniteLoss: loss nan at epoch 1 step 1" in out
    runs = {r.data.params["model.pretrained"]: r for r in trial_runs(env)}
    assert runs["None"].info.status == "FINISHED" and epochs_logged(env, runs["None"].info.run_id) == [1]
    failed = runs[str(cwd / "nan.pth")]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["orchestrator.failure"].startswith("NonFiniteLoss: loss nan at epoch 1 step 1")
    # Not retried (a restart would meet the same NaN): Ray Train's controller says so in the sweep's log.
    (log,) = (cwd / "runs" / "faults" / "logs").glob("sweep-*.log")
    assert "TrainController" in log.read_text() and "[FailurePolicy]" not in log.read_text() + out


def test_a_trial_with_a_huge_lr_ends_as_diverged_within_the_bound(workdir) -> None:
    cwd, env = workdir
    code, out = finish(start(["train", "spec.yaml", "--set", "train.lr=1e6"], cwd, env))
    assert code == 0, out[-6000:]  # a finding about the point, not a failure of the sweep
    (run,) = trial_runs(env)
    assert run.info.status == "KILLED" and run.data.tags["orchestrator.outcome"] == "diverged"
    reason = run.data.tags["orchestrator.ended_early"]
    assert f"  diverged: {reason}" in out
    # The default bound: 3 non-finite steps in a row, each skipped; the trial ends at the third.
    pattern = r"loss nan at 3 steps in a row, the last at epoch (\d) step (\d)"
    epoch, step = map(int, re.fullmatch(pattern, reason).groups())
    last = (epoch - 1) * 4 + step  # of the trial's steps
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert [int(m.value) for m in client.get_metric_history(run.info.run_id, "attempt_steps")] == [last - 1]
    assert epochs_logged(env, run.info.run_id) == list(range(1, epoch))  # no epoch after it
    if epoch > 1 and step < 3:  # the epoch before counted the skipped steps it held
        skipped = client.get_metric_history(run.info.run_id, "nonfinite_steps")[-1]
        assert (skipped.step, skipped.value) == (epoch - 1, 3 - step)
    assert "[FailurePolicy]" not in out  # ended by the guard: Ray Train had nothing to retry


def test_a_trial_stopped_by_asha_ends_on_both_ranks_with_its_checkpoint_and_tag(workdir) -> None:
    """Two trials, one at a time: the second's loss (10 x CE) is far above the first's at epoch 1, the
    first rung, so ASHA stops it there; it ends at a step of epoch 2 on both ranks, nothing retried."""
    cwd, env = workdir
    overrides = ["--set", "grid.train.loss=[ce,10*ce]", "--set", "search.scheduler=asha"]
    overrides += ["--set", "search.metric=train_loss"]
    code, out = finish(start(["sweep", "spec.yaml", *overrides], cwd, env))
    assert code == 0, out[-6000:]
    runs = {r.data.params["train.loss"]: r for r in trial_runs(env)}
    assert runs["ce"].info.status == "FINISHED" and epochs_logged(env, runs["ce"].info.run_id) == [1, 2, 3]
    stopped = runs["10*ce"]
    assert stopped.info.status == "KILLED" and stopped.data.tags["orchestrator.outcome"] == "stopped"
    reason = stopped.data.tags["orchestrator.ended_early"]
    assert re.fullmatch(r"stopped by asha after epoch 1 \(train_loss \d+\.\d{4}\)", reason), reason
    assert epochs_logged(env, stopped.info.run_id) == [1]
    assert re.search(r"train\.loss=10\*ce +STOPPED .*\n  stopped: stopped by asha after epoch 1", out), out
    (log,) = (cwd / "runs" / "faults" / "logs").glob("sweep-*.log")
    text = log.read_text()
    ranks = set(re.findall(r"RayTrainWorker pid=(\d+).*stopped: stopped by asha after epoch 1", text))
    assert len(ranks) == 2, text[-6000:]  # every rank ended at the same step, by itself
    assert "[FailurePolicy]" not in text  # no rank died: nothing to restart
    # Its checkpoints are kept: epoch 1's end, where ASHA judged it, among them.
    kept = [torch.load(f, weights_only=False) for f in (cwd / "runs").glob("train-*/checkpoint_*/model.pt")]
    ours = [c["position"] for c in kept if c["config"]["train.loss"] == "10*ce"]
    assert {"epoch": 1, "step": 0, "loss_sum": 0.0, "skipped": 0, "nonfinite": 0} in ours
    assert MlflowClient(env["MLFLOW_TRACKING_URI"]).list_artifacts(stopped.info.run_id)  # its best epoch's


def test_a_trial_out_of_memory_fails_alone_without_retries(workdir) -> None:
    cwd, env = workdir
    # Scenes scaled 100000x before their 64x64 crop: more than any memory, refused by the allocator at once.
    # Plan's estimate counts the crop, not the scaled scene it is cut from: nothing refuses it before.
    code, out = finish(start(["train", "spec.yaml", "--set", "train.scale=[100000,100000]"], cwd, env))
    assert code == 1 and "can't allocate memory" in out
    (run,) = trial_runs(env)
    assert run.info.status == "FAILED" and "can't allocate memory" in run.data.tags["orchestrator.failure"]
    assert "[FailurePolicy]" not in out  # ended by the trial itself: Ray Train had nothing to retry


def test_a_resumed_sweep_runs_no_more_trials_at_once_than_max_concurrent_trials(workdir) -> None:
    # Two trials that fail at their first step, and one that finishes: one at a time, 1 CPU each, on 2 CPUs.
    cwd, env = workdir
    weights = ResNet("resnet18").state_dict()
    weights["conv1.weight"].fill_(float("nan"))
    for name in ("nan1.pth", "nan2.pth"):
        torch.save(weights, cwd / name)
    overrides = ["--set", f"grid.model.pretrained=[{cwd / 'nan1.pth'},{cwd / 'nan2.pth'},null]"]
    overrides += ["--set", "train.epochs=1", "--set", "train.diverge_nonfinite_steps=0"]
    overrides += ["--set", "resources.workers_per_trial=1", "--set", "resources.max_concurrent_trials=1"]
    code, out = finish(start(["sweep", "spec.yaml", *overrides], cwd, env))
    assert code == 1 and out.count("NonFiniteLoss: loss nan at epoch 1 step 1") >= 2, out[-6000:]

    # Restored, Tune puts both errored trials back at once and would start both (ray-project/ray#40652).
    proc = start(["sweep", "spec.yaml", *overrides, "--resume"], cwd, env)
    lifetimes = Lifetimes(proc.pid)
    lifetimes.start()
    code, out = finish(proc)
    lifetimes.done.set()
    lifetimes.join()
    assert code == 1, out[-6000:]
    assert "references to the actor were removed" not in out, out[-6000:]  # the sweep holds its slots
    (first, second) = sorted(lifetimes.seen.values())  # the two failed trials ran again, each one worker
    assert first[1] < second[0], lifetimes.seen  # the second's worker started after the first's was gone
    assert sorted(r.info.status for r in trial_runs(env)) == ["FAILED", "FAILED", "FINISHED"]
