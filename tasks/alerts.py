"""Alerts: one `notify` for every flow and service, delivered through Prefect notification blocks
(a SlackWebhook for everything, a PagerDutyWebHook for critical alerts) and/or a plain
Slack-compatible webhook URL. Delivery problems are logged, never raised: an alert must not turn
a failure into a different failure.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from paylater.settings import get_settings

log = logging.getLogger("paylater.alerts")

SEVERITIES = ("info", "warning", "error", "critical")
# What apprise (under the Prefect blocks) calls each severity.
_NOTIFY_TYPES = {"info": "info", "warning": "warning", "error": "failure", "critical": "failure"}


def format_alert(subject: str, body: str, severity: str, dedup_key: str | None) -> str:
    """The text a person reads: severity, subject, body, and the dedup key when given."""
    lines = [f"[{severity.upper()}] {subject}", body]
    if dedup_key:
        lines.append(f"dedup_key: {dedup_key}")
    return "\n".join(line for line in lines if line)


def webhook_payload(subject: str, body: str, severity: str, dedup_key: str | None) -> dict:
    """A Slack-compatible JSON body (`text`) that also carries the fields machine readers want."""
    return {
        "text": format_alert(subject, body, severity, dedup_key),
        "subject": subject,
        "body": body,
        "severity": severity,
        "dedup_key": dedup_key,
    }


def _send_block(kind: str, name: str, subject: str, text: str, severity: str) -> bool:
    """Load a Prefect notification block by name and send through it; False on any failure."""
    try:
        from prefect.blocks.notifications import PagerDutyWebHook, SlackWebhook

        block_type: Any = SlackWebhook if kind == "slack" else PagerDutyWebHook
        block = block_type.load(name)
        block.notify_type = _NOTIFY_TYPES.get(severity, "failure")
        with block.raise_on_failure():
            block.notify(body=text, subject=subject)
        return True
    except Exception as exc:
        log.error("alert %r not delivered through %s block %r: %s", subject, kind, name, exc)
        return False


def _post_webhook(url: str, payload: dict) -> bool:
    """POST the payload as JSON; False on any failure."""
    try:
        response = httpx.post(url, json=payload, timeout=10.0)
        response.raise_for_status()
        return True
    except Exception as exc:
        log.error("alert %r not delivered to the webhook: %s", payload["subject"], exc)
        return False


def notify(subject: str, body: str, severity: str = "error", dedup_key: str | None = None) -> bool:
    """Send an alert to every configured channel (critical ones also page). Never raises.

    Returns False when channels were addressed and none accepted the alert (the caller may retry);
    True when one did, or when no channel takes alerts of this severity (nothing to retry).
    """
    if severity not in SEVERITIES:
        log.warning("unknown alert severity %r, sending as error", severity)
        severity = "error"
    settings = get_settings()
    text = format_alert(subject, body, severity, dedup_key)
    sent = addressed = False
    if settings.alert_slack_block:
        addressed = True
        sent |= _send_block("slack", settings.alert_slack_block, subject, text, severity)
    if severity == "critical" and settings.alert_pagerduty_block:
        addressed = True
        sent |= _send_block("pagerduty", settings.alert_pagerduty_block, subject, text, severity)
    if settings.alert_webhook_url:
        addressed = True
        payload = webhook_payload(subject, body, severity, dedup_key)
        sent |= _post_webhook(settings.alert_webhook_url, payload)
    if not (
        settings.alert_slack_block or settings.alert_webhook_url or settings.alert_pagerduty_block
    ):
        log.warning("no alert channel configured; alert was: %s", text)
    elif not sent:
        log.error("alert reached no channel: %s", text)
    return sent or not addressed


def alert_on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect `on_failure` hook: alert that this flow run failed, with its parameters and error."""
    parameters = getattr(flow_run, "parameters", None) or {}
    shown = ", ".join(f"{k}={v}" for k, v in parameters.items())
    message = getattr(state, "message", None) or "no message"
    notify(
        subject=f"Flow run {flow_run.name!r} of {flow.name!r} failed",
        body=f"{message}\nparameters: {shown or '(none)'}\nflow_run_id: {flow_run.id}",
        severity="error",
        dedup_key=f"{flow.name}:{flow_run.id}",
    )
