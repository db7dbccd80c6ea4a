"""Point-in-time features in warehouse SQL: training rows (matured charges) and scoring rows (active users).

The SQL lives in .sql files (BigQuery Standard SQL): two request populations, a label query and
feature layers `NN_name.sql`, each returning one row per `request_id` from a `requests` relation.
This module assembles them into one query per dataset, so training and scoring share every line.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as pc
import sqlglot
from sqlglot import exp
from sqlglot.tokens import TokenType

from paylater.identifiers import RULE, is_identifier
from paylater.product import GRACE_DAYS
from paylater.settings import Settings, get_settings
from tasks.warehouse.base import Warehouse

LOGICAL_TABLES = ("users", "card_transactions", "topups", "deferred_charges", "app_events")
"""The source tables the feature SQL names; settings.feature_tables maps them to real tables."""

TRAINING_HEAD = ("charge_id", "user_id", "requested_at", "request_date")
REQUEST_FEATURES = ("request_amount_jpy", "request_fee_jpy")
SCORING_HEAD = ("user_id", "as_of")
DATASET_COLUMNS = (*TRAINING_HEAD, *SCORING_HEAD, "label_default", *REQUEST_FEATURES)
"""Columns the datasets carry besides the layers' features: no layer may select them."""

_LAYER_FILE = re.compile(r"^(\d+)_([a-z0-9_]+)\.sql$")
_LAYER_LIKE = re.compile(r"^\d+_")
# A warehouse table: table, dataset.table or project.dataset.table (project ids allow hyphens).
_TABLE_REF = re.compile(r"^([A-Za-z0-9_-]+\.){0,2}[A-Za-z_][A-Za-z0-9_]*$")


class FeatureSqlError(ValueError):
    """The feature SQL folder, a layer or the table mapping is unusable."""


@dataclass(frozen=True)
class FeatureSql:
    """The feature SQL as loaded from a folder, with the hash that identifies it."""

    requests_training: str
    requests_scoring: str
    label: str
    layers: tuple[tuple[str, str, tuple[str, ...]], ...]
    """(layer name, SQL, feature columns) in file order."""
    sql_hash: str

    @property
    def user_features(self) -> list[str]:
        """User feature names in layer order (the scoring dataset's features)."""
        return [name for _, _, columns in self.layers for name in columns]

    @property
    def training_features(self) -> list[str]:
        """The model's inputs: the request's own fields, then the user features."""
        return [*REQUEST_FEATURES, *self.user_features]


def default_sql_dir() -> Path:
    """The feature SQL shipped with the project (tasks/sql)."""
    return Path(__file__).resolve().parent / "sql"


def sql_dir(settings: Settings | None = None) -> Path:
    """The configured feature SQL folder."""
    settings = settings or get_settings()
    return (settings.feature_sql_dir or default_sql_dir()).expanduser().resolve()


def selected_columns(sql: str, origin: str) -> list[str]:
    """The output column names of a query, checked to be plain identifiers."""
    try:
        tree = sqlglot.parse_one(sql, read="bigquery")
    except sqlglot.errors.ParseError as exc:
        raise FeatureSqlError(f"{origin} does not parse as BigQuery Standard SQL: {exc}") from exc
    if not isinstance(tree, exp.Query):
        raise FeatureSqlError(f"{origin} must be a single SELECT query")
    names = list(tree.named_selects)
    bad = [n for n in names if not is_identifier(n)]
    if bad or not names:
        raise FeatureSqlError(
            f"{origin} must select named columns, each a plain SQL identifier ({RULE});"
            f" bad: {bad or 'none selected'}"
        )
    return names


def _read(path: Path) -> str:
    """One SQL file's text, or a clear error naming it."""
    if not path.is_file():
        raise FeatureSqlError(f"feature SQL file {path} does not exist")
    return path.read_text(encoding="utf-8")


