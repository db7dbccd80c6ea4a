"""`registry reproduce`: retraining from the logged dataset, params and seed gives identical predictions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from typer.testing import CliRunner

from paylater.cli import app
from registry.store import MODEL_NAME, client


def test_reproduce_gives_identical_predictions_and_refuses_changed_data(
    registry_home: Path, good_candidate: Any, register: Callable[..., str]
) -> None:
    version = register(good_candidate)
    runner = CliRunner()
    result = runner.invoke(app, ["registry", "reproduce", version])
    assert result.exit_code == 0, result.output
    assert "IDENTICAL" in result.output
    assert client().get_model_version(MODEL_NAME, version).tags["reproduce_check"] == "passed"

    part = Path(urlparse(good_candidate.dataset.uri).path)
    original = part.read_bytes()
    try:
        part.write_bytes(original + b"\0")
        result = runner.invoke(app, ["registry", "reproduce", version])
    finally:
        part.write_bytes(original)
    assert result.exit_code == 1
    assert "data changed" in result.output
