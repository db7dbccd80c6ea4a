"""Feature build: training and scoring datasets from the warehouse, and the online feature table."""

from __future__ import annotations

from datetime import date
from typing import Any, NoReturn

from prefect import flow, get_run_logger, task
from prefect.states import State
from pydantic import BaseModel, Field

from paylater.timeutil import resolve_as_of
from tasks.alerts import alert_on_failure, root_cause
from tasks.datasets import (
    DatasetError,
    Manifest,
    build_scoring_dataset,
    build_training_dataset,
    load_scoring_dataset,
)
from tasks.features import FeatureSqlError
from tasks.online import PublishError, publish_user_features
from tasks.storage import StorageError


class FeatureBuildResult(BaseModel):
    """What one feature build wrote."""

    as_of: date
    training_uri: str = Field(description="The training Parquet part.")
    training_rows: int
    training_sha256: str
    scoring_uri: str = Field(description="The scoring Parquet part.")
    scoring_rows: int
    scoring_sha256: str
    online_rows: int = Field(
        description="Rows published to the online feature table; 0 when it holds a later day."
    )


def retry_unless_deterministic(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O hiccups, not bad SQL, configuration or data, which fail the same way every time."""
    try:
        state.result()
    except (FeatureSqlError, DatasetError, PublishError, StorageError):
        return False
    except Exception:
        return True
    return True


@task(retries=1, retry_delay_seconds=30, retry_condition_fn=retry_unless_deterministic)
def training_dataset(as_of: date) -> Manifest:
    """One row per matured deferred charge, features as of its request day."""
    return build_training_dataset(as_of)


@task(retries=1, retry_delay_seconds=30, retry_condition_fn=retry_unless_deterministic)
def scoring_dataset(as_of: date) -> Manifest:
    """One row per active user, features with data up to the end of as_of."""
    return build_scoring_dataset(as_of)


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_deterministic)
def publish_online(manifest: Manifest) -> int:
    """Swap the stored scoring rows into user_features_latest."""
    scoring, _ = load_scoring_dataset(manifest.as_of)
    published = publish_user_features(scoring, as_of=manifest.as_of)
    if published == 0:
        get_run_logger().warning(
            "user_features_latest holds a later day than %s (a backfill?): left as it is",
            manifest.as_of,
        )
    return published


def _raise_first(failed: State[Any], other: State[Any]) -> NoReturn:
    """Re-raise `failed`'s error with a note saying the other step failed too: the alert then
    names both, not the second only once the first is fixed and rerun."""
    try:
        failed.result()
    except BaseException as exc:
        if other.is_failed():
            exc.add_note(f"training_dataset also failed: {root_cause(other)}")
        raise
    raise RuntimeError(f"publish_online ended {failed.name}: {failed.message}")


@flow(name="feature-build", on_failure=[alert_on_failure])
def feature_build(as_of: date | None = None) -> FeatureBuildResult:
    """Build the datasets for `as_of` (default: yesterday in Tokyo) and publish online features."""
    day = resolve_as_of(as_of)
    scoring = scoring_dataset(day)
    # The service's features first, and each step tried even if the other failed: a training set
    # that cannot be built (read only by the monthly retrain) must not leave the service on the
    # day before's features, nor a failed publish leave the day without its training set.
    online = publish_online(scoring, return_state=True)
    built = training_dataset(day, return_state=True)
    online_rows: int = online.result() if online.is_completed() else _raise_first(online, built)
    training: Manifest = built.result()
    get_run_logger().info(
        "as_of %s: %d training rows, %d scoring rows, %d online",
        day,
        training.rows,
        scoring.rows,
        online_rows,
    )
    return FeatureBuildResult(
        as_of=day,
        training_uri=training.uri,
        training_rows=training.rows,
        training_sha256=training.sha256,
        scoring_uri=scoring.uri,
        scoring_rows=scoring.rows,
        scoring_sha256=scoring.sha256,
        online_rows=online_rows,
    )


if __name__ == "__main__":
    import sys

    feature_build(sys.argv[1] if len(sys.argv) > 1 else None)  # type: ignore[arg-type]
