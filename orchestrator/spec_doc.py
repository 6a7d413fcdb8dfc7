"""docs/spec.md, the spec's reference: every field with its type, default and meaning, written from the
spec's JSON Schema (`orchestrator spec --doc docs/spec.md`), so the document cannot drift from the code:
tests/test_spec.py fails when the committed file differs from what this writes."""

from __future__ import annotations

import json
import re
from typing import Any

from orchestrator.models.catalog import backbone_table, norm_table
from orchestrator.spec import json_schema

HEADER = """\
# Spec reference

Every field of a sweep spec, section by section. Written by `orchestrator spec --doc docs/spec.md` from the
spec's JSON Schema (`orchestrator spec --schema`): edit the field descriptions in `orchestrator/spec.py`,
not this file. `--set KEY=VALUE` takes these dotted keys (YAML 1.2 values); `grid:` sweeps over any of them
except `name`. Examples: `jobs/smoke.yaml`, `jobs/sweep_norms.yaml`.
"""
NORMS_TEXT = (
    "What `norm` (and `grid.norm`) may name, a line per row of `NORMS` in `orchestrator/models/catalog.py`; "
    "<N> is a whole number. A new norm is a class and a row there (docs/models.md)."
)
BACKBONES_TEXT = (
    "What `model.backbone` may name, from the records of `BACKBONES` in `orchestrator/models/catalog.py`: "
    "parameters as published, without the ImageNet classifier. A new backbone is a module and a record there "
    "(docs/models.md)."
)
_BOUNDS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}


def render() -> str:
    schema = json_schema()
    defs = schema["$defs"]
    out = [HEADER]
    sections = [("Top level", "", schema)]
    for key, prop in schema["properties"].items():
        if "$ref" in prop:
            sections.append((f"`{key}`", f"{key}.", _definition(prop, defs)))
    sections.append(("`train.stages` items", "", defs["StageSpec"]))
    for title, prefix, node in sections:
        doc = node.get("description", "") if node is not schema else ""
        out += [f"## {title}", ""] + ([_cell(doc), ""] if doc else [])
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        required = set(node.get("required", ()))
        for key, prop in node["properties"].items():
            if "$ref" in prop:
                continue  # a section of its own
            default = "required" if key in required else _value(prop["default"]) if "default" in prop else ""
            cells = [f"`{prefix}{key}`", _cell(_type(prop)), default, _cell(prop.get("description", ""))]
            out.append(f"| {' | '.join(cells)} |")
        out.append("")
    out += ["## Norms", "", NORMS_TEXT, "", *norm_table(), ""]
    out += ["## Backbones", "", BACKBONES_TEXT, "", *backbone_table(), ""]
    return "\n".join(out)


def _definition(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    return defs[prop["$ref"].rsplit("/", 1)[-1]]


def _type(prop: dict[str, Any]) -> str:
    if "anyOf" in prop:
        return " or ".join(_type(member) for member in prop["anyOf"])
    if "$ref" in prop:
        return "stage"
    if "enum" in prop:
        return " or ".join(_value(v) for v in prop["enum"])
    if "const" in prop:
        return _value(prop["const"])
    kind = prop.get("type", "any")
    if kind == "array" and "prefixItems" in prop:
        text = "[" + ", ".join(_type(item) for item in prop["prefixItems"]) + "]"
    elif kind == "array":
        text = f"list of {_type(prop.get('items', {}))}"
    elif kind == "object":
        text = "mapping"
    else:
        text = kind
    bounds = [f"{sign} {prop[name]}" for name, sign in _BOUNDS.items() if name in prop]
    if "pattern" in prop and len(prop["pattern"]) <= 40:  # the long ones, norm and loss, have a grammar
        bounds.append(f"matching `{prop['pattern']}`")
    return " ".join([text, *bounds])


def _value(value: Any) -> str:
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    # `gn:g<N>`: a `<` before a letter would open an HTML tag.
    return re.sub(r"<(?=[A-Za-z/])", r"\\<", text.replace("|", "\\|").replace("\n", " "))
