"""The Prometheus alert rules parse, and each alert fires on the series meant to raise it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES = Path(__file__).resolve().parents[2] / "monitoring" / "prometheus-rules.yml"
RULE_TESTS = RULES.with_name("prometheus-rules.test.yml")


def test_rules_are_well_formed_and_routed_by_severity() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert {g["name"] for g in groups} == {"paylater-service", "paylater-worker"}
    for rule in alerts:
        assert rule["expr"].strip() and rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
    names = {r["alert"] for r in alerts}
    assert len(names) == len(alerts), "alert names must be unique"
    # the promtool unit tests name only alerts that exist (a renamed alert cannot slip by)
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {t["alertname"] for case in cases for t in case["alert_rule_test"]}
    assert tested <= names and len(tested) >= 10


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool missing (apt-get install prometheus; scripts/ensure_test_tools.sh does it)",
)
def test_promtool_checks_and_unit_tests_pass() -> None:
    check = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        ["promtool", "test", "rules", RULE_TESTS.name],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
