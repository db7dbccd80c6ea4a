"""Alerts reach real local HTTP receivers: a Prefect SlackWebhook block, a plain webhook, and a
stand-in for PagerDuty's Events API v2 (the endpoint is a setting, so it points at loopback here).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from pydantic import SecretStr

from tasks.alerts import alert_on_failure, notify

QUICK_SHUTDOWN = {"poll_interval": 0.05}
"""serve_forever's default 0.5 s poll made every server's shutdown() wait up to 0.5 s."""


class Receiver:
    """A loopback HTTP server on a free port that records every JSON body POSTed to it."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict] = []
        self.status = status
        self.answer = b"ok"
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.bodies.append({"path": self.path, **json.loads(self.rfile.read(length))})
                self.send_response(received.status)
                self.end_headers()
                self.wfile.write(received.answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs=QUICK_SHUTDOWN, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def pagerduty(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """A stand-in for the Events API v2 (202 Accepted), with no PagerDuty setting inherited."""
    r = Receiver(status=202)
    r.answer = b'{"status": "success", "message": "Event processed", "dedup_key": "k"}'
    for var in PAGERDUTY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(
        "PAYLATER_ALERT_PAGERDUTY_EVENTS_URL", f"http://127.0.0.1:{r.port}/v2/enqueue"
    )
    yield r
    r.close()


PAGERDUTY_VARS = (
    "PAYLATER_ALERT_PAGERDUTY_BLOCK",
    "PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY",
    "PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY_BLOCK",
    "PAYLATER_ALERT_SLACK_BLOCK",
)
FAKE_KEY = "fake-routing-key-for-tests-0000"


def test_plain_webhook_gets_a_slack_compatible_payload(
    paylater_home, receiver, monkeypatch
) -> None:
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    notify("sync failed", "deferred_charges: CountMismatch", severity="critical", dedup_key="k1")
    (body,) = receiver.bodies
    assert body["path"] == "/hook"
    assert body["text"] == "[CRITICAL] sync failed\ndeferred_charges: CountMismatch\ndedup_key: k1"
    assert body["severity"] == "critical" and body["dedup_key"] == "k1"


def test_delivery_failure_is_logged_not_raised(
    paylater_home, receiver, monkeypatch, caplog
) -> None:
    receiver.status = 500
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    notify("x", "y")
    assert len(receiver.bodies) == 1
    assert "not delivered to the webhook" in caplog.text
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", "http://127.0.0.1:1/closed")
    notify("x", "y")  # nobody listens: still no exception


def test_a_refused_webhook_is_logged_by_setting_and_status_never_with_its_secret_path(
    paylater_home, receiver, monkeypatch, caplog
) -> None:
    """A Slack incoming-webhook URL is a credential (its path is the token): a 404 from a revoked
    hook must name the setting and Slack's answer, not write the URL into the flow log."""
    secret = "T0000/B0000/fake-webhook-token-for-tests"
    receiver.status = 404
    receiver.answer = b"no_service"
    monkeypatch.setenv(
        "PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/services/{secret}"
    )
    assert notify("x", "y", severity="warning") is False
    assert len(receiver.bodies) == 1
    assert "PAYLATER_ALERT_WEBHOOK_URL" in caplog.text
    assert "404" in caplog.text and "no_service" in caplog.text
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"hooks.example.invalid/services/{secret}")
    assert notify("x", "y", severity="warning") is False  # no scheme: named, not raised
    assert "PAYLATER_ALERT_WEBHOOK_URL" in caplog.text and "protocol" in caplog.text
    assert "fake-webhook-token" not in caplog.text


def test_slack_block_and_failure_hook(
    prefect_harness, paylater_home, receiver, monkeypatch
) -> None:
    from prefect.blocks.notifications import SlackWebhook

    name = f"alerts-{uuid.uuid4().hex[:8]}"
    # apprise's json:// sends the block's message as JSON to any host: here, the local receiver.
    SlackWebhook(
        url=SecretStr(f"json://127.0.0.1:{receiver.port}/slack"), allow_private_urls=True
    ).save(name)
    monkeypatch.setenv("PAYLATER_ALERT_SLACK_BLOCK", name)
    flow = SimpleNamespace(name="daily-sync")
    run = SimpleNamespace(name="brave-otter", id="run-1", parameters={"as_of": "2026-11-26"})
    state = SimpleNamespace(message="ConfigError: table loans does not exist")
    alert_on_failure(flow, run, state)
    (body,) = receiver.bodies
    assert body["path"] == "/slack"
    assert body["title"] == "Flow run 'brave-otter' of 'daily-sync' failed"
    assert "table loans does not exist" in body["message"]
    assert "as_of=2026-11-26" in body["message"]
    assert body["type"] == "failure"


def test_notify_reports_whether_any_channel_took_the_alert(
    paylater_home, receiver, monkeypatch
) -> None:
    for var in PAGERDUTY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    assert notify("x", "y", severity="warning") is True
    receiver.status = 503
    assert notify("x", "y", severity="warning") is False
    receiver.status = 404
    assert notify("x", "y", severity="critical") is False
    monkeypatch.delenv("PAYLATER_ALERT_WEBHOOK_URL")
    assert notify("x", "y") is True  # no channel configured: nothing to retry


def test_critical_triggers_pagerduty_and_resolve_uses_the_same_key(
    paylater_home, receiver, pagerduty, monkeypatch
) -> None:
    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY", FAKE_KEY)
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    assert notify("[FIRING] queue stuck", "age 400 s", severity="critical", dedup_key="pm/q")
    (trigger,) = pagerduty.bodies
    assert trigger["path"] == "/v2/enqueue"
    assert trigger["routing_key"] == FAKE_KEY
    assert trigger["event_action"] == "trigger" and trigger["dedup_key"] == "pm/q"
    payload = trigger["payload"]
    assert payload["summary"] == "[FIRING] queue stuck" and payload["severity"] == "critical"
    assert payload["source"] and payload["custom_details"]["body"] == "age 400 s"
    assert [b["subject"] for b in receiver.bodies] == ["[FIRING] queue stuck"]

    assert notify("[RESOLVED] queue", "age 0 s", severity="info", dedup_key="pm/q", resolve=True)
    resolve = pagerduty.bodies[1]
    assert resolve["event_action"] == "resolve" and resolve["dedup_key"] == "pm/q"
    assert resolve["routing_key"] == FAKE_KEY

    assert notify("[FIRING] sync late", "31 h", severity="warning", dedup_key="pm/s")
    assert notify("[RESOLVED] sync", "1 h", severity="info", dedup_key="pm/s")
    assert len(pagerduty.bodies) == 2  # warnings and their resolution stay off PagerDuty
    assert len(receiver.bodies) == 4


def test_a_retryable_pagerduty_refusal_holds_the_notice_back(
    paylater_home, receiver, pagerduty, monkeypatch, caplog
) -> None:
    """Slack accepting a critical alert is not enough: not paged means not delivered (retry)."""
    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY", FAKE_KEY)
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    for status in (503, 429):
        pagerduty.status = status
        assert notify("[FIRING] q", "b", "critical", "pm/q", retried=True) is False
        assert receiver.bodies == []  # Slack hears it once the page went through, not twice
        assert f"PagerDuty answered {status}" in caplog.text
    pagerduty.status = 202
    assert notify("[FIRING] q", "b", "critical", "pm/q", retried=True) is True
    assert len(pagerduty.bodies) == 3 and len(receiver.bodies) == 1
    pagerduty.status = 502
    assert notify("[RESOLVED] q", "b", "info", "pm/q", resolve=True, retried=True) is False
    assert len(receiver.bodies) == 1
    # PagerDuty unreachable is retryable too.
    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_EVENTS_URL", "http://127.0.0.1:1/v2/enqueue")
    assert notify("[FIRING] q", "b", "critical", "pm/q", retried=True) is False
    assert len(receiver.bodies) == 1
    # A caller that does not resend (a flow's failure hook) has Slack told now, flagged unpaged.
    assert notify("[FIRING] q", "b", "critical", "pm/q") is False
    assert "NOT PAGED" in receiver.bodies[-1]["text"]


def test_a_400_from_pagerduty_is_one_clear_line_and_slack_is_told(
    paylater_home, receiver, pagerduty, monkeypatch, caplog
) -> None:
    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY", FAKE_KEY)
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    pagerduty.status = 400
    pagerduty.answer = (
        b'{"status": "invalid event", "message": "Event object is invalid",'
        b' "errors": ["Length of \'routing_key\' is incorrect (should be 32 characters)"]}'
    )
    # A resend would be refused the same way: the alert is delivered to Slack, flagged unpaged.
    assert notify("[FIRING] q", "b", severity="critical", dedup_key="pm/q") is True
    lines = [r.getMessage() for r in caplog.records if "PagerDuty" in r.getMessage()]
    assert len(lines) == 1
    assert "400" in lines[0] and "routing_key" in lines[0] and "should be 32" in lines[0]
    assert FAKE_KEY not in caplog.text  # the secret is never logged
    (told,) = receiver.bodies
    assert "NOT PAGED" in told["text"] and "400" in told["text"]


def test_routing_key_from_a_secret_block_and_a_missing_block_is_named(
    prefect_harness, paylater_home, receiver, pagerduty, monkeypatch, caplog
) -> None:
    from prefect.blocks.system import Secret

    name = f"pd-key-{uuid.uuid4().hex[:8]}"
    Secret(value=SecretStr(FAKE_KEY)).save(name)
    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY_BLOCK", name)
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    assert notify("[FIRING] q", "b", severity="critical", dedup_key="pm/q")
    assert pagerduty.bodies[0]["routing_key"] == FAKE_KEY

    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY_BLOCK", "no-such-block")
    caplog.clear()
    assert notify("[FIRING] q2", "b", severity="critical", dedup_key="pm/q2") is True
    assert len(pagerduty.bodies) == 1  # nothing sent without a key
    lines = [r.getMessage() for r in caplog.records if "PagerDuty" in r.getMessage()]
    assert len(lines) == 1 and "'no-such-block'" in lines[0] and "Secret block" in lines[0]
    assert "NOT PAGED" in receiver.bodies[-1]["text"]


def test_an_old_pagerduty_webhook_block_pages_through_the_events_api(
    prefect_harness, paylater_home, pagerduty, monkeypatch
) -> None:
    """PAYLATER_ALERT_PAGERDUTY_BLOCK keeps working: its integration key is the routing key."""
    from prefect.blocks.notifications import PagerDutyWebHook

    name = f"pd-old-{uuid.uuid4().hex[:8]}"
    PagerDutyWebHook(integration_key=SecretStr(FAKE_KEY), api_key=SecretStr("fake-api-key")).save(
        name
    )
    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_BLOCK", name)
    monkeypatch.delenv("PAYLATER_ALERT_WEBHOOK_URL", raising=False)
    assert notify("[FIRING] q", "b", severity="critical", dedup_key="pm/q") is True
    assert notify("[RESOLVED] q", "b", severity="info", dedup_key="pm/q", resolve=True) is True
    trigger, resolve = pagerduty.bodies
    assert trigger["routing_key"] == resolve["routing_key"] == FAKE_KEY
    assert (trigger["event_action"], resolve["event_action"]) == ("trigger", "resolve")


class Trickler:
    """A loopback receiver that answers 200 at once, then sends its body a byte every half second:
    every read returns within any per-read timeout, and the answer never ends."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.stop = threading.Event()
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                while not received.stop.wait(0.5):
                    try:
                        self.wfile.write(b" ")
                        self.wfile.flush()
                    except OSError:
                        return

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(
            target=self.server.serve_forever, kwargs=QUICK_SHUTDOWN, daemon=True
        ).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_receiver_that_never_finishes_answering_does_not_hold_the_alert(
    prefect_harness, paylater_home, monkeypatch, caplog
) -> None:
    # The monitor sends each alert inside the transaction that changed its incident: an alert
    # stuck on a receiver holds that transaction, and every later monitor run waits behind it.
    from prefect.blocks.notifications import SlackWebhook

    import tasks.alerts

    trickler = Trickler()
    try:
        for var in PAGERDUTY_VARS:
            monkeypatch.delenv(var, raising=False)
        # The receiver trickles a byte every 0.5 s: only the deadline can end a delivery.
        monkeypatch.setattr(tasks.alerts, "DELIVERY_DEADLINE_SECONDS", 1.0)
        base = f"http://127.0.0.1:{trickler.port}"
        name = f"alerts-{uuid.uuid4().hex[:8]}"
        SlackWebhook(
            url=SecretStr(f"json://127.0.0.1:{trickler.port}/slack"), allow_private_urls=True
        ).save(name)
        monkeypatch.setenv("PAYLATER_ALERT_SLACK_BLOCK", name)
        monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"{base}/hook")
        monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_EVENTS_URL", f"{base}/v2/enqueue")
        monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY", FAKE_KEY)
        outcome: list[bool] = []
        sender = threading.Thread(
            target=lambda: outcome.append(notify("[FIRING] q", "b", "critical", "pm/q")),
            daemon=True,
        )
        sender.start()
        sender.join(timeout=30)
        assert not sender.is_alive(), "notify is still waiting on the receiver"
        assert outcome == [False]  # nothing delivered: the caller may send it again
        assert sorted(trickler.paths) == ["/hook", "/slack", "/v2/enqueue"]
        assert "PagerDuty did not answer within 1 s" in caplog.text
    finally:
        trickler.close()


@pytest.mark.parametrize(
    "url",
    [
        "https://events.pagerduty.com:44x3/",  # a bad port: httpx.InvalidURL
        # No scheme, or a wrong one: httpx.UnsupportedProtocol, an HTTPError like a network
        # outage, was taken for one: retried every run, Slack held back (a heartbeat configured)
        # and never told why the pages did not go out.
        "events.pagerduty.com/v2/enqueue",
        "ftp://events.pagerduty.com/v2/enqueue",
    ],
)
def test_a_malformed_pagerduty_url_is_a_clear_refusal_not_an_exception(
    paylater_home, receiver, monkeypatch, caplog, url
) -> None:
    """notify never raises: a typo in the Events API URL (a bad port) raised httpx.InvalidURL out
    of it, failing the monitor's incident update on every run instead of telling Slack once."""
    for var in PAGERDUTY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY", FAKE_KEY)
    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_EVENTS_URL", url)
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    # Resending cannot mend a URL: Slack is told now, flagged unpaged, and the notice counts as sent.
    assert notify("[FIRING] q", "b", "critical", "pm/q", retried=True) is True
    (told,) = receiver.bodies
    assert "NOT PAGED" in told["text"] and "PAYLATER_ALERT_PAGERDUTY_EVENTS_URL" in told["text"]
    assert FAKE_KEY not in caplog.text


def test_a_warning_with_only_pagerduty_configured_is_logged_as_reaching_no_channel(
    paylater_home, pagerduty, monkeypatch, caplog
) -> None:
    """PagerDuty takes critical alerts only: with no chat channel configured, warnings (a sync
    late by 30 h, an unmeasured check) went nowhere, and not even the log said so."""
    monkeypatch.delenv("PAYLATER_ALERT_WEBHOOK_URL", raising=False)
    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY", FAKE_KEY)
    assert notify("[FIRING] paylater warning: sync_age", "b", severity="warning") is True
    assert pagerduty.bodies == []
    told = [r.getMessage() for r in caplog.records if "sync_age" in r.getMessage()]
    assert len(told) == 1 and "no chat channel" in told[0]
    assert "PAYLATER_ALERT_WEBHOOK_URL" in told[0]
    caplog.clear()
    assert notify("[FIRING] paylater critical: q", "b", severity="critical", dedup_key="k")
    assert len(pagerduty.bodies) == 1 and caplog.text == ""  # paged: nothing to say


def test_an_alert_quoting_a_database_url_never_carries_its_password(
    paylater_home, receiver, pagerduty, monkeypatch, caplog
) -> None:
    """An alert about a failing database (a flow's error text, a check's reason) names the host
    and the reason to Slack, the webhook, PagerDuty and the log, never the URL's password."""
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY", FAKE_KEY)
    flow = SimpleNamespace(name="daily-sync")
    run = SimpleNamespace(
        name="brave-otter", id="run-1", parameters={"source": "postgresql://app:Wr0ng@db/ops"}
    )
    failed = (
        "SourceUnavailable: connection to postgresql://app:Wr0ngSecret@db.internal:5432/ops"
        " failed: password authentication failed"
    )
    alert_on_failure(flow, run, SimpleNamespace(message=failed))
    notify("queue down", f"not measured: {failed}", severity="critical", dedup_key="q")
    assert "Wr0ng" not in json.dumps(receiver.bodies + pagerduty.bodies) + caplog.text
    assert len(receiver.bodies) == 2 and len(pagerduty.bodies) == 1
    assert "postgresql://app:***@db.internal:5432/ops" in receiver.bodies[0]["text"]
    assert (
        "password authentication failed" in pagerduty.bodies[0]["payload"]["custom_details"]["body"]
    )


@pytest.mark.parametrize("status", [500, None])
def test_a_failing_slack_block_is_logged_without_its_secrets(
    prefect_harness, paylater_home, receiver, monkeypatch, caplog, status
) -> None:
    """A Slack block's URL is its credential: a receiver answering 500, or none listening, is
    logged naming the block and the reason, never the URL's password or path."""
    from prefect.blocks.notifications import SlackWebhook

    port = receiver.port if status else 1
    receiver.status = status or 200
    name = f"alerts-{uuid.uuid4().hex[:8]}"
    SlackWebhook(
        url=SecretStr(f"json://hook:Wr0ngSecret@127.0.0.1:{port}/T000/B000/XyzSecretPath"),
        allow_private_urls=True,
    ).save(name)
    for var in PAGERDUTY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PAYLATER_ALERT_SLACK_BLOCK", name)
    assert notify("x", "y", severity="warning") is False
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name == "paylater.alerts")
    assert f"Slack block {name!r}" in ours
    assert "Wr0ngSecret" not in ours and "XyzSecretPath" not in ours, ours


