"""PostgreSQL connections made by the system: bounded, unless the URL says otherwise."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from typing import Any

import psycopg
from psycopg import errors

from paylater.redaction import redacted_errors

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


STOPPING_ANSWER_SECONDS = 3.0
"""How long a call may still wait for the server once its connection's `stopping` event is set: a
healthy database answers a write in well under a second, while a silent one must not hold a
stopping process for the whole answer timeout (a shutdown grace period is often 30 s)."""


class NoAnswer(errors.OperationalError):
    """The database gave no answer to a call within its bound (the network went silent, say);
    the connection is closed, since the call was left half-way through the protocol. `stopping`:
    the bound was STOPPING_ANSWER_SECONDS, the process being stopped."""

    def __init__(self, message: str, bound: float = 0.0, stopping: bool = False) -> None:
        super().__init__(message)
        self.bound, self.stopping = bound, stopping


class _Stopped(Exception):
    """Raised out of a wait still unanswered STOPPING_ANSWER_SECONDS after the stop."""


def _until_stopped(gen: Any, stopping: threading.Event, grace: float) -> Generator[Any, Any, Any]:
    """`gen` as it is, but raising _Stopped when resumed with nothing to read or write (psycopg's
    wait resumes it every interval) `grace` seconds or more after `stopping` was first seen set."""
    cutoff: float | None = None
    try:
        state = next(gen)
        while True:
            ready = yield state
            if not ready and stopping.is_set():
                now = time.monotonic()
                cutoff = now + grace if cutoff is None else cutoff
                if now >= cutoff:
                    raise _Stopped
            state = gen.send(ready)
    except StopIteration as stop:
        return stop.value


_connecting = threading.local()
"""The `stopping` event of the connection this thread is opening (connect is a classmethod)."""


class BoundedConnection(psycopg.Connection[Any]):
    """A psycopg connection whose every wait for the server (a statement, its rows, a commit) is
    bounded by `answer_timeout` seconds (None: unbounded), and, once `stopping` is set, by
    STOPPING_ANSWER_SECONDS more. Keepalives cannot see a silent peer while the kernel still holds
    unread or acknowledged data, nor cancel a call already waiting; psycopg's own wait can."""

    answer_timeout: float | None = None
    stopping: threading.Event | None = None

    @classmethod
    def _connect_gen(cls, conninfo: str = "") -> Any:
        """psycopg's connection generator, cut short like a call once `stopping` is set: a
        reconnect waiting out its connect_timeout on a silent host is what an outage's loop is
        mostly doing when a stop comes."""
        gen = super()._connect_gen(conninfo)
        stopping = getattr(_connecting, "stopping", None)
        return gen if stopping is None else _until_stopped(gen, stopping, STOPPING_ANSWER_SECONDS)

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        """psycopg's wait (0.1 s: its interval), with `answer_timeout` when the caller gives no
        timeout of its own, cut short once `stopping` is set."""
        bound, stopping = self.answer_timeout, self.stopping
        if timeout is not None or (bound is None and stopping is None):
            return super().wait(gen, interval, timeout)
        if stopping is not None:
            gen = _until_stopped(gen, stopping, STOPPING_ANSWER_SECONDS)
        try:
            return super().wait(gen, interval, bound)
        except _Stopped:
            self.pgconn.finish()  # half-way through the protocol, as below
            raise NoAnswer(
                f"no answer from the database within {STOPPING_ANSWER_SECONDS:g} s of the stop",
                STOPPING_ANSWER_SECONDS,
                stopping=True,
            ) from None
        except errors.OperationalError as exc:
            if type(exc).__name__ != "_WaitTimeout":  # psycopg's internal wait timeout
                raise
            # Half-way through the protocol: no later call could make sense of the connection,
            # and a cancel request would go to the same silent host.
            self.pgconn.finish()
            raise NoAnswer(
                f"no answer from the database within {bound:g} s", bound or 0.0
            ) from None


def connect_bounded(
    url: str,
    answer_timeout: float | None = None,
    stopping: threading.Event | None = None,
    **kwargs: Any,
) -> BoundedConnection:
    """A connection to `url` with tcp_bounds (`kwargs` win), whose calls wait at most
    `answer_timeout` seconds; connecting or waiting, STOPPING_ANSWER_SECONDS once `stopping` is
    set (psycopg.errors.ConnectionTimeout or NoAnswer)."""
    _connecting.stopping = stopping
    try:
        # libpq quotes a URL it cannot parse whole, password included: callers log the error
        # (the worker on every reconnect), and the service answers a 503 with its text.
        with redacted_errors():
            conn = BoundedConnection.connect(url, **{**tcp_bounds(url), **kwargs})
    except _Stopped:
        raise errors.ConnectionTimeout(
            f"no connection to the database within {STOPPING_ANSWER_SECONDS:g} s of the stop"
        ) from None
    finally:
        _connecting.stopping = None
    conn.answer_timeout, conn.stopping = answer_timeout, stopping
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
