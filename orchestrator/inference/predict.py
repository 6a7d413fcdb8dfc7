"""Prediction modes on a normalized image batch, as mmseg's `whole` / `slide` inference and its test-time
augmentation:

- whole: the model sees the full frame, as in validation;
- slide: crop-sized windows every stride, the last one flush with the border; logits are averaged
  where windows overlap (mmseg's slide_inference; the report's Sec. VI "stacking"), so the model sees
  inputs of its training crop size;
- multiscale: the image resized by each scale (bilinear with antialiasing, as training's random scale),
  predicted whole or, with a crop, by sliding windows; probabilities resized back bilinearly and averaged.

`flip` adds the horizontally flipped view of every scale, flipped back, to the average. `amp` "bf16" runs
the models under bfloat16 autocast (on the images' device); probabilities are averaged in float32 either
way. Models return logits at their input's size (models/build.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.errors import UsageError

Mode = Literal["whole", "slide", "multiscale"]
Amp = Literal["off", "bf16"]


@dataclass(frozen=True)
class InferenceSettings:
    """How models predict a batch: validated once here, logged flat by `as_params`."""

    mode: Mode = "whole"
    crop: tuple[int, int] | None = None  # (width, height) of a window: slide, or multiscale by windows
    stride: tuple[int, int] | None = None  # (x, y) between windows; with crop
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    amp: Amp = "off"

    def __post_init__(self) -> None:
        # Lists (argparse, YAML) become tuples, so settings compare and hash as the values they hold.
        for name in ("crop", "stride"):
            value = getattr(self, name)
            if value is not None:
                if len(value) != 2:
                    raise UsageError(f"{name} {value}: want two integers, (width, height) or (x, y)")
                object.__setattr__(self, name, (int(value[0]), int(value[1])))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if self.mode not in get_args(Mode):
            raise UsageError(f"inference mode {self.mode!r}: allowed are {', '.join(get_args(Mode))}")
        if self.amp not in get_args(Amp):
            raise UsageError(f"amp {self.amp!r}: allowed are {', '.join(get_args(Amp))}")
        if (self.crop is None) != (self.stride is None):
            raise UsageError(
                f"crop {self.crop} and stride {self.stride}: give both (sliding windows) or neither"
            )
        if self.mode == "slide" and self.crop is None:
            raise UsageError("inference mode 'slide' needs a crop (width, height) and a stride (x, y)")
        if self.mode == "whole" and self.crop is not None:
            raise UsageError(f"inference mode 'whole' takes no crop (got {self.crop}); use mode 'slide'")
        if self.mode != "multiscale" and self.scales != (1.0,):
            raise UsageError(f"scales {self.scales} need inference mode 'multiscale' (mode is {self.mode!r})")
        if not self.scales or min(self.scales) <= 0:
            raise UsageError(f"scales must be positive numbers, got {self.scales}")
        if self.crop is not None and not all(0 < s <= c for s, c in zip(self.stride, self.crop, strict=True)):
            # A stride beyond the crop would leave unpredicted gaps between windows.
            raise UsageError(f"stride {self.stride} must be positive and at most the crop {self.crop}")

    def as_params(self) -> dict[str, str]:
        """Flat MLflow params, e.g. {"inference.mode": "slide", "inference.crop": "513x513", ...}."""

        def pair(v: tuple[int, int] | None) -> str:
            return "none" if v is None else f"{v[0]}x{v[1]}"

        return {
            "inference.mode": self.mode,
            "inference.crop": pair(self.crop),
            "inference.stride": pair(self.stride),
            "inference.scales": ",".join(f"{s:g}" for s in self.scales),
            "inference.flip": str(self.flip).lower(),
            "inference.amp": self.amp,
        }


WHOLE = InferenceSettings()


@torch.no_grad()
def predict_proba(
    model: nn.Module, images: torch.Tensor, settings: InferenceSettings = WHOLE
) -> torch.Tensor:
    """Class probabilities [B, C, H, W] for a normalized image batch [B, 3, H, W]."""
    size = images.shape[-2:]
    total, views = None, 0
    for scale in settings.scales:
        x = images
        if scale != 1.0:
            scaled = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
            x = F.interpolate(images, size=scaled, mode="bilinear", antialias=True, align_corners=False)
        for flip in (False, True) if settings.flip else (False,):
            with torch.autocast(images.device.type, torch.bfloat16, enabled=settings.amp == "bf16"):
                logits = _logits(model, x.flip(-1) if flip else x, settings)
            probs = logits.float().softmax(dim=1)
            probs = probs.flip(-1) if flip else probs
            if probs.shape[-2:] != size:
                probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
            total = probs if total is None else total.add_(probs)
            views += 1
    return total / views


def windows(
    size: tuple[int, int], crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[slice, slice]]:
    """(rows, columns) of the sliding windows over an image of size (height, width), row by row: every
    window is crop=(width, height) (clipped to the image where it is smaller), origins every
    stride=(x, y), the last window of a row or column flush with the border."""
    (height, width), (crop_w, crop_h), (stride_x, stride_y) = size, crop, stride
    return [
        (slice(y, min(y + crop_h, height)), slice(x, min(x + crop_w, width)))
        for y in _origins(height, crop_h, stride_y)
        for x in _origins(width, crop_w, stride_x)
    ]


def _origins(length: int, crop: int, stride: int) -> list[int]:
    last = max(length - crop, 0)
    return [min(i * stride, last) for i in range(math.ceil(last / stride) + 1)]


def _logits(model: nn.Module, x: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    if settings.crop is None:
        return model(x)
    total = count = None
    for rows, cols in windows(tuple(x.shape[-2:]), settings.crop, settings.stride):
        logits = model(x[..., rows, cols])
        if total is None:
            total = logits.new_zeros(*logits.shape[:2], *x.shape[-2:])
            count = logits.new_zeros(x.shape[-2:])
        total[..., rows, cols] += logits
        count[rows, cols] += 1
    return total / count
