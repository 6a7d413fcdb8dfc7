"""Many hosts for real: cluster/netns.sh's hosts, each a network namespace with its own address, Ray
session folder and disk, a Ray head with MLflow and S3 on one of them. A sweep submitted to the head loses a
worker host mid-trial and goes on from its last S3 checkpoint on the remaining hosts.

Needs root and iproute2 (CI has both); skipped with the reason elsewhere."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from multihost_syncbn import batch

pytestmark = [pytest.mark.slow, pytest.mark.multihost]

ROOT = Path(__file__).resolve().parents[2]
NETNS = ROOT / "cluster" / "netns.sh"
CLI = [sys.executable, "-m", "orchestrator"]
EPOCHS, STEPS = 3, 4


def _why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "network namespaces need iproute2 (ip)"
    probe = f"orch-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


@pytest.fixture(scope="module")
def hosts() -> Iterator[dict[str, str]]:
    """A head host (Ray with 0 CPUs, MLflow, moto S3) and three 1-CPU worker hosts; yields the environment a
    user's shell has after `eval "$(cluster/netns.sh start)"`, with the data packed into the bucket."""
    reason = _why_no_namespaces()
    if reason:
        pytest.skip(reason)
    state = Path(tempfile.mkdtemp(prefix="nn-", dir="/tmp"))  # short: Ray's socket paths
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_TRACKING"))}
    # A /24 and names of this run's own, so that a cluster another run left cannot collide.
    tag = os.getpid() % 200
    base.update(STATE_DIR=str(state), PREFIX=f"t{tag}", NET=f"198.19.{tag}", PYTHONUNBUFFERED="1")
    try:
        started = subprocess.run([NETNS, "start", "--workers", "3"], env=base, capture_output=True, text=True,
                                 timeout=300)  # fmt: skip
        assert started.returncode == 0, started.stderr[-4000:]
        shell = ["bash", "-c", f"source {state}/head/env && env -0"]
        exported = subprocess.run(shell, env=base, check=True, capture_output=True, text=True).stdout
        env = dict(item.split("=", 1) for item in exported.split("\0") if "=" in item)
        synth = str(state / "synth")
        for args in (
            ["data", "synth", synth, "--train", "16", "--val", "4", "--size", "128x72"],
            ["data", "pack", synth, "s3://orchestrator/shards", "--shard-size", "4", "--workers", "1"],
        ):
            made = subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=300)
            assert made.returncode == 0, made.stderr[-3000:]
        yield {**env, "STATE_DIR": str(state), "PREFIX": base["PREFIX"], "NET": base["NET"]}
    finally:
        stopped = subprocess.run([NETNS, "stop"], env=base, capture_output=True, text=True, timeout=300)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        shutil.rmtree(state, ignore_errors=True)
        assert f"t{tag}-" not in left, stopped.stderr


def host_running(env: dict[str, str], process: str) -> str | None:
    """The worker host (w1, w2, ...) one of whose processes has `process` in its command line."""
    for i in range(1, 10):
        pids = subprocess.run(
            ["ip", "netns", "pids", f"{env['PREFIX']}-w{i}"], capture_output=True, text=True
        )
        for pid in pids.stdout.split():
            try:
                if process in Path(f"/proc/{pid}/cmdline").read_text():
                    return f"w{i}"
            except OSError:
                continue
    return None


