"""What a spec may name: backbones (one record each), heads, output strides, and the norm-string grammar.

No torch import here: the spec validator imports this module and must stay torch-free.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from orchestrator.errors import shown

HEADS = ("deeplabv3plus", "deeplabv3", "fcn", "enet")  # build.HEAD_BUILDERS holds their code
OUTPUT_STRIDES = (8, 16)


@dataclass(frozen=True)
class Backbone:
    """One backbone: what a spec may ask of it and what the rest of the house needs to know about it.

    Its code is the function `name` of the module orchestrator.models.<module>, called with norm= and
    output_stride= (and multi_grid= where `multi_grid_blocks` is set); a backbone with its own head is a
    whole model, called with num_classes and norm=. A new backbone is that module and one record here.
    """

    name: str
    module: str
    channels: tuple[int, int] | None  # (low, out): its stride-4 and final features; None for a whole model
    parameters: int  # the published parameter count, without the ImageNet classifier
    source: str  # where `parameters` comes from
    tolerance: float = 0.0  # relative: counts published in millions are rounded
    output_strides: tuple[int, ...] = (16, 8)  # those it supports, the default first
    ibn: bool = False  # IBN-a's placement is defined (ResNet-style blocks: instance norm in stages 1-3)
    multi_grid_blocks: int | None = None  # blocks of the last stage, one multi-grid unit rate each
    own_head: str | None = None  # a head that is part of its architecture (ENet's decoder)
    layout: str = ""  # whose parameter names it uses, so that published weights load by name
    about: str = ""  # what it is, for the backbones' table (docs/spec.md); records alike share one line


_RESNET = "torchvision key layout; `model.multi_grid: [1, 2, 4]` (DeepLabv3)"
_RESNET_D = "ResNet-D (deep stem, pooled shortcuts), timm layout"
_DRN = "DRN-D without final pooling, fyu/drn layout"

BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            "resnet18",
            module="resnet",
            channels=(64, 512),
            parameters=11_689_512 - 513_000,
            source="torchvision, minus its fc",
            multi_grid_blocks=2,
            ibn=True,
            layout="torchvision",
            about=_RESNET,
        ),
        Backbone(
            "resnet50",
            module="resnet",
            channels=(256, 2048),
            parameters=25_557_032 - 2_049_000,
            source="torchvision, minus its fc",
            multi_grid_blocks=3,
            ibn=True,
            layout="torchvision",
            about=_RESNET,
        ),
        Backbone(
            "resnet101",
            module="resnet",
            channels=(256, 2048),
            parameters=44_549_160 - 2_049_000,
            source="torchvision, minus its fc",
            multi_grid_blocks=3,
            ibn=True,
            layout="torchvision",
            about=_RESNET,
        ),
        Backbone(
            "resnet152",
            module="resnet",
            channels=(256, 2048),
            parameters=60_192_808 - 2_049_000,
            source="torchvision, minus its fc",
            multi_grid_blocks=3,
            ibn=True,
            layout="torchvision",
            about=_RESNET,
        ),
        # ResNet-D (deep stem, average-pool shortcuts), as timm's resnet*d
        Backbone(
            "resnet50d",
            module="resnet",
            channels=(256, 2048),
            parameters=25_576_264 - 2_049_000,
            source="timm, minus its fc",
            multi_grid_blocks=3,
            ibn=True,
            layout="timm",
            about=_RESNET_D,
        ),
        Backbone(
            "resnet101d",
            module="resnet",
            channels=(256, 2048),
            parameters=44_568_392 - 2_049_000,
            source="timm, minus its fc",
            multi_grid_blocks=3,
            ibn=True,
            layout="timm",
            about=_RESNET_D,
        ),
        Backbone(
            "xception65",
            module="xception",
            channels=(256, 2048),
            parameters=39_920_000 - 2_049_000,
            source="timm: 39.92M with its 2048x1000 fc",
            tolerance=0.005,
            layout="timm",
            about="aligned Xception of DeepLabv3+, timm layout",
        ),
        # DRN: ResNet's blocks, dilated to output stride 8 by design
        Backbone(
            "drn_d_22",
            module="drn",
            channels=(64, 512),
            parameters=16_400_000 - 513_000,
            source="DRN paper: 16.4M with its 512x1000 fc",
            tolerance=0.01,
            output_strides=(8,),
            ibn=True,
            layout="fyu/drn",
            about=_DRN,
        ),
        Backbone(
            "drn_d_105",
            module="drn",
            channels=(256, 512),
            parameters=54_800_000 - 513_000,
            source="DRN paper: 54.8M with its 512x1000 fc",
            tolerance=0.01,
            output_strides=(8,),
            ibn=True,
            layout="fyu/drn",
            about=_DRN,
        ),
        Backbone(
            "wider_resnet38",
            module="wider_resnet",
            channels=(256, 4096),
            parameters=105_070_912,
            source="mapillary's wider_resnet38_a2, minus its classifier",
            layout="mapillary",
            about="WiderResNet38-A2, mapillary layout",
        ),
        # ENet: encoder-decoder at stride 8; the count is the whole model's (3 classes here)
        Backbone(
            "enet",
            module="enet",
            channels=None,
            parameters=370_000,
            source="ENet paper: 0.37M",
            tolerance=0.02,
            output_strides=(8,),
            own_head="enet",
            about="encoder-decoder with its own head `enet`",
        ),
    )
}

# Heads that are part of one backbone's architecture, head -> that backbone: valid only together, both ways.
# Every other head fits every other backbone.
OWN_HEADS: dict[str, str] = {b.own_head: b.name for b in BACKBONES.values() if b.own_head}


def backbone_table() -> list[str]:
    """The backbones' table (markdown): a line per run of records that say the same `about`."""
    lines = ["| `model.backbone` | published parameters | default output stride | notes |"]
    lines.append("|---|---:|---:|---|")
    for about, run in itertools.groupby(BACKBONES.values(), key=lambda b: b.about):
        run = list(run)
        counts = ", ".join(f"{b.parameters / 1e6:.{1 if b.parameters >= 1e6 else 2}f}M" for b in run)
        strides = run[0].output_strides
        stride = f"{strides[0]}" + (" (only)" if len(strides) == 1 else "")
        whole = " (whole model)" if run[0].own_head else ""
        lines.append(f"| {', '.join(f'`{b.name}`' for b in run)} | {counts}{whole} | {stride} | {about} |")
    return lines


