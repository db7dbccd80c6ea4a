"""Registry policy: gates, stages and aliases kept in step, promotion, rollback; every change audited."""

from __future__ import annotations

import json
import logging
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from paylater.settings import Settings, get_settings
from registry import history
from registry.store import (
    MODEL_NAME,
    RegistryError,
    client,
    is_absent,
    normalise_version,
    server_clock,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

STAGE_ALIASES = {"Staging": "staging", "Production": "production"}
"""Stages are deprecated upstream; each is mirrored by an alias that always points at the same version."""
VERIFICATION_TAG = "staging_verification"


# ---- gates --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateThresholds:
    """Configured limits a candidate must meet (settings gate_*)."""

    min_auc: float
    max_ece: float
    max_auc_drop: float
    max_score_psi: float
    allow_feature_changes: bool
    min_oot_rows: int = Settings.model_fields["gate_min_oot_rows"].default
    min_oot_per_class: int = Settings.model_fields["gate_min_oot_per_class"].default

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> GateThresholds:
        """Thresholds from the configuration."""
        s = settings or get_settings()
        return cls(
            min_auc=s.gate_min_auc,
            max_ece=s.gate_max_ece,
            max_auc_drop=s.gate_max_auc_drop,
            max_score_psi=s.gate_max_score_psi,
            allow_feature_changes=s.gate_allow_feature_changes,
            min_oot_rows=s.gate_min_oot_rows,
            min_oot_per_class=s.gate_min_oot_per_class,
        )


@dataclass(frozen=True)
class ProductionBaseline:
    """The production version scored on the candidate's OOT rows (probs None: it could not be)."""

    version: str
    features: list[str]
    probs: npt.NDArray[np.float64] | None
    problem: str = ""
    trained_on_oot: str = ""
    """The OOT month (YYYY-MM) when production was fitted on it: its figures there are in-sample."""


@dataclass
class GateDecision:
    """Whether a candidate may be staged, why not, and the figures compared."""

    passed: bool
    reasons: list[str]
    checks: dict[str, float] = field(default_factory=dict)
    production_version: str | None = None
    """Production when the candidate was judged (None: there was none); promote refuses once
    production is another version, the decision being about a model no longer serving."""


def evaluate_gates(
    labels: npt.ArrayLike,
    candidate_probs: npt.ArrayLike,
    candidate_features: Sequence[str],
    thresholds: GateThresholds,
    baseline: ProductionBaseline | None = None,
) -> GateDecision:
    """Absolute gates always; against production (same OOT rows) when there is one. An OOT month
    too small to judge rejects the candidate before any metric is trusted."""
    from tasks.evaluation import classification_metrics as metrics_of
    from tasks.evaluation import expected_calibration_error, population_stability_index

    y = np.asarray(labels)
    rows, defaults = int(y.size), int((y == 1).sum())
    if (
        rows < thresholds.min_oot_rows
        or min(defaults, rows - defaults) < thresholds.min_oot_per_class
    ):
        return GateDecision(
            passed=False,
            reasons=[
                f"out-of-time month too small to judge: {rows} rows (at least "
                f"{thresholds.min_oot_rows}), {defaults} defaults and {rows - defaults} repaid "
                f"(at least {thresholds.min_oot_per_class} each)"
            ],
            checks={"oot_rows": float(rows), "oot_defaults": float(defaults)},
        )

    cand = metrics_of(labels, candidate_probs)
    checks = {"candidate_auc": cand["auc"], "candidate_ece": cand["ece"]}
    reasons: list[str] = []
    if cand["auc"] < thresholds.min_auc:
        reasons.append(f"AUC {cand['auc']:.4f} below the minimum {thresholds.min_auc}")
    if cand["ece"] > thresholds.max_ece:
        reasons.append(
            f"calibration error {cand['ece']:.4f} above the maximum {thresholds.max_ece}"
        )
    if baseline is None:
        return GateDecision(passed=not reasons, reasons=reasons, checks=checks)
    added = sorted(set(candidate_features) - set(baseline.features))
    removed = sorted(set(baseline.features) - set(candidate_features))
    if (added or removed) and not thresholds.allow_feature_changes:
        reasons.append(
            f"feature set differs from production v{baseline.version}: added {added or '[]'}, "
            f"removed {removed or '[]'} (set gate_allow_feature_changes once serving follows)"
        )
    if baseline.trained_on_oot:
        # In-sample figures would favour production; the candidate is older data than it.
        reasons.append(
            f"production v{baseline.version} was trained on the out-of-time month"
            f" {baseline.trained_on_oot}: the candidate cannot be compared with it there (a retrain"
            " for an as_of before production's?); retrain with a later as_of"
        )
        return GateDecision(
            passed=False, reasons=reasons, checks=checks, production_version=baseline.version
        )
    if baseline.probs is None and removed and thresholds.allow_feature_changes:
        # Production needs features the candidate's rows no longer have: there is nothing to
        # compare it on, and the change was allowed, so the absolute gates decide alone.
        return GateDecision(
            passed=not reasons,
            reasons=reasons,
            checks=checks,
            production_version=baseline.version,
        )
    if baseline.probs is None:
        reasons.append(
            f"production v{baseline.version} could not be scored on this OOT month: {baseline.problem}"
        )
    else:
        prod_auc = metrics_of(labels, baseline.probs)["auc"]
        drop = prod_auc - cand["auc"]
        psi = population_stability_index(baseline.probs, candidate_probs)
        checks |= {
            "production_auc": prod_auc,
            "production_ece": expected_calibration_error(labels, baseline.probs),
            "auc_drop": drop,
            "score_psi": psi,
        }
        if drop > thresholds.max_auc_drop:
            reasons.append(
                f"AUC {cand['auc']:.4f} is {drop:.4f} below production v{baseline.version} "
                f"({prod_auc:.4f}); allowed drop {thresholds.max_auc_drop}"
            )
        if psi > thresholds.max_score_psi:
            reasons.append(
                f"score PSI {psi:.4f} against production v{baseline.version} above {thresholds.max_score_psi}"
            )
    return GateDecision(
        passed=not reasons,
        reasons=reasons,
        checks=checks,
        production_version=baseline.version,
    )


# ---- lookups ------------------------------------------------------------------------------------


def get_version(mlflow_client: MlflowClient, version: object) -> ModelVersion:
    """A registered version, or RegistryError naming it."""
    from mlflow.exceptions import MlflowException

    try:
        number = normalise_version(version)
    except ValueError as exc:
        raise RegistryError(f"not a version number: {version!r}") from exc
    try:
        return mlflow_client.get_model_version(MODEL_NAME, number)
    except MlflowException as exc:
        if not is_absent(exc):
            raise  # a registry that cannot answer must not read as a version that does not exist
        raise RegistryError(f"{MODEL_NAME} has no version {number}") from exc


def alias_version(mlflow_client: MlflowClient, alias: str) -> str | None:
    """The version an alias points at, or None (errors other than "not found" propagate)."""
    from mlflow.exceptions import MlflowException

    try:
        return normalise_version(
            mlflow_client.get_model_version_by_alias(MODEL_NAME, alias).version
        )
    except MlflowException as exc:
        if not is_absent(exc):
            raise
        return None


def resolve_version(stage_or_version: str, mlflow_client: MlflowClient | None = None) -> str:
    """'production', 'staging' (case-insensitive) or a version number -> an existing version number."""
    c = mlflow_client or client()
    value = str(stage_or_version).strip()
    if value.lower() in STAGE_ALIASES.values():
        found = alias_version(c, value.lower())
        if found is None:
            raise RegistryError(f"no version of {MODEL_NAME} is in {value.lower()}")
        return found
    if not value.isdigit():
        raise RegistryError(
            f"expected production, staging or a version number, got {stage_or_version!r}"
        )
    return normalise_version(get_version(c, value).version)


def all_versions(mlflow_client: MlflowClient) -> list[ModelVersion]:
    """Every version of the registered model, newest first."""
    found = mlflow_client.search_model_versions(f"name='{MODEL_NAME}'")
    return sorted(found, key=lambda mv: int(mv.version), reverse=True)


# ---- transitions --------------------------------------------------------------------------------

LOCK_TAG = "transition_in_progress"
"""Tag holding a transition's token (who, what, since) on the lock's registered model; on the
registered model itself only as releases before the atomic lock left it."""
LOCK_MODEL_PREFIX = f"{MODEL_NAME}.transition-lock."
"""The lock is a registered model `<prefix><generation>` (12 digits): each taking creates the
next generation, which the backend store's unique name lets only one transition create."""
RELEASED_TAG = "released"
"""On a lock generation whose transition ended (or that `registry unlock` created broken)."""
LOCK_DESCRIPTION = (
    "paylater's registry transition lock (one promote, rollback or staging at a time), not a"
    " model: leave it alone; `paylater registry unlock --reason TEXT` breaks a held one"
)
LOCK_WAIT_SECONDS = 30.0
"""How long a transition waits for another to finish before refusing."""


def lock_stale_seconds() -> float:
    """The age (s) past which a transition lock is taken for left by a dead holder (setting
    registry_lock_stale_seconds)."""
    return get_settings().registry_lock_stale_seconds


RECORDED_ONLY = frozenset({"verify", "regate", "reject"})
"""Audit actions that record an outcome in the version's current stage and move nothing."""


_HELD: ContextVar[str | None] = ContextVar("transition_lock_token", default=None)
"""The token of the lock this context's transition holds: each move checks it still does."""


@dataclass(frozen=True)
class _Generation:
    """The lock's latest generation: its number (0: never taken), token, whether still held."""

    number: int
    token: str | None = None
    held: bool = False

    @property
    def holder(self) -> str | None:
        """The token of the transition holding the lock, None when it is free."""
        return self.token if self.held else None


@contextmanager
def transition_lock(mlflow_client: MlflowClient, actor: str, what: str) -> Iterator[None]:
    """Hold the registry's transition lock: one promote, rollback or staging at a time.

    Taking it creates the lock's next generation (a registered model): the backend store creates
    a name once, so of transitions that find the lock free together, however late their
    requests reach the server, exactly one takes it. It guards this project's transitions, not
    stage changes made by hand in the MLflow UI. Its age is measured by the tracking server's
    clock: the holder's and the reader's may disagree.
    """
    from mlflow.exceptions import MlflowException

    stale_after = lock_stale_seconds()  # a bad setting is refused before anything moves
    try:
        legacy = _legacy_holder(mlflow_client)
    except MlflowException as exc:
        if not is_absent(exc):
            raise
        yield  # no registered model yet: nothing to move, the transition says so itself
        return
    token = ""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        latest = _latest_lock(mlflow_client)
        left = [t for t in (latest.holder, legacy) if t]
        now = server_clock() if left else 0.0
        fresh = [t for t in left if _lock_age(t, now) <= stale_after]
        held = fresh[0] if fresh else None
        if not fresh:
            # Stamped when taken, not when the wait began: its age is how long it has been held.
            token = f"{actor} | {what} | {now or server_clock():.0f} | {uuid.uuid4().hex}"
            if _take(mlflow_client, latest.number + 1, token):
                _took_over(mlflow_client, latest, legacy, now, stale_after)
                break
            held = _lock_holder(mlflow_client)  # the transition that took it first
        if time.monotonic() > deadline:
            raise RegistryError(
                f"another registry transition is in progress ({_describe(held)}): nothing was"
                f" changed; run this again once it has ended. A lock older than"
                f" {stale_after:.0f} s is taken over; if its holder is gone (its process"
                " died, the tracking server failed under it), `paylater registry unlock --reason"
                " TEXT` breaks it now"
            )
        time.sleep(1.0)
        legacy = _legacy_holder(mlflow_client)
    mine = _HELD.set(token)
    try:
        yield
    except BaseException:
        _release(mlflow_client, token, failed=True)
        raise
    else:
        _release(mlflow_client, token, failed=False)
    finally:
        _HELD.reset(mine)


def _take(mlflow_client: MlflowClient, number: int, token: str) -> bool:
    """Whether creating generation `number` held by `token` took the lock (it is the latest)."""
    created = _create_generation(mlflow_client, number, {LOCK_TAG: token})
    latest = _latest_lock(mlflow_client)
    if latest.holder == token:
        return True  # also when a retried create found its first attempt had landed
    if created:
        # A generation deleted since (the one before the latest) was created again: another
        # transition took the lock after it; this one must not stay behind as a stray.
        _drop_generation(mlflow_client, number)
    return False


def _took_over(
    mlflow_client: MlflowClient,
    previous: _Generation,
    legacy: str | None,
    now: float,
    stale_after: float,
) -> None:
    """After taking the lock: warn of each stale lock taken over, remove the one a release
    before the atomic lock left, and the generation before this one (none holds it now)."""
    for stale in (previous.holder, legacy):
        if stale:
            log.warning(
                "took over the transition lock left by %s (older than %.0f s: its holder is"
                " taken for gone); check `paylater registry history` for what it had done",
                _describe(stale, now),
                stale_after,
            )
    try:
        if legacy:
            _drop_legacy(mlflow_client)
        if previous.number:
            _drop_generation(mlflow_client, previous.number)
    except Exception as exc:
        # Housekeeping only: a generation before the latest holds nothing, and a stale legacy
        # tag is taken over again. Raised here, it would leave the lock just taken held.
        log.warning("the transition lock was taken; tidying up after it failed: %r", exc)


def _release(mlflow_client: MlflowClient, token: str, failed: bool) -> None:
    """Mark the lock released if `token` still holds it (a holder taken over releases nothing:
    it only ever writes to its own generation). After a failed transition (often: the tracking
    server failed), a release that fails too is logged, not raised over the first error."""
    try:
        latest = _latest_lock(mlflow_client)
        if latest.holder == token:
            mlflow_client.set_registered_model_tag(
                _generation_name(latest.number), RELEASED_TAG, "ended"
            )
    except Exception as exc:
        if not failed:
            raise
        log.warning(
            "the transition lock could not be released (%r): it is taken over after %.0f s, or"
            " `paylater registry unlock --reason TEXT` breaks it",
            exc,
            lock_stale_seconds(),
        )


def confirm_lock(mlflow_client: MlflowClient) -> None:
    """RegistryError unless this context's transition still holds the lock (when it holds one).

    A holder slow past lock_stale_seconds(), or whose lock was broken by `registry unlock`, stops
    at its next step instead of moving stages beside the transition that took the lock over.
    """
    token = _HELD.get()
    if token is None:
        return
    held = _lock_holder(mlflow_client)
    if held != token:
        raise RegistryError(
            f"this transition's lock was taken over ({_describe(held)}) while it ran: it stopped"
            " here; see `paylater registry list` and `paylater registry history`, then run the"
            " command again if it is still wanted"
        )


def unlock(reason: str | None, actor: str) -> str | None:
    """Break the transition lock (its holder is gone); returns who held it, None when no one did.

    The break creates the lock's next generation, released: it fails, breaking nothing, when a
    transition took the lock over meanwhile. It is kept on the registered model (tag
    `transition_lock_broken`: who, when, why, the lock). A holder that is still running stops at
    its next step (confirm_lock).
    """
    from mlflow.exceptions import MlflowException

    why = _require_reason(reason)
    c = client()
    try:
        legacy = _legacy_holder(c)
    except MlflowException as exc:
        if not is_absent(exc):
            raise
        return None  # no registered model yet: no transition ever held the lock
    latest = _latest_lock(c)
    held = latest.holder or legacy
    if held is None:
        return None
    stamp = f"{server_clock():.0f}"
    record = f"{actor} | {stamp} | {why} | was: {held}"
    if latest.holder:
        breaker = f"{actor} | breaking the lock | {stamp} | {uuid.uuid4().hex}"
        tags = {LOCK_TAG: breaker, RELEASED_TAG: "broken", "transition_lock_broken": record}
        _create_generation(c, latest.number + 1, tags)
        if _latest_lock(c).token != breaker:
            _lock_changed(_lock_holder(c))
    if legacy:
        if _legacy_holder(c) != legacy:
            _lock_changed(_lock_holder(c))
        _drop_legacy(c)
    c.set_registered_model_tag(MODEL_NAME, "transition_lock_broken", record)
    return _describe(held)


def _lock_changed(now_held: str | None) -> None:
    """RegistryError: the lock was taken by another transition (alive) while being broken."""
    raise RegistryError(
        f"the lock changed while it was being broken (now: {_describe(now_held)}): nothing"
        " was broken; run this again if that holder is gone too"
    )


def _generation_name(number: int) -> str:
    """The registered model of the lock's generation `number`."""
    return f"{LOCK_MODEL_PREFIX}{number:012d}"


def _latest_lock(mlflow_client: MlflowClient) -> _Generation:
    """The lock's latest generation (the highest number: zero-padded names sort as numbers)."""
    found = mlflow_client.search_registered_models(
        filter_string=f"name LIKE '{LOCK_MODEL_PREFIX}%'", max_results=1, order_by=["name DESC"]
    )
    if not found:
        return _Generation(0)
    latest = found[0]
    number = latest.name.removeprefix(LOCK_MODEL_PREFIX)
    if len(number) != 12 or not number.isdigit():
        raise RegistryError(
            f"registered model {latest.name!r} is not a generation of the transition lock"
            " (created by hand?): delete or rename it in the MLflow UI, then run this again"
        )
    tags = latest.tags or {}
    return _Generation(int(number), tags.get(LOCK_TAG), RELEASED_TAG not in tags)


def _create_generation(mlflow_client: MlflowClient, number: int, tags: dict[str, str]) -> bool:
    """Create the lock's generation `number`; False when it exists (another transition's)."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(
            _generation_name(number), tags=tags, description=LOCK_DESCRIPTION
        )
    except MlflowException as exc:
        # The SQL store reads the existing model to word its refusal: one deleted in between
        # answers "does not exist", still a create that lost.
        if exc.error_code not in {"RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"}:
            raise
        return False
    return True


def _drop_generation(mlflow_client: MlflowClient, number: int) -> None:
    """Delete the lock's generation `number`, if it is still there."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.delete_registered_model(_generation_name(number))
    except MlflowException as exc:
        if not is_absent(exc):
            raise


def _legacy_holder(mlflow_client: MlflowClient) -> str | None:
    """The token of a lock left as a tag on the registered model by a release before the atomic
    lock (raises MLflow's "does not exist" when there is no registered model yet)."""
    return (mlflow_client.get_registered_model(MODEL_NAME).tags or {}).get(LOCK_TAG)


def _drop_legacy(mlflow_client: MlflowClient) -> None:
    """Remove a lock tag a release before the atomic lock left on the registered model."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.delete_registered_model_tag(MODEL_NAME, LOCK_TAG)
    except MlflowException as exc:
        if not is_absent(exc):
            raise


def _lock_holder(mlflow_client: MlflowClient) -> str | None:
    """The token of the transition holding the lock, if any (a lock tag a release before the
    atomic lock left counts, until taken over or broken)."""
    return _latest_lock(mlflow_client).holder or _legacy_holder(mlflow_client)


def _lock_age(token: str, now: float | None = None) -> float:
    """Seconds from the lock's taking to `now` (default: this machine's clock); a token that
    cannot be read counts as stale."""
    try:
        taken = float(token.rsplit(" | ", 2)[1])
    except (IndexError, ValueError):
        return float("inf")
    return (time.time() if now is None else now) - taken


def _describe(token: str | None, now: float | None = None) -> str:
    """Who holds the lock, doing what, for how long."""
    if not token:
        return "it has just ended"
    # Read from the right: an actor's name may hold the separator.
    head = token.rsplit(" | ", 2)[0]
    if " | " not in head:
        return token
    actor, what = head.rsplit(" | ", 1)
    if now is None:
        try:
            now = server_clock()
        except Exception:  # describing a holder must not fail the message it goes into
            now = time.time()
    return f"{what} by {actor}, {max(0.0, _lock_age(token, now)):.0f} s ago"


def _require_reason(reason: str | None) -> str:
    """A non-blank reason, or RegistryError."""
    if reason is None or not reason.strip():
        raise RegistryError("a reason is required (--reason TEXT): it goes into the audit history")
    return reason.strip()


def move(
    mlflow_client: MlflowClient,
    version: str,
    to_stage: str,
    action: str,
    actor: str,
    reason: str,
) -> history.Transition:
    """Set a version's stage, keep the stage aliases in step, and record the transition (at
    the tracking server's time of the stage change)."""
    confirm_lock(mlflow_client)
    mv = get_version(mlflow_client, version)
    number = normalise_version(mv.version)
    from_stage = str(mv.current_stage or "None")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated, still the UI's view
        moved = mlflow_client.transition_model_version_stage(
            MODEL_NAME, number, to_stage, archive_existing_versions=False
        )
    old_alias = STAGE_ALIASES.get(from_stage)
    if (
        old_alias
        and old_alias != STAGE_ALIASES.get(to_stage)
        and alias_version(mlflow_client, old_alias) == number
    ):
        mlflow_client.delete_registered_model_alias(MODEL_NAME, old_alias)
    new_alias = STAGE_ALIASES.get(to_stage)
    if new_alias:
        mlflow_client.set_registered_model_alias(MODEL_NAME, new_alias, number)
    return history.record(
        mlflow_client,
        number,
        from_stage,
        to_stage,
        action,
        actor,
        reason,
        server_ms=moved.last_updated_timestamp,
    )


