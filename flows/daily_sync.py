"""daily_sync: copy the operational tables into the warehouse for one business day (`as_of`).

The Embulk/Digdag job of the old system as a Prefect flow: check the configuration against the
source, then one task per table (incremental MERGE or full replace, each with its ledger row),
all under the warehouse's sync lock (tasks.sync_lock): a second sync of the same warehouse waits
for the first to finish.
A failure alerts through tasks.alerts and leaves every table either synced or untouched.
"""

from __future__ import annotations

from datetime import date

from prefect import flow, get_run_logger, task
from prefect.events import emit_event
from prefect.runtime import flow_run

from paylater.timeutil import resolve_as_of
from tasks.alerts import alert_on_failure
from tasks.sync import (
    ConfigError,
    SyncReport,
    refuse_unended,
    sync_report,
    sync_table_task,
    validate_sync_config,
)
from tasks.sync_lock import held_for_sync


@task
def announce_completed(report: SyncReport) -> None:
    """Emit `paylater.sync.completed` for this as_of: the event the feature-build deployment waits for."""
    day = report.as_of.isoformat()
    emit_event(
        event="paylater.sync.completed",
        resource={"prefect.resource.id": f"paylater.sync.{day}", "paylater.as_of": day},
        payload={"as_of": day, "tables": [t.table_name for t in report.tables]},
    )


@flow(name="daily-sync", on_failure=[alert_on_failure], log_prints=True)
def daily_sync(
    as_of: date | None = None, announce: bool = True, reread: list[str] | None = None
) -> SyncReport:
    """Sync every configured table for `as_of` (default: yesterday in Asia/Tokyo).

    `announce`: emit `paylater.sync.completed` once every table succeeded, which starts the
    feature-build deployment; daily_pipeline, which builds the features itself, passes False.
    `reread`: tables whose whole history is read again, replacing their warehouse rows in one
    transaction (the old copy stays until the new one is complete) and deleting, counted, those
    gone from the source whatever the deletes policy: rows deleted at the source long ago, a
    copy that went wrong (see tasks.sync.sync_table).
    """
    day = resolve_as_of(as_of)
    refuse_unended(day)  # said once for the day, not once per table by every table task
    # One sync of a warehouse at a time: a second one waits here for the first to finish.
    with held_for_sync(f"{flow_run.get_name()} as_of {day}", get_run_logger().warning) as lock:
        tables = validate_sync_config()
        wanted = set(reread or ())
        unknown = sorted(wanted - {spec.name for spec in tables})
        if unknown:
            raise ConfigError(
                f"reread names table(s) the sync does not copy: {', '.join(unknown)}"
                f" (configured: {', '.join(spec.name for spec in tables)})"
            )
        states = []
        for spec in tables:
            lock.confirm()  # a lock lost since the last table: another sync may be writing
            states.append(sync_table_task(spec, day, spec.name in wanted, return_state=True))
    report = sync_report(day, states, [spec.name for spec in tables])
    for table in report.tables:
        deleted = (
            f", {table.rows_deleted} deleted (gone from the source)"
            if table.rows_deleted is not None
            else ""
        )
        # A reread's window starts at -infinity like a first load's: the log says which it was.
        name = f"{table.table_name} (re-read whole)" if table.reread else table.table_name
        print(
            f"{name}: {table.rows_extracted} rows extracted{deleted}, "
            f"{table.warehouse_rows} in the warehouse, {table.duration_seconds:.2f} s"
        )
        if table.warning:
            get_run_logger().warning(f"{table.table_name}: {table.warning}")
    if announce:
        announce_completed(report)
    return report


if __name__ == "__main__":
    daily_sync()