def check_output_stride(output_stride: int) -> None:
    """ValueError unless `output_stride` is one the dilated backbones and heads are built for."""
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(
            f"unknown output_stride {output_stride!r}; allowed: {', '.join(map(str, OUTPUT_STRIDES))}"
        )


def output_strides(backbone: str) -> tuple[int, ...]:
    return BACKBONES[backbone].output_strides


def default_head(backbone: str) -> str:
    return BACKBONES[backbone].own_head or "deeplabv3plus"


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
    if NORMS[norm.kind].mixes_instance and not BACKBONES[backbone].ibn:
        ibn = [b.name for b in BACKBONES.values() if b.ibn]
        raise ValueError(
            f"norm {str(norm)!r} places instance norm in ResNet-style blocks; backbone {backbone!r} has none "
            f"(allowed: {', '.join(ibn)})"
        )


@dataclass(frozen=True)
class Norm:
    """One kind of norm a spec may name (`norm: gn:c16`): its grammar and the class that builds it.

    Its layer is the class at the dotted path `layer`, built by its classmethod `from_spec(spec, channels)`.
    A new norm is that class and one row in NORMS (and its equation test); the grammar text, the parser,
    `norms.make_norm` and the layers `norms.convert_norms` replaces all come from the rows.
    """

    name: str
    layer: str
    argument: str = ""  # "": none; "grouping": `:g<N>` (N groups) or `:c<N>` (N channels per group);
    # "batch": `:b<N>` (virtual batches of N images); "rule": an optional `:rule`
    about: str = ""  # what it is, for the norms' table (docs/spec.md)
    mixes_instance: bool = False  # IBN-Net-a: instance norm in ResNet-style blocks (Backbone.ibn) only
    evalnorm_calibrates: bool = False  # a model trained with it as BN (its batch at once): EvalNorm applies
    activation: str = ""  # dotted path of the class, built as cls(channels), that replaces every activation
    # of the model (`norms.make_act`): a norm that owns its activation; "" keeps the model's own


