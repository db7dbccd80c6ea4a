"""Audit history of registry transitions, kept in the MLflow backend itself.

Each transition is one run in the experiment `paylater-default-registry-audit`, its fields as tags.
Chosen over a JSON list tag on the registered model because runs are append-only (two people acting at
once cannot overwrite each other's entry, which a read-modify-write tag would allow), have no size
limit, survive restarts with the backend, and can be searched and filtered in the MLflow UI and API.

Entries are ordered by the tracking server's clock, not by the clocks of the machines that ran the
commands (a laptop an hour off would otherwise put its rollback before the promote it undid): a
stage change's entry carries the time the server stamped on the version when it moved it, and other
entries the time the server stamps on the audit experiment when it is renamed to its own name (a
write of nothing but paylater's own constant). The writer's own clock only breaks ties within one
millisecond of the server's.
Entries written before this carried no server time and are placed by their writer's clock.
"""

from __future__ import annotations

import getpass
import os
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from registry.store import AUDIT_EXPERIMENT, MODEL_NAME, ensure_experiment, normalise_version

if TYPE_CHECKING:
    from mlflow import MlflowClient

_PREFIX = "registry."


@dataclass(frozen=True)
class Transition:
    """One registry event: version, stage before and after, who, when, why and what kind."""

    version: str
    from_stage: str
    to_stage: str
    actor: str
    at: str
    reason: str
    action: str
    seq: int
    """The writer's clock (ns): a tie-break within one server millisecond."""
    server_ms: int = 0
    """The tracking server's time of the event (ms); 0 for entries written before it was kept."""

    @property
    def position(self) -> tuple[int, int]:
        """Where the entry falls in the history: by the server's clock, else the writer's."""
        return (self.server_ms or self.seq // 1_000_000, self.seq)

    def as_dict(self) -> dict[str, str | int]:
        """Plain dict for JSON output."""
        return asdict(self)


def default_actor() -> str:
    """Who is acting: $USER, else the login name, else 'unknown'."""
    user = os.environ.get("USER") or os.environ.get("USERNAME")
    if user:
        return user
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def record(
    mlflow_client: MlflowClient,
    version: str,
    from_stage: str,
    to_stage: str,
    action: str,
    actor: str,
    reason: str,
    server_ms: int | None = None,
) -> Transition:
    """Append one transition to the audit history, at `server_ms` (the tracking server's time of
    the event) or, when not given, at the server's time of now."""
    experiment_id = ensure_experiment(mlflow_client, AUDIT_EXPERIMENT)
    number = normalise_version(version)
    stamp = int(server_ms) if server_ms else server_now(mlflow_client, experiment_id)
    seq = time.time_ns()
    entry = Transition(
        version=number,
        from_stage=from_stage,
        to_stage=to_stage,
        actor=actor,
        at=datetime.fromtimestamp(stamp / 1000, UTC).isoformat(timespec="milliseconds"),
        reason=reason,
        action=action,
        seq=seq,
        server_ms=stamp,
    )
    tags = {f"{_PREFIX}{k}": str(v) for k, v in entry.as_dict().items()}
    tags[f"{_PREFIX}model"] = MODEL_NAME
    run = mlflow_client.create_run(
        experiment_id,
        start_time=stamp,
        tags=tags,
        run_name=f"v{entry.version} {action}: {from_stage} -> {to_stage}",
    )
    mlflow_client.set_terminated(run.info.run_id, end_time=stamp)
    return entry


def server_now(mlflow_client: MlflowClient, experiment_id: str) -> int:
    """The tracking server's time now (ms): the one clock every machine recording transitions
    shares, read as the server stamps the audit experiment renamed to its own name.

    Run times cannot serve: the client sends them. Nor can a version's description written back
    as read (how this was done before): a description saved in the MLflow UI between the read and
    the write was replaced by the old one. The audit experiment's name is paylater's constant, so
    writing it back loses nothing; of entries recorded at once, one may read the other's slightly
    later stamp, still a server time between its event and its entry.
    """
    mlflow_client.rename_experiment(experiment_id, AUDIT_EXPERIMENT)
    stamp = mlflow_client.get_experiment(experiment_id).last_update_time
    return int(stamp) if stamp else time.time_ns() // 1_000_000  # a store that keeps none


def read(mlflow_client: MlflowClient, version: str | None = None) -> list[Transition]:
    """Every recorded transition (of one version, when given), oldest first."""
    found = mlflow_client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if found is None:
        return []
    query = f"tags.`{_PREFIX}model` = '{MODEL_NAME}'"
    if version is not None:
        query += f" and tags.`{_PREFIX}version` = '{normalise_version(version)}'"
    entries: list[Transition] = []
    token: str | None = None
    while True:
        page = mlflow_client.search_runs(
            [found.experiment_id], filter_string=query, max_results=1000, page_token=token
        )
        for run in page:
            tags = run.data.tags
            entries.append(
                Transition(
                    version=tags[f"{_PREFIX}version"],
                    from_stage=tags.get(f"{_PREFIX}from_stage", ""),
                    to_stage=tags.get(f"{_PREFIX}to_stage", ""),
                    actor=tags.get(f"{_PREFIX}actor", ""),
                    at=tags.get(f"{_PREFIX}at", ""),
                    reason=tags.get(f"{_PREFIX}reason", ""),
                    action=tags.get(f"{_PREFIX}action", ""),
                    seq=int(tags.get(f"{_PREFIX}seq", "0")),
                    server_ms=int(tags.get(f"{_PREFIX}server_ms", "0")),
                )
            )
        token = page.token
        if not token:
            return sorted(entries, key=lambda e: e.position)
