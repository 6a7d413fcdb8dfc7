"""Score models on a validation loader in one pass: one confusion matrix per model, and optionally
one for their ensemble (the average of their softmax)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sized

import torch

from orchestrator import metrics
from orchestrator.data.layout import NUM_CLASSES
from orchestrator.data.transforms import normalize
from orchestrator.inference.predict import predict_proba
from orchestrator.train.checkpoint import Trained

log = logging.getLogger(__name__)


def evaluate(members: list[Trained], loader: Iterable, *, ensemble: bool = False) -> torch.Tensor:
    """Confusion matrices [len(members) (+1 for the ensemble), C, C], rows = truth. The loader yields
    uint8 images (evaluation_loader); each member sees them normalized as it was trained."""
    cms = torch.zeros(len(members) + ensemble, NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    total = len(loader) if isinstance(loader, Sized) else None
    every = max(1, (total or 10) // 10)
    for i, (images, masks) in enumerate(loader, 1):
        inputs = {m.mean_std: normalize(images, m.mean_std) for m in members}  # once per distinct mean/std
        probs = [predict_proba(m.model, inputs[m.mean_std]) for m in members]
        if ensemble:
            probs.append(torch.stack(probs).mean(0))
        for j, p in enumerate(probs):
            cms[j] += metrics.confusion_matrix(p.argmax(1), masks)
        if i % every == 0 or i == total:
            log.info("evaluated %d/%s validation batches", i, total or "?")
    return cms
