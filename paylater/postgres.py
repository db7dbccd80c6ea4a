"""PostgreSQL connections made by the system: bounded, unless the URL says otherwise."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import errors

CONNECT_TIMEOUT_SECONDS = 10
"""libpq's connect_timeout unless the URL sets its own: without one, a host that does not answer
(a firewall dropping packets, a server stuck in startup, a proxy whose backend is gone) holds the
caller for minutes of TCP retries, or for good, instead of failing in seconds."""


KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
"""libpq TCP keepalives unless the URL sets its own: a peer that vanished while the connection
was idle (a failover, a partition) is found dead after about a minute, not the kernel's 2 hours.
Probes are answered by a healthy server's kernel however long its query runs."""

TCP_USER_TIMEOUT_MS = 30_000
"""libpq's tcp_user_timeout unless the URL sets one: data sent and not acknowledged for this long
(the host no longer answers) drops the connection, instead of the ~15 minutes of TCP
retransmissions. A slow query is not cut off: the server's kernel acknowledges the request at once."""


def connect_timeout(url: str) -> dict[str, Any]:
    """psycopg keyword arguments for `url`: connect_timeout CONNECT_TIMEOUT_SECONDS unless the URL
    sets one (read when called, so a test may lower it)."""
    return {} if "connect_timeout" in url else {"connect_timeout": CONNECT_TIMEOUT_SECONDS}


def tcp_bounds(url: str) -> dict[str, Any]:
    """psycopg keyword arguments for `url`: connect_timeout, KEEPALIVES and TCP_USER_TIMEOUT_MS,
    each unless the URL sets its own (the kernel-level bounds of a silent network)."""
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(url)
    defaults = {**KEEPALIVES, "tcp_user_timeout": TCP_USER_TIMEOUT_MS}
    return {**connect_timeout(url), **{k: v for k, v in defaults.items() if k not in given}}


class NoAnswer(errors.OperationalError):
    """The database gave no answer to a call within its bound (the network went silent, say);
    the connection is closed, since the call was left half-way through the protocol."""


class BoundedConnection(psycopg.Connection[Any]):
    """A psycopg connection whose every wait for the server (a statement, its rows, a commit) is
    bounded by `answer_timeout` seconds (None: unbounded). Keepalives cannot see a silent peer
    while the kernel still holds unread or acknowledged data, nor cancel a call already waiting;
    psycopg's own wait timeout can."""

    answer_timeout: float | None = None

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        """psycopg's wait (0.1 s: its interval), with `answer_timeout` when the caller gives no
        timeout of its own."""
        bound = self.answer_timeout
        if timeout is not None or bound is None:
            return super().wait(gen, interval, timeout)
        try:
            return super().wait(gen, interval, bound)
        except errors.OperationalError as exc:
            if type(exc).__name__ != "_WaitTimeout":  # psycopg's internal wait timeout
                raise
            # Half-way through the protocol: no later call could make sense of the connection,
            # and a cancel request would go to the same silent host.
            self.pgconn.finish()
            raise NoAnswer(f"no answer from the database within {bound:g} s") from None


def connect_bounded(
    url: str, answer_timeout: float | None = None, **kwargs: Any
) -> BoundedConnection:
    """A connection to `url` with tcp_bounds (`kwargs` win), whose calls wait at most
    `answer_timeout` seconds."""
    conn = BoundedConnection.connect(url, **{**tcp_bounds(url), **kwargs})
    conn.answer_timeout = answer_timeout
    return conn


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