def _others_in_stage(mlflow_client: MlflowClient, stage: str, keep: str) -> list[str]:
    """Versions other than `keep` in `stage` (by stage or by alias)."""
    found = {
        normalise_version(mv.version)
        for mv in all_versions(mlflow_client)
        if mv.current_stage == stage
    }
    aliased = alias_version(mlflow_client, STAGE_ALIASES[stage])
    if aliased:
        found.add(aliased)
    return sorted(found - {keep}, key=int)


def stage_candidate(version: str, actor: str, reason: str) -> list[history.Transition]:
    """Move a gated candidate to Staging (alias staging); an earlier staged candidate is archived."""
    c = client()
    number = normalise_version(get_version(c, version).version)
    with transition_lock(c, actor, f"staging v{number}"):
        # The new version takes the alias first, so `staging` never points nowhere in between.
        previous = _others_in_stage(c, "Staging", number)
        changes = [move(c, number, "Staging", "stage", actor, reason)]
        changes += [
            move(c, old, "Archived", "supersede", actor, f"superseded in Staging by v{number}")
            for old in previous
        ]
    return changes


def record_gate(version: str, decision: GateDecision, actor: str, audit: str | None = None) -> None:
    """Write the gate outcome on the version, with the production version it was judged against;
    a rejection is tagged and audited, its stage unchanged; `audit` names an entry for any outcome."""
    c = client()
    number = normalise_version(version)
    status = "passed" if decision.passed else "rejected"
    tags = {
        "gate_status": status,
        "gate_reasons": json.dumps(decision.reasons),
        "gate_checks": json.dumps({k: round(v, 6) for k, v in decision.checks.items()}),
        "gate_production_version": decision.production_version or "",
    }
    if not decision.passed:
        tags |= {"rejected": "true", "rejected_reasons": "; ".join(decision.reasons)}
    for key, value in tags.items():
        c.set_model_version_tag(MODEL_NAME, number, key, value)
    if decision.passed:
        # A version judged again (regate) must not keep an earlier rejection's tags.
        for key in ("rejected", "rejected_reasons"):
            if key in (get_version(c, number).tags or {}):
                c.delete_model_version_tag(MODEL_NAME, number, key)
    if audit or not decision.passed:
        stage = str(get_version(c, number).current_stage or "None")
        against = f"against production {_named(decision.production_version)}"
        said = "; ".join(decision.reasons) if decision.reasons else "all gates met"
        history.record(
            c, number, stage, stage, audit or "reject", actor, f"{status} {against}: {said}"
        )


