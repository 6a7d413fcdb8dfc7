"""Load a backbone's pretrained weights from any fsspec URI (plain path, file://, s3://, memory://).

The tensors are in the backbone's own key layout: torchvision's for ResNets, timm's for ResNet-D and
Xception-65, fyu/drn's for DRN, mapillary's for WiderResNet38 (our modules use those names). Files come as
people have them: a torch `.pth` / `.pt` (a state_dict, or a training checkpoint that holds one under
`state_dict`, `model`, `model_state_dict` or `module`, its names maybe prefixed `module.` by DDP or
`backbone.` / `encoder.` by a segmentation model), or `.safetensors` (what the Hugging Face hub serves for
timm), recognized by content whatever the file's name.
"""

from __future__ import annotations

import argparse
import io
import logging
import pickle
from collections.abc import Iterator, Mapping

import fsspec
import torch
from torch import nn

logger = logging.getLogger(__name__)

_BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
CONTAINERS = ("state_dict", "model", "model_state_dict", "module")  # where checkpoints keep the weights
PREFIXES = ("", "module.", "backbone.", "encoder.", "module.backbone.", "module.encoder.")


def load_pretrained(module: nn.Module, url: str, storage_options: dict | None = None) -> None:
    """Copy the tensors of the weights file at `url` whose names match `module`'s into it.

    A container and a name prefix are taken off where that makes more names match (the log says which).
    Raises ValueError if no name matches (the wrong file) or a matching name has another shape (another
    architecture), naming the first such tensor in the model's order. Extra names are ignored: the
    classifier (`fc.*`), and the BN statistics of an ImageNet BN file when the model's norms keep none
    (GN, IN, LN): its conv weights and norm affine parameters carry over, its statistics are dropped,
    and the log says so. Parameters the file lacks stay as initialized, with a warning.
    """
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        data = f.read()
    own = module.state_dict()
    state, unwrapped = _best_match(_read(url, data), own)
    matched = [k for k in own if k in state]  # the model's order: the first misfit is the first listed
    if not matched:
        raise ValueError(
            f"no tensor name in {url} matches the model (it has e.g. {list(own)[:3]}, the file "
            f"{list(state)[:3]}, also inside {'/'.join(CONTAINERS)} and without the prefixes "
            f"{', '.join(p for p in PREFIXES if p)}); expected weights in the backbone's key layout"
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
        "loaded %d of %d tensors from %s%s; dropped %d BN statistics (this model's norms keep none); "
        "ignored: %s",
        len(matched),
        len(own),
        url,
        f" ({unwrapped})" if unwrapped else "",
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


def _read(url: str, data: bytes) -> Mapping:
    """The file's content: a safetensors file (by its header) or what torch.load gives with weights_only."""
    if _is_safetensors(data):
        from safetensors.torch import load

        return load(data)
    try:
        # Training scripts (timm's among them) save their argparse arguments beside the weights: a plain
        # namespace of values, safe to rebuild.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        lines = str(e).splitlines() or [type(e).__name__]
        why = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
        raise ValueError(
            f"{url} is neither a safetensors file nor one torch.load reads safely (weights_only=True): "
            f"{why}; save the model's state_dict alone, or as safetensors"
        ) from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{url} holds a {type(state).__name__}, not a state_dict (a mapping name -> tensor)")
    return state


def _is_safetensors(data: bytes) -> bool:
    """The safetensors layout: an 8-byte little-endian header length, then that many bytes of JSON."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    return 2 <= size <= len(data) - 8 and data[8:9] == b"{"


def _best_match(state: Mapping, own: Mapping) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors, out of their container and prefix, whose names match `own` most; ties go to the least
    unwrapped. With a description of what was taken off ("" when nothing was)."""
    best, best_count, how = {}, -1, ""
    for path, inner in _containers(state):
        tensors = {k: v for k, v in inner.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        for prefix in PREFIXES:
            named = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            count = sum(k in own for k in named)
            if count > best_count:
                steps = []
                if path:
                    steps.append(f"took the weights out of {'/'.join(path)!r}")
                if prefix:
                    steps.append(f"stripped the prefix {prefix!r}")
                best, best_count, how = named, count, ", ".join(steps)
    return best, how


def _containers(state: Mapping, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Mapping]]:
    """The mapping itself, then the mappings its CONTAINERS keys hold, depth first."""
    yield path, state
    for key in CONTAINERS:
        inner = state.get(key)
        if isinstance(inner, Mapping):
            yield from _containers(inner, (*path, key))
