"""`orchestrator submit`: run `orchestrator sweep SPEC` (or `orchestrator ensemble ...`, evaluate, predict)
as a Ray job on a cluster, the same job that `ray job submit --working-dir . -- orchestrator sweep SPEC`
starts, then follow it to its end.

The working directory is uploaded (Ray leaves out what .gitignore names: .venv, data, runs, mlruns), so the
cluster runs this checkout's code and spec. The job's environment is the cluster's (S3 and MLflow settings
of its nodes) plus the variables forwarded from here.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from orchestrator.errors import UsageError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the job server of cluster/local.sh

# Forwarded when set here: where results go, which S3 endpoint, how long an MLflow call may take
# (tracking.TIMEOUT_ENV); none of them secret. Credentials are the cluster's own (instance role, Kubernetes
# Secret) unless named with --env: a job's environment is stored with the job and shown to anyone holding
# the cluster's token (`ray job list`, the dashboard).
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "ORCHESTRATOR_MLFLOW_TIMEOUT",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def job_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS (as `ray job submit` reads them), else local."""
    return (
        address
        or os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or DEFAULT_ADDRESS
    )


def entrypoint(
    spec: str,
    overrides: Sequence[str],
    working_dir: str,
    resume: bool = False,
    gpu: str | None = None,
    skip_unfit: bool = False,
) -> str:
    """The job's shell command, `orchestrator sweep` with these arguments; the spec as a path inside the
    uploaded working directory."""
    path, root = Path(spec).resolve(), Path(working_dir).resolve()
    if not path.is_relative_to(root):
        raise UsageError(f"{spec} is outside the working directory {root}: the job would not have it")
    sets = (a for o in overrides for a in ("--set", o))
    flags = ["--resume"] * resume + ["--gpu", gpu] * bool(gpu) + ["--skip-unfit"] * skip_unfit
    return shlex.join(["orchestrator", "sweep", path.relative_to(root).as_posix(), *sets, *flags])


def job_env(extra: Sequence[str] = ()) -> dict[str, str]:
    """FORWARDED_ENV and the names in `extra`, those set here."""
    return {name: os.environ[name] for name in (*FORWARDED_ENV, *extra) if os.environ.get(name)}


def submit(
    command: str, address: str | None = None, working_dir: str = ".", extra_env: Sequence[str] = ()
) -> int:
    """Submit the shell `command` (an orchestrator command line, see `entrypoint`), stream the job's output
    to stdout, and return 0 if it SUCCEEDED, else 1 (130 after Ctrl-C, which stops the job: a sweep left
    running unwatched would hold the cluster's GPUs)."""
    # Every cluster of cluster/ uses token auth; RAY_AUTH_MODE=disabled reaches one without it.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    address = job_address(address)
    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address: make the chosen one win.
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    env = job_env(extra_env)
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, AuthenticationError) as e:  # Ray's message says what to check; no token in it
        raise UsageError(f"Ray job server {address}: {str(e).splitlines()[0]}") from None
    job_id = client.submit_job(entrypoint=command, runtime_env={"working_dir": working_dir, "env_vars": env})
    forwarded = ", ".join(sorted(env)) or "none"
    print(f"submitted {job_id} to {address}: {command}  (forwarded: {forwarded})", file=sys.stderr)
    try:
        asyncio.run(_print_logs(client, job_id))
        status = _wait_terminal(client, job_id)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        print(f"\nstopped {job_id}", file=sys.stderr)
        return 130
    # The message repeats the end of the logs (streamed above) after its first clause.
    message = (client.get_job_info(job_id).message or "").split(", last available logs")[0].strip()
    print(f"job {job_id}: {status}" + (f" ({message})" if message else ""), file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


async def _print_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def _wait_terminal(client, job_id: str) -> str:
    """The log stream can close a moment before the job's status turns final."""
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(0.5)
    return status.value