def promote(
    version: str, to: str, reason: str | None, actor: str, override_gate: bool = False
) -> list[history.Transition]:
    """Staging -> Production after a passed staging verification; the old production is archived.

    Run again on a version already in Production, it finishes what an interrupted promote left
    (the alias, the archiving of the old version) and returns only those changes, if any.

    A version the gates rejected, or never judged (registered by hand), can reach Staging only by
    hand, and needs `override_gate`; the history then records that the gates were overridden,
    and what they said.
    """
    if str(to).strip().lower() != "production":
        raise RegistryError(
            f"--to must be production, got {to!r} (candidates reach staging through monthly_retrain)"
        )
    why = _require_reason(reason)
    c = client()
    number = resolve_version(version, c)
    with transition_lock(c, actor, f"promoting v{number}"):
        return _promote(c, number, why, actor, override_gate)


def _promote(
    c: MlflowClient, number: str, why: str, actor: str, override_gate: bool
) -> list[history.Transition]:
    """promote(), under the transition lock: checks read the state no one else is changing."""
    mv = get_version(c, number)
    # Production too: a promote that stopped half way (the registry failed after the version
    # moved) is finished by running it again, under the same checks.
    if mv.current_stage not in {"Staging", "Production"}:
        tags = mv.tags or {}
        if mv.current_stage == "None" and tags.get("gate_status") == "rejected":
            # The usual reason a candidate is not staged: say so, and the deliberate way on.
            raise RegistryError(
                f"version {number} was rejected by the gates ({tags.get('rejected_reasons', '')})"
                " and never staged: only a staged version can be promoted. To serve it anyway,"
                " put it in Staging in the MLflow UI, verify it, then promote it with"
                " --override-gate (recorded in the history)"
            )
        raise RegistryError(
            f"version {number} is in stage {mv.current_stage}, not Staging{_moved_by(c, number)};"
            " only a staged version can be promoted"
        )
    verification = (mv.tags or {}).get(VERIFICATION_TAG)
    if verification != "passed":
        # Staged in the MLflow UI, a version has the stage but not the `staging` alias, which
        # `verify --stage staging` (and the staging service) would follow to another version.
        how = (
            "--stage staging --url URL` against the staging service"
            if alias_version(c, "staging") == number
            else f"--version {number} --url URL` against a service serving it"
            f" (PAYLATER_SERVE_STAGE={number})"
        )
        raise RegistryError(
            f"version {number} has no passed staging verification (status: {verification or 'never run'}); "
            f"run `paylater registry verify {how} first"
        )
    tags = mv.tags or {}
    gate = tags.get("gate_status")
    if gate != "passed":
        if gate == "rejected":
            verdict = tags.get("rejected_reasons", "")
            said = f"was rejected by the gates ({verdict})"
        else:
            verdict = "never judged"
            said = "was never judged by the gates (registered outside monthly_retrain)"
        if not override_gate:
            raise RegistryError(
                f"version {number} {said}: promote it only on purpose, with --override-gate"
            )
        why = f"gates overridden ({verdict}): {why}"
    elif alias_version(c, "production") != number and (stale := gate_out_of_date(c, number)):
        # Not Staging only: a version the MLflow UI put in Production has the stage, not the
        # alias; only a promote that already moved the alias has nothing left to judge.
        if not override_gate:
            raise RegistryError(stale)
        why = f"gates overridden (out of date: {stale.split(':', 1)[0]}): {why}"
    # Promote first, then archive: the `production` alias always names a version.
    previous = _others_in_stage(c, "Production", number)
    changes = []
    if (
        mv.current_stage != "Production"
        or alias_version(c, "production") != number
        or _last_entry(history.read(c, number), number, "") is None  # its audit entry is missing
    ):
        changes.append(move(c, number, "Production", "promote", actor, why))
    changes += [
        move(c, old, "Archived", "archive", actor, f"replaced in production by v{number}: {why}")
        for old in previous
    ]
    return changes


