"""Helpers the test suite and the benches share: ports for the loopback servers they start, and
stopping them; a loopback receiver of JSON POSTs (an alert webhook's stand-in)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# Below this, ports are often fixed by convention (PostgreSQL 5432, MLflow 5000, Prefect 4200).
_LOWEST = 20_000
_handed_out: set[int] = set()
_lock = threading.Lock()


def ephemeral_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default where it cannot be read)."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return 32_768, 60_999
    return low, high


def xdist_share(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(this worker's index, the number of workers) under pytest-xdist; (0, 1) otherwise."""
    seen = os.environ if env is None else env
    worker = seen.get("PYTEST_XDIST_WORKER", "")
    count = seen.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 0:
        return int(worker[2:]) % int(count), int(count)
    return 0, 1


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def listen_port(host: str = "127.0.0.1") -> int:
    """A port for a server the caller is about to start on `host`.

    A port from `bind(0)` comes from the ephemeral range, which is also where every outgoing
    connection takes its local port: in the moment between choosing the port and the server
    binding it, a client connecting anywhere (to PostgreSQL, say) can take it, and the server
    fails with "Address already in use". So the port is drawn from below that range, checked
    free now, and never handed out twice by this process. Under pytest-xdist each worker draws
    only ports of its own residue class (port modulo the worker count), so two workers never
    hand out the same port either. Falls back to `bind(0)` when the range leaves no room below
    it."""
    low, _ = ephemeral_range()
    index, count = xdist_share()
    if low - _LOWEST >= 1_000 * count:
        with _lock:
            for _ in range(200):
                drawn = random.randrange(_LOWEST, low)
                port = drawn - (drawn - _LOWEST) % count + index
                if port < low and port not in _handed_out and _bindable(host, port):
                    _handed_out.add(port)
                    return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextmanager
def duckdb_held_elsewhere(path: Path) -> Iterator[None]:
    """`path` opened by another process (a scheduled sync, a notebook) for the block: DuckDB
    lets one process write a database file, so this one cannot open it meanwhile."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('held', flush=True);"
            " sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.communicate("")


def stop_group(process: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 20) -> None:
    """SIGTERM a server started with start_new_session=True and its whole process group (its
    workers too, even when it has exited itself); SIGKILL the group if it is not gone in
    `grace` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_until_answering(
    url: str,
    process: subprocess.Popen[bytes] | subprocess.Popen[str],
    log: Path,
    timeout: float,
    probe: bytes | None = None,
    interval: float = 0.1,
) -> None:
    """Return once `url` answers 200 (to a JSON POST of `probe` if given); RuntimeError with the
    tail of the server's `log` if its process exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            request = urllib.request.Request(
                url, data=probe, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # refused, reset, timed out, or an HTTP error status (URLError)
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not answering in {timeout:.0f} s: {log.read_text()[-2000:]}")
        time.sleep(interval)


class JsonReceiver:
    """A real HTTP server on a free loopback port keeping every JSON body POSTed to it (a Slack
    webhook, PagerDuty's Events API), answering `status` (settable between requests: 503 plays a
    receiver that is down). A context manager: leaving it stops the server."""

    def __init__(self, status: int = 200, path: str = "/hook") -> None:
        self.bodies: list[dict[str, Any]] = []
        self.status = status
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                owner.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(owner.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{path}"
        # serve_forever's default 0.5 s poll would make every shutdown() wait up to 0.5 s.
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> JsonReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
