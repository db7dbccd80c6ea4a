"""Reading registered versions back (registry/runs.py)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def test_loading_a_version_leaves_no_copy_of_the_model_behind(
    any_registry: str,
    good_candidate: Any,
    register: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # From a tracking server MLflow downloads a model it loads into a temporary folder it never
    # removes: one copy per gate against production, bento import and service start, left in
    # /tmp for good (a local store's files are read where they are).
    from registry.runs import load_booster

    version = register(good_candidate)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    booster = load_booster(version)
    assert booster.num_trees() == good_candidate.booster.num_trees()
    assert sorted(p.name for p in scratch.iterdir()) == []
