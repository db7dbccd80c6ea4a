"""`bentoml serve` on loopback for the serving tests, and calls to it over real HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from paylater.testing import listen_port, stop_group

TOKEN = "s3cret-token"
REPO_ROOT = Path(__file__).resolve().parents[2]


def call(
    base: str, path: str, body: Any = None, token: str | None = TOKEN, raw: bytes | None = None
) -> tuple[int, Any]:
    """POST (or GET when body and raw are None) and return (status, decoded JSON or text)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


@contextmanager
def serving(
    target: str, env: dict[str, str], log: Path, up: Callable[[str], bool]
) -> Iterator[SimpleNamespace]:
    """`bentoml serve target` on a free loopback port until `up(base)` holds 10 times in a row
    (each of the server's workers answers for itself); stopped afterwards. Yields its base URL
    and the pid of the `bentoml serve` process (the parent of its workers). A server that
    exits because another process took its port in the meantime is started again on another."""
    bentoml = str(Path(sys.executable).parent / "bentoml")
    for attempt in range(3):
        port = listen_port()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [bentoml, "serve", target, "--host", "127.0.0.1", "--port", str(port)],
                env={**os.environ, "BENTOML_DO_NOT_TRACK": "true", **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO_ROOT,  # where `bentos.service:PaylaterScorer` imports from
            )
        base = f"http://127.0.0.1:{port}"
        try:
            if _wait_up(proc, base, log, up):
                break
        except BaseException:
            stop_group(proc)
            raise
        stop_group(proc)
        if attempt == 2 or "Address already in use" not in log.read_text():
            pytest.fail(f"{target} not up: {log.read_text()[-3000:]}")
    try:
        yield SimpleNamespace(base=base, pid=proc.pid)
    finally:
        stop_group(proc)


def _wait_up(
    proc: subprocess.Popen[bytes], base: str, log: Path, up: Callable[[str], bool]
) -> bool:
    """Whether `up(base)` held 10 times in a row within 120 s; False at once if `proc` exits."""
    deadline, up_in_a_row = time.monotonic() + 120, 0
    while time.monotonic() < deadline and up_in_a_row < 10:
        if proc.poll() is not None:
            return False
        try:
            ok = up(base)
        except OSError:
            ok = False
        up_in_a_row = up_in_a_row + 1 if ok else 0
        time.sleep(0.05 if ok else 0.1)
    return up_in_a_row >= 10