def test_no_webhook_secret_or_routing_key_reaches_any_log_record_at_debug(
    prefect_harness, paylater_home, receiver, pagerduty, monkeypatch, caplog
) -> None:
    """With DEBUG logging on (an operator chasing a delivery problem), apprise logged the Slack
    block's URL with its secret path ("JSON POST URL: …", the failure's "Socket Exception: …"),
    urllib3 the path alone ('"POST /services/… HTTP/1.1" 500'), and httpx, even at INFO, the plain
    webhook's and the heartbeat's URLs whole. Every record of every logger now carries the host
    and the reason, never a webhook's path, a password or the PagerDuty routing key."""
    import logging

    from prefect.blocks.notifications import SlackWebhook

    from tasks.alerts import heartbeat

    caplog.set_level(logging.DEBUG)
    for name in ("apprise", "urllib3", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)
    block_path = "services/T000/B000/XyzBlockSecretPath"
    hook_path = "services/T111/B111/XyzHookSecretPath"
    ping_path = "ping/XyzPingSecretKey"
    block, closed_block = (f"alerts-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for name, port in ((block, receiver.port), (closed_block, 1)):  # 1: nobody listens
        SlackWebhook(
            url=SecretStr(f"json://hook:Wr0ngSecret@127.0.0.1:{port}/{block_path}"),
            allow_private_urls=True,
        ).save(name)
    caplog.clear()  # what the test's own set-up logged: the monitor only loads blocks
    monkeypatch.setenv("PAYLATER_ALERT_SLACK_BLOCK", block)
    monkeypatch.setenv(
        "PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/{hook_path}"
    )
    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY", FAKE_KEY)
    pagerduty.answer = f'{{"status": "throttled", "echo": "{FAKE_KEY}"}}'.encode()

    for status, pd_status in ((500, 429), (200, 202)):
        receiver.status, pagerduty.status = status, pd_status
        notify("[FIRING] q", "b", severity="critical", dedup_key="pm/q")
    heartbeat(f"http://127.0.0.1:{receiver.port}/{ping_path}")
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:1/{hook_path}")
    monkeypatch.setenv("PAYLATER_ALERT_SLACK_BLOCK", closed_block)  # connection errors quote URLs
    notify("[FIRING] w", "b", severity="warning", dedup_key="pm/w")

    assert len(receiver.bodies) == 4 and len(pagerduty.bodies) == 2  # all of it was sent
    names = {r.name.split(".")[0] for r in caplog.records if r.levelno == logging.DEBUG}
    assert {"apprise", "urllib3"} <= names, names  # DEBUG was on where the URLs are quoted
    assert any(r.name == "httpx" for r in caplog.records)
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    for secret in ("XyzBlockSecretPath", "XyzHookSecretPath", "XyzPingSecretKey", "Wr0ngSecret"):
        assert secret not in logged, [
            r.getMessage() for r in caplog.records if secret in r.getMessage()
        ]
    assert FAKE_KEY not in logged
    assert "127.0.0.1" in logged  # the host stays readable


def test_a_prefect_api_that_never_answers_does_not_hold_an_alert_for_minutes(
    prefect_harness, paylater_home, receiver, pagerduty, monkeypatch, caplog
) -> None:
    """The Slack block and the PagerDuty routing key's Secret block load through the Prefect
    API: one accepting connections and never answering (overloaded, a hung proxy) held each load
    for the client's timeouts and retries, 7 minutes here, outside the delivery deadline, and
    the monitor holds its incident transaction while it delivers. Loads now keep the deadline
    (1 s here): the alert is not delivered (the monitor resends it), saying the Prefect API did
    not answer, and the webhook still gets it."""
    import socket
    import time

    from prefect.blocks.notifications import SlackWebhook
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import tasks.alerts

    slack, key = (f"alerts-{uuid.uuid4().hex[:8]}" for _ in range(2))
    SlackWebhook(
        url=SecretStr(f"json://127.0.0.1:{receiver.port}/slack"), allow_private_urls=True
    ).save(slack)
    Secret(value=SecretStr(FAKE_KEY)).save(key)
    monkeypatch.setenv("PAYLATER_ALERT_SLACK_BLOCK", slack)
    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY_BLOCK", key)
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    monkeypatch.setattr(tasks.alerts, "DELIVERY_DEADLINE_SECONDS", 1.0)
    assert notify("[FIRING] q", "b", "critical", "pm/q", retried=True)  # the API answering
    assert len(pagerduty.bodies) == 1 and len(receiver.bodies) == 2
    receiver.bodies.clear()

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepted by the kernel, never answered
    outcome: list[bool] = []

    def send() -> None:
        api = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
        with temporary_settings({PREFECT_API_URL: api}):
            outcome.append(notify("[FIRING] q", "b", "critical", "pm/q"))

    started = time.monotonic()
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sender.join(timeout=30)
    try:
        assert not sender.is_alive(), (
            f"notify still waiting after {time.monotonic() - started:.0f} s"
        )
    finally:
        silent.close()
    assert outcome == [False]  # not paged: the monitor sends it again
    assert [b["path"] for b in receiver.bodies] == ["/hook"]  # told, NOT PAGED
    assert "NOT PAGED" in receiver.bodies[0]["text"]
    assert "the Prefect API did not answer within 1 s" in caplog.text
    assert len(pagerduty.bodies) == 1


def test_an_async_flows_failure_reaches_the_slack_block(
    prefect_harness, paylater_home, receiver, monkeypatch
) -> None:
    """Prefect hands back a coroutine from a block's load and notify when called inside an
    async flow's run: its failure hook loaded a coroutine, not the block, and Slack never heard
    of the failure. Both are asked for synchronously now."""
    import asyncio

    from prefect import flow
    from prefect.blocks.notifications import SlackWebhook

    name = f"alerts-{uuid.uuid4().hex[:8]}"
    SlackWebhook(
        url=SecretStr(f"json://127.0.0.1:{receiver.port}/slack"), allow_private_urls=True
    ).save(name)
    for var in PAGERDUTY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PAYLATER_ALERT_SLACK_BLOCK", name)

    @flow(name="async-job", on_failure=[alert_on_failure])
    async def job() -> None:
        raise RuntimeError("the warehouse refused the load")

    with pytest.raises(RuntimeError):
        asyncio.run(job())
    (body,) = receiver.bodies
    assert body["path"] == "/slack" and "of 'async-job' failed" in body["title"]
    # The root cause, as for a sync flow: not Prefect's wrapper (the result, asked for inside
    # the event loop, came back as a coroutine never awaited).
    assert "\nRuntimeError: the warehouse refused the load\n" in body["message"], body["message"]


def test_a_deployment_runs_failure_names_the_deployment_the_day_and_the_root_cause(
    prefect_harness, paylater_home, receiver, monkeypatch
) -> None:
    """Run as a worker runs a deployment's flow run: the alert said neither which deployment
    failed nor, for a scheduled run (as_of=None), which day; and it quoted Prefect's wrapper
    ("Flow run encountered an exception: ...") instead of the error."""
    from prefect import flow, get_client
    from prefect.flow_engine import run_flow
    from prefect.states import State

    from paylater.timeutil import default_as_of

    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    name = f"probe-{uuid.uuid4().hex[:8]}"

    @flow(name=name, on_failure=[alert_on_failure])
    def probe(as_of: date | None = None) -> None:
        raise LookupError("table loans does not exist")

    with get_client(sync_client=True) as client:
        deployment_id = client.create_deployment(flow_id=client.create_flow(probe), name="nightly")
        run = client.create_flow_run_from_deployment(deployment_id, parameters={"as_of": None})
    try:
        state = run_flow(probe, flow_run=run, return_type="state")
        assert isinstance(state, State) and state.is_failed()
        with get_client(sync_client=True) as client:
            started = client.read_flow_run(run.id).start_time
    finally:
        # The session's Prefect API is shared: a failed deployment run left there is counted
        # by every later monitor test in this process (failed_flows critical, paged).
        with get_client(sync_client=True) as client:
            client.delete_flow_run(run.id)
            client.delete_deployment(deployment_id)
    (alert,) = receiver.bodies
    body = alert["body"]
    assert body.startswith("LookupError: table loans does not exist\n"), body
    assert f"deployment: {name}/nightly\n" in body
    assert f"as_of defaulted to {default_as_of(started)}" in body


def test_an_ad_hoc_runs_failure_says_it_has_no_deployment(
    prefect_harness, paylater_home, receiver, monkeypatch
) -> None:
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    flow = SimpleNamespace(name="feature-build")
    run = SimpleNamespace(name="calm-owl", id="run-2", parameters={"as_of": "2026-11-26"})
    alert_on_failure(flow, run, SimpleNamespace(message="FeatureSqlError: bad"))
    (alert,) = receiver.bodies
    assert "deployment: none (not a deployment run)" in alert["body"]
    assert alert["body"].startswith("FeatureSqlError: bad\n")
    # Like every monitor notice, it ends with the runbook section that says what to do.
    assert alert["body"].splitlines()[-1] == "runbook: docs/runbook.md#flow_failure"


def test_a_deployment_that_cannot_be_read_still_alerts_and_logs_no_api_password(
    paylater_home, receiver, monkeypatch
) -> None:
    """The deployment's name is read from the Prefect API: when that fails the alert still goes,
    naming the deployment's id, and the warning never shows the API URL's password."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    deployment_id = uuid.uuid4()
    flow = SimpleNamespace(name="daily-sync")
    run = SimpleNamespace(
        name="calm-owl", id="run-3", parameters={"as_of": "2026-11-26"}, deployment_id=deployment_id
    )
    # The receiver answers GET with 501: the Prefect client's error quotes the URL it asked.
    api = f"http://prefect:Api5ecret@127.0.0.1:{receiver.port}/api"
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(logging.Formatter().format(record))  # type: ignore[method-assign]
    logging.getLogger("paylater.alerts").addHandler(handler)
    try:
        with temporary_settings({PREFECT_API_URL: api}):
            alert_on_failure(flow, run, SimpleNamespace(message="SyncError: bad"))
    finally:
        logging.getLogger("paylater.alerts").removeHandler(handler)
    (alert,) = receiver.bodies
    assert f"deployment: id {deployment_id}\n" in alert["body"]
    assert any("not read for the alert" in line for line in logged), logged
    assert "Api5ecret" not in "\n".join(logged) + json.dumps(receiver.bodies)


def test_in_a_pass_a_silent_prefect_api_is_waited_on_once_and_keeps_no_page_from_going_out(
    prefect_harness, paylater_home, receiver, pagerduty, monkeypatch
) -> None:
    """Within one delivery pass (the monitor's), a Prefect API that stopped answering while the
    Slack block loaded is not waited on again for the pass's later alerts; a routing key from the
    environment needs no API, so every critical alert still pages, and the webhook still hears
    each one."""
    import socket

    from prefect.blocks.notifications import SlackWebhook
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import tasks.alerts
    from tasks.alerts import delivery_pass

    slack = f"alerts-{uuid.uuid4().hex[:8]}"
    SlackWebhook(
        url=SecretStr(f"json://127.0.0.1:{receiver.port}/slack"), allow_private_urls=True
    ).save(slack)
    monkeypatch.setenv("PAYLATER_ALERT_SLACK_BLOCK", slack)
    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY", FAKE_KEY)
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    # Lowered to keep the test short, not so far that a loaded machine's real receivers miss it.
    monkeypatch.setattr(tasks.alerts, "DELIVERY_DEADLINE_SECONDS", 2.0)
    silent = socket.create_server(("127.0.0.1", 0), backlog=16)  # never accepted nor answered
    try:
        api = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
        with temporary_settings({PREFECT_API_URL: api}), delivery_pass(60.0):
            sent = [notify(f"[FIRING] {c}", "b", "critical", f"pm/{c}") for c in "abc"]
    finally:
        silent.close()
    assert sent == [True, True, True]  # paged: the incidents are recorded
    assert [b["dedup_key"] for b in pagerduty.bodies] == ["pm/a", "pm/b", "pm/c"]
    assert [b["path"] for b in receiver.bodies] == ["/hook"] * 3


def test_a_pass_whose_delivery_budget_is_spent_tries_no_channel(
    receiver, pagerduty, monkeypatch
) -> None:
    """A monitor pass has one delivery budget: once spent, its remaining alerts are not tried
    (not delivered: the monitor resends them next pass), so slow receivers cannot stretch the
    pass past its schedule; a new pass has its own budget."""
    from tasks.alerts import delivery_pass

    monkeypatch.setenv("PAYLATER_ALERT_PAGERDUTY_ROUTING_KEY", FAKE_KEY)
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    with delivery_pass(0.0):
        assert not notify("[FIRING] q", "b", "critical", "pm/q", retried=True)
        assert not notify("[FIRING] s", "b", "warning", "pm/s")
    assert pagerduty.bodies == [] and receiver.bodies == []
    with delivery_pass(60.0):
        assert notify("[FIRING] q", "b", "critical", "pm/q", retried=True)
    assert len(pagerduty.bodies) == 1 and len(receiver.bodies) == 1
