"""Monthly retrain: train on matured charges, log to MLflow, register, gate, stage (or reject), build the bento."""

from __future__ import annotations

from contextlib import suppress
from datetime import date
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from paylater.settings import get_settings
from paylater.timeutil import resolve_as_of
from registry.hooks import alert, build_bento
from tasks.evaluation import CandidateEvaluation, evaluate_candidate
from tasks.training import (
    DatasetRef,
    TrainingParams,
    TrainingSplit,
    frozen,
    golden_requests,
    predict,
    split_out_of_time,
    train_booster,
)

if TYPE_CHECKING:
    import lightgbm as lgb
    import pyarrow as pa

    from registry.policy import GateDecision
    from registry.runs import CandidateRun

ACTOR = "monthly-retrain"


class RetrainReport(BaseModel):
    """What one retrain produced and where it went."""

    version: str = Field(description="Registered version of paylater-default.")
    run_id: str = Field(description="MLflow run holding params, metrics, plots and the model.")
    status: str = Field(description="'staged' or 'rejected'.")
    reasons: list[str] = Field(default_factory=list, description="Why the gates rejected it.")
    oot_month: date = Field(description="The out-of-time validation month.")
    metrics: dict[str, float] = Field(
        description="OOT metrics (oracle_* from the true probabilities)."
    )
    gate_checks: dict[str, float] = Field(description="Figures the gates compared.")
    bento: str = Field(default="", description="Outcome of the bento build hook.")


# Large tables and matrices flow between these tasks: NONE keeps Prefect from hashing them.
@task(cache_policy=NONE)
def load_training_data(as_of: date | None) -> tuple[pa.Table, DatasetRef]:
    """The training dataset (latest when as_of is None) and its lineage."""
    from tasks.datasets import load_training_dataset

    table, manifest = load_training_dataset(as_of)
    return table, DatasetRef.from_manifest(manifest)


@task(cache_policy=NONE)
def check_tracking() -> None:
    """Fail before training when the tracking server cannot keep what the retrain would produce."""
    from registry.store import RegistryError, require_reachable

    try:
        require_reachable()
    except RegistryError as exc:
        raise RegistryError(f"{exc}: nothing was trained") from None


@task(cache_policy=NONE)
def warm_up_tracking() -> None:
    """Load MLflow, plotting and metrics code while the booster trains."""
    from registry.runs import warm_up

    warm_up()


@task(cache_policy=NONE)
def prepare_split(table: pa.Table, dataset: DatasetRef, params: TrainingParams) -> TrainingSplit:
    """Matured charges split into fitting, early-stopping and out-of-time rows."""
    return split_out_of_time(
        table, dataset.model_features(), dataset.as_of, params.early_stopping_share
    )


@task(cache_policy=NONE)
def train(split: TrainingSplit, params: TrainingParams) -> lgb.Booster:
    """The booster, frozen as the registry will serve it."""
    return frozen(train_booster(split, params))


@task(cache_policy=NONE)
def evaluate(booster: lgb.Booster, split: TrainingSplit) -> CandidateEvaluation:
    """OOT metrics, and the oracle's when the generator's truth is stored."""
    settings = get_settings()
    truth = settings.truth_dir / "deferred_charges.parquet"
    probs = predict(booster, split.x_oot, settings.train_num_threads)
    return evaluate_candidate(split.y_oot, probs, split.oot_rows["charge_id"], truth)


@task(cache_policy=NONE)
def register(
    booster: lgb.Booster,
    split: TrainingSplit,
    params: TrainingParams,
    dataset: DatasetRef,
    evaluation: CandidateEvaluation,
    issue: str | None,
) -> CandidateRun:
    """Log the run to MLflow and register a new version with golden requests."""
    from registry.runs import log_candidate

    settings = get_settings()
    golden = golden_requests(
        booster, split.oot_rows, split.feature_names, settings.golden_request_count
    )
    return log_candidate(
        booster=booster,
        split=split,
        params=params,
        dataset=dataset,
        evaluation=evaluation,
        golden=golden,
        issue=issue,
        cutoff=settings.decision_cutoff,
        actor=ACTOR,
    )


