"""Alerts: one `notify` for every flow and service. Chat channels (a Prefect SlackWebhook block,
a plain Slack-compatible webhook URL) get every alert; PagerDuty gets critical ones through the
Events API v2, with the caller's dedup key, and a "resolve" when the caller says the incident
cleared. Delivery problems are logged, never raised: an alert must not turn a failure into a
different failure.

No channel's secret reaches a log record, whatever the level: the libraries a delivery goes
through quote its URL (apprise the Slack block's at DEBUG, urllib3 its path, httpx every URL at
INFO), so their loggers carry a filter masking every secret this module has handled (see
hide_in_logs).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from paylater.redaction import origin, redact, scrub
from paylater.settings import Settings, get_settings

log = logging.getLogger("paylater.alerts")

SEVERITIES = ("info", "warning", "error", "critical")
# What apprise (under the Prefect blocks) calls each severity.
_NOTIFY_TYPES = {"info": "info", "warning": "warning", "error": "failure", "critical": "failure"}
PAGERDUTY_SOURCE = "paylater-risk"
_PAGERDUTY_US = Settings.model_fields["alert_pagerduty_events_url"].default
_PAGERDUTY_EU = "https://events.eu.pagerduty.com/v2/enqueue"
DELIVERY_DEADLINE_SECONDS = 20.0
"""The most one delivery (a Slack block, the webhook, a PagerDuty event) or one load of a block
from the Prefect API (the Slack block, the routing key's) may take, whole. The
clients' timeouts bound each read, not the answer: a receiver that keeps sending a byte at a time
would otherwise hold the caller (the monitor, inside its incident transaction) indefinitely."""

_T = TypeVar("_T")

QUOTING_LOGGERS = (
    "apprise",
    "urllib3.connectionpool",
    "urllib3.connection",
    "urllib3.poolmanager",
    "urllib3.response",
    "urllib3.util.retry",
    "httpx",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
)
"""The loggers of the libraries an alert goes through (apprise and the requests/urllib3 under it
for a Slack block; httpx and httpcore for the webhook, the heartbeat and PagerDuty). A logger's
filter sees only the records logged on it, not its children's: each is named."""
SHORTEST_SECRET_PATH = 8
"""A URL path shorter than this ('/', '/hook') holds no token, and masked it would hide ordinary
words of unrelated records ('/api' in every Prefect request httpx logs)."""

_secrets: frozenset[str] = frozenset()
_secrets_lock = threading.Lock()


def hide_in_logs(*secrets: str | None) -> None:
    """Mask each secret (a routing key, a webhook's URL: whole, its path and its password) in
    every record of QUOTING_LOGGERS from now on, for the life of the process: a delivery left
    running past its deadline may still log once it ends."""
    forms: set[str] = set()
    for secret in filter(None, secrets):
        forms.add(secret)
        try:
            parts = urlsplit(secret)
        except ValueError:
            continue
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        if parts.netloc and len(parts.path) >= SHORTEST_SECRET_PATH:
            forms |= {path, parts.path}  # urllib3 logs the path alone
        if parts.netloc and parts.password:
            forms.add(parts.password)
    global _secrets
    with _secrets_lock:
        _secrets = _secrets | forms


class SecretsFilter(logging.Filter):
    """Rewrites a record (message, traceback, stack) with the known secrets and any credential
    redact recognises masked; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask the record in place; always keep it."""
        secrets = _secrets
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: what the handler would print is msg and args
            message = f"{record.msg} {record.args!r}"
        clean = scrub(message, *secrets)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            clean = scrub(text, *secrets)
            if clean != text:  # formatters print exc_text; some format exc_info anew
                record.exc_text, record.exc_info = clean, None
        if record.stack_info:
            record.stack_info = scrub(record.stack_info, *secrets)
        return True


_SECRETS_FILTER = SecretsFilter()


def filter_quoting_loggers() -> None:
    """Put the secrets filter on every logger of QUOTING_LOGGERS (once each)."""
    for name in QUOTING_LOGGERS:
        logger = logging.getLogger(name)
        if _SECRETS_FILTER not in logger.filters:
            logger.addFilter(_SECRETS_FILTER)


filter_quoting_loggers()


@contextmanager
def _held_back(logger: logging.Logger) -> Iterator[None]:
    """Hold back the records this thread logs on `logger` meanwhile, then let them through: the
    secrets filter then masks the secrets that became known meanwhile."""
    held: list[logging.LogRecord] = []
    me = threading.get_ident()

    def hold(record: logging.LogRecord) -> bool:
        if record.thread == me:
            held.append(record)
            return False
        return True

    logger.addFilter(hold)
    try:
        yield
    finally:
        logger.removeFilter(hold)
        for record in held:
            logger.handle(record)


class DeliveryTimeout(Exception):
    """A receiver did not finish answering within DELIVERY_DEADLINE_SECONDS (or was not tried:
    it timed out earlier in the same delivery pass, or the pass's budget is spent)."""


@dataclass
class _Pass:
    """One delivery pass: the moment its budget runs out, and the channels that timed out in it."""

    ends: float  # time.monotonic()
    timed_out: set[str] = field(default_factory=set)


_PASS: ContextVar[_Pass | None] = ContextVar("paylater_delivery_pass", default=None)


@contextmanager
def delivery_pass(budget_seconds: float) -> Iterator[None]:
    """Within it (one monitor pass), deliveries share `budget_seconds`, and a channel that timed
    out is not waited on again: a receiver that accepts and never answers would otherwise cost
    one deadline per notice, the pass's incident locks held meanwhile. What is not tried fails
    as a timeout (the notice undelivered, so the next pass resends it)."""
    token = _PASS.set(_Pass(time.monotonic() + budget_seconds))
    try:
        yield
    finally:
        _PASS.reset(token)


def _within_deadline(what: str, call: Callable[[], _T]) -> _T:
    """`call()`, or DeliveryTimeout once the deadline passes (the call is left to end on its own,
    in a daemon thread, when the receiver or the client's own timeout gives up).

    Inside a delivery_pass, `what` (the channel) is not tried again once it timed out, and
    nothing is tried once the pass's budget is spent."""
    seconds = DELIVERY_DEADLINE_SECONDS
    current = _PASS.get()
    if current is not None:
        if what in current.timed_out:
            raise DeliveryTimeout(f"{what} not tried: it did not answer earlier in this pass")
        left = current.ends - time.monotonic()
        if left <= 0:
            raise DeliveryTimeout(f"{what} not tried: this pass's delivery budget is spent")
        seconds = min(seconds, left)
    outcome: dict[str, Any] = {}
    settings = _prefect_settings()

    def run() -> None:
        try:
            # The caller's Prefect settings (the API's URL), without its run context: inside an
            # async flow's run, Prefect hands back coroutines from a block's load and notify.
            with settings:
                outcome["value"] = call()
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"alert delivery: {what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        if current is not None:
            current.timed_out.add(what)
        raise DeliveryTimeout(f"{what} did not answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _prefect_settings() -> Any:
    """A fresh context of the Prefect settings in force here, to enter in another thread (a
    thread starts without the caller's context variables)."""
    from prefect.context import SettingsContext, get_settings_context

    current = get_settings_context()
    return SettingsContext(profile=current.profile, settings=current.settings)


@dataclass(frozen=True)
class Page:
    """What became of one PagerDuty event: accepted, or why not and whether a resend may succeed."""

    accepted: bool
    retryable: bool = False
    problem: str = ""


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


def _send_slack(name: str, subject: str, text: str, severity: str) -> bool:
    """Load a Prefect SlackWebhook block by name and send through it; False on any failure."""
    block: Any = None
    try:
        # Loaded within the deadline too: a Prefect API that accepts and never answers held each
        # load for the client's timeouts and retries (7 minutes), the monitor's transaction open.
        block = _within_deadline("the Prefect API", lambda: _load_slack_block(name))
        block.notify_type = _NOTIFY_TYPES.get(severity, "failure")

        def send() -> None:
            with block.raise_on_failure():
                block.notify(body=text, subject=subject)

        _within_deadline(f"Slack block {name!r}", send)
        return True
    except Exception as exc:
        # apprise's error may quote the block's URL, whose path is the hook's token.
        url = getattr(getattr(block, "url", None), "get_secret_value", lambda: None)()
        problem = scrub(str(exc), url) + ("" if block else " (loading the block)")
        log.error("alert %r not delivered through Slack block %r: %s", subject, name, problem)
        return False


def _load_slack_block(name: str) -> Any:
    """The SlackWebhook block `name`, its URL hidden in logs from then on."""
    from prefect.blocks.notifications import SlackWebhook

    # apprise logs the URL as the block loads: held back until it is known, then masked.
    with _held_back(logging.getLogger("apprise")):
        block: Any = SlackWebhook.load(name)
        hide_in_logs(block.url.get_secret_value())
    return block


def _refused(what: str, url: str, send: Callable[[], httpx.Response]) -> str | None:
    """`send()` within the delivery deadline: None when the receiver accepted, else what went
    wrong (the URL's path scrubbed from it: a webhook's or a heartbeat check's secret)."""
    hide_in_logs(url)
    try:
        response = _within_deadline(what, send)
    except Exception as exc:
        return scrub(f"{type(exc).__name__}: {exc}", url)
    if not response.is_success:
        return scrub(f"answered {response.status_code} {response.text[:200]}", url)
    return None


def _post_webhook(url: str, payload: dict) -> bool:
    """POST the payload as JSON; False on any failure, logged naming the setting (never the
    URL's path, which is the webhook's secret)."""
    problem = _refused("the webhook", url, lambda: httpx.post(url, json=payload, timeout=10.0))
    if problem:
        where = f"the webhook PAYLATER_ALERT_WEBHOOK_URL ({origin(url)})"
        log.error("alert %r not delivered to %s: %s", payload["subject"], where, problem)
    return problem is None


def heartbeat(url: str) -> bool:
    """GET the dead-man's switch `url`; False on any failure, logged naming the setting (never
    the URL's path, which holds the check's key)."""
    problem = _refused("the heartbeat", url, lambda: httpx.get(url, timeout=10.0))
    if problem:
        where = f"the heartbeat PAYLATER_MONITOR_HEARTBEAT_URL ({origin(url)})"
        log.error("heartbeat not delivered to %s: %s", where, problem)
    return problem is None


def pagerduty_configured(settings: Settings) -> bool:
    """Whether any source of a PagerDuty routing key is set."""
    return bool(
        settings.alert_pagerduty_routing_key_block
        or settings.alert_pagerduty_routing_key
        or settings.alert_pagerduty_block
    )


class _NoRoutingKey(Exception):
    """The routing key could not be had; `retryable` when a later attempt may get it."""

    def __init__(self, problem: str, retryable: bool) -> None:
        super().__init__(problem)
        self.retryable = retryable


def _routing_key(settings: Settings) -> tuple[str, str]:
    """The routing key and the endpoint: a Secret block, else the environment, else an old block."""
    url = settings.alert_pagerduty_events_url
    if settings.alert_pagerduty_routing_key_block:
        name = settings.alert_pagerduty_routing_key_block
        value = _load_block("Secret", name).get()
        if not isinstance(value, str) or not value.strip():
            raise _NoRoutingKey(f"Secret block {name!r} holds no routing key", retryable=False)
        return value.strip(), url
    if settings.alert_pagerduty_routing_key:
        return settings.alert_pagerduty_routing_key.get_secret_value(), url
    # An older PagerDutyWebHook block: apprise sent its integration key as the routing key.
    block = _load_block("PagerDutyWebHook", settings.alert_pagerduty_block or "")
    if block.region_name == "eu" and url == _PAGERDUTY_US:
        url = _PAGERDUTY_EU  # the old block knew the account's region; keep honouring it
    return block.integration_key.get_secret_value(), url


def _load_block(kind: str, name: str) -> Any:
    """Load a Secret or PagerDutyWebHook block; a missing one is a configuration error."""
    from prefect.blocks.notifications import PagerDutyWebHook
    from prefect.blocks.system import Secret

    block_type: Any = Secret if kind == "Secret" else PagerDutyWebHook
    try:
        return block_type.load(name)
    except ValueError as exc:  # Prefect's "Unable to find block document named …"
        raise _NoRoutingKey(f"{kind} block {name!r} not found ({exc})", retryable=False) from exc
    except Exception as exc:  # the Prefect API unreachable: a later run may load it
        raise _NoRoutingKey(f"{kind} block {name!r} not loaded ({exc!r})", retryable=True) from exc


def pagerduty_event(
    routing_key: str, action: str, subject: str, body: str, dedup_key: str | None
) -> dict[str, Any]:
    """An Events API v2 event: a critical trigger, or a resolve of the incident under dedup_key."""
    event: dict[str, Any] = {"routing_key": routing_key, "event_action": action}
    if dedup_key:
        event["dedup_key"] = dedup_key
    if action == "trigger":
        event["client"] = PAGERDUTY_SOURCE
        event["payload"] = {
            "summary": subject[:1024],  # PagerDuty's limit
            "source": PAGERDUTY_SOURCE,
            "severity": "critical",
            "custom_details": {"body": body},
        }
    return event


def _pagerduty_error(response: httpx.Response) -> str:
    """PagerDuty's own words for a refused event (message and errors), else the raw answer."""
    try:
        answer = response.json()
        words = [answer.get("status"), answer.get("message"), *(answer.get("errors") or [])]
        return "; ".join(str(w) for w in words if w)
    except Exception:
        return response.text[:300]


def send_page(
    settings: Settings, action: str, subject: str, body: str, dedup_key: str | None
) -> Page:
    """Send one event to PagerDuty; 429, 5xx and an unreachable endpoint are retryable."""

    def load() -> tuple[str, str]:
        # An old PagerDutyWebHook block loads apprise, which logs its URL (key masked, today).
        with _held_back(logging.getLogger("apprise")):
            routing_key, url = _routing_key(settings)
            hide_in_logs(routing_key)
        return routing_key, url

    # A key from the environment needs no API: a Prefect API that timed out earlier in the
    # pass (loading the Slack block) must not keep it from paging.
    from_block = bool(
        settings.alert_pagerduty_routing_key_block or not settings.alert_pagerduty_routing_key
    )
    try:
        # A block is loaded through the Prefect API: within the deadline, as for Slack's.
        routing_key, url = _within_deadline("the Prefect API", load) if from_block else load()
    except _NoRoutingKey as exc:
        # The Prefect API's error may quote its URL (a proxy's user:password included).
        return Page(False, exc.retryable, redact(f"no PagerDuty routing key: {exc}"))
    except DeliveryTimeout as exc:
        return Page(False, True, f"no PagerDuty routing key: {exc} (loading its block)")
    event = pagerduty_event(routing_key, action, subject, body, dedup_key)
    try:
        response = _within_deadline("PagerDuty", lambda: httpx.post(url, json=event, timeout=10.0))
    # A typo a resend cannot mend: a bad URL (not an HTTPError), or no http(s):// scheme (an
    # HTTPError, which a network outage is too: taken for one, it was resent every run for good).
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        problem = f"PAYLATER_ALERT_PAGERDUTY_EVENTS_URL {redact(url)!r} is invalid: {exc}"
        return Page(False, False, scrub(problem, routing_key))
    except httpx.HTTPError as exc:
        problem = f"PagerDuty not reached at {redact(url)}: {exc!r}"
        return Page(False, True, scrub(problem, routing_key))
    except DeliveryTimeout as exc:
        return Page(False, True, f"{exc} at {redact(url)}")
    if response.is_success:  # 202 Accepted
        return Page(True)
    status = response.status_code
    retryable = status == 429 or status >= 500
    # A receiver may echo the event (a proxy's error page): its routing key must not be shown.
    problem = f"PagerDuty answered {status}: {_pagerduty_error(response)}"
    return Page(False, retryable, scrub(problem, routing_key))


def notify(
    subject: str,
    body: str,
    severity: str = "error",
    dedup_key: str | None = None,
    resolve: bool = False,
    retried: bool = False,
) -> bool:
    """Send an alert to every configured channel (critical ones also page). Never raises.

    `resolve` (with `dedup_key`) also resolves the PagerDuty incident under that key. When
    PagerDuty is configured, a page is delivered only if PagerDuty accepted it; chat channels
    are told after it, and when the caller resends refused alerts (`retried`, as the monitor
    does) they are not told at all while the refusal is retryable, so they hear it once.
    Returns False when the alert should be sent again: a retryable page refusal, or (when it did
    not page) channels addressed and none accepted; True otherwise, including a page PagerDuty
    accepted while chat is down and nothing configured for it.
    """
    if severity not in SEVERITIES:
        log.warning("unknown alert severity %r, sending as error", severity)
        severity = "error"
    # Alert text quotes errors (a flow's, a check's reason) that may hold a database URL with its
    # password: Slack, PagerDuty and the log get the host and the reason, never the secret.
    subject, body = redact(subject), redact(body)
    settings = _alert_settings()
    if settings is None:
        log.error(
            "alert not sent (no channel readable): %s",
            format_alert(subject, body, severity, dedup_key),
        )
        return False
    if pagerduty_configured(settings) and (severity == "critical" or (resolve and dedup_key)):
        action = "resolve" if resolve else "trigger"
        page = send_page(settings, action, subject, body, dedup_key)
        if page.accepted:
            # Delivered: PagerDuty now holds the incident under dedup_key, so the caller must
            # record it even if chat is down, or its resolve would never be sent (or a resolved
            # page would be taken for an open one). A chat failure is logged by _tell_chat.
            _tell_chat(settings, subject, body, severity, dedup_key)
            return True
        if page.retryable and retried:
            log.error("alert %r not paged (%s): held back, next run retries", subject, page.problem)
            return False
        # Refused for good (400, no key) or not held back: the chat channels must say so.
        flag = "PAGE NOT RESOLVED" if resolve else "NOT PAGED"
        log.error("alert %r %s (%s): %s", subject, flag, dedup_key, page.problem)
        body = f"{body}\n{flag}: {page.problem}"
        return _tell_chat(settings, subject, body, severity, dedup_key) and not page.retryable
    return _tell_chat(settings, subject, body, severity, dedup_key)


def _alert_settings() -> Settings | None:
    """The settings; when some are invalid, those at their defaults (None if that fails too).

    An invalid PAYLATER_ setting fails every flow, and each flow's alert read the same settings:
    it raised in the hook, and the failure most likely to stop everything reached no one.
    """
    try:
        return get_settings()
    except ValidationError as exc:
        invalid = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
        log.error(
            "alerting with %s at their defaults: they are invalid", ", ".join(sorted(invalid))
        )
        fields = Settings.model_fields
        try:
            return Settings(
                **{
                    name: fields[name].get_default(call_default_factory=True)
                    for name in invalid
                    if name in fields
                }
            )
        except ValidationError:  # a check across settings: no field to put back to its default
            return None


def _tell_chat(
    settings: Settings, subject: str, body: str, severity: str, dedup_key: str | None
) -> bool:
    """Slack block and plain webhook; False when one was addressed and none accepted."""
    text = format_alert(subject, body, severity, dedup_key)
    sent = addressed = False
    if settings.alert_slack_block:
        addressed = True
        sent |= _send_slack(settings.alert_slack_block, subject, text, severity)
    if settings.alert_webhook_url:
        addressed = True
        payload = webhook_payload(subject, body, severity, dedup_key)
        sent |= _post_webhook(settings.alert_webhook_url, payload)
    if not (addressed or pagerduty_configured(settings)):
        log.warning("no alert channel configured; alert was: %s", text)
    elif not addressed and severity != "critical":
        # PagerDuty takes critical alerts only: this one would otherwise vanish without a trace.
        log.warning(
            "alert reached no chat channel (PagerDuty takes critical alerts only; set"
            " PAYLATER_ALERT_SLACK_BLOCK or PAYLATER_ALERT_WEBHOOK_URL): %s",
            text,
        )
    elif addressed and not sent:
        log.error("alert reached no chat channel: %s", text)
    return sent or not addressed


_ALERTED_BY_CALLER: ContextVar[bool] = ContextVar("paylater_alerted_by_caller", default=False)


@contextmanager
def alerted_by_caller() -> Iterator[None]:
    """Within it, a failing subflow's alert_on_failure stays quiet: the calling flow fails with
    that failure and its own hook alerts once for both (naming the subflow's run)."""
    token = _ALERTED_BY_CALLER.set(True)
    try:
        yield
    finally:
        _ALERTED_BY_CALLER.reset(token)


def root_cause(state: Any) -> str:
    """The exception a failed state holds, as `Type: message` plus its notes; else its message.

    Prefect's state message wraps it ("Flow run encountered an exception: ..."), and a flow that
    re-raises a subflow's error would nest one wrapper in another.
    """
    try:
        # _sync: inside an async flow's hook (an event loop running) Prefect would hand back a
        # coroutine instead, never awaited, and the alert fell back to the wrapper's text.
        exc = state.result(raise_on_failure=False, _sync=True)
    except Exception:  # a result that cannot be read back: the message still says something
        exc = None
    if not isinstance(exc, BaseException):
        return getattr(state, "message", None) or "no message"
    notes = getattr(exc, "__notes__", None) or []
    return "\n".join([f"{type(exc).__name__}: {exc}", *map(str, notes)])


def _deployment_name(deployment_id: Any) -> str:
    """'flow/deployment' of a deployment run, read from the Prefect API; its id if unreadable."""

    def read() -> str:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            deployment = client.read_deployment(deployment_id)
            flow = client.read_flow(deployment.flow_id)
        return f"{flow.name}/{deployment.name}"

    try:
        return _within_deadline("the Prefect API", read)
    except Exception as exc:  # an alert must not fail on the lookup: the id still leads there
        # The Prefect client's error quotes the API's URL, a proxy's user:password included.
        log.warning("deployment %s not read for the alert: %s", deployment_id, redact(repr(exc)))
        return f"id {deployment_id}"


def _shown_parameters(flow_run: Any) -> str:
    """The run's parameters, and the day a defaulted `as_of` stood for (the run's start's)."""
    parameters = dict(getattr(flow_run, "parameters", None) or {})
    shown = ", ".join(f"{k}={v}" for k, v in parameters.items()) or "(none)"
    started = getattr(flow_run, "start_time", None) or getattr(
        flow_run, "expected_start_time", None
    )
    if "as_of" in parameters and parameters["as_of"] is None and started is not None:
        from paylater.timeutil import default_as_of

        try:
            day = default_as_of(started)
        except ValidationError:  # the time zone setting invalid: the error body says so
            return shown
        shown += f" (as_of defaulted to {day}, the day before the run started)"
    return shown


def alert_on_failure(flow: Any, flow_run: Any, state: Any) -> None:
    """Prefect `on_failure` hook: alert that this flow run failed, naming its deployment, its
    parameters and the root cause; quiet for a subflow whose caller alerts (alerted_by_caller)."""
    if getattr(flow_run, "parent_task_run_id", None) and _ALERTED_BY_CALLER.get():
        log.info("%s run %s failed: its calling flow run alerts for it", flow.name, flow_run.id)
        return
    deployment_id = getattr(flow_run, "deployment_id", None)
    deployment = _deployment_name(deployment_id) if deployment_id else "none (not a deployment run)"
    notify(
        subject=f"Flow run {flow_run.name!r} of {flow.name!r} failed",
        body=(
            f"{root_cause(state)}\ndeployment: {deployment}\n"
            f"parameters: {_shown_parameters(flow_run)}\nflow_run_id: {flow_run.id}\n"
            "runbook: docs/runbook.md#flow_failure"
        ),
        severity="error",
        dedup_key=f"{flow.name}:{flow_run.id}",
    )
