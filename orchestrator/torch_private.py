"""Every use of PyTorch's private API, in one module, written for the torch versions in SUPPORTED and checked
against the installed one on import: a torch upgrade fails here, naming the range, not as a wrong estimate.

What is taken, and why:
- `UntypedStorage._cdata`: a storage's identity. Meta tensors have no data pointer, and compute.step_cost
  counts each storage autograd keeps once, however many views of it are saved.
- `torch.utils._pytree`: the tensors in an op's nested arguments (MetaShapes, compute.Autocast).
- `TorchDispatchMode` (torch.utils._python_dispatch) and `OpOverload._schema`: `MetaShapes` remembers the
  output shapes of ops on the meta device. Some meta kernels are Python decompositions (batch norm's, in
  2.13, runs dozens of reference ops), and `orchestrator plan` runs the same layers at the same shapes
  over and over: every norm and batch of a backbone, its repeated blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from orchestrator.errors import check_version

SUPPORTED = ((2, 11), (2, 15))  # [from, to): 2.13 here, 2.11 on the GPU check's machine, 2.14 in a side venv


def check_torch_version(version: str = torch.__version__) -> None:
    """UsageError unless `version` is in SUPPORTED."""
    check_version(
        "torch",
        version,
        SUPPORTED,
        "counts memory with PyTorch's private API",
        "orchestrator/torch_private.py",
    )


check_torch_version()


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in a nest of lists, tuples and dicts (an op's arguments)."""
    return [x for x in tree_flatten(value)[0] if isinstance(x, torch.Tensor)]


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """`value` with each tensor in its nest of lists, tuples and dicts replaced by fn(tensor)."""
    return tree_map(lambda x: fn(x) if isinstance(x, torch.Tensor) else x, value)


def storage_id(t: torch.Tensor) -> int:
    """The identity of the storage under `t`, shared by all its views, on any device (meta included)."""
    return t.untyped_storage()._cdata


class MetaShapes(TorchDispatchMode):
    """While active, an op on meta tensors whose inputs and arguments match an earlier call returns new
    tensors of that call's output shapes without running its meta kernel again.

    Only what a meta kernel can decide is remembered: ops that neither write to nor return a view of an
    input, whose outputs are fresh storages exactly as large as their shape and strides need (so the bytes
    autograd keeps are those of the kernel's own outputs). Everything else runs as it would without the mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self._outputs: dict[tuple, tuple[Any, list] | None] = {}  # None: this call cannot be replayed
        self.ran = self.replayed = 0  # meta kernels run and calls replayed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _pure(func):
            return func(*args, **kwargs)
        try:
            key = (func, _key(args), _key(kwargs))
            known = self._outputs.get(key, False)
        except (_NotMeta, TypeError):  # TypeError: an unhashable argument
            return func(*args, **kwargs)
        if known is False:
            out = func(*args, **kwargs)
            inputs = {storage_id(x) for x in tensors_in((args, kwargs))}
            self._outputs[key] = _replayable(out, inputs)
            self.ran += 1
            return out
        if known is None:
            return func(*args, **kwargs)
        self.replayed += 1
        tree, described = known
        return tree_unflatten([_fresh(x) for x in described], tree)


def _pure(func) -> bool:
    schema = getattr(func, "_schema", None)
    return schema is not None and not any(
        a.alias_info is not None for a in (*schema.arguments, *schema.returns)
    )


class _NotMeta(Exception):
    pass


def _key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        if x.device.type != "meta":
            raise _NotMeta
        return _describe(x)
    if isinstance(x, (list, tuple)):
        return type(x), tuple(_key(v) for v in x)
    if isinstance(x, dict):
        return tuple((k, _key(v)) for k, v in x.items())
    return x


def _describe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.stride(), x.dtype, x.storage_offset())
    return x


def _fresh(x: Any) -> Any:
    if isinstance(x, tuple) and x and x[0] == "tensor":
        return torch.empty_strided(x[1], x[2], dtype=x[3], device="meta")
    return x


def _replayable(out: Any, inputs: set[int]) -> tuple[Any, list] | None:
    """The tree of `out` and a description of its leaves, None when a replay would differ: an input's storage
    (a view its schema does not declare, as _unsafe_view), a storage shared by two outputs, an offset into
    one, or more bytes than the shape and strides need."""
    leaves, tree = tree_flatten(out)
    tensors = tensors_in(leaves)
    storages = {storage_id(t) for t in tensors}
    if len(storages) < len(tensors) or storages & inputs:
        return None
    for t in tensors:
        if (
            t.storage_offset()
            or _fresh(_describe(t)).untyped_storage().nbytes() != t.untyped_storage().nbytes()
        ):
            return None
    return tree, [_describe(x) for x in leaves]
