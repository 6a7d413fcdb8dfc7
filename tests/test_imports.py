"""What each kind of process imports, kept light where it starts on the way to a trial's first step
(bench/sweep.py times that path): every trial starts its driver, Ray Train's controller and its workers as
new Python processes, and each import below is about a second of CPU in each of them."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        # Ray Train's controller unpickles the run's callbacks before it starts the workers.
        (
            "orchestrator.execution.tune_report",
            ["orchestrator.execution.sweep", "orchestrator.train.loop", "orchestrator.models", "mlflow"],
        ),
        # The sweep's own process never starts a Ray Train run.
        (
            "orchestrator.execution.sweep",
            ["torch", "orchestrator.train.loop", "orchestrator.execution.trainer"],
        ),
        # A trial's driver builds the trainer and Ray Train's controller unpickles its backend config:
        # neither ever holds a tensor.
        ("orchestrator.execution.trainer", ["torch", "ray.train.torch", "orchestrator.train.loop"]),
        # The step and the models run on a bare CUDA machine (the GPU check): torch and the rooms below it.
        ("orchestrator.train.step", ["ray", "mlflow", "pydantic", "orchestrator.spec"]),
        ("orchestrator.models.build", ["ray", "mlflow", "pydantic", "orchestrator.spec"]),
        # Workers: MLflow is rank 0's alone, imported once an epoch ends.
        ("orchestrator.train.loop", ["mlflow", "orchestrator.tracking"]),
        # Inference reaches nothing of training (it shares the checkpoint contract, orchestrator.checkpoints).
        (
            "orchestrator.inference.runs",
            ["orchestrator.train.loop", "orchestrator.execution.trainer", "ray.train"],
        ),
    ],
)
def test_a_process_imports_only_what_it_needs(module: str, forbidden: list[str]) -> None:
    code = f"import sys\nimport {module}\nprint([m for m in {forbidden!r} if m in sys.modules])\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} pulled in {out.strip()}"
