"""Crashed, failed and late flow runs, read from a real Prefect API (the session's test server).

The crash is real: a deployment's flow run process is killed with SIGKILL under a Prefect
Runner, which reports the run Crashed, as a process worker does. Such a run never reaches its
flow's on_failure hook, so the monitor is what tells anybody. A failure is a real exception in
the flow, which the Runner reports Failed.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tasks.monitoring import (
    FlowRunInfo,
    measure_crashed_flows,
    measure_failed_flows,
    measure_late_runs,
    measure_stuck_runs,
    read_flow_runs,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
T = TypeVar("T")


def run_info(state: str, minutes_ago: float, name: str = "r") -> FlowRunInfo:
    """A run that ended (terminal states) or was due (waiting states) `minutes_ago`."""
    moment = NOW - timedelta(minutes=minutes_ago)
    return FlowRunInfo(
        flow="daily-sync",
        name=name,
        state_type=state,
        message="Process exited with status code: -9",
        end_time=moment if state not in ("SCHEDULED", "PENDING") else None,
        expected_start_time=moment,
    )


def test_crashed_flows_counts_jobs_whose_latest_run_crashed() -> None:
    latest = [
        run_info("CRASHED", 30, name="lucky-otter"),
        run_info("COMPLETED", 10),
        run_info("FAILED", 5),  # counted by failed_flows
    ]
    m = measure_crashed_flows(latest)
    assert m.check == "crashed_flows" and m.value == 1.0
    assert "daily-sync/lucky-otter crashed at 2026-11-27 11:30 UTC" in m.detail
    assert "status code: -9" in m.detail
    assert measure_crashed_flows([]).value == 0.0


def test_failed_flows_counts_jobs_whose_latest_run_failed() -> None:
    latest = [
        run_info("FAILED", 5, name="brave-fox"),
        run_info("CRASHED", 30),
        run_info("COMPLETED", 10),
    ]
    m = measure_failed_flows(latest)
    assert m.check == "failed_flows" and m.value == 1.0
    assert m.detail.startswith("daily-sync/brave-fox failed at 2026-11-27 11:55 UTC")
    assert measure_failed_flows([]).value == 0.0


def test_stuck_runs_are_the_ones_running_past_the_limit() -> None:
    def running(hours: float, name: str) -> FlowRunInfo:
        since = NOW - timedelta(hours=hours)
        return FlowRunInfo(
            flow="monthly-retrain",
            name=name,
            state_type="RUNNING",
            message="",
            end_time=None,
            expected_start_time=since,
            deployment="monthly-retrain",
            state_since=since,
        )

    runs = [running(1, "busy"), running(7.5, "hung"), running(3.5, "lost")]
    m = measure_stuck_runs(runs, NOW, stuck_hours=3)
    assert m.check == "stuck_flow_runs" and m.value == 2.0
    assert m.detail.startswith(
        "monthly-retrain/hung (deployment monthly-retrain) running since 2026-11-27 04:30 UTC,"
        " for 7.5 h"
    ), m.detail
    assert "lost" in m.detail and "busy" not in m.detail
    assert measure_stuck_runs(runs[:1], NOW, stuck_hours=3).value == 0.0


def test_stuck_limits_per_deployment_override_the_global_one() -> None:
    """A stuck daily sync is caught after its own limit, while the monthly retrain running long
    is not paged under the global 3 h; 'flow/deployment' wins over a bare deployment name."""

    def running(flow: str, deployment: str, hours: float) -> FlowRunInfo:
        since = NOW - timedelta(hours=hours)
        return FlowRunInfo(
            flow=flow,
            name=f"{deployment}-{hours:g}h",
            state_type="RUNNING",
            message="",
            end_time=None,
            expected_start_time=since,
            deployment=deployment,
            state_since=since,
        )

    runs = [
        running("daily-sync", "daily-sync", 1.6),  # past its 1.5 h
        running("daily-sync", "daily-sync", 1.2),  # within it
        running("monthly-retrain", "monthly-retrain", 5),  # within its 8 h, past the global 3
        running("monthly-retrain", "monthly-retrain", 9),  # past its 8 h
        running("feature-build", "feature-build", 3.5),  # no limit of its own: the global 3 h
        running("other-flow", "daily-sync", 1.6),  # its flow/deployment key: 2 h
    ]
    limits = {"daily-sync": 1.5, "monthly-retrain": 8, "other-flow/daily-sync": 2}
    m = measure_stuck_runs(runs, NOW, stuck_hours=3, limits=limits)
    assert m.value == 3.0, m.detail
    assert m.detail == (
        "monthly-retrain/monthly-retrain-9h (deployment monthly-retrain) running since"
        " 2026-11-27 03:00 UTC, for 9.0 h (limit 8.0 h); feature-build/feature-build-3.5h"
        " (deployment feature-build) running since 2026-11-27 08:30 UTC, for 3.5 h (limit 3.0 h);"
        " daily-sync/daily-sync-1.6h (deployment daily-sync) running since 2026-11-27 10:24 UTC,"
        " for 1.6 h (limit 1.5 h)"
    )
    # without per-deployment limits, the global one decides alone (as before)
    assert measure_stuck_runs(runs, NOW, stuck_hours=3).value == 3.0  # 9 h, 5 h, 3.5 h
    assert measure_stuck_runs(runs, NOW, stuck_hours=3, limits={}).detail.startswith(
        "monthly-retrain/monthly-retrain-9h"
    )


def test_late_runs_are_the_ones_waiting_past_the_limit() -> None:
    waiting = [
        run_info("SCHEDULED", 45, name="late-one"),
        run_info("PENDING", 31, name="late-two"),
        run_info("SCHEDULED", 10, name="on-time"),
        run_info("SCHEDULED", -60, name="tomorrow"),
    ]
    m = measure_late_runs(waiting, NOW, late_minutes=30)
    assert m.value == 2.0
    assert m.detail.startswith("daily-sync/late-one due 2026-11-27 11:15 UTC")
    assert "late-two" in m.detail and "on-time" not in m.detail
    assert "worker" in m.detail
    assert measure_late_runs(waiting[2:], NOW, late_minutes=30) == measure_late_runs(
        [], NOW, late_minutes=30
    )


CRASHING_FLOW = """
import os
import signal

