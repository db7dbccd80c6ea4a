"""Gates, staging, promotion, rollback and the audit history on a real MLflow sqlite store."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from registry import history, policy
from registry.store import MODEL_NAME, RegistryError, client
from registry.testing import stage_as_retrain


def _state() -> dict[str, Any]:
    """Stages, aliases and history length: what 'no change' must leave alone."""
    c = client()
    return {
        "stages": {str(mv.version): mv.current_stage for mv in policy.all_versions(c)},
        "aliases": {a: policy.alias_version(c, a) for a in ("staging", "production")},
        "history": len(history.read(c)),
    }


def test_gates_without_production_use_absolute_thresholds() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(4000) < 0.2).astype(int)
    good = np.clip(0.2 + 0.3 * (y - 0.2) + rng.normal(0, 0.05, 4000), 0.01, 0.99)
    thresholds = policy.GateThresholds(0.6, 0.5, 0.01, 0.25, False)
    assert policy.evaluate_gates(y, good, ["a"], thresholds).passed
    noise = rng.random(4000)
    decision = policy.evaluate_gates(y, noise, ["a"], thresholds)
    assert not decision.passed
    assert "below the minimum" in decision.reasons[0]


def test_gates_flag_feature_changes_and_unscorable_production() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(2000) < 0.3).astype(int)
    p = np.clip(0.3 + 0.4 * (y - 0.3) + rng.normal(0, 0.1, 2000), 0.01, 0.99)
    thresholds = policy.GateThresholds(0.5, 1.0, 0.01, 0.25, False)
    baseline = policy.ProductionBaseline("3", ["a", "old"], None, "lacks old")
    decision = policy.evaluate_gates(y, p, ["a", "new"], thresholds, baseline)
    assert not decision.passed
    assert any("added ['new'], removed ['old']" in r for r in decision.reasons)
    assert any("could not be scored" in r for r in decision.reasons)


def test_first_candidate_staged_worse_one_rejected_production_unchanged(
    registry_home: Path,
    good_candidate: Any,
    worse_candidate: Any,
    register: Callable[..., str],
    gate_and_stage: Callable[..., Any],
    mark_verified: Callable[[str], None],
) -> None:
    first = register(good_candidate)
    decision = gate_and_stage(good_candidate, first)
    assert decision.passed and decision.production_version is None
    c = client()
    mv = c.get_model_version(MODEL_NAME, first)
    assert mv.current_stage == "Staging"
    assert policy.alias_version(c, "staging") == first
    for tag in (
        "dataset_digest",
        "dataset_uri",
        "feature_sql_hash",
        "git_commit",
        "issue",
        "feature_names",
        "cutoff",
    ):
        assert mv.tags.get(tag), tag
    assert json.loads(mv.tags["feature_names"])[:2] == ["request_amount_jpy", "request_fee_jpy"]
    assert mv.tags["dataset_digest"] == good_candidate.dataset.digest

    mark_verified(first)
    policy.promote(first, "production", "first model", "alice")
    before = _state()

    worse = register(worse_candidate)
    decision = gate_and_stage(worse_candidate, worse)
    assert not decision.passed
    assert decision.production_version == first
    assert any(f"below production v{first}" in r for r in decision.reasons)
    after = _state()
    assert after["aliases"] == before["aliases"] == {"staging": None, "production": first}
    assert after["stages"][first] == "Production"
    assert after["stages"][worse] == "None"
    tags = c.get_model_version(MODEL_NAME, worse).tags
    assert tags["rejected"] == "true" and tags["gate_status"] == "rejected"
    assert "below production" in tags["rejected_reasons"]
    assert [e.action for e in history.read(c, worse)] == ["register", "reject"]


def test_promote_rollback_history_round_trip(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
) -> None:
    versions = releases(good_candidate, 3)
    v1, v2, v3 = versions
    c = client()
    assert policy.resolve_version("production") == v3
    assert {v: c.get_model_version(MODEL_NAME, v).current_stage for v in versions} == {
        v1: "Archived",
        v2: "Archived",
        v3: "Production",
    }

    changes = policy.rollback("v3 misbehaves", "bob")
    assert [(t.version, t.to_stage) for t in changes] == [(v2, "Production"), (v3, "Archived")]
    assert policy.resolve_version("production") == v2
    changes = policy.rollback("v2 too", "bob")
    assert changes[0].version == v1, "a rolled-back version is never restored by the next rollback"
    assert c.get_model_version(MODEL_NAME, v1).current_stage == "Production"
    with pytest.raises(RegistryError, match="no earlier production version"):
        policy.rollback("again", "bob")

    entries = history.read(c)
    promotions = [
        (e.version, e.from_stage, e.to_stage, e.actor, e.reason)
        for e in entries
        if e.action == "promote"
    ]
    assert promotions == [
        (v1, "Staging", "Production", "alice", "release 0"),
        (v2, "Staging", "Production", "alice", "release 1"),
        (v3, "Staging", "Production", "alice", "release 2"),
    ]
    rollbacks = [(e.version, e.to_stage, e.actor) for e in entries if e.action == "rollback"]
    assert rollbacks == [
        (v2, "Production", "bob"),
        (v3, "Archived", "bob"),
        (v1, "Production", "bob"),
        (v2, "Archived", "bob"),
    ]
    assert all(e.at for e in entries) and entries == sorted(entries, key=lambda e: e.position)


def test_wrong_requests_change_nothing(
    any_registry: str,
    good_candidate: Any,
    register: Callable[..., str],
    register_copy: Callable[[str], str],
    mark_verified: Callable[[str], None],
) -> None:
    staged = register(good_candidate)
    stage_as_retrain(staged)
    unstaged = register_copy(staged)
    before = _state()
    cases = [
        (lambda: policy.promote("99", "production", "x", "a"), "has no version 99"),
        (lambda: policy.promote(unstaged, "production", "x", "a"), "not Staging"),
        (lambda: policy.promote(staged, "production", "x", "a"), "no passed staging verification"),
        (lambda: policy.promote(staged, "staging", "x", "a"), "--to must be production"),
        (lambda: policy.promote(staged, "production", "  ", "a"), "reason is required"),
        (lambda: policy.rollback("x", "a"), "nothing is in production"),
        (lambda: policy.resolve_version("latest"), "expected production, staging or a version"),
    ]
    for action, message in cases:
        with pytest.raises(RegistryError, match=message):
            action()
    assert _state() == before
    mark_verified(staged)
    policy.promote("staging", "production", "verified", "a")
    assert policy.resolve_version("PRODUCTION") == staged
    assert policy.alias_version(client(), "staging") is None


def test_new_staged_candidate_archives_the_previous_one(
    any_registry: str,
    good_candidate: Any,
    register: Callable[..., str],
    register_copy: Callable[[str], str],
) -> None:
    first = register(good_candidate)
    second = register_copy(first)
    stage_as_retrain(first)
    stage_as_retrain(second)
    c = client()
    assert c.get_model_version(MODEL_NAME, first).current_stage == "Archived"
    assert c.get_model_version(MODEL_NAME, second).current_stage == "Staging"
    assert policy.alias_version(c, "staging") == second
    assert [e.action for e in history.read(c, first)] == ["register", "stage", "supersede"]


def test_an_unreachable_registry_is_not_taken_for_an_empty_one(
    unreachable_registry: str, good_candidate: Any
) -> None:
    from mlflow.exceptions import MlflowException

    from registry.runs import score_production

    # "No production version" would let the gate pass a candidate on the absolute thresholds alone.
    with pytest.raises(MlflowException):
        policy.alias_version(client(), "production")
    with pytest.raises(MlflowException):
        score_production(good_candidate.split.oot_rows, good_candidate.split.oot_month)
    with pytest.raises(MlflowException):
        policy.rollback("bad model", "bob")  # not "nothing is in production"
    with pytest.raises(MlflowException):
        policy.promote("3", "production", "verified", "alice")  # not "has no version 3"


def test_transitions_still_work_and_keep_history_after_the_audit_experiment_was_deleted(
    any_registry: str,
    good_candidate: Any,
    register: Callable[..., str],
    register_copy: Callable[[str], str],
    mark_verified: Callable[[str], None],
) -> None:
    from registry.store import AUDIT_EXPERIMENT

    first = register(good_candidate)
    stage_as_retrain(first)
    mark_verified(first)
    policy.promote(first, "production", "release 1", "alice")
    c = client()
    before = history.read(c)
    # Someone tidies the MLflow UI: the audit experiment is deleted (soft, as the UI does).
    audit = c.get_experiment_by_name(AUDIT_EXPERIMENT)
    assert audit is not None, "the first promotion wrote the audit experiment"
    c.delete_experiment(audit.experiment_id)

    second = register_copy(first)
    stage_as_retrain(second)
    mark_verified(second)
    policy.promote(second, "production", "release 2", "alice")

    assert c.get_model_version(MODEL_NAME, first).current_stage == "Archived"
    assert c.get_model_version(MODEL_NAME, second).current_stage == "Production"
    entries = history.read(c)
    assert entries[: len(before)] == before
    assert [(e.version, e.action) for e in entries[len(before) :]] == [
        (second, "stage"),
        (second, "promote"),
        (first, "archive"),
    ]


def test_allowed_feature_removal_is_not_rejected_for_production_lacking_that_feature() -> None:
    # gate_allow_feature_changes promises to accept a changed feature set; production, which
    # needs the removed feature, cannot be scored on the new rows, so only the absolute gates apply.
    rng = np.random.default_rng(2)
    y = (rng.random(2000) < 0.3).astype(int)
    p = np.clip(0.3 + 0.4 * (y - 0.3) + rng.normal(0, 0.1, 2000), 0.01, 0.99)
    baseline = policy.ProductionBaseline(
        "3", ["a", "old"], None, "the dataset lacks model features: old"
    )
    allowed = policy.GateThresholds(0.5, 1.0, 0.01, 0.25, True)
    decision = policy.evaluate_gates(y, p, ["a"], allowed, baseline)
    assert decision.passed, decision.reasons
    # Nothing was compared with production, but it was judged with v3 in production: another
    # production version (one this candidate's rows can score) would need another judgement.
    assert decision.production_version == "3"
    assert policy.GateDecision(True, [], production_version="3").production_version == "3"
    assert set(decision.checks) == {"candidate_auc", "candidate_ece"}
    weak = policy.GateThresholds(0.999, 1.0, 0.01, 0.25, True)
    assert not policy.evaluate_gates(y, p, ["a"], weak, baseline).passed
    refused = policy.GateThresholds(0.5, 1.0, 0.01, 0.25, False)
    assert not policy.evaluate_gates(y, p, ["a"], refused, baseline).passed


def test_rollback_restores_the_previous_version_when_production_was_deleted(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
) -> None:
    first, second = releases(good_candidate, 2)
    c = client()
    # The bad production version is deleted (MLflow drops its alias with it): nothing serves.
    c.delete_model_version(MODEL_NAME, second)
    assert policy.alias_version(c, "production") is None

    changes = policy.rollback("v2 was deleted", "bob")

    assert [(t.version, t.from_stage, t.to_stage) for t in changes] == [
        (first, "Archived", "Production")
    ]
    assert f"rollback from v{second}" in changes[0].reason
    assert policy.alias_version(c, "production") == first
    assert c.get_model_version(MODEL_NAME, first).current_stage == "Production"
    with pytest.raises(RegistryError, match="no earlier production version"):
        policy.rollback("again", "bob")


def test_a_gate_rejected_version_is_promoted_only_with_an_explicit_override(
    registry_home: Path,
    good_candidate: Any,
    register: Callable[..., str],
    mark_verified: Callable[[str], None],
) -> None:
    # Moved to Staging by hand (the MLflow UI allows it) and verified there: the gates' "no"
    # must not be lost on the way to production.
    version = register(good_candidate)
    policy.record_gate(version, policy.GateDecision(False, ["AUC 0.61 below 0.65"]), "retrain")
    policy.stage_candidate(version, "carol", "trying it anyway")
    mark_verified(version)
    before = _state()
    with pytest.raises(RegistryError, match=r"rejected by the gates \(AUC 0.61 below 0.65\)"):
        policy.promote(version, "production", "looks fine", "carol")
    assert _state() == before
    changes = policy.promote(version, "production", "looks fine", "carol", override_gate=True)
    assert [(t.version, t.to_stage) for t in changes] == [(version, "Production")]
    (entry,) = [e for e in history.read(client(), version) if e.action == "promote"]
    assert entry.reason == "gates overridden (AUC 0.61 below 0.65): looks fine"


def test_a_version_the_gates_never_judged_is_promoted_only_with_an_explicit_override(
    registry_home: Path,
    good_candidate: Any,
    register: Callable[..., str],
    mark_verified: Callable[[str], None],
) -> None:
    # Registered by hand (not by monthly_retrain), staged and verified: verification shows the
    # service serves it, not that it is better than production.
    version = register(good_candidate)
    policy.stage_candidate(version, "carol", "hand-made model")
    mark_verified(version)
    before = _state()
    with pytest.raises(RegistryError, match=r"never judged by the gates.*--override-gate"):
        policy.promote(version, "production", "looks fine", "carol")
    assert _state() == before
    policy.promote(version, "production", "looks fine", "carol", override_gate=True)
    (entry,) = [e for e in history.read(client(), version) if e.action == "promote"]
    assert entry.reason == "gates overridden (never judged): looks fine"


def test_an_out_of_time_month_too_small_to_judge_is_rejected() -> None:
    # 30 rows with one default can show any AUC and calibration: the gates must not call that
    # a pass (nor compare production on it).
    thresholds = policy.GateThresholds(0.6, 0.5, 0.01, 0.25, False)
    y = np.array([1] + [0] * 29)
    perfect = np.where(y == 1, 0.9, 0.05)
    decision = policy.evaluate_gates(y, perfect, ["a"], thresholds)
    assert not decision.passed
    assert decision.reasons == [
        "out-of-time month too small to judge: 30 rows (at least 200), 1 defaults and 29 repaid "
        "(at least 20 each)"
    ]
    rng = np.random.default_rng(3)
    y = (rng.random(400) < 0.1).astype(int)  # 400 rows, about 40 defaults: enough
    p = np.clip(0.1 + 0.5 * (y - 0.1) + rng.normal(0, 0.05, 400), 0.01, 0.99)
    assert policy.evaluate_gates(y, p, ["a"], thresholds).passed
    lenient = policy.GateThresholds(
        0.6, 0.5, 0.01, 0.25, False, min_oot_rows=10, min_oot_per_class=1
    )
    assert policy.evaluate_gates(np.array([1] + [0] * 29), perfect, ["a"], lenient).passed


def test_a_transition_waits_for_one_in_progress_and_refuses_without_changing_anything(
    registry_home: Path,
    good_candidate: Any,
    register: Callable[..., str],
    mark_verified: Callable[[str], None],
    place_lock: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While another promote, rollback or staging holds the lock, a transition waits, then
    refuses naming who holds it; the lock is released after each transition, and a lock left by
    a process that died (older than lock_stale_seconds()) is taken over."""
    import time

    version = register(good_candidate)
    stage_as_retrain(version)
    mark_verified(version)
    c = client()
    assert policy._lock_holder(c) is None
    monkeypatch.setattr(policy, "LOCK_WAIT_SECONDS", 1.0)
    held = f"dave | rolling back | {time.time():.0f} | abc"
    place_lock(held)
    before = _state()
    with pytest.raises(RegistryError, match=r"rolling back by dave, [0-9]+ s ago") as refused:
        policy.promote(version, "production", "release", "alice")
    assert "`paylater registry unlock --reason TEXT` breaks it" in str(refused.value)
    assert _state() == before
    assert policy._lock_holder(c) == held

    stale = f"dave | rolling back | {time.time() - policy.lock_stale_seconds() - 5:.0f} | abc"
    place_lock(stale)
    with caplog.at_level(logging.WARNING, logger="registry.policy"):
        policy.promote(version, "production", "release", "alice")
    assert re.search(
        r"took over the transition lock left by rolling back by dave, 30[5-9] s ago", caplog.text
    ), caplog.text
    assert policy.resolve_version("production") == version
    assert policy._lock_holder(c) is None


