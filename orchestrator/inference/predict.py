"""Prediction modes. Whole-image for now: the model sees the full frame, as in validation."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities [B, C, H, W] for a normalized image batch."""
    return model(images).softmax(dim=1)
