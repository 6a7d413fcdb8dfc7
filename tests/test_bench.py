"""The bench scripts' arithmetic, not their timings: FLOP counting (for MFU), GPU peaks, the result table,
the sweep's split of CPU time by process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from bench import common, gpu, sweep


def test_conv_flops_are_two_per_multiply_add() -> None:
    cin, cout, k, h, w = 3, 8, 3, 10, 12
    conv = nn.Conv2d(cin, cout, k, padding=1, bias=False)
    x = torch.randn(1, cin, h, w)
    forward = 2 * cin * cout * k * k * h * w
    assert gpu.count_flops(lambda: conv(x)) == forward
    # Backward: the input's gradient and the weight's gradient, each a convolution as large as the forward.
    x.requires_grad_(True)
    assert gpu.count_flops(lambda: conv(x).sum().backward()) == 3 * forward


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", None),  # not an L4
        ("Tesla T4", None),
    ],
)
def test_peak_flops_by_device_name(name: str, peak: float | None) -> None:
    assert gpu.peak_flops(name) == peak


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
