"""`paylater registry` commands, including a round trip against a real `mlflow server` (SQL backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from paylater.cli import app
from registry import policy
from registry.store import MODEL_NAME, client, require_reachable, server_clock


def test_round_trip_through_a_real_mlflow_server(
    mlflow_server: str,
    good_candidate: Any,
    register: Callable[..., str],
    gate_and_stage: Callable[..., Any],
    mark_verified: Callable[[str], None],
    place_lock: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert client().tracking_uri == mlflow_server
    require_reachable()  # the real server's /health
    versions = []
    for _ in range(2):
        version = register(good_candidate)
        assert gate_and_stage(good_candidate, version).passed
        mark_verified(version)
        versions.append(version)
    v1, v2 = versions
    assert isinstance(v1, str) and v1 == "1"
    runner = CliRunner()
    assert (
        runner.invoke(
            app, ["registry", "promote", v2, "--to", "production", "--reason", "r2"]
        ).exit_code
        == 0
    )
    rolled = runner.invoke(app, ["registry", "rollback", "--reason", "no earlier one"])
    assert rolled.exit_code == 1 and "no earlier production version" in rolled.output
    # Gated against production over HTTP: its training months come from its run's params.
    third = register(good_candidate)
    judged = gate_and_stage(good_candidate, third)
    assert judged.passed and judged.production_version == v2, judged.reasons
    assert "production_auc" in judged.checks
    versions.append(third)

    listing = runner.invoke(app, ["registry", "list"])
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    assert any(line.split()[:3] == [v2, "Production", "production"] for line in lines), (
        listing.output
    )
    assert any(line.split()[:2] == [v1, "Archived"] for line in lines), listing.output
    assert any(line.split()[:3] == [third, "Staging", "staging"] for line in lines), listing.output

    shown = runner.invoke(app, ["registry", "show", "production"])
    assert (
        shown.exit_code == 0
        and f"version   {v2}" in shown.output
        and "metric    auc" in shown.output
    )

    compared = runner.invoke(app, ["registry", "compare", v1, v2])
    assert compared.exit_code == 0 and "dataset_digest" in compared.output

    entries = [
        json.loads(line)
        for line in runner.invoke(app, ["registry", "history", "--json"]).output.splitlines()
    ]
    transitions = [(e["version"], e["from_stage"], e["to_stage"], e["action"]) for e in entries]
    assert (v1, "Staging", "Archived", "supersede") in transitions
    assert (v2, "Staging", "Production", "promote") in transitions
    assert transitions[-1] == (third, "None", "Staging", "stage")
    assert all(e["actor"] and e["at"] and e["server_ms"] for e in entries)

    regated = runner.invoke(app, ["registry", "regate", third])
    assert regated.exit_code == 0, regated.output
    assert f"v{third} against production v{v2}: PASSED" in regated.output

    # A machine whose clock runs an hour ahead must not take a live lock for one a dead process
    # left: the lock's age is read on the tracking server's clock (its Date header).
    c = client()
    live = f"dave | rolling back | {server_clock():.0f} | abc"
    place_lock(live)
    real_time = time.time
    monkeypatch.setattr(policy, "LOCK_WAIT_SECONDS", 0.0)
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    try:
        assert abs(server_clock() - real_time()) < 5, "the server's clock, not this machine's"
        refused = runner.invoke(app, ["registry", "rollback", "--reason", "incident"])
    finally:
        monkeypatch.setattr(time, "time", real_time)
    assert refused.exit_code == 1 and "rolling back by dave" in refused.output, refused.output
    assert policy._lock_holder(c) == live
    assert policy.resolve_version("production") == v2


def test_unlock_breaks_a_left_lock_naming_its_holder(
    registry_home: Path, place_lock: Callable[[str], None]
) -> None:
    runner = CliRunner()
    for _ in ("no registered model yet", "no lock"):
        unlocked = runner.invoke(app, ["registry", "unlock", "--reason", "nothing held"])
        assert unlocked.exit_code == 0 and "no transition lock is held" in unlocked.output
        c = client()
        if not policy.all_versions(c) and not c.search_registered_models():
            c.create_registered_model(MODEL_NAME)
    left = f"alice | promoting v7 | {time.time() - 42:.0f} | abc"
    place_lock(left)
    assert runner.invoke(app, ["registry", "unlock"]).exit_code == 2, "a reason is required"
    unlocked = runner.invoke(
        app, ["registry", "unlock", "--reason", "server died", "--actor", "bob"]
    )
    assert unlocked.exit_code == 0, unlocked.output
    assert "broke the transition lock held by promoting v7 by alice, 4" in unlocked.output
    tags = c.get_registered_model(MODEL_NAME).tags
    assert policy._lock_holder(c) is None
    assert tags["transition_lock_broken"].endswith(f"| server died | was: {left}")


def test_cli_errors_are_clear_and_change_nothing(registry_home: Path) -> None:
    runner = CliRunner()
    cases = [
        (
            ["registry", "promote", "3", "--to", "production", "--reason", "x"],
            1,
            "has no version 3",
        ),
        (["registry", "promote", "3", "--to", "production"], 2, "--reason"),
        (["registry", "rollback", "--reason", ""], 1, "reason is required"),
        (["registry", "show", "staging"], 1, "no version of paylater-default is in staging"),
        (["registry", "reproduce", "abc"], 1, "expected production, staging or a version number"),
        (
            ["registry", "verify", "--url", "http://127.0.0.1:9"],
            1,
            "exactly one of --stage or --version",
        ),
    ]
    for args, code, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output, (args, result.output)
    assert policy.all_versions(client()) == []
    assert runner.invoke(app, ["registry", "history"]).output == ""


def test_an_unreachable_registry_gives_one_clear_line(unreachable_registry: str) -> None:
    runner = CliRunner()
    for args in (
        ["registry", "list"],
        ["registry", "history"],
        ["registry", "show", "production"],
        ["registry", "promote", "3", "--to", "production", "--reason", "x"],
        ["registry", "rollback", "--reason", "x"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert isinstance(result.exception, SystemExit), (args, repr(result.exception))
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.output)
        assert unreachable_registry in lines[0] and "Connection refused" in lines[0], lines[0]


def test_history_of_a_version_that_is_not_a_number_is_refused(registry_home: Path) -> None:
    result = CliRunner().invoke(app, ["registry", "history", "--version", "latest"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "not a version number: 'latest'" in result.output


def test_promote_and_rollback_say_running_services_keep_their_version(
    registry_home: Path,
    good_candidate: Any,
    register: Callable[..., str],
    register_copy: Callable[[str], str],
    gate_and_stage: Callable[..., Any],
    mark_verified: Callable[[str], None],
) -> None:
    """A service or in-process worker loads its model once, at start: after a promotion or a
    rollback the operator is told to restart them, not left believing the change is live."""
    runner = CliRunner()
    versions: list[str] = []
    for _ in range(2):
        # The second: another retrain's version of the model logged once.
        version = register_copy(versions[0]) if versions else register(good_candidate)
        assert gate_and_stage(good_candidate, version).passed
        mark_verified(version)
        result = runner.invoke(
            app, ["registry", "promote", version, "--to", "production", "--reason", "ok"]
        )
        assert result.exit_code == 0, result.output
        assert f"restart them to serve v{version}" in result.output, result.output
        versions.append(version)
    rolled = runner.invoke(app, ["registry", "rollback", "--reason", "approval rate dropped"])
    assert rolled.exit_code == 0, rolled.output
    assert rolled.output.splitlines()[-1] == (
        f"serving: in-process workers scoring 'production' switch to v{versions[0]} within a"
        " minute; running services keep the version they loaded: restart them to serve"
        f" v{versions[0]} (bentoml serve paylater-scorer:{versions[0]} or"
        " bentos.service:PaylaterScorer)"
    )


def test_an_unreachable_registry_answers_in_seconds_by_default(
    unreachable_registry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLflow's own default retried for minutes."""
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    started = time.monotonic()
    result = CliRunner().invoke(app, ["registry", "show", "production"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: ") and unreachable_registry in result.output
    assert time.monotonic() - started < 30
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_promoting_the_production_version_again_says_nothing_changed(
    registry_home: Path,
    good_candidate: Any,
    register: Callable[..., str],
    gate_and_stage: Callable[..., Any],
    mark_verified: Callable[[str], None],
) -> None:
    """A promote repeated (the first one's answer was lost, or two people released together)
    changes nothing and says so, instead of a traceback."""
    runner = CliRunner()
    version = register(good_candidate)
    assert gate_and_stage(good_candidate, version).passed
    mark_verified(version)
    args = ["registry", "promote", version, "--to", "production", "--reason", "ok"]
    assert runner.invoke(app, args).exit_code == 0
    entries = len(runner.invoke(app, ["registry", "history"]).output.splitlines())

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output == f"v{version} is already in production: nothing changed\n"
    by_alias = runner.invoke(app, ["registry", "promote", "production", *args[3:]])
    assert by_alias.output == again.output, by_alias.output
    assert len(runner.invoke(app, ["registry", "history"]).output.splitlines()) == entries


def test_history_of_a_version_that_never_existed_says_so(
    registry_home: Path, good_candidate: Any, register: Callable[..., str]
) -> None:
    """An empty answer read as "nothing happened to v9"; a deleted version keeps its history."""
    runner = CliRunner()
    version = register(good_candidate)
    result = runner.invoke(app, ["registry", "history", "--version", "9"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "paylater-default has no version 9, and no history of one" in result.output

    client().delete_model_version("paylater-default", version)
    kept = runner.invoke(app, ["registry", "history", "--version", version])
    assert kept.exit_code == 0 and "register" in kept.output, kept.output


def test_finishing_an_interrupted_promote_names_the_production_version(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
    fail_archiving: Callable[[], Callable[[], None]],
) -> None:
    """Run again, a promote's only change may be archiving the old version: the bento built and
    the restart hint are still the new production version's, not the archived one's."""

    runner = CliRunner()
    v1, v2 = releases(good_candidate, 2, promoted=1)
    undo = fail_archiving()
    args = ["registry", "promote", v2, "--to", "production", "--reason", "release 2"]
    assert runner.invoke(app, args).exit_code == 1
    undo()

    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.splitlines()[0].startswith(f"v{v1}: Production -> Archived")
    assert "bento: skipped" in again.output
    assert again.output.splitlines()[-1].endswith(
        f"paylater-scorer:{v2} or bentos.service:PaylaterScorer)"
    )


def test_compare_with_a_version_whose_run_was_purged_still_answers(
    registry_home: Path,
    good_candidate: Any,
    register: Callable[..., str],
) -> None:
    """A version outlives its training run once someone deletes the run and `mlflow gc` purges
    it; compare then showed a traceback instead of the figures it still has."""
    from registry.store import MODEL_NAME

    first = register(good_candidate)
    c = client()
    registered = c.get_model_version(MODEL_NAME, first)
    other_run = c.create_run(c.get_run(str(registered.run_id)).info.experiment_id).info.run_id
    orphan = c.create_model_version(MODEL_NAME, str(registered.source), run_id=other_run).version
    c.delete_run(other_run)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "gc",
            "--backend-store-uri",
            f"sqlite:///{registry_home / 'mlflow.db'}",
            "--run-ids",
            other_run,
        ],
        check=True,
        capture_output=True,
    )
    result = CliRunner().invoke(app, ["registry", "compare", first, str(orphan)])
    assert result.exit_code == 0, result.output
    assert "auc" in result.output and "dataset_digest" in result.output


def test_taking_over_a_stale_lock_says_whose_it_was(
    registry_home: Path,
    good_candidate: Any,
    register: Callable[..., str],
    gate_and_stage: Callable[..., Any],
    mark_verified: Callable[[str], None],
    place_lock: Callable[[str], None],
) -> None:
    version = register(good_candidate)
    assert gate_and_stage(good_candidate, version).passed
    mark_verified(version)
    left = f"dave | rolling back | {time.time() - policy.lock_stale_seconds() - 60:.0f} | abc"
    place_lock(left)
    promoted = CliRunner().invoke(
        app, ["registry", "promote", version, "--to", "production", "--reason", "verified"]
    )
    assert promoted.exit_code == 0, promoted.output
    assert "took over the transition lock left by rolling back by dave, 36" in promoted.output
    assert policy.resolve_version("production") == version


def _stages() -> dict[str, str]:
    """Each version's stage, and the `production` alias under key 'alias'."""
    c = client()
    found = {str(mv.version): str(mv.current_stage) for mv in policy.all_versions(c)}
    return found | {"alias": str(policy.alias_version(c, "production"))}


def _ui_transition(version: str, stage: str) -> None:
    """What the MLflow UI's stage button does: the REST transition, existing versions archived."""
    with pytest.warns(FutureWarning, match="stages"):
        client().transition_model_version_stage(
            MODEL_NAME, version, stage, archive_existing_versions=True
        )


def test_rollback_sees_stages_moved_in_the_mlflow_ui(
    mlflow_server: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
) -> None:
    """A stage set in the MLflow UI moves no alias and writes no history. v1 put in Production
    there (v3, the alias's, archived by the UI) must not be archived by a rollback that restores
    v2 behind it: it refuses, naming v1, and changes nothing. Moved back, the rollback runs; and
    a hand rollback begun in the UI (v2 put back in Production) is finished, one in Production."""
    v1, v2, v3 = releases(good_candidate, 3)
    runner = CliRunner()
    _ui_transition(v1, "Production")
    before = _stages()
    assert before == {v1: "Production", v2: "Archived", v3: "Archived", "alias": v3}
    refused = runner.invoke(app, ["registry", "rollback", "--reason", "incident"])
    assert refused.exit_code == 1, refused.output
    assert f"v{v1} is in the Production stage" in refused.output, refused.output
    assert f"the `production` alias names v{v3}" in refused.output, refused.output
    assert _stages() == before

    _ui_transition(v2, "Production")  # the UI's own rollback, half of it: the alias stays on v3
    rolled = runner.invoke(app, ["registry", "rollback", "--reason", "incident"])
    assert rolled.exit_code == 0, rolled.output
    assert _stages() == {v1: "Archived", v2: "Production", v3: "Archived", "alias": v2}


def test_the_age_a_left_lock_is_taken_over_at_is_a_setting(
    registry_home: Path,
    good_candidate: Any,
    register: Callable[..., str],
    gate_and_stage: Callable[..., Any],
    mark_verified: Callable[[str], None],
    place_lock: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PAYLATER_REGISTRY_LOCK_STALE_SECONDS: a lock younger than it waits, then refuses naming
    the age; an older one is taken over. A value under which a live transition's lock could be
    taken (0, a few seconds) or no number is refused by name before anything moves."""
    version = register(good_candidate)
    assert gate_and_stage(good_candidate, version).passed
    mark_verified(version)
    runner = CliRunner()
    promote = ["registry", "promote", version, "--to", "production", "--reason", "verified"]
    for bad in ("0", "5", "-300", "five minutes", "nan"):
        monkeypatch.setenv("PAYLATER_REGISTRY_LOCK_STALE_SECONDS", bad)
        refused = runner.invoke(app, promote)
        assert refused.exit_code == 1, (bad, refused.output)
        assert "error: PAYLATER_REGISTRY_LOCK_STALE_SECONDS" in refused.output, refused.output
        assert "Traceback" not in refused.output
    monkeypatch.delenv("PAYLATER_REGISTRY_LOCK_STALE_SECONDS")
    assert policy.alias_version(client(), "production") is None

    monkeypatch.setenv("PAYLATER_REGISTRY_LOCK_STALE_SECONDS", "900")
    monkeypatch.setattr(policy, "LOCK_WAIT_SECONDS", 0.0)
    c = client()
    left = f"dave | rolling back | {time.time() - 600:.0f} | abc"  # stale by the default only
    place_lock(left)
    waited = runner.invoke(app, promote)
    assert waited.exit_code == 1, waited.output
    assert "rolling back by dave, 60" in waited.output and "older than 900 s" in waited.output
    assert policy.alias_version(c, "production") is None

    monkeypatch.setenv("PAYLATER_REGISTRY_LOCK_STALE_SECONDS", "540")
    taken = runner.invoke(app, promote)
    assert taken.exit_code == 0, taken.output
    assert "took over the transition lock left by rolling back by dave, 60" in taken.output
    assert "older than 540 s" in taken.output
    assert policy.resolve_version("production") == version


def test_history_says_when_a_stage_was_changed_outside_paylater(
    any_registry: str, good_candidate: Any, releases: Callable[..., list[str]]
) -> None:
    """The MLflow UI writes no history: read alone, v1's entries say Archived while it is in
    Production again. history warns of each version whose stage is not its last entry's."""
    v1, v2 = releases(good_candidate, 2)
    with pytest.warns(FutureWarning, match="stages"):  # the UI's button
        client().transition_model_version_stage(MODEL_NAME, v1, "Production")
    runner = CliRunner()
    warned = (
        f"warning: v{v1} is in Production, but its last recorded transition left it in"
        " Archived: its stage was changed outside paylater"
    )
    for args in (["--version", v1], [], ["--json"]):
        shown = runner.invoke(app, ["registry", "history", *args])
        assert shown.exit_code == 0, shown.output
        assert warned in shown.stderr, (args, shown.output)
        assert f"v{v2} is" not in shown.stderr
    assert all(json.loads(line) for line in shown.stdout.splitlines())
    quiet = runner.invoke(app, ["registry", "history", "--version", v2])
    assert quiet.exit_code == 0 and "warning" not in quiet.output


def test_a_real_server_reached_through_a_uri_with_credentials_never_shows_them(
    mlflow_server: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tracking URI with user:password (a server behind basic authentication) works as
    before, and MLflow's run links and the registry CLI's output never carry the password."""
    import mlflow

    from registry.store import TRAINING_EXPERIMENT, configure_mlflow, ensure_experiment

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")  # recorded: the teardown unsets what tracking_uri() sets
        monkeypatch.delenv(name)
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.replace("://", "://ci:Wr0ngSecret@"))
    configure_mlflow()
    with mlflow.start_run(experiment_id=ensure_experiment(client(), TRAINING_EXPERIMENT)):
        mlflow.log_param("p", 1)
    listed = CliRunner().invoke(app, ["registry", "list"])
    shown = capsys.readouterr().out + listed.output + caplog.text
    assert listed.exit_code == 0, listed.output
    assert f"at: {mlflow_server}/#/experiments/" in shown  # MLflow's run link, printed
    assert "Wr0ngSecret" not in shown
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "Wr0ngSecret"  # sent, as basic auth