NORMS: dict[str, Norm] = {
    n.name: n
    for n in (
        Norm(
            "bn",
            "orchestrator.models.norms.BatchNorm2d",
            about="per-GPU BatchNorm: each worker normalizes with its own batch statistics",
            evalnorm_calibrates=True,
        ),
        Norm(
            "syncbn",
            "orchestrator.models.norms.SyncBatchNorm",
            about="statistics over all workers of the trial: torch's SyncBatchNorm on CUDA, ours on CPU "
            "(gloo)",
            evalnorm_calibrates=True,
        ),
        Norm(
            "gn",
            "orchestrator.models.norms.GroupNorm",
            "grouping",
            about="GroupNorm with N groups / N channels per group (gcd fallback when C does not divide, "
            "logged once)",
        ),
        Norm("in", "orchestrator.models.norms.InstanceNorm", about="InstanceNorm (per sample and channel)"),
        Norm("ln", "orchestrator.models.norms.LayerNorm", about="LayerNorm (per sample; affine per channel)"),
        Norm(
            "frozenbn",
            "orchestrator.models.norms.FrozenBatchNorm2d",
            about="fixed statistics and affine (buffers), for fine-tuning pretrained weights",
        ),
        Norm(
            "evalnorm",
            "orchestrator.models.evalnorm.EvalNorm2d",
            "rule",
            about="BN whose evaluation uses EvalNorm's corrected statistics; alpha/beta per layer learned "
            "online by a stop-gradient auxiliary loss (model gradients unchanged), or alpha = beta = 1/B^2 "
            "(`:rule`)",
            evalnorm_calibrates=True,
        ),
        Norm(
            "ibn-a",
            "orchestrator.models.norms.IBN",
            about="IBN-Net-a: InstanceNorm on half the channels of the first norm of every block in stages "
            "1-3, BN elsewhere (ResNet-style blocks only)",
            mixes_instance=True,
        ),
        Norm(
            "ign-a",
            "orchestrator.models.norms.IBN",
            "grouping",
            about="IBN-a with GN (N groups / N channels per group) in place of BN",
            mixes_instance=True,
        ),
        Norm(
            "ghostbn",
            "orchestrator.models.ghost_bn.GhostBatchNorm2d",
            "batch",
            about="Ghost BatchNorm (Hoffer et al. 2017): in training, each run of N images of a worker's "
            "batch normalized by its own statistics, the running statistics updated once per virtual batch; "
            "BN in eval. It differs from `bn` only where the batch per GPU exceeds N",
        ),
        Norm(
            "brn",
            "orchestrator.models.batch_renorm.BatchRenorm2d",
            about="Batch Renormalization (Ioffe 2017): BN's training output corrected towards the moving "
            "statistics by r and d, clipped by r_max and d_max, constants in the backward; BN in eval. The "
            "paper's schedule: r_max = 1, d_max = 0 for 5000 training forwards (K per step with "
            "`train.accumulate: K`), then linearly to 3 at 40k and 5 at 25k",
        ),
        Norm(
            "frn",
            "orchestrator.models.frn.FilterResponseNorm2d",
            about="Filter Response Normalization (Singh & Krishnan 2020): each image's channel divided by "
            "the root mean square of its responses, no mean subtracted; it owns the activation: every "
            "activation of the model becomes a TLU, max(x, tau) with a learned tau per channel",
            activation="orchestrator.models.frn.TLU",
        ),
    )
}
WS_ABOUT = (
    "Weight Standardization on every conv a norm follows, but depthwise convs (a standardized single-channel "
    "filter sums to zero)"
)
_FORMS = {"": ("{}",), "grouping": ("{}:g<N>", "{}:c<N>"), "batch": ("{}:b<N>",), "rule": ("{}", "{}:rule")}


