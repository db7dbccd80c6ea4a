"""PostgreSQL connections made by the system: bounded, unless the URL says otherwise."""

from __future__ import annotations

from typing import Any

CONNECT_TIMEOUT_SECONDS = 10
"""libpq's connect_timeout unless the URL sets its own: without one, a host that does not answer
(a firewall dropping packets, a server stuck in startup, a proxy whose backend is gone) holds the
caller for minutes of TCP retries, or for good, instead of failing in seconds."""


def connect_timeout(url: str) -> dict[str, Any]:
    """psycopg keyword arguments for `url`: connect_timeout CONNECT_TIMEOUT_SECONDS unless the URL
    sets one (read when called, so a test may lower it)."""
    return {} if "connect_timeout" in url else {"connect_timeout": CONNECT_TIMEOUT_SECONDS}


def bounded_url(url: str) -> str:
    """`url` (a postgresql:// URI) with connect_timeout=CONNECT_TIMEOUT_SECONDS added unless it
    sets one: for clients that take only a URI (the ADBC driver)."""
    if "connect_timeout" in url:
        return url
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}connect_timeout={CONNECT_TIMEOUT_SECONDS}"


def libpq_url(url: str) -> str:
    """A SQLAlchemy-style URL (postgresql+psycopg://) as libpq takes it (postgresql://)."""
    scheme, rest = url.split("://", 1)
    return f"postgresql://{rest}" if "+" in scheme else url
