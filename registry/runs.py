"""Tracking runs: log a trained candidate with its lineage, register it, read registered models back."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from registry import history
from registry.policy import (
    GateDecision,
    ProductionBaseline,
    alias_version,
    get_version,
    record_gate,
)
from registry.store import (
    MODEL_NAME,
    TRAINING_EXPERIMENT,
    client,
    configure_mlflow,
    ensure_experiment,
    is_absent,
    normalise_version,
)

if TYPE_CHECKING:
    import lightgbm as lgb
    import pyarrow as pa

    from tasks.evaluation import CandidateEvaluation
    from tasks.training import DatasetRef, TrainingParams, TrainingSplit

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_PATH = "golden/requests.json"
PARAMS_PATH = "training/params.json"


@dataclass(frozen=True)
class CandidateRun:
    """A logged and registered candidate."""

    run_id: str
    version: str


def git_commit() -> tuple[str, bool]:
    """(HEAD commit, working tree dirty?) of this checkout. Without a git checkout (the flow-run
    image, which does not copy .git) the commit is $PAYLATER_GIT_COMMIT, set by the Dockerfile
    from its GIT_COMMIT build argument; ('unknown', False) when that is unset too."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("PAYLATER_GIT_COMMIT", "").strip() or "unknown", False
    return head or "unknown", bool(status.strip())


def pip_requirements() -> list[str]:
    """Pinned requirements of the logged model (passed explicitly: inference costs 7-10 s)."""
    import lightgbm
    import mlflow
    import pandas

    return [
        f"mlflow=={mlflow.__version__}",
        f"lightgbm=={lightgbm.__version__}",
        f"numpy=={np.__version__}",
        f"pandas=={pandas.__version__}",
    ]


