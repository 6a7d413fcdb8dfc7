"""The CUDA paths, each against its CPU twin or an independent reference: nccl and torch's SyncBatchNorm
under DDP, CUDA autocast with a gradient scaler, augmentation on a GPU batch, channels_last through every
norm family, and a CUDA out-of-memory error told apart from a bug. Torch-level rooms only (no Ray, MLflow
or pydantic): the GPU machine has none of them."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from orchestrator.data.transforms import IMAGENET, _augment, augment, draw_aug
from orchestrator.models.build import build_model
from orchestrator.models.catalog import norm_examples
from orchestrator.models.norms import IBN, FrozenBatchNorm2d, make_norm
from orchestrator.train.distributed import distribute, unwrap
from orchestrator.train.step import AMP_DTYPES, accumulate_gradients, out_of_memory

pytestmark = pytest.mark.cuda

NORM_FAMILIES = [*norm_examples(), "gn:g32+ws"]  # every row of the catalog, and WS on one


def _whole_batch() -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0)) * 3 + 1


def _syncbn_worker(rank: int, world: int, device_type: str, store: str, out: str) -> None:
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = distribute(nn.Sequential(make_norm("syncbn", 3)), device)
        share = _whole_batch().chunk(world)[rank].to(device)
        model(share).sum().backward()
        bn = unwrap(model)[0]
        torch.save({"mean": bn.running_mean.cpu(), "var": bn.running_var.cpu()}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_syncbn_under_ddp_is_batch_norm_of_the_whole_batch(device: torch.device, tmp_path: Path) -> None:
    """One process per GPU (2 where there are 2, else 1): nccl, torch's SyncBatchNorm inside DDP."""
    world = min(2, torch.cuda.device_count()) if device.type == "cuda" else 2
    args = (world, device.type, str(tmp_path / "store"), str(tmp_path))
    mp.spawn(_syncbn_worker, args=args, nprocs=world)
    expected = nn.BatchNorm2d(3)
    expected(_whole_batch())
    for rank in range(world):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["mean"], expected.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["var"], expected.running_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_steps_run_in_their_dtype_and_stay_finite(device: torch.device, amp: str) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", norm="bn").to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    dtypes = set()
    model.backbone.layer1[0].conv1.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        images = torch.randn(2, 3, 64, 64, generator=g)
        masks = torch.randint(0, 3, (2, 64, 64), generator=g)
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, [(images, masks)], device, amp, scaler=scaler)
        assert torch.isfinite(loss)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    assert dtypes == {AMP_DTYPES[amp]}
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())
    assert model.backbone.bn1.running_mean.dtype == torch.float32


def test_augmentation_on_the_device_equals_the_cpu_float_path(device: torch.device) -> None:
    """CUDA resizes floats (its antialiased kernel takes no uint8); the CPU's float path is the same math."""
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 90, 160), dtype=np.uint8))
    mask = torch.from_numpy(rng.integers(0, 3, (90, 160), dtype=np.uint8))
    for _ in range(8):
        aug = draw_aug(rng, (90, 160), (64, 48))
        x, y = augment(image.to(device), mask.to(device), aug, (64, 48), IMAGENET)
        x_cpu, y_cpu = _augment(image, mask, aug, (64, 48), IMAGENET, uint8_resize=False)
        assert torch.equal(y.cpu(), y_cpu), aug
        assert (x.cpu().int() - x_cpu.int()).abs().max() <= 1, aug


@pytest.mark.parametrize("norm", NORM_FAMILIES)
def test_channels_last_gives_the_same_logits_and_every_norm_keeps_it(device: torch.device, norm: str) -> None:
    """GroupNorm has returned channels-first for a channels_last input on CUDA in some torch versions;
    the norms give the layout back (models.norms.keep_layout), which this checks for every norm layer."""
    torch.manual_seed(0)
    model = build_model("resnet18", norm=norm).to(device).train()
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64, device=device)
    lost = []

    def check(name: str):
        def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            if not out.is_contiguous(memory_format=torch.channels_last):
                lost.append(name)

        return hook

    for name, module in channels_last.named_modules():
        if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d, IBN)):
            module.register_forward_hook(check(name))
    expected = model(images)
    got = channels_last(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-3, atol=1e-3)
    assert not lost, f"channels-first output from {lost[:5]} ({len(lost)} layers)"


def test_out_of_memory_on_the_gpu_is_told_apart_from_a_bug(device: torch.device) -> None:
    """The loop fails such a trial alone, without retries; the classification is what CUDA changes."""
    if device.type != "cuda":
        pytest.skip("the CPU's out-of-memory error is tested with a real trial (test_trial_faults)")
    free, _ = torch.cuda.mem_get_info(device)
    with pytest.raises(torch.OutOfMemoryError) as error:
        torch.empty(free * 4, dtype=torch.uint8, device=device)
    assert out_of_memory(error.value)
    assert not out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    torch.cuda.empty_cache()
    torch.ones(1, device=device).sum().item()  # the device still works
