"""The YAML of a spec file or a `--set` value, read strictly and within bounds.

- YAML 1.2's core schema for plain scalars. PyYAML reads YAML 1.1, where on/off/yes/no are booleans
  (`amp: off` arrived as False), `1e-3` is text, `017` is octal, `12:30` is a number and `2024-01-01` a
  date.
- A key given twice in one mapping is refused: YAML would keep the last silently.
- A document is bounded as it will be used, aliases expanded: nested aliases (a "billion laughs") expand
  a few hundred bytes past any memory, and every walk over the value would do that expansion.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from orchestrator.errors import UsageError

MAX_BYTES = 1 << 20  # a spec is a few KB
MAX_NODES = 100_000  # scalars, lists and maps once aliases are expanded; a spec holds hundreds

_MERGE = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:  # `<<: *base` then a key of base: an override, as meant
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.setdefault(key, key_node)
                except TypeError:  # an unhashable key: PyYAML's own construction refuses it
                    continue
                if seen is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None,
                        f"key {key!r} given twice (first on line {seen.start_mark.line + 1}); YAML would "
                        "keep the last silently",
                        key_node.start_mark,
                    )  # fmt: skip
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.Node) -> int:
        text = self.construct_scalar(node)
        if text.startswith("0o"):
            return int(text[2:], 8)
        return int(text, 16 if text.startswith("0x") else 10)  # YAML 1.2: 017 is seventeen


# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution); no timestamps, no sexagesimals.
_Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
    (
        "float",
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        list("-+0123456789."),
    ),
    ("merge", r"<<", ["<"]),
):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), _first)
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def read_yaml(text: str, source: str) -> Any:
    """The value of one YAML document; UsageError naming `source` (a file, a `--set`) when it is not valid
    YAML, gives a key twice, or is larger than MAX_BYTES or MAX_NODES."""
    if len(text) > MAX_BYTES:
        raise UsageError(f"{source}: {len(text):,} characters; a spec is at most {MAX_BYTES:,}")
    loader = None
    try:
        loader = _Loader(text)  # which refuses control characters at once
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, source)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        # Where and what, without PyYAML's snippet of the text: a line of a spec may hold a credential.
        mark = e.problem_mark or e.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise UsageError(f"{source}: not valid YAML: {at}{e.problem or e.context}") from None
    except yaml.YAMLError as e:  # a ReaderError: a character YAML does not allow, and where
        raise UsageError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise UsageError(f"{source}: nested too deeply to be a spec") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_size(root: yaml.Node, source: str) -> None:
    """Refuse a document of more than MAX_NODES nodes with its aliases expanded, or one that holds itself.
    Aliases share nodes, so each node's expanded size is counted once (in document order, iteratively)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # the nodes whose members are being counted: one met again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, members_done = stack.pop()
        members = _members(node)
        if members_done:
            open_.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(m)] for m in members)
            if sizes[id(node)] > MAX_NODES:
                raise UsageError(
                    f"{source}: more than {MAX_NODES:,} values once its aliases are expanded; a spec "
                    "holds hundreds"
                )
        elif id(node) in open_:
            raise UsageError(f"{source}: an alias refers to a value that holds it (a recursive document)")
        elif id(node) not in sizes:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((m, False) for m in members)


def _members(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []
