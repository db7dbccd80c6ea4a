"""The shared redaction: every credential form masked, host and reason kept."""

from __future__ import annotations

import pytest

from paylater.redaction import origin, redact, scrub, split_credentials


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql+psycopg://u:p%40ss@h/db", "postgresql+psycopg://u:***@h/db"),
        # Unescaped `/`, `#`, `@` in a password: a URL parser misreads these and keeps them.
        ("postgresql://u:pa/ss#w@rd@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("http://alice:s3cret@mlflow.internal:5000", "http://alice:***@mlflow.internal:5000"),
        ("mysql://root:@h/db", "mysql://root:***@h/db"),
        ("bigquery://p/d?credentials_base64=eyJzZWNyZXQi", "bigquery://p/d?credentials_base64=***"),
        (
            "postgresql://h/db?user=u&password=pw&sslmode=require",
            "postgresql://h/db?user=u&password=***&sslmode=require",
        ),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA1&X-Amz-Signature=abc&x=1",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&x=1",
        ),
        (
            "https://a.blob.core.windows.net/c?sv=2&sig=abc%3D",
            "https://a.blob.core.windows.net/c?sv=2&sig=***",
        ),
        ("https://hooks.slack.com/services/T0/B0/XYZ", "https://hooks.slack.com/***"),
        ("https://discord.com/api/webhooks/1/tok", "https://discord.com/***"),
        ("host=db port=5432 password='se cret' user=u", "host=db port=5432 password=*** user=u"),
        ("host=db password=secret", "host=db password=***"),
        # Nothing secret: unchanged.
        ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
        (
            "s3://bucket/prefix/scoring/as_of=2026-11-20",
            "s3://bucket/prefix/scoring/as_of=2026-11-20",
        ),
        ("https://events.pagerduty.com/v2/enqueue", "https://events.pagerduty.com/v2/enqueue"),
        ("sqlite:////var/lib/paylater/source.db", "sqlite:////var/lib/paylater/source.db"),
    ],
)
def test_redact_masks_each_credential_form(given: str, shown: str) -> None:
    assert redact(given) == shown


def test_redact_works_inside_a_message() -> None:
    message = (
        "API request to http://alice:s3cret@mlflow:5000/health failed; end of string in URI:"
        ' "postgresql://postgres:pw@[::1/db"'
    )
    out = redact(message)
    assert "s3cret" not in out and ":pw@" not in out
    assert "mlflow:5000/health" in out and "[::1/db" in out


def test_scrub_masks_given_secrets_in_any_form() -> None:
    key = "R0UTINGkey/with space"
    text = f"refused {key} and {key.replace(' ', '%20')}"
    assert "R0UTING" not in scrub(text, key.replace(" ", "%20"), None)


def test_origin_and_split_credentials() -> None:
    assert origin("https://hooks.slack.com/services/T/B/X") == "https://hooks.slack.com/…"
    assert origin("http://127.0.0.1:8123/hook") == "http://127.0.0.1:8123/…"
    assert split_credentials("http://al%40ice:p%3Aw@h:5000/x") == (
        "http://h:5000/x",
        "al@ice",
        "p:w",
    )
    assert split_credentials("http://h:5000") == ("http://h:5000", None, None)


def test_redacted_errors_keeps_the_type_and_drops_only_a_leaking_chain() -> None:
    import traceback

    from paylater.redaction import redacted_errors

    class Picky(Exception):
        def __init__(self, a: str, b: int) -> None:
            super().__init__(a, b)

    with pytest.raises(ConnectionError, match=r"u:\*\*\*@h") as caught, redacted_errors():
        raise ConnectionError('bad URI: "postgresql://u:Wr0ng@h/db"')
    assert "Wr0ng" not in "".join(traceback.format_exception(caught.value))
    with pytest.raises(RuntimeError, match=r"Picky: .*u:\*\*\*@h"), redacted_errors():
        raise Picky("postgresql://u:Wr0ng@h/db", 1)
    clean = ValueError("nothing secret")
    with pytest.raises(ValueError) as kept, redacted_errors():
        raise clean
    assert kept.value is clean
