"""Training recipes in the loop itself: mixed precision, seeded runs that are bit-identical, and progressive
scaling through a real Ray Train trial."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow.tracking import MlflowClient

from orchestrator import spec as specs
from orchestrator.checkpoints import model_for
from orchestrator.train.loop import Position, Worker, make_optimizer, train_epoch
from orchestrator.train.step import accumulate_gradients, mixup


def worker(shards: Path, **train) -> Worker:
    raw = {
        "name": "recipes",
        "data": {"train": f"{shards}/train", "val": f"{shards}/val", "loader_workers": 2},
        "model": {"backbone": "resnet18"},
        "train": {"epochs": 1, "batch_per_gpu": 2, "crop": [32, 32], "lr": 0.01, **train},
    }
    return Worker(specs.validate(raw))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_without_nan_and_keeps_norm_statistics_in_fp32(
    tiny_shards: Path, amp: str
) -> None:
    w = worker(tiny_shards, amp=amp)
    model = model_for(w.spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dtypes = set()  # of a convolution's output inside the loop's forward: the claim that it runs in amp
    model.backbone.layer1[0].conv1.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    report = train_epoch(w, model, make_optimizer(w.spec.train, model), Position())
    assert dtypes == {{"bf16": torch.bfloat16, "fp16": torch.float16}[amp]}
    assert math.isfinite(report["train_loss"])
    state = model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in state.items())  # fp32 weights and BN statistics
    assert not torch.equal(state["backbone.bn1.running_mean"], before["backbone.bn1.running_mean"])
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_two_runs_with_one_seed_end_bit_identical_and_another_seed_does_not(tiny_shards: Path) -> None:
    def run(seed: int) -> dict[str, torch.Tensor]:
        w = worker(tiny_shards, seed=seed, epochs=2, mixup_alpha=0.4)  # its draws are seeded too
        torch.manual_seed(w.spec.train.seed)  # as train_loop_per_worker does
        model = model_for(w.spec)
        optimizer = make_optimizer(w.spec.train, model)
        for epoch in range(2):
            train_epoch(w, model, optimizer, Position(epoch=epoch))
        return model.state_dict()

    first, second, other = run(7), run(7), run(8)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.slow
def test_a_staged_run_changes_crop_batch_and_lr_at_its_stage_boundaries(
    tiny_shards: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    stages = [
        {"epochs": 1, "crop": [32, 32], "batch_per_gpu": 4, "lr": 0.04},
        {"epochs": 2, "crop": [64, 48], "batch_per_gpu": 2, "lr": 0.01},
    ]
    spec = {
        "name": "staged",
        "data": {"train": f"{tiny_shards}/train", "val": f"{tiny_shards}/val", "loader_workers": 0},
        "model": {"backbone": "resnet18"},
        # A few steps on a few scenes may predict one class: the guard must not end the run.
        "train": {"epochs": 3, "stages": stages, "diverge_single_class_epochs": 0},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1},
        "storage": str(tmp_path / "runs"),
    }
    (tmp_path / "staged.yaml").write_text(yaml.safe_dump(spec))
    env = cli_env
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", "staged.yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs(
        [client.get_experiment_by_name("staged").experiment_id], "tags.`orchestrator.kind` = 'trial'"
    )

    def history(metric: str) -> list[float]:
        return [
            m.value for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)
        ]

    assert history("batch_per_gpu") == [4, 2, 2]
    assert history("crop_width") == [32, 64, 64] and history("crop_height") == [32, 48, 48]
    # 8 samples over 2 ranks: 1 step at batch 4, then 2 per epoch at batch 2; the last LR of each epoch
    # is the stage's LR times the poly factor of the whole run's 5 steps.
    factors = [(1 - s / 5) ** 0.9 for s in (0, 2, 4)]
    assert history("lr") == pytest.approx([0.04 * factors[0], 0.01 * factors[1], 0.01 * factors[2]])
    # What plan divides by the trial's GPU-seconds: images of the schedule, all ranks, summed over epochs.
    assert history("images_trained") == [1 * 4 * 2, 1 * 4 * 2 + 2 * 2 * 2, 1 * 4 * 2 + 2 * (2 * 2 * 2)]


def test_mixup_is_cross_entropy_on_mixed_images_with_soft_labels() -> None:
    torch.manual_seed(3)
    model = torch.nn.Conv2d(3, 3, 1)
    images, masks = torch.randn(4, 3, 5, 6), torch.randint(0, 3, (4, 5, 6))
    cpu = torch.device("cpu")
    torch.manual_seed(11)
    lam, partner = mixup(4, 0.4, cpu)
    assert 0 < lam < 1 and sorted(partner.tolist()) == [0, 1, 2, 3] and partner.tolist() != [0, 1, 2, 3]
    with torch.no_grad():
        log_p = model(lam * images + (1 - lam) * images[partner]).log_softmax(1)
        soft = lam * F.one_hot(masks, 3) + (1 - lam) * F.one_hot(masks[partner], 3)
        expected = -(soft.permute(0, 3, 1, 2) * log_p).sum(1).mean()
        plain = F.cross_entropy(model(images), masks)
    torch.manual_seed(11)  # the same draw inside
    got = accumulate_gradients(model, [(images, masks)], cpu, "off", mixup_alpha=0.4)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert accumulate_gradients(model, [(images, masks)], cpu, "off").item() == pytest.approx(plain.item())


def test_the_linear_scaling_rule_scales_the_lr_by_the_gradient_batch(tiny_shards: Path) -> None:
    w = worker(tiny_shards, lr=0.01, lr_reference_batch=16, batch_per_gpu=2, accumulate=2)
    assert w.base_lr(0) == pytest.approx(0.01 * 2 * 2 / 16)
    assert Worker(w.spec, world=4).base_lr(0) == pytest.approx(0.01 * 2 * 2 * 4 / 16)
    model = model_for(w.spec)
    report = train_epoch(w, model, make_optimizer(w.spec.train, model), Position())
    # 8 samples, 4 per step: 2 steps; the last one's poly factor is (1 - 1/2)^0.9
    assert report["lr"] == pytest.approx(0.01 * 4 / 16 * 0.5**0.9)
    assert worker(tiny_shards, lr=0.01).base_lr(0) == 0.01  # unset: the LR as written