def _moved_by(c: MlflowClient, number: str) -> str:
    """ ", since its <action> by <actor>: <reason>" after the version's last recorded move (a
    retrain superseding it, a rollback archiving it), or nothing when none is recorded."""
    moves = [e for e in history.read(c, number) if e.action not in RECORDED_ONLY]
    if not moves or moves[-1].to_stage != str(get_version(c, number).current_stage):
        return ""  # none, or the stage was changed outside paylater since: it would mislead
    last = moves[-1]
    return f" ({last.action} by {last.actor} at {last.at}: {last.reason})"


def production_disagreement(c: MlflowClient, besides: str) -> str | None:
    """What is wrong when the `production` alias and the Production stage name different
    versions (`besides` not counted): a stage changed outside paylater, in the MLflow UI."""
    alias = alias_version(c, "production")
    by_stage = {
        normalise_version(mv.version) for mv in all_versions(c) if mv.current_stage == "Production"
    } - {besides}
    if by_stage <= ({alias} if alias else set()):
        return None
    listed = ", ".join(f"v{v}" for v in sorted(by_stage, key=int)) or "no version"
    return (
        f"the `production` alias names {_named(alias)} but the Production stage holds {listed}"
        " (a stage changed outside paylater, in the MLflow UI?): make them"
        " agree first (move the stage back in the UI, or `paylater registry promote` it, or"
        " `rollback` when it is the version production had before: they move both)"
    )


