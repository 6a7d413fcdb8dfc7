"""MLflow as a service: every call bounded (a server refusing connections, or accepting them and never
answering, fails the command in one line within ORCHESTRATOR_MLFLOW_TIMEOUT, the password masked), a hiccup
retried, and `ensemble --filter` in MLflow's filter language on a real store (SQLite, and `mlflow server`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from unittest import mock

import pytest
import urllib3
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
    MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)
from mlflow_server import mlflow_server
from urllib3.util import Retry

from orchestrator import errors, tracking
from orchestrator.cli import main
from orchestrator.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
HTTP_SETTINGS = list(tracking.Bounds(30, 7, 4, 1.0).env())  # the MLflow variables client() sets


@pytest.fixture(autouse=True)
def _restore_mlflow_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """client() writes MLflow's HTTP settings into os.environ: put them back as they were after each test."""
    for name in HTTP_SETTINGS:
        monkeypatch.delenv(name, raising=False)


def _worst_case(settings: dict[str, str]) -> tuple[float, float]:
    """(the longest a call takes: every try timing out, every pause at its longest; the pauses alone, how
    long a refused connection is retried) under these MLflow settings, as MLflow parses them and urllib3
    counts its pauses."""
    with mock.patch.dict(os.environ, settings):
        timeout, retries = MLFLOW_HTTP_REQUEST_TIMEOUT.get(), MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()
        factor, jitter = MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(), MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.get()
    retry, pauses = Retry(total=retries, backoff_factor=factor, backoff_jitter=jitter), 0.0
    with mock.patch("urllib3.util.retry.random.random", return_value=1.0):  # the most jitter
        for _ in range(retries):
            retry = retry.increment("GET", "/", error=urllib3.exceptions.ConnectTimeoutError())
            pauses += retry.get_backoff_time()
    return (retries + 1) * timeout + pauses, pauses


def test_the_default_bound_is_30_s_with_a_server_restart_retried(monkeypatch) -> None:
    monkeypatch.delenv(tracking.TIMEOUT_ENV, raising=False)
    worst, pauses = _worst_case(tracking.bounds().env())
    assert 29 <= worst <= 30
    assert pauses >= 7  # a restarted `mlflow server --workers 1` answers after about 7 s


@pytest.mark.parametrize("seconds", ["3", "3.5", "4", "10", "61"])
def test_each_bound_is_kept_and_used(monkeypatch, seconds: str) -> None:
    monkeypatch.setenv(tracking.TIMEOUT_ENV, seconds)
    worst, _ = _worst_case(tracking.bounds().env())
    assert float(seconds) - 1 < worst <= float(seconds)


@pytest.mark.parametrize("value", ["2.9", "0", "-5", "soon", "nan", "inf"])
def test_a_bound_too_short_or_not_a_number_is_a_usage_error(monkeypatch, value: str) -> None:
    monkeypatch.setenv(tracking.TIMEOUT_ENV, value)
    with pytest.raises(UsageError, match=f"{tracking.TIMEOUT_ENV}='{value}': allowed is a number of seconds"):
        tracking.client("sqlite:///unused.db")


@contextmanager
def _refusing() -> Iterator[int]:
    """A loopback port that refuses connections (bound, not listening: no one else takes it meanwhile)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@contextmanager
def _silent() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel completes the handshake) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock.getsockname()[1]


def _one_line(err: str, port: int) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "secret" not in err and "Traceback" not in err
    assert lines[0].startswith(f"error: MLflow at http://***@127.0.0.1:{port} ")
    return lines[0]


def test_a_refused_connection_fails_the_command_at_once_in_one_line(monkeypatch, capsys) -> None:
    import orchestrator.inference.runs  # noqa: F401  (the command's imports, before the clock)

    with _refusing() as port:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{port}")
        monkeypatch.setenv(tracking.TIMEOUT_ENV, "3")
        start = time.monotonic()
        code = main(["ensemble", "--experiment", "x"])
        took = time.monotonic() - start
    assert code == errors.EXIT_UNAVAILABLE
    line = _one_line(capsys.readouterr().err, port)
    assert "cannot be reached: connection refused (3 tries" in line and "ORCHESTRATOR_MLFLOW_TIMEOUT" in line
    assert took < 2  # a 3 s bound: a try each second at most, no pause between refused tries


def test_the_error_itself_masks_the_password(monkeypatch) -> None:
    """It travels beyond the command's line: a trial's failure reason (a run tag), a plan's note."""
    monkeypatch.setenv(tracking.TIMEOUT_ENV, "3")
    with _refusing() as port, pytest.raises(errors.Unavailable) as down:
        tracking.check_reachable(f"http://user:secret@127.0.0.1:{port}")
    assert str(down.value).startswith(f"MLflow at http://***@127.0.0.1:{port} cannot be reached")


