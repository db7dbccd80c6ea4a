"""Scorer and FeatureStore against a real model store, registry and PostgreSQL."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bentos.scoring import FeatureStore, Scorer, UnknownUser, reason_code


@pytest.fixture(scope="module")
def scorer(serving_env: dict[str, str]) -> Scorer:
    """The production version, imported from the registry on first load."""
    return Scorer.load(stage="production")


def test_load_resolves_alias_and_carries_metadata(
    scorer: Scorer, serving_env: dict[str, str], catalog: SimpleNamespace
) -> None:
    assert scorer.model_version == serving_env["production_version"]
    assert scorer.feature_names == catalog.features
    assert scorer.cutoff == pytest.approx(0.4)
    staging = Scorer.load(stage="staging")
    assert staging.model_version == serving_env["staging_version"]


def test_probability_equals_native_predict(scorer: Scorer, catalog: SimpleNamespace) -> None:
    users = catalog.users
    rows = [scorer.request_row(a, users[u]) for u in users for a in (1_000, 50_000, 100_000)]
    scores = scorer.score_rows(rows)
    expected = scorer.booster.predict(scorer.matrix(rows))
    for score, p in zip(scores, expected, strict=True):
        assert score.default_probability == pytest.approx(p, abs=1e-9)
        assert score.decision == ("decline" if p >= 0.4 else "approve")
        assert score.model_version == scorer.model_version
        assert len(score.reason_codes) <= 3


def test_reason_codes_name_features_pushing_up(scorer: Scorer, catalog: SimpleNamespace) -> None:
    FEATURES = catalog.features
    risky = scorer.request_row(100_000, catalog.users[2])
    (score,) = scorer.score_rows([risky])
    assert score.reason_codes, "a high-risk request must carry reasons"
    x = scorer.matrix([risky])
    contrib = scorer.booster.predict(x, pred_contrib=True)[0][:-1]
    top = max(range(len(FEATURES)), key=lambda j: contrib[j])
    assert score.reason_codes[0] == reason_code(FEATURES[top])


def test_missing_feature_is_an_error_and_none_is_nan(
    scorer: Scorer, catalog: SimpleNamespace
) -> None:
    row = scorer.request_row(5_000, catalog.users[3])
    assert math.isnan(scorer.matrix([row])[0][catalog.features.index("topups_30d")])
    del row["card_spend_30d_jpy"]
    with pytest.raises(ValueError, match="card_spend_30d_jpy"):
        scorer.score_rows([row])


def test_feature_store_lookup(
    online_features: str, scorer: Scorer, catalog: SimpleNamespace
) -> None:
    store = FeatureStore(online_features, scorer.user_feature_names)
    found = store.lookup([1, 3, 99])
    assert set(found) == {1, 3}
    assert found[3]["topups_30d"] is None
    assert found[1] == catalog.users[1]
    with pytest.raises(UnknownUser, match="99"):
        store.get([1, 99])
    store.close()


def test_serve_stage_picks_the_alias(
    serving_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bentos.service import _load_scorer

    monkeypatch.setenv("PAYLATER_SERVE_STAGE", "staging")
    assert _load_scorer().model_version == serving_env["staging_version"]
    monkeypatch.setenv("PAYLATER_SERVE_STAGE", "production")
    assert _load_scorer().model_version == serving_env["production_version"]


@pytest.mark.parametrize("cutoff", ["20", "nan", "-0.1", "inf"])
def test_a_cutoff_that_is_not_a_probability_is_refused_at_load(
    serving_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, cutoff: str
) -> None:
    """PAYLATER_SERVE_CUTOFF=20 (meant as 20 %) or nan loaded, and the service then approved
    every request (no probability reaches 20; none is >= nan) without a word."""
    from bentos.service import _load_scorer

    monkeypatch.setenv("PAYLATER_SERVE_CUTOFF", cutoff)
    with pytest.raises(ValueError, match=r"cutoff .* is not a probability between 0 and 1"):
        _load_scorer()
    monkeypatch.setenv("PAYLATER_SERVE_CUTOFF", "0")  # decline everything: a deliberate choice
    assert _load_scorer().cutoff == 0.0


def test_field_names_read_like_client_paths() -> None:
    from bentos.service import _field_name

    assert _field_name(("amount_jpy",)) == "amount_jpy"
    assert _field_name((3, "features", "x")) == "[3].features.x"
    assert _field_name(()) == "body"


async def _lookup_concurrently(url: str) -> list[dict[int, dict[str, float | None]]]:
    """Many lookups at once through one coalescing store."""
    import asyncio

    from bentos.scoring import CoalescingFeatureStore

    store = CoalescingFeatureStore(url, ["days_since_signup", "topups_30d"])
    try:
        return await asyncio.gather(*(store.lookup([u]) for u in (1, 2, 3, 99, 1)))
    finally:
        await store.close()


def test_coalescing_lookup_answers_each_caller(online_features: str) -> None:
    import asyncio

    results = asyncio.run(_lookup_concurrently(online_features))
    assert [sorted(r) for r in results] == [[1], [2], [3], [], [1]]
    assert results[2][3] == {"days_since_signup": 90.0, "topups_30d": None}


def test_sqlite_feature_store_answers_like_the_online_table(tmp_path: Path) -> None:
    """The embedded default (SQLite source) serves user_id lookups too."""
    import asyncio
    import sqlite3

    from bentos.scoring import SqliteFeatureStore

    path = tmp_path / "source.db"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE user_features_latest (user_id INTEGER PRIMARY KEY, as_of TEXT, "
            "card_count_7d REAL, dc_count REAL, updated_at TEXT)"
        )
        conn.executemany(
            "INSERT INTO user_features_latest VALUES (?, '2026-11-26', ?, ?, '2026-11-27')",
            [(1, 3.0, None), (2, 0.0, 2.0)],
        )
    store = SqliteFeatureStore(str(path), ["card_count_7d", "dc_count"])
    found = asyncio.run(store.lookup([2, 1, 99, 2]))
    assert found == {
        1: {"card_count_7d": 3.0, "dc_count": None},
        2: {"card_count_7d": 0.0, "dc_count": 2.0},
    }
    assert asyncio.run(store.lookup([])) == {}


def test_a_feature_database_that_never_answers_fails_the_lookup_in_seconds(
    silent_postgres: str,
) -> None:
    """Both lookups the service uses (threaded and coalescing) give up after connect_timeout, so
    a request gets its 503 instead of holding a worker thread for good."""
    import asyncio
    import time

    import psycopg

    from bentos.scoring import CoalescingFeatureStore

    async def both() -> list[Any]:
        """Both lookups at once (each waits out the 2 s connect_timeout): their outcomes."""
        threaded = asyncio.to_thread(FeatureStore(silent_postgres, ["topups_30d"]).lookup, [1])
        coalescing = CoalescingFeatureStore(silent_postgres, ["topups_30d"]).lookup([1])
        return await asyncio.gather(threaded, coalescing, return_exceptions=True)

    started = time.monotonic()
    outcomes = asyncio.run(both())
    assert time.monotonic() - started < 25
    for outcome in outcomes:
        assert isinstance(outcome, psycopg.OperationalError), outcome
        assert "timeout" in str(outcome), outcome


def test_feature_names_listed_out_of_the_models_order_score_like_the_model() -> None:
    """The version's feature_names tag is the column order of the matrix the model is fed: a tag
    listing the same features in another order (sorted, say) fed each value to another feature's
    splits, and every score was silently wrong. The model's own order is used; names the model
    does not have are refused at load."""
    from tests.bentos.conftest import FEATURES, KNOWN_USERS, train_booster

    booster = train_booster()
    right = Scorer(booster, model_version="1", feature_names=FEATURES)
    shuffled = Scorer(booster, model_version="1", feature_names=sorted(FEATURES))
    assert shuffled.feature_names == FEATURES
    rows = [right.request_row(a, u) for u in KNOWN_USERS.values() for a in (1_000, 90_000)]
    assert shuffled.score_rows(rows) == right.score_rows(rows)
    with pytest.raises(ValueError, match="late_repayments_365d"):
        Scorer(booster, model_version="1", feature_names=[*FEATURES[:-1], "late_ratio"])


class FreezingProxy:
    """A TCP proxy to PostgreSQL that can stop forwarding while keeping every connection open:
    a database host gone silent mid-query (a network partition), not refusing. A connection made
    while frozen is frozen too, so psycopg's cancel request after a lookup's timeout hangs as it
    would in a partition, and the test also covers psycopg's own bound on it (the service's
    lookup must still fail, not hang)."""

    def __init__(self, host: str, port: int) -> None:
        import socket
        import threading

        self.target = (host, port)
        self.frozen = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        """Stop forwarding on every connection, open now or made meanwhile (each stays open)."""
        self.frozen.set()

    def thaw(self) -> None:
        """Forward again on every connection."""
        self.frozen.clear()

    def _accept(self) -> None:
        """Pair each client with an upstream connection, pumped both ways."""
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: Any, dst: Any) -> None:
        """Copy bytes, holding them while frozen; the end of either side ends both."""
        import contextlib
        import socket
        import time

        try:
            while data := src.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.02)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                # shutdown, not only close: the other direction's thread is blocked in recv on
                # these sockets, which keeps them open (no FIN sent) until it returns.
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        """Stop accepting."""
        self.listener.close()


def test_a_feature_database_gone_silent_mid_query_fails_the_lookup_and_recovers(
    online_features: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service's lookups share one query at a time per worker: a database that stopped
    answering mid-query (its host gone, no reset) held that query for the TCP timeout, minutes,
    and every request on the worker waited behind it until BentoML answered 504. The lookup now
    gives up after LOOKUP_TIMEOUT_SECONDS (a 503), and the next one reconnects."""
    import asyncio
    from urllib.parse import urlsplit

    from bentos import scoring
    from bentos.scoring import CoalescingFeatureStore

    monkeypatch.setattr(scoring, "LOOKUP_TIMEOUT_SECONDS", 0.5)
    parts = urlsplit(online_features)
    proxy = FreezingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    proxied = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}")
    names = ["days_since_signup", "topups_30d"]

    async def scenario() -> None:
        store = CoalescingFeatureStore(proxied.geturl(), names)
        assert sorted(await store.lookup([1, 2])) == [1, 2]
        proxy.freeze()
        # The outer bound only keeps a failing test from hanging: its TimeoutError has no text.
        with pytest.raises(TimeoutError, match="feature database"):
            await asyncio.wait_for(store.lookup([1]), 60)
        proxy.thaw()
        assert sorted(await store.lookup([3])) == [3]
        await store.close()

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()