@task(cache_policy=NONE)
def log_drift(
    run_id: str, booster: lgb.Booster, split: TrainingSplit, evaluation: CandidateEvaluation
) -> float | None:
    """Log on the candidate's run how far the out-of-time month drifted from the fitting rows:
    PSI of every feature and of the candidate's scores (metrics psi.*, artifact drift/psi.json).
    Returns the largest feature PSI."""
    import pyarrow as pa

    from tasks.drift import log_drift_to_mlflow

    def columns(x: Any) -> pa.Table:
        return pa.table({name: x[:, i] for i, name in enumerate(split.feature_names)})

    fit_scores = predict(booster, split.x_fit, get_settings().train_num_threads)
    report = log_drift_to_mlflow(
        columns(split.x_fit),
        columns(split.x_oot),
        split.feature_names,
        fit_scores,
        evaluation.probs,
        run_id=run_id,
    )
    return report.max_feature_psi


@task(cache_policy=NONE)
def gate(version: str, split: TrainingSplit, evaluation: CandidateEvaluation) -> GateDecision:
    """Compare with production on the same OOT rows; record the outcome on the version."""
    from registry.policy import GateThresholds, evaluate_gates, record_gate
    from registry.runs import score_production

    decision = evaluate_gates(
        split.y_oot,
        evaluation.probs,
        split.feature_names,
        GateThresholds.from_settings(),
        score_production(split.oot_rows, split.oot_month),
    )
    record_gate(version, decision, ACTOR)
    return decision


@task
def reject_unfinished(version: str, error: str) -> None:
    """Record a registered candidate whose gates never completed as rejected, not left ungated."""
    from registry.policy import GateDecision, record_gate

    reason = f"monthly_retrain failed after registering it, before its gates completed: {error}"
    record_gate(version, GateDecision(passed=False, reasons=[reason]), ACTOR)


@task
def stage(version: str, decision: GateDecision) -> None:
    """Move a passing candidate to Staging (alias staging)."""
    from registry.policy import stage_candidate

    against = (
        f" against production v{decision.production_version}" if decision.production_version else ""
    )
    stage_candidate(version, ACTOR, f"gates passed{against}")


@task
def alert_rejection(version: str, decision: GateDecision) -> None:
    """Tell someone a candidate was rejected, and why."""
    alert(
        f"paylater-default v{version} rejected by the retrain gates",
        "\n".join([*decision.reasons, "runbook: docs/runbook.md#gate_rejection"]),
        severity="warning",
        dedup_key=f"retrain-rejected-{version}",
    )


@task
def build_staged_bento(version: str) -> str:
    """Best effort: import the staged version into BentoML and build its bento."""
    return build_bento(version)


def _alert_on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Page on a failed retrain through tasks.alerts (or log when it is absent)."""
    try:
        from tasks.alerts import alert_on_failure
    except ImportError:
        alert("monthly-retrain failed", str(getattr(state, "message", state)))
        return
    alert_on_failure(flow, flow_run, state)


@flow(name="monthly-retrain", on_failure=[_alert_on_failure])
def monthly_retrain(as_of: date | None = None, issue: str | None = None) -> RetrainReport:
    """Retrain on the training dataset of `as_of` (latest when None); stage the candidate if it passes."""
    params = TrainingParams.from_settings(get_settings())
    check_tracking()
    table, dataset = load_training_data(resolve_as_of(as_of) if as_of is not None else None)
    split = prepare_split(table, dataset, params)
    warming = warm_up_tracking.submit()  # overlaps training; see registry.runs.warm_up
    booster = train(split, params)
    warming.wait()
    evaluation = evaluate(booster, split)
    candidate = register(booster, split, params, dataset, evaluation, issue)
    try:
        log_drift(candidate.run_id, booster, split, evaluation)
        decision = gate(candidate.version, split, evaluation)
    except Exception as exc:
        # The task run records its own failure; the retrain fails with the original error.
        with suppress(Exception):
            reject_unfinished(candidate.version, f"{type(exc).__name__}: {exc}")
        raise
    if decision.passed:
        stage(candidate.version, decision)
        bento = build_staged_bento(candidate.version)
    else:
        alert_rejection(candidate.version, decision)
        bento = "skipped: rejected"
    return RetrainReport(
        version=candidate.version,
        run_id=candidate.run_id,
        status="staged" if decision.passed else "rejected",
        reasons=decision.reasons,
        oot_month=split.oot_month,
        metrics=evaluation.all_metrics(),
        gate_checks=decision.checks,
        bento=bento,
    )


if __name__ == "__main__":
    print(monthly_retrain().model_dump_json(indent=2))