def gate_out_of_date(c: MlflowClient, number: str) -> str | None:
    """Why a version's passed gate no longer holds (None: it does): production is no longer the
    version it was judged against, by alias or by stage."""
    tags = get_version(c, number).tags or {}
    judged = tags.get("gate_production_version") or None
    current = alias_version(c, "production")
    regate = f"`paylater registry regate {number}`"
    if current != judged:
        return (
            f"version {number} was gated against production {_named(judged)}, but production is"
            f" now {_named(current)}: that gate decision no longer holds; run {regate} to judge"
            f" it against {_named(current)} on its out-of-time month, then promote it"
        )
    disagreement = production_disagreement(c, number)
    if disagreement:
        return f"version {number} cannot be promoted on its gate decision: {disagreement}, then run {regate}"
    return None


def rollback_target(entries: Sequence[history.Transition], current: str) -> list[str]:
    """Earlier production versions to restore, most recently demoted first; rolled-back ones excluded."""
    left_at: dict[str, tuple[int, int]] = {}
    rolled_back: set[str] = set()
    for entry in entries:
        if entry.from_stage == "Production" and entry.to_stage != "Production":
            left_at[entry.version] = entry.position
            if entry.action == "rollback":
                rolled_back.add(entry.version)
        if entry.to_stage == "Production" and entry.action == "promote":
            rolled_back.discard(entry.version)  # promoted again on purpose: trusted again
    candidates = [v for v in left_at if v != current and v not in rolled_back]
    return sorted(candidates, key=lambda v: left_at[v], reverse=True)


