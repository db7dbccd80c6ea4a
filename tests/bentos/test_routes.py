"""The service's scoring routes in this process (no `bentoml serve`), over an ASGI transport."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from bentos.scoring import Scorer
from tests.bentos.conftest import FEATURES, KNOWN_USERS, train_booster


@pytest.fixture
def engine() -> Iterator[Any]:
    """bentos.service's ENGINE with a small real model and no feature store (restored after)."""
    from bentos.service import ENGINE

    saved = (ENGINE.scorer, ENGINE.features, ENGINE.token)
    ENGINE.scorer = Scorer(train_booster(), model_version="1", feature_names=FEATURES)
    ENGINE.features = None
    try:
        yield ENGINE
    finally:
        ENGINE.scorer, ENGINE.features, ENGINE.token = saved


def post_v2(body: dict[str, Any], token: str) -> int:
    """The status of POST /v2/score with `token`, served by the real V2 routes in process."""
    import httpx

    from bentos.service import V2

    async def call() -> int:
        transport = httpx.ASGITransport(app=V2)
        async with httpx.AsyncClient(transport=transport, base_url="http://scorer") as client:
            headers = {"authorization": f"Bearer {token}"}
            return (await client.post("/v2/score", json=body, headers=headers)).status_code

    return asyncio.run(call())


def test_a_token_set_with_a_trailing_newline_still_lets_its_holders_in(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token from a secret file or `echo` ends in a newline: the service compared requests with
    it, newline included, and answered every client 401 (no header can carry a newline)."""
    from bentos.service import api_token

    monkeypatch.setenv("PAYLATER_API_TOKEN", "s3cret\n")
    engine.token = api_token()
    body = {"amount_jpy": 5_000, "features": dict(KNOWN_USERS[1])}
    assert post_v2(body, "s3cret") == 200
    assert post_v2(body, "wrong") == 401
    monkeypatch.setenv("PAYLATER_API_TOKEN", " \n")  # blank: no token, as when unset
    assert api_token() is None


def test_a_feature_database_outage_is_logged_once_and_so_is_its_end(
    engine: Any,
    online_features: str,
    catalog: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every user_id request during a feature database outage logged "feature lookup failed"
    with a full traceback: thousands a second under load, burying everything else in the log.
    The outage is said once, with its cause, and so is its end; each request still gets its 503
    naming the cause."""
    import socket

    from bentos.scoring import CoalescingFeatureStore

    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        down = f"postgresql://127.0.0.1:{s.getsockname()[1]}/features"
    body = {"user_id": 1, "amount_jpy": 5_000}
    caplog.set_level("INFO", logger="paylater.serving")

    async def scenario() -> list[int]:
        engine.features = CoalescingFeatureStore(down, catalog.user_features)
        statuses = [await post(body) for _ in range(5)]
        engine.features = CoalescingFeatureStore(online_features, catalog.user_features)
        statuses += [await post(body) for _ in range(2)]
        await engine.features.close()
        return statuses

    assert asyncio.run(scenario()) == [503] * 5 + [200] * 2
    said = [r for r in caplog.records if r.name == "paylater.serving"]
    assert [r.levelname for r in said] == ["ERROR", "INFO"], [r.getMessage() for r in said]
    assert said[0].getMessage().startswith("feature lookup failed"), said[0].getMessage()
    assert "127.0.0.1" in said[0].getMessage()
    assert said[1].getMessage() == "feature lookups answer again"


async def post(body: dict[str, Any]) -> int:
    """The status of POST /v2/score, served by the real V2 routes in process (no token)."""
    import httpx

    from bentos.service import V2

    transport = httpx.ASGITransport(app=V2)
    async with httpx.AsyncClient(transport=transport, base_url="http://scorer") as client:
        return (await client.post("/v2/score", json=body)).status_code
