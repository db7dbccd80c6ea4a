"""`paylater registry`: the model registry policy on MLflow."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import typer

app = typer.Typer(
    no_args_is_help=True,
    help="Model registry: list, show, promote, rollback, regate, unlock, history, compare,"
    " reproduce, verify.",
)
T = TypeVar("T")
ACTOR_HELP = "Who is acting (recorded in the history); default $USER."


RETRIES_VARIABLE = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
INTERACTIVE_RETRIES = "2"
"""HTTP retries of a registry command unless MLFLOW_HTTP_REQUEST_MAX_RETRIES says otherwise:
MLflow's default (7, with exponential backoff) keeps a command silent for minutes when the
tracking server cannot be reached; two retries answer in seconds."""


QUIET_RUN_LINKS_VARIABLE = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
"""Set to true for a registry command unless set explicitly: against a tracking server MLflow
prints two "View run/experiment" lines on stdout for every audit entry a transition writes, in
the middle of the command's own output (and of `history --json`, one JSON object per line)."""


@contextmanager
def _interactive_retries() -> Iterator[None]:
    """MLflow's HTTP retries set to INTERACTIVE_RETRIES, and its run links kept off stdout, for
    the block, unless set explicitly."""
    defaults = {RETRIES_VARIABLE: INTERACTIVE_RETRIES, QUIET_RUN_LINKS_VARIABLE: "true"}
    added = [name for name in defaults if name not in os.environ]
    os.environ.update({name: defaults[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


class _Warnings(logging.Handler):
    """The registry's warnings (a stale lock taken over, a lock left unreleased) as `warning:`
    lines on stderr: the person at the terminal must see them, whatever logging is set up."""

    def emit(self, record: logging.LogRecord) -> None:
        """One line per warning."""
        typer.echo(f"warning: {record.getMessage()}", err=True)


@contextmanager
def _shown_warnings() -> Iterator[None]:
    """registry.policy's warnings go to stderr for the block (and only there: not twice)."""
    logger = logging.getLogger("registry.policy")
    handler, propagate = _Warnings(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def _run(action: Callable[[], T]) -> T:
    """Run a registry action; a RegistryError, an invalid setting, or MLflow failing the request
    (unreachable, denied), becomes one clear line on stderr and exit code 1."""
    from mlflow.exceptions import MlflowException
    from pydantic import ValidationError

    from paylater.redaction import redact
    from registry.store import RegistryError, tracking_uri

    try:
        with _interactive_retries(), _shown_warnings():
            return action()
    except RegistryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    except ValidationError as exc:
        from paylater.cli import error_line  # names the environment variable

        typer.echo(f"error: {error_line(exc)}", err=True)
        raise typer.Exit(1) from exc
    except MlflowException as exc:
        # A SQL store's URI keeps its password, and its driver's errors may quote it.
        detail = redact(" ".join(str(exc.message).split()))[:600]
        where = redact(tracking_uri())
        typer.echo(f"error: the MLflow registry at {where} failed: {detail}", err=True)
        raise typer.Exit(1) from exc


def _actor(actor: str | None) -> str:
    """The explicit actor or $USER."""
    from registry.history import default_actor

    return actor or default_actor()


def _when(millis: int | None) -> str:
    """An MLflow millisecond timestamp as ISO UTC."""
    if not millis:
        return ""
    return datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="seconds")


def _metrics(run_id: str | None) -> dict[str, float]:
    """A run's metrics (empty when the run is gone)."""
    from mlflow.exceptions import MlflowException

    from registry.store import client

    if not run_id:
        return {}
    try:
        return dict(client().get_run(run_id).data.metrics)
    except MlflowException:
        return {}


def _run_data(mlflow_client: Any, run_id: str | None) -> Any:
    """A run's data, or None when the version has no run or it was purged (`mlflow gc`)."""
    from mlflow.exceptions import MlflowException

    from registry.store import is_absent

    if not run_id:
        return None
    try:
        return mlflow_client.get_run(run_id).data
    except MlflowException as exc:
        if not is_absent(exc):
            raise  # unreachable or denied: _run says so in one line
        return None


def _print_transitions(transitions: list[Any]) -> None:
    """One line per transition."""
    for t in transitions:
        typer.echo(
            f"v{t.version}: {t.from_stage or '-'} -> {t.to_stage} ({t.action}) by {t.actor}: {t.reason}"
        )


@app.command("list")
def list_versions() -> None:
    """Every version: stage, aliases, OOT AUC/ECE, gate and staging verification."""
    from registry.policy import STAGE_ALIASES, alias_version, all_versions
    from registry.store import client

    def load() -> tuple[dict[str, str | None], list[Any]]:
        c = client()
        return {a: alias_version(c, a) for a in STAGE_ALIASES.values()}, all_versions(c)

    aliases, versions = _run(load)
    typer.echo(
        f"{'version':>7}  {'stage':10} {'alias':10} {'auc':>7} {'ece':>7}  {'gate':8} {'verified':8} created"
    )
    for mv in versions:
        m = _metrics(mv.run_id)
        number = str(mv.version)
        alias = ",".join(a for a, v in aliases.items() if v == number)
        tags = mv.tags or {}
        typer.echo(
            f"{number:>7}  {mv.current_stage:10} {alias:10} {m.get('auc', float('nan')):7.4f} "
            f"{m.get('ece', float('nan')):7.4f}  {tags.get('gate_status', ''):8} "
            f"{tags.get('staging_verification', ''):8} {_when(mv.creation_timestamp)}"
        )


@app.command("show")
def show(
    version: str = typer.Argument(..., help="Version number, or production / staging."),
) -> None:
    """One version: stage, aliases, lineage tags, gate outcome, metrics."""
    from registry.policy import get_version, resolve_version
    from registry.store import client

    def load() -> Any:
        c = client()
        return get_version(c, resolve_version(version, c))

    mv = _run(load)
    typer.echo(
        f"version   {mv.version}\nstage     {mv.current_stage}\naliases   {', '.join(mv.aliases or [])}"
    )
    typer.echo(
        f"created   {_when(mv.creation_timestamp)}\nrun       {mv.run_id}\nsource    {mv.source}"
    )
    for key, value in sorted((mv.tags or {}).items()):
        typer.echo(f"tag       {key} = {value}")
    for key, value in sorted(_metrics(mv.run_id).items()):
        typer.echo(f"metric    {key} = {value:.6f}")


@app.command("promote")
def promote(
    version: str = typer.Argument(..., help="Version number (or staging)."),
    to: str = typer.Option(..., "--to", help="Target stage: production."),
    reason: str = typer.Option(..., "--reason", help="Why (recorded in the history)."),
    actor: str | None = typer.Option(None, "--actor", help=ACTOR_HELP),
    override_gate: bool = typer.Option(
        False, "--override-gate", help="Promote a version the gates rejected (recorded)."
    ),
) -> None:
    """Staging -> Production (needs a passed staging verification); the old production is archived.
    Run again, it finishes a promote that was interrupted, or says there is nothing to change."""
    from registry import policy
    from registry.hooks import build_bento

    changes = _run(
        lambda: policy.promote(version, to, reason, _actor(actor), override_gate=override_gate)
    )
    if not changes:
        number = _run(lambda: policy.resolve_version(version))  # `production` names it too
        typer.echo(f"v{number} is already in production: nothing changed")
        return
    _print_transitions(changes)
    serving = _in_production(changes)
    typer.echo(f"bento: {build_bento(serving)}")
    typer.echo(_restart_hint(serving))


@app.command("regate")
def regate(
    version: str = typer.Argument(..., help="Version number (or staging)."),
    actor: str | None = typer.Option(None, "--actor", help=ACTOR_HELP),
) -> None:
    """Judge a version's gates again against today's production, on its own out-of-time month
    (what promote asks for when production changed after the version was gated)."""
    from registry.regate import regate as run_regate

    number, decision = _run(lambda: run_regate(version, _actor(actor)))
    against = decision.production_version
    verdict = "PASSED" if decision.passed else "REJECTED"
    typer.echo(f"v{number} against production {f'v{against}' if against else '(none)'}: {verdict}")
    for key, value in sorted(decision.checks.items()):
        typer.echo(f"  {key:16} {value:.6f}")
    for reason in decision.reasons:
        typer.echo(f"  - {reason}")
    if not decision.passed:
        raise typer.Exit(1)


@app.command("unlock")
def unlock(
    reason: str = typer.Option(..., "--reason", help="Why (kept on the registered model)."),
    actor: str | None = typer.Option(None, "--actor", help=ACTOR_HELP),
) -> None:
    """Break the transition lock a promote, rollback or staging left when its process died or
    the tracking server failed under it (one older than PAYLATER_REGISTRY_LOCK_STALE_SECONDS,
    5 minutes by default, is taken over by itself)."""
    from registry import policy

    held = _run(lambda: policy.unlock(reason, _actor(actor)))
    if held is None:
        typer.echo("no transition lock is held: nothing changed")
        return
    typer.echo(
        f"broke the transition lock held by {held}; a transition still running stops at its"
        " next step. Check `paylater registry list` and `history`: run again the promote or"
        " rollback that was interrupted, it finishes what was left"
    )


@app.command("rollback")
def rollback(
    reason: str = typer.Option(..., "--reason", help="Why (recorded in the history)."),
    actor: str | None = typer.Option(None, "--actor", help=ACTOR_HELP),
) -> None:
    """Restore the most recent earlier production version; archive the current one."""
    from registry import policy
    from registry.hooks import build_bento

    changes = _run(lambda: policy.rollback(reason, _actor(actor)))
    _print_transitions(changes)
    serving = _in_production(changes)
    typer.echo(f"bento: {build_bento(serving)}")
    typer.echo(_restart_hint(serving))


def _in_production(changes: list[Any]) -> str:
    """The version a promote or rollback left in production (its changes may only archive, when
    they finish one that was interrupted)."""
    from registry.policy import resolve_version

    moved = [t.version for t in changes if t.to_stage == "Production"]
    return moved[0] if moved else _run(lambda: resolve_version("production"))


def _restart_hint(version: str) -> str:
    """What serves the new production version: a service loads its model at start only; an
    in-process worker scoring `production` follows the alias."""
    return (
        f"serving: in-process workers scoring 'production' switch to v{version} within a minute; "
        f"running services keep the version they loaded: restart them to serve v{version} "
        f"(bentoml serve paylater-scorer:{version} or bentos.service:PaylaterScorer)"
    )


@app.command("history")
def show_history(
    version: str | None = typer.Option(None, "--version", help="Only this version."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
) -> None:
    """Every transition: version, from, to, who, when, why (kept in the MLflow backend)."""
    from registry import history
    from registry.policy import all_versions, get_version
    from registry.store import RegistryError, client, normalise_version

    def load() -> tuple[list[history.Transition], list[str]]:
        c = client()
        if version is None:
            entries = history.read(c)
            return entries, _stages_moved_outside(entries, all_versions(c))
        if not version.strip().isdigit():
            raise RegistryError(f"not a version number: {version!r}")
        entries = history.read(c, normalise_version(version))
        try:
            mv = get_version(c, version)
        except RegistryError as exc:
            if entries:
                return entries, []  # deleted since: its history is all there is
            raise RegistryError(f"{exc}, and no history of one") from None
        return entries, _stages_moved_outside(entries, [mv])

    entries, moved = _run(load)
    for warning in moved:
        typer.echo(f"warning: {warning}", err=True)
    for e in entries:
        if as_json:
            typer.echo(json.dumps(e.as_dict()))
        else:
            typer.echo(
                f"{e.at}  v{e.version:<4} {e.from_stage or '-':10} -> {e.to_stage:10} "
                f"{e.action:9} {e.actor:16} {e.reason}"
            )


def _stages_moved_outside(entries: list[Any], versions: list[Any]) -> list[str]:
    """One line per version whose stage is not the one its last recorded transition left it in:
    the MLflow UI changes stages without writing history, so the entries alone would mislead."""
    from registry.policy import RECORDED_ONLY

    # A verify or regate entry records the stage it found, maybe one set by hand: not evidence.
    last = {e.version: e.to_stage for e in entries if e.action not in RECORDED_ONLY}
    said = []
    for mv in sorted(versions, key=lambda mv: int(mv.version)):
        number, stage = str(mv.version), str(mv.current_stage or "None")
        if number in last and last[number] != stage:
            said.append(
                f"v{number} is in {stage}, but its last recorded transition left it in"
                f" {last[number]}: its stage was changed outside paylater (the MLflow UI),"
                " which records nothing"
            )
    return said


@app.command("compare")
def compare(
    a: str = typer.Argument(..., help="First version (or production / staging)."),
    b: str = typer.Argument(..., help="Second version (or production / staging)."),
) -> None:
    """Two versions side by side: metrics, params, lineage and feature sets."""
    from registry.policy import get_version, resolve_version
    from registry.store import client

    def load() -> tuple[Any, Any, list[Any]]:
        c = client()
        va = get_version(c, resolve_version(a, c))
        vb = get_version(c, resolve_version(b, c))
        return va, vb, [_run_data(c, mv.run_id) for mv in (va, vb)]

    va, vb, runs = _run(load)
    typer.echo(f"{'':28} {'v' + str(va.version):>24} {'v' + str(vb.version):>24}")
    typer.echo(f"{'stage':28} {va.current_stage:>24} {vb.current_stage:>24}")
    ma, mb = (r.metrics if r else {} for r in runs)
    for key in sorted(set(ma) | set(mb)):
        x, y = ma.get(key), mb.get(key)
        delta = f"{y - x:+.4f}" if x is not None and y is not None else ""
        typer.echo(
            f"{key:28} {x if x is not None else '-':>24} {y if y is not None else '-':>24} {delta}"
        )
    pa_, pb = (r.params if r else {} for r in runs)
    for key in sorted(k for k in set(pa_) | set(pb) if pa_.get(k) != pb.get(k)):
        typer.echo(f"param {key:22} {pa_.get(key, '-'):>24} {pb.get(key, '-'):>24}")
    ta, tb = va.tags or {}, vb.tags or {}
    for key in ("dataset_digest", "feature_sql_hash", "git_commit", "as_of", "issue"):
        same = "same" if ta.get(key) == tb.get(key) else "DIFFERENT"
        typer.echo(
            f"{key:28} {str(ta.get(key, '-'))[:24]:>24} {str(tb.get(key, '-'))[:24]:>24} {same}"
        )
    fa = set(json.loads(ta.get("feature_names", "[]")))
    fb = set(json.loads(tb.get("feature_names", "[]")))
    typer.echo(
        f"features only in v{va.version}: {sorted(fa - fb) or '-'}; only in v{vb.version}: {sorted(fb - fa) or '-'}"
    )


@app.command("reproduce")
def reproduce(
    version: str = typer.Argument(..., help="Version number (or production / staging)."),
    at_logged_commit: bool = typer.Option(
        False,
        "--at-logged-commit",
        help="Retrain with the code of the commit the version was trained at (a temporary git "
        "worktree), not this checkout's.",
    ),
) -> None:
    """Retrain from the logged dataset, params and seed; exit 1 unless predictions match exactly."""
    from registry.reproduce import reproduce as run_reproduce
    from registry.reproduce import reproduce_at_logged_commit

    if at_logged_commit:
        ran = _run(lambda: reproduce_at_logged_commit(version))
        typer.echo(f"with the code of commit {ran.commit}:")
        if ran.dirty:
            typer.echo(
                "warning: the training run had uncommitted changes, which this does not hold"
            )
        typer.echo(ran.output.rstrip())
        if ran.exit_code != 0:
            raise typer.Exit(1)
        return
    result = _run(lambda: run_reproduce(version))
    typer.echo(result.summary())
    if not result.identical:
        raise typer.Exit(1)


@app.command("verify")
def verify(
    url: str = typer.Option(
        ...,
        "--url",
        help="Base URL of the served bento, e.g. http://127.0.0.1:3000 (user:password@ in it is"
        " sent as basic authentication, and never shown or recorded).",
    ),
    stage: str | None = typer.Option(None, "--stage", help="staging or production."),
    version: str | None = typer.Option(
        None, "--version", help="A version number instead of a stage."
    ),
    token: str | None = typer.Option(
        None, "--token", envvar="PAYLATER_API_TOKEN", help="Bearer token."
    ),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds per request."),
    ready_timeout: float = typer.Option(
        60.0,
        "--ready-timeout",
        help="Seconds to wait for the service's /readyz first (0: do not wait).",
    ),
    actor: str | None = typer.Option(None, "--actor", help=ACTOR_HELP),
) -> None:
    """Wait for the service to be ready, replay the version's golden requests against
    {url}/v2/score; record passed/failed on the version."""
    from registry.store import RegistryError
    from registry.verification import verify as run_verify

    def check() -> Any:
        if (stage is None) == (version is None):
            raise RegistryError("give exactly one of --stage or --version")
        return run_verify(
            str(stage or version),
            url,
            _actor(actor),
            token=token,
            timeout=timeout,
            ready_timeout=ready_timeout,
        )

    result = _run(check)
    typer.echo(f"v{result.version} against {result.url}: {'PASSED' if result.passed else 'FAILED'}")
    typer.echo(result.detail())
    if not result.passed:
        raise typer.Exit(1)
