"""Score models on a validation loader in one pass: one confusion matrix per model, and optionally
one for their ensemble (the average of their softmax)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sized

import torch
from torch import nn

from orchestrator import metrics
from orchestrator.data.layout import NUM_CLASSES
from orchestrator.inference.predict import predict_proba

log = logging.getLogger(__name__)


def evaluate(models: list[nn.Module], loader: Iterable, *, ensemble: bool = False) -> torch.Tensor:
    """Confusion matrices [len(models) (+1 for the ensemble), C, C], rows = truth."""
    cms = torch.zeros(len(models) + ensemble, NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    total = len(loader) if isinstance(loader, Sized) else None
    every = max(1, (total or 10) // 10)
    for i, (images, masks) in enumerate(loader, 1):
        probs = [predict_proba(m, images) for m in models]
        if ensemble:
            probs.append(torch.stack(probs).mean(0))
        for j, p in enumerate(probs):
            cms[j] += metrics.confusion_matrix(p.argmax(1), masks)
        if i % every == 0 or i == total:
            log.info("evaluated %d/%s validation batches", i, total or "?")
    return cms
