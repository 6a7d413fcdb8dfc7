"""A local S3 API server (moto) on 127.0.0.1 for the tests and the benchmarks: a child process, stopped by its
PID. moto is a dev dependency (`.[dev]`), so this lives beside the benches, outside the package."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]  # what a client process needs in its environment to reach the server

    @property
    def storage_options(self) -> dict:
        return {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": self.endpoint}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_s3(log: Path, timeout: float = 30) -> Iterator[S3Server]:
    """Run moto_server on a free loopback port while the block runs; its output goes to `log`."""
    moto = Path(sys.executable).with_name("moto_server")
    if not moto.exists():
        raise FileNotFoundError(f"{moto} not found: install the dev extras (pip install -e '.[dev]')")
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError as e:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()}") from e
                time.sleep(0.2)
        env = {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        yield S3Server(endpoint=endpoint, env=env)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