def test_two_transitions_started_together_never_both_run(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A promote of v2 and a rollback to v1 started at the same moment: one runs, the other waits
    for it (here: refuses, with no wait allowed), so production ends as one of them left it and
    exactly one version is in the Production stage."""
    import threading

    v1, _, v3 = releases(good_candidate, 3, promoted=2)
    monkeypatch.setattr(policy, "LOCK_WAIT_SECONDS", 0.0)
    start = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def attempt(name: str, action: Callable[[], object]) -> None:
        start.wait()
        try:
            outcomes[name] = action()
        except RegistryError as exc:
            outcomes[name] = exc

    threads = [
        threading.Thread(
            target=attempt,
            args=("promote", lambda: policy.promote(v3, "production", "release", "alice")),
        ),
        threading.Thread(
            target=attempt, args=("rollback", lambda: policy.rollback("bad release", "bob"))
        ),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    refused = [n for n, o in outcomes.items() if isinstance(o, RegistryError)]
    assert len(outcomes) == 2 and len(refused) == 1, outcomes
    assert "another registry transition is in progress" in str(outcomes[refused[0]])
    stages = _state()["stages"]
    in_production = [v for v, stage in stages.items() if stage == "Production"]
    expected = v1 if refused == ["promote"] else v3
    assert in_production == [expected], stages
    assert policy.resolve_version("production") == expected


def test_a_lock_held_by_an_actor_whose_name_holds_the_separator_is_not_taken_for_stale() -> None:
    import time

    token = f"ann | ops | promoting v3 | {time.time():.0f} | abc"
    assert policy._lock_age(token) < policy.lock_stale_seconds()
    assert policy._describe(token) == "promoting v3 by ann | ops, 0 s ago"
    assert policy._lock_age("written by something else") == float("inf")


def test_losing_the_race_to_create_the_lock_is_a_refusal_not_a_store_error(
    any_registry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of two transitions creating the lock's next generation at the same moment, the store
    refuses the second (the name exists): that is the other transition holding the lock, said
    as such, not the store's error; and the winner's generation is left alone."""
    import time

    c = client()
    c.create_registered_model(MODEL_NAME)
    other = f"bob | rolling back | {time.time():.0f} | abc"

    class Racing:
        """The real client, whose lock creation loses to `other`'s."""

        def __getattr__(self, name: str) -> Any:
            return getattr(c, name)

        def create_registered_model(self, name: str, **kwargs: Any) -> Any:
            c.create_registered_model(name, tags={policy.LOCK_TAG: other})
            return c.create_registered_model(name, **kwargs)

    monkeypatch.setattr(policy, "LOCK_WAIT_SECONDS", 0.0)
    with (
        pytest.raises(RegistryError, match="rolling back by bob"),
        policy.transition_lock(Racing(), "alice", "promoting v1"),  # type: ignore[arg-type]
    ):
        pytest.fail("the lock was taken")
    assert policy._lock_holder(c) == other


def test_a_rollback_that_waited_for_another_rollback_does_not_roll_back_a_second_time(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
    place_lock: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two people answer the same incident with `registry rollback`: the second waits for the
    first's lock. Production was v3 when both started; once v3 is rolled back, the second must
    not go on to roll back v2 too (two versions back, to a model nobody asked for)."""
    import threading
    import time

    v1, v2, v3 = releases(good_candidate, 3)
    c = client()
    dave = f"dave | rolling back | {time.time():.0f} | abc"
    place_lock(dave)
    waiting = threading.Event()
    real_lock = policy.transition_lock

    def lock_seen_waiting(*args: Any, **kwargs: Any) -> Any:
        waiting.set()  # bob's rollback has looked at production and now waits for dave's lock
        return real_lock(*args, **kwargs)

    monkeypatch.setattr(policy, "transition_lock", lock_seen_waiting)
    outcome: dict[str, object] = {}

    def bob() -> None:
        try:
            outcome["bob"] = policy.rollback("approval rate dropped", "bob")
        except RegistryError as exc:
            outcome["bob"] = exc

    thread = threading.Thread(target=bob)
    thread.start()
    assert waiting.wait(60)
    policy._rollback(c, "approval rate dropped", "dave", v3)  # under dave's lock
    policy._release(c, dave, failed=False)
    thread.join(60)

    assert isinstance(outcome.get("bob"), RegistryError), outcome
    assert f"from v{v3} to v{v2}" in str(outcome["bob"])
    assert policy.resolve_version("production") == v2
    stages = _state()["stages"]
    assert [v for v, s in stages.items() if s == "Production"] == [v2]
    assert stages[v1] == "Archived"


def test_a_promote_interrupted_half_way_is_completed_by_running_it_again(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
    fail_archiving: Callable[[], Callable[[], None]],
    register_copy: Callable[[str], str],
    mark_verified: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A promote that stopped after moving the new version (the registry failed before the old
    one was archived, or before the alias moved) left two versions in the Production stage.
    Running the same command again finishes it: one version in Production, the alias on it."""
    from mlflow import MlflowClient

    v1, v2 = releases(good_candidate, 2, promoted=1)

    undo = fail_archiving()
    with pytest.raises(RuntimeError, match="503"):
        policy.promote(v2, "production", "release 2", "alice")
    undo()
    assert _state()["stages"] == {v1: "Production", v2: "Production"}

    changes = policy.promote(v2, "production", "release 2", "alice")
    assert [(t.version, t.to_stage) for t in changes] == [(v1, "Archived")]
    state = _state()
    assert state["stages"] == {v1: "Archived", v2: "Production"}
    assert state["aliases"] == {"staging": None, "production": v2}
    assert policy.promote(v2, "production", "release 2", "alice") == [], "nothing left to do"
    assert _state() == state

    # Stopped after the stage changed, before the alias moved: the alias still named v2.
    v3 = register_copy(v1)
    stage_as_retrain(v3)
    mark_verified(v3)
    real_alias = MlflowClient.set_registered_model_alias

    def alias_fails(self: MlflowClient, name: str, alias: str, version: str) -> None:
        if alias == "production":
            raise RuntimeError("tracking server answered 503")
        real_alias(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", alias_fails)
    with pytest.raises(RuntimeError, match="503"):
        policy.promote(v3, "production", "release 3", "alice")
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real_alias)
    assert policy.resolve_version("production") == v2
    policy.promote(v3, "production", "release 3", "alice")
    state = _state()
    assert state["stages"] == {v1: "Archived", v2: "Archived", v3: "Production"}
    assert state["aliases"] == {"staging": None, "production": v3}
    assert [e.to_stage for e in history.read(client(), v3)][-1] == "Production"
    assert policy.rollback("v3 misbehaves", "bob")[0].version == v2

    # Stopped after the alias moved, before the audit entry was written: the history must still
    # say who promoted it, when and why.
    v4 = register_copy(v1)
    stage_as_retrain(v4)
    mark_verified(v4)
    real_record = history.record

    def record_fails(c: Any, version: str, *args: Any, **kwargs: Any) -> Any:
        if version == v4 and args[2] == "promote":
            raise RuntimeError("tracking server answered 503")
        return real_record(c, version, *args, **kwargs)

    monkeypatch.setattr(history, "record", record_fails)
    with pytest.raises(RuntimeError, match="503"):
        policy.promote(v4, "production", "release 4", "alice")
    monkeypatch.setattr(history, "record", real_record)
    assert policy.resolve_version("production") == v4
    policy.promote(v4, "production", "release 4", "alice")
    entries = history.read(client(), v4)
    assert [(e.action, e.to_stage, e.reason) for e in entries][-1] == (
        "promote",
        "Production",
        "release 4",
    )
    assert _state()["stages"][v2] == "Archived"


def test_a_rollback_after_an_interrupted_promote_or_rollback_goes_back_one_version(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
    fail_archiving: Callable[[], Callable[[], None]],
) -> None:
    """A transition that stopped before archiving the version it replaced leaves two versions in
    the Production stage and no audit entry of the old one leaving. A rollback run then (again,
    after an interrupted rollback; or to undo an interrupted promote) must restore the version
    that was in production just before, not the one before that, and leave one in Production."""
    v1, v2, v3 = releases(good_candidate, 3, promoted=2)

    undo = fail_archiving()
    with pytest.raises(RuntimeError, match="503"):
        policy.promote(v3, "production", "release 2", "alice")
    undo()
    assert _state()["stages"] == {v1: "Archived", v2: "Production", v3: "Production"}
    changes = policy.rollback("v3 misbehaves", "bob")
    assert [(t.version, t.to_stage) for t in changes] == [(v2, "Production"), (v3, "Archived")]
    assert _state()["stages"] == {v1: "Archived", v2: "Production", v3: "Archived"}

    # Promote v3 again properly, then a rollback that stops half way, run again.
    stage_as_retrain(v3)
    policy.promote(v3, "production", "fixed", "alice")
    undo = fail_archiving()
    with pytest.raises(RuntimeError, match="503"):
        policy.rollback("v3 misbehaves again", "bob")
    undo()
    assert _state()["stages"] == {v1: "Archived", v2: "Production", v3: "Production"}
    changes = policy.rollback("v3 misbehaves again", "bob")
    assert [(t.version, t.to_stage) for t in changes] == [(v3, "Archived")]
    state = _state()
    assert state["stages"] == {v1: "Archived", v2: "Production", v3: "Archived"}
    assert state["aliases"]["production"] == v2


def test_a_candidate_is_not_compared_with_a_production_model_trained_on_its_out_of_time_month(
    registry_home: Path,
    good_candidate: Any,
    older_candidate: Any,
    register: Callable[..., str],
    gate_and_stage: Callable[..., Any],
    mark_verified: Callable[[str], None],
) -> None:
    """A retrain run for an earlier as_of (a missed month run late) gets an out-of-time month
    production was fitted on: production's figures there are in-sample, so the comparison says
    nothing, and the candidate (older data than production's) must not be staged on it."""
    production = register(good_candidate)
    assert gate_and_stage(good_candidate, production).passed
    mark_verified(production)
    policy.promote(production, "production", "release", "alice")
    oot = older_candidate.split.oot_month
    assert oot in good_candidate.split.train_months

    older = register(older_candidate)
    decision = gate_and_stage(older_candidate, older)
    assert not decision.passed
    assert decision.production_version == production
    assert any(
        f"production v{production} was trained on the out-of-time month {oot:%Y-%m}" in r
        for r in decision.reasons
    ), decision.reasons
    assert "production_auc" not in decision.checks, "in-sample figures are no comparison"
    assert _state()["aliases"] == {"staging": None, "production": production}


def test_promoting_a_version_staged_in_the_mlflow_ui_says_how_to_verify_it(
    registry_home: Path,
    good_candidate: Any,
    worse_candidate: Any,
    register: Callable[..., str],
    gate_and_stage: Callable[..., Any],
    mark_verified: Callable[[str], None],
) -> None:
    """The runbook's way to ship a rejected version: stage it by hand in the MLflow UI (which
    moves no alias), verify, promote with --override-gate. `verify --stage staging` would check
    the version the `staging` alias names, another one: the refusal must name the version."""
    staged = register(good_candidate)
    assert gate_and_stage(good_candidate, staged).passed
    rejected = register(worse_candidate)
    policy.record_gate(rejected, policy.GateDecision(False, ["AUC 0.51 below 0.65"]), "retrain")
    with pytest.warns(FutureWarning, match="stages"):  # the UI's button; stages are deprecated
        client().transition_model_version_stage(MODEL_NAME, rejected, "Staging")

    with pytest.raises(RegistryError, match="no passed staging verification") as refused:
        policy.promote(rejected, "production", "owner agreed", "carol", override_gate=True)
    assert f"paylater registry verify --version {rejected} --url URL" in str(refused.value)
    mark_verified(rejected)
    policy.promote(rejected, "production", "owner agreed", "carol", override_gate=True)
    assert _state()["aliases"] == {"staging": staged, "production": rejected}


def test_a_candidate_production_changed_under_is_promoted_only_once_regated(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
    register_copy: Callable[[str], str],
    gate_and_stage: Callable[..., Any],
    mark_verified: Callable[[str], None],
) -> None:
    """The retrain gated the candidate against production v2 and staged it; then production
    changed (a rollback to v1) before anyone promoted it. Promote must not act on a decision
    about v2: it refuses, naming `regate`, which judges the candidate against v1 on the same
    out-of-time rows (the same figures as the retrain's when production is the same)."""
    from registry.regate import regate

    v1, v2 = releases(good_candidate, 2)
    candidate = register_copy(v1)  # the next retrain's version (the model logged once)
    staged = gate_and_stage(good_candidate, candidate)
    assert staged.passed and staged.production_version == v2
    assert client().get_model_version(MODEL_NAME, candidate).tags["gate_production_version"] == v2
    mark_verified(candidate)
    assert regate(candidate, "carol") == (candidate, staged), "same data, same production"

    policy.rollback("approval rate dropped", "bob")
    before = _state()
    with pytest.raises(RegistryError) as refused:
        policy.promote(candidate, "production", "verified on staging", "alice")
    said = str(refused.value)
    assert f"gated against production v{v2}, but production is now v{v1}" in said
    assert f"`paylater registry regate {candidate}`" in said
    assert _state() == before

    _, decision = regate(candidate, "carol")
    assert decision.passed and decision.production_version == v1
    assert "production_auc" in decision.checks
    policy.promote(candidate, "production", "verified on staging", "alice")
    assert policy.resolve_version("production") == candidate
    entries = history.read(client(), candidate)
    assert [e.action for e in entries][-3:] == ["regate", "regate", "promote"]
    assert entries[-2].reason.startswith(f"passed against production v{v1}")


def test_a_production_stage_set_in_the_mlflow_ui_stops_promotion_on_an_old_gate(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
    register_copy: Callable[[str], str],
    gate_and_stage: Callable[..., Any],
    mark_verified: Callable[[str], None],
) -> None:
    """A stage change made in the MLflow UI moves no alias: v1 put back in Production there
    leaves the `production` alias on v2. Promote cannot tell which production the candidate
    must beat, so it refuses, and regate too, until stage and alias agree."""
    from registry.regate import regate

    v1, v2 = releases(good_candidate, 2)
    candidate = register_copy(v1)  # the next retrain's version (the model logged once)
    assert gate_and_stage(good_candidate, candidate).production_version == v2
    mark_verified(candidate)
    with pytest.warns(FutureWarning, match="stages"):  # the UI's button
        client().transition_model_version_stage(MODEL_NAME, v1, "Production")

    before = _state()
    with pytest.raises(RegistryError, match=f"Production stage holds v{v1}, v{v2} ") as refused:
        policy.promote(candidate, "production", "verified", "alice")
    assert f"paylater registry regate {candidate}" in str(refused.value)
    with pytest.raises(RegistryError, match="cannot tell which version to gate"):
        regate(candidate, "carol")
    assert _state() == before

    with pytest.warns(FutureWarning, match="stages"):  # put back in the UI
        client().transition_model_version_stage(MODEL_NAME, v1, "Archived")
    policy.promote(candidate, "production", "verified", "alice")
    assert policy.resolve_version("production") == candidate


def test_a_transition_whose_lock_was_taken_over_stops_at_its_next_step(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
    place_lock: Callable[[str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A promote that outlived its lock (taken over as stale, or broken by `registry unlock`)
    must not go on moving stages beside the transition now holding it: it stops at its next
    move and says so; running it again later finishes it."""
    v1, v2 = releases(good_candidate, 2, promoted=1)
    c = client()
    real_record = history.record
    other = f"bob | rolling back | {time.time():.0f} | other"

    def taken_over_after_promote(mlflow_client: Any, version: str, *args: Any, **kw: Any) -> Any:
        entry = real_record(mlflow_client, version, *args, **kw)
        if args[2] == "promote":
            place_lock(other)
        return entry

    monkeypatch.setattr(history, "record", taken_over_after_promote)
    with pytest.raises(RegistryError, match=r"lock was taken over \(rolling back by bob"):
        policy.promote(v2, "production", "release 1", "alice")
    monkeypatch.setattr(history, "record", real_record)
    assert _state()["stages"] == {v1: "Production", v2: "Production"}, "v1 was not archived"
    assert policy._lock_holder(c) == other, "bob's lock kept"

    policy._release(c, other, failed=False)  # bob's transition ended
    assert [(t.version, t.to_stage) for t in policy.promote(v2, "production", "r", "alice")] == [
        (v1, "Archived")
    ]


def test_a_lock_left_by_a_transition_the_tracking_server_failed_under_can_be_broken(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tracking server fails in the middle of a promote: the promote fails with that error
    (not the lock release's), the lock stays, and every later transition refuses naming the
    holder and `registry unlock`; unlock breaks it, and the promote run again finishes."""
    from mlflow.exceptions import MlflowException

    v1, v2 = releases(good_candidate, 2, promoted=1)
    real_move, real_latest = policy.move, policy._latest_lock
    down = {"now": False}

    def server_fails_while_archiving(c: Any, version: str, to_stage: str, *args: Any) -> Any:
        if to_stage == "Archived":
            down["now"] = True
            raise MlflowException("API request failed: 503 Service Unavailable")
        return real_move(c, version, to_stage, *args)

    def latest(c: Any) -> Any:
        if down["now"]:
            raise MlflowException("API request failed: connection refused")
        return real_latest(c)

    monkeypatch.setattr(policy, "move", server_fails_while_archiving)
    monkeypatch.setattr(policy, "_latest_lock", latest)
    with pytest.raises(MlflowException, match="503"):
        policy.promote(v2, "production", "release 1", "alice")
    monkeypatch.setattr(policy, "move", real_move)
    monkeypatch.setattr(policy, "_latest_lock", real_latest)

    monkeypatch.setattr(policy, "LOCK_WAIT_SECONDS", 0.0)
    with pytest.raises(RegistryError, match=f"promoting v{v2} by alice") as refused:
        policy.rollback("bad release", "bob")
    assert "paylater registry unlock" in str(refused.value)
    broken = policy.unlock("server restarted under alice's promote", "bob")
    assert broken is not None and re.fullmatch(rf"promoting v{v2} by alice, [0-9]+ s ago", broken)
    tags = client().get_registered_model(MODEL_NAME).tags
    assert policy._lock_holder(client()) is None
    assert tags["transition_lock_broken"].startswith("bob | ")
    assert f"was: alice | promoting v{v2} | " in tags["transition_lock_broken"]
    assert policy.unlock("again", "bob") is None, "no lock: nothing to break"

    assert [(t.version, t.to_stage) for t in policy.promote(v2, "production", "r1", "alice")] == [
        (v1, "Archived")
    ]
    assert _state()["stages"] == {v1: "Archived", v2: "Production"}


def test_history_follows_the_tracking_servers_clock_not_the_commands_machines(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bob's laptop runs an hour behind: his rollback of v3 must still come after the promote
    of v3 in the history (here the embedded store's clock is the server's), or the next
    rollback takes v3, the version just rolled back, for a release to restore."""
    v1, v2, v3 = releases(good_candidate, 3)
    real_ns = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: real_ns() - 3600 * 10**9)
    policy.rollback("v3 misbehaves", "bob")
    monkeypatch.setattr(time, "time_ns", real_ns)
    entries = history.read(client())
    assert [(e.version, e.action, e.to_stage) for e in entries][-2:] == [
        (v2, "rollback", "Production"),
        (v3, "rollback", "Archived"),
    ]
    assert all(e.server_ms for e in entries)
    changes = policy.rollback("v2 too", "carol")
    assert changes[0].version == v1, "v3 was rolled back: never restored by the next rollback"


def test_unlock_never_breaks_a_lock_taken_over_while_it_looked(
    any_registry: str, place_lock: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Carol breaks alice's dead lock just as bob's rollback takes it over: bob's live lock
    must stay, and nothing be recorded as broken."""
    c = client()
    c.create_registered_model(MODEL_NAME)
    dead = f"alice | promoting v7 | {time.time() - 600:.0f} | a"
    alive = f"bob | rolling back | {time.time():.0f} | b"
    place_lock(dead)
    real_latest = policy._latest_lock
    reads: list[Any] = []

    def bob_takes_over_after_the_first_read(mlflow_client: Any) -> Any:
        found = real_latest(mlflow_client)
        if not reads:
            policy._create_generation(c, found.number + 1, {policy.LOCK_TAG: alive})
        reads.append(found)
        return found

    monkeypatch.setattr(policy, "_latest_lock", bob_takes_over_after_the_first_read)
    with pytest.raises(RegistryError, match="rolling back by bob"):
        policy.unlock("alice's promote died", "carol")
    monkeypatch.setattr(policy, "_latest_lock", real_latest)
    assert policy._lock_holder(c) == alive
    assert "transition_lock_broken" not in c.get_registered_model(MODEL_NAME).tags


def test_two_takeovers_of_one_stale_lock_leave_exactly_one_holder(
    any_registry: str, place_lock: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice's promote died holding the lock; bob's and carol's transitions both find it stale
    and take it over at the same moment: exactly one of them runs, the other refuses naming it,
    and once it ends the lock is free, kept as one registered model."""
    import threading

    c = client()
    c.create_registered_model(MODEL_NAME)
    place_lock(f"alice | promoting v7 | {time.time() - policy.lock_stale_seconds() - 5:.0f} | a")
    monkeypatch.setattr(policy, "LOCK_WAIT_SECONDS", 0.0)
    both_looked = threading.Barrier(2)
    inside = threading.Semaphore(0)
    entered: list[str] = []
    refused: dict[str, str] = {}

    class Together:
        """The real client, whose lock creation waits until both transitions are creating."""

        def __getattr__(self, name: str) -> Any:
            return getattr(c, name)

        def create_registered_model(self, name: str, **kwargs: Any) -> Any:
            both_looked.wait(60)
            return c.create_registered_model(name, **kwargs)

    def take_over(actor: str) -> None:
        try:
            with policy.transition_lock(Together(), actor, "rolling back"):  # type: ignore[arg-type]
                entered.append(actor)
                inside.acquire(timeout=60)  # held until the other one has given up
        except RegistryError as exc:
            refused[actor] = str(exc)
            inside.release()

    threads = [threading.Thread(target=take_over, args=(a,)) for a in ("bob", "carol")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(entered) == 1 and len(refused) == 1, (entered, refused)
    ((loser, message),) = refused.items()
    assert f"another registry transition is in progress (rolling back by {entered[0]}" in message
    assert loser != entered[0]
    assert policy._lock_holder(c) is None
    locks = c.search_registered_models(f"name LIKE '{policy.LOCK_MODEL_PREFIX}%'")
    assert [m.name for m in locks] == [policy._generation_name(2)], "alice's was deleted"


def test_a_lock_tag_left_by_the_previous_release_is_honoured_until_stale(
    any_registry: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A promote of the release before the atomic lock may still be running while this one is
    deployed: its lock (a tag on the registered model) is waited for and refused on like any
    other, taken over once stale, and `registry unlock` breaks it."""
    c = client()
    c.create_registered_model(MODEL_NAME)
    monkeypatch.setattr(policy, "LOCK_WAIT_SECONDS", 0.0)
    live = f"dave | promoting v3 | {time.time():.0f} | old"
    c.set_registered_model_tag(MODEL_NAME, policy.LOCK_TAG, live)
    with (
        pytest.raises(RegistryError, match="promoting v3 by dave"),
        policy.transition_lock(c, "alice", "promoting v4"),
    ):
        pytest.fail("the lock was taken beside the old release's")
    assert policy._lock_holder(c) == live
    assert policy.unlock("dave's promote died", "bob") == policy._describe(live)
    assert policy.LOCK_TAG not in c.get_registered_model(MODEL_NAME).tags
    assert c.get_registered_model(MODEL_NAME).tags["transition_lock_broken"].endswith(live)

    stale = f"dave | promoting v3 | {time.time() - policy.lock_stale_seconds() - 5:.0f} | old"
    c.set_registered_model_tag(MODEL_NAME, policy.LOCK_TAG, stale)
    with (
        caplog.at_level(logging.WARNING, logger="registry.policy"),
        policy.transition_lock(c, "alice", "promoting v4"),
    ):
        assert policy.LOCK_TAG not in c.get_registered_model(MODEL_NAME).tags
    assert "took over the transition lock left by promoting v3 by dave" in caplog.text
    assert policy._lock_holder(c) is None


def test_a_version_put_in_production_in_the_mlflow_ui_is_promoted_only_on_a_current_gate(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
    register_copy: Callable[[str], str],
    gate_and_stage: Callable[..., Any],
    mark_verified: Callable[[str], None],
) -> None:
    """Promote accepts a version already in the Production stage (to finish an interrupted
    promote). A candidate gated against v2, then moved to Production in the MLflow UI after a
    rollback to v1, must not take the alias on that decision about v2: it needs a regate."""
    from registry.regate import regate

    v1, v2 = releases(good_candidate, 2)
    candidate = register_copy(v1)  # the next retrain's version (the model logged once)
    assert gate_and_stage(good_candidate, candidate).production_version == v2
    mark_verified(candidate)
    policy.rollback("approval rate dropped", "bob")
    with pytest.warns(FutureWarning, match="stages"):  # the UI's button, existing archived
        client().transition_model_version_stage(
            MODEL_NAME, candidate, "Production", archive_existing_versions=True
        )
    before = _state()
    with pytest.raises(RegistryError) as refused:
        policy.promote(candidate, "production", "verified", "alice")
    said = str(refused.value)
    assert f"gated against production v{v2}, but production is now v{v1}" in said, said
    assert _state() == before

    _, decision = regate(candidate, "carol")
    assert decision.passed and decision.production_version == v1
    policy.promote(candidate, "production", "verified", "alice")
    assert _state()["aliases"]["production"] == candidate
    assert _state()["stages"] == {v1: "Archived", v2: "Archived", candidate: "Production"}


def test_rollback_after_an_interrupted_promote_whose_version_was_deleted_restores_the_one_serving(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
    fail_archiving: Callable[[], Callable[[], None]],
) -> None:
    """A promote of v3 stopped before archiving v2 (both in Production); then v3 was deleted in
    the MLflow UI (its alias goes with it). v2 was serving before v3: the rollback restores it,
    not v1, and does not leave v2 in Production beside the version it restores."""
    v1, v2, v3 = releases(good_candidate, 3, promoted=2)
    undo = fail_archiving()
    with pytest.raises(RuntimeError, match="503"):
        policy.promote(v3, "production", "release 2", "alice")
    undo()
    c = client()
    c.delete_model_version(MODEL_NAME, v3)
    assert _state()["stages"] == {v1: "Archived", v2: "Production"}

    changes = policy.rollback("v3 was deleted", "bob")
    assert [(t.version, t.to_stage) for t in changes] == [(v2, "Production")]
    state = _state()
    assert state["stages"] == {v1: "Archived", v2: "Production"}
    assert state["aliases"]["production"] == v2


def test_a_version_put_in_production_by_hand_then_regated_is_not_taken_for_a_left_one(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
) -> None:
    """Regate (and verify) record an entry in the version's current stage: on a version the MLflow
    UI put in Production, that entry says Production without any transition having put it
    there. Rollback must not take it for one an interrupted promote left and restore it."""
    v1, _, v3 = releases(good_candidate, 3)
    with pytest.warns(FutureWarning, match="stages"):  # the UI's button, v3 left as it is
        client().transition_model_version_stage(MODEL_NAME, v1, "Production")
    judged = policy.GateDecision(True, [], production_version=v3)
    policy.record_gate(v1, judged, "carol", audit="regate")
    before = _state()
    with pytest.raises(RegistryError, match=f"v{v1} is in the Production stage"):
        policy.rollback("incident", "bob")
    assert _state() == before


def test_a_rollback_with_only_a_version_put_in_production_by_hand_names_it(
    any_registry: str,
    good_candidate: Any,
    releases: Callable[..., list[str]],
) -> None:
    """Nothing was ever promoted, but the MLflow UI put v1 in Production: the Production stage
    is not empty, so "nothing is in production" would send the person looking elsewhere."""
    (v1,) = releases(good_candidate, 1, promoted=0)
    with pytest.warns(FutureWarning, match="stages"):  # the UI's button
        client().transition_model_version_stage(MODEL_NAME, v1, "Production")
    before = _state()
    with pytest.raises(RegistryError) as refused:
        policy.rollback("incident", "bob")
    said = str(refused.value)
    assert f"v{v1} is in the Production stage" in said and "alias names no version" in said, said
    assert _state() == before


def test_an_audit_entry_never_overwrites_a_description_written_meanwhile(
    any_registry: str, good_candidate: Any, register: Callable[..., str]
) -> None:
    """A verify, regate or reject entry took the server's time by writing the version's
    description back as it had just read it: a description someone saved in the MLflow UI
    between that read and that write was silently replaced by the old one."""
    version = register(good_candidate)
    c = client()
    c.update_model_version(MODEL_NAME, version, description="draft")
    operator = client()  # someone else, in the MLflow UI
    saved: list[str] = []

    class Interleaved:
        """The real client; after each of its reads, the operator saves a new description."""

        def __getattr__(self, name: str) -> Any:
            method = getattr(c, name)
            if not name.startswith("get_"):
                return method

            def read_then_operator_saves(*args: Any, **kwargs: Any) -> Any:
                found = method(*args, **kwargs)
                saved.append(f"approved by risk, PAY-{len(saved)}")
                operator.update_model_version(MODEL_NAME, version, description=saved[-1])
                return found

            return read_then_operator_saves

    entry = history.record(
        Interleaved(),  # type: ignore[arg-type]
        version,
        "None",
        "None",
        "verify",
        "carol",
        "passed against http://127.0.0.1:1",
    )
    assert saved, "the operator never saved"
    assert c.get_model_version(MODEL_NAME, version).description == saved[-1]
    assert entry.server_ms and [e.action for e in history.read(c, version)][-1] == "verify"


def test_an_audit_entry_after_a_stage_change_is_ordered_after_it(
    any_registry: str, good_candidate: Any, register: Callable[..., str]
) -> None:
    """An entry with no event time of its own (verify, regate, reject) is stamped by the
    server's clock after the stage change before it, whatever the writer's clock says."""
    version = register(good_candidate)
    stage_as_retrain(version)
    staged = history.read(client(), version)[-1]
    entry = history.record(client(), version, "Staging", "Staging", "verify", "carol", "passed")
    assert entry.server_ms >= staged.server_ms
    assert [e.action for e in history.read(client(), version)][-2:] == ["stage", "verify"]


def test_promoting_a_rejected_candidate_says_the_gates_rejected_it(
    mlflow_server: str, good_candidate: Any, register: Callable[..., str]
) -> None:
    """`promote 2` of a candidate the retrain's gates rejected said only "version 2 is in stage
    None, not Staging": not that the gates refused it, nor why, nor how to serve it anyway."""
    version = register(good_candidate)
    policy.record_gate(version, policy.GateDecision(False, ["AUC 0.61 below 0.65"]), "retrain")
    before = _state()
    with pytest.raises(RegistryError) as refused:
        policy.promote(version, "production", "looks fine", "carol")
    said = str(refused.value)
    assert f"version {version} was rejected by the gates (AUC 0.61 below 0.65)" in said, said
    assert "never staged" in said and "--override-gate" in said, said
    assert _state() == before


def test_promoting_a_version_a_retrain_superseded_meanwhile_says_what_moved_it(
    mlflow_server: str,
    good_candidate: Any,
    register: Callable[..., str],
    register_copy: Callable[[str], str],
    mark_verified: Callable[[str], None],
) -> None:
    """Carol verifies staged v1; the monthly retrain stages v2 (archiving v1) before she
    promotes. "version 1 is in stage Archived, not Staging" left her to find out why."""
    first = register(good_candidate)
    stage_as_retrain(first)
    mark_verified(first)
    second = register_copy(first)
    stage_as_retrain(second)
    before = _state()
    with pytest.raises(RegistryError) as refused:
        policy.promote(first, "production", "verified", "carol")
    said = str(refused.value)
    assert f"version {first} is in stage Archived, not Staging" in said, said
    assert "(supersede by monthly-retrain at " in said, said
    assert f": superseded in Staging by v{second}); only a staged version" in said, said
    assert _state() == before


def test_a_lock_write_reaching_the_server_late_does_not_give_two_transitions_the_lock(
    any_registry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob's rollback finds the lock free, but its lock write reaches a stalled tracking server
    only once alice's promote already holds the lock (later than the settle pause): bob must
    refuse, not run beside alice."""
    import threading

    c = client()
    c.create_registered_model(MODEL_NAME)
    monkeypatch.setattr(policy, "LOCK_WAIT_SECONDS", 0.0)
    bob_writing, alice_inside, bob_done = threading.Event(), threading.Event(), threading.Event()
    entered: list[str] = []
    outcome: dict[str, object] = {}

    class Stalled:
        """The real client, whose first registry write waits until alice holds the lock."""

        def __getattr__(self, name: str) -> Any:
            attribute = getattr(c, name)
            if name not in {"set_registered_model_tag", "create_registered_model"}:
                return attribute

            def delayed(*args: Any, **kwargs: Any) -> Any:
                if not bob_writing.is_set():
                    bob_writing.set()
                    assert alice_inside.wait(60), "alice never took the lock"
                return attribute(*args, **kwargs)

            return delayed

    def bob() -> None:
        try:
            with policy.transition_lock(Stalled(), "bob", "rolling back"):  # type: ignore[arg-type]
                entered.append("bob")
        except RegistryError as exc:
            outcome["bob"] = exc
        finally:
            bob_done.set()

    thread = threading.Thread(target=bob)
    thread.start()
    assert bob_writing.wait(60), "bob never wrote the lock"
    with policy.transition_lock(c, "alice", "promoting v1"):
        entered.append("alice")
        alice_inside.set()
        assert bob_done.wait(60)
    thread.join(60)
    assert entered == ["alice"], "both transitions held the lock"
    assert "another registry transition is in progress (promoting v1 by alice" in str(
        outcome.get("bob")
    ), outcome


def test_a_transition_that_waited_for_the_lock_stamps_it_when_it_takes_it(
    registry_home: Path, place_lock: Callable[[str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob's rollback waits for dave's promote: its lock's age must count from when bob took it,
    not from when bob began waiting, or a long wait would bring it that much nearer to being
    taken over as stale while bob still runs."""
    c = client()
    c.create_registered_model(MODEL_NAME)
    dave = f"dave | promoting v3 | {time.time():.0f} | d"
    place_lock(dave)
    clock = iter(range(int(time.time()), int(time.time()) + 10_000, 100))
    monkeypatch.setattr(policy, "server_clock", lambda: float(next(clock)))
    waits: list[float] = []

    def dave_ends_while_bob_waits(seconds: float) -> None:
        waits.append(seconds)
        policy._release(c, dave, failed=False)

    monkeypatch.setattr(policy.time, "sleep", dave_ends_while_bob_waits)
    with policy.transition_lock(c, "bob", "rolling back"):
        held = policy._lock_holder(c)
        assert held == policy._HELD.get() and held is not None
    assert waits == [1.0], "bob waited once for dave"
    stamped = float(held.rsplit(" | ", 2)[1])
    assert stamped == next(clock) - 100, "stamped by the last server time read: when taken"
