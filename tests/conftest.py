"""Shared fixtures: a real S3 API server (moto) on 127.0.0.1, started and stopped by PID, and a
fault-injecting proxy in front of it."""

from __future__ import annotations

import fnmatch
import http.client
import io
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

# bench/ is no installed package; tests of its helpers, the local S3 server and test_cluster (its local
# cluster) import it; the test helper modules (broken_shards) sit in this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from bench.local_s3 import S3Server, local_s3  # noqa: E402

# One thread per test process: the 2-core CI box is shared with Ray workers and servers, and the
# default OpenMP busy-wait made steps 10-25x slower there (ENVIRONMENT.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# No test asks a cloud's metadata server for credentials: google-auth's probe and any metadata request go to
# a closed loopback port. gcsfs's default filesystem first asks GCS's gRPC control API for a bucket's layout,
# which an emulator does not serve: 60 s of retries per call; its plain filesystem goes without.
os.environ.setdefault("NO_GCE_CHECK", "True")
os.environ.setdefault("GCE_METADATA_HOST", "127.0.0.1:9")
os.environ.setdefault("GCE_METADATA_IP", "127.0.0.1:9")
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with local_s3(Path(tmp_path_factory.mktemp("moto")) / "moto.log") as server:
        yield server


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The environment of an `orchestrator` command run by a test: a SQLite MLflow store in tmp_path and a
    Ray of its own. RAY_TMPDIR is short (Ray's socket paths must fit in 107 bytes) and private, so the
    command never joins another test's (or a stale) Ray; set here too, for a Ray the test starts itself."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PYTHONUNBUFFERED": "1"}
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def tiny_shards(tmp_path: Path) -> Path:
    """8 training and 2 validation scenes of 64x36, packed in shards of 4: enough for a training epoch."""
    from orchestrator.data.shards import pack
    from orchestrator.data.synth import synthesize

    synthesize(str(tmp_path / "raw"), train=8, val=2, size=(64, 36))
    pack(str(tmp_path / "raw"), str(tmp_path / "shards"), shard_size=4, workers=1)
    return tmp_path / "shards"


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test; returns its name."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    fs.mkdir(name)
    return name


_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "expect", "content-length"}
_S3_ERRORS = {
    "500": ("InternalError", "We encountered an internal error. Please try again."),
    "502": ("BadGateway", "Bad Gateway"),
    "503": ("SlowDown", "Please reduce your request rate."),
    "504": ("GatewayTimeout", "Gateway Timeout"),
}


@dataclass
class FlakyS3(S3Server):
    """S3Server seen through a fault-injecting proxy; endpoint, env and storage_options point at the proxy."""

    upstream: str = ""
    injected: Counter = field(default_factory=Counter)  # faults actually sent, by mode
    log: list = field(default_factory=list)  # (method, "bucket/key", Range header, fault or None) per request
    _rules: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(self, pattern: str, mode: str, times: int | None = 1) -> None:
        """Fault the next `times` GETs (None: all) whose "bucket/key" matches the fnmatch pattern.

        mode: "503" (SlowDown; also "500", "502", "504") answers with that status and an S3 XML error body
        without asking moto; "reset" sends the status, headers and half the body, then an RST (SO_LINGER 0);
        "truncate" does the same but closes cleanly (FIN); "drop" resets the connection before any response.
        """
        if mode not in (*_S3_ERRORS, "reset", "truncate", "drop"):
            raise ValueError(f"unknown fault mode {mode!r}")
        with self._lock:
            self._rules.append([pattern, mode, times])

    def clear(self) -> None:
        """Stop injecting (the counters stay)."""
        with self._lock:
            self._rules.clear()

    def _take(self, method: str, key: str, range_: str | None) -> str | None:
        with self._lock:
            fault = None
            for rule in self._rules if method == "GET" else ():
                pattern, mode, left = rule
                if (left is None or left > 0) and fnmatch.fnmatchcase(key, pattern):
                    rule[2] = None if left is None else left - 1
                    fault = mode
                    self.injected[mode] += 1
                    break
            self.log.append((method, key, range_, fault))
            return fault


def _proxy_handler(flaky: FlakyS3) -> type[BaseHTTPRequestHandler]:
    upstream = urllib.parse.urlsplit(flaky.upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real S3 endpoints do
        timeout = 30  # idle keep-alive threads end on their own

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)

        def _forward(self) -> None:
            body = self._body()
            key = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
            fault = flaky._take(self.command, key, self.headers.get("Range"))
            if fault == "drop":  # no response at all: RST before the status line
                self._abort()
                return
            if fault in _S3_ERRORS:
                code, message = _S3_ERRORS[fault]
                xml = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><RequestId>flaky</RequestId></Error>"
                ).encode()
                self.send_response_only(int(fault))
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                self.wfile.write(xml)
                return
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():  # Host too: SigV4 signed the proxy's address
                    if name.lower() not in _HOP_HEADERS:
                        conn.putheader(name, value)
                if body or self.command in ("PUT", "POST"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
                headers = resp.getheaders()
            finally:
                conn.close()
            bodiless = self.command == "HEAD" or resp.status in (204, 304)  # moto's Content-Length stands
            self.send_response_only(resp.status, resp.reason)
            for name, value in headers:  # Content-Range, ETag, Last-Modified, ... pass through
                if name.lower() not in _HOP_HEADERS or (bodiless and name.lower() == "content-length"):
                    self.send_header(name, value)
            if not bodiless:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if fault is None:
                self.wfile.write(data)
                return
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True  # "truncate": the server's shutdown(SHUT_WR) sends a clean FIN
            if fault == "reset":
                self._abort()

        def _abort(self) -> None:
            """Close with SO_LINGER 0 before the server's shutdown(SHUT_WR): an RST, no FIN."""
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.rfile.close()  # the makefile() reference: the socket really closes now

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    return Handler


@pytest.fixture
def flaky_s3(s3_server: S3Server) -> Iterator[FlakyS3]:
    """A threaded reverse proxy in front of moto that injects faults into GETs (see FlakyS3.inject):

    flaky_s3.inject("*/train-*.tar", "reset", times=2)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **flaky_s3.storage_options)
    ...read...
    assert flaky_s3.injected["reset"] == 2
    """
    flaky = FlakyS3(endpoint="", env={}, upstream=s3_server.endpoint)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(flaky))
    flaky.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    flaky.env = {**s3_server.env, "AWS_ENDPOINT_URL": flaky.endpoint}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield flaky
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def stderr_terminal(monkeypatch: pytest.MonkeyPatch) -> Callable[[], io.StringIO]:
    """Called, makes sys.stderr a terminal (tqdm draws its bars on one) and returns it: its getvalue() is
    what was written. A fixture that patched at setup would be undone: pytest's output capture puts its own
    sys.stderr back before the test runs."""

    def patch() -> io.StringIO:
        terminal = _Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        return terminal

    return patch
