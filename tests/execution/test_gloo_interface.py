"""Gloo listens on the interface that holds Ray's node address (execution/trainer.py), not on the address
the host's name resolves to: many Linux hosts map that to loopback, which peers on other nodes cannot reach.
tests/execution/test_multihost.py runs gloo across hosts."""

from __future__ import annotations

from orchestrator.execution.trainer import interface_of


def test_the_interface_holding_an_address_is_found() -> None:
    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("198.51.100.77") is None  # TEST-NET-2: on no interface of this machine
