"""`orchestrator plan` on jobs/smoke.yaml: each point's memory from the meta-device counts (the batch
extrapolated from 1 and 2 equals counting at the batch), FLOPs to GPU-hours to dollars, the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orchestrator import spec as specs
from orchestrator.checkpoints import model_for
from orchestrator.cli import main
from orchestrator.compute import CONTEXT_GIB, CUDA_AUTOCAST, FRAGMENTATION, GIB, step_cost
from orchestrator.gpus import GPUS
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
    assert out[0].split() == [
        "grid", "point", "batch", "GiB/wkr", "GPU/wkr", "fits", "GFLOP/img", "img/s/GPU", "GPU-h"
    ]  # fmt: skip
    assert out[6].startswith("4 trials on l4 (22.5 GiB): 0 do not fit;") and "on 4 GPUs" in out[6]
    assert out[6].endswith("at $2.00/GPU-h")

    assert main(["plan", SMOKE, "--gpu", "a100"]) == 2
    assert (
        "--gpu 'a100': allowed are v100-16gb, a10g, l4, v100-32gb, a100-40gb, a100-80gb, h100, h200"
        in capsys.readouterr().err
    )


def test_a_steps_budget_costs_the_images_of_its_steps_at_each_batch(capsys) -> None:
    argv = ["plan", SMOKE, "--gpu", "l4", "--train-images", "100", "--json"]
    assert main([*argv, "--set", "train.steps_per_epoch=null", "--set", "train.budget=steps:30"]) == 0
    points = json.loads(capsys.readouterr().out)["points"]
    assert {p["key"].split(",")[1]: p["images"] for p in points} == {
        "train.batch_per_gpu=1": 30 * 1 * 2,  # steps x batch x 2 workers, whatever the split holds
        "train.batch_per_gpu=2": 30 * 2 * 2,
    }


def test_a_points_memory_is_its_weights_states_and_activations_at_its_batch(capsys) -> None:
    """Batch 5 is extrapolated from counts at 1 and 2; here it is counted at 5 and added up independently,
    without AMP and under bf16 AMP (CUDA autocast's casts: GN in float32)."""
    overrides = ["grid.norm=[gn:g8]", "grid.train.batch_per_gpu=[5]", "train.crop=[96,64]"]
    overrides += ["train.optimizer=adamw", "grid.train.amp=[off,bf16]"]
    assert main(["plan", SMOKE, "--gpu", "a10g", "--json", *sets(overrides)]) == 0
    points = json.loads(capsys.readouterr().out)["points"]
    trial = specs.expand(specs.load(SMOKE, overrides))[0]
    with torch.device("meta"):
        model = model_for(trial.spec, pretrained=False).train()
    images, masks = (
        torch.empty(5, 3, 64, 96, device="meta"),
        torch.empty(5, 64, 96, dtype=torch.long, device="meta"),
    )
    weights = sum(p.numel() for p in model.parameters()) * 4 * 4  # weights, gradients, AdamW's two moments
    for point, autocast in zip(points, (None, CUDA_AUTOCAST), strict=True):
        cost = step_cost(model, images, masks, autocast=autocast)
        expected = (weights + cost.activation_bytes * FRAGMENTATION) / GIB + CONTEXT_GIB
        assert point["memory_gib"] == pytest.approx(expected, rel=1e-12) and point["batch_per_gpu"] == 5
    assert points[1]["memory_gib"] > points[0]["memory_gib"]  # GN's float32 copies outweigh bf16 elsewhere

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


def test_auto_picks_the_largest_batch_whose_estimate_fits(capsys) -> None:
    """The batch `auto` chose fits the GPU and one image more does not, each counted as a fixed batch."""
    base = ["grid.norm=[gn:g8]", "train.crop=[512,512]", "train.amp=bf16"]

    def point(batch: str) -> dict:
        assert (
            main(
                [
                    "plan",
                    SMOKE,
                    "--gpu",
                    "l4",
                    "--json",
                    *sets([*base, f"grid.train.batch_per_gpu=[{batch}]"]),
                ]
            )
            == 0
        )
        (p,) = json.loads(capsys.readouterr().out)["points"]
        return p

    auto = point("auto")
    assert auto["fits"] and auto["batch_per_gpu"] > 8
    assert point(str(auto["batch_per_gpu"])) == {
        **auto,
        "key": "norm=gn:g8,train.batch_per_gpu=" + str(auto["batch_per_gpu"]),
    }
    assert not point(str(auto["batch_per_gpu"] + 1))["fits"]


def test_largest_batch_agrees_with_the_memory_it_maximizes() -> None:
    from orchestrator.compute import StepCost, largest_batch, worker_memory

    one, two = StepCost(3 * GIB, 10, 25_000_000), StepCost(5 * GIB, 10, 25_000_000)
    for memory_gib in (0.5, 4.0, 4.4, 4.5, 22.5, 79.6):
        memory = memory_gib * GIB
        fitting = [b for b in range(1, 100) if worker_memory(one, two, b, 1) <= memory]
        assert largest_batch(one, two, memory, 1) == max(fitting, default=0)


def test_a_grid_with_points_that_do_not_fit_is_refused_point_by_point_unless_skipped() -> None:
    from orchestrator.plan import fit_trials

    overrides = ["train.crop=[256,256]", "grid.train.batch_per_gpu=[2,auto,100000]", "grid.norm=[bn,gn:g8]"]
    trials = specs.expand(specs.load(SMOKE, [*overrides, "resources.gpus_per_worker=1"]))
    with pytest.raises(specs.SpecError) as refused:
        fit_trials(trials, "a10g", [])
    first, *lines = refused.value.lines
    assert (
        first.startswith("2 of 6 grid points do not fit the memory their workers hold")
        and "--skip-unfit" in first
    )
    assert [line.split(": ", 1)[0].strip() for line in lines] == [
        "norm=bn,train.batch_per_gpu=100000",
        "norm=gn:g8,train.batch_per_gpu=100000",
    ]
    assert all(line.endswith("at batch 100000; a whole GPU of 22.5 GiB holds 22.5 GiB") for line in lines)
    assert float(lines[0].split(": ", 1)[1].split()[0]) > 22.5

    kept, skipped = fit_trials(trials, "a10g", [], skip_unfit=True)
    assert [t.key for t in kept] == [t.key for t in trials if "100000" not in t.key]
    assert skipped == lines
    with pytest.raises(specs.SpecError, match=r"^2 of 2 grid points do not fit .*\(--gpu\), \(none does\)"):
        fit_trials(
            [t for t in trials if "100000" in t.key], "a10g", [], skip_unfit=True
        )  # nothing left to run
    auto = [t for t in kept if t.key.endswith("=auto")]
    assert len(auto) == 2 and all(
        t.spec.train.batch_per_gpu == t.config["train.batch_per_gpu"] > 2 for t in auto
    )


def test_throughput_is_what_finished_trials_on_the_same_gpu_kind_measured(
    tmp_path, monkeypatch, capsys
) -> None:
    """Of the experiment's trial runs, the finished ones tagged with the kind's torch name, at the point's
    backbone, norm and crop, set its images/s per GPU: the mean of what each spent (images trained per
    GPU-second) where it logged that, else of its last images_per_s over its GPUs. Other points keep the
    assumed MFU."""
    from mlflow.tracking import MlflowClient

    from orchestrator import tracking

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("smoke")

    def trial(
        device: str, images_per_s: float, status: str = "FINISHED", crop: str = "[128, 128]", spent=None
    ) -> None:
        run = client.create_run(
            experiment, tags={tracking.KIND: "trial", tracking.DEVICE: device}
        ).info.run_id
        params = {"model.backbone": "resnet18", "norm": "bn", "train.crop": crop}
        params |= {"resources.workers_per_trial": 2, "resources.gpus_per_worker": 1}
        for key, value in params.items():
            client.log_param(run, key, value)
        client.log_metric(run, "images_per_s", images_per_s)
        if spent:
            client.log_metric(run, "gpu_seconds", spent[0])
            client.log_metric(run, "images_trained", spent[1])
        client.set_terminated(run, status)

    trial("NVIDIA L4", 40.0)
    trial("NVIDIA L4", 60.0)
    trial("NVIDIA L4", 1000.0, spent=(100.0, 1000.0))  # 10 images per GPU-second; with the two above: 20
    trial("NVIDIA A10G", 1000.0)  # another kind
    trial("NVIDIA L4", 1000.0, status="FAILED")
    trial("NVIDIA L4", 1000.0, crop="[256, 256]")  # another crop
    smoke = str(Path(__file__).resolve().parents[1] / SMOKE)
    argv = ["plan", smoke, "--gpu", "l4", "--train-images", "100", "--set", "train.steps_per_epoch=null"]
    assert main([*argv, "--json"]) == 0
    points = {p["key"]: p for p in json.loads(capsys.readouterr().out)["points"]}
    for key in ("norm=bn,train.batch_per_gpu=1", "norm=bn,train.batch_per_gpu=2"):
        assert points[key]["measured"] and points[key]["images_per_s_per_gpu"] == 20
        assert points[key]["gpu_hours"] == pytest.approx(300 / 20 / 3600)
    gn = points["norm=gn:g8,train.batch_per_gpu=1"]
    assert not gn["measured"]
    assert gn["images_per_s_per_gpu"] == pytest.approx(
        GPUS["l4"].peak_bf16 * MFU / (gn["gflops_per_image"] * 1e9)
    )
    assert main(argv) == 0
    assert (
        "measured for 2 of 4 points, 4 finished trials on NVIDIA L4 in MLflow experiment 'smoke' (1 of them "
        "from what they spent, the others from their training images/s)"
    ) in capsys.readouterr().out


def test_plan_actual_sets_what_each_trial_spent_beside_its_plan(tmp_path, monkeypatch, capsys) -> None:
    """On a real SQLite store: the sweep run's trials, by key; a point that did not run shows none."""
    from orchestrator import tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    exp = tracking.ensure_experiment("smoke", uri)
    sweep = tracking.start_sweep_run(exp, "smoke", {}, uri)
    keys = [t.key for t in specs.expand(specs.load(SMOKE))]
    for key, seconds in zip(keys[:2], (60.0, 90.0), strict=True):  # 2 workers x 1 GPU: 120 and 180 GPU-s
        run = tracking.start_trial_run(exp, sweep, key, {}, uri)
        tracking.log_attempt(run, uri, workers=2, gpus_per_worker=1, seconds=seconds)
    argv = ["plan", SMOKE, "--gpu", "l4", "--train-images", "100", "--actual", sweep]
    assert main([*argv, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    spent = [p["spent"] for p in plan["points"]]
    assert [s and s["hours"] * 3600 for s in spent] == [120.0, 180.0, None, None]
    assert spent[0] == {"hours": 120 / 3600, "on_gpu": True, "attempts": 1, "cost_usd": None}
    planned = sum(p["gpu_hours"] for p in plan["points"][:2])
    assert plan["total"]["spent_vs_plan"] == pytest.approx(300 / 3600 / planned)

    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[-6:] == ["GPU-h", "spent", "h", "x", "plan", "tries"]
    row = out[1].split()
    assert row[-3:] == ["0.03", f"{120 / 3600 / plan['points'][0]['gpu_hours']:.2f}", "1"]
    assert out[3].split()[-3:] == ["-", "-", "-"]
    assert out[7].startswith(f"2 of them ran in sweep run {sweep}: 0.08 GPU-hours spent, ")

    assert main(["plan", SMOKE, "--gpu", "l4", "--actual", keys[0]]) == 2
    assert "is no sweep run at" in capsys.readouterr().err


def test_auto_share_is_the_smallest_share_whose_budget_holds_the_worker() -> None:
    from orchestrator.plan import MAX_PER_GPU, auto_share

    # By hand, on an H200 (140.4 GiB, 90% of it for workers that share it): 1/8 of it holds 15.795 GiB,
    # 1/7 (0.1428 at Ray's resolution) 18.04, 1/2 63.18.
    assert [auto_share(m, 140.4) for m in (1.0, 15.7, 15.9, 18.0, 63.1, 63.2)] == [
        0.125, 0.125, 0.1428, 0.1428, 0.5, 1.0
    ]  # fmt: skip
    for tenths in range(5, 1500):  # whatever Ray packs on one GPU at that share overfills nothing
        memory = tenths / 10
        share = auto_share(memory, 140.4)
        if share == 1:
            assert memory > 140.4 / 2 * 0.9
            continue
        n = int(1 / share)
        assert n * share <= 1 and n * memory <= 140.4 * 0.9
        assert n == MAX_PER_GPU or memory > int(1e4 / (n + 1)) / 1e4 * 140.4 * 0.9  # and none smaller would


def test_a_fraction_of_a_gpu_and_auto_are_checked_against_the_workers_share() -> None:
    from orchestrator.plan import fit_trials

    overrides = ["resources.workers_per_trial=1", "grid.resources.gpus_per_worker=[0.05,0.125,auto]"]
    trials = specs.expand(specs.load(SMOKE, [*overrides, "grid.norm=[bn]", "grid.train.batch_per_gpu=[2]"]))
    with pytest.raises(specs.SpecError) as refused:
        fit_trials(trials, "a10g", [])
    _, line = refused.value.lines  # 0.05 x 22.5 GiB x 0.9 = 1.0125 GiB, less than a worker's estimate
    assert line.startswith("  norm=bn,train.batch_per_gpu=2,resources.gpus_per_worker=0.05: 1.")
    assert line.endswith("0.05 of a GPU of 22.5 GiB holds 1.0 GiB (its share less 10%, kept free)")
    kept, _ = fit_trials(trials, "a10g", [], skip_unfit=True)
    assert [(t.spec.resources.gpus_per_worker, t.config["resources.gpus_per_worker"]) for t in kept] == [
        (0.125, 0.125), (0.125, 0.125)  # auto: 8 on one GPU, the most it packs
    ]  # fmt: skip
    assert kept[1].key.endswith("gpus_per_worker=auto")
    # Two ranks of one trial must not share a GPU: whole GPUs for them, unless one node each.
    two = specs.expand(specs.load(SMOKE, ["resources.gpus_per_worker=auto", "grid.norm=[bn]"]))
    assert {t.spec.resources.gpus_per_worker for t in fit_trials(two, "a10g", [])[0]} == {1.0}
    spread = specs.load(SMOKE, ["resources.gpus_per_worker=auto", "resources.placement=strict_spread"])
    assert {t.spec.resources.gpus_per_worker for t in fit_trials(specs.expand(spread), "a10g", [])[0]} == {
        0.125
    }


def test_a_worker_on_the_cpu_must_fit_its_cpus_share_of_the_node_with_least_memory_per_cpu() -> None:
    from orchestrator.plan import fit_trials

    trials = specs.expand(
        specs.load(SMOKE, ["resources.cpus_per_worker=2", "grid.train.crop=[[128,128],[4096,4096]]"])
    )
    nodes = [
        {"CPU": 2, "memory": 4 * GIB},
        {"CPU": 4, "memory": 4 * GIB},  # the least per CPU: a 2-CPU worker holds half of it, less 10%
        {"CPU": 1, "memory": 0.1 * GIB},  # holds no 2-CPU worker
    ]
    with pytest.raises(specs.SpecError) as refused:
        fit_trials(trials, None, nodes)
    first, *lines = refused.value.lines
    assert first.startswith(
        f"{len(trials) // 2} of {len(trials)} grid points do not fit the memory their workers"
    )
    assert all("train.crop=4096x4096: " in line for line in lines)
    assert all(
        line.endswith("; 2 of the 4 CPUs of a node of 4.0 GiB hold 1.8 GiB (less 10%, kept free)")
        for line in lines
    )
    assert fit_trials(trials, None, [])[0] == trials  # Ray gives no memory: nothing to check against