def rollback(reason: str | None, actor: str) -> list[history.Transition]:
    """Restore the most recent earlier production version; the current one is archived."""
    why = _require_reason(reason)
    c = client()
    # What the person saw in production when asking: a rollback that waited for another one
    # must not roll back the version that one restored.
    seen = alias_version(c, "production")
    with transition_lock(c, actor, "rolling back"):
        return _rollback(c, why, actor, seen)


def _rollback(c: MlflowClient, why: str, actor: str, seen: str | None) -> list[history.Transition]:
    """rollback(), under the transition lock; refused when production is no longer `seen`."""
    entries = history.read(c)
    current = alias_version(c, "production")
    if current != seen:
        raise RegistryError(
            f"production changed from {_named(seen)} to {_named(current)} while this rollback"
            " waited for another transition: nothing was changed; run it again if"
            f" {_named(current)} must be rolled back too"
        )
    current_exists = current is not None
    if current is None:
        # Deleting a version drops its aliases: if the last version promoted or rolled back to
        # is gone, production is empty because of that, and its predecessor is still the target.
        current = _deleted_production(c, entries)
    if current is None:
        # No alias, none deleted; a version the MLflow UI put in Production is named, not hidden.
        _refuse_moved_by_hand(_moved_by_hand(c, entries, ""), "", False, None)
        raise RegistryError("nothing is in production: there is nothing to roll back")
    # Versions still in the Production stage beside the alias's: a transition stopped before
    # archiving them (the registry failed half way), so no entry says they left production.
    # Also when production was deleted: an interrupted promote of the deleted version left the
    # one it replaced there, which served before it and is the one to restore.
    left = _others_in_stage(c, "Production", current)
    archive = [current] if current_exists else []
    by_hand = _moved_by_hand(c, entries, current)
    if current_exists and left and _last_entry(entries, current, "rollback"):
        # A rollback to `current` stopped half way: finish it, go no further back.
        _refuse_moved_by_hand(by_hand, current, current_exists, None)
        return [
            move(c, old, "Archived", "rollback", actor, f"rolled back to v{current}: {why}")
            for old in left
        ]
    # A promote that stopped half way left the version it replaced in Production: that one
    # was serving just before, so it is the first to restore.
    entered = {v: e for v in left if (e := _last_entry(entries, v, ""))}
    replaced = sorted(entered, key=lambda v: entered[v].position, reverse=True)
    target = None
    for candidate in [*replaced, *rollback_target(entries, current)]:
        try:
            get_version(c, candidate)
        except RegistryError:
            continue  # deleted since: try the one before
        target = candidate
        break
    if target is None:
        raise RegistryError(f"no earlier production version to roll back to from v{current}")
    # One the MLflow UI put back in Production is the target: the rollback finishes that one.
    _refuse_moved_by_hand([v for v in by_hand if v != target], current, current_exists, target)
    changes = [move(c, target, "Production", "rollback", actor, f"rollback from v{current}: {why}")]
    changes += [
        move(c, old, "Archived", "rollback", actor, f"rolled back to v{target}: {why}")
        for old in [*archive, *left]
        if old != target
    ]
    return changes


