"""What a sweep costs beyond its trials: `orchestrator sweep` of a 4-trial grid on a local Ray, from the
command to the first training step, and the grid's wall time against the ideal packing of its trials.

    .venv/bin/python -m bench.sweep [--steps 8] [--epochs 2] [--crop 128] [--size 256x144]
                                    [--modes command cluster] [--processes]

Two ways to give the sweep its Ray, one after the other on the same spec and data:
- command: the command starts a local Ray itself (the laptop path), and stops it at the end;
- cluster: the command joins a running one-machine cluster (`cluster/local.sh start`: a Ray head with
  token auth and an MLflow server, on free ports, started and left to go idle before the clock starts),
  as a job's entrypoint does (`ray job submit` sets RAY_ADDRESS to the head); trials log to the server.

Synthesizes and packs a small dataset in a temporary folder and writes a spec of 4 trials (norm bn, gn:g8 x
batch per worker 1, 2; resnet18-deeplabv3plus, 1 worker of 1 CPU per trial, `max_concurrent_trials` = the
trials that fit in this machine's CPUs), then runs `orchestrator sweep` as a subprocess with a private
RAY_TMPDIR and (command mode) a SQLite MLflow store in the temporary folder. The figures come from what the
sweep logged to MLflow (wall-clock milliseconds):
- a trial's first training step starts at t1 - train1 - (t2 - t1 - train2): t_e is the timestamp of epoch
  e's metrics, train_e its training time (steps x batch / images_per_s); t2 - t1 - train2 is what an epoch
  spends besides training (loader start, validation, checkpoint, report, MLflow), taken from epoch 2 and
  subtracted from epoch 1 as well. The MLflow trial run opens before Ray Train starts its workers;
- command to first step: from the moment the command is started to the earliest trial's first step
  (Python and Ray start, Tune, the trial driver, the worker group, model and loader). Target <= 20 s;
- grid wall: the first trial run's start to the last one's end; ideal: the sum of the trial runs' durations
  over the concurrent slots (perfect packing, no gaps between trials). Target: wall <= 1.1x ideal;
- with --processes, where the command's first seconds go: every process's CPU time (Linux /proc, sampled
  every 0.5 s by a thread of this script, ~1% of a core), from command start to the first step, summed by
  kind of process (Ray titles its workers' processes ray::<actor class>), against all cores' time.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import yaml  # noqa: E402
from mlflow.entities import Run  # noqa: E402

from bench import common  # noqa: E402
from orchestrator import tracking  # noqa: E402

BENCH = "sweep"
GRID = {"norm": ["bn", "gn:g8"], "train.batch_per_gpu": [1, 2]}
CPUS_PER_TRIAL = 1  # 1 worker of 1 CPU (common.small_spec)
MODES = {"command": "Ray started by the command", "cluster": "joining a running local cluster"}


def first_step(run: Run, steps: int, uri: str) -> float:
    """When the trial's first training step started, in seconds since the epoch (see the docstring)."""
    c = tracking.client(uri)
    rates = {m.step: m for m in c.get_metric_history(run.info.run_id, "images_per_s")}
    batches = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "batch_per_gpu")}
    if not {1, 2} <= set(rates):
        raise SystemExit(f"trial {run.info.run_name} logged epochs {sorted(rates)}: the bench needs 1 and 2")
    t1, t2 = rates[1].timestamp / 1000, rates[2].timestamp / 1000
    train1, train2 = (steps * batches[e] / rates[e].value for e in (1, 2))
    return t1 - train1 - max(0.0, t2 - t1 - train2)


def wait_idle(busy: float = 0.2, timeout: float = 60.0) -> None:
    """Until the machine's CPUs are at most `busy` busy over a second (a cluster just started settles)."""

    def ticks() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (total0, idle0), _, (total1, idle1) = ticks(), time.sleep(1), ticks()
        if 1 - (idle1 - idle0) / max(total1 - total0, 1) <= busy:
            return


