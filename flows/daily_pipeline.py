"""The daily chain: sync the warehouse, then build features only from a complete sync."""

from __future__ import annotations

from datetime import date
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.states import State

from flows.daily_sync import daily_sync
from flows.feature_build import FeatureBuildResult, feature_build
from paylater.redaction import redact
from paylater.settings import get_settings
from paylater.timeutil import default_as_of, resolve_as_of
from tasks.alerts import alert_on_failure, alerted_by_caller, root_cause
from tasks.features import fixed_utc_offset_us
from tasks.sync import incomplete, ledger_gaps
from tasks.warehouse import open_warehouse


class SyncNotComplete(RuntimeError):
    """The daily sync failed or left its ledger incomplete: features are not built."""


def sync_problem(state: State[Any]) -> str | None:
    """What went wrong with the sync's run, None when it completed.

    Not only a failure: a run cancelled or crashed half way has not failed, and the ledger of an
    earlier run of the same day may still read complete.
    """
    if state.is_completed():
        return None
    run = f" (flow run {state.state_details.flow_run_id})"
    if state.is_failed():
        return f"failed{run}: {root_cause(state)}"
    return f"ended {state.name}{run}: {state.message}"


def _ledger_problem(as_of: date, already_said: str = "") -> str | None:
    """What the sync ledger says is missing for `as_of` beyond what `already_said` (the sync's
    failure) says, None when nothing: a table whose recorded error the sync's own error quotes
    is said once, not twice."""
    warehouse = open_warehouse(get_settings().warehouse)
    try:
        gaps = ledger_gaps(warehouse, as_of)
    finally:
        warehouse.close()
    unsaid = [gap for gap in gaps if not gap.said_in(already_said)]
    return str(incomplete(as_of, unsaid)) if unsaid else None


def refuse_unended(day: date) -> None:
    """ValueError, naming the latest day it can run, while `day` has not ended in the business
    time zone: its sync would be refused, after a flow run and an alert for nothing."""
    latest = default_as_of()
    if day > latest:
        raise ValueError(
            f"as_of {day} has not ended yet in {get_settings().timezone}; "
            f"the latest day the pipeline can run is {latest}"
        )


@task
def require_complete_sync(as_of: date, sync_failure: str | None = None) -> None:
    """Raise, naming the tables and the reason, unless the sync ran and its ledger is complete.

    `sync_failure`: what `sync_problem` said of the sync's run.
    """
    try:
        ledger_problem = _ledger_problem(as_of, sync_failure or "")
    except Exception as exc:  # the warehouse unreachable: still say why the sync failed
        ledger_problem = f"its ledger could not be read ({type(exc).__name__}: {redact(str(exc))})"
    reasons = [f"daily_sync {sync_failure}"] if sync_failure else []
    reasons += [ledger_problem] if ledger_problem else []
    if reasons:
        raise SyncNotComplete(f"feature build for {as_of} not started: {'; '.join(reasons)}")


@flow(name="daily-pipeline", on_failure=[alert_on_failure])
def daily_pipeline(as_of: date | None = None) -> FeatureBuildResult:
    """Sync for `as_of`, check its ledger, then build features; a failed sync stops the chain."""
    day = resolve_as_of(as_of)
    refuse_unended(day)
    # The feature SQL needs a zone with a fixed UTC offset: refuse one it would refuse after the
    # sync, before syncing for nothing.
    fixed_utc_offset_us(get_settings().timezone, day)
    # One alert per failure: a failing step fails this run too, whose hook names the step's run
    # and its cause; the step's own hook, which alerts for its standalone deployment, stays quiet.
    with alerted_by_caller():
        # Not announced: the event would start the feature-build deployment for the same day too.
        sync_state = daily_sync(day, announce=False, return_state=True)
        require_complete_sync(day, sync_problem(sync_state))
        get_run_logger().info("sync for %s complete; building features", day)
        built = feature_build(day, return_state=True)
    return built_features(built)


def built_features(state: State[FeatureBuildResult]) -> FeatureBuildResult:
    """The feature build's result, or its own error re-raised naming its flow run."""
    try:
        return state.result()
    except BaseException as exc:
        exc.add_note(f"in feature-build flow run {state.state_details.flow_run_id}")
        raise


if __name__ == "__main__":
    import sys

    daily_pipeline(sys.argv[1] if len(sys.argv) > 1 else None)  # type: ignore[arg-type]
