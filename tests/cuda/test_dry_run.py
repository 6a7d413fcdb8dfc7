"""The CUDA tests skip here (no GPU), so nothing would notice one of them breaking before a GPU runs it:
their dry mode runs the same code on the CPU, with gloo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_the_cuda_tests_pass_in_their_dry_mode_on_the_cpu() -> None:
    env = {**os.environ, "GPU_CHECK_DRY": "1"}
    here = str(Path(__file__).parent)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", here]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1] and "failed" not in proc.stdout.splitlines()[-1]
