"""Best-effort hand-offs from the registry to serving (bentos.build) and to alerting (tasks.alerts)."""

from __future__ import annotations

import importlib
import importlib.util
import logging

from paylater.settings import get_settings

log = logging.getLogger(__name__)


def build_bento(version: str) -> str:
    """Import `version` into the BentoML model store and build its bento; never raises, says what happened."""
    if not get_settings().registry_build_bento:
        return "skipped: registry_build_bento is false"
    if importlib.util.find_spec("bentos.build") is None:
        return "skipped: bentos.build is not installed"
    try:
        module = importlib.import_module("bentos.build")
        tag = module.import_and_build(version)
    except Exception as exc:  # serving must not undo a registry change that already happened
        log.warning("building the bento of v%s failed: %r", version, exc)
        return f"failed: {exc!r}"
    log.info("built bento %s for v%s", tag, version)
    return f"built {tag}"


def alert(subject: str, body: str, severity: str = "error", dedup_key: str | None = None) -> None:
    """Send an alert through tasks.alerts.notify when it exists; log it otherwise."""
    try:
        module = importlib.import_module("tasks.alerts")
    except ImportError:
        log.warning("tasks.alerts unavailable, alert only logged: %s: %s", subject, body)
        return
    try:
        module.notify(subject, body, severity=severity, dedup_key=dedup_key)
    except Exception as exc:  # notify promises not to raise; this guards the flow if it does
        log.error("alert delivery failed (%r): %s: %s", exc, subject, body)
