"""generate then advance: new rows and status changes of old rows land inside the new business day."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datagen import advance_into, generate, generate_into
from datagen.pipeline import AdvanceStopped
from paylater.product import GRACE_DAYS
from paylater.timeutil import day_end_utc, day_start_utc

END = date(2026, 8, 23)  # advancing into the 24th-25th: repayments cluster before the 27th


@pytest.mark.postgres
def test_advance_updates_old_rows_within_the_new_day(pg_url: str, tmp_path: Path) -> None:
    truth_dir = tmp_path / "truth"
    warehouse = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    generate_into(250, 3, 9, END, "Asia/Tokyo", pg_url, warehouse, truth_dir)
    truth_before = pq.read_table(truth_dir / "deferred_charges.parquet").num_rows
    report = advance_into(2, pg_url, warehouse, truth_dir)
    assert report.first_day == END + timedelta(days=1)
    assert report.last_day == END + timedelta(days=2)
    day = END + timedelta(days=2)
    start, end = day_start_utc(day), day_end_utc(day)
    with psycopg.connect(pg_url) as conn:
        old_changed = conn.execute(
            "SELECT status, count(*) FROM deferred_charges"
            " WHERE updated_at >= %s AND requested_at < %s GROUP BY status",
            (start, start),
        ).fetchall()
        outside = conn.execute(
            "SELECT count(*) FROM card_transactions WHERE updated_at >= %s", (end,)
        ).fetchone()
        new_rows = conn.execute(
            "SELECT count(*) FROM card_transactions WHERE authorized_at >= %s AND updated_at < %s",
            (start, end),
        ).fetchone()
        early_defaults = conn.execute(
            "SELECT count(*) FROM deferred_charges WHERE status = 'defaulted'"
            " AND (updated_at AT TIME ZONE 'Asia/Tokyo')::date <= due_date + %s",
            (GRACE_DAYS,),
        ).fetchone()
        charges = conn.execute("SELECT count(*) FROM deferred_charges").fetchone()
    assert sum(n for _, n in old_changed) > 0  # repayments of charges from earlier days
    assert outside == (0,)
    assert new_rows is not None and new_rows[0] > 0
    assert early_defaults == (0,)
    truth = pq.read_table(truth_dir / "deferred_charges.parquet")
    assert charges is not None and truth.num_rows == charges[0] >= truth_before


def test_advance_continues_deterministically(tmp_path: Path) -> None:
    """Two worlds from the same seed advance to identical rows (state persisted, not re-drawn)."""
    dumps = []
    for name in ("a", "b"):
        home = tmp_path / name
        source = f"sqlite:///{home / 'source.db'}"
        warehouse = f"duckdb:///{home / 'warehouse.duckdb'}"
        generate_into(80, 1, 3, END, "Asia/Tokyo", source, warehouse, home / "truth")
        advance_into(1, source, warehouse, home / "truth")
        import sqlite3

        with sqlite3.connect(home / "source.db") as conn:
            dumps.append(
                [
                    conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                    for t in ("users", "card_transactions", "topups", "deferred_charges")
                ]
            )
    assert dumps[0] == dumps[1]
    assert len(dumps[0][1]) > 0


def test_reports_name_the_zone_the_days_were_simulated_in(tmp_path: Path) -> None:
    source = f"sqlite:///{tmp_path / 'source.db'}"
    warehouse = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    report = generate_into(20, 1, 3, END, "Asia/Kolkata", source, warehouse, tmp_path / "truth")
    assert "(business days, Asia/Kolkata)" in report.lines()[0]
    report = advance_into(1, source, warehouse, tmp_path / "truth")
    assert "(business days, Asia/Kolkata)" in report.lines()[0]


def test_an_advance_that_fails_on_a_later_day_resumes_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`advance --days 3` failing on its 2nd day (the warehouse write) kept day 1 in the source
    but not in the generator's state: the next advance simulated day 1 again and every insert
    collided with the rows already there, for good."""
    import sqlite3

    import datagen.pipeline as pipeline
    from datagen.generator import Simulation

    def dump(home: Path) -> list[list[tuple[object, ...]]]:
        with sqlite3.connect(home / "source.db") as conn:
            return [
                conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("users", "card_transactions", "topups", "deferred_charges")
            ]

    homes = {name: tmp_path / name for name in ("straight", "resumed")}
    urls = {
        name: (f"sqlite:///{home / 'source.db'}", f"duckdb:///{home / 'warehouse.duckdb'}")
        for name, home in homes.items()
    }
    for name, home in homes.items():
        generate_into(80, 1, 3, END, "Asia/Tokyo", *urls[name], home / "truth")
    advance_into(3, *urls["straight"], homes["straight"] / "truth")

    real_write = pipeline.write_app_event_days
    calls: list[int] = []

    def failing_second_day(warehouse: Any, days: Iterable[tuple[date, pa.Table]]) -> int:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(warehouse, days)

    monkeypatch.setattr(pipeline, "write_app_event_days", failing_second_day)
    with pytest.raises(AdvanceStopped, match="disk full"):
        advance_into(3, *urls["resumed"], homes["resumed"] / "truth")
    monkeypatch.setattr(pipeline, "write_app_event_days", real_write)
    done = Simulation.load(homes["resumed"] / "truth" / "generator").last_day
    assert done == END + timedelta(days=1)  # the day that finished is kept, the failed one not
    advance_into(2, *urls["resumed"], homes["resumed"] / "truth")

    assert dump(homes["resumed"]) == dump(homes["straight"])
    truths = [pq.read_table(home / "truth" / "deferred_charges.parquet") for home in homes.values()]
    assert truths[0].sort_by("charge_id").equals(truths[1].sort_by("charge_id"))


