"""`make gpu-check` (bench/gpu_check.py) in its dry mode: the whole check on the CPU at tiny sizes, as it
runs on a lent GPU machine, which has torch but no Ray, MLflow or pydantic: here those three are made
unimportable for every process of the check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.models.catalog import norm_examples

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_dry_on_the_cpu_without_ray_mlflow_or_pydantic(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    for name in ("ray", "mlflow", "pydantic"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('the GPU machine has no {name}')\n")
    env = {**os.environ, "GPU_CHECK_DRY": "1", "PYTHONPATH": str(blocked)}
    out = tmp_path / "gpu-check.md"
    cmd = [sys.executable, "-m", "bench.gpu_check", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = out.read_text()
    assert "**Dry run**" in doc
    tests = [line for line in doc.splitlines() if line.startswith("| test_")]
    # tests/cuda/test_cuda.py: 5 of their own, and channels_last for every norm of the catalog and for WS.
    assert len(tests) == 5 + len(norm_examples()) + 1, tests
    assert all(" | passed | " in t or " | skipped | " in t for t in tests), tests
    assert sum(" | skipped | " in t for t in tests) == 1
    assert "img/s/GPU" in doc  # the throughput row measured
    for norm in ("bn", "syncbn", "gn:c16", "gn:c16+ws", "evalnorm"):
        (row,) = [line for line in doc.splitlines() if line.startswith(f"| {norm} | ")]
        assert row.endswith("x |"), row  # measured, and relative to bn
