"""The loss-string grammar of `train.loss`: terms joined by `+`, each `[weight*]name[:args]`.

No torch import here: the spec validator imports this module and must stay torch-free. The code for each
name is in `orchestrator.train.losses` (a test checks they agree).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal

from orchestrator.errors import shown

LOSS_GRAMMAR = (
    "terms joined by +, each [weight*]name: ce, bce (balanced CE, weights from the training manifest), "
    "focal:g<gamma>, ohem:t<loss threshold>,p<minimum kept fraction in (0, 1]>, dice; "
    "e.g. ce+0.5*dice, ohem:t0.7,p0.25+dice"
)

# Per-pixel terms are sums over pixels that micro-batches split exactly; per-batch terms (a mean over the
# hardest pixels, a ratio of sums) are computed on each micro-batch alone.
PIXELWISE = ("ce", "bce", "focal")
PER_BATCH = ("ohem", "dice")
_PLAIN = ("ce", "bce", "dice")  # names that take no argument
_USAGE = {
    "ce": "ce, with no arguments",
    "bce": "bce, with no arguments",
    "dice": "dice, with no arguments",
    "focal": "focal:g<gamma>, gamma >= 0 (e.g. focal:g2)",
    "ohem": "ohem:t<threshold>,p<fraction>: threshold >= 0 on the pixel CE loss, fraction in (0, 1] "
    "(e.g. ohem:t0.7,p0.25)",
}

# Decimal numbers, no sign or exponent (so `+` only ever joins terms): any (>= 0), positive, in (0, 1].
_NUMBER = r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?"
_POSITIVE = r"(?:[1-9][0-9]*(?:\.[0-9]+)?|0\.[0-9]*[1-9][0-9]*)"
_FRACTION = r"(?:0\.[0-9]*[1-9][0-9]*|1(?:\.0+)?)"

# One term; parse_loss reads its groups in order: weight, plain name, focal, gamma, ohem, threshold, fraction.
TERM_PATTERN = (
    rf"(?:({_POSITIVE})\*)?"
    rf"(?:({'|'.join(_PLAIN)})|(focal):g({_NUMBER})|(ohem):t({_NUMBER}),p({_FRACTION}))"
)
# The valid spec strings as a JSON-Schema (ECMA-262) compatible regex (anchored, no named groups), but for a
# name given twice, which a regex cannot see and parse_loss refuses.
LOSS_PATTERN = rf"^{TERM_PATTERN}(?:\+{TERM_PATTERN})*$"


@dataclass(frozen=True)
class LossTerm:
    name: str  # one of PIXELWISE, PER_BATCH
    weight: float = 1.0
    gamma: float | None = None  # focal
    threshold: float | None = None  # ohem: on the per-pixel cross-entropy loss, not the probability
    fraction: float | None = None  # ohem: the minimum kept fraction p of the valid pixels

    def __post_init__(self) -> None:
        # The canonical string must be a valid term: one grammar decides, for parsed and hand-built terms.
        if not re.fullmatch(TERM_PATTERN, str(self)):
            raise ValueError(f"invalid loss term {self!r}; allowed: {LOSS_GRAMMAR}")

    @property
    def pixelwise(self) -> bool:
        return self.name in PIXELWISE

    def __str__(self) -> str:
        """The canonical term string, so that parsing it gives this term back."""
        text = self.name
        if self.gamma is not None:
            text += f":g{_decimal(self.gamma)}"
        if self.threshold is not None or self.fraction is not None:
            text += f":t{_decimal(self.threshold)},p{_decimal(self.fraction)}"
        return text if self.weight == 1 else f"{_decimal(self.weight)}*{text}"


@dataclass(frozen=True)
class LossSpec:
    terms: tuple[LossTerm, ...] = field(default_factory=lambda: (LossTerm("ce"),))

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError(f"a loss needs at least one term; allowed: {LOSS_GRAMMAR}")
        names = [t.name for t in self.terms]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"loss {str(self)!r} names {', '.join(twice)} more than once; give each loss one term "
                "with one weight"
            )

    @property
    def needs_class_pixels(self) -> bool:
        """Whether building it needs the training manifest's class pixel counts (balanced CE does)."""
        return any(t.name == "bce" for t in self.terms)

    def __str__(self) -> str:
        return "+".join(map(str, self.terms))


def parse_loss(spec: str | LossSpec) -> LossSpec:
    """Parse a loss spec string (see LOSS_GRAMMAR) into a LossSpec; a LossSpec passes through; ValueError
    naming the offending term and what is allowed otherwise."""
    if isinstance(spec, LossSpec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a loss is a string, not {shown(spec)}; allowed: {LOSS_GRAMMAR}")
    return LossSpec(tuple(_parse_term(term, spec) for term in spec.split("+")))


def _parse_term(term: str, spec: str) -> LossTerm:
    match = re.fullmatch(TERM_PATTERN, term)
    if not match:
        raise ValueError(_term_error(term, spec))
    weight, plain, focal, gamma, ohem, threshold, fraction = match.groups()
    w = float(weight) if weight else 1.0
    if focal:
        return LossTerm("focal", w, gamma=float(gamma))
    if ohem:
        return LossTerm("ohem", w, threshold=float(threshold), fraction=float(fraction))
    return LossTerm(plain, w)


def _term_error(term: str, spec: str) -> str:
    """What is wrong with a term that does not match: empty, its weight, an unknown name, or its arguments."""
    where = f"in loss {shown(spec)}"
    if not term:
        return f"empty term {where}; join terms with a single +, allowed: {LOSS_GRAMMAR}"
    weight, star, body = term.rpartition("*")
    if star and not re.fullmatch(_POSITIVE, weight):
        return (
            f"term {shown(term)} {where}: weight {shown(weight)} must be a positive decimal number before * "
            "(e.g. 0.5*dice)"
        )
    name = body.partition(":")[0]
    if name not in _USAGE:
        return f"term {shown(term)} {where}: unknown loss {shown(name)}; allowed: {LOSS_GRAMMAR}"
    return f"term {shown(term)} {where}: {name} is written {_USAGE[name]}"


def _decimal(x: float | None) -> str:
    """A float as the grammar writes numbers: positional, no exponent, no trailing zeros."""
    if x is None:
        return "None"  # fails the pattern: a hand-built term that lacks an argument
    text = format(Decimal(repr(float(x))), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
