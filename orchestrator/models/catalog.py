"""What a spec may name: backbones, heads, output strides, and the norm-string grammar.

No torch import here: the spec validator imports this module and must stay torch-free.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# `build.BACKBONE_BUILDERS` / `build.WHOLE_MODELS` / `build.HEAD_BUILDERS` hold the code for each name (a
# test checks they agree). `resnet50d` / `resnet101d`: ResNet-D (deep stem, average-pool shortcuts), as timm.
RESNETS = ("resnet18", "resnet50", "resnet101", "resnet152", "resnet50d", "resnet101d")
BACKBONES = (*RESNETS, "xception65", "drn_d_22", "drn_d_105", "wider_resnet38", "enet")
HEADS = ("deeplabv3plus", "deeplabv3", "fcn", "enet")
OUTPUT_STRIDES = (8, 16)

# Heads that are part of one backbone's architecture (ENet's decoder), head -> that backbone: valid only
# together, both ways. Every other head fits every other backbone.
OWN_HEADS: dict[str, str] = {"enet": "enet"}

# Output strides a backbone supports, its default first (when the spec leaves model.output_stride unset).
# DRN is dilated to stride 8 by design; ENet's encoder is fixed at 8.
_OUTPUT_STRIDES = {"drn_d_22": (8,), "drn_d_105": (8,), "enet": (8,)}

# Where IBN-a's instance-norm half goes is defined by ResNet blocks (IBN-Net-a: the first norm of each block
# in stages 1-3); DRN is built from the same blocks. Other backbones have no such placement.
IBN_BACKBONES = (*RESNETS, "drn_d_22", "drn_d_105")

# Blocks in a ResNet's last stage: multi-grid gives one unit rate to each.
LAST_STAGE_BLOCKS = {
    "resnet18": 2,
    "resnet50": 3,
    "resnet101": 3,
    "resnet152": 3,
    "resnet50d": 3,
    "resnet101d": 3,
}


def check_output_stride(output_stride: int) -> None:
    """ValueError unless `output_stride` is one the dilated backbones and heads are built for."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(
            f"unknown output_stride {output_stride!r}; allowed: {', '.join(map(str, OUTPUT_STRIDES))}"
        )


def output_strides(backbone: str) -> tuple[int, ...]:
    return _OUTPUT_STRIDES.get(backbone, (16, 8))


def default_head(backbone: str) -> str:
    return next((h for h, b in OWN_HEADS.items() if b == backbone), "deeplabv3plus")


def check_pairing(backbone: str, head: str) -> None:
    """ValueError unless `head` fits `backbone` (see OWN_HEADS); both names are assumed known."""
    if head in OWN_HEADS and OWN_HEADS[head] != backbone:
        raise ValueError(
            f"head {head!r} belongs to backbone {OWN_HEADS[head]!r}; it does not fit backbone {backbone!r}"
        )
    own = [h for h, b in OWN_HEADS.items() if b == backbone]
    if own and head not in own:
        raise ValueError(f"backbone {backbone!r} takes only its own head {own[0]!r}, not head {head!r}")


def check_model(backbone: str, head: str, output_stride: int, norm: NormSpec) -> None:
    """ValueError naming the values unless this backbone, head, output stride and norm go together."""
    check_pairing(backbone, head)
    allowed = output_strides(backbone)
    if output_stride not in allowed:
        raise ValueError(
            f"unknown output_stride {output_stride} for backbone {backbone!r}; allowed: "
            f"{', '.join(map(str, sorted(allowed)))}"
        )
    if norm.kind in ("ibn-a", "ign-a") and backbone not in IBN_BACKBONES:
        raise ValueError(
            f"norm {str(norm)!r} places instance norm in ResNet-style blocks; backbone {backbone!r} has none "
            f"(allowed: {', '.join(IBN_BACKBONES)})"
        )


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
