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
