"""Connections the system makes to PostgreSQL are bounded unless the URL says otherwise."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from paylater import postgres
from paylater.postgres import connect_timeout


def test_a_url_without_its_own_timeout_gets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert connect_timeout("postgresql://u@h/db") == {"connect_timeout": 10}
    monkeypatch.setattr(postgres, "CONNECT_TIMEOUT_SECONDS", 3)
    assert connect_timeout("postgresql://u@h/db") == {"connect_timeout": 3}


def test_the_url_s_own_timeout_wins() -> None:
    assert connect_timeout("postgresql://u@h/db?connect_timeout=30") == {}
    assert connect_timeout("host=h dbname=db connect_timeout=30") == {}


def test_a_uri_only_client_gets_the_timeout_in_the_uri() -> None:
    from paylater.postgres import bounded_url

    assert bounded_url("postgresql://u@h/db") == "postgresql://u@h/db?connect_timeout=10"
    assert bounded_url("postgresql://u@h/db?sslmode=require") == (
        "postgresql://u@h/db?sslmode=require&connect_timeout=10"
    )
    assert bounded_url("postgresql://u@h/db?connect_timeout=3") == (
        "postgresql://u@h/db?connect_timeout=3"
    )


def test_connections_carry_keepalives_and_a_tcp_user_timeout_unless_the_url_sets_them() -> None:
    from paylater.postgres import tcp_bounds

    assert tcp_bounds("postgresql://u@h/db") == {
        "connect_timeout": 10,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": 30_000,
    }
    own = tcp_bounds("postgresql://u@h/db?keepalives_idle=5&tcp_user_timeout=9000")
    assert "keepalives_idle" not in own and "tcp_user_timeout" not in own
    assert own["keepalives_count"] == 3
    assert "tcp_user_timeout" not in tcp_bounds("host=h dbname=db tcp_user_timeout=1000")


def _options(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """The libpq connection options a live connection was opened with."""
    return {o.keyword.decode(): (o.val or b"").decode() for o in conn.pgconn.info}


def test_a_bounded_connection_is_opened_with_the_tcp_bounds(pg_url: str) -> None:
    from paylater.postgres import connect_bounded

    with connect_bounded(pg_url, 5.0) as conn:
        options = _options(conn)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert options["keepalives_idle"] == "30" and options["tcp_user_timeout"] == "30000"


def test_a_call_past_its_bound_fails_and_closes_the_connection(pg_url: str) -> None:
    """The bound is psycopg's own wait timeout: the call gives up without the server's help (a
    silent host would answer no cancel either), and the half-used connection is closed."""
    import psycopg

    from paylater.postgres import NoAnswer, connect_bounded

    with connect_bounded(pg_url, 0.5, autocommit=True) as conn:
        assert conn.execute("SELECT pg_sleep(0.05)").fetchone() == ("",)
        with pytest.raises(NoAnswer, match=r"no answer from the database within 0\.5 s"):
            conn.execute("SELECT pg_sleep(30)")
        assert conn.closed
    assert issubclass(NoAnswer, psycopg.OperationalError)  # handled as a database gone away


@pytest.mark.timeout(60)
def test_a_stop_cuts_a_waiting_call_short_and_spares_an_answered_one(pg_url: str) -> None:
    """A call already waiting when its process was told to stop waited out its whole bound (30 s
    for the worker), more than a shutdown grace period. Once `stopping` is set it now waits at
    most STOPPING_ANSWER_SECONDS more; a call the server answers is not cut."""
    import threading

    from paylater.postgres import STOPPING_ANSWER_SECONDS, NoAnswer, connect_bounded

    stopping = threading.Event()
    with connect_bounded(pg_url, 600.0, stopping, autocommit=True) as conn:
        assert conn.execute("SELECT pg_sleep(0.2)").fetchone() == ("",)
        threading.Timer(0.5, stopping.set).start()
        with pytest.raises(NoAnswer, match=r"within 3 s of the stop") as raised:
            conn.execute("SELECT pg_sleep(600)")  # pytest's timeout fails the test long before
        assert raised.value.stopping and raised.value.bound == STOPPING_ANSWER_SECONDS
        assert conn.closed
    with connect_bounded(pg_url, 600.0, stopping, autocommit=True) as conn:
        # Already stopping: a call answered within the grace is answered.
        assert conn.execute("SELECT pg_sleep(1), 7").fetchone() == ("", 7)


@pytest.mark.timeout(60)
def test_a_stop_cuts_a_connection_attempt_to_a_silent_host_short(pg_url: str) -> None:
    """A reconnect waiting on a host that accepts TCP and answers nothing (what an outage's
    reconnects meet) waited out its connect_timeout whatever a stop said."""
    import socket
    import threading
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    from paylater.postgres import connect_bounded

    silent = socket.create_server(("127.0.0.1", 0))  # the kernel completes the handshake
    parts = urlsplit(pg_url)
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{silent.getsockname()[1]}"
    url = urlunsplit(parts._replace(netloc=netloc, query="connect_timeout=600"))
    stopping = threading.Event()
    threading.Timer(0.5, stopping.set).start()
    try:
        with pytest.raises(psycopg.errors.ConnectionTimeout, match=r"within 3 s of the stop"):
            connect_bounded(url, 600.0, stopping)  # pytest's timeout fails the test long before
    finally:
        silent.close()


def test_a_url_libpq_cannot_parse_is_refused_without_its_password() -> None:
    """Every bounded connection (worker, metrics, the service's feature lookups, whose error text
    a 503 answer carries) is refused naming libpq's reason, never the URL's password."""
    import traceback

    url = "postgresql://app:Wr0ngSecret@[::1]x/db"  # a name: tracebacks quote source lines
    with pytest.raises(psycopg.ProgrammingError, match="unexpected character") as caught:
        postgres.connect_bounded(url, 5.0)
    printed = "".join(traceback.format_exception(caught.value))
    assert "Wr0ngSecret" not in printed and "app:***@[::1]x/db" in printed, printed
