"""Reproduce a registered version: retrain from its logged dataset, params and seed; compare predictions."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from registry.policy import get_version, resolve_version
from registry.runs import PARAMS_PATH, REPO_ROOT, git_commit, load_booster
from registry.store import MODEL_NAME, RegistryError, client, configure_mlflow
from tasks.training import (
    TrainingParams,
    feature_matrix,
    frozen,
    predict,
    split_out_of_time,
    train_booster,
)


@dataclass(frozen=True)
class ReproduceResult:
    """Whether retraining gave the registered model's predictions exactly."""

    version: str
    dataset_uri: str
    rows_compared: int
    max_abs_diff: float
    identical: bool
    logged_commit: str
    current_commit: str

    def summary(self) -> str:
        """A few lines for the CLI."""
        lines = [
            f"version {self.version}: retrained from {self.dataset_uri}",
            f"{self.rows_compared} OOT-month predictions compared, max |diff| {self.max_abs_diff:.3g}: "
            + ("IDENTICAL" if self.identical else "DIFFERENT"),
        ]
        if self.logged_commit != self.current_commit:
            lines.append(
                f"note: logged at commit {self.logged_commit}, this checkout is {self.current_commit}"
            )
        return "\n".join(lines)


def read_logged_dataset(uri: str, digest: str) -> pa.Table:
    """The dataset Parquet at `uri`, refused unless its sha256 is the logged digest."""
    from tasks.storage import StorageError, open_storage

    root, _, name = uri.rpartition("/")
    try:
        data = open_storage(root).read_bytes(name)
    except StorageError as exc:
        raise RegistryError(f"the logged dataset {uri} cannot be read: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if digest and actual != digest:
        raise RegistryError(f"{uri} has sha256 {actual}, the version logged {digest}: data changed")
    return pq.read_table(io.BytesIO(data))


_AT_COMMIT = "run it with --at-logged-commit"


def _other_code(version: str) -> str:
    """The start of the refusal when this checkout's training code is not the version's."""
    return f"version {version} cannot be retrained by this checkout's code"


def logged_params(version: str, logged: dict[str, object]) -> TrainingParams:
    """The version's logged training params, or RegistryError when this code's params differ
    (a parameter added or removed since): retraining would not be the same training."""
    known = set(TrainingParams.model_fields)
    missing, unknown = sorted(known - set(logged)), sorted(set(logged) - known)
    if missing or unknown:
        raise RegistryError(
            f"{_other_code(version)}: its logged training params lack {missing or '[]'} and have"
            f" {unknown or '[]'} unknown here; {_AT_COMMIT}"
        )
    return TrainingParams.model_validate(logged)


def reproduce(stage_or_version: str) -> ReproduceResult:
    """Retrain version N exactly as logged and check its predictions are bit-for-bit the same."""
    import mlflow.artifacts

    c = client()
    version = resolve_version(stage_or_version, c)
    tags = get_version(c, version).tags or {}
    missing = [
        t for t in ("dataset_uri", "dataset_digest", "feature_names", "as_of") if t not in tags
    ]
    if missing:
        raise RegistryError(f"version {version} lacks lineage tags {missing}: cannot reproduce it")
    table = read_logged_dataset(tags["dataset_uri"], tags["dataset_digest"])
    configure_mlflow()
    run_id = str(get_version(c, version).run_id)
    params = logged_params(
        version, json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{PARAMS_PATH}"))
    )
    features = list(json.loads(tags["feature_names"]))
    try:
        split = split_out_of_time(
            table, features, date.fromisoformat(tags["as_of"]), params.early_stopping_share
        )
    except ValueError as exc:
        raise RegistryError(f"{_other_code(version)}: {exc}; {_AT_COMMIT}") from exc
    retrained = frozen(train_booster(split, params))
    logged = load_booster(version)
    oot_x = feature_matrix(split.oot_rows, features)  # the golden requests are among these rows
    new, old = predict(retrained, oot_x), predict(logged, oot_x)
    identical = bool(np.array_equal(new, old))
    max_diff = float(np.max(np.abs(new - old))) if len(new) else 0.0
    c.set_model_version_tag(
        MODEL_NAME, version, "reproduce_check", "passed" if identical else "failed"
    )
    c.set_model_version_tag(
        MODEL_NAME, version, "reproduce_at", datetime.now(UTC).isoformat(timespec="seconds")
    )
    return ReproduceResult(
        version=version,
        dataset_uri=tags["dataset_uri"],
        rows_compared=len(new),
        max_abs_diff=max_diff,
        identical=identical,
        logged_commit=tags.get("git_commit", "unknown"),
        current_commit=git_commit()[0],
    )


@dataclass(frozen=True)
class CommitRun:
    """`registry reproduce` as run by the code of another commit."""

    commit: str
    dirty: bool
    """The training run's tree had uncommitted changes, which the commit does not hold."""
    exit_code: int
    output: str


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    """A git command in this checkout; a RegistryError naming it if git fails."""
    try:
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise RegistryError(f"git {' '.join(args)} failed: {detail.strip()}") from exc


def reproduce_at_logged_commit(stage_or_version: str) -> CommitRun:
    """Run `registry reproduce` with the code the version was trained with.

    The logged commit is checked out into a temporary, detached git worktree, and the command
    runs there in a child process with this interpreter (so this environment's packages) and the
    same settings, PAYLATER_HOME made absolute. The worktree is removed afterwards, whatever the
    outcome. Uncommitted changes that were in the tree at training time are not reproduced: the
    training run's `git_dirty` tag says whether there were any.
    """
    from paylater.settings import get_settings

    c = client()
    version = resolve_version(stage_or_version, c)
    registered = get_version(c, version)
    tags = registered.tags or {}
    commit = tags.get("git_commit", "unknown")
    if commit == "unknown":
        raise RegistryError(f"version {version} was logged without a git commit")
    try:
        _git("cat-file", "-e", f"{commit}^{{commit}}")
    except RegistryError as exc:
        raise RegistryError(
            f"version {version} was trained at commit {commit}, which this repository "
            f"({REPO_ROOT}) does not have: fetch it first"
        ) from exc
    dirty = c.get_run(str(registered.run_id)).data.tags.get("git_dirty") == "true"
    env = dict(os.environ, PAYLATER_HOME=str(get_settings().home_dir))
    with tempfile.TemporaryDirectory(prefix="paylater-reproduce-") as tmp:
        worktree = Path(tmp) / "checkout"
        _git("worktree", "add", "--detach", "--quiet", str(worktree), commit)
        try:
            # cwd first on sys.path: the worktree's packages, not this checkout's editable install.
            done = subprocess.run(
                [sys.executable, "-m", "paylater.cli", "registry", "reproduce", version],
                cwd=worktree,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            _git("worktree", "remove", "--force", str(worktree))
    return CommitRun(commit, dirty, done.returncode, done.stdout + done.stderr)
