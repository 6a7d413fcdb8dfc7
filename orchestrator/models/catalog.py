"""What a spec may name: backbones, heads, output strides, and the norm-string grammar.

No torch import here: the spec validator imports this module and must stay torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BACKBONES = ("resnet18", "resnet50")
HEADS = ("deeplabv3plus",)
OUTPUT_STRIDES = (8, 16)

NORM_GRAMMAR = "bn, syncbn, gn:g<N> (N groups), gn:c<N> (N channels per group)"

# Kinds that take no argument, and kinds whose argument is a grouping (`g<N>` or `c<N>`). Later kinds slot
# into one of these (`in`, `frozenbn`, `evalnorm` / `ign-a:c16`); a `+ws` suffix would be split off first.
_PLAIN_KINDS = ("bn", "syncbn")
_GROUPED_KINDS = ("gn",)
_GROUPING = re.compile(r"(?P<unit>[gc])(?P<n>[1-9][0-9]*)")


@dataclass(frozen=True)
class NormSpec:
    kind: str  # "bn" | "syncbn" | "gn"
    groups: int | None = None  # gn:g<N>
    channels_per_group: int | None = None  # gn:c<N>

    def __post_init__(self) -> None:
        grouped = self.kind in _GROUPED_KINDS
        n_given = (self.groups is not None) + (self.channels_per_group is not None)
        if (self.kind not in _PLAIN_KINDS and not grouped) or n_given != int(grouped):
            raise ValueError(f"invalid norm {self!r}; allowed: {NORM_GRAMMAR}")
        if any(n is not None and n < 1 for n in (self.groups, self.channels_per_group)):
            raise ValueError(f"invalid norm {self!r}: the group argument must be a positive int")

    def __str__(self) -> str:
        """The canonical spec string, so that `parse_norm(str(spec)) == spec`."""
        if self.groups is not None:
            return f"{self.kind}:g{self.groups}"
        if self.channels_per_group is not None:
            return f"{self.kind}:c{self.channels_per_group}"
        return self.kind


def parse_norm(spec: str) -> NormSpec:
    """Parse a norm spec string (`bn`, `syncbn`, `gn:g32`, `gn:c16`) into a NormSpec; ValueError otherwise."""
    if isinstance(spec, str):
        kind, sep, arg = spec.partition(":")
        if kind in _PLAIN_KINDS and not sep:
            return NormSpec(kind)
        match = _GROUPING.fullmatch(arg)
        if kind in _GROUPED_KINDS and match:
            n = int(match["n"])
            return NormSpec(kind, groups=n) if match["unit"] == "g" else NormSpec(kind, channels_per_group=n)
    raise ValueError(f"unknown norm {spec!r}; allowed: {NORM_GRAMMAR}")
