"""Datasets: Parquet + manifest under as_of folders, stable digest across rebuilds, lineage, loading."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from paylater.timeutil import day_end_utc
from registry.reproduce import read_logged_dataset
from tasks import datasets
from tasks import storage as storage_module
from tasks.datasets import DatasetError, load_training_dataset
from tasks.storage import open_storage
from tasks.sync import configured_tables
from tasks.warehouse import open_warehouse
from tasks.warehouse.duckdb import DuckDBWarehouse

ROOT = Path(__file__).resolve().parents[2]
AS_OF = date(2026, 7, 15)

ROWS = """
INSERT INTO users VALUES
  (1, '2026-01-05 01:00:00+00', 1990, 'Tokyo', '2026-01-06 00:00:00+00', 'active', '2026-07-01 00:00:00+00'),
  (2, '2026-02-05 01:00:00+00', 1985, 'Osaka', NULL, 'active', '2026-07-01 00:00:00+00'),
  (3, '2026-02-05 01:00:00+00', 1970, 'Osaka', NULL, 'closed', '2026-07-01 00:00:00+00');
INSERT INTO card_transactions VALUES
  (1, 1, '2026-03-01 13:00:00+00', 1200, 7, 'grocery', 'in_store', 'settled', '2026-03-01 13:00:00+00'),
  (2, 1, '2026-03-20 02:00:00+00', 5400, 8, 'dining', 'online', 'refunded', '2026-03-21 00:00:00+00'),
  (3, 2, '2026-03-02 10:00:00+00', 800, 9, 'transport', 'contactless', 'declined', '2026-03-02 10:00:00+00'),
  (4, 2, '2026-07-10 10:00:00+00', 3300, 9, 'convenience', 'contactless', 'settled', '2026-07-10 10:00:00+00');
INSERT INTO topups VALUES
  (1, 1, '2026-02-28 00:00:00+00', 10000, 'bank', '2026-02-28 00:00:00+00'),
  (2, 2, '2026-07-01 00:00:00+00', 3000, 'convenience_store', '2026-07-01 00:00:00+00');
INSERT INTO deferred_charges VALUES
  (10, 1, '2026-03-25 03:00:00+00', 10000, 400, '2026-04-27', 'repaid', '2026-04-20 00:00:00+00', 0, '2026-04-20 00:00:00+00'),
  (11, 2, '2026-04-02 03:00:00+00', 3000, 200, '2026-05-27', 'defaulted', NULL, NULL, '2026-06-27 00:00:00+00'),
  (12, 1, '2026-07-01 03:00:00+00', 3000, 200, '2026-08-27', 'outstanding', NULL, NULL, '2026-07-01 03:00:00+00');
INSERT INTO app_events VALUES
  (1, 1, '2026-03-24 00:00:00+00', '2026-03-24', 5, 'session_start', NULL),
  (2, 1, '2026-03-24 00:00:05+00', '2026-03-24', 5, 'screen_view', 'deferred');
"""


@pytest.fixture
def env(paylater_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DuckDB warehouse file holding a few source rows, datasets in a local folder."""
    warehouse_path = paylater_home / "warehouse.duckdb"
    warehouse = open_warehouse(f"duckdb:///{warehouse_path}")
    assert isinstance(warehouse, DuckDBWarehouse)  # the source DDL and rows go in as DuckDB SQL
    warehouse.conn.execute((ROOT / "schema" / "source_postgres.sql").read_text())
    warehouse.execute((ROOT / "schema" / "warehouse_app_events.sql").read_text())
    warehouse.conn.execute(ROWS)
    warehouse.close()
    monkeypatch.setenv("PAYLATER_WAREHOUSE_URL", f"duckdb:///{warehouse_path}")
    return paylater_home / "datasets"


