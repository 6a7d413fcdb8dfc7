"""`orchestrator plan` on jobs/smoke.yaml: each point's memory from the meta-device counts (the batch
extrapolated from 1 and 2 equals counting at the batch), FLOPs to GPU-hours to dollars, the JSON."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator import spec as specs
from orchestrator.checkpoints import model_for
from orchestrator.cli import main
from orchestrator.compute import CONTEXT_GIB, FRAGMENTATION, GIB, GPUS, step_cost
from orchestrator.plan import MFU

SMOKE = "jobs/smoke.yaml"


def test_the_json_plan_adds_up(capsys) -> None:
    argv = ["plan", SMOKE, "--gpu", "l4", "--train-images", "100", "--set", "train.steps_per_epoch=null"]
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    keys = [p["key"] for p in plan["points"]]
    assert keys == [t.key for t in specs.expand(specs.load(SMOKE, ["train.steps_per_epoch=null"]))]
    assert all(p["fits"] and 1 < p["memory_gib"] < 22.5 for p in plan["points"])
    for p in plan["points"]:  # 3 epochs of the 100 images, at the FLOPs of one
        assert p["images"] == 300
        expected = 300 * p["gflops_per_image"] * 1e9 / (GPUS["l4"].peak_bf16 * MFU) / 3600
        assert p["gpu_hours"] == pytest.approx(expected, rel=1e-12)
    total = plan["total"]
    assert total["gpu_hours"] == pytest.approx(sum(p["gpu_hours"] for p in plan["points"]))
    assert total["cost_usd"] == pytest.approx(total["gpu_hours"] * GPUS["l4"].usd_per_hour)
    assert total["wall_hours"] == pytest.approx(total["gpu_hours"] / 2)  # 1 trial at a time x 2 workers

    assert main([*argv, "--price", "2", "--gpus", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["grid", "point", "GiB/GPU", "fits", "GFLOP/img", "GPU-h"]
    assert out[6].startswith("4 trials on l4 (22.5 GiB): 0 do not fit;") and "on 4 GPUs" in out[6]
    assert out[6].endswith("at $2.00/GPU-h")

    assert main(["plan", SMOKE, "--gpu", "a100"]) == 1
    assert (
        "--gpu 'a100': allowed are a10g, l4, v100-32gb, a100-40gb, a100-80gb, h100, h200"
        in capsys.readouterr().err
    )


def test_a_points_memory_is_its_weights_states_and_activations_at_its_batch(capsys) -> None:
    """Batch 5 is extrapolated from counts at 1 and 2; here it is counted at 5 and added up independently."""
    overrides = ["grid.norm=[gn:g8]", "grid.train.batch_per_gpu=[5]", "train.crop=[96,64]"]
    overrides.append("train.optimizer=adamw")
    assert main(["plan", SMOKE, "--gpu", "a10g", "--json", *sets(overrides)]) == 0
    (point,) = json.loads(capsys.readouterr().out)["points"]
    (trial,) = specs.expand(specs.load(SMOKE, overrides))
    with torch.device("meta"):
        model = model_for(trial.spec, pretrained=False).train()
    images, masks = (
        torch.empty(5, 3, 64, 96, device="meta"),
        torch.empty(5, 64, 96, dtype=torch.long, device="meta"),
    )
    cost = step_cost(model, images, masks)
    weights = sum(p.numel() for p in model.parameters()) * 4 * 4  # weights, gradients, AdamW's two moments
    expected = (weights + cost.activation_bytes * FRAGMENTATION) / GIB + CONTEXT_GIB
    assert point["memory_gib"] == pytest.approx(expected, rel=1e-12) and point["batch_per_gpu"] == 5

    huge = ["grid.norm=[gn:g8]", "grid.train.batch_per_gpu=[4096]", "train.crop=[96,64]"]
    assert main(["plan", SMOKE, "--gpu", "a10g", "--json", *sets(huge)]) == 0
    (point,) = json.loads(capsys.readouterr().out)["points"]
    assert not point["fits"] and point["memory_gib"] > 22.5


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_flops_are_counted_once_per_architecture_and_crop_for_every_norm(capsys) -> None:
    """The plan counts FLOPs once per backbone, head, output stride and crop (norms and AMP add none):
    each point's figure is its own model's count."""
    overrides = ["grid.model.output_stride=[8,16]", "grid.norm=[bn,gn:g8+ws]", "grid.train.batch_per_gpu=[1]"]
    overrides += ["grid.train.amp=[off,bf16]", "train.crop=[64,48]"]
    assert main(["plan", SMOKE, "--gpu", "a10g", "--json", *sets(overrides)]) == 0
    points = json.loads(capsys.readouterr().out)["points"]
    for point, trial in zip(points, specs.expand(specs.load(SMOKE, overrides)), strict=True):
        with torch.device("meta"):
            model = model_for(trial.spec, pretrained=False).train()
        images, masks = (
            torch.empty(1, 3, 48, 64, device="meta"),
            torch.empty(1, 48, 64, dtype=torch.long, device="meta"),
        )
        assert point["gflops_per_image"] * 1e9 == step_cost(model, images, masks).flops
    assert len({p["gflops_per_image"] for p in points}) == 2  # output stride 8 costs more than 16