def _forms(norm: Norm) -> list[str]:
    """The spec strings a row takes (`gn:g<N>`, `gn:c<N>`)."""
    return [form.format(norm.name) for form in _FORMS[norm.argument]]


def norm_grammar() -> str:
    """Every form of norm spec string, from NORMS."""
    forms = ", ".join(form for n in NORMS.values() for form in _forms(n))
    return (
        f"{forms} (g<N>: N groups, c<N>: N channels per group, b<N>: virtual batches of N images); any of "
        "them may end in +ws (weight standardization)"
    )


def norm_table() -> list[str]:
    """The norms' table (markdown): each row's forms and what it is, and the +ws suffix."""
    lines = ["| norm | what it is |", "|---|---|"]
    for n in NORMS.values():
        forms = ", ".join(f"`{form}`" for form in _forms(n))
        lines.append(f"| {forms} | {n.about} |")
    return [*lines, f"| `...+ws` (`gn:c16+ws`, `bn+ws`) | {WS_ABOUT} |"]


def norm_examples() -> list[str]:
    """One spec string per row, in its first form (16 channels per group where it takes a grouping, virtual
    batches of 2 images): what the contract tests, the bench and the docs run every norm by."""
    argument = {"": "", "rule": "", "grouping": ":c16", "batch": ":b2"}
    return [n.name + argument[n.argument] for n in NORMS.values()]


def norm_pattern() -> str:
    """Exactly the valid spec strings, from NORMS, as a JSON-Schema (ECMA-262) compatible regex: plain
    groups only, anchored. parse_norm reads its groups in order: plain kind, kind with rule, rule, grouped
    kind, unit, N, batched kind, N, +ws."""
    # A form no row takes never matches (an empty alternative would match the empty name).
    kinds = {a: "|".join(n.name for n in NORMS.values() if n.argument == a) or "(?!)" for a in _FORMS}
    return (
        rf"^(?:({kinds['']})|({kinds['rule']})(?::(rule))?|({kinds['grouping']}):([gc])([1-9][0-9]*)"
        rf"|({kinds['batch']}):b([1-9][0-9]*))(\+ws)?$"
    )


@dataclass(frozen=True)
class NormSpec:
    kind: str  # a key of NORMS
    groups: int | None = None  # gn:g<N>, ign-a:g<N>
    channels_per_group: int | None = None  # gn:c<N>, ign-a:c<N>
    virtual_batch: int | None = None  # ghostbn:b<N>
    rule: bool = False  # evalnorm:rule
    ws: bool = False  # +ws: weight-standardized convs before the norms

    def __post_init__(self) -> None:
        # The canonical string must be a valid spec: one grammar decides, for parsed and hand-built specs.
        if not re.fullmatch(norm_pattern(), str(self)):
            raise ValueError(f"invalid norm {self!r}; allowed: {norm_grammar()}")

    def __str__(self) -> str:
        """The canonical spec string, so that `parse_norm(str(spec)) == spec`."""
        text = self.kind
        if self.groups is not None:
            text += f":g{self.groups}"
        if self.channels_per_group is not None:
            text += f":c{self.channels_per_group}"
        if self.virtual_batch is not None:
            text += f":b{self.virtual_batch}"
        if self.rule:
            text += ":rule"
        return text + "+ws" if self.ws else text


def parse_norm(spec: str | NormSpec) -> NormSpec:
    """Parse a norm spec string (see norm_grammar) into a NormSpec; a NormSpec passes through; ValueError
    otherwise."""
    if isinstance(spec, NormSpec):
        return spec
    match = re.fullmatch(norm_pattern(), spec) if isinstance(spec, str) else None
    if not match:
        raise ValueError(f"unknown norm {shown(spec)}; allowed: {norm_grammar()}")
    plain, ruled, rule, grouped, unit, n, batched, images, ws = match.groups()
    if batched:
        return NormSpec(batched, virtual_batch=int(images), ws=bool(ws))
    if grouped:
        grouping = {"groups": int(n)} if unit == "g" else {"channels_per_group": int(n)}
        return NormSpec(grouped, **grouping, ws=bool(ws))
    return NormSpec(plain or ruled, rule=bool(rule), ws=bool(ws))
