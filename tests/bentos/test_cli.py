"""`paylater bento import`: a registry stage or version into the BentoML model store."""

from __future__ import annotations

import bentoml
from typer.testing import CliRunner

from bentos.cli import app


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
    assert model.info.metadata["feature_names"][:2] == ["request_amount_jpy", "request_fee_jpy"]

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