@contextlib.contextmanager
def joined_cluster(state: Path) -> Iterator[dict[str, str]]:
    """A running cluster/local.sh (state in `state`), left to go idle; yields what a job's entrypoint finds
    in its environment: the script's exports, and RAY_ADDRESS as `ray job submit` sets it."""
    with common.local_cluster(state) as env:
        wait_idle()
        yield env | {
            "RAY_ADDRESS": f"127.0.0.1:{env['GCS_PORT']}",
            "RAY_TMPDIR": str(state),
            # As the head passes on to its jobs: a driver would otherwise rewrite 127.0.0.1 to the
            # machine's address, where this head does not listen.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }


class ProcessCpu:
    """Every process's CPU time (user + system, /proc/PID/stat), sampled by a thread every `interval` s while
    in the `with` block, to split a stretch of wall-clock time by the processes that spent CPU in it."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> ProcessCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self._stop.is_set():
            now, snapshot = time.time(), {}
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                with contextlib.suppress(OSError, IndexError):  # the process may end while being read
                    stat = Path(entry.path, "stat").read_text()
                    # The fields after "(command name)", which may hold spaces; utime and stime are 14, 15.
                    fields = stat[stat.rfind(")") + 2 :].split()
                    argv = Path(entry.path, "cmdline").read_text().split("\0")
                    cpu = (int(fields[11]) + int(fields[12])) / tick
                    snapshot[int(entry.name)] = (process_kind(argv), cpu)
            self.samples.append((now, snapshot))
            self._stop.wait(self.interval)

    def spent(self, start: float, end: float) -> dict[str, tuple[float, int]]:
        """CPU-seconds and number of processes per kind of process between wall-clock times start and end
        (a process's kind as last seen: Ray renames a worker once it holds an actor)."""
        before: dict[int, float] = {}
        during: dict[int, tuple[str, float]] = {}
        for t, snapshot in self.samples:
            if t > end:
                break
            for pid, (kind, cpu) in snapshot.items():
                if t <= start:
                    before[pid] = cpu
                else:
                    during[pid] = (kind, cpu)
        kinds: dict[str, tuple[float, int]] = {}
        for pid, (kind, cpu) in during.items():
            used = cpu - before.get(pid, 0.0)
            if used > 0:
                total, count = kinds.get(kind, (0.0, 0))
                kinds[kind] = (total + used, count + 1)
        return kinds


def process_kind(argv: list[str]) -> str:
    """ray::<actor class> for Ray's workers (their process title), else the program: python's script or -m
    module, or the executable's name."""
    title = " ".join(argv)
    if ray_worker := re.match(r"ray::\w+", title):
        return ray_worker.group()
    words = title.split()
    if not words:
        return "?"
    program = Path(words[0]).name
    if program.startswith("python") and len(words) > 1:
        return words[2] if words[1] == "-m" and len(words) > 2 else Path(words[1]).name
    return program


def timed_sweep(spec_path: Path, log_path: Path, env: dict[str, str]) -> tuple[float, float]:
    """(start, end) wall-clock seconds of `orchestrator sweep spec_path` with `env` added to this process's
    environment, its output in log_path."""
    started = time.time()
    with open(log_path, "w") as log:
        cmd = [sys.executable, "-m", "orchestrator", "sweep", str(spec_path)]
        done = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        )
    ended = time.time()
    if done.returncode:
        sys.stderr.write(log_path.read_text()[-5000:])
        raise SystemExit(f"orchestrator sweep exited {done.returncode}")
    return started, ended


def figures(
    mode: str, times: tuple[float, float], uri: str, steps: int, slots: int, cpu: ProcessCpu | None = None
) -> list[common.Row]:
    """The rows of one sweep that ran over times=(start, end), from what it logged to MLflow at uri; with
    `cpu`, also the CPU time of every kind of process from the start to the first step (the top 8)."""
    started, ended = times
    exp = tracking.client(uri).get_experiment_by_name(BENCH)
    parent = tracking.latest_sweep_run([exp.experiment_id], uri)
    ray_up = parent.info.start_time / 1000  # the sweep run opens once Ray is up, before Tune starts
    runs = tracking.trial_runs(exp.experiment_id, parent.info.run_id, uri)
    starts = [r.info.start_time / 1000 for r in runs]
    ends = [r.info.end_time / 1000 for r in runs]
    firsts = [first_step(r, steps, uri) for r in runs]
    first = min(firsts)  # the sweep's first training step
    wall = max(ends) - min(starts)
    ideal = sum(e - s for s, e in zip(starts, ends, strict=True)) / slots
    ray = "Ray up" if mode == "command" else "joined the cluster"

    def row(setup: str, value: float, *ratio_vs_target: float | str) -> common.Row:
        return common.Row(BENCH, f"{MODES[mode]}: {setup}", value, "s", *ratio_vs_target)

    rows = [
        row("command start -> first training step", first - started, None, "", "<= 20 s"),
        row(f"  of which: command start -> {ray} (sweep run opened)", ray_up - started),
        row(f"  of which: {ray} -> first trial run opened (Tune)", min(starts) - ray_up),
        row(
            f"  trial run opened -> its first step (Ray Train workers, model, loader; mean of {len(runs)})",
            statistics.mean(f - s for f, s in zip(firsts, starts, strict=True)),
        ),
        row(f"ideal: sum of {len(runs)} trial times / {slots} slots", ideal),
        row("grid wall (first trial start -> last trial end)", wall, wall / ideal, "ideal", "<= 1.1x"),
        row(
            "whole command" + (" (Ray start and stop included)" if mode == "command" else ""),
            ended - started,
            (ended - started) / ideal,
            "ideal",
        ),
    ]
    if cpu is None:
        return rows
    kinds = cpu.spent(started, first)
    cores_time = (first - started) * (os.cpu_count() or 1)
    total = sum(used for used, _ in kinds.values())
    label = f"{MODES[mode]}: CPU from command start to the first step"
    rows.append(
        common.Row(BENCH, f"{label}, all processes", total, "CPU-s", total / cores_time, "all cores' time")
    )
    rows.extend(
        common.Row(BENCH, f"{MODES[mode]}:   {kind} ({count} process{'es' * (count > 1)})", used, "CPU-s")
        for kind, (used, count) in sorted(kinds.items(), key=lambda item: -item[1][0])[:8]
    )
    return rows


def main() -> None:
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=8, help="training steps per epoch")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (at least 2)")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--size", default="256x144", help="synthetic image WIDTHxHEIGHT")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument(
        "--processes",
        action="store_true",
        help="also split the CPU time to the first step by process (Linux)",
    )
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs: the first step's time is derived from epochs 1 and 2")
    slots = max(1, (os.cpu_count() or 1) // CPUS_PER_TRIAL)

    rows = []
    with common.workspace("bench-sweep-") as root:
        size = tuple(int(v) for v in args.size.split("x"))
        batch = max(GRID["train.batch_per_gpu"])
        shards = common.synth_pack(root, train=batch * args.steps, val=4, size=size)
        raw = common.small_spec(
            BENCH, shards, steps=args.steps, batch=1, crop=args.crop, epochs=args.epochs, grid=GRID
        )
        raw["resources"]["max_concurrent_trials"] = slots
        spec_path = root / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(raw))
        for mode in args.modes:
            log_path = root / f"sweep-{mode}.log"
            with contextlib.ExitStack() as stack:
                env = {}
                if mode == "cluster":
                    env = stack.enter_context(joined_cluster(Path(os.environ["RAY_TMPDIR"]) / "cluster"))
                cpu = stack.enter_context(ProcessCpu()) if args.processes else None
                times = timed_sweep(spec_path, log_path, env)
                uri = env.get("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])
                rows += figures(mode, times, uri, args.steps, slots, cpu)
    common.emit(
        rows,
        f"{math.prod(map(len, GRID.values()))} trials ({' x '.join(GRID)}), resnet18-deeplabv3plus, "
        f"crop {args.crop}, "
        f"{args.epochs} epochs of {args.steps} steps, 1 worker x 1 CPU per trial, {slots} concurrent",
        args.json,
    )


if __name__ == "__main__":
    main()