from prefect import flow


@flow(name="{name}")
def job(die: bool = True, fail: bool = False, measure_to: str = "", hang: bool = False) -> None:
    if hang:  # a job that never ends (a lock it waits on, a host about to be lost)
        import time

        time.sleep(600)
    if measure_to:  # measure as the monitor does, from inside a run of this deployment
        import json
        from datetime import UTC, datetime

        from tasks.monitoring import current_deployment_id, read_flow_runs

        own = current_deployment_id()
        latest = read_flow_runs(datetime.now(UTC), 48, 30, own_deployment=own).latest
        seen = [r.state_type for r in latest if r.flow == "{name}"]
        with open(measure_to, "w") as out:
            json.dump({{"own": own, "seen": seen}}, out)
        return
    if die:
        os.kill(os.getpid(), signal.SIGKILL)
    if fail:
        raise RuntimeError("the source database refused the connection")
"""


@pytest.fixture
def crashing_flow(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, str]]:
    """A flow (unique name) that kills its own process unless told not to; its runs are
    deleted afterwards, so the session's other monitor tests see no crash or late run of it."""
    name = f"paylater-test-crash-{uuid.uuid4().hex[:8]}"
    (tmp_path / "crashing.py").write_text(textwrap.dedent(CRASHING_FLOW.format(name=name)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("crashing", None)
    import crashing

    try:
        yield crashing.job, name
    finally:
        sys.modules.pop("crashing", None)
        delete_flow_runs_of(name)


def delete_flow_runs_of(flow_name: str) -> None:
    """Delete every run of the flow `flow_name` from the test harness.

    Right after a run the harness's SQLite is often still busy with the run's events and a
    delete answers 503 (2 of 3 teardowns); the Prefect client waits 2 s of backoff before it
    tries again, even with its retries set to 0. The deletes go through httpx instead, tried
    again every 0.1 s (for up to 30 s) while the answer is 503.
    """
    import time

    import httpx
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterId
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        flow = client.read_flow_by_name(flow_name)
        runs = client.read_flow_runs(flow_filter=FlowFilter(id=FlowFilterId(any_=[flow.id])))
    api = PREFECT_API_URL.value()
    for run in runs:
        deadline = time.monotonic() + 30
        while (
            answer := httpx.delete(f"{api}/flow_runs/{run.id}", timeout=10)
        ).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        answer.raise_for_status()


def run_deployment_once(job: Any, parameters: dict[str, Any]) -> None:
    """Deploy `job` on a Runner, create one run of it and let the Runner execute it."""
    from prefect import get_client
    from prefect.runner import Runner

    async def go() -> None:
        runner = Runner(name=f"test-runner-{uuid.uuid4().hex[:8]}")
        deployment_id = await runner.aadd_flow(job, name="crash-check")
        async with get_client() as client:
            await client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
        await runner.start(run_once=True)

    asyncio.run(go())


def state_of(client: Any, run_id: Any) -> str:
    """The run's state type as the API reports it (a created run always has one)."""
    state_type = client.read_flow_run(run_id).state_type
    assert state_type is not None, f"flow run {run_id} has no state"
    return state_type.value


def ours(runs: list[FlowRunInfo], name: str) -> list[FlowRunInfo]:
    return [r for r in runs if r.flow == name]


def test_a_killed_flow_run_counts_as_crashed_until_its_job_runs_again(
    crashing_flow: tuple[Any, str],
) -> None:
    job, name = crashing_flow
    run_deployment_once(job, {"die": True})
    latest, _, _, _ = read_flow_runs(datetime.now(UTC), window_hours=48, late_minutes=30)
    (crash,) = ours(latest, name)
    assert crash.state_type == "CRASHED", crash
    m = measure_crashed_flows(ours(latest, name))
    assert m.value == 1.0 and f"{name}/{crash.name} crashed" in m.detail
    assert "SIGKILL" in m.detail or "-9" in m.detail, m.detail

    run_deployment_once(job, {"die": False})  # the job's next run finishes
    latest, _, _, _ = read_flow_runs(datetime.now(UTC), window_hours=48, late_minutes=30)
    (newest,) = ours(latest, name)
    assert newest.state_type == "COMPLETED"
    assert measure_crashed_flows(ours(latest, name)).value == 0.0

    # Out of the window, a crash is no longer looked at.
    later = datetime.now(UTC) + timedelta(hours=49)
    assert ours(read_flow_runs(later, window_hours=48, late_minutes=30)[0], name) == []


def test_a_failed_flow_run_counts_as_failed_until_its_job_runs_again(
    crashing_flow: tuple[Any, str],
) -> None:
    job, name = crashing_flow
    run_deployment_once(job, {"die": False, "fail": True})
    latest, _, _, _ = read_flow_runs(datetime.now(UTC), window_hours=48, late_minutes=30)
    (failure,) = ours(latest, name)
    assert failure.state_type == "FAILED", failure
    m = measure_failed_flows(ours(latest, name))
    assert m.value == 1.0 and f"{name}/{failure.name} failed" in m.detail
    assert "refused the connection" in m.detail, m.detail
    assert measure_crashed_flows(ours(latest, name)).value == 0.0

    run_deployment_once(job, {"die": False})  # the job's next run finishes
    latest, _, _, _ = read_flow_runs(datetime.now(UTC), window_hours=48, late_minutes=30)
    assert measure_failed_flows(ours(latest, name)).value == 0.0


def test_the_monitor_does_not_count_its_own_previous_failure(
    crashing_flow: tuple[Any, str], tmp_path: Path
) -> None:
    """A run of a deployment that measures the flow runs (the monitor) leaves its own deployment
    out: the failure of its previous run is over, since it runs again. Counted, one transient
    failure of the monitor paged at its next run, and resolved at the one after."""
    import json

    job, name = crashing_flow
    run_deployment_once(job, {"die": False, "fail": True})
    # Measured from outside the deployment, its failed run counts.
    latest, _, _, _ = read_flow_runs(datetime.now(UTC), window_hours=48, late_minutes=30)
    assert [r.state_type for r in ours(latest, name)] == ["FAILED"]
    out = tmp_path / "measured.json"
    run_deployment_once(job, {"die": False, "measure_to": str(out)})
    measured = json.loads(out.read_text())
    assert measured["own"] is not None, "the run knows its deployment"
    assert measured["seen"] == []


def test_a_run_nobody_picks_up_is_late(crashing_flow: tuple[Any, str]) -> None:
    from prefect import get_client
    from prefect.states import Scheduled

    job, name = crashing_flow
    with get_client(sync_client=True) as client:
        for minutes in (120, 5):
            client.create_flow_run(
                job, state=Scheduled(scheduled_time=datetime.now(UTC) - timedelta(minutes=minutes))
            )
    now = datetime.now(UTC)
    _, waiting, _, _ = read_flow_runs(now, window_hours=48, late_minutes=30)
    (late,) = ours(waiting, name)
    assert late.state_type == "SCHEDULED"
    assert measure_late_runs(ours(waiting, name), now, late_minutes=30).value == 1.0


def test_an_unreachable_prefect_api_leaves_both_checks_unknown() -> None:
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from paylater.settings import Settings
    from tasks.monitoring import measure_flow_runs

    nobody = "http://127.0.0.1:9/api"  # nothing listens on port 9
    with temporary_settings({PREFECT_API_URL: nobody, PREFECT_CLIENT_MAX_RETRIES: 0}):
        results = measure_flow_runs(Settings(), datetime.now(UTC))
    assert [(m.check, m.value) for m in results] == [
        ("crashed_flows", None),
        ("failed_flows", None),
        ("late_flow_runs", None),
        ("stuck_flow_runs", None),
        ("stuck_limit_keys", None),
    ]
    assert all("Prefect API not readable" in m.detail for m in results)


def test_a_run_rescheduled_for_later_is_not_late(crashing_flow: tuple[Any, str]) -> None:
    """Prefect keeps a run's expected_start_time from its first state: a run due two hours ago
    that was put back to Scheduled for later (AwaitingRetry after a failure, a crashed run
    retried, a run rescheduled) waits for its new time, and no worker is missing."""
    from prefect import get_client
    from prefect.states import AwaitingRetry, Scheduled

    job, name = crashing_flow
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(
            job, state=Scheduled(scheduled_time=datetime.now(UTC) - timedelta(minutes=120))
        )
        later = datetime.now(UTC) + timedelta(minutes=10)
        client.set_flow_run_state(run.id, AwaitingRetry(scheduled_time=later), force=True)
    now = datetime.now(UTC)
    _, waiting, _, _ = read_flow_runs(now, window_hours=48, late_minutes=30)
    assert measure_late_runs(ours(waiting, name), now, late_minutes=30).value == 0.0
    # Its new time passed by the limit, it is late.
    then = later + timedelta(minutes=31)
    _, waiting, _, _ = read_flow_runs(then, window_hours=48, late_minutes=30)
    m = measure_late_runs(ours(waiting, name), then, late_minutes=30)
    assert m.value == 1.0 and f"due {later:%Y-%m-%d %H:%M} UTC" in m.detail, m.detail


def test_a_prefect_api_that_does_not_answer_costs_the_monitor_seconds_not_minutes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An API that accepts connections and never answers (overloaded, a hung proxy) leaves both
    checks unknown within the read budget: the queue checks measured before it must not wait
    the client's default 60 s timeout times its retries before anybody is paged.

    Each request's timeout is lowered to 1 s here (the shipped 10 s only made the test wait):
    one unanswered request then ends the read, where the client's retries would take over a
    minute of backoff, past the bound below."""
    import socket
    import threading
    import time

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from paylater.settings import Settings
    from tasks import monitoring
    from tasks.monitoring import FLOW_RUN_READ_BUDGET_SECONDS, measure_flow_runs

    assert monitoring.FLOW_RUN_READ_TIMEOUT_SECONDS <= FLOW_RUN_READ_BUDGET_SECONDS
    monkeypatch.setattr(monitoring, "FLOW_RUN_READ_TIMEOUT_SECONDS", 1.0)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepted by the kernel, never answered
    results: list[Any] = []

    def measure() -> None:
        with temporary_settings(
            {PREFECT_API_URL: f"http://127.0.0.1:{silent.getsockname()[1]}/api"}
        ):
            results.append(measure_flow_runs(Settings(), datetime.now(UTC)))

    started = time.monotonic()
    thread = threading.Thread(target=measure, daemon=True)
    thread.start()
    thread.join(FLOW_RUN_READ_BUDGET_SECONDS + 15)
    silent.close()
    assert results, f"still reading after {time.monotonic() - started:.0f} s"
    assert [(m.check, m.value) for m in results[0]] == [
        ("crashed_flows", None),
        ("failed_flows", None),
        ("late_flow_runs", None),
        ("stuck_flow_runs", None),
        ("stuck_limit_keys", None),
    ]


def test_an_ad_hoc_run_that_crashed_is_not_a_crashed_job(crashing_flow: tuple[Any, str]) -> None:
    """A run started by hand (no deployment) and interrupted is Crashed too; no deployment run
    would ever clear it, and the jobs the system runs are deployments: it is not counted."""
    from prefect import get_client
    from prefect.states import Crashed, Running

    job, name = crashing_flow
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(job, state=Running())
        client.set_flow_run_state(run.id, Crashed(message="Execution was interrupted"), force=True)
        assert state_of(client, run.id) == "CRASHED"
    latest, _, _, _ = read_flow_runs(datetime.now(UTC), window_hours=48, late_minutes=30)
    assert ours(latest, name) == []


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc, whatever session each one is in)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended meanwhile
                continue
            # The name, in parentheses, may hold spaces: the fields after its ")" are split.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def test_a_run_whose_process_vanished_stays_running_and_is_stuck(
    crashing_flow: tuple[Any, str], tmp_path: Path
) -> None:
    """The host of a deployment's run is lost: its process and the one that started it die at
    once (frozen, then SIGKILLed), so nobody reports it Crashed and the API shows it
    RUNNING for good. Past the limit it is stuck, named with its deployment; the run measuring
    (the monitor's own) is left out."""
    import contextlib
    import os
    import signal
    import subprocess
    import time

    from prefect import get_client
    from prefect.runner import Runner
    from prefect.settings import PREFECT_API_URL

    job, name = crashing_flow

    async def deploy_and_create() -> Any:
        deployment_id = await Runner(name=f"test-runner-{uuid.uuid4().hex[:8]}").aadd_flow(
            job, name="crash-check"
        )
        async with get_client() as client:
            return await client.create_flow_run_from_deployment(
                deployment_id, parameters={"die": False, "hang": True}
            )

    run = asyncio.run(deploy_and_create())
    env = os.environ | {"PREFECT_API_URL": str(PREFECT_API_URL.value())}
    prefect_bin = Path(sys.executable).parent / "prefect"
    process = subprocess.Popen(
        [str(prefect_bin), "flow-run", "execute", str(run.id)],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while state_of(client, run.id) != "RUNNING":
                assert process.poll() is None, "the run's process ended before it ran"
                assert time.monotonic() < deadline, "the run never started"
                time.sleep(0.2)
    finally:
        # The host is gone: nobody reports anything. `prefect flow-run execute` runs the engine
        # in a child of its own session, connected back to it: killed apart, either one could
        # report the run (the parent that its child died, the child that its parent hung up,
        # "Execution was cancelled by the runtime environment": 1 run in 4 on a busy machine),
        # and the child outlived the test. So every process of the tree is frozen, then killed.
        tree = [process.pid, *descendants(process.pid)]
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        process.wait()
    with get_client(sync_client=True) as client:
        assert state_of(client, run.id) == "RUNNING"

    now = datetime.now(UTC)
    running_now = read_flow_runs(now, 48, 30)[2]
    with get_client(sync_client=True) as client:
        seen = client.read_flow_run(run.id)
    assert ours(running_now, name) != [], (seen.state, running_now)  # running, not stuck yet
    assert measure_stuck_runs(ours(read_flow_runs(now, 48, 30)[2], name), now, 3).value == 0.0
    later = now + timedelta(hours=4)
    latest, waiting, running, _ = read_flow_runs(later, 48, 30)
    # What no other check sees: not finished (crashed, failed), not waiting (late).
    assert ours(latest, name) == [] and ours(waiting, name) == []
    (stuck,) = ours(running, name)
    m = measure_stuck_runs([stuck], later, stuck_hours=3)
    assert m.value == 1.0, m.detail
    assert f"{name}/{run.name} (deployment crash-check) running since" in m.detail
    assert "for 4.0 h" in m.detail, m.detail
    # Measured from inside that very run (the monitor's own current run), it is not counted.
    assert ours(read_flow_runs(later, 48, 30, own_run=str(run.id))[2], name) == []


def test_a_stuck_limit_naming_no_deployment_is_a_warning_naming_the_deployments(
    crashing_flow: tuple[Any, str],
) -> None:
    """A mistyped key of PAYLATER_MONITOR_STUCK_RUN_HOURS_BY_DEPLOYMENT ('crash_check' for the
    deployment 'crash-check') was ignored without a word: the job kept the global limit. Against
    the real API's deployments, such a key is now a warning naming it and the deployments there
    are; keys naming a deployment (bare, or 'flow/deployment') are not."""
    from prefect import get_client
    from prefect.runner import Runner

    from paylater.settings import Settings
    from tasks.monitoring import judge, measure_flow_runs

    job, name = crashing_flow

    async def deploy() -> None:
        await Runner(name=f"test-runner-{uuid.uuid4().hex[:8]}").aadd_flow(job, name="crash-check")
        async with get_client() as client:
            assert await client.read_deployment_by_name(f"{name}/crash-check")

    asyncio.run(deploy())
    settings = Settings(
        monitor_stuck_run_hours=3,
        monitor_stuck_run_hours_by_deployment={
            "crash_check": 1,  # the typo
            f"{name}/crash-check": 2,
            "crash-check": 1,
            f"{name}/crash_check": 2,  # a typo too, in the deployment part
        },
    )
    measured = {m.check: m for m in measure_flow_runs(settings, datetime.now(UTC))}
    keys = measured["stuck_limit_keys"]
    assert keys.value == 2.0, keys.detail
    assert "PAYLATER_MONITOR_STUCK_RUN_HOURS_BY_DEPLOYMENT names no deployment" in keys.detail
    assert f"'crash_check', '{name}/crash_check'" in keys.detail, keys.detail
    assert "keep the global limit, 3.0 h" in keys.detail
    assert f"{name}/crash-check" in keys.detail.partition("deployments: ")[2]
    (judged,) = judge([keys], settings)
    assert judged.level == "warning"  # Slack, never a page
    # the other checks are measured as before
    assert measured["stuck_flow_runs"].value is not None
    fixed = Settings(monitor_stuck_run_hours_by_deployment={"crash-check": 1})
    ok = {m.check: m for m in measure_flow_runs(fixed, datetime.now(UTC))}["stuck_limit_keys"]
    assert ok.value == 0.0 and judge([ok], fixed)[0].level == "ok"


def test_every_deployment_and_run_is_read_past_the_apis_first_page(
    prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The monitor read one page of deployments and of waiting and running runs (200, the API's
    largest): a job past it was never judged (its failure never paged), its late and stuck runs
    went uncounted, and a stuck limit naming it was reported as naming no deployment. With a page
    of 2, three deployments of one flow, each with a late, a running and a failed run, are all
    read, along with the session's other deployments."""
    from prefect import get_client
    from prefect.client.schemas.objects import State
    from prefect.states import Failed, Running, Scheduled

    from tasks import monitoring

    monkeypatch.setattr(monitoring, "PREFECT_PAGE_SIZE", 2)
    name = f"paylater-test-paged-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(name)
        try:
            for deployment in ("paged-a", "paged-b", "paged-c"):
                deployment_id = client.create_deployment(flow_id, deployment)
                late: State[Any] = Scheduled(scheduled_time=now - timedelta(hours=1))
                client.create_flow_run_from_deployment(deployment_id, state=late)
                states: list[State[Any]] = [Running(), Failed(message=f"{deployment} failed")]
                for state in states:
                    run = client.create_flow_run_from_deployment(deployment_id)
                    client.set_flow_run_state(run.id, state, force=True)
            everything = client.read_deployments()
            latest, waiting, running, deployments = read_flow_runs(now, 48, 30)
        finally:
            client.delete_flow(flow_id)  # its deployments and runs go with it

    assert len(everything) > 2  # more than one page: the session's other deployments too
    assert len(deployments) == len(everything)
    assert {f"{name}/paged-{x}" for x in "abc"} <= set(deployments)
    assert sorted(r.deployment for r in ours(latest, name)) == ["paged-a", "paged-b", "paged-c"]
    assert all(r.state_type == "FAILED" for r in ours(latest, name))
    assert sorted(r.deployment for r in ours(waiting, name)) == ["paged-a", "paged-b", "paged-c"]
    assert sorted(r.deployment for r in ours(running, name)) == ["paged-a", "paged-b", "paged-c"]
    assert measure_late_runs(ours(waiting, name), now, 30).value == 3.0


def requests_of(
    monkeypatch: pytest.MonkeyPatch,
    read: Callable[[], T],
    on_request: Callable[[Any], None] = lambda request: None,
) -> tuple[T, list[Any]]:
    """What `read()` returns, and every HTTP request its Prefect clients sent (an httpx event
    hook added to the settings read_flow_runs gives get_client; it calls `on_request` too)."""
    import prefect

    real = prefect.get_client
    sent: list[Any] = []

    def hook(request: Any) -> None:
        sent.append(request)
        on_request(request)

    def recording(*args: Any, httpx_settings: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        settings = dict(httpx_settings or {}) | {"event_hooks": {"request": [hook]}}
        return real(*args, httpx_settings=settings, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(prefect, "get_client", recording)
        return read(), sent


def finished_run_reads(sent: list[Any]) -> int:
    """The requests that read finished runs (the flow-run filter sorted by end time)."""
    import json

    return sum(
        1
        for r in sent
        if r.url.path.endswith("/flow_runs/filter")
        and json.loads(r.content).get("sort") == "END_TIME_DESC"
    )


def finished_deployment_runs(client: Any, now: datetime) -> int:
    """How many deployment runs finished in the 48 h before `now` (the runs the read may page)."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterEndTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    from tasks.monitoring import TERMINAL_STATES

    return int(
        client.count_flow_runs(
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType(s) for s in TERMINAL_STATES])
                ),
                deployment_id=FlowRunFilterDeploymentId(is_null_=False),
                end_time=FlowRunFilterEndTime.model_validate({"after_": now - timedelta(hours=48)}),
            )
        )
    )


def test_the_newest_finished_runs_cost_a_request_per_page_not_per_deployment(
    prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each deployment was asked for its newest finished run, one request each: with hundreds of
    deployments the read outlasted its 30 s budget and every flow-run check was unknown. Twelve
    more deployments, each with a finished run, now cost the read no request more; with a page
    of 4, the finished runs take a request per 4 of them at most, not one per deployment."""
    from prefect import get_client
    from prefect.client.schemas.objects import State
    from prefect.states import Completed, Failed

    from tasks import monitoring

    name = f"paylater-test-counted-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(name)

        def deploy_and_finish(i: int) -> None:
            deployment_id = client.create_deployment(flow_id, f"counted-{i:02d}")
            run = client.create_flow_run_from_deployment(deployment_id)
            end: State[Any] = Failed(message="boom") if i % 3 == 0 else Completed()
            client.set_flow_run_state(run.id, end, force=True)

        try:
            deploy_and_finish(0)  # its flow is read before and after: only deployments grow
            _, before = requests_of(monkeypatch, lambda: read_flow_runs(datetime.now(UTC), 48, 30))
            for i in range(1, 13):
                deploy_and_finish(i)
            now = datetime.now(UTC)
            latest, after = requests_of(monkeypatch, lambda: read_flow_runs(now, 48, 30))
            monkeypatch.setattr(monitoring, "PREFECT_PAGE_SIZE", 4)
            paged, sent = requests_of(monkeypatch, lambda: read_flow_runs(now, 48, 30))
            finished = finished_deployment_runs(client, now)
        finally:
            client.delete_flow(flow_id)  # its deployments and runs go with it

    assert len(ours(latest.latest, name)) == 13
    assert measure_failed_flows(ours(latest.latest, name)).value == 5.0
    assert len(after) == len(before), [r.url.path for r in after]
    by_name = sorted(ours(latest.latest, name), key=lambda r: r.deployment)
    assert sorted(ours(paged.latest, name), key=lambda r: r.deployment) == by_name
    assert finished >= 13
    assert finished_run_reads(sent) <= finished // 4 + 1, (finished, finished_run_reads(sent))


def test_a_job_failing_every_5_minutes_does_not_crowd_out_another_jobs_failure(
    prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The monitor failing every 5 minutes while its database is down (288 runs a day) filled
    the one page of bad runs once read, and the daily sync's older failure was never seen. With
    a page of 3: the sync completed, then failed; then the monitor failed 10 times. Both jobs'
    failures count, each from its newest run; measured from the monitor's own deployment, only
    the sync's does."""
    from prefect import get_client
    from prefect.client.schemas.objects import State
    from prefect.states import Completed, Failed

    from tasks import monitoring

    monkeypatch.setattr(monitoring, "PREFECT_PAGE_SIZE", 3)
    name = f"paylater-test-crowded-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(name)
        try:
            sync = client.create_deployment(flow_id, "sync")
            monitor = client.create_deployment(flow_id, "monitor")
            ends: list[tuple[Any, State[Any]]] = [
                (sync, Completed()),
                (sync, Failed(message="the source database refused the connection")),
            ]
            ends += [(monitor, Failed(message=f"queue database down ({i})")) for i in range(10)]
            for deployment_id, end in ends:
                run = client.create_flow_run_from_deployment(deployment_id)
                client.set_flow_run_state(run.id, end, force=True)
            now = datetime.now(UTC)
            latest = read_flow_runs(now, 48, 30).latest
            own = read_flow_runs(now, 48, 30, own_deployment=str(monitor)).latest
        finally:
            client.delete_flow(flow_id)

    m = measure_failed_flows(ours(latest, name))
    assert m.value == 2.0, m.detail
    assert "refused the connection" in m.detail and "queue database down (9)" in m.detail
    assert "down (8)" not in m.detail  # the monitor's newest run, not an older one
    assert [(r.deployment, r.state_type) for r in ours(own, name)] == [("sync", "FAILED")]


def test_every_deployment_is_read_once_when_names_tie_and_one_is_deleted_mid_read(
    prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deployments were paged by offset, sorted by name alone (the API sorts them by nothing
    else): deployments of different flows sharing a name (every flow's 'default') may come back
    in any order across pages, and one deleted between two pages shifted the next page by one,
    so a deployment was skipped (its job unjudged) or read twice. With a page of 2: five flows
    each with a deployment of the same name, and the first deployment by name deleted once the
    first page is read; every deployment is read exactly once."""
    import httpx
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    from tasks import monitoring

    monkeypatch.setattr(monitoring, "PREFECT_PAGE_SIZE", 2)
    tag = uuid.uuid4().hex[:8]
    api = PREFECT_API_URL.value()
    flow_ids = []
    with get_client(sync_client=True) as client:
        try:
            for i in range(5):
                flow_ids.append(client.create_flow_from_name(f"paylater-test-tied-{tag}-{i}"))
                client.create_deployment(flow_ids[-1], f"tied-{tag}")
            doomed = client.create_deployment(flow_ids[0], f"0-doomed-{tag}")  # sorts first
            pages = 0

            def delete_after_first_page(request: Any) -> None:
                nonlocal pages
                if request.url.path.endswith("/deployments/filter"):
                    pages += 1
                    if pages == 2:
                        httpx.delete(f"{api}/deployments/{doomed}", timeout=10).raise_for_status()

            deployments, _ = requests_of(
                monkeypatch,
                lambda: read_flow_runs(datetime.now(UTC), 48, 30).deployments,
                delete_after_first_page,
            )
            remaining = httpx.post(f"{api}/deployments/count", json={}, timeout=10).json()
        finally:
            for flow_id in flow_ids:
                client.delete_flow(flow_id)

    assert pages > 2  # the deletion came between pages
    assert len(deployments) == len(set(deployments)), deployments  # none twice
    assert f"paylater-test-tied-{tag}-0/0-doomed-{tag}" in deployments  # read before it went
    assert len(deployments) == remaining + 1, deployments  # none skipped
    assert {f"paylater-test-tied-{tag}-{i}/tied-{tag}" for i in range(5)} <= set(deployments)


def move_first_of_page_one(
    states: tuple[str, ...], to: Any, moved: list[str]
) -> Callable[[Any], None]:
    """A request hook: before the second request reading runs in `states`, the first run the
    first such request returned is set to `to` (its id appended to `moved`); the read's first
    page is asked again, as the read asked it, to know which run that is."""
    import json

    import httpx
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    first: list[bytes] = []

    def hook(request: Any) -> None:
        if not request.url.path.endswith("/flow_runs/filter"):
            return
        body = json.loads(request.content)
        wanted = ((body.get("flow_runs") or {}).get("state") or {}).get("type") or {}
        if sorted(wanted.get("any_") or []) != sorted(states):
            return
        first.append(request.content)
        if len(first) != 2:  # before the second request only
            return
        page = httpx.post(f"{api}/flow_runs/filter", content=first[0], timeout=10)
        run_id = page.raise_for_status().json()[0]["id"]
        state = {"state": to.model_dump(mode="json", exclude_unset=True), "force": True}
        answer = httpx.post(f"{api}/flow_runs/{run_id}/set_state", json=state, timeout=10)
        assert answer.raise_for_status().json()["status"] == "ACCEPT"
        moved.append(run_id)

    return hook


def flow_run_pairs(runs: list[Any], flow_names: dict[Any, str]) -> set[tuple[str, str]]:
    """Each run as (its flow's name, its name)."""
    return {(flow_names.get(r.flow_id, str(r.flow_id)), r.name) for r in runs}


def test_a_run_changing_state_between_pages_skips_no_waiting_or_running_run(
    prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting and running runs were paged by offset (sorted by id): a run of the first page
    that left its state before the second page was asked shifted every later run one place up,
    and the run at the page's edge was read on neither page, so a late or stuck run went
    uncounted for a pass. With a page of 2: six late runs and six running ones; before the
    second page of each read, the first run of its first page changes state (late: starts
    running; running: completes). Every run that stayed late, or running, throughout is read."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterId,
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import State, StateType
    from prefect.states import Completed, Running, Scheduled

    from tasks import monitoring

    monkeypatch.setattr(monitoring, "PREFECT_PAGE_SIZE", 2)
    name = f"paylater-test-shifted-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)

    def in_states(*names: str, late: bool = False) -> FlowRunFilter:
        return FlowRunFilter(
            state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType(n) for n in names])
            ),
            expected_start_time=FlowRunFilterExpectedStartTime.model_validate(
                {"before_": now - timedelta(minutes=30)}
            )
            if late
            else None,
            deployment_id=None if late else FlowRunFilterDeploymentId(is_null_=False),
        )

    waiting_filter = in_states("SCHEDULED", "PENDING", late=True)
    running_filter = in_states("RUNNING", "CANCELLING")
    moved: list[str] = []
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(name)
        try:
            deployment_id = client.create_deployment(flow_id, "shifted")
            for i in range(6):
                due: State[Any] = Scheduled(scheduled_time=now - timedelta(hours=2, minutes=i))
                client.create_flow_run_from_deployment(deployment_id, state=due, name=f"late-{i}")
                run = client.create_flow_run_from_deployment(deployment_id, name=f"running-{i}")
                client.set_flow_run_state(run.id, Running(), force=True)
            before = {
                key: client.read_flow_runs(flow_run_filter=f, limit=200)
                for key, f in (("waiting", waiting_filter), ("running", running_filter))
            }
            assert all(len(runs) < 200 for runs in before.values())  # each read here whole

            def on_request(request: Any) -> None:
                move_waiting(request)
                move_running(request)

            move_waiting = move_first_of_page_one(("PENDING", "SCHEDULED"), Running(), moved)
            move_running = move_first_of_page_one(("CANCELLING", "RUNNING"), Completed(), moved)
            read, _ = requests_of(monkeypatch, lambda: read_flow_runs(now, 48, 30), on_request)
            after = {
                key: client.read_flow_runs(flow_run_filter=f, limit=200)
                for key, f in (("waiting", waiting_filter), ("running", running_filter))
            }
            flow_ids = {r.flow_id for runs in [*before.values(), *after.values()] for r in runs}
            flow_names = {
                f.id: f.name
                for f in client.read_flows(
                    flow_filter=FlowFilter(id=FlowFilterId(any_=list(flow_ids)))
                )
            }
        finally:
            client.delete_flow(flow_id)  # its deployments and runs go with it

    assert len(moved) == 2, moved  # one run moved during each read, between its pages
    for key, found in (("waiting", read.waiting), ("running", read.running)):
        stayed = {r.id for r in before[key]} & {r.id for r in after[key]}
        kept = flow_run_pairs([r for r in before[key] if r.id in stayed], flow_names)
        assert len(before[key]) > 2  # more than a page
        missed = kept - {(r.flow, r.name) for r in found}
        assert not missed, (key, missed)
    assert sorted(r.name for r in ours(read.waiting, name)) == [f"late-{i}" for i in range(6)]
    assert len(ours(read.running, name)) >= 5


def test_late_runs_due_at_the_same_moment_are_each_read_once(
    prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiting runs are paged from the last page's latest due time on: five runs a schedule
    made due at the very same moment straddle every page's edge (page of 2), and each is read
    once, none skipped nor twice."""
    from prefect import get_client
    from prefect.states import Scheduled

    from tasks import monitoring

    monkeypatch.setattr(monitoring, "PREFECT_PAGE_SIZE", 2)
    name = f"paylater-test-tied-runs-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    due = now - timedelta(hours=3)
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(name)
        try:
            deployment_id = client.create_deployment(flow_id, "tied")
            for i in range(5):
                client.create_flow_run_from_deployment(
                    deployment_id, state=Scheduled(scheduled_time=due), name=f"tied-{i}"
                )
            waiting = read_flow_runs(now, 48, 30).waiting
        finally:
            client.delete_flow(flow_id)

    assert sorted(r.name for r in ours(waiting, name)) == [f"tied-{i}" for i in range(5)]
    assert measure_late_runs(ours(waiting, name), now, 30).value == 5.0