# The command in a process of its own: its real stderr (logging included), timed after its imports.
TIMED = """
import sys, time
import orchestrator.report, orchestrator.tracking
from orchestrator.cli import main
start = time.monotonic()
code = main(sys.argv[1:])
print(f"{time.monotonic() - start:.2f}")
sys.exit(code)
"""


@pytest.mark.slow
def test_a_server_that_never_answers_fails_the_command_within_its_bound(tmp_path, cli_env) -> None:
    with _silent() as port:
        env = {
            **cli_env,
            "MLFLOW_TRACKING_URI": f"http://user:secret@127.0.0.1:{port}",
            tracking.TIMEOUT_ENV: "3",
        }
        proc = subprocess.run(
            [sys.executable, "-c", TIMED, "report", "--experiment", "x"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == errors.EXIT_UNAVAILABLE, proc.stderr
    line = _one_line(proc.stderr, port)
    assert "did not answer within 1 s (3 tries" in line
    assert 3 <= float(proc.stdout.split()[-1]) < 4.5  # three tries of 1 s, no pause between them


@pytest.mark.slow
def test_a_sweep_fails_on_mlflow_down_before_a_trial(tmp_path, cli_env) -> None:
    with _refusing() as port:
        env = {
            **cli_env,
            "MLFLOW_TRACKING_URI": f"http://user:secret@127.0.0.1:{port}",
            tracking.TIMEOUT_ENV: "3",
        }
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", "sweep", str(ROOT / "jobs" / "smoke.yaml")],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert proc.returncode == errors.EXIT_UNAVAILABLE, proc.stderr
    assert "connection refused" in _one_line(proc.stderr, port)
    assert [p.name for p in (tmp_path / "runs" / "smoke").iterdir()] == ["logs"]  # no Tune experiment


def test_evaluating_a_checkpoint_file_fails_on_mlflow_down_before_the_pass(
    tmp_path, tiny_shards, monkeypatch, capsys
) -> None:
    """A checkpoint given as a file reaches MLflow only to log its scores: the check comes first (after the
    arguments': a --data that holds a split)."""
    with _refusing() as port:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{port}")
        monkeypatch.setenv(tracking.TIMEOUT_ENV, "3")
        code = main(["evaluate", str(tmp_path / "model.pt"), "--data", str(tiny_shards / "val")])
    assert code == errors.EXIT_UNAVAILABLE
    assert "connection refused" in _one_line(capsys.readouterr().err, port)


class _Hiccup(BaseHTTPRequestHandler):
    """A server that answers its first request 503 with Retry-After: 600, then every one as MLflow's
    experiment search would."""

    requests = 0

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        type(self).requests += 1
        if type(self).requests == 1:
            self.send_response(503)
            self.send_header("Retry-After", "600")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"experiments": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST  # noqa: N815

    def log_message(self, *args) -> None:
        pass


def test_a_hiccup_costs_a_retry_not_the_call_and_retry_after_does_not_stretch_the_bound() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hiccup)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        tracking.check_reachable(f"http://127.0.0.1:{server.server_port}")
        took = time.monotonic() - start
    finally:
        server.shutdown()
        server.server_close()
    assert _Hiccup.requests == 2 and took < 2


# ---------------------------------------------------------------- --filter on a real store

FILTERED = {  # filter -> the trials it selects, best first
    "params.norm = 'bn'": ["resnet50,bn", "resnet18,bn"],
    "params.`model.backbone` = 'resnet18'": ["resnet18,bn", "resnet18,gn"],
    "metrics.val_miou > 0.45": ["resnet50,bn", "resnet18,bn", "resnet18,gn"],  # the last epoch's value
    "params.norm = 'bn' and params.`model.backbone` = 'resnet18'": ["resnet18,bn"],
}
REFUSED = {  # filter -> what MLflow's grammar says of it
    "params.norm = 'bn' or params.norm = 'gn'": "'or'",
    "(params.norm = 'bn')": "'(params.norm = 'bn')'",
}


def _trials(uri: str, tmp: Path) -> None:
    """Four finished trials with checkpoints, as a sweep logs them."""
    experiment = tracking.client(uri).create_experiment(
        "filters", artifact_location=(tmp / "artifacts").as_uri()
    )
    sweep = tracking.start_sweep_run(experiment, "filters", {}, uri)
    checkpoint = tmp / tracking.CHECKPOINT_FILE
    checkpoint.write_bytes(b"weights")
    history = {
        ("resnet18", "bn"): [0.4, 0.6],
        ("resnet18", "gn"): [0.5],
        ("resnet50", "bn"): [0.7],
        ("resnet50", "gn"): [0.3],
    }
    for (backbone, norm), values in history.items():
        key = f"{backbone},{norm}"
        run_id = tracking.start_trial_run(
            experiment, sweep, key, {"model.backbone": backbone, "norm": norm}, uri
        )
        for epoch, value in enumerate(values, 1):
            tracking.log_epoch(run_id, {"val_miou": value}, epoch, uri)
        tracking.log_checkpoint(run_id, checkpoint, uri)
        tracking.end_run(run_id, uri)


@pytest.fixture(scope="module")
def in_sqlite(tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    _trials(uri, tmp)
    return uri


@pytest.fixture(scope="module")
def served(in_sqlite: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same store behind `mlflow server`: the filters go over REST and are parsed by the server."""
    tmp = tmp_path_factory.mktemp("served")
    with mlflow_server(in_sqlite, tmp / "artifacts", tmp / "server.log") as url:
        yield url


@pytest.fixture(params=["in_sqlite", pytest.param("served", marks=pytest.mark.slow)])
def store(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(request.param)


def test_filters_select_the_trials_they_name(store: str) -> None:
    for filter_string, expected in FILTERED.items():
        ranked = tracking.top_trial_runs("filters", "val_miou", 4, store, filter_string=filter_string)
        assert [run.info.run_name for run, _ in ranked] == expected, filter_string


def test_a_filter_outside_mlflows_grammar_is_a_usage_error_that_says_what_is_allowed(store: str) -> None:
    for filter_string, clause in REFUSED.items():
        with pytest.raises(UsageError) as refused:
            tracking.top_trial_runs("filters", "val_miou", 4, store, filter_string=filter_string)
        message = str(refused.value)
        assert message.startswith(f"--filter {filter_string!r}: Invalid clause(s) in filter string: {clause}")
        assert "clauses joined by `and` (no `or`, no parentheses)" in message


def test_ensemble_filter_through_the_command(in_sqlite, monkeypatch, capsys) -> None:
    """The documented form reaches the ranking (here: fewer matching trials than asked for, said so); one
    outside the grammar is exit 2, in one line."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", in_sqlite)
    assert main(["ensemble", "--experiment", "filters", "--top", "3", "--filter", "params.norm = 'bn'"]) == 2
    assert "has 2 finished trial configuration(s) matching \"params.norm = 'bn'\"" in capsys.readouterr().err
    assert (
        main(["ensemble", "--experiment", "filters", "--filter", "params.norm = 'bn' or params.norm = 'gn'"])
        == 2
    )
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --filter \"params.norm = 'bn' or params.norm = 'gn'\": Invalid clause(s)")
