"""The callback Ray Train's controller unpickles stays light: the controller of every trial imports its
module before it starts the workers (the sweep's e2e tests check what it forwards to Tune)."""

from __future__ import annotations

import subprocess
import sys


def test_the_controller_side_callback_imports_nothing_heavy_of_ours():
    heavy = ["orchestrator.sweep", "orchestrator.train.loop", "orchestrator.models", "mlflow"]
    code = f"import sys\nimport orchestrator.tune_report\nprint([m for m in {heavy!r} if m in sys.modules])\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing the callback pulled in {out.strip()}"
