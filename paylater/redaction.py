"""Credentials out of every text that leaves the process: error messages, log lines, alerts.

`redact` works on a URL or on any text holding URLs (a library's error message), so a message
built from a database driver's, MLflow's or an HTTP client's exception can be scrubbed whole.
It masks a password in `scheme://user:password@`, secret-looking query parameters
(`?password=`, `key=`, `token=`, `sig=`, …), libpq `password=` keywords and the path of a
chat webhook (Slack's path is its token). Host, port, database and path stay readable: an
operator must still see which backend failed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"

# `scheme://user:password@`: the password runs to the last `@` before whitespace or a quote,
# so one holding an unescaped `/`, `#`, `?` or `@` (which a URL parser would misread, leaving
# it in clear) is masked whole; an over-long match only hides more.
_USERINFO = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"<>]*):(?P<secret>[^\s'\"<>]*)@"
)
# A query parameter whose name says it is a secret (AWS/GCS signed URLs included).
_QUERY = re.compile(
    r"(?P<head>[?&;][A-Za-z0-9_.\-]*(?:pass|pwd|secret|token|key|sig|credential|auth)"
    r"[A-Za-z0-9_.\-]*=)(?P<secret>[^&#\s'\"<>]+)",
    re.IGNORECASE,
)
# libpq keyword/value connection strings: password=secret or password='se cret'.
_KEYWORD = re.compile(
    r"(?P<head>(?<![A-Za-z0-9_?&;])(?:password|passwd|sslpassword)\s*=\s*)"
    r"(?P<secret>'(?:[^'\\]|\\.)*'|[^\s'\"&]+)",
    re.IGNORECASE,
)
# A chat webhook: the path after its host is the credential (Slack, Discord, Teams, Mattermost).
_WEBHOOK = re.compile(
    r"(?P<head>\bhttps?://(?:hooks\.slack\.com|[^\s/'\"<>]+)"
    r"(?=/(?:services|hooks|api/webhooks|webhookb2|workflows)/))(?P<secret>/[^\s'\"<>]*)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` (a URL, or a message holding URLs) with every credential in it masked."""
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _WEBHOOK.sub(lambda m: f"{m['head']}/{MASK}", text)
    text = _QUERY.sub(lambda m: f"{m['head']}{MASK}", text)
    return _KEYWORD.sub(lambda m: f"{m['head']}{MASK}", text)


def scrub(text: str, *secrets: str | None) -> str:
    """`redact(text)` with each given secret value (a webhook URL, a routing key) masked too,
    wherever and however a library quoted it (as given, or percent-decoded)."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        for form in {secret, unquote(secret)}:
            if len(form) >= 4:  # a 1-3 character "secret" would mask ordinary words
                text = text.replace(form, MASK)
    return redact(text)


def origin(url: str) -> str:
    """Scheme and host of a URL whose path is its secret (a webhook, a heartbeat check)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return "an unparsable URL"
    if not host:
        return "a URL without host"
    netloc = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{netloc}{f':{port}' if port else ''}/…"


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """`url` without its `user:password@`, and the (percent-decoded) user and password; a URL
    without credentials comes back as given, with (None, None)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None, None
    netloc = parts.netloc.rpartition("@")[2]
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return urlunsplit(parts._replace(netloc=netloc)), user, password


def safe_cause(exc: BaseException) -> BaseException | None:
    """`exc` as the cause to chain a redacted error to, or None when its text holds a credential:
    chained, it would print the secret again in any traceback (which Prefect stores with a run's
    logs)."""
    text = str(exc)
    return exc if redact(text) == text else None


@contextmanager
def redacted_errors() -> Iterator[None]:
    """Re-raise an error whose text holds a credential as the same type, redacted.

    For a library that quotes what it was given (libpq a URL it cannot parse, password and all):
    the same type, so callers' `except` clauses still match. Chained `from None`: the original's
    text, printed in a traceback (which Prefect stores with the run's logs), would hold the
    secret again. An error without one propagates untouched, with its own chain.
    """
    try:
        yield
    except Exception as exc:
        if safe_cause(exc) is exc:
            raise
        text = str(exc)
        try:
            clean = type(exc)(redact(text))
        except Exception:  # a type that cannot be built from a message alone
            clean = RuntimeError(f"{type(exc).__name__}: {redact(text)}")
        raise clean from None
