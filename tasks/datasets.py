"""Versioned feature datasets: Parquet under `<kind>/as_of=YYYY-MM-DD/` with a manifest written last.

The digest is the sha256 of the Parquet bytes; rows are sorted by key and the writer options are
fixed, so rebuilding the same `as_of` from the same warehouse gives the same bytes and digest.
A rebuild of the same data rewrites the part (repairing a damaged one) but keeps the manifest
byte for byte. The part is named by its digest (`part-<16 hex>.parquet`) and the manifest names its part, so
rebuilding an `as_of` whose data changed never overwrites the part a manifest points to: until
the new manifest lands, readers get the previous dataset whole, and a build that dies half way
leaves that dataset as it was. Replaced parts are kept: a model version logs the URI of the part
it was trained on, and `paylater registry reproduce` reads it back.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from paylater.settings import Settings, get_settings
from paylater.timeutil import today
from tasks.features import build_scoring_table, build_training_table
from tasks.storage import DatasetStorage, StorageError, join_uri, open_storage
from tasks.warehouse.base import Warehouse, open_warehouse

log = logging.getLogger(__name__)

KINDS = ("training", "scoring")
SORT_KEYS = {"training": "charge_id", "scoring": "user_id"}
LEGACY_PART = "part-0.parquet"
"""The part name of datasets written before parts were named by digest (their manifests name none)."""
MANIFEST = "manifest.json"
_AS_OF_DIR = re.compile(r"^as_of=(\d{4}-\d{2}-\d{2})$")


class DatasetError(RuntimeError):
    """A dataset that is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class Manifest:
    """What a dataset is and how it was built."""

    kind: str
    as_of: date
    rows: int
    schema: list[dict[str, str]]
    sha256: str
    source_watermark: str | None
    """The sync ledger's watermark_to for `as_of` (ISO UTC), None when no ledger row exists."""
    sql_hash: str
    features: list[str]
    uri: str
    part: str = LEGACY_PART
    """The Parquet part's name in the dataset's folder."""
    built_at: str = field(default="", compare=False)
    """When this copy was written; the only field that differs between identical rebuilds."""

    def to_json(self) -> bytes:
        """The manifest as stable, pretty JSON."""
        body = asdict(self)
        body["as_of"] = self.as_of.isoformat()
        return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse a manifest written by to_json."""
        body: dict[str, Any] = json.loads(data)
        body["as_of"] = date.fromisoformat(body["as_of"])
        return cls(**body)


def dataset_prefix(kind: str, as_of: date) -> str:
    """`training/as_of=2026-11-26`."""
    if kind not in KINDS:
        raise DatasetError(f"dataset kind must be one of {KINDS}, got {kind!r}")
    return f"{kind}/as_of={as_of.isoformat()}"


def parquet_bytes(table: pa.Table) -> bytes:
    """Parquet with fixed writer options, so equal tables give equal bytes."""
    buffer = io.BytesIO()
    pq.write_table(
        table,
        buffer,
        compression="zstd",
        compression_level=3,
        use_dictionary=True,
        write_statistics=True,
        row_group_size=1_000_000,
        version="2.6",
    )
    return buffer.getvalue()


def schema_of(table: pa.Table) -> list[dict[str, str]]:
    """Column names and Arrow types, in order."""
    return [{"name": f.name, "type": str(f.type)} for f in table.schema]


def write_dataset(
    storage: DatasetStorage,
    kind: str,
    as_of: date,
    table: pa.Table,
    *,
    features: list[str],
    sql_hash: str,
    source_watermark: datetime | None,
) -> Manifest:
    """Write the Parquet part, then the manifest (the dataset is complete once its manifest exists)."""
    prefix = dataset_prefix(kind, as_of)
    missing = [f for f in features if f not in table.column_names]
    if missing:
        raise DatasetError(f"{kind} table lacks feature columns {missing}")
    table = table.sort_by(SORT_KEYS[kind]).combine_chunks()
    data = parquet_bytes(table)
    digest = hashlib.sha256(data).hexdigest()
    part = f"part-{digest[:16]}.parquet"
    storage.write_bytes(f"{prefix}/{part}", data)
    manifest = Manifest(
        kind=kind,
        as_of=as_of,
        rows=table.num_rows,
        schema=schema_of(table),
        sha256=digest,
        source_watermark=source_watermark.astimezone(UTC).isoformat() if source_watermark else None,
        sql_hash=sql_hash,
        features=list(features),
        uri=join_uri(storage.url, f"{prefix}/{part}"),
        part=part,
        built_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    previous = _existing_manifest(storage, kind, as_of)
    if previous == manifest:  # every field but built_at: the same dataset, already complete
        return previous
    storage.write_bytes(f"{prefix}/{MANIFEST}", manifest.to_json())
    return manifest


def _existing_manifest(storage: DatasetStorage, kind: str, as_of: date) -> Manifest | None:
    """The manifest a previous build left for this dataset, None when there is none to keep.

    A rebuild of the same data keeps it byte for byte: rewritten, its new built_at would announce
    a new dataset to whatever watches manifests (an object-store event, a copy job, the monitor).
    """
    try:
        return read_manifest(storage, kind, as_of)
    except DatasetError:  # missing or unreadable: the new manifest replaces it
        return None


def read_manifest(storage: DatasetStorage, kind: str, as_of: date) -> Manifest:
    """The manifest of one dataset (DatasetError when there is none: missing or incomplete)."""
    key = f"{dataset_prefix(kind, as_of)}/{MANIFEST}"
    try:
        data = storage.read_bytes(key)
    except StorageError as exc:
        raise DatasetError(
            f"no complete {kind} dataset for as_of {as_of} at {storage.url} ({exc})"
        ) from exc
    try:
        return Manifest.from_json(data)
    except (ValueError, KeyError, TypeError) as exc:  # cut short, emptied or edited by hand
        raise DatasetError(
            f"{join_uri(storage.url, key)} is unreadable ({type(exc).__name__}: {exc}): "
            f"rebuild the {kind} dataset for as_of {as_of} with feature_build"
        ) from exc


def available_as_ofs(storage: DatasetStorage, kind: str) -> list[date]:
    """Every `as_of` with a complete dataset of `kind`, oldest first."""
    found = []
    for name in storage.list_dirs(kind):
        match = _AS_OF_DIR.match(name)
        if match and storage.exists(f"{kind}/{name}/{MANIFEST}"):
            found.append(date.fromisoformat(match.group(1)))
    return sorted(found)


def load_dataset(
    kind: str, as_of: date | None = None, storage: DatasetStorage | None = None
) -> tuple[pa.Table, Manifest]:
    """A dataset and its manifest (the latest `as_of` when None), checked against its digest."""
    storage = storage or open_storage()
    if as_of is None:
        dates = available_as_ofs(storage, kind)
        if not dates:
            raise DatasetError(f"no {kind} dataset under {storage.url}: run feature_build first")
        as_of = dates[-1]
    manifest = read_manifest(storage, kind, as_of)
    data = storage.read_bytes(f"{dataset_prefix(kind, as_of)}/{manifest.part}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.sha256:
        raise DatasetError(
            f"{manifest.uri} has sha256 {digest}, its manifest says {manifest.sha256}"
        )
    return pq.read_table(io.BytesIO(data)), manifest


def load_training_dataset(as_of: date | None = None) -> tuple[pa.Table, Manifest]:
    """The training dataset for `as_of` (latest when None) and its manifest."""
    return load_dataset("training", as_of)


def load_scoring_dataset(as_of: date | None = None) -> tuple[pa.Table, Manifest]:
    """The scoring dataset for `as_of` (latest when None) and its manifest."""
    return load_dataset("scoring", as_of)


def source_watermark(warehouse: Warehouse, as_of: date) -> datetime | None:
    """The sync ledger's watermark for `as_of`; None (with a warning) when the ledger lacks it.

    daily_pipeline refuses to build from an incomplete sync; a standalone feature_build over
    tables loaded some other way still builds, and its manifest says it has no watermark.
    """
    from tasks.sync import SyncIncomplete, ledger_watermark

    if not warehouse.table_exists("sync_ledger"):
        log.warning("no sync_ledger in the warehouse: the manifest records no source watermark")
        return None
    try:
        return ledger_watermark(warehouse, as_of)
    except SyncIncomplete as exc:
        log.warning("manifest records no source watermark: %s", exc)
        return None


def refuse_unended(as_of: date) -> None:
    """DatasetError while `as_of` has not ended in the business time zone.

    Its features would miss the rest of the day, its labels would count repayments still to come,
    and its scoring rows, published, would make every later build of a past day look like a
    backfill that leaves the online table as it is.
    """
    if as_of >= today():  # not day_end_utc: date.max has no next day
        raise DatasetError(
            f"as_of {as_of} has not ended yet in the business time zone: build it once it has"
        )


def _build_and_store(kind: str, as_of: date, settings: Settings | None) -> Manifest:
    """Build one dataset (`training` or `scoring`) in the warehouse and store it with its manifest."""
    refuse_unended(as_of)
    settings = settings or get_settings()
    build_table = build_training_table if kind == "training" else build_scoring_table
    warehouse = open_warehouse(settings.warehouse)
    try:
        table, feature_sql = build_table(warehouse, as_of, settings)
        watermark = source_watermark(warehouse, as_of)
    finally:
        warehouse.close()
    features = feature_sql.training_features if kind == "training" else feature_sql.user_features
    return write_dataset(
        open_storage(settings=settings),
        kind,
        as_of,
        table,
        features=features,
        sql_hash=feature_sql.sql_hash,
        source_watermark=watermark,
    )


def build_training_dataset(as_of: date, settings: Settings | None = None) -> Manifest:
    """Build the training set (matured charges as of `as_of`) in the warehouse and store it."""
    return _build_and_store("training", as_of, settings)


def build_scoring_dataset(as_of: date, settings: Settings | None = None) -> Manifest:
    """Build the scoring set (active users, data to the end of `as_of`) and store it."""
    return _build_and_store("scoring", as_of, settings)