def test_syncbn_over_workers_on_two_hosts_is_batch_norm_of_the_whole_batch(hosts, tmp_path) -> None:
    shutil.copy(Path(__file__).with_name("multihost_syncbn.py"), tmp_path)
    ray_cli = Path(sys.executable).with_name("ray")
    cmd = [ray_cli, "job", "submit", "--working-dir", tmp_path, "--", "python", "multihost_syncbn.py"]
    job = subprocess.run(cmd, env=hosts, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    (line,) = [line for line in job.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    expected = torch.nn.BatchNorm2d(3)
    expected(batch())
    torch.testing.assert_close(torch.tensor(result["mean"]), expected.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(result["var"]), expected.running_var, rtol=1e-5, atol=1e-5)
    head = hosts["NET"] + ".1"
    assert len(set(result["nodes"])) == 2 and head not in result["nodes"]  # two hosts, each its worker


def _spec(name: str, norm: str, max_failures: int) -> dict:
    """A 2-worker trial of EPOCHS short epochs on the S3 shards, checkpointed to S3 every 2 steps."""
    return {
        "name": name,
        "data": {"train": "s3://orchestrator/shards/train", "val": "s3://orchestrator/shards/val",
                 "loader_workers": 0},
        "model": {"backbone": "resnet18"},
        "norm": norm,
        # A few steps on synthetic scenes often predict one class: no collapse for the guard to end.
        "train": {"epochs": EPOCHS, "steps_per_epoch": STEPS, "checkpoint_every": 2, "batch_per_gpu": 2,
                  "crop": [64, 64], "diverge_single_class_epochs": 0},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1, "max_failures": max_failures},
        "storage": "s3://orchestrator/runs",
    }  # fmt: skip


@contextlib.contextmanager
def _submitted(cmd: list, cwd: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """The submitting command, running; killed with its process group if the test leaves it running."""
    job = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield job
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)


def _past_first_epoch(client: MlflowClient, experiment: str, job: subprocess.Popen) -> str:
    """The run id of the experiment's trial once it has logged its first epoch (the job still running)."""
    run = None
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and job.poll() is None:
        exp = client.get_experiment_by_name(experiment)
        runs = exp and client.search_runs([exp.experiment_id], "tags.`orchestrator.kind` = 'trial'")
        run = runs[0] if runs else None
        if run and client.get_metric_history(run.info.run_id, "val_miou"):
            return run.info.run_id
        time.sleep(1)
    raise AssertionError(job.stdout.read()[-6000:] if job.poll() is not None else "no epoch within 400 s")


def _finished(job: subprocess.Popen, timeout: float) -> str:
    out, _ = job.communicate(timeout=timeout)
    assert job.returncode == 0, out[-6000:]
    return out


def _epochs_logged_once(client: MlflowClient, run_id: str) -> None:
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "val_miou")]
    assert steps == list(range(1, EPOCHS + 1))


def test_a_worker_host_lost_mid_trial_the_trial_goes_on_from_its_s3_checkpoint(hosts, tmp_path) -> None:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(_spec("multihost", "syncbn", max_failures=2)))
    ray_cli = Path(sys.executable).with_name("ray")
    cmd = [ray_cli, "job", "submit", "--working-dir", ".", "--", "orchestrator", "sweep", "spec.yaml"]
    client = MlflowClient(hosts["MLFLOW_TRACKING_URI"])
    with _submitted(cmd, tmp_path, hosts) as job:
        run_id = _past_first_epoch(client, "multihost", job)
        lost = host_running(hosts, "RayTrainWorker")
        assert lost, "no worker host runs a trial worker"
        # The trial's driver, and with it Ray Train's controller, run on the head: no worker host's loss
        # takes them.
        assert host_running(hosts, "TrainController") is None
        subprocess.run([NETNS, "kill", lost], env=hosts, check=True, capture_output=True)
        _finished(job, timeout=600)
    _epochs_logged_once(client, run_id)
    # Resumed from a checkpoint, the first epoch's at least (STEPS steps in), not from scratch.
    resumed = [int(m.value) for m in client.get_metric_history(run_id, "resumed_at_step")]
    assert resumed and resumed[0] >= STEPS
    assert client.get_run(run_id).data.tags["orchestrator.nodes"] == "2"


def _stop_mlflow(state: Path) -> tuple[list[str], dict[str, str], str]:
    """Stop the head's MLflow server (its process group, as local.sh stop does); return its command line,
    environment and working directory, to start it again as it was."""
    pid = int((state / "mlflow.pid").read_text())
    proc = Path(f"/proc/{pid}")
    cmdline = proc.joinpath("cmdline").read_bytes().decode().split("\0")[:-1]
    environ = dict(
        e.split("=", 1) for e in proc.joinpath("environ").read_bytes().decode().split("\0") if "=" in e
    )
    cwd = os.readlink(proc / "cwd")
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return cmdline, environ, cwd


