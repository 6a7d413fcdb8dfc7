"""Load a backbone's pretrained state_dict from any fsspec URI (plain path, file://, s3://, memory://).

The file is in the backbone's own key layout: torchvision's for ResNets, timm's for ResNet-D and
Xception-65, fyu/drn's for DRN, mapillary's for WiderResNet38 (our modules use those names).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import fsspec
import torch
from torch import nn

logger = logging.getLogger(__name__)

_BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def load_pretrained(module: nn.Module, url: str, storage_options: dict | None = None) -> None:
    """Copy the tensors of the state_dict at `url` whose names match `module`'s into it.

    Raises ValueError if no name matches (the wrong file) or a matching name has another shape (another
    architecture), naming the first such tensor in the model's order. Extra names are ignored: the
    classifier (`fc.*`), and the BN statistics of an ImageNet BN file when the model's norms keep none
    (GN, IN, LN): its conv weights and norm affine parameters carry over, its statistics are dropped,
    and the log says so. Parameters the file lacks stay as initialized, with a warning.
    """
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{url} holds a {type(state).__name__}, not a state_dict (a mapping name -> tensor)")
    own = module.state_dict()
    matched = [k for k in own if k in state]  # the model's order: the first misfit is the first listed
    if not matched:
        raise ValueError(
            f"no tensor name in {url} matches the model (it has e.g. {list(own)[:3]}, the file "
            f"{list(state)[:3]}); expected a state_dict in the backbone's key layout (torchvision/timm)"
        )
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        for k in matched
        if state[k].shape != own[k].shape
    ]
    if wrong_shape:
        raise ValueError(
            f"{len(wrong_shape)} tensors in {url} do not fit the model's shapes (weights of another "
            f"architecture?), first {'; '.join(wrong_shape[:5])}"
        )
    result = module.load_state_dict(state, strict=False)
    dropped_stats = [k for k in result.unexpected_keys if k.endswith(_BN_STATISTICS)]
    ignored = [k for k in result.unexpected_keys if not k.endswith(_BN_STATISTICS)]
    params = {name for name, _ in module.named_parameters()}
    missing_params = [k for k in result.missing_keys if k in params]
    logger.info(
        "loaded %d of %d tensors from %s; dropped %d BN statistics (this model's norms keep none); "
        "ignored: %s",
        len(matched),
        len(own),
        url,
        len(dropped_stats),
        ", ".join(ignored) or "none",
    )
    if missing_params:
        logger.warning(
            "%s lacks %d of the model's parameters; they stay as initialized: %s%s",
            url,
            len(missing_params),
            ", ".join(missing_params[:10]),
            " ..." if len(missing_params) > 10 else "",
        )
