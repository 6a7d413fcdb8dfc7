"""What a spec may name: backbones, heads, output strides, and the norm-string grammar.

No torch import here: the spec validator imports this module and must stay torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BACKBONES = ("resnet18", "resnet50")
HEADS = ("deeplabv3plus",)
OUTPUT_STRIDES = (8, 16)

NORM_GRAMMAR = (
    "bn, syncbn, gn:g<N> (N groups), gn:c<N> (N channels per group), in, ln, frozenbn, evalnorm, "
    "evalnorm:rule, ibn-a, ign-a:g<N>, ign-a:c<N>; any of them may end in +ws (weight standardization)"
)

# Kinds that take no argument, and kinds whose argument is a grouping (`g<N>` or `c<N>`); `evalnorm` alone
# takes an optional `:rule`.
_PLAIN_KINDS = ("bn", "syncbn", "in", "ln", "frozenbn", "ibn-a")
_GROUPED_KINDS = ("gn", "ign-a")

# Exactly the valid spec strings, as a JSON-Schema (ECMA-262) compatible regex: plain groups only, anchored.
# parse_norm reads its groups in order: plain kind, evalnorm, rule, grouped kind, unit, N, +ws.
NORM_PATTERN = (
    rf"^(?:({'|'.join(_PLAIN_KINDS)})|(evalnorm)(?::(rule))?|({'|'.join(_GROUPED_KINDS)}):([gc])([1-9][0-9]*))"
    r"(\+ws)?$"
)


@dataclass(frozen=True)
class NormSpec:
    kind: str  # one of _PLAIN_KINDS, _GROUPED_KINDS, "evalnorm"
    groups: int | None = None  # gn:g<N>, ign-a:g<N>
    channels_per_group: int | None = None  # gn:c<N>, ign-a:c<N>
    rule: bool = False  # evalnorm:rule
    ws: bool = False  # +ws: weight-standardized convs before the norms

    def __post_init__(self) -> None:
        # The canonical string must be a valid spec: one grammar decides, for parsed and hand-built specs.
        if not re.fullmatch(NORM_PATTERN, str(self)):
            raise ValueError(f"invalid norm {self!r}; allowed: {NORM_GRAMMAR}")

    def __str__(self) -> str:
        """The canonical spec string, so that `parse_norm(str(spec)) == spec`."""
        text = self.kind
        if self.groups is not None:
            text += f":g{self.groups}"
        if self.channels_per_group is not None:
            text += f":c{self.channels_per_group}"
        if self.rule:
            text += ":rule"
        return text + "+ws" if self.ws else text


def parse_norm(spec: str | NormSpec) -> NormSpec:
    """Parse a norm spec string (see NORM_GRAMMAR) into a NormSpec; a NormSpec passes through; ValueError
    otherwise."""
    if isinstance(spec, NormSpec):
        return spec
    match = re.fullmatch(NORM_PATTERN, spec) if isinstance(spec, str) else None
    if not match:
        raise ValueError(f"unknown norm {spec!r}; allowed: {NORM_GRAMMAR}")
    plain, evalnorm, rule, grouped, unit, n, ws = match.groups()
    if grouped:
        grouping = {"groups": int(n)} if unit == "g" else {"channels_per_group": int(n)}
        return NormSpec(grouped, **grouping, ws=bool(ws))
    return NormSpec(plain or evalnorm, rule=bool(rule), ws=bool(ws))
