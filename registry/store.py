"""The MLflow backend of the registry: client, experiments, names; configured when code runs."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paylater.redaction import redact, split_credentials
from paylater.settings import get_settings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

MODEL_NAME = "paylater-default"
"""The registered model."""
TRAINING_EXPERIMENT = "paylater-default-training"
AUDIT_EXPERIMENT = "paylater-default-registry-audit"
"""One run per registry transition: the append-only audit history."""


class RegistryError(Exception):
    """A registry request that cannot be carried out; nothing was changed."""


def is_absent(exc: MlflowException) -> bool:
    """Whether MLflow answered that the model, version or alias does not exist (a missing alias
    comes back as INVALID_PARAMETER_VALUE), as opposed to failing to answer (unreachable, denied)."""
    return exc.error_code in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def normalise_version(version: object) -> str:
    """Version numbers arrive as int (SQL store) or str (HTTP): always compare them as text."""
    return str(int(str(version).strip()))


def tracking_uri() -> str:
    """The configured MLflow tracking (and registry) URI, without the user:password of a server's
    URI: those go to the environment (see _credentials_to_environment)."""
    return _credentials_to_environment(get_settings().tracking_uri)


def _credentials_to_environment(uri: str) -> str:
    """`uri` without its user:password@, which become MLFLOW_TRACKING_USERNAME and _PASSWORD
    (unless set already: explicit ones win, as they did in the URI's stead before).

    MLflow sends those as the same basic authentication, but quotes the URI it is given in every
    error ("API request to http://user:password@host/... failed") and every run link it prints,
    so a password left in it reaches stderr, the logs a Prefect run stores and alert text. A
    URI without a password (none, or a user alone) is left as given. A SQL store's URI keeps its
    password: SQLAlchemy needs it there, and the messages quoting it are redacted instead.
    """
    if not uri.startswith(("http://", "https://")):
        return uri
    bare, user, password = split_credentials(uri)
    if password is None:
        return uri
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user or "")
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    return bare


REACHABLE_TIMEOUT_S = 10.0


def require_reachable(timeout: float = REACHABLE_TIMEOUT_S) -> None:
    """RegistryError unless the tracking server answers its /health endpoint within `timeout`.

    A single request, without MLflow's retries (7, with exponential backoff: minutes of silence):
    long jobs call this before they start work whose results only the server can keep. It is
    sent the way MLflow sends its own (MLFLOW_TRACKING_* TLS settings, credentials, the CA bundle
    of the environment), so a server MLflow can use is never refused here. Any answer below 500
    counts as reachable (a server behind authentication may refuse /health); a 5xx is a proxy
    whose server is down. Embedded stores (sqlite, file) need no server.
    """
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        answer = _health(uri, timeout)
    except MlflowException as exc:
        reason = " ".join(str(exc.message).split())[:300]
    else:
        if answer.status_code < 500:
            return
        reason = f"HTTP {answer.status_code}"
    raise RegistryError(f"MLflow tracking server {redact(uri)} is unreachable ({redact(reason)})")


def _health(uri: str, timeout: float) -> Any:
    """The tracking server's answer to GET /health: one request, no retries, sent the way MLflow
    sends its own (its TLS settings, credentials, CA bundle)."""
    from mlflow.tracking._tracking_service.utils import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    return http_request(
        get_default_host_creds(uri.rstrip("/")),
        "/health",
        "GET",
        max_retries=0,
        timeout=timeout,
        raise_on_status=False,
    )


def server_clock(timeout: float = REACHABLE_TIMEOUT_S) -> float:
    """Seconds since the epoch by the tracking server's clock (its HTTP `Date` header, whole
    seconds); this machine's clock for an embedded store, whose server is this process.

    Locks and audit order compare times written by different machines: the server's clock is the
    one they all share. A server (or proxy) that sends no `Date` leaves this machine's clock.
    """
    from email.utils import parsedate_to_datetime

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return time.time()
    answer = _health(uri, timeout)
    stamp = answer.headers.get("Date")
    try:
        return parsedate_to_datetime(stamp).timestamp() if stamp else time.time()
    except (TypeError, ValueError):
        return time.time()


_READY: set[str] = set()


def _ready(uri: str) -> str:
    """`uri`, its tables created or upgraded under a file lock first when it is an embedded SQLite
    store (once per process).

    MLflow creates a store's tables at its first use; processes doing so on a fresh file at the
    same moment (the retrain and the monitoring report, started together) collide on alembic's
    migrations and leave the file unusable. A tracking server does this once, for everyone.
    """
    if uri in _READY or not uri.startswith("sqlite:///"):
        return uri
    import fcntl

    from mlflow import MlflowClient

    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(path.name + ".init.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = MlflowClient(tracking_uri=uri, registry_uri=uri)
        store.search_experiments(max_results=1)
        store.search_registered_models(max_results=1)
    _READY.add(uri)
    return uri


def configure_mlflow() -> str:
    """Point the mlflow fluent API at the configured backend (at run time, never at import)."""
    import mlflow

    uri = _ready(tracking_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def client() -> MlflowClient:
    """An MLflow client on the configured tracking and registry URI."""
    from mlflow import MlflowClient

    uri = _ready(tracking_uri())
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _local_artifact_root() -> str | None:
    """Artifact root for experiments on an embedded store (else MLflow would write ./mlruns in the cwd)."""
    settings = get_settings()
    if settings.mlflow_artifact_location:
        return settings.mlflow_artifact_location
    if tracking_uri().split(":", 1)[0] in {"sqlite", "file"}:
        return (Path(settings.home_dir) / "mlartifacts").as_uri()
    return None  # a tracking server decides (proxied mlflow-artifacts:)


def ensure_experiment(mlflow_client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, created on first use, restored if someone deleted it.

    A deleted experiment still holds its name and refuses new runs, so without the restore a
    tidy-up in the MLflow UI would fail every later retrain, and every transition half way (after
    the stage change, before its audit entry and the archiving of the version it replaced).
    """
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(found.experiment_id)
        return str(found.experiment_id)
    from mlflow.exceptions import MlflowException

    root = _local_artifact_root()
    location = f"{root.rstrip('/')}/{name}" if root else None
    try:
        return str(mlflow_client.create_experiment(name, artifact_location=location))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        # Another process using a fresh backend created it since the lookup: use that one.
        created = mlflow_client.get_experiment_by_name(name)
        if created is None:
            raise
        return str(created.experiment_id)
