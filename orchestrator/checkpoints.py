"""The checkpoint contract, shared by training and inference: model weights plus the flat trial config that
rebuilds the model (`model_for`: spec -> model) and the input normalization it was trained with, so a
checkpoint alone is enough for evaluation and ensembles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.data.transforms import IMAGENET, MeanStd
from orchestrator.errors import UsageError, cut
from orchestrator.models.build import build_model
from orchestrator.spec import Spec, from_flat

FILE = "model.pt"  # what the training loop writes in each Ray Train checkpoint folder


def model_for(spec: Spec, *, pretrained: bool = True) -> nn.Module:
    """The model a spec describes; `pretrained=False` when weights come from a checkpoint next."""
    return build_model(
        spec.model.backbone,
        spec.model.head,
        norm=spec.norm,
        output_stride=spec.model.output_stride,
        pretrained=spec.model.pretrained_uri if pretrained else None,
        pretrained_strict=spec.model.pretrained_strict,
        multi_grid=spec.model.multi_grid,
        storage_options=spec.data.storage_options,
    )


def save(path: str | Path, model: nn.Module, config: dict[str, Any], mean_std: MeanStd, **extra: Any) -> Path:
    """Write weights (of the unwrapped model), the trial config, the input normalization it was trained
    with and any extra state."""
    torch.save(contents(model, config, mean_std, **extra), path)
    return Path(path)


def contents(model: nn.Module, config: dict[str, Any], mean_std: MeanStd, **extra: Any) -> dict[str, Any]:
    """What `save` writes; its tensors are the model's and the extra state's own, not copies."""
    mean, std = mean_std
    return {"model": model.state_dict(), "config": config, "mean_std": [list(mean), list(std)], **extra}


def host_copy(state: Any) -> Any:
    """`state` with every tensor copied to host memory: what training may change while it is written."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: host_copy(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(host_copy(v) for v in state)
    return state


def load(path: str | Path) -> dict[str, Any]:
    """What `save` wrote; UsageError for a file that is something else (weights alone, not torch's, a
    pickle of other objects, which weights_only never runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torch says "not a zip", "invalid load key", "unsupported global", ...
        cause = f"{type(e).__name__}: {str(e).strip().partition(chr(10))[0]}"
        raise UsageError(f"{path}: not a checkpoint of this tool ({cut(cause, 160)})") from None
    if not (isinstance(state, dict) and {"model", "config"} <= state.keys()):
        keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise UsageError(
            f"{path}: not a checkpoint of this tool: it holds {cut(str(keys), 160)}, not the model and the "
            "trial config a trial saves (weights alone go to model.pretrained)"
        )
    return state


@dataclass
class Trained:
    """A checkpoint's model (in eval mode), its trial config and the mean/std its inputs need."""

    model: nn.Module
    config: dict[str, Any]
    mean_std: MeanStd


def load_model(path: str | Path) -> Trained:
    """Rebuild the model of a checkpoint and load its weights."""
    return model_from_state(load(path))


def model_from_state(state: dict[str, Any]) -> Trained:
    """The model of an already loaded checkpoint."""
    model = model_for(from_flat(state["config"]), pretrained=False)
    model.load_state_dict(state["model"])
    # Checkpoints from before inputs were normalized by the dataset's statistics used ImageNet's.
    mean, std = state.get("mean_std", IMAGENET)
    return Trained(model.eval(), state["config"], (tuple(mean), tuple(std)))
