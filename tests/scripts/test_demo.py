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