def _training_dataset(dataset: DatasetRef, features: list[str]) -> Any:
    """The training dataset as an MLflow dataset: its source URI and digest, no data copied."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema, TensorSpec

    columns: list[ColSpec | TensorSpec] = [ColSpec("double", name) for name in features]
    columns.append(ColSpec("long", "label_default"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "file:// can be read in multiple ways"
        source = resolve_dataset_source(dataset.uri)
    return MetaDataset(  # type: ignore[abstract]
        source=source,
        name=f"training as_of={dataset.as_of.isoformat()}",
        digest=dataset.digest[:32],  # MLflow caps dataset digests at 36 characters
        schema=Schema(columns),
    )


def version_tags(
    dataset: DatasetRef, features: list[str], commit: str, issue: str | None, cutoff: float
) -> dict[str, str]:
    """The lineage tags every version carries."""
    return {
        "dataset_digest": dataset.digest,
        "dataset_uri": dataset.uri,
        "feature_sql_hash": dataset.sql_hash,
        "git_commit": commit,
        "issue": issue or "",
        "feature_names": json.dumps(features),
        "cutoff": repr(float(cutoff)),
        "as_of": dataset.as_of.isoformat(),
    }


def log_candidate(
    *,
    booster: lgb.Booster,
    split: TrainingSplit,
    params: TrainingParams,
    dataset: DatasetRef,
    evaluation: CandidateEvaluation,
    golden: list[dict[str, Any]],
    issue: str | None,
    cutoff: float,
    actor: str,
) -> CandidateRun:
    """One MLflow run with params, metrics, plots, dataset, golden requests and the model; registered."""
    import mlflow
    import mlflow.lightgbm
    import pandas as pd
    from mlflow.models import infer_signature

    from tasks.evaluation import write_plots
    from tasks.training import gain_importance

    configure_mlflow()
    mlflow_client = client()
    experiment_id = ensure_experiment(mlflow_client, TRAINING_EXPERIMENT)
    commit, dirty = git_commit()
    tags = version_tags(dataset, split.feature_names, commit, issue, cutoff)
    run_tags = {k: v for k, v in tags.items() if k != "feature_names"} | {
        "git_dirty": str(dirty).lower(),
        "mlflow.source.git.commit": commit,
        "oot_month": split.oot_month.isoformat(),
    }
    example = pd.DataFrame(split.x_oot[:5], columns=split.feature_names)
    with (
        tempfile.TemporaryDirectory() as scratch,
        mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"retrain as_of={dataset.as_of.isoformat()}",
            tags=run_tags,
        ) as run,
    ):
        mlflow.log_params(
            params.model_dump()
            | {
                "as_of": dataset.as_of.isoformat(),
                "oot_month": split.oot_month.isoformat(),
                "train_months": ",".join(m.strftime("%Y-%m") for m in split.train_months),
                "rows_fit": len(split.y_fit),
                "rows_early_stopping": len(split.y_stop),
                "rows_oot": len(split.y_oot),
                "num_features": len(split.feature_names),
                "best_iteration": booster.num_trees(),
                "calibration_bins": "10 equal-mass bins of predicted probability",
            }
        )
        mlflow.log_metrics(evaluation.all_metrics())
        plots = write_plots(
            split.y_oot,
            evaluation.probs,
            split.feature_names,
            gain_importance(booster),
            Path(scratch) / "plots",
            f"OOT {split.oot_month.strftime('%Y-%m')}",
        )
        for plot in plots:
            mlflow.log_artifact(str(plot), "plots")
        mlflow.log_text(json.dumps(golden, indent=1), GOLDEN_PATH)
        mlflow.log_text(params.model_dump_json(indent=2), PARAMS_PATH)
        mlflow.log_input(_training_dataset(dataset, split.feature_names), context="training")
        info = mlflow.lightgbm.log_model(
            booster,
            name="model",
            signature=infer_signature(example, evaluation.probs[:5]),
            input_example=example,
            pip_requirements=pip_requirements(),
            registered_model_name=MODEL_NAME,
        )
    version = normalise_version(info.registered_model_version)
    try:
        for key, value in tags.items():
            mlflow_client.set_model_version_tag(MODEL_NAME, version, key, value)
        history.record(
            mlflow_client,
            version,
            "",
            "None",
            "register",
            actor,
            f"monthly_retrain as_of {dataset.as_of.isoformat()}"
            + (f", issue {issue}" if issue else ""),
            server_ms=get_version(mlflow_client, version).creation_timestamp,
        )
    except Exception as exc:
        _reject_unfinished(version, exc, actor)
        raise
    return CandidateRun(run_id=run.info.run_id, version=version)


def _reject_unfinished(version: str, exc: Exception, actor: str) -> None:
    """Best effort: mark a version registered without its lineage tags or audit entry as rejected,
    so it never looks like a candidate whose gates simply have not run yet."""
    reason = (
        "registration did not complete (lineage tags or audit entry missing), gates never ran: "
        f"{type(exc).__name__}: {exc}"
    )
    try:
        record_gate(version, GateDecision(passed=False, reasons=[reason]), actor)
    except Exception as again:
        log.error(
            "v%s was registered half way and could not be marked rejected: %r", version, again
        )


def warm_up() -> None:
    """Import and open what logging needs (MLflow store, plotting, metrics) ahead of time.

    The flow runs this in a thread while LightGBM trains (its C++ loop releases the GIL), so the
    first-use cost of these imports (seconds on a cold process) overlaps training instead of following it.
    """
    import matplotlib.backends.backend_agg  # noqa: F401
    import mlflow.lightgbm  # noqa: F401
    import sklearn.metrics  # noqa: F401

    ensure_experiment(client(), TRAINING_EXPERIMENT)
    try:  # private, best effort: mlflow maps installed packages on first log_model (seconds)
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map

        _init_packages_to_modules_map()
    except Exception as exc:
        log.debug("mlflow package map warm-up skipped: %r", exc)


def load_booster(version: str) -> lgb.Booster:
    """The registered version's native LightGBM booster.

    Downloaded into a folder removed once the booster is in memory: left to itself, MLflow
    downloads a model from a tracking server into a temporary folder it never removes.
    """
    import mlflow.lightgbm

    configure_mlflow()
    with tempfile.TemporaryDirectory(prefix="paylater-model-") as scratch:
        booster: lgb.Booster = mlflow.lightgbm.load_model(
            f"models:/{MODEL_NAME}/{normalise_version(version)}", dst_path=scratch
        )
    return booster


def version_features(version: str) -> list[str]:
    """The feature names recorded on a version (falls back to the booster's own)."""
    mv = get_version(client(), version)
    names = (mv.tags or {}).get("feature_names")
    return list(json.loads(names)) if names else list(load_booster(version).feature_name())


def run_artifact_json(run_id: str, path: str) -> Any:
    """A JSON artifact of a run."""
    import mlflow.artifacts

    configure_mlflow()
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")


def load_golden(version: str) -> list[dict[str, Any]]:
    """The golden requests stored with a version at registration."""
    mv = get_version(client(), version)
    golden: list[dict[str, Any]] = run_artifact_json(str(mv.run_id), GOLDEN_PATH)
    return golden


def trained_months(version: str) -> list[str]:
    """The request months (YYYY-MM) a version was fitted on, from its run (empty when unknown)."""
    from mlflow.exceptions import MlflowException

    mv = get_version(client(), version)
    if not mv.run_id:
        return []
    try:
        params = client().get_run(str(mv.run_id)).data.params
    except MlflowException as exc:
        if not is_absent(exc):
            raise
        return []
    return [m for m in params.get("train_months", "").split(",") if m]


def score_production(oot_rows: pa.Table, oot_month: date) -> ProductionBaseline | None:
    """The production version's probabilities on the candidate's OOT rows (None: no production
    yet), unless production was fitted on that month (then its figures there are in-sample)."""
    from tasks.training import feature_matrix, predict

    current = alias_version(client(), "production")
    if current is None:
        return None
    features = version_features(current)
    month = oot_month.strftime("%Y-%m")
    if month in trained_months(current):
        return ProductionBaseline(current, features, None, trained_on_oot=month)
    try:
        x = feature_matrix(oot_rows, features)
    except ValueError as exc:
        return ProductionBaseline(current, features, None, str(exc))
    return ProductionBaseline(current, features, predict(load_booster(current), x))
