"""Ports for the loopback servers tests and benches start; waiting for them and stopping them."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paylater import testing
from paylater.testing import (
    JsonReceiver,
    ephemeral_range,
    listen_port,
    stop_group,
    wait_until_answering,
)


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


@pytest.mark.parametrize("index", [0, 1, 2])
def test_listen_port_draws_only_its_own_xdist_workers_ports(
    monkeypatch: pytest.MonkeyPatch, index: int
) -> None:
    """Three pytest-xdist workers each draw ports of their own residue class: a server one
    worker starts can never be handed the port another worker chose a moment before."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    monkeypatch.setattr(testing, "_handed_out", set())
    low, _ = ephemeral_range()
    ports = [listen_port() for _ in range(50)]
    assert all(20_000 <= port < low and (port - 20_000) % 3 == index for port in ports), ports


def test_xdist_share_outside_xdist_or_from_a_malformed_environment_is_everything() -> None:
    assert testing.xdist_share({}) == (0, 1)
    assert testing.xdist_share(
        {"PYTEST_XDIST_WORKER": "gw4", "PYTEST_XDIST_WORKER_COUNT": "3"}
    ) == (1, 3)
    assert testing.xdist_share(
        {"PYTEST_XDIST_WORKER": "master", "PYTEST_XDIST_WORKER_COUNT": "3"}
    ) == (0, 1)
    assert testing.xdist_share(
        {"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "0"}
    ) == (0, 1)


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


def _python(code: str, log: Path) -> subprocess.Popen[bytes]:
    """`python -c code` in a session of its own, its output in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_wait_until_answering_returns_once_the_server_answers_200(tmp_path: Path) -> None:
    port = listen_port()
    server = _python(
        f"import http.server as h; h.test(h.SimpleHTTPRequestHandler, port={port}, bind='127.0.0.1')",
        tmp_path / "log",
    )
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/", server, tmp_path / "log", timeout=60)
    finally:
        stop_group(server)
    assert server.returncode is not None


def test_wait_until_answering_names_a_server_that_exited_with_its_log(tmp_path: Path) -> None:
    server = _python("print('bad config: no such backend'); raise SystemExit(2)", tmp_path / "log")
    with pytest.raises(RuntimeError, match="exited: bad config: no such backend"):
        wait_until_answering(
            f"http://127.0.0.1:{listen_port()}/", server, tmp_path / "log", timeout=60
        )


def test_stop_group_kills_a_group_that_ignores_sigterm(tmp_path: Path) -> None:
    # The server and a worker it started, both ignoring SIGTERM: both are gone after the grace.
    code = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(600)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    server = _python(code, tmp_path / "log")
    deadline = time.monotonic() + 60
    while len((tmp_path / "log").read_text().split()) < 2:  # the child's pid and its "1"
        assert time.monotonic() < deadline and server.poll() is None
        time.sleep(0.05)
    child = next(int(w) for w in (tmp_path / "log").read_text().split() if w != "1")
    stop_group(server, grace=0.5)
    assert server.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "Z" not in _state(child):
        assert time.monotonic() < deadline, "the worker outlived its server's group"
        time.sleep(0.05)


def _state(pid: int) -> str:
    """The process's state letter from /proc (Z: exited, not yet reaped), "" once gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_the_json_receiver_keeps_each_body_and_answers_its_status_until_closed() -> None:
    import json
    import urllib.error
    import urllib.request

    def post(url: str, body: dict) -> int:
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    with JsonReceiver(status=503) as receiver:
        assert receiver.url.startswith("http://127.0.0.1:") and receiver.url.endswith("/hook")
        assert post(receiver.url, {"text": "first"}) == 503
        receiver.status = 200
        assert post(receiver.url, {"text": "second"}) == 200
        assert receiver.bodies == [{"text": "first"}, {"text": "second"}]
    with pytest.raises(urllib.error.URLError):
        post(receiver.url, {"text": "after"})
