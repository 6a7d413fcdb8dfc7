"""What the bench scripts share: a scratch folder with a private Ray and MLflow, a packed synthetic dataset,
the small training spec, the result rows, their table, and the machine they were measured on.

Each script prints its rows as a markdown table and, with `--json PATH`, writes them for `python -m bench`,
which runs every script and prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import operator
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

COLUMNS = ("benchmark", "setup", "figure", "ratio", "target")
_COMPARE = {"<=": operator.le, ">=": operator.ge}


@dataclass
class Row:
    """One measured figure: `value` in `unit` (None: not measured, `note` says why), optionally a `ratio`
    to what `vs` names, and a `target` on the ratio ("<= 1.03x") or on the value ("<= 20 s")."""

    bench: str
    setup: str
    value: float | None
    unit: str = ""
    ratio: float | None = None
    vs: str = ""
    target: str = ""
    note: str = ""

    def met(self) -> bool | None:
        """Whether the target holds; None without a target or a measurement."""
        if not self.target:
            return None
        op, bound = self.target.split()[:2]
        measured = self.ratio if self.target.endswith("x") else self.value
        if measured is None:
            return None
        return _COMPARE[op](measured, float(bound.rstrip("x")))

    def cells(self) -> tuple[str, str, str, str, str]:
        figure = f"{number(self.value)} {self.unit}".strip() if self.value is not None else self.note
        ratio = f"{self.ratio:.2f}x {self.vs}".strip() if self.ratio is not None else ""
        met = self.met()
        target = self.target + ("" if met is None else " met" if met else " **missed**")
        return self.bench, self.setup, figure, ratio, target


def number(value: float) -> str:
    """Three significant figures (at least), without exponents."""
    digits = 0 if abs(value) >= 100 else 1 if abs(value) >= 10 else 2 if abs(value) >= 1 else 3
    return f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    """The rows as a markdown table (docs/performance.md's layout)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "| --- | --- | ---: | ---: | --- |"]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def parser(doc: str) -> argparse.ArgumentParser:
    """A bench script's argument parser, with the --json option the driver uses."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument(
        "--json", type=Path, help="also write the result rows to this file (for `python -m bench`)"
    )
    return p


def emit(rows: list[Row], header: str, json_path: Path | None) -> None:
    """Print what was measured and how, then the rows; write them as JSON when asked."""
    print(f"\n{header}\n{machine()}\n\n{table(rows)}", flush=True)
    if json_path:
        json_path.write_text(json.dumps([asdict(row) for row in rows], indent=1))


def read_rows(path: Path) -> list[Row]:
    return [Row(**fields) for fields in json.loads(path.read_text())]


def machine() -> str:
    """CPU model, cores, torch (and Ray) versions, the GPU if any: the line every table is printed with."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        ray = f"ray {version('ray')}"
    except PackageNotFoundError:  # the GPU check's bare machine
        ray = "no ray"
    return f"machine: {cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, {ray}"


@contextlib.contextmanager
def workspace(prefix: str) -> Iterator[Path]:
    """A scratch folder holding a SQLite MLflow store, with a private short RAY_TMPDIR (so Ray never joins
    another Ray of the machine); both removed afterwards, after the Ray this process started is shut down."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "RAY_TMPDIR", "RAY_ADDRESS")}
    os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db", RAY_TMPDIR=ray_tmp)
    os.environ.pop("RAY_ADDRESS", None)
    try:
        yield root
    finally:
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@contextlib.contextmanager
def local_cluster(state: Path, s3: bool = False, ray_args: tuple[str, ...] = ()) -> Iterator[dict[str, str]]:
    """cluster/local.sh (a Ray head with token auth and an MLflow server; with `s3`, a moto S3 endpoint) on
    free ports, its state and token in `state`; yields a user's shell environment after
    `source $STATE_DIR/env`. Stopped by the script (by PID); what it fails to stop is killed by its process
    group's PID, then reported as an error. tests/execution/test_cluster.py submits jobs to it, bench/sweep.py
    times a sweep joining it."""
    from bench.local_s3 import free_port

    script = [str(Path(__file__).resolve().parent.parent / "cluster" / "local.sh")]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_TRACKING"))}
    base.update(
        STATE_DIR=str(state),
        GCS_PORT=str(free_port()),
        DASHBOARD_PORT=str(free_port()),
        MLFLOW_PORT=str(free_port()),
        S3_PORT=str(free_port()),
        S3_SERVER="moto",
        RAY_AUTH_TOKEN_PATH=str(state / "token"),
        PYTHONUNBUFFERED="1",
    )
    ports = ["--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]
    ports += ray_args
    try:
        started = subprocess.run(
            [*script, "start", *(["--s3"] if s3 else []), "--", *ports],
            env=base, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        if started.returncode:
            logs = "".join(f"\n{p.name}: {p.read_text()[-3000:]}" for p in state.glob("*.log"))
            raise RuntimeError(f"cluster/local.sh start exited {started.returncode}: {started.stderr}{logs}")
        shell = ["bash", "-c", f"source {state}/env && env -0"]
        exported = subprocess.run(shell, env=base, check=True, capture_output=True, text=True).stdout
        yield dict(item.split("=", 1) for item in exported.split("\0") if "=" in item)
    finally:
        stopped = subprocess.run([*script, "stop"], env=base, capture_output=True, text=True, timeout=120)
        left = list(state.glob("*.pid"))
        for pid_file in left:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        if left:
            raise RuntimeError(f"cluster/local.sh stop left {[p.stem for p in left]}: {stopped.stderr}")


def synth_pack(root: Path, train: int, val: int, size: tuple[int, int], shard_size: int = 32) -> Path:
    """Synthetic BDD100K-layout scenes packed into shards under root/shards (train/ and val/)."""
    from orchestrator.data.shards import pack
    from orchestrator.data.synth import synthesize

    synthesize(str(root / "synth"), train=train, val=val, size=size)
    pack(str(root / "synth"), str(root / "shards"), shard_size=shard_size)
    return root / "shards"


def small_spec(
    name: str, shards: Path, *, steps: int, batch: int, crop: int, epochs: int, **sections: Any
) -> dict[str, Any]:
    """The benches' trial: resnet18-deeplabv3plus (as jobs/smoke.yaml) on the packed shards, decoding in
    the training process (`loader_workers: 0`), 1 CPU per worker, checkpoints under the scratch folder."""
    raw: dict[str, Any] = {
        "name": name,
        "data": {"train": f"{shards}/train", "val": f"{shards}/val", "loader_workers": 0},
        "model": {"backbone": "resnet18", "head": "deeplabv3plus"},
        # A bench's few steps on synthetic scenes may predict one class: timed runs must not end early.
        "train": {
            "epochs": epochs,
            "steps_per_epoch": steps,
            "batch_per_gpu": batch,
            "crop": [crop, crop],
            "diverge_single_class_epochs": 0,
        },
        "resources": {"workers_per_trial": 1, "gpus_per_worker": 0, "cpus_per_worker": 1},
        "storage": str(shards.parent / "runs"),
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return raw


def trained_step_s(raw: dict[str, Any], setup: str) -> list[float]:
    """`orchestrator train` (`sweep.run_single`) of the spec `raw`, alone in its `tracking.experiment`; each
    epoch's seconds per step, from the images_per_s its trial logged to MLflow (an epoch's training, its
    interval checkpoints included; the loader's start, validation and the epoch-end checkpoint not)."""
    from orchestrator import spec as specs
    from orchestrator import tracking
    from orchestrator.execution.sweep import run_single

    trial = specs.validate(raw)
    outcome = run_single(trial)
    if outcome.status != "FINISHED":
        raise SystemExit(f"{setup} failed: {outcome.error}")
    c = tracking.client()
    exp = c.get_experiment_by_name(trial.tracking.experiment)
    [run] = c.search_runs([exp.experiment_id], f"tags.`{tracking.KIND}` = 'trial'")  # the only one
    history = sorted(c.get_metric_history(run.info.run_id, "images_per_s"), key=lambda m: m.step)
    return [trial.train.batch_per_gpu * trial.resources.workers_per_trial / m.value for m in history]