def _moved_by_hand(
    c: MlflowClient, entries: Sequence[history.Transition], current: str
) -> list[str]:
    """Versions in the Production stage besides `current` that no transition of paylater put
    there (their latest audit entry does not): moved in the MLflow UI, which writes no entry."""
    return [
        number
        for mv in all_versions(c)
        if mv.current_stage == "Production"
        and (number := normalise_version(mv.version)) != current
        and _last_entry(entries, number, "") is None
    ]


def _refuse_moved_by_hand(
    by_hand: Sequence[str], current: str, current_exists: bool, target: str | None
) -> None:
    """RegistryError naming versions moved into Production by hand: the rollback cannot tell
    whether they serve (the alias says not) nor whether to archive them, so it changes nothing."""
    if not by_hand:
        return
    listed = ", ".join(f"v{v}" for v in sorted(by_hand, key=int))
    alias = f"v{current}" if current_exists else "no version"
    if current and not current_exists:
        alias += f" (v{current} was deleted)"
    if target:
        plan = f"restore v{target} and archive {listed}"
    else:
        plan = f"archive {listed}" if current else "find no earlier version to restore"
    raise RegistryError(
        f"{listed} {'is' if len(by_hand) == 1 else 'are'} in the Production stage but the"
        f" `production` alias names {alias}, and no paylater transition put"
        f" {'it' if len(by_hand) == 1 else 'them'} there (a stage changed in the MLflow UI?):"
        f" this rollback would {plan}, which may not be what was meant. Nothing was changed."
        f" Move {listed} back to its stage in the MLflow UI and run the rollback again, or make"
        f" it production on purpose with `paylater registry promote`"
    )


