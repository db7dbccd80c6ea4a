"""The `paylater` CLI's own commands: a misconfiguration is one `error:` line and exit code 1."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from paylater.cli import app
from paylater.testing import duckdb_held_elsewhere

BACKFILL = ["backfill", "--start", "2026-11-01", "--end", "2026-11-02"]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        (
            "PAYLATER_WAREHOUSE_URL",
            "postgres://db/warehouse",
            "warehouse URL 'postgres://db/warehouse'",
        ),
        ("PAYLATER_SYNC_READERS", "two", "PAYLATER_SYNC_READERS"),
    ],
)
def test_backfill_misconfigured_is_one_error_line(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    result = CliRunner().invoke(app, BACKFILL)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line.startswith("error: ") and expected in line


def settings_refusal(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> str:
    """`paylater settings` with `variable` set to `value`: exit status 1 and one line, returned."""
    monkeypatch.setenv(variable, value)
    result = CliRunner().invoke(app, ["settings"])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    return line


def test_settings_misconfigured_is_one_error_line(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = settings_refusal(monkeypatch, "PAYLATER_SYNC_READERS", "two")
    assert line.startswith("error: PAYLATER_SYNC_READERS") and "'two'" in line


def test_settings_masks_passwords(paylater_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYLATER_SOURCE_URL", "postgresql://app:s3cret@db:5432/ops")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://ml:hunter2@db/mlflow")
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output and "hunter2" not in result.output
    assert "postgresql://app:***@db:5432/ops" in result.output
    assert "postgresql://ml:***@db/mlflow" in result.output
    # Every line: a URL's password in any scheme, a secret in its query string.
    monkeypatch.setenv("PAYLATER_DATASET_URL", "s3://bucket/ds?token=Wr0ngSecret")
    monkeypatch.setenv("PAYLATER_WAREHOUSE_URL", "duckdb:///w.duckdb?password=Wr0ngSecret")
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 0 and "Wr0ngSecret" not in result.output, result.output
    assert "s3://bucket/ds?token=***" in result.output


def test_backfill_of_a_day_not_ended_is_refused_before_running(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from paylater import backfill as bf
    from paylater.timeutil import today

    ran: list[object] = []

    def record(*args: object, **kwargs: object) -> list[object]:
        ran.append(args)
        return []

    monkeypatch.setattr(bf, "backfill", record)
    last_day = today()
    result = CliRunner().invoke(
        app, ["backfill", "--start", "2026-01-01", "--end", last_day.isoformat()]
    )
    assert result.exit_code == 1, result.output
    (line,) = result.output.splitlines()
    assert line.startswith(f"error: --end {last_day} has not ended yet in Asia/Tokyo")
    assert ran == []


def test_unknown_time_zone_is_one_error_line(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAYLATER_TIMEZONE", "Nowhere/X")
    for args in (["settings"], BACKFILL):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, result.output
        (line,) = result.output.splitlines()
        assert line.startswith("error: PAYLATER_TIMEZONE: ") and "unknown time zone" in line


@pytest.mark.parametrize("command", ["enqueue", "worker"])
def test_unreachable_queue_database_is_one_error_line(paylater_home: Path, command: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://app:s3cret@127.0.0.1:{port}/queue"
    args = {
        "enqueue": ["enqueue", "--user-id", "1", "--amount-jpy", "5000"],
        "worker": ["worker", "--backend", "http", "--url", "http://127.0.0.1:9"],
    }[command]
    result = CliRunner().invoke(app, [*args, "--database-url", url])
    assert result.exit_code == 1, result.output
    (line,) = result.output.splitlines()
    assert line.startswith(
        f"error: cannot reach the queue database postgresql://app:***@127.0.0.1:{port}/queue: "
    )


def test_backfill_with_the_warehouse_locked_by_another_process_is_one_error_line(
    paylater_home: Path,
) -> None:
    """A DuckDB warehouse another process holds (a scheduled sync, a notebook)."""
    with duckdb_held_elsewhere(paylater_home / "warehouse.duckdb"):
        result = CliRunner().invoke(app, BACKFILL)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    *_, line = result.output.splitlines()
    assert line.startswith("error: backfill stopped: 2026-11-01 failed (checking it: ")
    assert "lock" in line


@pytest.mark.parametrize("flag", ["--start", "--end"])
def test_backfill_with_a_date_that_does_not_exist_names_the_flag(
    paylater_home: Path, flag: str
) -> None:
    args = {"--start": "2026-11-01", "--end": "2026-11-02", flag: "2026-02-30"}
    result = CliRunner().invoke(app, ["backfill", *[x for kv in args.items() for x in kv]])
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line == f"error: {flag} must be a date like 2026-11-26, got '2026-02-30'"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PAYLATER_MONITOR_PSI_IGNORE", "topup_days_since_last"),  # a bare name, not a JSON list
        ("PAYLATER_FEATURE_TABLES", '{"users": "my.users"'),
    ],
)
def test_a_setting_that_is_not_json_names_its_variable_and_value(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    line = settings_refusal(monkeypatch, variable, value)
    assert line.startswith(f"error: {variable}: not valid JSON (")
    assert line.endswith(f"(got {value!r})")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PAYLATER_FEATURE_TABLES", '{"users": "postgresql://app:Wr0ngSecret@db/ops"'),  # not JSON
        ("PAYLATER_FEATURE_TABLES", '"postgresql://app:Wr0ngSecret@db/ops"'),  # not a map
    ],
)
def test_an_invalid_setting_never_prints_the_password_it_holds(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """The value echoed after 'got' was printed as typed, a URL's password included."""
    line = settings_refusal(monkeypatch, variable, value)
    assert line.startswith(f"error: {variable}: ")
    assert "Wr0ngSecret" not in line and "postgresql://app:***@db/ops" in line


