"""prefect.yaml: deployments point at real flows, pool job variables fit the workers' templates."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def _deployments() -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in _load()["deployments"]}


def test_expected_deployments_and_schedules() -> None:
    deps = _deployments()
    assert set(deps) == {
        "daily-sync",
        "feature-build",
        "daily-pipeline",
        "monthly-retrain",
        "monitoring-report",
        "monitor",
    }
    assert deps["daily-sync"]["schedules"] == [{"cron": "0 1 * * *", "timezone": "Asia/Tokyo"}]
    assert deps["monthly-retrain"]["schedules"] == [{"cron": "0 3 1 * *", "timezone": "Asia/Tokyo"}]
    assert deps["monitor"]["schedules"] == [{"interval": 300}]
    # The feature build is chained to the sync by an event, never by a clock.
    assert "schedules" not in deps["feature-build"]
    (trigger,) = deps["feature-build"]["triggers"]
    assert trigger["expect"] == ["paylater.sync.completed"]
    assert trigger["parameters"] == {"as_of": "{{ event.payload.as_of }}"}


def test_monitoring_report_follows_every_deployment_that_builds_features() -> None:
    """The dashboard is refreshed once a day's features exist, whichever deployment built them:
    the daily-pipeline deployment (manual reruns, backfills) builds them in a subflow, whose
    completion is no feature-build deployment run."""
    from prefect.events.schemas.automations import EventTrigger

    (trigger,) = _deployments()["monitoring-report"]["triggers"]
    parsed = EventTrigger.model_validate({k: v for k, v in trigger.items() if k != "enabled"})
    assert parsed.expect == {"prefect.flow-run.Completed"}
    (related,) = (
        parsed.match_related if isinstance(parsed.match_related, list) else [parsed.match_related]
    )
    assert dict(related.items()) == {
        "prefect.resource.role": ["deployment"],
        "prefect.resource.name": ["feature-build", "daily-pipeline"],
    }


@pytest.mark.parametrize("name", sorted(_deployments()))
def test_entrypoints_name_flows(name: str) -> None:
    path, func = _deployments()[name]["entrypoint"].split(":")
    spec = importlib.util.spec_from_file_location(f"_entry_{func}", ROOT / path)
    assert spec and spec.loader, f"{path} is missing"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from prefect import Flow

    assert isinstance(getattr(module, func), Flow)


@pytest.mark.parametrize(
    ("pool", "worker"),
    [
        ("ecs", "prefect_aws.workers.ecs_worker:ECSWorker"),
        ("cloud_run", "prefect_gcp.workers.cloud_run_v2:CloudRunWorkerV2"),
    ],
)
def test_container_pool_job_variables_fit_worker_template(pool: str, worker: str) -> None:
    from prefect.utilities.schema_tools import validate

    module, cls = worker.split(":")
    template = getattr(importlib.import_module(module), cls).get_default_base_job_template()
    variables = _load()["definitions"]["work_pools"][pool]["job_variables"]
    unknown = set(variables) - set(template["variables"]["properties"])
    assert not unknown, f"job variables unknown to {cls}: {unknown}"
    resolved = {
        k: ("registry.example/paylater:1" if v == "{{ $PAYLATER_IMAGE }}" else v)
        for k, v in variables.items()
    }
    errors = validate(resolved, template["variables"], ignore_required=True)
    assert not errors, [e.message for e in errors]


def test_no_credentials_in_file() -> None:
    text = (ROOT / "prefect.yaml").read_text()
    assert not re.search(r"(?i)(password|secret|token|api_key|access_key)\s*:\s*\S", text)
