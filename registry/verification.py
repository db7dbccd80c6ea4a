"""Staging verification: replay a version's golden requests against a served bento and record the result."""

from __future__ import annotations

import base64
import http.client
import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from paylater.redaction import scrub, split_credentials
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


@dataclass(frozen=True)
class Target:
    """The service to verify: its URL without credentials (the one shown and recorded), and the
    Authorization header its requests carry (None: none)."""

    url: str
    authorization: str | None = None
    secrets: tuple[str, ...] = ()
    """What must never be shown: the password (and token) as given."""

    def headers(self) -> dict[str, str]:
        """The Authorization header, when there is one."""
        return {"Authorization": self.authorization} if self.authorization else {}

    def clean(self, text: str) -> str:
        """`text` with every credential masked."""
        return scrub(text, *self.secrets)


def target(url: str, token: str | None) -> Target:
    """The service at `url`, authenticated by the URL's `user:password@` (basic, as a proxy in
    front of the service asks) or the bearer `token` (the service's own); RegistryError, naming
    no secret, for a URL verify cannot use or both credentials at once."""
    nothing = "nothing was verified or recorded"
    try:
        bare, user, password = split_credentials(url.strip())
        parts = urlsplit(bare)
        _ = parts.port  # raises on a port that is not a number
    except ValueError:
        raise RegistryError(f"--url is not a valid URL: {nothing}") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        shown = scrub(bare, password)
        raise RegistryError(
            f"--url must be an http:// or https:// URL with a host, e.g."
            f" http://127.0.0.1:3001, got {shown!r}: {nothing}"
        )
    if user is None and password is None:
        return Target(bare, f"Bearer {token}" if token else None, (token,) if token else ())
    if token:
        # One Authorization header: sending either alone would fail the other's check silently.
        raise RegistryError(
            "--url carries user:password@ and a --token (or PAYLATER_API_TOKEN) is set: both go"
            f" in the one Authorization header; give the credentials in --url or --token, not"
            f" both: {nothing}"
        )
    pair = f"{user or ''}:{password or ''}".encode()
    secrets = tuple(s for s in (password, url) if s)
    return Target(bare, f"Basic {base64.b64encode(pair).decode()}", secrets)


REFUSED = frozenset({401, 403})
"""Answers about the request's credentials, not about the model."""


class Refused(Exception):
    """The service refused the request's credentials (its text: the HTTP status and message)."""


def refusal(service: Target, answer: str) -> RegistryError:
    """The error for a service refusing verify's credentials: no verdict on the model, so
    nothing is recorded (a failed verification would replace a passed one)."""
    return RegistryError(
        f"the service at {service.url} refused the credentials verify sent"
        f" ({service.clean(answer)}): give its token with --token (or PAYLATER_API_TOKEN), or a"
        " proxy's user:password@ in --url; nothing was verified or recorded"
    )


def post_json(
    url: str, body: dict[str, Any], headers: dict[str, str], timeout: float
) -> dict[str, Any]:
    """POST a JSON body with `headers` and parse the JSON answer (HTTP errors raise with the
    server's message)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json", **headers}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        message = exc.read()[:300].decode(errors="replace")
        if exc.code in REFUSED:
            raise Refused(f"HTTP {exc.code}: {message.strip()}") from exc
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


def _body(exc: urllib.error.HTTPError) -> str:
    """The start of an HTTP error's answer, as text."""
    return exc.read()[:200].decode(errors="replace").strip()


READY_TIMEOUT = 60.0
"""How long verify waits for the service's /readyz by default: `bentoml serve … &` followed at once
by verify (as the README has it) finds the port closed, then the model loading."""


def wait_until_ready(
    service: Target, ready_timeout: float, timeout: float, poll: float = 0.5
) -> None:
    """Poll {url}/readyz until the service is ready; RegistryError (naming the last answer) when it
    is not within `ready_timeout` seconds.

    Waited on: no connection (not listening yet), no answer, 503 (loading its model). Any other
    answer goes ahead: a service without /readyz (behind a gateway, a stand-in) is judged by its
    answers to the golden requests; but a 401 or 403 (the credentials refused) is a RegistryError
    at once, waiting being no use.
    """
    endpoint = f"{service.url.rstrip('/')}/readyz"
    deadline = time.monotonic() + ready_timeout
    while True:
        try:
            request = urllib.request.Request(endpoint, headers=service.headers())
            with urllib.request.urlopen(request, timeout=timeout):
                return
        except urllib.error.HTTPError as exc:
            if exc.code in REFUSED:
                raise refusal(service, f"HTTP {exc.code}: {_body(exc)}") from None
            if exc.code != 503:
                return
            last = f"HTTP 503: {_body(exc)}"
        except (OSError, http.client.HTTPException) as exc:
            last = str(getattr(exc, "reason", exc))
        if time.monotonic() >= deadline:
            raise RegistryError(
                f"the service at {service.url} was not ready within {ready_timeout:g} s"
                f" ({service.clean(last)}): nothing was verified or recorded"
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
    request of the version to {url}/v2/score, compare, and record on the version.

    `url` may carry `user:password@` (basic authentication, as curl sends it): it is sent as
    such, and the URL shown and recorded is the one without it."""
    service = target(url, token)
    c = client()
    version = resolve_version(stage_or_version, c)
    golden = load_golden(version)
    if not golden:
        raise RegistryError(f"version {version} has no golden requests to verify with")
    if ready_timeout > 0:
        wait_until_ready(service, ready_timeout, timeout)
    endpoint = f"{service.url.rstrip('/')}/v2/score"
    result = VerificationResult(
        version=version,
        url=service.url,
        at=datetime.now(UTC).isoformat(timespec="seconds"),
        checked=len(golden),
    )
    for index, case in enumerate(golden):
        expected = float(case["expected"]["default_probability"])
        try:
            answer = post_json(endpoint, case["request"], service.headers(), timeout)
        except Refused as exc:
            raise refusal(service, str(exc)) from None
        except ValueError as exc:  # an HTTP error or not JSON: this request's answer is wrong
            result.mismatches.append(f"request {index}: {service.clean(str(exc))}")
            continue
        except (OSError, http.client.HTTPException) as exc:
            # Refused, unreachable, timed out, not HTTP: each other request would wait the same.
            reason = getattr(exc, "reason", exc)
            said = service.clean(str(reason))
            result.mismatches.append(f"request {index}: no answer from {endpoint} ({said})")
            if index + 1 < len(golden):
                result.mismatches.append(f"the other {len(golden) - index - 1} were not sent")
            break
        problems = check_answer(index, expected, version, answer)
        result.mismatches.extend(problems)
        result.matched += not problems
    record_verification(version, result.passed, service.url, result.detail(), result.at)
    stage = str(get_version(c, version).current_stage or "None")
    outcome = "passed" if result.passed else "failed"
    history.record(
        c,
        version,
        stage,
        stage,
        "verify",
        actor,
        f"{outcome} against {service.url}: {result.detail()}",
    )
    return result
