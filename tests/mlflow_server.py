"""A real `mlflow server` on 127.0.0.1 for the tests that need one (the UI, the REST path of filters): one
worker and no job runner (2 processes, up in about 7 s, ENVIRONMENT.md), stopped by its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.local_s3 import free_port


@contextmanager
def mlflow_server(store_uri: str, artifacts: Path, log: Path, timeout: float = 90) -> Iterator[str]:
    """Serve the store at `store_uri` (artifacts under `artifacts`) while the block runs; yields its URL.
    Its output goes to `log`."""
    port = free_port()
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        *("--backend-store-uri", store_uri, "--default-artifact-root", artifacts.as_uri()),
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up on {url}:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group (started with start_new_session), then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue
