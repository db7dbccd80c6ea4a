"""The daily chain: sync the warehouse, then build features only from a complete sync."""

from __future__ import annotations

from datetime import date
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.states import State

from flows.daily_sync import daily_sync
from flows.feature_build import FeatureBuildResult, feature_build
from paylater.settings import get_settings
from paylater.timeutil import resolve_as_of
from tasks.alerts import alert_on_failure
from tasks.features import fixed_utc_offset_us
from tasks.sync import SyncIncomplete, check_ledger
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
    if state.is_failed():
        return f"failed: {state.message}"
    return f"ended {state.name}: {state.message}"


@task
def require_complete_sync(as_of: date, sync_failure: str | None = None) -> None:
    """Raise, naming the tables and the reason, unless the sync ran and its ledger is complete.

    `sync_failure`: what `sync_problem` said of the sync's run.
    """
    warehouse = open_warehouse(get_settings().warehouse)
    try:
        check_ledger(warehouse, as_of)
        ledger_problem = None
    except SyncIncomplete as exc:
        ledger_problem = str(exc)
    finally:
        warehouse.close()
    reasons = [f"daily_sync {sync_failure}"] if sync_failure else []
    reasons += [ledger_problem] if ledger_problem else []
    if reasons:
        raise SyncNotComplete(f"feature build for {as_of} not started: {'; '.join(reasons)}")


@flow(name="daily-pipeline", on_failure=[alert_on_failure])
def daily_pipeline(as_of: date | None = None) -> FeatureBuildResult:
    """Sync for `as_of`, check its ledger, then build features; a failed sync stops the chain."""
    day = resolve_as_of(as_of)
    # The feature SQL needs a zone with a fixed UTC offset: refuse one it would refuse after the
    # sync, before syncing for nothing.
    fixed_utc_offset_us(get_settings().timezone, day)
    # Not announced: the event would start the feature-build deployment for the same day too.
    sync_state = daily_sync(day, announce=False, return_state=True)
    require_complete_sync(day, sync_problem(sync_state))
    get_run_logger().info("sync for %s complete; building features", day)
    return feature_build(day)


if __name__ == "__main__":
    import sys

    daily_pipeline(sys.argv[1] if len(sys.argv) > 1 else None)  # type: ignore[arg-type]
