"""Load a torchvision-layout state_dict from any fsspec URI (plain path, file://, s3://, memory://)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import fsspec
import torch
from torch import nn

logger = logging.getLogger(__name__)


def load_pretrained(module: nn.Module, url: str, storage_options: dict | None = None) -> None:
    """Copy the tensors of the state_dict at `url` whose names match `module`'s into it.

    Names the file lacks stay as initialized and extra names are ignored (a GN model has no running stats;
    torchvision files carry `fc.*`); both are logged. Raises ValueError if no name matches (the wrong file)
    or a matching name has another shape (another architecture).
    """
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{url} holds a {type(state).__name__}, not a state_dict (a mapping name -> tensor)")
    own = module.state_dict()
    matched = sorted(own.keys() & state.keys())
    if not matched:
        raise ValueError(
            f"no tensor name in {url} matches the model (it has e.g. {list(own)[:3]}, the file "
            f"{list(state)[:3]}); expected a state_dict in torchvision's key layout"
        )
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        for k in matched
        if state[k].shape != own[k].shape
    ]
    if wrong_shape:
        raise ValueError(
            f"{len(wrong_shape)} tensors in {url} do not fit the model's shapes (weights of another "
            f"architecture?): {'; '.join(wrong_shape[:5])}"
        )
    result = module.load_state_dict(state, strict=False)
    logger.info(
        "loaded %d of %d tensors from %s; missing (left as initialized): %s; unexpected (ignored): %s",
        len(matched),
        len(own),
        url,
        ", ".join(result.missing_keys) or "none",
        ", ".join(result.unexpected_keys) or "none",
    )
