"""The bench scripts' arithmetic, not their timings: the result table, the sweep's split of CPU time by
process, the GPU bench's steps on the CPU (FLOP counting and GPU peaks: tests/test_compute.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import common, gpu, sweep
from orchestrator.compute import count_flops


def test_table_rows_and_targets() -> None:
    rows = [
        common.Row("step_overhead", "bare loop", 0.25, "s/step", 1.0, "bare loop"),
        common.Row("step_overhead", "Ray Train, 1 worker", 0.26, "s/step", 1.04, "bare loop", "<= 1.03x"),
        common.Row("sweep", "command -> first step", 12.34, "s", target="<= 20 s"),
        common.Row("gpu", "resnet101", None, note="skipped: no CUDA"),
    ]
    lines = common.table(rows).splitlines()
    assert lines[0] == "| benchmark | setup | figure | ratio | target |"
    assert lines[2] == "| step_overhead | bare loop | 0.250 s/step | 1.00x bare loop |  |"
    assert (
        lines[3]
        == "| step_overhead | Ray Train, 1 worker | 0.260 s/step | 1.04x bare loop | <= 1.03x **missed** |"
    )
    assert lines[4] == "| sweep | command -> first step | 12.3 s |  | <= 20 s met |"
    assert lines[5] == "| gpu | resnet101 | skipped: no CUDA |  |  |"
    assert [r.met() for r in rows] == [None, False, True, None]


def test_rows_survive_the_json_between_scripts_and_driver(tmp_path: Path) -> None:
    rows = [common.Row("data", "loader", 44.6, "samples/s", 0.85, "raw", ">= 0.8x")]
    common.emit(rows, "header", tmp_path / "rows.json")
    assert common.read_rows(tmp_path / "rows.json") == rows


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["ray::RayTrainWorker.run_train_fn", "", ""], "ray::RayTrainWorker"),
        (["ray::IDLE"], "ray::IDLE"),
        (["/w/.venv/bin/python3", "-m", "orchestrator", "sweep", "spec.yaml", ""], "orchestrator"),
        (["/usr/bin/python3.11", "/w/.venv/bin/ray", "start", "--head", ""], "ray"),
        (["/w/ray/core/src/ray/gcs/gcs_server", "--gcs_server_port=6379", ""], "gcs_server"),
        ([""], "?"),
    ],
)
def test_processes_are_named_by_ray_title_or_program(argv: list[str], kind: str) -> None:
    assert sweep.process_kind(argv) == kind


def test_cpu_spent_is_split_by_the_kind_a_process_last_had() -> None:
    cpu = sweep.ProcessCpu()
    cpu.samples = [
        (0.0, {1: ("a", 1.0), 9: ("idle", 5.0)}),
        (1.0, {1: ("a", 1.5), 2: ("ray::IDLE", 0.2), 9: ("idle", 5.0)}),
        (2.0, {1: ("a", 2.0), 2: ("ray::Worker", 0.7), 3: ("a", 0.3), 9: ("idle", 5.0)}),
        (3.0, {1: ("a", 9.0)}),  # after the end
    ]
    # pid 1 from its CPU at the start, pid 2 (renamed once it held an actor) and 3 from their birth.
    assert cpu.spent(0.5, 2.5) == {"a": (pytest.approx(1.3), 2), "ray::Worker": (pytest.approx(0.7), 1)}


def test_cpu_of_a_real_process_is_sampled_under_its_program_name(tmp_path: Path) -> None:
    burn = tmp_path / "burn.py"
    burn.write_text(
        "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end:\n    pass\n"
    )
    with sweep.ProcessCpu(interval=0.05) as cpu:
        start = time.time()
        subprocess.run([sys.executable, str(burn)], check=True)
        time.sleep(0.1)
    used, count = cpu.spent(start, time.time())["burn.py"]
    assert count == 1 and 0 < used <= 1.0  # its last 0.05 s before it ended may go unseen


def test_the_gpu_bench_runs_its_steps_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA measurement (channels_last, bf16 autocast, FLOPs per image, the row) run on the CPU."""
    argv = ["gpu", "--device", "cpu", "--crops", "64x48", "--batch", "2", "--steps", "1", "--warmup", "0"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(tmp_path / "rows.json")])
    gpu.main()
    (row,) = common.read_rows(tmp_path / "rows.json")
    assert row.unit == "img/s/GPU" and row.value > 0 and row.ratio is None
    assert row.setup.endswith("(no peak known for CPU: no MFU)")
    # A training step is three forwards' FLOPs, less the first convolution's input gradient (the image has
    # none); the forward alone is counted by torch's own formula.
    from orchestrator.models.build import build_model

    model = build_model("resnet101", "deeplabv3plus", norm="bn")
    image = torch.randn(1, 3, 48, 64)
    stem = count_flops(lambda: model.backbone.conv1(image))
    expected = 3 * count_flops(lambda: model(image)) - stem
    figure = float(re.search(r"([\d.]+) GFLOP/img", row.setup)[1]) * 1e9
    assert figure == pytest.approx(expected, abs=0.05e9), row.setup  # printed to 0.1 GFLOP
