"""`make bench`: every bench script at its quick size, one after another, then one table of all their figures.

    .venv/bin/python -m bench [--only step_overhead checkpoint sweep data norms evaluate gpu] [--logs DIR]

Each script runs as its own process (`python -m bench.NAME --json FILE`), with its output in a log file; a
line per script says how long it took. A script that fails is a row of the table that says so (and the end
of its log is printed), the others still run. The defaults of each script are sized so that all of them
together take about 8 minutes on an idle 2-core machine (well under 17 on a busy one); run a script alone
with larger flags to scale it up.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

BENCHES = ("step_overhead", "checkpoint", "sweep", "data", "norms", "evaluate", "gpu")
ROOT = Path(__file__).resolve().parent.parent


def run(name: str, logs: Path) -> list[common.Row]:
    out, log = logs / f"{name}.json", logs / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w") as f:
        cmd = [sys.executable, "-m", f"bench.{name}", "--json", str(out)]
        done = subprocess.run(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    took = time.perf_counter() - started
    print(f"bench: {name} took {took:.0f} s (log: {log})", file=sys.stderr, flush=True)
    if done.returncode == 0 and out.exists():
        return common.read_rows(out)
    tail = log.read_text().splitlines()[-30:]
    print("\n".join(tail), file=sys.stderr)
    why = next((line for line in reversed(tail) if line.strip()), "no output")
    return [common.Row(name, "failed", None, note=f"exit {done.returncode}: {why[:120]}")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    p.add_argument(
        "--logs", type=Path, help="folder for each script's log and rows (default: a temporary one)"
    )
    args = p.parse_args()
    logs = args.logs or Path(tempfile.mkdtemp(prefix="bench-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = [row for name in args.only for row in run(name, logs)]
    total = time.perf_counter() - started
    print(f"\n{common.machine()}; `make bench` took {total / 60:.1f} min\n\n{common.table(rows)}")


if __name__ == "__main__":
    main()
