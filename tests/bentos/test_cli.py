"""`paylater bento import`: a registry stage or version into the BentoML model store."""

from __future__ import annotations

import socket

import bentoml
import pytest
from typer.testing import CliRunner

from bentos.cli import app


def unreachable_package_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point uv, which BentoML locks the bento's packages with, at a loopback port nobody
    listens on, and let it give up at the first refusal: its default 3 retries with backoff
    cost about 9 s per build and prove nothing more than one refused connection does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("UV_INDEX_URL", f"http://127.0.0.1:{closed}/simple")
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")


def test_import_by_stage_and_version(serving_env: dict[str, str]) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["import", "--stage", "staging"])
    assert result.exit_code == 0, result.output
    staging = f"paylater-default:{serving_env['staging_version']}"
    assert result.output.strip().endswith(staging)
    model = bentoml.models.get(staging)
    assert model.info.labels["registry_version"] == serving_env["staging_version"]
    assert model.info.labels["feature_sql_hash"] == "sqlhash1"
    assert model.info.labels["git_commit"] == "abc123"
    feature_names = model.info.metadata["feature_names"]
    assert isinstance(feature_names, list), feature_names
    assert feature_names[:2] == ["request_amount_jpy", "request_fee_jpy"]

    result = runner.invoke(app, ["import", "--version", serving_env["production_version"]])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(f"paylater-default:{serving_env['production_version']}")


def test_import_rejects_ambiguous_or_unknown_stage(serving_env: dict[str, str]) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["import", "--stage", "staging", "--version", "1"]).exit_code != 0
    result = runner.invoke(app, ["import", "--stage", "qa"])
    assert result.exit_code != 0
    assert "production or staging" in result.output


def test_import_of_a_missing_version_is_one_error_line(serving_env: dict[str, str]) -> None:
    result = CliRunner().invoke(app, ["import", "--version", "999"])
    assert result.exit_code == 1, result.output
    (line,) = result.output.splitlines()
    assert line.startswith("error: cannot load model '999': ")


@pytest.mark.parametrize("args", [["--stage", "production"], ["--version", "42"]])
def test_an_import_while_the_tracking_server_is_down_is_one_error_line_in_seconds(
    serving_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """A service or worker starting during an MLflow outage spent about 4 minutes in MLflow's
    retries before failing; it now says which server did not answer, in seconds."""
    import time

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    started = time.monotonic()
    result = CliRunner().invoke(app, ["import", *args])
    assert time.monotonic() - started < 15
    assert result.exit_code == 1, result.output
    (line,) = result.output.splitlines()
    assert f"MLflow tracking server {url} is unreachable" in line, line


def test_a_failed_rebuild_keeps_the_bento_it_was_to_replace(
    serving_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """promote and rollback rebuild the version's bento, deleting the old one first: a build that
    failed (here the package index cannot be reached, so BentoML cannot lock the packages) left
    no bento at all, and a rollback took away the very bento its hint says to serve."""
    from bentos.build import build_bento
    from registry.hooks import build_bento as rebuild_after_transition

    version = serving_env["staging_version"]
    tag = build_bento(version)
    built_at = bentoml.bentos.get(tag).info.creation_time
    unreachable_package_index(monkeypatch)
    outcome = rebuild_after_transition(version)
    assert outcome.startswith("failed: ") and "lock" in outcome, outcome
    kept = bentoml.bentos.get(tag)
    assert kept.info.creation_time == built_at
    assert [str(m.tag) for m in kept.info.models] == [f"paylater-default:{version}"]


def test_a_bento_build_that_fails_is_one_error_line(
    serving_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`paylater bento build` with the package index out of reach printed BentoML's traceback
    (167 lines) instead of saying what failed."""
    unreachable_package_index(monkeypatch)
    version = serving_env["production_version"]
    result = CliRunner().invoke(app, ["build", "--version", version])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: building paylater-scorer:{version} failed: "), result.output
    assert "lock" in last, last
