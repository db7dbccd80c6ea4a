"""Every alert the system raises has a section in docs/runbook.md, and its alert points there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tasks.monitoring import (
    RUNBOOK,
    THRESHOLD_SETTINGS,
    UNMEASURED_SECTION,
    Measurement,
    Threshold,
    evaluate,
    firing_notice,
    unmeasured_notice,
)

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK_PATH = ROOT / RUNBOOK
RULES = ROOT / "monitoring" / "prometheus-rules.yml"
# Alerts raised outside the monitor's checks and the Prometheus rules: flow runs' on_failure hook
# (tasks/alerts.py alert_on_failure) and the retrain's gate rejection (flows/monthly_retrain.py).
FLOW_ALERTS = ("flow_failure", "gate_rejection")


def anchor(heading: str) -> str:
    """The anchor GitHub (and GitLab, MkDocs) gives a heading: lowercased, punctuation other than
    '-' and '_' dropped, spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings() -> list[str]:
    """The text of every heading of the runbook (fenced code left out)."""
    text = re.sub(r"^```.*?^```", "", RUNBOOK_PATH.read_text(), flags=re.M | re.S)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)]


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_headings_are_unique() -> None:
    anchors = [anchor(h) for h in headings()]
    assert len(anchors) == len(set(anchors)), "two sections would share an anchor"


@pytest.mark.parametrize("check", sorted(THRESHOLD_SETTINGS))
def test_every_monitor_check_has_a_section(check: str) -> None:
    assert check in headings(), f"docs/runbook.md has no '## {check}' section"


@pytest.mark.parametrize("name", FLOW_ALERTS)
def test_flow_failure_and_gate_rejection_have_sections(name: str) -> None:
    assert name in headings(), f"docs/runbook.md has no '## {name}' section"


def test_every_prometheus_alert_has_a_section_and_links_to_it() -> None:
    sections = set(headings())
    anchors = {anchor(h) for h in sections}
    rules = alert_rules()
    assert len(rules) >= 14
    for rule in rules:
        name = rule["alert"]
        assert name in sections, f"docs/runbook.md has no '## {name}' section"
        url = rule["annotations"].get("runbook_url")
        assert url == f"{RUNBOOK}#{anchor(name)}", f"{name}: runbook_url {url!r}"
        assert url.partition("#")[2] in anchors


def test_links_inside_the_runbook_resolve() -> None:
    anchors = {anchor(h) for h in headings()}
    links = re.findall(r"\]\(#([^)]+)\)", RUNBOOK_PATH.read_text())
    assert links and not [link for link in links if link not in anchors]


@pytest.mark.parametrize("check", sorted(THRESHOLD_SETTINGS))
@pytest.mark.parametrize("escalated", [False, True])
def test_a_firing_notice_ends_with_its_runbook_line(check: str, escalated: bool) -> None:
    result = evaluate(Measurement(check, 9.0, "some detail"), Threshold(1.0, 5.0, "jobs"))
    notice = firing_notice(result, escalated=escalated)
    lines = notice.body.splitlines()
    assert lines[0] == result.summary
    assert lines[-1] == f"runbook: docs/runbook.md#{check}"
    assert anchor(check) == check and check in headings()
    # what PagerDuty and the tests rely on is unchanged
    tag = "ESCALATED" if escalated else "FIRING"
    assert notice.subject == f"[{tag}] paylater critical: {check}"
    assert (notice.severity, notice.dedup_key) == ("critical", f"paylater-monitor/{check}")


@pytest.mark.parametrize("check", sorted(THRESHOLD_SETTINGS))
def test_an_unmeasured_notice_ends_with_its_runbook_line(check: str) -> None:
    from datetime import UTC, datetime, timedelta

    result = evaluate(Measurement(check, None, "not readable"), Threshold(1.0, 5.0, "jobs"))
    now = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    notice = unmeasured_notice(result, now - timedelta(minutes=40), now)
    assert notice.body.splitlines()[-1] == "runbook: docs/runbook.md#check_unmeasured"
    assert anchor(UNMEASURED_SECTION) == UNMEASURED_SECTION and UNMEASURED_SECTION in headings()
