"""Scoring shared by the HTTP service and the asynchronous worker: model, features, reason codes."""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple

from paylater.identifiers import check_identifier
from paylater.postgres import connect_bounded, tcp_bounds

if TYPE_CHECKING:
    import lightgbm as lgb
    import numpy as np
    import psycopg

MODEL_NAME = "paylater-default"
"""Registered model name in MLflow and model name in the BentoML model store."""

REQUEST_FEATURES = ("request_amount_jpy", "request_fee_jpy")
"""Features that come from the request itself; every other model feature is a user feature."""

DEFAULT_CUTOFF = 0.5
"""Decision cutoff when the model version carries none."""

N_REASON_CODES = 3

LOOKUP_TIMEOUT_SECONDS = 5.0
"""Longest wait for the online table's answer to the service's lookup. A database host gone
silent mid-query (a failover, a partition: no reset) would otherwise hold the query for the TCP
timeout, many minutes, and every request on the worker, sharing it, until BentoML's 504. On
expiry the coalescing lookup has psycopg try to cancel the query (up to about 10 s more), then
fails (503); the threaded FeatureStore closes its connection at once (paylater.postgres.NoAnswer)."""

# Readable codes for the features whose names alone would not tell an operator much.
_READABLE_CODES = {
    "request_amount_jpy": "REQUESTED_AMOUNT_HIGH",
    "request_fee_jpy": "REQUEST_FEE_HIGH",
}
ONLINE_TABLE = "user_features_latest"
"""The online feature table's default name (PAYLATER_ONLINE_FEATURES_TABLE names another)."""


def online_table_name(table: str) -> str:
    """`table`, checked to be a plain identifier (the publish creates it under that name)."""
    return check_identifier(table, "online table name (PAYLATER_ONLINE_FEATURES_TABLE)")


def feature_name(name: str) -> str:
    """`name`, checked to be a plain identifier, as the feature build checks the columns its
    layers select (tasks.features); any case: the publish and the lookups quote it."""
    return check_identifier(name, "feature name")


class Score(NamedTuple):
    """One scored request: probability of default, decision at the cutoff, model version, reasons."""

    default_probability: float
    decision: str  # 'approve' | 'decline'
    model_version: str
    reason_codes: list[str]


class UnknownUser(LookupError):
    """A user id with no row in user_features_latest."""

    def __init__(self, user_ids: Sequence[int]) -> None:
        self.user_ids = list(user_ids)
        super().__init__(f"no features for user_id {', '.join(map(str, self.user_ids))}")


class FeatureTableMismatch(LookupError):
    """The online table lacks columns the model needs, or is missing: a deployment mismatch (a
    model promoted before the feature build that publishes its features, or a table republished
    by a build for another model), no request's fault; it lasts until the table is fixed."""


def table_mismatch(
    table: str, columns: Iterable[str] | None, needed: Sequence[str]
) -> FeatureTableMismatch | None:
    """The mismatch of an online table with `columns` (None: there is no such table), if any."""
    if columns is None:
        return FeatureTableMismatch(
            f"{table} does not fit the model: there is no such table (publish the served model's"
            " features, or set PAYLATER_ONLINE_FEATURES_TABLE to the table holding them)"
        )
    present = set(columns)
    absent = [n for n in needed if n not in present]
    if not absent:
        return None
    return FeatureTableMismatch(
        f"{table} does not fit the model: it lacks the feature columns {', '.join(absent)}"
        " (publish the features of the served model version, or serve the version the table"
        " was built for)"
    )


def ask_again(exc: BaseException, conn: Any, reused: bool) -> bool:
    """Whether a failed lookup is worth one more try on a new connection: PostgreSQL refusing a
    statement prepared before the table was replaced with other columns ("cached plan must not
    change result type"), or a connection opened earlier found dead (the database restarted or
    failed over since: a new one most likely works). Not a call left without an answer: asking
    again would double the wait. The lookup only reads, so asking again is harmless."""
    import psycopg

    from paylater.postgres import NoAnswer

    if isinstance(exc, psycopg.errors.FeatureNotSupported):
        return "cached plan" in str(exc)
    return reused and bool(conn.broken) and not isinstance(exc, NoAnswer | TimeoutError)


def reason_code(feature_name: str) -> str:
    """The readable code of a feature pushing the score up."""
    return _READABLE_CODES.get(feature_name, feature_name.upper())


