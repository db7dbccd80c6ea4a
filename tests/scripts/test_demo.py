"""scripts/demo.sh, read rather than run (it rebuilds the data stores): what it tells users to run."""

from __future__ import annotations

import re
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.sh"


def printed_commands() -> list[str]:
    """Lines of the script's heredocs (the text it prints) that run a .venv tool."""
    text = DEMO.read_text()
    blocks = re.findall(r"<<TXT\n(.*?)\nTXT", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if ".venv/bin/" in line]


def test_every_printed_paylater_command_names_the_demo_home() -> None:
    """Copied into another shell, a command without PAYLATER_HOME reads ./var: with
    PAYLATER_HOME=/data make demo, 'paylater registry list' showed an empty registry."""
    commands = [line for line in printed_commands() if ".venv/bin/paylater" in line]
    assert commands, "demo.sh prints paylater commands"
    missing = [line.strip() for line in commands if "PAYLATER_HOME=$PAYLATER_HOME" not in line]
    assert missing == []


def test_the_demo_never_writes_to_backends_exported_for_a_real_deployment(tmp_path: Path) -> None:
    """After README's "Running it for real" the shell holds real backend URLs; `make demo` then
    loaded synthetic users into that PostgreSQL and staged a demo candidate in that registry.
    Run in a copy of the script whose .venv tools only record the environment they get."""
    import os
    import stat
    import subprocess

    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "demo.sh").write_text(DEMO.read_text())
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    seen = tmp_path / "seen.env"
    for tool in ("paylater", "python"):
        path = bin_dir / tool
        path.write_text(f'#!/bin/sh\nenv >> "{seen}"\nexit 0\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    real = {
        "PAYLATER_SOURCE_URL": "postgresql://app:pw@prod-db/ops",
        "PAYLATER_WAREHOUSE_URL": "bigquery://prod/analytics",
        "PAYLATER_DATASET_URL": "gs://prod-features/datasets",
        "PAYLATER_WORKER_DATABASE_URL": "postgresql://app:pw@prod-db/queue",
        "MLFLOW_TRACKING_URI": "http://mlflow.prod:5000",
        "PAYLATER_MLFLOW_TRACKING_URI": "http://mlflow.prod:5000",
        "PREFECT_API_URL": "http://prefect.prod:4200/api",
    }
    env = {**os.environ, **real, "PAYLATER_HOME": str(tmp_path / "var")}
    done = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "demo.sh")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    recorded = seen.read_text()
    assert "PAYLATER_HOME=" in recorded  # the tools did run
    leaked = [name for name in real if f"\n{name}=" in f"\n{recorded}"]
    assert leaked == []
    assert "PAYLATER_SOURCE_URL" in done.stdout  # the user is told what was set aside

    seen.unlink()
    kept = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "demo.sh")],
        env={**env, "DEMO_KEEP_BACKENDS": "1"},
        capture_output=True,
        text=True,
    )
    assert kept.returncode == 0, kept.stderr
    assert "PAYLATER_SOURCE_URL=postgresql://app:pw@prod-db/ops" in seen.read_text()  # opted in
