"""One settings module: every backend is chosen by a URL, read from the environment when code runs."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from paylater.redaction import origin, redact

WorkerBackend = Literal["inprocess", "http"]
"""How the worker scores: in this process, or through the bento's HTTP API."""

ReasonCodeMode = Literal["declines", "all"]
"""Which in-process scores get reason codes (worker.scoring.REASON_CODE_MODES)."""


class Settings(BaseSettings):
    """Where every backend lives; unset URLs point at embedded defaults under `home`."""

    model_config = SettingsConfigDict(env_prefix="PAYLATER_", extra="ignore", frozen=True)

    home: Path = Field(
        default=Path("var"),
        description="Git-ignored folder holding every embedded default (databases, datasets, MLflow).",
    )
    source_url: str | None = Field(
        default=None,
        description="Operational database, SQLAlchemy-style: sqlite:///path or postgresql://…",
    )
    warehouse_url: str | None = Field(
        default=None,
        description="Warehouse: duckdb:///path or bigquery://project/dataset.",
    )
    dataset_url: str | None = Field(
        default=None,
        description="Where feature datasets are written: file:///path, gs://bucket/prefix, s3://bucket/prefix.",
    )
    # --- features (owner: features; tasks/features.py, tasks/datasets.py, tasks/storage.py) ---
    # Point the feature build at your own tables: the SQL names the logical tables (users,
    # card_transactions, topups, deferred_charges, app_events); this maps them to yours.
    feature_tables: dict[str, str] = Field(
        default_factory=dict,
        description='Logical -> warehouse table, JSON: {"card_transactions": "mydataset.card_tx"}.',
    )
    feature_sql_dir: Path | None = Field(
        default=None,
        description="Folder of the feature SQL (requests, layers NN_*.sql, label); defaults to tasks/sql.",
    )
    feature_label_sql: str = Field(
        default="label.sql",
        description="Label query (file in the SQL folder, or a path): charge_id, label_default as of @as_of.",
    )
    online_features_table: str = Field(
        default="user_features_latest",
        description=(
            "Online feature table in the source database, replaced atomically on each publish;"
            " the service, the in-process worker and the monitor read it under this name too."
        ),
    )
    dataset_s3_block: str | None = Field(
        default=None,
        description="prefect-aws S3Bucket block for s3:// datasets; unset: boto3 credentials from the environment.",
    )
    dataset_gcs_block: str | None = Field(
        default=None,
        description="prefect-gcp GcsBucket block for gs:// datasets; unset: google-cloud-storage from the environment.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description=(
            "S3-compatible endpoint (MinIO, moto) when not AWS itself; a URL carrying credentials"
            " is refused (they go in the environment or a prefect-aws block)."
        ),
    )
    # --- end features ---
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "PAYLATER_MLFLOW_TRACKING_URI"),
        description="MLflow tracking and registry server; the standard MLFLOW_TRACKING_URI.",
    )
    timezone: str = Field(
        default="Asia/Tokyo",
        description="Business time zone: `as_of` dates and day boundaries are taken in it.",
    )
    seed: int = Field(
        default=20261127,
        ge=0,  # numpy's generators take no negative seed
        description="Default seed of the synthetic data generator.",
    )
    # --- daily sync and alerts (owner: sync) ---
    sync_tables: Path | None = Field(
        default=None,
        description="YAML file listing the tables the daily sync copies (tasks/sync_tables.yaml when unset).",
    )
    sync_readers: int = Field(
        default=2,
        ge=1,
        le=8,
        description="Parallel source readers for a large extract (each reads a slice: of the time window for an incremental day, of an integer key range otherwise).",
    )
    sync_lock_wait_seconds: float = Field(
        default=1800.0,
        ge=0,
        description=(
            "How long a sync waits for another sync of the same warehouse to finish before it"
            " fails naming that sync (syncs of one warehouse run one at a time); 0: fail at once."
        ),
    )
    alert_slack_block: str | None = Field(
        default=None,
        description="Name of a Prefect SlackWebhook block that receives every alert.",
    )
    alert_pagerduty_block: str | None = Field(
        default=None,
        description="Name of a Prefect PagerDutyWebHook block whose integration key is used as the "
        "Events API v2 routing key (older setup; prefer the two settings below).",
    )
    alert_pagerduty_routing_key_block: str | None = Field(
        default=None,
        description="Name of a Prefect Secret block holding the PagerDuty Events API v2 routing "
        "(integration) key; critical alerts trigger, their resolution resolves.",
    )
    alert_pagerduty_routing_key: SecretStr | None = Field(
        default=None,
        description="The PagerDuty Events API v2 routing key itself, from the environment only "
        "(used when no Secret block is named).",
    )
    alert_pagerduty_events_url: str = Field(
        default="https://events.pagerduty.com/v2/enqueue",
        description="PagerDuty Events API v2 endpoint (EU accounts: https://events.eu.pagerduty.com/v2/enqueue).",
    )
    alert_webhook_url: str | None = Field(
        default=None,
        description="A plain Slack-compatible incoming-webhook URL that receives every alert (JSON POST).",
    )
    # --- end daily sync and alerts ---

    # --- monitoring (owner: monitoring; tasks/monitoring.py, flows/monitor.py) ---
    # Each check has a warning level (Slack) and a critical level (PagerDuty); a value at or
    # above the level opens an incident, alerted once until it clears.
    monitor_window_minutes: int = Field(
        default=15, description="Window over which failure and dead-letter rates are computed."
    )
    monitor_min_jobs: int = Field(
        default=20, description="Fewer finished jobs than this in the window: rates are not judged."
    )
    monitor_queue_depth_warning: int = Field(default=5_000, description="Queued jobs: warning.")
    monitor_queue_depth_critical: int = Field(default=50_000, description="Queued jobs: critical.")
    monitor_oldest_queued_warning_seconds: float = Field(
        default=60.0, description="Age of the oldest runnable queued job: warning."
    )
    monitor_oldest_queued_critical_seconds: float = Field(
        default=300.0, description="Age of the oldest runnable queued job: critical."
    )
    monitor_failure_rate_warning: float = Field(
        default=0.02,
        description=(
            "Share of jobs finished in the window that ended failed (invalid request) or dead"
            " (attempts ran out): warning."
        ),
    )
    monitor_failure_rate_critical: float = Field(
        default=0.10,
        description=(
            "Share of jobs finished in the window that ended failed (invalid request) or dead"
            " (attempts ran out): critical."
        ),
    )
    monitor_dead_letter_rate_warning: float = Field(
        default=0.001, description="Share of finished jobs dead-lettered in the window: warning."
    )
    monitor_dead_letter_rate_critical: float = Field(
        default=0.01, description="Share of finished jobs dead-lettered in the window: critical."
    )
    monitor_sync_age_warning_hours: float = Field(
        default=30.0, description="Hours since the last successful sync finished: warning."
    )
    monitor_sync_age_critical_hours: float = Field(
        default=54.0, description="Hours since the last successful sync finished: critical."
    )
    monitor_feature_age_warning_hours: float = Field(
        default=30.0,
        description="Hours since the online features were published or the newest scoring dataset built, whichever is earlier: warning.",
    )
    monitor_feature_age_critical_hours: float = Field(
        default=54.0,
        description="Hours since the online features were published or the newest scoring dataset built, whichever is earlier: critical.",
    )
    monitor_psi_warning: float = Field(
        default=0.10, description="PSI of a feature or the score: warning."
    )
    monitor_psi_critical: float = Field(
        default=0.25, description="PSI of a feature or the score: critical."
    )
    monitor_flow_window_hours: float = Field(
        default=48.0,
        description="Crashed or failed flow runs that ended this many hours ago or less are checked.",
    )
    monitor_crashed_flows_critical: int = Field(
        default=1,
        description=(
            "Flows whose latest run crashed: critical (pages). 1: every crash pages, as a failure"
            " does; a higher number makes fewer a warning."
        ),
    )
    monitor_failed_flows_critical: int = Field(
        default=1,
        description=(
            "Flows whose latest run failed, after its retries: critical (pages). 1: every"
            " failure pages; a higher number makes fewer a warning (Slack only)."
        ),
    )
    monitor_late_run_minutes: float = Field(
        default=30.0,
        description="A flow run still waiting this long after its scheduled start is late.",
    )
    monitor_late_runs_critical: int = Field(
        default=3, description="Late flow runs (no worker took them): critical (one is a warning)."
    )
    monitor_heartbeat_url: str | None = Field(
        default=None,
        description=(
            "A dead-man's switch (a healthchecks.io, Cronitor or similar check URL): the monitor"
            " requests it (GET) at the end of every run that judged the checks and delivered every"
            " alert it owed, so the service pages when the pings stop: the monitor not running, or"
            " alerts not getting through. Unset: no heartbeat."
        ),
    )
    monitor_unknown_alert_minutes: float = Field(
        default=30.0,
        description=(
            "A check the monitor could not measure (its database, warehouse or the Prefect API not"
            " answering) for this many minutes sends one warning to Slack naming it, since when and"
            " why, and a RESOLVED notice once it is measured again; its incident, if open, stays"
            " open. Above 0 (the monitor refuses 0; a large value, e.g. 1440, hears less)."
        ),
    )
    monitor_psi_ignore: list[str] = Field(
        default=["topup_days_since_last"],
        description=(
            'Features whose PSI is shown but never alerted on, JSON: ["a", "b"]. Default: days'
            " since the last top-up, a sawtooth of the calendar (most users top up on payday, the"
            " 25th), so its PSI against any other day of the month is large without any drift."
        ),
    )
    monitor_report_days: int = Field(
        default=30, ge=1, description="Days of history the dashboard plots."
    )
    monitor_resolve_after_runs: int = Field(
        default=3,
        description=(
            "Hysteresis: an incident of the monitor's checks steps down only after this many"
            " measured runs in a row below its level (3: 15 minutes at one run every 5), so a"
            " value flapping around a threshold keeps one incident instead of alerting and"
            " resolving every run. Its level is then the highest of those runs: all ok resolves"
            " it, none critical resolves its page. Opening and escalating stay immediate. 1:"
            " resolve at the first clear run."
        ),
    )
    monitor_stuck_run_hours: float = Field(
        default=3.0,
        description=(
            "A deployment's flow run RUNNING (or CANCELLING) this long is stuck: its process died"
            " unseen (host lost, a hang) and Prefect will never mark it Crashed. 3: three times"
            " the longest job (the monthly retrain, under an hour; Cloud Run's job timeout in"
            " prefect.yaml is 1 h). Raise it above your longest run, a backfill's daily-pipeline"
            " run included, or give a long job its own limit in"
            " PAYLATER_MONITOR_STUCK_RUN_HOURS_BY_DEPLOYMENT."
        ),
    )
    monitor_stuck_runs_critical: int = Field(
        default=1,
        description=(
            "Stuck flow runs: critical (pages). 1: every stuck run pages, as a crash does; a"
            " higher number makes fewer a warning."
        ),
    )
    monitor_stuck_run_hours_by_deployment: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Per-deployment limits of the stuck_flow_runs check, in hours, JSON:"
            ' {"daily-sync": 1.5, "monthly-retrain": 8}. A key names a deployment, or'
            " 'flow/deployment' when two flows share a deployment name (that key wins); other"
            " deployments keep PAYLATER_MONITOR_STUCK_RUN_HOURS. Each a number above 0: a short"
            " daily job is caught sooner, a long job is not paged while it legitimately runs. A"
            " key naming no deployment is a Slack warning (stuck_limit_keys)."
        ),
    )
    monitor_drift_resolve_after_reports: int = Field(
        default=2,
        description=(
            "Hysteresis of the drift alerts (feature_psi_max, score_psi), counted in monitoring"
            " reports (about one a day), not in monitor runs: a drift incident steps down only"
            " after this many reports in a row below its level, as the monitor's incidents do"
            " after PAYLATER_MONITOR_RESOLVE_AFTER_RUNS runs. 2: one confirming day, so a PSI"
            " hovering at its level does not page and resolve day after day. 1: resolve at the"
            " first clean report."
        ),
    )
    # --- end monitoring ---

    # --- retrain / registry (owner: retrain; tasks/training.py, registry/, flows/monthly_retrain.py) ---
    # Training is deterministic for the same data, these params and the seed (fixed thread count,
    # deterministic=True, force_col_wise), so `paylater registry reproduce` can match predictions exactly.
    mlflow_artifact_location: str | None = Field(
        default=None,
        description="Artifact root of new MLflow experiments on an embedded (sqlite/file) store; default <home>/mlartifacts.",
    )
    train_learning_rate: float = Field(default=0.05, gt=0, description="LightGBM learning_rate.")
    train_num_leaves: int = Field(default=15, ge=2, description="LightGBM num_leaves.")
    train_min_data_in_leaf: int = Field(default=200, ge=0, description="LightGBM min_data_in_leaf.")
    train_feature_fraction: float = Field(
        default=0.9, gt=0, le=1, description="LightGBM feature_fraction."
    )
    train_lambda_l2: float = Field(default=1.0, ge=0, description="LightGBM lambda_l2.")
    train_max_bin: int = Field(default=255, ge=2, description="LightGBM max_bin.")
    train_num_boost_round: int = Field(
        default=2000, ge=1, description="Upper bound on boosting rounds."
    )
    train_early_stopping_rounds: int = Field(
        default=50,
        ge=1,
        description="Stop when the early-stopping log loss has not improved for this many rounds.",
    )
    train_early_stopping_share: int = Field(
        default=10,
        ge=2,  # 1 would put every in-time charge in the stopping set, none left to fit
        description="1 in N in-time charges (charge_id % N == 0) form the early-stopping set; the OOT month is never seen.",
    )
    train_num_threads: int = Field(
        default=2,
        ge=1,  # 0 is LightGBM's "all cores": results would depend on the machine
        description="LightGBM threads; part of the params, since results depend on it.",
    )
    train_seed: int = Field(
        default=42, description="LightGBM seed (all of its random seeds derive from it)."
    )
    decision_cutoff: float = Field(
        default=0.2,
        ge=0,
        le=1,  # 20 meant as 20 % would register versions that approve everyone (NaN fails too)
        description="Default probability at or above which a request is declined (tag `cutoff` on each version).",
    )
    golden_request_count: int = Field(
        default=20,
        ge=1,  # a version without golden requests can never be verified, so never promoted
        description="OOT rows stored with each version as golden requests for staging checks.",
    )
    gate_min_auc: float = Field(
        default=0.65, ge=0, le=1, description="Absolute gate: OOT AUC at least this."
    )
    gate_max_ece: float = Field(
        default=0.02,
        ge=0,
        description="Absolute gate: OOT expected calibration error (10 equal-mass bins) at most this.",
    )
    gate_max_auc_drop: float = Field(
        default=0.01,
        description="Relative gate: production OOT AUC minus candidate OOT AUC at most this.",
    )
    gate_max_score_psi: float = Field(
        default=0.25,
        ge=0,
        description="Relative gate: PSI of candidate vs production scores on the OOT month at most this.",
    )
    gate_min_oot_rows: int = Field(
        default=200,
        ge=1,
        description="Gate: an out-of-time month with fewer rows is too small to judge (rejected).",
    )
    gate_min_oot_per_class: int = Field(
        default=20,
        ge=1,
        description="Gate: ... or with fewer defaults, or fewer repaid charges, than this.",
    )
    gate_allow_feature_changes: bool = Field(
        default=False,
        description="Accept a candidate whose feature set differs from production's (the online table must follow).",
    )
    registry_build_bento: bool = Field(
        default=True,
        description="After staging or promoting, import the version into BentoML and build its bento (bentos.build).",
    )
    # A live transition's lock must never look stale: a step of it (a stage move, its alias and
    # audit entry, with MLflow's HTTP retries) can take tens of seconds against a slow server,
    # and others wait 30 s before refusing. Under a minute a waiter could take a live lock.
    registry_lock_stale_seconds: float = Field(
        default=300.0,
        ge=60,
        allow_inf_nan=False,
        description=(
            "A registry transition lock older than this (by the tracking server's clock) was"
            " left by a process that died: the next promote, rollback or staging takes it over."
            " `paylater registry unlock` breaks one at once."
        ),
    )
    # --- end retrain / registry ---

    # --- worker (owner: worker; worker/, `paylater worker`) ---
    # The job queue lives in PostgreSQL (FOR UPDATE SKIP LOCKED, LISTEN/NOTIFY): no SQLite fallback.
    worker_database_url: str | None = Field(
        default=None,
        description=(
            "PostgreSQL holding scoring_jobs and their results; defaults to PAYLATER_SOURCE_URL. An"
            " in-process worker reads user_features_latest from the source when that is"
            " PostgreSQL (the feature build publishes it there), else from this database."
        ),
    )
    worker_backend: WorkerBackend = Field(
        default="inprocess",
        description="How jobs are scored: 'inprocess' (model store + user_features_latest) or 'http' (the bento).",
    )
    worker_scoring_url: str | None = Field(
        default=None,
        description="Base URL of the bento for the http backend (POST {url}/v2/score_batch).",
    )
    worker_scoring_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="--backend http: seconds the service has to answer a batch. Keep the lease"
        " at least three of these, so a search for a request the service hangs on fits in it.",
    )
    worker_model: str = Field(
        default="production",
        description="Model scored in process: 'production', 'staging', a registry version or a model store tag.",
    )
    worker_shadow_model: str = Field(
        default="staging",
        description="Shadow model scored into shadow_results when it exists and differs; '' disables shadowing.",
    )
    # Reason codes explain adverse decisions; TreeSHAP costs ~50x a prediction, so the worker
    # computes them for declines only unless asked ('all' matches the HTTP API on approvals too).
    worker_reason_codes: ReasonCodeMode = Field(
        default="declines",
        description="In process: 'declines' (reasons where the answer is a decline) or 'all' (every score, like the HTTP API).",
    )
    worker_concurrency: int = Field(
        default=2, ge=1, description="Claim-score-write loops (threads) per process."
    )
    worker_batch_size: int = Field(default=500, ge=1, description="Jobs claimed per round trip.")
    worker_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A claimed job is re-claimable this long after its claim (crash recovery).",
    )
    worker_max_attempts: int = Field(
        default=5, ge=1, description="Attempts before a job is dead-lettered."
    )
    worker_backoff_seconds: float = Field(
        default=1.0,
        ge=0,
        description="Retry delay after the first failed attempt; doubles per attempt.",
    )
    worker_backoff_max_seconds: float = Field(
        default=300.0, ge=0, description="Cap on the retry delay."
    )
    worker_poll_seconds: float = Field(
        default=1.0, gt=0, description="Idle poll interval: the fallback when a NOTIFY is missed."
    )
    worker_metrics_port: int | None = Field(
        default=None,
        ge=1,  # 0 would be a random port no Prometheus could be pointed at
        le=65535,
        description="Port of the Prometheus /metrics server (unset: no server).",
    )
    worker_retention_days: float = Field(
        default=90.0,
        ge=0,
        description=(
            "Finished jobs (with their results) are deleted this many days after they finished,"
            " by the monitor; 0: kept forever. Keep it above PAYLATER_MONITOR_REPORT_DAYS."
        ),
    )
    # A silent network (partition, failed-over host) otherwise holds a call for good: no error,
    # no draining. Healthy worker statements take milliseconds; a call longer than the lease is
    # moot anyway (another worker may have the jobs by then).
    worker_database_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description=(
            "Longest wait for the queue or feature database to answer one call (a claim, a"
            " write, a feature lookup); then the worker logs it, reconnects and gives its batch"
            " back. Raise it only if healthy statements really run this long."
        ),
    )
    # --- end worker ---

    # --- serving (owner: serving; bentos/) ---
    serve_stage: str = Field(
        default="production",
        description="Registry stage (alias) or version `bentoml serve bentos.service:PaylaterScorer` serves.",
    )
    serve_cutoff: float | None = Field(
        default=None, description="Override the model version's decision cutoff (tag `cutoff`)."
    )
    serve_max_batch: int = Field(
        default=1000, ge=1, description="Most requests one /v2/score_batch call may carry."
    )
    serve_load_retry_max_seconds: float = Field(
        default=60.0,
        gt=0,
        description=(
            "Longest wait between a service worker's attempts to load its model after one failed"
            " (1 s at first, doubling up to this; failures waiting cannot heal wait this at once)."
        ),
    )
    api_token: str | None = Field(
        default=None,
        description="Bearer token the scoring APIs and /model_info require (unset: open, e.g. on loopback).",
    )
    # --- end serving ---

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """Fields as repr and str show them: credentials masked (a settings object printed in a
        log line, a debugger or a traceback's locals must not carry them)."""
        for name, value in super().__repr_args__():
            if name in _WHOLE_SECRETS and value:
                yield name, "**********"
            elif name in _SECRET_PATHS and value:
                yield name, origin(value)
            elif isinstance(value, str):
                yield name, redact(value)
            else:
                yield name, value

    @field_validator("worker_backend", "worker_reason_codes", mode="before")
    @classmethod
    def _choice_in_any_case(cls, value: Any) -> Any:
        """A choice in any letter case ('HTTP' started an http worker before these were checked)."""
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        """An IANA zone name the zone database holds (else every command fails on first use)."""
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError("unknown time zone: use an IANA name such as Asia/Tokyo") from exc
        return value

    @property
    def home_dir(self) -> Path:
        """The embedded-defaults folder as an absolute path."""
        return self.home.expanduser().resolve()

    @property
    def source(self) -> str:
        """The operational database URL."""
        return self.source_url or f"sqlite:///{self.home_dir / 'source.db'}"

    @property
    def warehouse(self) -> str:
        """The warehouse URL."""
        return self.warehouse_url or f"duckdb:///{self.home_dir / 'warehouse.duckdb'}"

    @property
    def datasets(self) -> str:
        """The dataset storage URL."""
        return self.dataset_url or (self.home_dir / "datasets").as_uri()

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI."""
        return self.mlflow_tracking_uri or f"sqlite:///{self.home_dir / 'mlflow.db'}"

    @property
    def truth_dir(self) -> Path:
        """Where the generator keeps evaluation-only ground truth."""
        return self.home_dir / "truth"


_WHOLE_SECRETS = frozenset({"api_token"})
"""Settings whose whole value is a secret (SecretStr ones mask themselves)."""
_SECRET_PATHS = frozenset({"alert_webhook_url", "monitor_heartbeat_url"})
"""URL settings whose path is the secret (a webhook's token, a heartbeat check's key)."""


def get_settings() -> Settings:
    """Settings as the environment says now (re-read whenever the environment changed).

    Settings come from the environment only, so one parse per distinct environment is enough:
    parsing takes ~20 ms, and a sync task asks several times.
    """
    return _settings_for(frozenset(os.environ.items()))


@functools.lru_cache(maxsize=8)
def _settings_for(environment: frozenset[tuple[str, str]]) -> Settings:
    """Settings parsed from the environment (the argument is the cache key)."""
    return Settings()
