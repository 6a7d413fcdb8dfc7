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
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from orchestrator.errors import UsageError, cut, shown
from orchestrator.storage import url_to_fs

logger = logging.getLogger(__name__)

_BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")
CONTAINERS = ("state_dict", "model", "model_state_dict", "module")  # where checkpoints keep the weights
PREFIXES = ("", "module.", "backbone.", "encoder.", "module.backbone.", "module.encoder.")
SHOWN = 5  # tensor names spelled out in an error, a warning or a run tag; the rest are counted


def load_pretrained(
    module: nn.Module, url: str, storage_options: dict | None = None, *, strict: bool = True
) -> list[str]:
    """Copy the tensors of the weights file at `url` into `module` (a backbone); returns the names of the
    module's tensors it left as initialized, in the module's order (none unless `strict` is False).

    A container and a name prefix are taken off where that makes more names match (the log says which).
    Every tensor of the module must come from the file in its shape, parameters and buffers (running
    statistics) alike, but those no file needs to give (`_not_required`); a file that would leave some as
    initialized is a UsageError naming the first few and their count. `strict=False`
    (`model.pretrained_strict: false`) loads what fits instead and warns naming the rest. A file of which
    no name matches is refused either way (the wrong file). Extra names are ignored: the classifier
    (`fc.*`), and the BN statistics of an ImageNet BN file when the model's norms keep none (GN, IN, LN):
    its conv weights and norm affine parameters carry over, its statistics are dropped, and the log says so.
    """
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        data = f.read()
    own = module.state_dict()
    state, unwrapped = _best_match(_read(url, data), own)
    matched = [k for k in own if k in state]  # the model's order: the first misfit is the first listed
    if not matched:
        raise UsageError(
            f"model.pretrained {shown(url)}: no tensor name matches the model (it has e.g. {list(own)[:3]}, "
            f"the file {list(state)[:3]}, also inside {'/'.join(CONTAINERS)} and without the prefixes "
            f"{', '.join(p for p in PREFIXES if p)}); expected weights in the backbone's key layout"
        )
    wrong_shape = {k for k in matched if state[k].shape != own[k].shape}
    missing = {k for k in own if k not in state} - _not_required(module)
    left_out = [k for k in own if k in wrong_shape | missing]
    if left_out:
        gaps = []
        if wrong_shape:
            misfits = [
                f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                for k in left_out
                if k in wrong_shape
            ]
            gaps.append(f"{len(misfits)} of other shapes, another architecture's? ({listed(misfits, '; ')})")
        if missing:
            gaps.append(
                f"{len(missing)} missing from the file ({listed([k for k in left_out if k in missing])})"
            )
        said = f"{len(left_out)} of the backbone's {len(own)} tensors as initialized: {' and '.join(gaps)}"
        if strict:
            raise UsageError(
                f"model.pretrained {shown(url)} would leave {said}; set model.pretrained_strict: false to "
                "train with them so"
            )
        logger.warning("model.pretrained %s leaves %s (model.pretrained_strict: false)", url, said)
    result = module.load_state_dict({k: v for k, v in state.items() if k not in wrong_shape}, strict=False)
    dropped_stats = [k for k in result.unexpected_keys if k.endswith(_BN_STATISTICS)]
    ignored = [k for k in result.unexpected_keys if not k.endswith(_BN_STATISTICS)]
    logger.info(
        "loaded %d of %d tensors from %s%s; dropped %d BN statistics (this model's norms keep none); "
        "ignored: %s",
        len(matched) - len(wrong_shape),
        len(own),
        url,
        f" ({unwrapped})" if unwrapped else "",
        len(dropped_stats),
        ", ".join(ignored) or "none",
    )
    return left_out


def listed(names: list[str], sep: str = ", ") -> str:
    """The first SHOWN of `names` and how many more: how errors, warnings and run tags name tensors."""
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return sep.join(names[:SHOWN]) + more


def _not_required(module: nn.Module) -> set[str]:
    """Names of `module`'s state that a pretrained file need not give: BN's `num_batches_tracked`, a step
    counter rather than a weight, which files saved before torch 0.4.1 lack (torch then keeps the layer's
    own), and what a layer starts afresh by design, its `NOT_PRETRAINED` (EvalNorm's alpha and beta)."""
    return {
        f"{name}.{key}" if name else key
        for name, layer in module.named_modules()
        for key in ("num_batches_tracked", *getattr(layer, "NOT_PRETRAINED", ()))
    }


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
    except Exception as e:  # "not a zip", "invalid load key", "unsupported global", a bad magic number, ...
        lines = str(e).splitlines() or [""]
        why = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
        raise UsageError(
            f"model.pretrained {url} is neither a safetensors file nor one torch.load reads safely "
            f"(weights_only=True): {type(e).__name__}: {cut(why)}; save the model's state_dict alone, or as "
            "safetensors"
        ) from None
    if not isinstance(state, Mapping):
        raise UsageError(
            f"model.pretrained {url} holds a {type(state).__name__}, not a state_dict (a mapping: name -> "
            "tensor)"
        )
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
