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


async def _create_process_pool(api: str, name: str) -> None:
    """What `prefect work-pool create <name> --type process` does, from this process (a CLI run
    costs a Python start and Prefect's import, ~4 s, to set up what the test does not check)."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    async with PrefectClient(api) as client:
        await client.create_work_pool(
            WorkPoolCreate(name=name, type="process", base_job_template=template)
        )


async def _pull_steps(api: str, deployment: str) -> list[dict[str, Any]]:
    """The pull steps the Prefect API at `api` stores for `deployment` (flow/deployment)."""
    from prefect.client.orchestration import PrefectClient

    async with PrefectClient(api) as client:
        return list((await client.read_deployment_by_name(deployment)).pull_steps or [])


def test_the_code_dir_of_flow_runs_is_fixed_by_the_deploy_command(
    prefect_db_template: Path, tmp_path: Path
) -> None:
    """`prefect deploy` resolves `{{ $PAYLATER_CODE_DIR }}` in the pull step from its own
    environment: the PAYLATER_CODE_DIR of a container pool's job variables (or of the image)
    never reaches it. So container deployments must be deployed with the image's code folder,
    and the README must say so (it gave only `PAYLATER_CODE_DIR=$PWD`, the deployer's checkout).

    The deploy command runs as the CLI against a `prefect server` started here (without
    PREFECT_API_URL it would start an ephemeral server of its own); the work pool it needs is
    created, and the stored deployment read back, from this process."""
    import asyncio
    import os
    import shutil
    import subprocess
    import sys

    from paylater.testing import listen_port, stop_group, wait_until_answering

    readme = (ROOT / "README.md").read_text()
    assert "PAYLATER_CODE_DIR=/opt/paylater prefect --no-prompt deploy" in readme

    (tmp_path / "prefect").mkdir()
    shutil.copyfile(prefect_db_template, tmp_path / "prefect" / "prefect.db")
    port = listen_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # The template is migrated already: the check on start only costs its imports (~2 s).
        PREFECT_SERVER_DATABASE_MIGRATE_ON_START="false",
        PYTHONPATH=str(ROOT),
    )
    prefect = str(Path(sys.executable).parent / "prefect")
    # Only the API is asked: its background services (scheduler, event persister, triggers...)
    # and the UI cost seconds at start and take part in nothing checked.
    start = ["server", "start", "--no-services", "--no-ui", "--host", "127.0.0.1"]
    with (tmp_path / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [prefect, *start, "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_answering(f"{api}/health", server, tmp_path / "server.log", timeout=180)
        asyncio.run(_create_process_pool(api, "local-pool"))
        done = subprocess.run(
            [prefect, "--no-prompt", "deploy", "-n", "daily-pipeline"],
            cwd=ROOT,
            env=env | {"PAYLATER_CODE_DIR": "/opt/paylater"},
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        steps = asyncio.run(_pull_steps(api, "daily-pipeline/daily-pipeline"))
    finally:
        stop_group(server)
    assert steps[0]["prefect.deployments.steps.set_working_directory"] == {
        "directory": "/opt/paylater"
    }, steps