def _last_entry(
    entries: Sequence[history.Transition], version: str, action: str
) -> history.Transition | None:
    """The version's latest audit entry that moved it, if it put the version into Production
    (by `action`, when given)."""
    # Not a verify, regate or reject entry: written in whatever stage the version is in, maybe
    # one set in the MLflow UI, it would vouch for a stage no transition of paylater set.
    mine = [e for e in entries if e.version == version and e.action not in RECORDED_ONLY]
    if not mine or mine[-1].to_stage != "Production":
        return None
    return mine[-1] if not action or mine[-1].action == action else None


def _named(version: str | None) -> str:
    """A version as the messages name it."""
    return f"v{version}" if version else "no version"


def _deleted_production(
    mlflow_client: MlflowClient, entries: Sequence[history.Transition]
) -> str | None:
    """The version that last entered Production per the history, if it has since been deleted."""
    entered = [e for e in entries if e.to_stage == "Production" and e.from_stage != "Production"]
    if not entered:
        return None
    last = entered[-1].version
    try:
        get_version(mlflow_client, last)
    except RegistryError:
        return last
    return None


def record_verification(version: str, passed: bool, url: str, detail: str, at: str) -> None:
    """Store the staging verification outcome on the version (what promote checks)."""
    c = client()
    number = normalise_version(get_version(c, version).version)
    for key, value in {
        VERIFICATION_TAG: "passed" if passed else "failed",
        f"{VERIFICATION_TAG}_at": at,
        f"{VERIFICATION_TAG}_url": url,
        f"{VERIFICATION_TAG}_detail": detail[:5000],
    }.items():
        c.set_model_version_tag(MODEL_NAME, number, key, value)


def version_summary(mv: ModelVersion, aliases: dict[str, str]) -> dict[str, Any]:
    """One row of `registry list`."""
    tags = mv.tags or {}
    number = normalise_version(mv.version)
    return {
        "version": number,
        "stage": mv.current_stage,
        "aliases": ",".join(a for a, v in aliases.items() if v == number),
        "gate": tags.get("gate_status", ""),
        "verification": tags.get(VERIFICATION_TAG, ""),
        "created": mv.creation_timestamp,
        "run_id": mv.run_id,
    }
