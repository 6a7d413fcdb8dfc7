"""What is never shown: credentials, wherever they came in (a spec file, any `--set` form, a URL).

A dotted key is secret when it is, or sits below, `storage_options` (fsspec's options carry a store's
credentials) or a key whose name says secret, token, key, password or credential. A secret's value is
replaced by MASK in what is logged, printed, tagged or stored; a password written into a URL is masked too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import yaml

from orchestrator.spec_yaml import read_yaml

MASK = "***"

_SECRET_NAME = re.compile(r"storage_options|secret|token|passw|credential|(?:^|_)key(?:s|_|$)", re.I)
_MAY_NAME_SECRET = re.compile(r"storage_options|secret|token|passw|credential|key", re.I)  # in YAML text
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def is_secret(key: str) -> bool:
    """Whether the dotted key, or one of the keys above it, may hold credentials."""
    return any(_SECRET_NAME.search(part) for part in key.split("."))


def masked(key: str, value: Any) -> Any:
    """`value` of `key` with every secret in it masked: all of it where the key is secret, else the values
    of its secret members, and passwords in URLs."""
    if is_secret(key):
        return MASK
    if isinstance(value, dict):
        return {k: masked(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked(key, v) for v in value]
    return redact(value)


def redact(value: Any) -> Any:
    """scheme://user:password@host/... -> scheme://***@host/...; other values unchanged."""
    return _USERINFO.sub(f"{MASK}@", value) if isinstance(value, str) else value


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A command line with every secret in a `KEY=VALUE` argument masked (`--set KEY=VALUE`,
    `--set=KEY=VALUE`, or one argparse would refuse): the whole value of a secret key; the secret members of
    a map or list value, which is written back as YAML flow; and passwords in URLs. What a run's command
    tag keeps and an error line shows."""
    return [redact_arg(arg) for arg in argv]


def redact_arg(arg: str) -> str:
    """One argument of redact_argv."""
    flag, eq, item = arg.partition("=") if arg.startswith("--set=") else ("", "", arg)
    key, sep, text = item.partition("=")
    if not sep or not key or key.startswith("-"):
        return redact(arg)
    if is_secret(key):
        return f"{flag}{eq}{key}={MASK}"
    if not _MAY_NAME_SECRET.search(text):
        return redact(arg)
    try:
        value = read_yaml(text, "--set")
    except ValueError:  # unreadable, so no telling where a secret starts: all of it
        return f"{flag}{eq}{key}={MASK}"
    shown = masked(key, value)
    if shown == value:
        return redact(arg)
    text = (
        yaml.safe_dump(shown, default_flow_style=True, sort_keys=False, width=1 << 30)
        .strip()
        .removesuffix("...")
    )
    return f"{flag}{eq}{key}={text.strip()}"