def load_feature_sql(settings: Settings | None = None) -> FeatureSql:
    """Load requests, label and layers from the configured folder and hash them."""
    settings = settings or get_settings()
    folder = sql_dir(settings)
    if not folder.is_dir():
        raise FeatureSqlError(f"feature SQL folder {folder} does not exist")
    label_path = Path(settings.feature_label_sql).expanduser()
    label_path = label_path if label_path.is_absolute() else folder / label_path
    files = {
        "requests_training.sql": _read(folder / "requests_training.sql"),
        "requests_scoring.sql": _read(folder / "requests_scoring.sql"),
        f"label:{label_path.name}": _read(label_path),
    }
    layers = []
    for path in sorted(folder.glob("*.sql")):
        match = _LAYER_FILE.match(path.name)
        if not match:
            if _LAYER_LIKE.match(path.name):  # skipped, its features would be missing unsaid
                raise FeatureSqlError(
                    f"{path.name} looks like a feature layer but is not named NN_name.sql"
                    " (lower-case letters, digits and underscores): rename it"
                )
            continue
        text = _read(path)
        files[path.name] = text
        columns = selected_columns(text, path.name)
        if columns[0] != "request_id":
            raise FeatureSqlError(f"{path.name} must select request_id first, got {columns[0]!r}")
        taken = sorted(set(columns[1:]) & set(DATASET_COLUMNS))
        if taken:
            raise FeatureSqlError(
                f"{path.name} selects {taken}, which the datasets already carry: rename them"
            )
        layers.append((f"layer_{match.group(1)}_{match.group(2)}", text, tuple(columns[1:])))
    if not layers:
        raise FeatureSqlError(f"no feature layers (NN_name.sql) in {folder}")
    _check_unique([c for _, _, cols in layers for c in cols])
    label_columns = selected_columns(files[f"label:{label_path.name}"], str(label_path))
    if not {"charge_id", "label_default"} <= set(label_columns):
        raise FeatureSqlError(f"{label_path} must select charge_id and label_default")
    if settings.feature_tables:
        # Not SQL text, but it decides which tables the text reads: two builds from other tables
        # must not claim the same hash. Without a mapping the hash is the files' alone, as ever.
        files["feature_tables"] = json.dumps(dict(sorted(settings.feature_tables.items())))
    return FeatureSql(
        requests_training=files["requests_training.sql"],
        requests_scoring=files["requests_scoring.sql"],
        label=files[f"label:{label_path.name}"],
        layers=tuple(layers),
        sql_hash=sql_hash(files),
    )


def _check_unique(names: list[str]) -> None:
    """Two layers producing the same feature name would shadow each other."""
    seen: set[str] = set()
    duplicated = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if duplicated:
        raise FeatureSqlError(f"feature names produced by more than one layer: {duplicated}")


