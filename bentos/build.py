"""Registry version -> BentoML model store -> bento: the chain from a staged/promoted model to a service."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from bentos.scoring import MODEL_NAME

log = logging.getLogger(__name__)

BENTO_NAME = "paylater-scorer"
SERVICE = "bentos.service:PaylaterScorer"
REPO_ROOT = Path(__file__).resolve().parent.parent
_STAGES = ("production", "staging")
# Registry tags copied onto the BentoML model and the bento as labels.
_LABEL_TAGS = ("dataset_digest", "feature_sql_hash", "git_commit", "cutoff", "dataset_uri", "issue")


def _client() -> Any:
    """An MLflow client on the configured tracking/registry URI."""
    from mlflow import MlflowClient

    from registry.store import tracking_uri  # without a server's password (see there)

    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def resolve_version(stage_or_version: str) -> str:
    """'production', 'staging' (aliases), a version number or paylater-default:<v> -> the version as text."""
    value = str(stage_or_version).strip().lower()
    if value.startswith(f"{MODEL_NAME}:"):  # a model store tag names its registry version
        value = value.partition(":")[2]
    if value.isdigit():
        return str(int(value))
    if value not in _STAGES:
        raise ValueError(
            f"expected production, staging or a version number, got {stage_or_version!r}"
        )
    _require_registry()
    return str(_client().get_model_version_by_alias(MODEL_NAME, value).version)


def _require_registry() -> None:
    """RegistryError in seconds when the tracking server does not answer, instead of after
    MLflow's own retries: about 4 minutes of silence while a service or worker starts, or while
    a worker following an alias holds a claimed batch."""
    from registry.store import require_reachable

    require_reachable()


def unloadable(exc: BaseException) -> str | None:
    """One line saying why a registry version, stage or model store tag cannot be loaded (the
    registry lacks it, the store lacks it, the name is invalid); None for any other error."""
    from bentoml.exceptions import NotFound
    from mlflow.exceptions import MlflowException

    from registry.store import RegistryError

    if isinstance(exc, MlflowException):
        return " ".join(str(exc.message).split())
    if isinstance(exc, NotFound | ValueError | RegistryError):
        return " ".join(str(exc).split())
    if _unreadable_model_file(exc):
        # The store's entry is there but its file is gone or damaged: only a new copy helps.
        return (
            f"the model store's file cannot be read ({' '.join(str(exc).split())}): delete the"
            f" tag (bentoml models delete {MODEL_NAME}:<version>) and import the version again"
            " (paylater bento import --version <version>)"
        )
    return None


def _unreadable_model_file(exc: BaseException) -> bool:
    """Whether `exc` is LightGBM failing to open or parse a saved model file."""
    from lightgbm.basic import LightGBMError

    return isinstance(exc, LightGBMError)


def model_tag(version: str) -> str:
    """The BentoML model store tag of a registry version."""
    return f"{MODEL_NAME}:{version}"


def registry_tags(version: str) -> dict[str, str]:
    """The version's tags, over its run's tags (the lineage may sit on either)."""
    client = _client()
    mv = client.get_model_version(MODEL_NAME, version)
    tags: dict[str, str] = {}
    if mv.run_id:
        try:
            tags.update(client.get_run(mv.run_id).data.tags)
        except Exception as exc:  # a deleted run must not block serving a registered version
            log.warning("run %s of version %s unreadable: %s", mv.run_id, version, exc)
    tags.update(mv.tags or {})
    return tags


def import_version(version: str) -> str:
    """Fetch registry version `version` (native LightGBM) and save it as paylater-default:<version>."""
    import bentoml
    import bentoml.lightgbm

    from registry.runs import load_booster

    version = resolve_version(version)
    _require_registry()
    booster = load_booster(version)  # its download removed, unlike mlflow's own
    tags = registry_tags(version)
    feature_names = json.loads(tags["feature_names"]) if "feature_names" in tags else None
    feature_names = feature_names or booster.feature_name()
    labels = {"registry_version": version} | {k: str(tags[k]) for k in _LABEL_TAGS if k in tags}
    metadata: dict[str, Any] = {
        "registry_version": version,
        "feature_names": list(feature_names),
        "cutoff": float(tags.get("cutoff", 0.5)),
        **{k: tags[k] for k in _LABEL_TAGS if k in tags and k != "cutoff"},
    }
    # Re-importing a version replaces it, so a fixed registry version is never stale here.
    with contextlib.suppress(bentoml.exceptions.NotFound):
        bentoml.models.delete(model_tag(version))
    model = bentoml.lightgbm.save_model(
        model_tag(version), booster, labels=labels, metadata=metadata
    )
    log.info("imported registry version %s as %s", version, model.tag)
    return str(model.tag)


def ensure_imported(stage_or_version: str) -> str:
    """The model store tag of a stage or version, importing it from the registry if absent."""
    import fcntl

    import bentoml
    from bentoml._internal.configuration.containers import BentoMLContainer

    tag = model_tag(resolve_version(stage_or_version))
    # Both service workers start at once: one imports while the other waits, then finds it.
    lock_path = Path(BentoMLContainer.bentoml_home.get()) / "paylater-import.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            bentoml.models.get(tag)
        except bentoml.exceptions.NotFound:
            return import_version(tag.rpartition(":")[2])
    return tag


def _bentofile() -> dict[str, Any]:
    """bentofile.yaml at the repository root, as build() keyword arguments."""
    import yaml

    config = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())
    allowed = {"service", "name", "labels", "description", "include", "exclude", "envs", "python"}
    return {k: v for k, v in config.items() if k in allowed}


def build_bento(version: str) -> str:
    """Build paylater-scorer:<version> embedding paylater-default:<version>, labelled with its lineage."""
    import bentoml

    version = resolve_version(version)
    tag = ensure_imported(version)
    model = bentoml.models.get(tag)
    config = _bentofile()
    labels = {**config.pop("labels", {}), **{k: str(v) for k, v in model.info.labels.items()}}
    labels["model_version"] = version
    # Rebuilding a version replaces its bento (same registry version, same content). The one it
    # replaces is set aside until the new one is built, and put back when the build fails (the
    # package index unreachable, say): a rollback must not take away the bento it restores.
    with tempfile.TemporaryDirectory(prefix="paylater-bento-") as scratch:
        previous = _set_aside(f"{BENTO_NAME}:{version}", Path(scratch))
        try:
            bento = bentoml.bentos.build(
                **config,
                version=version,
                labels=labels,
                models=[tag],
                build_ctx=str(REPO_ROOT),
            )
        except BaseException:
            if previous is not None:
                with contextlib.suppress(bentoml.exceptions.NotFound):
                    bentoml.bentos.delete(f"{BENTO_NAME}:{version}")  # a half-built one
                bentoml.bentos.import_bento(previous)
                log.warning("building %s:%s failed: kept the existing one", BENTO_NAME, version)
            raise
    log.info("built %s", bento.tag)
    return str(bento.tag)


def _set_aside(tag: str, scratch: Path) -> str | None:
    """Export bento `tag` into `scratch` and delete it from the store; None when there is none."""
    import bentoml

    try:
        path = bentoml.bentos.export_bento(tag, str(scratch / "previous.bento"))
    except bentoml.exceptions.NotFound:
        return None
    bentoml.bentos.delete(tag)
    return path


def import_and_build(version: str) -> str:
    """Import a registry version and build its bento (called by monthly_retrain and promote)."""
    import_version(version)
    return build_bento(version)
