"""`make gpu-check`: the first run of the CUDA paths on a lent GPU, in one command of at most ~8 minutes,
written up as one document.

    python3 -m bench.gpu_check [--out docs/gpu-check.md] [--wheels DIR]

1. The `cuda` tests (tests/cuda: nccl and SyncBatchNorm under DDP, AMP with a gradient scaler, device
   augmentation, channels_last through every norm layer, out-of-memory handling), each with its outcome.
2. bench.gpu: images/s and MFU of resnet101-deeplabv3plus, bf16, channels_last, at the report's crops.
3. The norms' training cost on the GPU relative to bn (bench.gpu per norm at one crop): the GN-vs-BN
   question users ask. On one GPU, syncbn has no peer to sync with and costs what bn costs.

It needs torch and the project's torch-level rooms only (no Ray, MLflow or pydantic: the lent machine has
none), plus pytest: where pytest is missing it is imported from the wheels in `--wheels` (default
`.whl/gpu-check`, filled here by `make gpu-wheels`, carried to the machine). Each part
runs as its own process with a time limit, so one that hangs or crashes is a line of the document, not the
end of the check. GPU_CHECK_DRY=1 runs everything on the CPU at tiny sizes (the test suite does, to check
this script); its document says so at the top.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from bench import common

ROOT = Path(__file__).resolve().parent.parent
NORMS = ("bn", "syncbn", "gn:c16", "gn:c16+ws", "evalnorm")
FULL = {"crops": ["513x513", "720x720", "1280x720"], "norm_crop": "720x720", "batch": "8", "steps": "10",
        "warmup": "3", "device": "cuda"}  # fmt: skip
DRY = {"crops": ["64x64"], "norm_crop": "64x64", "batch": "1", "steps": "1", "warmup": "0", "device": "cpu"}
LIMITS = {"tests": 200, "bench": 90, "norm": 36}  # seconds per process: under 8 minutes in all


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu-check.md")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl" / "gpu-check")
    args = p.parse_args()
    dry = os.environ.get("GPU_CHECK_DRY") == "1"
    sizes = DRY if dry else FULL
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    paths = [str(ROOT), _pytest_path(args.wheels), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in paths if path)}
    tests = run_tests(work, env)
    rows = bench_rows(work, env, sizes, sizes["crops"], "bn", LIMITS["bench"])
    norms = {norm: bench_rows(work, env, sizes, [sizes["norm_crop"]], norm, LIMITS["norm"]) for norm in NORMS}
    args.out.write_text(render(dry, tests, rows, norms, sizes))
    print(f"wrote {args.out} (scratch: {work})")


def _pytest_path(wheels: Path) -> str | None:
    """Where this Python has no pytest: the wheel files of `wheels`, for PYTHONPATH (pure-Python wheels
    import as zip archives, so nothing is installed); None where it has one."""
    if importlib.util.find_spec("pytest"):
        return None
    found = sorted(str(w) for w in wheels.glob("*.whl"))
    if not found:
        sys.exit(f"gpu-check: no pytest here and no wheels in {wheels}: `make gpu-wheels` and carry it")
    return os.pathsep.join(found)


def run_tests(work: Path, env: dict[str, str]) -> list[tuple[str, str, str]]:
    """(test, outcome, note) of each `cuda` test. --confcutdir keeps the suite's own conftest (S3 and Ray
    fixtures) out."""
    report, here = work / "cuda-tests.xml", ROOT / "tests" / "cuda"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "--confcutdir", here,
           f"--junitxml={report}", here / "test_cuda.py"]  # fmt: skip
    try:
        subprocess.run(cmd, cwd=ROOT, env=env, timeout=LIMITS["tests"], capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return [("tests/cuda", "timed out", f"after {LIMITS['tests']} s")]
    if not report.exists():
        return [("tests/cuda", "did not run", "pytest wrote no report")]
    results = []
    for case in ET.parse(report).iter("testcase"):
        outcome, note = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[kind]
                note = (found.get("message") or "").splitlines()[0][:160] if found.get("message") else ""
        results.append((case.get("name", "?"), outcome, note))
    return results


def bench_rows(
    work: Path, env: dict[str, str], sizes: dict, crops: list[str], norm: str, limit: int
) -> list[common.Row]:
    """bench.gpu's rows for `norm` at `crops`, or one row saying why there are none."""
    out = work / f"gpu-{norm.replace(':', '-').replace('+', '-')}-{len(crops)}.json"
    cmd = [sys.executable, "-m", "bench.gpu", "--json", out, "--norm", norm, "--crops", *crops,
           "--batch", sizes["batch"], "--steps", sizes["steps"], "--warmup", sizes["warmup"],
           "--device", sizes["device"]]  # fmt: skip
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, timeout=limit, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return [common.Row("gpu", f"norm {norm}", None, note=f"timed out after {limit} s")]
    if done.returncode or not out.exists():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return [common.Row("gpu", f"norm {norm}", None, note=f"failed: {tail}")]
    return common.read_rows(out)


def render(
    dry: bool, tests: list[tuple[str, str, str]], rows: list[common.Row], norms: dict, sizes: dict
) -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (the CPU)"
    count = torch.cuda.device_count()
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# GPU check", ""]
    if dry:
        lines += ["**Dry run** (GPU_CHECK_DRY=1): the CPU at tiny sizes; no figure here is a GPU's.", ""]
    python = sys.version.split()[0]
    lines += [f"`make gpu-check` on {when}: {device} ({count} GPU(s)), {versions}, Python {python}.", ""]
    lines += ["## The CUDA tests", "", "| test | outcome | note |", "| --- | --- | --- |"]
    lines += [f"| {name} | {outcome} | {note.replace('|', '/')} |" for name, outcome, note in tests]
    lines += ["", "## Throughput and MFU", "", common.table(rows), ""]
    lines += ["## The norms relative to bn", ""]
    lines += [f"resnet101-deeplabv3plus at {sizes['norm_crop']}, bf16, channels_last; images/s per GPU.", ""]
    lines += ["| norm | images/s | x bn |", "| --- | ---: | ---: |"]
    base = _rate(norms.get("bn", []))
    for norm, measured in norms.items():
        rate = _rate(measured)
        if rate is None:
            lines.append(f"| {norm} | {measured[0].note if measured else 'not measured'} | |")
        else:
            lines.append(f"| {norm} | {common.number(rate)} | {f'{rate / base:.2f}x' if base else ''} |")
    lines += ["", "Not measured: the memory estimate against the measured peak (no `orchestrator plan`).", ""]
    return "\n".join(lines)


def _rate(rows: list[common.Row]) -> float | None:
    return rows[0].value if rows and rows[0].value is not None else None


if __name__ == "__main__":
    main()