def test_an_invalid_boolean_setting_names_the_accepted_values(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    line = settings_refusal(monkeypatch, "PAYLATER_GATE_ALLOW_FEATURE_CHANGES", "maybe")
    assert line.startswith("error: PAYLATER_GATE_ALLOW_FEATURE_CHANGES: ")
    assert "true or false" in line and "(got 'maybe')" in line


def _documented_invocations() -> list[tuple[str, str]]:
    """Every `paylater …` span of the README and docs/*.md: (file, command line)."""
    import re

    root = Path(__file__).resolve().parents[2]
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return [
        (path.name, " ".join(span.split()))
        for path in files
        for span in re.findall(r"`(paylater [^`|]*)`", path.read_text())
    ]


@pytest.mark.parametrize(("document", "line"), _documented_invocations())
def test_every_command_the_docs_show_exists_with_its_flags(document: str, line: str) -> None:
    """A command or flag the README or runbook tells an operator to type is one `--help` lists."""
    import typer

    command = typer.main.get_command(app)
    words = line.split()[1:]
    while hasattr(command, "commands") and words and not words[0].startswith("-"):
        sub = command.commands.get(words[0])
        if sub is None:
            break
        words.pop(0)
        command = sub
    assert not (hasattr(command, "commands") and words and not words[0].startswith("-")), (
        f"{document}: `{line}` names no command"
    )
    flags = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for word in words:
        if word.startswith("--"):
            assert word.split("=")[0] in flags | {"--help"}, f"{document}: `{line}`: {word}"


@pytest.mark.parametrize(
    "args",
    [
        ["enqueue", "--user-id", "1", "--amount-jpy", "5000"],
        ["worker", "--backend", "http", "--url", "http://127.0.0.1:9"],
    ],
)
def test_an_invalid_setting_is_one_error_line_for_every_command(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """`paylater enqueue` and `paylater worker` printed pydantic's multi-line ValidationError
    traceback for a mistyped PAYLATER_* variable."""
    monkeypatch.setenv("PAYLATER_SYNC_READERS", "two")
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    (line,) = result.output.splitlines()
    assert line == (
        "error: PAYLATER_SYNC_READERS: Input should be a valid integer, unable to parse string"
        " as an integer (got 'two')"
    )


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("PAYLATER_WORKER_BACKEND", "grpc", "'inprocess' or 'http'"),
        ("PAYLATER_WORKER_REASON_CODES", "some", "'declines' or 'all'"),
    ],
)
def test_a_worker_choice_setting_out_of_its_values_fails_settings_naming_them(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, accepted: str
) -> None:
    """A wrong backend or reason-code mode is caught by `paylater settings`, not first by a
    worker starting in production."""
    monkeypatch.setenv(variable, value)
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 1, result.output
    (line,) = result.output.splitlines()
    assert line.startswith(f"error: {variable}: ") and accepted in line
    assert f"(got '{value}')" in line


def test_worker_choice_settings_take_any_letter_case_as_the_worker_always_did(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`PAYLATER_WORKER_BACKEND=HTTP` started an http worker before: still valid, as 'http'
    (and the reason-code mode, checked alongside, takes any case too)."""
    from paylater.settings import get_settings

    monkeypatch.setenv("PAYLATER_WORKER_BACKEND", " HTTP")
    monkeypatch.setenv("PAYLATER_WORKER_REASON_CODES", "All")
    settings = get_settings()
    assert (settings.worker_backend, settings.worker_reason_codes) == ("http", "all")


def test_settings_prints_the_queue_database_masked_and_says_when_it_is_the_source(
    paylater_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every runbook query runs against the queue database: `paylater settings` names it."""
    monkeypatch.setenv("PAYLATER_SOURCE_URL", "postgresql://app:s3cret@db:5432/ops")
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 0, result.output
    queue_line = next(line for line in result.output.splitlines() if line.startswith("queue "))
    assert queue_line.split(None, 1)[1] == "postgresql://app:***@db:5432/ops (default: the source)"
    monkeypatch.setenv("PAYLATER_WORKER_DATABASE_URL", "postgresql://q:hunter2@qdb/jobs")
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 0 and "hunter2" not in result.output, result.output
    queue_line = next(line for line in result.output.splitlines() if line.startswith("queue "))
    assert queue_line.split(None, 1)[1] == "postgresql://q:***@qdb/jobs"


def test_settings_says_a_sqlite_source_cannot_be_the_queue(paylater_home: Path) -> None:
    """The embedded SQLite source cannot hold the queue: the line says what to set instead."""
    result = CliRunner().invoke(app, ["settings"])
    assert result.exit_code == 0, result.output
    queue_line = next(line for line in result.output.splitlines() if line.startswith("queue "))
    assert queue_line.startswith("queue      sqlite:///")
    assert "not PostgreSQL: set PAYLATER_WORKER_DATABASE_URL" in queue_line
