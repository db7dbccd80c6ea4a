"""`paylater demo-data` through Typer's runner on the embedded defaults."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from datagen.cli import app
from paylater.testing import duckdb_held_elsewhere

runner = CliRunner()


def test_generate_refuses_to_overwrite_then_advance_adds_a_day(paylater_home: Path) -> None:
    args = ["generate", "--users", "80", "--months", "1", "--seed", "4", "--end-date", "2026-06-30"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "card_transactions" in first.output and "2026-06-30" in first.output
    assert (paylater_home / "source.db").exists()
    truth = pq.read_table(paylater_home / "truth" / "deferred_charges.parquet")
    assert truth.column_names == ["charge_id", "default_probability"]

    again = runner.invoke(app, args)
    assert again.exit_code == 1
    assert "already holds data" in again.output and "--replace" in again.output

    advanced = runner.invoke(app, ["advance", "--days", "1"])
    assert advanced.exit_code == 0, advanced.output
    assert "2026-07-01" in advanced.output and "inserted" in advanced.output

    replaced = runner.invoke(app, [*args, "--replace"])
    assert replaced.exit_code == 0, replaced.output


def test_advance_without_generate_fails_clearly(paylater_home: Path) -> None:
    result = runner.invoke(app, ["advance"])
    assert result.exit_code == 1
    assert "demo-data generate" in result.output


def test_unreachable_postgres_source_is_one_clear_error(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("PAYLATER_SOURCE_URL", f"postgresql://nobody:x@127.0.0.1:{port}/nowhere")
    result = runner.invoke(app, ["generate", "--users", "10", "--months", "1"])
    assert result.exit_code == 1
    assert result.output.startswith("error: cannot connect to the source database")
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["generate", "--users", "10", "--months", "1"], ["advance"]])
def test_invalid_setting_is_one_error_line_naming_the_variable(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setenv("PAYLATER_TIMEZONE", "Mars/Olympus")
    result = runner.invoke(app, command)
    assert result.exit_code == 1
    assert result.output.startswith("error: PAYLATER_TIMEZONE: ")
    assert len(result.output.strip().splitlines()) == 1
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an uncaught error


def test_a_postgres_url_with_an_unknown_parameter_is_one_error_line(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYLATER_SOURCE_URL", "postgresql://app:pw@127.0.0.1/source?sslmod=require")
    result = runner.invoke(app, ["generate", "--users", "10", "--months", "1"])
    assert result.exit_code == 1
    assert result.output.startswith("error: cannot connect to the source database")
    assert "sslmod" in result.output and "pw@" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_a_warehouse_held_by_another_process_is_one_error_line(paylater_home: Path) -> None:
    """The DuckDB warehouse open elsewhere (a sync, a notebook): no traceback, the source as it was."""
    import sqlite3

    args = ["generate", "--users", "40", "--months", "1", "--seed", "4", "--end-date", "2026-06-30"]
    assert runner.invoke(app, args).exit_code == 0
    with duckdb_held_elsewhere(paylater_home / "warehouse.duckdb"):
        results = [runner.invoke(app, ["advance"]), runner.invoke(app, [*args, "--replace"])]
    for result in results:
        assert isinstance(result.exception, SystemExit), result.exception
        assert result.exit_code == 1
        (line,) = result.output.splitlines()
        assert line.startswith("error: ") and "lock" in line
    with sqlite3.connect(paylater_home / "source.db") as db:
        (latest,) = db.execute("SELECT max(requested_at) FROM deferred_charges").fetchone()
    assert latest < "2026-06-30T15:00"  # advance added no day (2026-07-01 starts then in UTC)


def test_an_end_date_that_does_not_exist_names_the_flag(paylater_home: Path) -> None:
    result = runner.invoke(app, ["generate", "--users", "10", "--end-date", "2026-02-30"])
    assert result.exit_code == 1
    assert result.output == "error: --end-date must be a date like 2026-11-26, got '2026-02-30'\n"


def test_a_negative_seed_is_refused_naming_it_before_anything_is_created(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flag = runner.invoke(app, ["generate", "--users", "5", "--months", "1", "--seed", "-1"])
    assert flag.exit_code == 2 and "--seed" in flag.output
    monkeypatch.setenv("PAYLATER_SEED", "-1")
    setting = runner.invoke(app, ["generate", "--users", "5", "--months", "1"])
    assert setting.exit_code == 1
    assert setting.output.startswith("error: PAYLATER_SEED: ")
    assert not (paylater_home / "source.db").exists()


def test_a_damaged_state_file_is_one_error_line_saying_how_to_recover(paylater_home: Path) -> None:
    args = ["generate", "--users", "40", "--months", "1", "--seed", "4", "--end-date", "2026-06-30"]
    assert runner.invoke(app, args).exit_code == 0
    (paylater_home / "truth" / "generator" / "meta.json").write_text("")
    result = runner.invoke(app, ["advance"])
    assert result.exit_code == 1
    assert "is damaged (meta.json:" in result.output
    assert "paylater demo-data generate --replace" in result.output
    assert "Traceback" not in result.output
    # The way out it names works.
    assert runner.invoke(app, [*args, "--replace"]).exit_code == 0
    advanced = runner.invoke(app, ["advance"])
    assert advanced.exit_code == 0, advanced.output


def test_a_generate_stopping_after_its_source_commit_is_one_error_saying_to_rerun(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datagen.pipeline as pipeline

    def disk_full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "_persist", disk_full)
    args = ["generate", "--users", "80", "--months", "1", "--seed", "4", "--end-date", "2026-06-30"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert result.output.startswith("error: generate stopped after committing the new world")
    assert "No space left" in result.output and "generate --replace" in result.output
    assert "Traceback" not in result.output


def test_a_postgres_url_libpq_cannot_parse_never_shows_its_password(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq quotes a URL it cannot parse whole, password included: one error line naming the
    problem, and neither it nor the exception chained to it holds the password."""
    import traceback

    monkeypatch.setenv("PAYLATER_SOURCE_URL", "postgresql://app:Wr0ngSecret@[::1/source")
    result = runner.invoke(app, ["generate", "--users", "10", "--months", "1"])
    assert result.exit_code == 1
    assert result.output.startswith("error: cannot connect to the source database")
    assert "IPv6" in result.output and "Wr0ngSecret" not in result.output, result.output
    assert result.exception is not None
    assert "Wr0ngSecret" not in "".join(traceback.format_exception(result.exception))


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 120 KiB tmpfs: a real file system that fills up (needs root to mount)."""
    import subprocess

    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=120k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _source_rows(home: Path) -> list[list[tuple[object, ...]]]:
    """Every row of the four source tables, in key order."""
    import sqlite3

    with sqlite3.connect(home / "source.db") as db:
        return [
            db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
            for t in ("users", "card_transactions", "topups", "deferred_charges")
        ]


def test_a_full_state_folder_stops_advance_with_one_line_and_a_rerun_resumes(
    paylater_home: Path, tmp_path: Path, small_tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state folder's disk filling up during an advance was an OSError traceback."""
    import shutil
    import subprocess

    args = ["generate", "--users", "50", "--months", "1", "--seed", "3", "--end-date", "2026-06-30"]
    straight = tmp_path / "straight"
    straight.mkdir()
    for home in (straight, paylater_home):
        monkeypatch.setenv("PAYLATER_HOME", str(home))
        assert runner.invoke(app, args).exit_code == 0
    monkeypatch.setenv("PAYLATER_HOME", str(straight))
    assert runner.invoke(app, ["advance", "--days", "3"]).exit_code == 0

    monkeypatch.setenv("PAYLATER_HOME", str(paylater_home))
    state = paylater_home / "truth" / "generator"
    shutil.copytree(state, small_tmpfs, dirs_exist_ok=True)
    shutil.rmtree(state)
    state.symlink_to(small_tmpfs)  # a save needs room for two states: this one has not
    result = runner.invoke(app, ["advance", "--days", "3"])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith("error: advance stopped") and "No space left on device" in line
    assert f"saving the truth and generator state in {paylater_home / 'truth'}" in line
    assert "paylater demo-data advance" in line

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    resumed = runner.invoke(app, ["advance", "--days", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert "recovered  2026-07-01" in resumed.output
    assert _source_rows(paylater_home) == _source_rows(straight)


def test_a_state_of_an_older_release_says_what_to_do(paylater_home: Path) -> None:
    """A state saved by an older release was refused as 'generator state version 1 is not 2',
    which said neither what it meant nor how to go on."""
    import json

    args = ["generate", "--users", "40", "--months", "1", "--seed", "4", "--end-date", "2026-06-30"]
    assert runner.invoke(app, args).exit_code == 0
    meta_file = paylater_home / "truth" / "generator" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["version"] = 1
    meta_file.write_text(json.dumps(meta))
    result = runner.invoke(app, ["advance"])
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert "version 1" in line and "an older release" in line
    assert "paylater demo-data generate --replace" in line


def test_the_end_date_help_names_the_zone_setting(paylater_home: Path) -> None:
    """--help said the default end date was 'yesterday in Tokyo'; it is yesterday in the business
    zone, PAYLATER_TIMEZONE (Asia/Tokyo only by default)."""
    result = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "yesterday in PAYLATER_TIMEZONE" in result.output and "in Tokyo" not in result.output


@contextlib.contextmanager
def source_locked_elsewhere(paylater_home: Path) -> Iterator[None]:
    """The SQLite source held by another process's write transaction (a migration, a notebook)."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
            str(paylater_home / "source.db"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    try:
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()


def test_a_source_locked_by_another_process_is_one_error_line_and_nothing_changes(
    paylater_home: Path,
) -> None:
    """An SQLite source another process was writing made generate and advance end in an ADBC
    traceback ('database is locked')."""
    args = ["generate", "--users", "30", "--months", "1", "--seed", "3", "--end-date", "2026-06-30"]
    assert runner.invoke(app, args).exit_code == 0
    rows = _source_rows(paylater_home)
    for command in (["advance"], [*args, "--replace"]):
        with source_locked_elsewhere(paylater_home):
            result = runner.invoke(app, command)
        assert isinstance(result.exception, SystemExit), result.exception
        assert result.exit_code == 1
        (line,) = result.output.splitlines()
        assert line.startswith("error: the source database") and "database is locked" in line
        assert "nothing was written" in line
    assert _source_rows(paylater_home) == rows


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--months", "30000", "--end-date", "2026-06-30"], "--months 30000 before --end-date"),
        (["--months", "1", "--end-date", "0001-01-15"], "--months 1 before --end-date"),
        (["--months", "1", "--end-date", "9999-12-30"], "--end-date 9999-12-30 is too late"),
    ],
)
def test_a_window_outside_the_calendar_names_the_flags_before_anything_is_created(
    paylater_home: Path, args: list[str], expected: str
) -> None:
    """A window reaching past year 1 or 9999 said only 'year -474 is out of range' (after the
    source schema had been created)."""
    result = runner.invoke(app, ["generate", "--users", "5", *args])
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith(f"error: {expected}")
    assert not (paylater_home / "source.db").exists()


@pytest.mark.parametrize("users", ["1000000000000", "99999999999999999999"])
def test_a_world_too_big_for_memory_is_one_error_line_naming_users(
    paylater_home: Path, users: str
) -> None:
    """--users 10^12 died in a MemoryError traceback; 10^20 said 'Maximum allowed dimension
    exceeded'."""
    result = runner.invoke(app, ["generate", "--users", users, "--months", "1"])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (1, 2)
    assert "--users" in result.output and "Traceback" not in result.output


def test_a_home_that_is_a_file_is_one_error_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PAYLATER_HOME naming a file (a typo, a mount gone) made generate end in a FileExistsError
    traceback."""
    home = tmp_path / "home"
    home.write_text("")
    monkeypatch.setenv("PAYLATER_HOME", str(home))
    for name in ("PAYLATER_SOURCE_URL", "PAYLATER_WAREHOUSE_URL"):
        monkeypatch.delenv(name, raising=False)
    result = runner.invoke(app, ["generate", "--users", "5", "--months", "1"])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith("error: ") and str(home) in line and "nothing was written" in line