def test_an_online_table_of_another_name_is_read_where_the_build_publishes_it(
    pg_url: str, tmp_path: Path, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PAYLATER_ONLINE_FEATURES_TABLE names the table the feature build publishes to; the service
    (and the in-process worker, tests/worker) read that one. They read user_features_latest
    whatever it said, so with another name they scored with features no build refreshed."""
    import asyncio
    from datetime import date

    import pyarrow as pa

    from bentos.scoring import CoalescingFeatureStore, SqliteFeatureStore
    from bentos.service import _feature_store
    from tasks.online import publish_user_features

    monkeypatch.setenv("PAYLATER_ONLINE_FEATURES_TABLE", "risk_features")
    rows = pa.table(
        {
            "user_id": pa.array([1, 2], pa.int64()),
            "as_of": pa.array([date(2026, 11, 26)] * 2, pa.date32()),
            "topups_30d": pa.array([4.0, None], pa.float64()),
        }
    )
    sqlite_url = f"sqlite:///{tmp_path / 'source.db'}"
    for url in (pg_url, sqlite_url):
        publish_user_features(rows, url)
    want = {1: {"topups_30d": 4.0}, 2: {"topups_30d": None}}
    assert FeatureStore(pg_url, ["topups_30d"], "risk_features").lookup([1, 2, 3]) == want
    coalescing = CoalescingFeatureStore(pg_url, ["topups_30d"], "risk_features")
    assert asyncio.run(coalescing.lookup([1, 2])) == want
    sqlite = SqliteFeatureStore(str(tmp_path / "source.db"), ["topups_30d"], "risk_features")
    assert asyncio.run(sqlite.lookup([1, 2])) == want

    for url in (pg_url, sqlite_url):
        monkeypatch.setenv("PAYLATER_SOURCE_URL", url)
        store = _feature_store(["topups_30d"])
        assert store is not None and asyncio.run(store.lookup([1, 2])) == want
    with pytest.raises(ValueError, match=r"online table name .* is not a plain SQL identifier"):
        FeatureStore(pg_url, ["topups_30d"], "risk features; DROP TABLE x")


def test_features_named_in_mixed_case_are_served_as_the_build_publishes_them(
    pg_url: str, tmp_path: Path, paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The feature build takes any plain identifier as a feature (AvgSpend_7d) and publishes it
    quoted, its case kept; the service refused every name with an upper-case letter, so a model
    trained on such a feature could not be served. A name ending in a newline passed."""
    import asyncio
    import re
    from datetime import date

    import pyarrow as pa

    from bentos.scoring import CoalescingFeatureStore, SqliteFeatureStore
    from tasks.online import publish_user_features

    monkeypatch.setenv("PAYLATER_ONLINE_FEATURES_TABLE", "risk_features")
    rows = pa.table(
        {
            "user_id": pa.array([1, 2], pa.int64()),
            "as_of": pa.array([date(2026, 11, 26)] * 2, pa.date32()),
            "AvgSpend_7d": pa.array([4.0, None], pa.float64()),
        }
    )
    sqlite_path = tmp_path / "source.db"
    for url in (pg_url, f"sqlite:///{sqlite_path}"):
        publish_user_features(rows, url)
    want = {1: {"AvgSpend_7d": 4.0}, 2: {"AvgSpend_7d": None}}
    names = ["AvgSpend_7d"]
    assert FeatureStore(pg_url, names, "risk_features").lookup([1, 2, 3]) == want
    coalescing = CoalescingFeatureStore(pg_url, names, "risk_features")
    assert asyncio.run(coalescing.lookup([1, 2])) == want
    sqlite = SqliteFeatureStore(str(sqlite_path), names, "risk_features")
    assert asyncio.run(sqlite.lookup([1, 2])) == want
    with pytest.raises(ValueError, match=re.escape("feature name 'AvgSpend_7d\\n' is not a")):
        FeatureStore(pg_url, ["AvgSpend_7d\n"], "risk_features")
    with pytest.raises(
        ValueError,
        match=re.escape("online table name (PAYLATER_ONLINE_FEATURES_TABLE) 'risk_features\\n'"),
    ):
        FeatureStore(pg_url, names, "risk_features\n")


@pytest.mark.timeout(120)
def test_the_threaded_lookup_gone_silent_mid_query_fails_and_recovers(
    online_features: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FeatureStore's calls were unbounded: a host gone silent held its lookup (and every caller
    behind its lock) for good. Now the call gives up after LOOKUP_TIMEOUT_SECONDS and the next
    lookup reconnects; its connections carry TCP keepalives and a tcp_user_timeout too."""
    from urllib.parse import urlsplit

    from bentos import scoring
    from paylater.postgres import NoAnswer

    monkeypatch.setattr(scoring, "LOOKUP_TIMEOUT_SECONDS", 0.5)
    parts = urlsplit(online_features)
    proxy = FreezingProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    proxied = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}")
    store = FeatureStore(proxied.geturl(), ["days_since_signup", "topups_30d"])
    try:
        assert sorted(store.lookup([1, 2])) == [1, 2]
        options = {o.keyword.decode(): o.val for o in store._connection().pgconn.info}
        assert options["keepalives_idle"] == b"30" and options["tcp_user_timeout"] == b"30000"
        proxy.freeze()
        with pytest.raises(NoAnswer, match="no answer from the database"):
            store.lookup([1])
        proxy.thaw()
        assert sorted(store.lookup([3])) == [3]
    finally:
        store.close()
        proxy.close()


def _terminate_connections(url: str) -> int:
    """What a database restart or failover does to the service's connections: close them."""
    import psycopg

    db = url.rpartition("/")[2]
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            [db],
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_database_restart_between_lookups_costs_no_failed_request(
    online_features: str, catalog: SimpleNamespace
) -> None:
    """After a database restart (or failover) the next lookup of every service worker failed
    503 "terminating connection due to administrator command" on its dead connection: a failed
    score per worker per restart. A lookup found broken on a connection that was open before
    is asked once more on a new one (a read: asking again is harmless)."""
    import asyncio

    from bentos.scoring import CoalescingFeatureStore

    async def scenario() -> tuple[dict[int, Any], dict[int, Any]]:
        store = CoalescingFeatureStore(online_features, catalog.user_features)
        try:
            before = await store.lookup([1])
            assert _terminate_connections(online_features) == 1
            return before, await store.lookup([1, 2])
        finally:
            await store.close()

    before, after = asyncio.run(scenario())
    assert before == {1: catalog.users[1]}
    assert after == {1: catalog.users[1], 2: catalog.users[2]}

    threaded = FeatureStore(online_features, catalog.user_features)
    assert threaded.lookup([1]) == {1: catalog.users[1]}
    assert _terminate_connections(online_features) == 1
    assert threaded.lookup([2]) == {2: catalog.users[2]}
    threaded.close()


def test_the_sqlite_online_table_is_checked_for_the_model_columns_too(tmp_path: Path) -> None:
    """The demo's embedded source: the readiness check and the lookups name a missing table or
    missing columns, as on PostgreSQL, and pass once the table fits."""
    import asyncio
    import sqlite3

    from bentos.scoring import FeatureTableMismatch, SqliteFeatureStore

    path = tmp_path / "source.db"
    sqlite3.connect(path).close()
    store = SqliteFeatureStore(str(path), ["card_count_7d", "dc_count"])
    with pytest.raises(FeatureTableMismatch, match="no such table"):
        asyncio.run(store.check())
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE user_features_latest (user_id INTEGER, card_count_7d REAL)")
    for call in (store.check(), store.lookup([1])):
        with pytest.raises(FeatureTableMismatch, match="lacks the feature columns dc_count"):
            asyncio.run(call)
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE user_features_latest ADD COLUMN dc_count REAL")
    asyncio.run(store.check())
