"""One optimizer step's forward and backward: mixed precision, micro-batch accumulation, mixup. Torch
only (no Ray, MLflow or pydantic), so the GPU check runs it on a bare CUDA machine."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from orchestrator.data.layout import IGNORE_INDEX
from orchestrator.models.evalnorm import evalnorm_aux_loss
from orchestrator.train.distributed import unwrap
from orchestrator.train.losses import Loss, make_loss

CROSS_ENTROPY = make_loss("ce")


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """Mixed precision for the forward pass: convolutions in bf16/fp16, losses and norm statistics in fp32
    (norm buffers stay fp32, the loss upcasts the logits)."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp in AMP_DTYPES)


def accumulate_gradients(
    model: nn.Module,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp: str,
    loss: Loss = CROSS_ENTROPY,
    scaler: torch.amp.GradScaler | None = None,
    mixup_alpha: float = 0.0,
) -> torch.Tensor:
    """Forward and backward each micro-batch, adding up the gradients of one step over their union.

    Each micro-batch is normalized on its own (the small normalization batch of the papers) while
    the gradient is that of the whole: a pixel-wise loss is divided by the valid pixels of all
    micro-batches together, exact even when crops are padded with the ignore label (batch-wise terms,
    OHEM and Dice, take the mean over micro-batches). DDP all-reduces the gradients once, on the last
    micro-batch. Returns the step's loss."""
    valid = sum(int((masks != IGNORE_INDEX).sum()) for _, masks in micro_batches)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, (images, masks) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()
        with sync:
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            lam, partner = mixup(len(images), mixup_alpha, device)
            if lam < 1:
                images = lam * images + (1 - lam) * images[partner]
            with autocast(device, amp):
                logits = model(images)
            share = {"valid_pixels": valid, "micro_batches": len(micro_batches)}
            objective = loss(logits, masks, **share)
            if lam < 1:  # the soft label lam * y + (1 - lam) * y[partner], by linearity of the loss in it
                objective = lam * objective + (1 - lam) * loss(logits, masks[partner], **share)
            total += objective.detach()
            aux = evalnorm_aux_loss(unwrap(model))  # reaches only EvalNorm's alpha/beta (stop-gradients)
            if aux is not None:
                objective = objective + aux / len(micro_batches)
            (scaler.scale(objective) if scaler else objective).backward()
    return total


def mixup(batch: int, alpha: float, device: torch.device) -> tuple[float, torch.Tensor]:
    """Mixup's draw for one micro-batch: lam ~ Beta(alpha, alpha) and each image's partner (a random
    permutation of the micro-batch); lam = 1 (no mixing) when alpha is 0. Drawn from torch's seeded RNG."""
    if alpha <= 0:
        return 1.0, torch.arange(batch, device=device)
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    return lam, torch.randperm(batch).to(device)


def out_of_memory(error: BaseException) -> bool:
    """CUDA's allocator raises torch.OutOfMemoryError; the CPU's a RuntimeError that says so (also when a
    DataLoader worker re-raises it)."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(error)