def test_mlflow_down_mid_trial_the_attempt_restarts_and_no_epoch_is_lost(hosts, tmp_path) -> None:
    """Submitted with `orchestrator submit`. Rank 0 logs each epoch to MLflow as it ends: an outage longer
    than a call's bound (ORCHESTRATOR_MLFLOW_TIMEOUT, forwarded to the job and its workers; a refused
    connection is retried for a quarter of it) fails the attempt like a dead worker. It restarts from its
    checkpoint, logs the epoch it could not, and the trial finishes with each epoch logged once."""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(_spec("outage", "bn", max_failures=3)))
    client = MlflowClient(hosts["MLFLOW_TRACKING_URI"])
    head = Path(hosts["STATE_DIR"]) / "head"
    env = {**hosts, "ORCHESTRATOR_MLFLOW_TIMEOUT": "12"}  # a refused connection: 3 tries in about 3 s
    with _submitted([*CLI, "submit", "spec.yaml"], tmp_path, env) as job:
        run_id = _past_first_epoch(client, "outage", job)
        cmdline, environ, cwd = _stop_mlflow(head)
        try:
            time.sleep(20)
            assert job.poll() is None, "the sweep ended while MLflow was down"
        finally:
            with open(head / "mlflow.log", "a") as log:
                server = subprocess.Popen(
                    ["ip", "netns", "exec", f"{hosts['PREFIX']}-head", *cmdline], env=environ, cwd=cwd,
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            (head / "mlflow.pid").write_text(f"{server.pid}\n")  # netns.sh stop stops it
        out = _finished(job, timeout=600)
    _epochs_logged_once(client, run_id)
    assert client.get_metric_history(run_id, "resumed_at_step")  # the outage failed an attempt: bounded
    assert "SUCCEEDED" in out


def _node_of(hosts: dict[str, str], host: str) -> str:
    """The Ray node id of worker host `host` (w1: NET.11, w2: NET.12, ...)."""
    ray_cli = Path(sys.executable).with_name("ray")
    listed = subprocess.run(
        [ray_cli, "list", "nodes", "--format", "json", "--address", f"http://{hosts['NET']}.1:8265"],
        env=hosts, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    ip = f"{hosts['NET']}.{10 + int(host.removeprefix('w'))}"
    (node,) = [
        n["node_id"] for n in json.loads(listed.stdout) if n["node_ip"] == ip and n["state"] == "ALIVE"
    ]
    return node


@pytest.mark.parametrize("deadline", [20, 0])
def test_a_drained_worker_host_checkpoints_at_the_notice_where_its_deadline_leaves_time(
    hosts, tmp_path, deadline
) -> None:
    """A 2-worker trial whose worker host is drained for preemption (then the host goes at the deadline, as
    a cloud takes a spot node) mid-epoch, max_failures 0: a restart for a preemption is not a failure.
    With a 20 s deadline its workers checkpoint at the next step and the trial resumes there on the other
    hosts, one preemption counted; with none (0 s), the workers say so and the trial goes back to its last
    checkpoint (an epoch's end), the steps since counted lost."""
    # This module's tests lose worker hosts: a trial drained off one of two needs a third to go on.
    extra = "w4" if deadline else "w5"
    subprocess.run([NETNS, "add", extra], env=hosts, check=True, capture_output=True, timeout=300)
    spec = _spec(f"drained-{deadline}", "bn", max_failures=0)
    spec["train"] |= {"epochs": 12, "checkpoint_every": 0}  # 4 steps each; checkpoints at epoch ends only
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    ray_cli = Path(sys.executable).with_name("ray")
    runtime = {"working_dir": ".", "env_vars": {"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}}
    submit = ["job", "submit", "--runtime-env-json", json.dumps(runtime)]
    client = MlflowClient(hosts["MLFLOW_TRACKING_URI"])
    with _submitted([ray_cli, *submit, "--", "orchestrator", "sweep", "spec.yaml"], tmp_path, hosts) as job:
        run_id = _past_first_epoch(client, f"drained-{deadline}", job)
        drained = host_running(hosts, "RayTrainWorker")
        drain = ["drain-node", "--address", f"{hosts['NET']}.1:6379", "--node-id", _node_of(hosts, drained)]
        drain += ["--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim"]
        drain += ["--deadline-remaining-seconds", str(deadline)]
        subprocess.run([ray_cli, *drain], env=hosts, check=True, capture_output=True, timeout=60)
        taken = time.monotonic() + max(deadline, 10)
        while "orchestrator.preemption" not in client.get_run(run_id).data.tags:
            assert time.monotonic() < taken and job.poll() is None, "nothing said of the notice in time"
            time.sleep(0.5)
        time.sleep(max(0.0, taken - time.monotonic()))
        subprocess.run([NETNS, "kill", drained], env=hosts, check=True, capture_output=True)
        _finished(job, timeout=600)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_miou")] == list(range(1, 13))
    note = run.data.tags["orchestrator.preemption"]
    at = int(note.split("(step ")[1].split()[0])  # "at epoch E step K (step 4E+K of the trial)"
    assert STEPS < at < 12 * STEPS  # after the first epoch
    resumed = [int(m.value) for m in client.get_metric_history(run_id, "resumed_at_step")]
    reached = [int(m.value) for m in client.get_metric_history(run_id, "attempt_steps")]
    assert run.data.metrics["attempts"] == 2 and reached[1] == 12 * STEPS
    if deadline:
        assert "checkpointed at epoch" in note
        assert resumed == [at]  # from the step of the notice: no step lost
        assert run.data.metrics["preemptions"] == 1
        # The workers waited at the notice's step: the ledger heard so from them, and counts nothing lost.
        assert reached[0] == at and run.data.metrics["lost_steps"] == 0
    else:
        assert "too short for a checkpoint" in note and "a restart goes back to the last checkpoint" in note
        assert resumed[0] % STEPS == 0 and resumed[0] <= at  # the last epoch end at or before the notice
        assert run.data.metrics["lost_steps"] == reached[0] - resumed[0] >= at - resumed[0]