def sql_hash(files: Mapping[str, str]) -> str:
    """sha256 over the SQL files (name and text) that build a dataset, and any table mapping."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    return digest.hexdigest()


def table_mapping(settings: Settings | None = None) -> dict[str, str]:
    """The configured logical -> warehouse table names, validated."""
    settings = settings or get_settings()
    mapping = dict(settings.feature_tables)
    unknown = sorted(set(mapping) - set(LOGICAL_TABLES))
    if unknown:
        raise FeatureSqlError(
            f"feature_tables maps unknown tables {unknown}; known: {list(LOGICAL_TABLES)}"
        )
    for logical, physical in mapping.items():
        if not _TABLE_REF.fullmatch(physical):  # not match: `$` passes a trailing newline
            raise FeatureSqlError(
                f"feature_tables[{logical!r}] = {physical!r} is not a table name "
                "(table, dataset.table or project.dataset.table)"
            )
    return mapping


def map_tables(sql: str, mapping: Mapping[str, str]) -> str:
    """Rewrite references to logical tables to the configured ones, leaving the rest as written.

    Every table reference counts, after FROM or JOIN or in a comma join; a CTE of the same name,
    where it is in scope, is not a table. The names are replaced in the text, at the positions
    sqlglot's parse gives: regenerating the SQL from the tree would rewrite some BigQuery
    time-zone expressions into forms its DuckDB transpiler then gets wrong.
    """
    if not mapping:
        return sql
    try:
        tree = sqlglot.parse_one(sql, read="bigquery")
    except sqlglot.errors.ParseError as exc:
        raise FeatureSqlError(
            f"feature SQL does not parse as BigQuery Standard SQL: {exc}"
        ) from exc
    edits = []
    for table in tree.find_all(exp.Table):
        name = table.this
        if (
            isinstance(name, exp.Identifier)
            and not table.db
            and name.name in mapping
            and not _names_a_cte(table)
            and "start" in name.meta
        ):
            physical = mapping[name.name]
            quoted = f"`{physical}`" if "-" in physical else physical
            edits.append((name.meta["start"], name.meta["end"], quoted))
    for start, end, text in sorted(edits, reverse=True):
        sql = sql[:start] + text + sql[end + 1 :]
    return sql


def _names_a_cte(table: exp.Table) -> bool:
    """Whether a table reference names a CTE of a WITH around it (in its scope, not any)."""
    node = table.parent
    while node is not None:
        with_clause = node.args.get("with_") if isinstance(node, exp.Query) else None
        if with_clause and any(cte.alias_or_name == table.name for cte in with_clause.expressions):
            return True
        node = node.parent
    return False


def assemble(
    requests_sql: str,
    layers: tuple[tuple[str, str, tuple[str, ...]], ...],
    head: tuple[str, ...],
    label_sql: str | None = None,
) -> str:
    """One query: requests, (label,) every layer as a CTE, joined on request_id."""
    ctes = [f"requests AS (\n{requests_sql.strip()}\n)"]
    if label_sql is not None:
        ctes.append(f"labels AS (\n{label_sql.strip()}\n)")
    ctes += [f"{name} AS (\n{sql.strip()}\n)" for name, sql, _ in layers]
    columns = [f"r.{c}" for c in head]
    joins = []
    if label_sql is not None:
        columns.insert(len(TRAINING_HEAD), "l.label_default")
        columns += [f"r.{c}" for c in REQUEST_FEATURES]
        joins.append("JOIN labels AS l ON l.charge_id = r.charge_id")
    for i, (name, _, features) in enumerate(layers):
        columns += [f"f{i}.{c}" for c in features]
        joins.append(f"LEFT JOIN {name} AS f{i} ON f{i}.request_id = r.request_id")
    return (
        "WITH "
        + ",\n".join(ctes)
        + "\nSELECT\n  "
        + ",\n  ".join(columns)
        + "\nFROM requests AS r\n"
        + "\n".join(joins)
    )


def used_parameters(sql: str) -> set[str]:
    """The @parameters a BigQuery query uses (tokens, so an @name in a comment or string is not one)."""
    tokens = sqlglot.tokenize(sql, read="bigquery")
    return {
        name.text
        for at, name in itertools.pairwise(tokens)
        if at.token_type == TokenType.PARAMETER and at.end + 1 == name.start
    }


def query_params(sql: str, as_of: date, settings: Settings | None = None) -> dict[str, Any]:
    """The parameters `sql` uses, out of @as_of, @tz, @grace_days and @utc_offset_us."""
    settings = settings or get_settings()
    available: dict[str, Any] = {
        "as_of": as_of,
        "tz": settings.timezone,
        "grace_days": GRACE_DAYS,
        "utc_offset_us": fixed_utc_offset_us(settings.timezone, as_of),
    }
    used = used_parameters(sql)
    unknown = sorted(used - set(available))
    if unknown:
        raise FeatureSqlError(
            f"feature SQL uses unknown parameters {unknown}; have {sorted(available)}"
        )
    # Engines reject parameters a statement does not use (DuckDB does), so bind only those.
    return {name: value for name, value in available.items() if name in used}


def fixed_utc_offset_us(zone_name: str, around: date) -> int:
    """The business zone's UTC offset in microseconds; FeatureSqlError if it is not fixed.

    Event-level SQL takes local days as epoch arithmetic (see tasks/sql/10_card.sql), exact only
    for a zone without daylight saving (Asia/Tokyo has had none since 1951).
    """
    zone = ZoneInfo(zone_name)
    offsets = {
        datetime(around.year + years, month, 1, tzinfo=zone).utcoffset()
        for years in (-3, -2, -1, 0, 1)
        for month in range(1, 13)
    }
    if len(offsets) != 1:
        raise FeatureSqlError(
            f"business time zone {zone_name} has daylight saving; the feature SQL needs a fixed UTC offset"
        )
    (offset,) = offsets
    assert offset is not None
    return int(offset.total_seconds()) * 1_000_000


def normalize_types(table: pa.Table) -> pa.Table:
    """Integer-valued decimals (DuckDB's COUNT_IF and SUM widen to int128) and booleans -> int64."""
    fields = []
    for field in table.schema:
        if (pa.types.is_decimal(field.type) and field.type.scale == 0) or pa.types.is_boolean(
            field.type
        ):
            fields.append(pa.field(field.name, pa.int64()))
        else:
            fields.append(field)
    return table.cast(pa.schema(fields))


def training_sql(feature_sql: FeatureSql, mapping: Mapping[str, str]) -> str:
    """The full training-set query with tables mapped."""
    return map_tables(
        assemble(
            feature_sql.requests_training, feature_sql.layers, TRAINING_HEAD, feature_sql.label
        ),
        mapping,
    )


def scoring_sql(feature_sql: FeatureSql, mapping: Mapping[str, str]) -> str:
    """The full scoring-set query with tables mapped."""
    return map_tables(
        assemble(feature_sql.requests_scoring, feature_sql.layers, SCORING_HEAD), mapping
    )


def require_tables(warehouse: Warehouse, mapping: Mapping[str, str]) -> None:
    """One clear error naming every source table the warehouse lacks (before any SQL runs)."""
    missing = [
        mapping.get(name, name)
        for name in LOGICAL_TABLES
        if "." not in mapping.get(name, name)
        and not warehouse.table_exists(mapping.get(name, name))
    ]
    if missing:
        raise FeatureSqlError(
            f"the warehouse lacks source table(s) {missing}: run daily_sync (and load app_events), "
            "or map them with PAYLATER_FEATURE_TABLES"
        )


def build_training_table(
    warehouse: Warehouse, as_of: date, settings: Settings | None = None
) -> tuple[pa.Table, FeatureSql]:
    """Training rows (one per matured charge) as of `as_of`, sorted by charge_id."""
    settings = settings or get_settings()
    feature_sql = load_feature_sql(settings)
    mapping = table_mapping(settings)
    require_tables(warehouse, mapping)
    sql = training_sql(feature_sql, mapping) + "\nORDER BY r.charge_id"
    parts = [
        QueryPart("requests_training.sql", feature_sql.requests_training, "request_id"),
        QueryPart(Path(settings.feature_label_sql).name, feature_sql.label, "charge_id"),
        *_layer_parts(feature_sql),
    ]
    build = _Build("training", as_of, parts, mapping, settings)
    table = build.run(warehouse, sql)
    table = table.set_column(
        table.schema.get_field_index("label_default"),
        "label_default",
        table["label_default"].cast(pa.int8()),
    )
    return build.checked(warehouse, table, "charge_id"), feature_sql


def build_scoring_table(
    warehouse: Warehouse, as_of: date, settings: Settings | None = None
) -> tuple[pa.Table, FeatureSql]:
    """Scoring rows (one per active user) with data up to the end of `as_of`, sorted by user_id."""
    settings = settings or get_settings()
    feature_sql = load_feature_sql(settings)
    mapping = table_mapping(settings)
    require_tables(warehouse, mapping)
    sql = scoring_sql(feature_sql, mapping) + "\nORDER BY r.user_id"
    parts = [
        QueryPart("requests_scoring.sql", feature_sql.requests_scoring, "user_id"),
        *_layer_parts(feature_sql),
    ]
    build = _Build("scoring", as_of, parts, mapping, settings)
    return build.checked(warehouse, build.run(warehouse, sql), "user_id"), feature_sql


def in_order(table: pa.Table, key: str) -> pa.Table:
    """`table` in ascending `key` order (a unique, non-NULL key). The query's ORDER BY sorts in
    the warehouse, in parallel; a result that arrives out of order anyway (a client reading
    several streams) is sorted here. Checking costs about a millisecond for 300k rows; sorting
    here copies every column, 0.1-0.6 s for a 10M-transaction training set."""
    column = table[key]
    if len(column) < 2 or pc.all(pc.less(column[:-1], column[1:])).as_py():
        return table
    return table.sort_by(key)


def repeats_a_key(table: pa.Table, key: str) -> bool:
    """Whether a table sorted by `key` holds a key twice (the check is one pass over the column)."""
    column = table[key]
    return len(column) >= 2 and bool(pc.any(pc.equal(column[:-1], column[1:])).as_py())


def is_rejected_sql(exc: BaseException) -> bool:
    """Whether the warehouse rejected the query itself (unknown table or column, bad syntax or
    types): DuckDB's ProgrammingError family, BigQuery's 400 and 404. These fail the same way
    every time; other errors (a dropped connection, a 5xx) may pass on a retry."""
    module = type(exc).__module__
    names = {cls.__name__ for cls in type(exc).__mro__}
    if module.lstrip("_").startswith("duckdb"):
        return "ProgrammingError" in names
    if module.startswith("google."):
        return bool(names & {"BadRequest", "NotFound"})
    return False


@dataclass(frozen=True)
class QueryPart:
    """One SQL file of a dataset's query and the key it returns one row per."""

    file_name: str
    sql: str
    key: str


def _layer_parts(feature_sql: FeatureSql) -> list[QueryPart]:
    """Every layer as a QueryPart."""
    return [
        QueryPart(f"{name.removeprefix('layer_')}.sql", sql, "request_id")
        for name, sql, _ in feature_sql.layers
    ]


@dataclass(frozen=True)
class _Build:
    """One dataset's query for one day, and how to say which SQL file is wrong when it is.

    The diagnoses query each file on its own, and run only once the whole query failed or came
    out with repeated keys, so a sound build pays nothing for them.
    """

    kind: str
    as_of: date
    parts: list[QueryPart]
    """The requests query first, then the label (training) and the layers."""
    mapping: Mapping[str, str]
    settings: Settings

    def run(self, warehouse: Warehouse, sql: str) -> pa.Table:
        """The query's rows; FeatureSqlError naming the file when the warehouse rejects it."""
        try:
            return normalize_types(
                warehouse.query_arrow(sql, query_params(sql, self.as_of, self.settings))
            )
        except Exception as exc:
            if not is_rejected_sql(exc):
                raise
            raise FeatureSqlError(self._rejected(warehouse, exc)) from exc

    def checked(self, warehouse: Warehouse, table: pa.Table, key: str) -> pa.Table:
        """`table` sorted by `key`; FeatureSqlError naming the files when a key repeats."""
        table = in_order(table, key)
        if repeats_a_key(table, key):
            raise FeatureSqlError(self._repeated(warehouse))
        return table

    def _part_query(self, part: QueryPart, select: str) -> str:
        """`select` over one part, with the requests it may read, tables mapped."""
        requests = self.parts[0].sql.strip()
        return map_tables(
            f"WITH requests AS (\n{requests}\n),\npart AS (\n{part.sql.strip()}\n)\n{select}",
            self.mapping,
        )

    def _where(self) -> str:
        """What the message adds about the table mapping."""
        mapped = ", ".join(f"{k} -> {v}" for k, v in sorted(self.mapping.items()))
        return f" (tables mapped by PAYLATER_FEATURE_TABLES: {mapped})" if mapped else ""

    def _rejected(self, warehouse: Warehouse, error: Exception) -> str:
        """The first file the warehouse rejects on its own, and why."""
        for part in self.parts:
            sql = self._part_query(part, "SELECT * FROM part LIMIT 0")
            try:
                warehouse.query_arrow(sql, query_params(sql, self.as_of, self.settings))
            except Exception as exc:
                if not is_rejected_sql(exc):
                    raise
                error, culprit = exc, part.file_name
                break
        else:
            culprit = "the query joining them"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (
            f"the {self.kind} query for as_of {self.as_of} is rejected by the warehouse in "
            f"{culprit}: {reason}{self._where()}"
        )

    def _repeated(self, warehouse: Warehouse) -> str:
        """The files that return a key more than once (the requests alone when they do)."""
        found = []
        for part in self.parts:
            sql = self._part_query(
                part,
                f"SELECT {part.key} AS k FROM part GROUP BY {part.key} HAVING COUNT(*) > 1 "
                "ORDER BY k LIMIT 3",
            )
            params = query_params(sql, self.as_of, self.settings)
            repeated = warehouse.query_arrow(sql, params)["k"].to_pylist()
            if repeated:
                found.append(f"{part.file_name} returns {part.key} {repeated} more than once")
                if part is self.parts[0]:
                    break  # every layer repeats what the requests repeat
        detail = "; ".join(found) or "no single SQL file does: check the tables they join"
        return (
            f"the {self.kind} rows for as_of {self.as_of} repeat a key, which would repeat those"
            f" rows: {detail} (each query must return at most one row per key; a mapped table"
            f" may hold a key twice){self._where()}"
        )