def _pg_rows(url: str) -> list[list[tuple[object, ...]]]:
    """Every row of the four source tables, in key order."""
    with psycopg.connect(url) as conn:
        return [
            conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
            for t in ("users", "card_transactions", "topups", "deferred_charges")
        ]


@pytest.fixture
def second_pg_url(pg_server_url: str) -> Iterator[str]:
    """Another fresh database on the real server, for a run to compare with."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{pg_server_url.rpartition('/')[0]}/{name}"
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_KILL_ADVANCE = """
import os, signal, sys
from pathlib import Path

import datagen.generator
import datagen.pipeline


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


{patch}
datagen.pipeline.advance_into(int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))
"""

# Points after a day's rows are committed to the source where the advancing process is killed.
_CRASH_POINTS = {
    "right_after_commit": "datagen.pipeline._persist = die",
    "between_truth_and_state": "datagen.generator.Simulation.save = die",
    "mid_state_save": """
import tasks.storage
real_write = tasks.storage.write_file_atomically


def write_until_meta(target, write):
    if target.name == "meta.json":
        die()
    real_write(target, write)


tasks.storage.write_file_atomically = write_until_meta
""",
}


@pytest.mark.postgres
@pytest.mark.parametrize("crash_point", sorted(_CRASH_POINTS))
def test_an_advance_killed_after_its_commit_resumes_to_the_rows_of_an_uninterrupted_run(
    pg_url: str, second_pg_url: str, tmp_path: Path, crash_point: str
) -> None:
    """A process killed between committing day 1 to PostgreSQL and saving the generator's state
    left state that still ended the day before: the next advance simulated day 1 again and
    collided with its own rows (duplicate key) for good."""
    homes = {"straight": tmp_path / "straight", "killed": tmp_path / "killed"}
    urls = {"straight": pg_url, "killed": second_pg_url}
    for name, home in homes.items():
        warehouse = f"duckdb:///{home / 'warehouse.duckdb'}"
        generate_into(80, 1, 3, END, "Asia/Tokyo", urls[name], warehouse, home / "truth")
    straight = homes["straight"]
    advance_into(3, pg_url, f"duckdb:///{straight / 'warehouse.duckdb'}", straight / "truth")

    killed = homes["killed"]
    warehouse = f"duckdb:///{killed / 'warehouse.duckdb'}"
    script = _KILL_ADVANCE.format(patch=_CRASH_POINTS[crash_point])
    args = ["2", second_pg_url, warehouse, str(killed / "truth")]
    process = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=Path(__file__).resolve().parents[2],  # `-c` imports from the working folder
        capture_output=True,
        text=True,
        check=False,
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    with psycopg.connect(second_pg_url) as conn:
        latest = conn.execute("SELECT max(authorized_at) FROM card_transactions").fetchone()
    assert latest is not None and latest[0] >= day_start_utc(END + timedelta(days=1))

    advance_into(2, second_pg_url, warehouse, killed / "truth")

    assert _pg_rows(second_pg_url) == _pg_rows(pg_url)
    truths = [pq.read_table(home / "truth" / "deferred_charges.parquet") for home in homes.values()]
    assert truths[0].equals(truths[1])
    events = []
    for home in homes.values():
        with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
            events.append(conn.execute("SELECT * FROM app_events ORDER BY event_id").fetchall())
    assert events[0] == events[1]


def _sqlite_world(home: Path, seed: int = 3) -> tuple[str, str, Path]:
    """A small generated world in SQLite and DuckDB under `home`: source, warehouse, truth folder."""
    urls = (f"sqlite:///{home / 'source.db'}", f"duckdb:///{home / 'warehouse.duckdb'}")
    generate_into(80, 1, seed, END, "Asia/Tokyo", *urls, home / "truth", replace=True)
    return urls[0], urls[1], home / "truth"


def _sqlite_rows(home: Path) -> list[list[tuple[object, ...]]]:
    """Every row of the four source tables, in key order."""
    import sqlite3

    with sqlite3.connect(home / "source.db") as conn:
        return [
            conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
            for t in ("users", "card_transactions", "topups", "deferred_charges")
        ]


def test_generate_writes_the_truth_the_simulation_drew(tmp_path: Path) -> None:
    _, _, truth_dir = _sqlite_world(tmp_path)
    drawn = generate(80, 1, seed=3, end_date=END).truth
    assert pq.read_table(truth_dir / "deferred_charges.parquet").equals(drawn)


def test_a_state_save_that_dies_half_way_leaves_the_previous_state_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state's files were rewritten in place one after the other: a disk filling up after
    the population was written left it a day ahead of the charges and meta.json, and the next
    advance ran on that mixture without a word."""
    from datagen.generator import Simulation

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    advance_into(2, *_sqlite_world(straight))
    source, warehouse, truth_dir = _sqlite_world(resumed)
    before = Simulation.load(truth_dir / "generator")

    real_write = pq.write_table

    def disk_full_on_charges(table: pa.Table, where: Any, **kwargs: Any) -> None:
        if "due_day" in table.column_names:
            raise OSError(28, "No space left on device")
        real_write(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", disk_full_on_charges)
    with pytest.raises(AdvanceStopped, match="No space left") as stopped:
        advance_into(1, source, warehouse, truth_dir)
    assert f"holds every day through {END + timedelta(days=1)}" in str(stopped.value)
    monkeypatch.undo()

    after = Simulation.load(truth_dir / "generator")
    assert after.last_day == before.last_day == END
    assert after.pop.to_arrow().equals(before.pop.to_arrow())
    assert not [p.name for p in (truth_dir / "generator").iterdir() if p.name.endswith(".tmp")]
    report = advance_into(1, source, warehouse, truth_dir)
    assert report.recovered == [END + timedelta(days=1)]
    assert report.last_day == END + timedelta(days=2)
    assert _sqlite_rows(resumed) == _sqlite_rows(straight)


def _truncate_meta(state: Path) -> str:
    (state / "meta.json").write_text("")
    return "meta.json"


def _cut_meta_in_half(state: Path) -> str:
    text = (state / "meta.json").read_text()
    (state / "meta.json").write_text(text[: len(text) // 2])
    return "meta.json"


def _truncate_population(state: Path) -> str:
    import json

    name = json.loads((state / "meta.json").read_text())["files"]["population"]
    data = (state / name).read_bytes()
    (state / name).write_bytes(data[: len(data) // 2])
    return str(name)


@pytest.mark.parametrize("damage", [_truncate_meta, _cut_meta_in_half, _truncate_population])
def test_a_damaged_state_file_is_one_error_naming_it_and_the_way_out(
    tmp_path: Path, damage: Callable[[Path], str]
) -> None:
    """An empty or cut meta.json failed as `Expecting value: line 1 column 1 (char 0)`, a cut
    Parquet file as Arrow's parse error: neither said which file, nor what to do."""
    from datagen.generator import StateDamaged

    source, warehouse, truth_dir = _sqlite_world(tmp_path)
    name = damage(truth_dir / "generator")
    with pytest.raises(StateDamaged) as caught:
        advance_into(1, source, warehouse, truth_dir)
    message = str(caught.value)
    assert f"generator state at {truth_dir / 'generator'} is damaged ({name}:" in message
    assert "backup" in message and "paylater demo-data generate --replace" in message


def test_an_advance_refuses_the_state_of_another_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A generate --replace dying after its commit left the previous world's state beside the
    new world's rows: advance simulated the old world on top of them."""
    import datagen.pipeline as pipeline

    source, warehouse, truth_dir = _sqlite_world(tmp_path, seed=3)

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_persist", killed)
    with pytest.raises(KeyboardInterrupt):
        _sqlite_world(tmp_path, seed=4)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"not of the world .* generate --replace"):
        advance_into(1, source, warehouse, truth_dir)


def test_a_state_saved_before_files_were_named_still_advances(tmp_path: Path) -> None:
    import json

    straight, legacy = tmp_path / "straight", tmp_path / "legacy"
    advance_into(1, *_sqlite_world(straight))
    source, warehouse, truth_dir = _sqlite_world(legacy)
    state = truth_dir / "generator"
    meta = json.loads((state / "meta.json").read_text())
    for table, name in meta.pop("files").items():
        (state / name).rename(state / f"{table}.parquet")
    del meta["world"]
    (state / "meta.json").write_text(json.dumps(meta))
    with sqlite3.connect(legacy / "source.db") as conn:
        conn.execute("DROP TABLE datagen_progress")
    advance_into(1, source, warehouse, truth_dir)
    assert _sqlite_rows(legacy) == _sqlite_rows(straight)
    assert sorted(p.name for p in state.iterdir() if p.name.startswith("population")) != [
        "population.parquet"
    ]


def _world(
    url: str, home: Path
) -> tuple[list[list[tuple[object, ...]]], list[tuple[object, ...]], bytes, bytes]:
    """What a world leaves: source rows, warehouse app events, state meta and truth file."""
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        events = conn.execute("SELECT * FROM app_events ORDER BY event_id").fetchall()
    truth = home / "truth"
    meta = (truth / "generator" / "meta.json").read_bytes()
    return _pg_rows(url), events, meta, (truth / "deferred_charges.parquet").read_bytes()


@pytest.mark.postgres
def test_a_replace_failing_part_way_leaves_the_previous_world_whole(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """generate --replace dropped the warehouse's app_events before writing the new world: a
    failure part way rolled the source back to the old world, whose app events were gone."""
    import datagen.pipeline as pipeline

    warehouse = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    generate_into(80, 2, 3, END, "Asia/Tokyo", pg_url, warehouse, tmp_path / "truth")
    before = _world(pg_url, tmp_path)
    assert before[1]  # the old world has app events to lose

    real_write = pipeline.write_app_event_days
    calls: list[int] = []

    def failing_second_chunk(
        warehouse: Any, days: Iterable[tuple[date, pa.Table]], table_name: str = "app_events"
    ) -> int:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(warehouse, days, table_name)

    monkeypatch.setattr(pipeline, "write_app_event_days", failing_second_chunk)
    with pytest.raises(OSError, match="disk full"):
        generate_into(90, 2, 4, END, "Asia/Tokyo", pg_url, warehouse, tmp_path / "truth", True)
    monkeypatch.undo()

    assert len(calls) == 2  # it failed part way, after a chunk was written
    assert _world(pg_url, tmp_path) == before
    with duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True) as conn:
        tables = conn.execute("SELECT table_name FROM information_schema.tables").fetchall()
    assert tables == [("app_events",)]  # the new world's half is not left behind either
    advance_into(1, pg_url, warehouse, tmp_path / "truth")  # and the old world goes on


@pytest.mark.postgres
def test_a_replace_failing_after_its_source_commit_says_to_rerun_and_a_rerun_repairs(
    pg_url: str, second_pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure between the source's commit and the state's save must not let advance run on
    mixed worlds; the error says so, and generate --replace again gives the straight result."""
    import datagen.pipeline as pipeline

    homes = {"straight": tmp_path / "straight", "failed": tmp_path / "failed"}
    urls = {"straight": pg_url, "failed": second_pg_url}
    warehouses = {n: f"duckdb:///{h / 'warehouse.duckdb'}" for n, h in homes.items()}
    for name, home in homes.items():
        generate_into(80, 1, 3, END, "Asia/Tokyo", urls[name], warehouses[name], home / "truth")
    straight, failed = homes["straight"], homes["failed"]
    args = ("Asia/Tokyo", second_pg_url, warehouses["failed"], failed / "truth", True)

    def broken(*_: object) -> None:
        raise OSError("warehouse gone")

    for step in ("_swap_in_app_events", "_persist"):
        monkeypatch.setattr(pipeline, step, broken)
        with pytest.raises(pipeline.GenerateIncomplete, match=r"generate --replace") as caught:
            generate_into(90, 1, 4, END, *args)
        assert "warehouse gone" in str(caught.value)
        monkeypatch.undo()
        with pytest.raises(ValueError, match=r"not of the world .* generate --replace"):
            advance_into(1, second_pg_url, warehouses["failed"], failed / "truth")

    generate_into(90, 1, 4, END, *args)
    generate_into(
        90, 1, 4, END, "Asia/Tokyo", pg_url, warehouses["straight"], straight / "truth", True
    )
    left, right = _world(pg_url, straight), _world(second_pg_url, failed)
    assert left[0] == right[0] and left[1] == right[1]
    with duckdb.connect(str(failed / "warehouse.duckdb"), read_only=True) as conn:
        tables = conn.execute("SELECT table_name FROM information_schema.tables").fetchall()
    assert ("app_events_generating",) not in tables


@pytest.mark.postgres
def test_a_warehouse_that_cannot_be_opened_leaves_no_source_connection_open(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """generate and advance opened the source, then the warehouse: when the warehouse failed to
    open, the source connection stayed open until the process ended."""
    import datagen.pipeline as pipeline
    from datagen.load import PostgresSource
    from tasks.warehouse import WarehouseError

    good = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    generate_into(80, 1, 3, END, "Asia/Tokyo", pg_url, good, tmp_path / "truth")
    opened: list[PostgresSource] = []

    def open_and_keep(url: str) -> PostgresSource:
        opened.append(PostgresSource(url))
        return opened[-1]

    monkeypatch.setattr(pipeline, "open_source", open_and_keep)
    bad = "nowhere://warehouse"
    runs: list[Callable[[], object]] = [
        lambda: generate_into(80, 1, 3, END, "Asia/Tokyo", pg_url, bad, tmp_path / "t2", True),
        lambda: advance_into(1, pg_url, bad, tmp_path / "truth"),
    ]
    for run in runs:
        with pytest.raises(WarehouseError):
            run()
    assert len(opened) == 2
    assert all(source.conn.closed for source in opened)


@pytest.mark.postgres
def test_an_advance_whose_source_goes_down_mid_run_says_so_and_resumes_to_an_uninterrupted_run(
    pg_url: str,
    second_pg_url: str,
    pg_server_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The source's server ending the connection after day 1 (a restart, a failover) escaped as
    a psycopg traceback that said neither what was kept nor what to do."""
    import datagen.pipeline as pipeline

    homes = {"straight": tmp_path / "straight", "cut": tmp_path / "cut"}
    urls = {"straight": pg_url, "cut": second_pg_url}
    warehouses = {name: f"duckdb:///{home / 'warehouse.duckdb'}" for name, home in homes.items()}
    for name, home in homes.items():
        generate_into(80, 1, 3, END, "Asia/Tokyo", urls[name], warehouses[name], home / "truth")
    advance_into(3, pg_url, warehouses["straight"], homes["straight"] / "truth")

    real_persist = pipeline._persist
    database = second_pg_url.rpartition("/")[2]

    def persist_then_cut_the_source(sim: Any, truth_dir: Path) -> None:
        real_persist(sim, truth_dir)
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )

    monkeypatch.setattr(pipeline, "_persist", persist_then_cut_the_source)
    cut = homes["cut"]
    with pytest.raises(AdvanceStopped) as stopped:
        advance_into(3, second_pg_url, warehouses["cut"], cut / "truth")
    message = str(stopped.value)
    assert f"through {END + timedelta(days=1)}" in message
    assert "paylater demo-data advance" in message
    assert second_pg_url.split("@")[0].split(":")[-1] not in message  # no password
    monkeypatch.setattr(pipeline, "_persist", real_persist)

    advance_into(2, second_pg_url, warehouses["cut"], cut / "truth")
    assert _pg_rows(second_pg_url) == _pg_rows(pg_url)


def _as_an_earlier_release_left_it(source_db: Path, state: Path) -> None:
    """No datagen_progress in the source and no world in the state, as before they were recorded."""
    import json

    with sqlite3.connect(source_db) as conn:
        conn.execute("DROP TABLE datagen_progress")
    meta = json.loads((state / "meta.json").read_text())
    meta["world"] = ""
    (state / "meta.json").write_text(json.dumps(meta))


def test_a_source_of_an_earlier_release_advances_and_is_given_its_progress_record(
    tmp_path: Path,
) -> None:
    straight, old = tmp_path / "straight", tmp_path / "old"
    advance_into(2, *_sqlite_world(straight))
    source, warehouse, truth_dir = _sqlite_world(old)
    _as_an_earlier_release_left_it(old / "source.db", truth_dir / "generator")
    advance_into(1, source, warehouse, truth_dir)
    advance_into(1, source, warehouse, truth_dir)
    with sqlite3.connect(old / "source.db") as conn:
        (last_day,) = conn.execute("SELECT last_day FROM datagen_progress").fetchone()
    assert last_day == (END + timedelta(days=2)).isoformat()
    assert _sqlite_rows(old) == _sqlite_rows(straight)


def test_a_source_of_an_earlier_release_ahead_of_its_state_is_refused_saying_why(
    tmp_path: Path,
) -> None:
    """An earlier release's advance that stopped between its commit and its state save left the
    source a day ahead with no record of it: the next advance wrote that day again and died on
    a duplicate key, an error telling the operator to run it again, forever."""
    import shutil

    home = tmp_path / "old"
    source, warehouse, truth_dir = _sqlite_world(home)
    state = truth_dir / "generator"
    shutil.copytree(state, tmp_path / "state_before")
    advance_into(1, source, warehouse, truth_dir)
    shutil.rmtree(state)
    shutil.copytree(tmp_path / "state_before", state)
    _as_an_earlier_release_left_it(home / "source.db", state)
    rows = _sqlite_rows(home)

    with pytest.raises(ValueError, match="earlier release") as refused:
        advance_into(1, source, warehouse, truth_dir)
    message = str(refused.value)
    assert f"ends on {END}" in message and "paylater demo-data generate --replace" in message
    assert _sqlite_rows(home) == rows


@pytest.mark.postgres
def test_a_postgres_source_of_an_earlier_release_ahead_of_its_state_is_refused(
    pg_url: str, tmp_path: Path
) -> None:
    import json
    import shutil

    warehouse = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    truth_dir = tmp_path / "truth"
    generate_into(40, 1, 3, END, "Asia/Tokyo", pg_url, warehouse, truth_dir)
    state = truth_dir / "generator"
    shutil.copytree(state, tmp_path / "state_before")
    advance_into(1, pg_url, warehouse, truth_dir)
    shutil.rmtree(state)
    shutil.copytree(tmp_path / "state_before", state)
    with psycopg.connect(pg_url) as conn:
        conn.execute("DROP TABLE datagen_progress")
    meta = json.loads((state / "meta.json").read_text())
    meta["world"] = ""
    (state / "meta.json").write_text(json.dumps(meta))
    rows = _pg_rows(pg_url)

    with pytest.raises(ValueError, match="earlier release"):
        advance_into(1, pg_url, warehouse, truth_dir)
    assert _pg_rows(pg_url) == rows
