"""Staging verification: replay a version's golden requests against a served bento and record the result."""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from registry import history
from registry.policy import get_version, record_verification, resolve_version
from registry.runs import load_golden
from registry.store import RegistryError, client

TOLERANCE = 1e-9
"""Largest accepted |served - expected| probability: the same booster gives the same float."""


@dataclass
class VerificationResult:
    """How a served model answered a version's golden requests."""

    version: str
    url: str
    at: str
    checked: int
    mismatches: list[str] = field(default_factory=list)
    matched: int = 0

    @property
    def passed(self) -> bool:
        """Every golden request answered with the expected probability and version."""
        return self.checked > 0 and self.matched == self.checked

    def detail(self) -> str:
        """One line (then the first mismatches) for the version tag and the CLI."""
        head = f"{self.matched}/{self.checked} golden requests matched"
        return "; ".join([head, *self.mismatches[:5]])


def post_json(url: str, body: dict[str, Any], token: str | None, timeout: float) -> dict[str, Any]:
    """POST a JSON body and parse the JSON answer (HTTP errors raise with the server's message)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        message = exc.read()[:300].decode(errors="replace")
        raise ValueError(f"HTTP {exc.code}: {message}") from exc


def check_answer(
    index: int, expected: float, version: str, answer: dict[str, Any], tolerance: float = TOLERANCE
) -> list[str]:
    """What is wrong with one answer (empty: it matches)."""
    problems = []
    served_version = answer.get("model_version")
    if served_version is None or str(served_version) != version:
        problems.append(f"request {index}: model_version {served_version!r}, expected {version!r}")
    prob = answer.get("default_probability")
    if not isinstance(prob, int | float) or not math.isfinite(prob):
        problems.append(f"request {index}: default_probability {prob!r} is not a number")
    elif abs(float(prob) - expected) > tolerance:
        problems.append(f"request {index}: default_probability {prob!r}, expected {expected!r}")
    return problems


READY_TIMEOUT = 60.0
"""How long verify waits for the service's /readyz by default: `bentoml serve … &` followed at once
by verify (as the README has it) finds the port closed, then the model loading."""


def wait_until_ready(url: str, ready_timeout: float, timeout: float, poll: float = 0.5) -> None:
    """Poll {url}/readyz until the service is ready; RegistryError (naming the last answer) when it
    is not within `ready_timeout` seconds.

    Waited on: no connection (not listening yet), no answer, 503 (loading its model). Any other
    answer goes ahead: a service without /readyz (behind a gateway, a stand-in) is judged by its
    answers to the golden requests.
    """
    endpoint = f"{url.rstrip('/')}/readyz"
    deadline = time.monotonic() + ready_timeout
    while True:
        try:
            with urllib.request.urlopen(endpoint, timeout=timeout):
                return
        except urllib.error.HTTPError as exc:
            if exc.code != 503:
                return
            last = f"HTTP 503: {exc.read()[:200].decode(errors='replace').strip()}"
        except (OSError, http.client.HTTPException) as exc:
            last = str(getattr(exc, "reason", exc))
        if time.monotonic() >= deadline:
            raise RegistryError(
                f"the service at {url} was not ready within {ready_timeout:g} s ({last}):"
                " nothing was verified or recorded"
            )
        time.sleep(poll)


def verify(
    stage_or_version: str,
    url: str,
    actor: str,
    token: str | None = None,
    timeout: float = 10.0,
    ready_timeout: float = READY_TIMEOUT,
) -> VerificationResult:
    """Wait for the service to be ready (up to `ready_timeout`; 0 does not wait), send every golden
    request of the version to {url}/v2/score, compare, and record on the version."""
    c = client()
    version = resolve_version(stage_or_version, c)
    golden = load_golden(version)
    if not golden:
        raise RegistryError(f"version {version} has no golden requests to verify with")
    if ready_timeout > 0:
        wait_until_ready(url, ready_timeout, timeout)
    endpoint = f"{url.rstrip('/')}/v2/score"
    result = VerificationResult(
        version=version,
        url=url,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        checked=len(golden),
    )
    for index, case in enumerate(golden):
        expected = float(case["expected"]["default_probability"])
        try:
            answer = post_json(endpoint, case["request"], token, timeout)
        except ValueError as exc:  # an HTTP error or not JSON: this request's answer is wrong
            result.mismatches.append(f"request {index}: {exc}")
            continue
        except (OSError, http.client.HTTPException) as exc:
            # Refused, unreachable, timed out, not HTTP: each other request would wait the same.
            reason = getattr(exc, "reason", exc)
            result.mismatches.append(f"request {index}: no answer from {endpoint} ({reason})")
            if index + 1 < len(golden):
                result.mismatches.append(f"the other {len(golden) - index - 1} were not sent")
            break
        problems = check_answer(index, expected, version, answer)
        result.mismatches.extend(problems)
        result.matched += not problems
    record_verification(version, result.passed, url, result.detail(), result.at)
    stage = str(get_version(c, version).current_stage or "None")
    outcome = "passed" if result.passed else "failed"
    history.record(
        c, version, stage, stage, "verify", actor, f"{outcome} against {url}: {result.detail()}"
    )
    return result
