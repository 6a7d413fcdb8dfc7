"""The spec's YAML reader: YAML 1.2's core schema (checked against the examples of the YAML 1.2.2 spec,
section 10.3.2), keys given twice, and documents bounded as they will be used, aliases expanded."""

from __future__ import annotations

import math
import resource
import time

import pytest

from orchestrator.errors import UsageError
from orchestrator.spec_yaml import MAX_NODES, read_yaml


@pytest.mark.parametrize(
    ("text", "value"),
    [
        # YAML 1.2.2, Example 10.9 "Core Tag Resolution"
        ("null", None), ("Null", None), ("NULL", None), ("~", None), ("", None),
        ("true", True), ("True", True), ("TRUE", True), ("false", False), ("FALSE", False),
        ("0", 0), ("0o7", 7), ("0x3A", 58), ("-19", -19), ("+12", 12),
        ("0.", 0.0), ("-0.0", 0.0), (".5", 0.5), ("+12e03", 12000.0), ("-2E+05", -200000.0),
        (".inf", math.inf), ("-.Inf", -math.inf), ("+.INF", math.inf),
        # YAML 1.1 readings that 1.2 drops: these are text
        ("on", "on"), ("off", "off"), ("yes", "yes"), ("n", "n"), ("2024-01-01", "2024-01-01"),
        ("12:30", "12:30"), ("0b101", "0b101"), ("1_000", "1_000"),
        # and readings 1.2 adds: 1e-3 is a number (PyYAML's 1.1 wants a dot), 017 is seventeen (not octal)
        ("1e-3", 0.001), ("017", 17),
    ],
)  # fmt: skip
def test_plain_scalars_resolve_as_yaml_1_2_core_schema(text, value):
    assert read_yaml(f"k: {text}", "t")["k"] == value
    assert type(read_yaml(f"k: {text}", "t")["k"]) is type(value)


def test_nan_is_a_float_for_the_spec_to_refuse():
    assert math.isnan(read_yaml("k: .nan", "t")["k"])


def test_a_key_given_twice_is_refused_naming_both_lines():
    with pytest.raises(UsageError, match=r"^s.yaml: not valid YAML: line 3, column 3: key 'lr' given twice "
                       r"\(first on line 2\); YAML would keep the last silently$"):  # fmt: skip
        read_yaml("train:\n  lr: 0.1\n  lr: 0.2\n", "s.yaml")
    assert read_yaml("a: 1\nb: {a: 1}\n", "t") == {"a": 1, "b": {"a": 1}}  # the same key in two maps


def test_a_merged_key_may_be_overridden():
    doc = "base: &b {lr: 0.1, epochs: 2}\ntrain:\n  <<: *b\n  lr: 0.2\n"
    assert read_yaml(doc, "t")["train"] == {"lr": 0.2, "epochs": 2}


def _laughs(levels: int, width: int = 10) -> str:
    lines = ['l0: &l0 "lol"']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_is_refused_at_once_in_a_few_bytes():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(UsageError) as e:
        read_yaml(_laughs(10), "bomb.yaml")  # 10^9 values once expanded, 300 bytes of text
    assert time.monotonic() - start < 1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
    assert str(e.value) == f"bomb.yaml: more than {MAX_NODES:,} values once its aliases are expanded; a " \
        "spec holds hundreds"  # fmt: skip
    # Aliases within the bound are fine: 10^4 values.
    assert len(read_yaml(_laughs(4), "t")["l3"]) == 10


def test_a_document_that_holds_itself_is_refused():
    with pytest.raises(UsageError, match="an alias refers to a value that holds it"):
        read_yaml("a: &a [1, *a]\n", "t")
    with pytest.raises(UsageError, match="an alias refers to a value that holds it"):
        read_yaml("a: &a {b: *a}\n", "t")


def test_deep_nesting_and_huge_texts_are_refused():
    with pytest.raises(UsageError, match="^t: "):
        read_yaml("[" * 100_000 + "]" * 100_000, "t")
    with pytest.raises(UsageError, match=r"^t: 1,048,577 characters; a spec is at most 1,048,576$"):
        read_yaml("#" * (1 << 20) + "\n", "t")


def test_a_syntax_error_says_where_without_quoting_the_line():
    with pytest.raises(UsageError) as e:
        read_yaml('data:\n  storage_options: {secret: "s3cr3t\n', "s.yaml")
    assert str(e.value).startswith("s.yaml: not valid YAML: line 3, column 1: ")
    assert "s3cr3t" not in str(e.value) and "\n" not in str(e.value)