class Scorer:
    """A LightGBM Booster from the BentoML model store plus what scoring needs around it."""

    def __init__(
        self,
        booster: lgb.Booster,
        *,
        model_version: str,
        feature_names: Sequence[str],
        cutoff: float = DEFAULT_CUTOFF,
    ) -> None:
        self.booster = booster
        self.model_version = str(model_version)
        self.feature_names = _model_order(booster, feature_names)
        self.cutoff = float(cutoff)
        if not 0.0 <= self.cutoff <= 1.0:  # NaN fails this too
            # Every probability is below 20 (meant as 20 %) and none is >= NaN: approve-all.
            raise ValueError(
                f"decision cutoff {cutoff!r} is not a probability between 0 and 1"
                " (PAYLATER_SERVE_CUTOFF, or the version's tag `cutoff`)"
            )
        self.user_feature_names = [f for f in self.feature_names if f not in REQUEST_FEATURES]
        self.user_feature_set = frozenset(self.user_feature_names)
        self._reason_codes = [reason_code(f) for f in self.feature_names]
        # For a binary objective, sigmoid(sum of contributions) is the probability, so one
        # pred_contrib call gives both the score and its reasons (half the work of two calls).
        # The dumped objective reads like "binary sigmoid:1"; its scale enters the probability.
        objective = str(booster.dump_model(num_iteration=0).get("objective", ""))
        self._contrib_is_logit = objective.startswith("binary")
        scale = re.search(r"sigmoid:([0-9.eE+-]+)", objective)
        self._sigmoid = float(scale.group(1)) if scale else 1.0

    @classmethod
    def from_store(cls, tag: str, cutoff: float | None = None) -> Scorer:
        """Load `paylater-default:<version>` from the (current) BentoML model store."""
        import bentoml
        import bentoml.lightgbm

        model = bentoml.models.get(tag)
        booster = bentoml.lightgbm.load_model(model)
        meta: dict[str, Any] = dict(model.info.metadata)
        return cls(
            booster,
            model_version=str(meta.get("registry_version", model.tag.version)),
            feature_names=list(meta.get("feature_names") or booster.feature_name()),
            cutoff=float(cutoff if cutoff is not None else meta.get("cutoff", DEFAULT_CUTOFF)),
        )

    @classmethod
    def load(
        cls, stage: str | None = None, version: str | None = None, cutoff: float | None = None
    ) -> Scorer:
        """Load the registry version named by `version` or `stage` (default production); import it if missing."""
        from bentos.build import ensure_imported

        tag = ensure_imported(version or stage or "production")
        return cls.from_store(tag, cutoff=cutoff)

    def request_row(
        self, amount_jpy: int, user_features: Mapping[str, float | None]
    ) -> dict[str, float | None]:
        """The model row of one request: its amount and fee plus the user's features."""
        from paylater.product import fee_for

        row: dict[str, float | None] = {
            "request_amount_jpy": float(amount_jpy),
            "request_fee_jpy": float(fee_for(amount_jpy)),
        }
        for name in self.user_feature_names:
            row[name] = user_features.get(name)
        return row

    def missing_features(self, row: Mapping[str, Any]) -> list[str]:
        """Model features absent from `row` (None counts as present: it means NULL)."""
        return [f for f in self.feature_names if f not in row]

    def matrix(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """A float64 matrix in model feature order; None becomes NaN (LightGBM's missing value)."""
        import numpy as np

        nan = math.nan
        names = self.feature_names
        for row in rows:
            missing = self.missing_features(row)
            if missing:
                raise ValueError(f"row lacks model features: {', '.join(missing)}")
        flat = [nan if (v := row[f]) is None else v for row in rows for f in names]
        return np.asarray(flat, dtype=np.float64).reshape(len(rows), len(names))

    def score_matrix(self, x: np.ndarray) -> tuple[np.ndarray, list[list[str]]]:
        """Probabilities and reason codes for every row of `x` (one thread: servers own the cores)."""
        import numpy as np

        contrib = np.asarray(self.booster.predict(x, pred_contrib=True, num_threads=1))
        if self._contrib_is_logit:
            proba = 1.0 / (1.0 + np.exp(-self._sigmoid * contrib.sum(axis=1)))
        else:
            proba = np.asarray(self.booster.predict(x, num_threads=1))
        per_feature = contrib[:, :-1]  # the last column is the bias
        top = np.argsort(-per_feature, axis=1)[:, :N_REASON_CODES]
        codes = self._reason_codes
        reasons = [
            [codes[j] for j in top_row if per_feature[i, j] > 0] for i, top_row in enumerate(top)
        ]
        return proba, reasons

    def score_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[Score]:
        """Score model rows (dicts keyed by feature name; extra keys are ignored)."""
        if not rows:
            return []
        proba, reasons = self.score_matrix(self.matrix(rows))
        return [
            Score(p, "decline" if p >= self.cutoff else "approve", self.model_version, r)
            for p, r in zip(proba.tolist(), reasons, strict=True)
        ]


def _model_order(booster: lgb.Booster, feature_names: Sequence[str]) -> list[str]:
    """The features in the column order the model was trained on: the matrix is built in this
    order, so a list naming them in another order would feed each value to another feature."""
    names = list(feature_names)
    trained = list(booster.feature_name())
    if trained == names or all(re.fullmatch(r"Column_[0-9]+", n) for n in trained):
        return names  # the same, or a model trained without names: the list is all there is
    if sorted(trained) == sorted(names):
        return trained
    missing = [n for n in trained if n not in names]
    unknown = [n for n in names if n not in trained]
    raise ValueError(
        f"feature_names do not match the model's features: the model has {missing or 'no others'}"
        f" not listed, the list has {unknown or 'no others'} the model lacks"
    )


class FeatureStore:
    """Looks users up in the online table (`user_features_latest`), one connection per process."""

    def __init__(
        self, pg_url: str, feature_names: Iterable[str] | None = None, table: str = ONLINE_TABLE
    ) -> None:
        self.pg_url = pg_url
        self.table = online_table_name(table)
        self.feature_names = (
            [feature_name(n) for n in feature_names] if feature_names is not None else None
        )
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        text = resources.files("bentos").joinpath("sql/user_features_lookup.sql").read_text()
        # Plain text, quoted here (the name is a checked identifier): a composed query would be
        # rendered again on every lookup, on the service's hot path.
        self._sql = text.replace("{table}", f'"{self.table}"')
        self._fitting: tuple[str, ...] | None = None  # the last column list found to fit

    def fit(self, columns: Sequence[str] | None) -> None:
        """Raise FeatureTableMismatch unless a table with `columns` (None: none) has every
        feature. Every lookup's answer is checked, an empty one too: an unknown user in a table
        missing a column would be answered 404, as if the table were fine."""
        if columns is not None and tuple(columns) == self._fitting:
            return  # the same columns as last time: the usual case, and a cheap comparison
        names = self.feature_names or []
        mismatch = table_mismatch(self.table, columns, names)
        if mismatch is not None:
            raise mismatch
        self._fitting = tuple(columns or ())

    def check(self) -> None:
        """Raise FeatureTableMismatch unless the online table has every feature column."""
        self.lookup([])

    def _connection(self) -> psycopg.Connection[Any]:
        """The open connection, reopened after a failure or server restart."""
        from psycopg.rows import dict_row

        if self._conn is None or self._conn.closed:
            # Bounded calls: a host gone silent mid-query fails the lookup, not holds it for good.
            self._conn = connect_bounded(
                self.pg_url, LOOKUP_TIMEOUT_SECONDS, autocommit=True, row_factory=dict_row
            )
        return self._conn

    def lookup(self, user_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Feature rows by user id for those users that have one (absent ids are simply missing);
        FeatureTableMismatch when the table lacks a feature column."""
        import psycopg

        with self._lock:
            for retry in (True, False):
                reused = self._conn is not None and not self._conn.closed
                conn = self._connection()
                try:
                    cursor = conn.execute(self._sql, {"user_ids": list(user_ids)})
                    rows = cursor.fetchall()
                    break
                except Exception as exc:
                    again = retry and ask_again(exc, conn, reused)
                    # A broken connection must not poison every later request: reopen next time.
                    conn.close()
                    self._conn = None
                    if isinstance(exc, psycopg.errors.UndefinedTable):
                        self.fit(None)
                    if not again:
                        raise
        self.fit([c.name for c in cursor.description or ()])
        return {int(r["user_id"]): self._features_of(r) for r in rows}

    def _features_of(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The row's feature columns as floats or None."""
        names = self.feature_names
        if names is None:
            names = [k for k in row if k not in ("user_id", "as_of", "updated_at")]
        absent = [n for n in names if n not in row]
        if absent:
            raise ValueError(f"{self.table} lacks feature columns: {', '.join(absent)}")
        return {n: (None if (v := row[n]) is None else float(v)) for n in names}

    def get(self, user_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Like lookup, but raises UnknownUser naming every id without a row."""
        found = self.lookup(user_ids)
        missing = [u for u in user_ids if u not in found]
        if missing:
            raise UnknownUser(missing)
        return found

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class SqliteFeatureStore:
    """The online table in the embedded SQLite source (demo and development): same answers, no server.

    The HTTP service awaits `lookup`; each lookup runs on a thread with its own short connection,
    since sqlite3 connections must not cross threads and the file may be replaced by a publish.
    """

    def __init__(
        self, sqlite_path: str, feature_names: Iterable[str], table: str = ONLINE_TABLE
    ) -> None:
        self.path = sqlite_path
        self._rows = FeatureStore("", feature_names, table)  # validated names and row mapping

    def _query(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """One query for `ids` on a fresh read-only connection."""
        import sqlite3

        marks = ",".join("?" * len(ids))
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as conn:
            conn.row_factory = sqlite3.Row
            try:
                cursor = conn.execute(
                    f'SELECT * FROM "{self._rows.table}" WHERE user_id IN ({marks})', ids
                )
            except sqlite3.OperationalError as exc:
                if str(exc).startswith("no such table"):
                    self._rows.fit(None)
                raise
            rows = cursor.fetchall()
            self._rows.fit([c[0] for c in cursor.description or ()])
        return {int(r["user_id"]): self._rows._features_of(dict(r)) for r in rows}

    async def lookup(self, user_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Feature rows by user id for those users that have one."""
        import asyncio

        ids = [int(u) for u in dict.fromkeys(user_ids)]
        return await asyncio.to_thread(self._query, ids)

    async def check(self) -> None:
        """Raise FeatureTableMismatch unless the online table has every feature column."""
        await self.lookup([])

    async def close(self) -> None:
        """Nothing held open."""


class CoalescingFeatureStore:
    """Async lookups for the HTTP service: requests arriving while a query is in flight share the next one.

    One query at a time per worker, over one async connection: at low load every request gets its
    own query at once (no batching delay); under load a round trip serves many requests, and the
    event loop keeps parsing and scoring meanwhile instead of blocking on the socket.
    """

    def __init__(
        self, pg_url: str, feature_names: Iterable[str], table: str = ONLINE_TABLE
    ) -> None:
        self._rows = FeatureStore(pg_url, feature_names, table)  # names, SQL and row mapping
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._waiting: list[tuple[Sequence[int], Any]] = []
        self._busy = False

    async def lookup(self, user_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Feature rows by user id for those users that have one."""
        import asyncio

        future = asyncio.get_running_loop().create_future()
        self._waiting.append((user_ids, future))
        if not self._busy:
            self._busy = True
            asyncio.get_running_loop().create_task(self._drain())
        result: dict[int, dict[str, Any]] = await future
        return result

    async def _drain(self) -> None:
        """Answer every waiting lookup, one query per round, until none wait."""
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                ids = list({u for user_ids, _ in batch for u in user_ids})
                try:
                    found = await self._query(ids)
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for user_ids, future in batch:
                    if not future.done():
                        future.set_result({u: found[u] for u in user_ids if u in found})
        finally:
            self._busy = False

    async def _query(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        """One round trip for `ids`, reconnecting after a broken connection; TimeoutError after
        LOOKUP_TIMEOUT_SECONDS without an answer."""
        import asyncio

        import psycopg
        from psycopg.rows import dict_row

        for retry in (True, False):
            reused = self._conn is not None and not self._conn.closed
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(
                    self._rows.pg_url,
                    autocommit=True,
                    row_factory=dict_row,
                    **tcp_bounds(self._rows.pg_url),
                )
            conn = self._conn
            try:
                async with asyncio.timeout(LOOKUP_TIMEOUT_SECONDS):
                    cursor = await conn.execute(self._rows._sql, {"user_ids": ids})
                    rows = await cursor.fetchall()
                break
            except Exception as exc:
                again = retry and ask_again(exc, conn, reused)
                await conn.close()
                self._conn = None
                if isinstance(exc, TimeoutError):
                    raise TimeoutError(
                        f"no answer from the feature database in {LOOKUP_TIMEOUT_SECONDS:g} s"
                    ) from None
                if isinstance(exc, psycopg.errors.UndefinedTable):
                    self._rows.fit(None)
                if not again:
                    raise
        self._rows.fit([c.name for c in cursor.description or ()])
        return {int(r["user_id"]): self._rows._features_of(r) for r in rows}

    async def check(self) -> None:
        """Raise FeatureTableMismatch unless the online table has every feature column (one
        round trip, shared with the lookups waiting then)."""
        await self.lookup([])

    async def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