def write_ledger(status: str = "succeeded") -> datetime:
    """Sync ledger rows (the contract's columns) for every configured table; returns the watermark."""
    watermark = day_end_utc(AS_OF)
    names = [spec.name for spec in configured_tables()]
    n = len(names)
    ledger = pa.table(
        {
            "table_name": pa.array(names, pa.string()),
            "as_of": pa.array([AS_OF] * n, pa.date32()),
            "mode": pa.array(["incremental"] * n, pa.string()),
            "watermark_from": pa.array([None] * n, pa.timestamp("us", tz="UTC")),
            "watermark_to": pa.array([watermark] * n, pa.timestamp("us", tz="UTC")),
            "rows_extracted": pa.array([1] * n, pa.int64()),
            "rows_loaded": pa.array([1] * n, pa.int64()),
            "warehouse_rows": pa.array([1] * n, pa.int64()),
            "duration_seconds": pa.array([0.1] * n, pa.float64()),
            "status": pa.array([status] * n, pa.string()),
            "error": pa.array([None] * n, pa.string()),
            "finished_at": pa.array([datetime.now(UTC)] * n, pa.timestamp("us", tz="UTC")),
        }
    )
    from paylater.settings import get_settings

    warehouse = open_warehouse(get_settings().warehouse)
    warehouse.replace_table("sync_ledger", ledger)
    warehouse.close()
    return watermark


def test_training_dataset_layout_manifest_and_lineage(env: Path) -> None:
    watermark = write_ledger()
    manifest = datasets.build_training_dataset(AS_OF)
    folder = env / "training" / "as_of=2026-07-15"
    assert manifest.part == f"part-{manifest.sha256[:16]}.parquet"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", manifest.part]
    assert manifest.rows == 2  # charges 10 and 11 matured; 12 did not
    assert manifest.source_watermark == watermark.isoformat()
    assert manifest.uri == f"{env.as_uri()}/training/as_of=2026-07-15/{manifest.part}"
    assert manifest.features[:2] == ["request_amount_jpy", "request_fee_jpy"]
    assert len(manifest.sql_hash) == 64 and len(manifest.sha256) == 64
    assert [c["name"] for c in manifest.schema][:5] == [
        "charge_id",
        "user_id",
        "requested_at",
        "request_date",
        "label_default",
    ]
    table, loaded = load_training_dataset()
    assert loaded == manifest
    assert table["charge_id"].to_pylist() == [10, 11]
    assert table["label_default"].to_pylist() == [0, 1]
    assert table.schema.field("label_default").type == pa.int8()


def test_rebuild_is_idempotent(env: Path) -> None:
    first = datasets.build_training_dataset(AS_OF)
    folder = env / "training" / "as_of=2026-07-15"
    first_bytes = (folder / first.part).read_bytes()
    second = datasets.build_training_dataset(AS_OF)
    assert second == first  # every field but built_at
    assert (folder / first.part).read_bytes() == first_bytes
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", first.part]
    scoring_a = datasets.build_scoring_dataset(AS_OF)
    scoring_b = datasets.build_scoring_dataset(AS_OF)
    assert scoring_a == scoring_b and scoring_a.rows == 2  # user 3 is closed
    assert scoring_a.source_watermark is None  # no ledger in this warehouse
    assert scoring_a.features == [f for f in first.features if not f.startswith("request_")]


def test_latest_as_of_and_explicit_as_of(env: Path) -> None:
    older = datasets.build_training_dataset(date(2026, 6, 30))
    newer = datasets.build_training_dataset(AS_OF)
    assert load_training_dataset()[1].as_of == newer.as_of
    assert load_training_dataset(date(2026, 6, 30))[1] == older
    assert datasets.available_as_ofs(open_storage(), "training") == [date(2026, 6, 30), AS_OF]


def test_missing_incomplete_and_tampered_datasets(env: Path) -> None:
    with pytest.raises(DatasetError, match="run feature_build first"):
        load_training_dataset()
    built = datasets.build_training_dataset(AS_OF)
    folder = env / "training" / "as_of=2026-07-15"
    part = folder / built.part
    part.write_bytes(part.read_bytes()[:-1] + b"\0")
    with pytest.raises(DatasetError, match="manifest says"):
        load_training_dataset(AS_OF)
    (folder / "manifest.json").unlink()  # a crash before the manifest: not a dataset
    with pytest.raises(DatasetError, match="run feature_build first"):
        load_training_dataset()


def test_failed_ledger_records_no_watermark(env: Path) -> None:
    write_ledger(status="failed")
    assert datasets.build_scoring_dataset(AS_OF).source_watermark is None


