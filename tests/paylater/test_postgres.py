"""Connections the system makes to PostgreSQL are bounded unless the URL says otherwise."""

from __future__ import annotations

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
