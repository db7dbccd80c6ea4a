"""`registry reproduce`: retraining from the logged dataset, params and seed gives identical predictions."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from typer.testing import CliRunner

from paylater.cli import app
from registry.runs import REPO_ROOT, git_commit
from registry.store import MODEL_NAME, client


def test_reproduce_gives_identical_predictions_and_refuses_changed_data(
    registry_home: Path, good_candidate: Any, register: Callable[..., str]
) -> None:
    version = register(good_candidate)
    runner = CliRunner()
    result = runner.invoke(app, ["registry", "reproduce", version])
    assert result.exit_code == 0, result.output
    assert "IDENTICAL" in result.output
    assert client().get_model_version(MODEL_NAME, version).tags["reproduce_check"] == "passed"

    part = Path(urlparse(good_candidate.dataset.uri).path)
    original = part.read_bytes()
    try:
        part.write_bytes(original + b"\0")
        result = runner.invoke(app, ["registry", "reproduce", version])
    finally:
        part.write_bytes(original)
    assert result.exit_code == 1
    assert "data changed" in result.output


def worktrees() -> list[str]:
    """This checkout's git worktrees."""
    listed = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "list", "--porcelain"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in listed.splitlines() if line.startswith("worktree ")]


def test_reproduce_at_the_logged_commit_runs_that_commits_code(
    registry_home: Path, good_candidate: Any, register: Callable[..., str]
) -> None:
    head, _ = git_commit()
    if head == "unknown":
        pytest.skip("needs a git checkout")
    before = worktrees()
    version = register(good_candidate)
    runner = CliRunner()
    result = runner.invoke(app, ["registry", "reproduce", version, "--at-logged-commit"])
    assert result.exit_code == 0, result.output
    assert f"with the code of commit {head}:" in result.output
    assert "IDENTICAL" in result.output
    assert worktrees() == before

    # Logged at the previous commit: the child reports no commit mismatch, so it ran in a
    # checkout of that commit (its own git_commit() is the logged one), not in this one.
    previous = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--verify", "-q", "HEAD~1"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if previous:
        client().set_model_version_tag(MODEL_NAME, version, "git_commit", previous)
        result = runner.invoke(app, ["registry", "reproduce", version, "--at-logged-commit"])
        assert f"with the code of commit {previous}:" in result.output
        assert f"version {version}: retrained from" in result.output, result.output
        assert "note: logged at commit" not in result.output
        assert worktrees() == before

    client().set_model_version_tag(MODEL_NAME, version, "git_commit", "0" * 40)
    result = runner.invoke(app, ["registry", "reproduce", version, "--at-logged-commit"])
    assert result.exit_code == 1
    assert f"trained at commit {'0' * 40}, which this repository" in result.output
    client().set_model_version_tag(MODEL_NAME, version, "git_commit", "unknown")
    result = runner.invoke(app, ["registry", "reproduce", version, "--at-logged-commit"])
    assert result.exit_code == 1
    assert "logged without a git commit" in result.output
    assert worktrees() == before


def test_commit_outside_a_git_checkout_comes_from_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow-run image has no .git; its Dockerfile passes the commit as PAYLATER_GIT_COMMIT."""
    from registry import runs

    monkeypatch.setattr(runs, "REPO_ROOT", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.delenv("PAYLATER_GIT_COMMIT", raising=False)
    assert runs.git_commit() == ("unknown", False)
    monkeypatch.setenv("PAYLATER_GIT_COMMIT", "0123abc")
    assert runs.git_commit() == ("0123abc", False)


def test_a_version_this_checkouts_code_cannot_retrain_gets_one_clear_line(
    registry_home: Path, good_candidate: Any, register: Callable[..., str]
) -> None:
    """A version logged by code whose training params differ from this checkout's (a parameter
    added since): reproduce said so with a pydantic traceback, not what to do about it."""
    import json

    from registry.runs import PARAMS_PATH

    version = register(good_candidate)
    c = client()
    original = c.get_model_version(MODEL_NAME, version)
    older = c.create_run(c.get_run(str(original.run_id)).info.experiment_id).info.run_id
    params = json.loads(good_candidate.params.model_dump_json())
    del params["max_bin"]  # the older code did not know it
    c.log_text(older, json.dumps(params), PARAMS_PATH)
    c.set_terminated(older)
    logged_by_older = c.create_model_version(
        MODEL_NAME, str(original.source), run_id=older, tags=original.tags
    ).version

    result = CliRunner().invoke(app, ["registry", "reproduce", str(logged_by_older)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert f"version {logged_by_older} cannot be retrained by this checkout's code" in lines[0]
    assert "max_bin" in lines[0] and "--at-logged-commit" in lines[0]
