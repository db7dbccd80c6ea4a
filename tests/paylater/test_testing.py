"""Ports for the loopback servers tests and benches start."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from paylater import testing
from paylater.testing import ephemeral_range, listen_port


def test_listen_port_is_below_the_ephemeral_range_and_a_server_can_listen_on_it() -> None:
    low, _ = ephemeral_range()
    port = listen_port()
    assert 20_000 <= port < low
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass


def test_listen_port_never_hands_out_a_port_twice() -> None:
    ports = [listen_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_listen_port_skips_a_port_someone_listens_on(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", listen_port()))
        taken.listen()
        busy, other = taken.getsockname()[1], listen_port()
        draws = iter([busy, busy, other])
        monkeypatch.setattr(testing.random, "randrange", lambda low, high: next(draws))
        monkeypatch.setattr(testing, "_handed_out", set())
        assert listen_port() == other


def test_listen_port_falls_back_to_the_kernel_when_the_range_leaves_no_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(testing, "ephemeral_range", lambda: (1024, 65535))
    port = listen_port()
    assert 1024 <= port <= 65535


def test_ephemeral_range_reads_the_kernel_setting_or_falls_back(tmp_path: Path) -> None:
    setting = tmp_path / "ip_local_port_range"
    setting.write_text("40000\t50000\n")
    assert ephemeral_range(setting) == (40000, 50000)
    setting.write_text("garbage\n")
    assert ephemeral_range(setting) == (32768, 60999)
    assert ephemeral_range(tmp_path / "missing") == (32768, 60999)