def add_matured_charge(charge_id: int) -> None:
    """One more repaid charge of user 2, requested in March: the next training build has a row more."""
    from paylater.settings import get_settings

    warehouse = open_warehouse(get_settings().warehouse)
    assert isinstance(warehouse, DuckDBWarehouse)  # the env fixture's warehouse
    warehouse.conn.execute(
        f"INSERT INTO deferred_charges VALUES ({charge_id}, 2, '2026-03-{charge_id - 80:02d} "
        "03:00:00+00', 2000, 100, '2026-04-27', 'repaid', '2026-04-20 00:00:00+00', 0, "
        "'2026-04-20 00:00:00+00')"
    )
    warehouse.close()


def test_a_rebuild_that_dies_before_its_manifest_leaves_the_dataset_whole(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = datasets.build_training_dataset(AS_OF)
    add_matured_charge(90)  # the source changed: the rebuild's bytes differ
    real_write = storage_module.LocalStorage.write_bytes

    def dies_at_the_manifest(self: storage_module.LocalStorage, key: str, data: bytes) -> None:
        if key.endswith("manifest.json"):
            raise OSError("the process died here")
        real_write(self, key, data)

    monkeypatch.setattr(storage_module.LocalStorage, "write_bytes", dies_at_the_manifest)
    with pytest.raises(OSError, match="died here"):
        datasets.build_training_dataset(AS_OF)
    monkeypatch.setattr(storage_module.LocalStorage, "write_bytes", real_write)
    table, manifest = load_training_dataset(AS_OF)  # the first build's dataset, digest intact
    assert manifest == first and table["charge_id"].to_pylist() == [10, 11]

    second = datasets.build_training_dataset(AS_OF)
    assert load_training_dataset(AS_OF)[0]["charge_id"].to_pylist() == [10, 11, 90]
    # The replaced part stays where a model version trained on it logged it, digest intact.
    folder = env / "training" / "as_of=2026-07-15"
    assert sorted(p.name for p in folder.glob("part-*")) == sorted([first.part, second.part])
    logged = read_logged_dataset(first.uri, first.sha256)
    assert logged["charge_id"].to_pylist() == [10, 11]


def test_a_dataset_written_before_parts_were_named_by_digest_still_loads(env: Path) -> None:
    built = datasets.build_training_dataset(AS_OF)
    folder = env / "training" / "as_of=2026-07-15"
    (folder / built.part).rename(folder / "part-0.parquet")
    body = json.loads((folder / "manifest.json").read_text())
    del body["part"]
    (folder / "manifest.json").write_text(json.dumps(body))
    table, manifest = load_training_dataset(AS_OF)
    assert manifest.part == "part-0.parquet" and table.num_rows == 2


@pytest.mark.parametrize(
    "manifest",
    [b"", b'{"kind": "training"', b'{"kind": "training"}', b'["training"]'],
    ids=["empty", "truncated", "fields-missing", "not-an-object"],
)
def test_an_unreadable_manifest_is_a_dataset_error_naming_it(env: Path, manifest: bytes) -> None:
    # A manifest emptied or cut short (a copy tool stopped half way, a hand edit) must be named,
    # not surface as a bare JSONDecodeError or KeyError from the retrain or the publish.
    datasets.build_training_dataset(AS_OF)
    (env / "training" / "as_of=2026-07-15" / "manifest.json").write_bytes(manifest)
    with pytest.raises(DatasetError, match=r"training/as_of=2026-07-15/manifest.json .*unreadable"):
        load_training_dataset()


def test_a_rebuild_of_the_same_data_leaves_the_manifest_byte_for_byte(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rerun after a build that died half way rewrote every finished dataset's manifest with a
    # new built_at: readers watching manifests (an S3 event, a copy job) saw a new dataset.
    first = datasets.build_training_dataset(AS_OF)
    manifest = env / "training" / "as_of=2026-07-15" / "manifest.json"
    before = manifest.read_bytes()
    monkeypatch.setattr(datasets, "datetime", _LaterClock)
    second = datasets.build_training_dataset(AS_OF)
    assert manifest.read_bytes() == before
    assert second.built_at == first.built_at and second == first
    add_matured_charge(90)  # changed data: a new manifest, with the new build time
    third = datasets.build_training_dataset(AS_OF)
    assert third.sha256 != first.sha256 and third.built_at.startswith("2099-")


class _LaterClock(datetime):
    """datetime whose now() is far later: a rebuild's built_at cannot equal the first one's."""

    @classmethod
    def now(cls, tz: object = None) -> _LaterClock:
        return cls(2099, 1, 1, tzinfo=UTC)
