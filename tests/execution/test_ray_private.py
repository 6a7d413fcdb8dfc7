"""Ray's private API is used in one module, which refuses a Ray it was not written for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.errors import UsageError
from orchestrator.execution.ray_private import check_ray_version

PACKAGE = Path(__file__).resolve().parents[2] / "orchestrator"
# A private module of Ray (a `_name` in an import path), or an override of a private method.
PRIVATE = re.compile(r"^\s*(from ray\S*\._\w+|import ray\S*\._\w+)|def _create_default_callbacks", re.M)


def test_rays_private_api_is_used_in_one_module_alone() -> None:
    users = sorted(
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if PRIVATE.search(p.read_text())
    )
    assert users == ["execution/ray_private.py"]


@pytest.mark.parametrize("version", ["2.60.0", "2.60.3"])
def test_the_supported_rays_pass(version: str) -> None:
    check_ray_version(version)


@pytest.mark.parametrize("version", ["2.59.1", "2.61.0", "3.0.0"])
def test_another_ray_is_refused_naming_the_range(version: str) -> None:
    with pytest.raises(
        UsageError, match=rf"as of ray>=2\.60,<2\.61 .* this is Ray {re.escape(version)}: install"
    ):
        check_ray_version(version)
