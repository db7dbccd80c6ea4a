"""Alerts reach a real local HTTP receiver: through a Prefect SlackWebhook block and a plain webhook."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from tasks.alerts import alert_on_failure, notify


class Receiver:
    """A loopback HTTP server on a free port that records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.status = 200
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.bodies.append({"path": self.path, **json.loads(self.rfile.read(length))})
                self.send_response(received.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


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


def test_slack_block_and_failure_hook(
    prefect_harness, paylater_home, receiver, monkeypatch
) -> None:
    from prefect.blocks.notifications import SlackWebhook

    name = f"alerts-{uuid.uuid4().hex[:8]}"
    # apprise's json:// sends the block's message as JSON to any host: here, the local receiver.
    SlackWebhook(url=f"json://127.0.0.1:{receiver.port}/slack", allow_private_urls=True).save(name)
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
    monkeypatch.delenv("PAYLATER_ALERT_SLACK_BLOCK", raising=False)
    monkeypatch.delenv("PAYLATER_ALERT_PAGERDUTY_BLOCK", raising=False)
    monkeypatch.setenv("PAYLATER_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{receiver.port}/hook")
    assert notify("x", "y", severity="warning") is True
    receiver.status = 503
    assert notify("x", "y", severity="warning") is False
    receiver.status = 404
    assert notify("x", "y", severity="critical") is False
    monkeypatch.delenv("PAYLATER_ALERT_WEBHOOK_URL")
    assert notify("x", "y") is True  # no channel configured: nothing to retry
