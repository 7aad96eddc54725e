"""gateway.logs: JSON lines, the console renderer, level filtering, redaction.

``configure_logging`` changes structlog's process-wide configuration (and
turns on logger caching): each test restores the previous configuration, and
logs only through loggers of its own, so no module-level logger of the
gateway gets cached with this test's settings.
"""

from __future__ import annotations

import io
import json
import re
import sys
from collections.abc import Iterator

import pytest
import structlog

from gateway.config import Settings
from gateway.logs import configure_logging

SECRET = "sk-live-abcdef0123456789"


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.reset_defaults()
        structlog.configure(**saved)
        structlog.contextvars.clear_contextvars()


def json_lines(stderr: str) -> list[dict]:
    lines = [line for line in stderr.splitlines() if line]
    return [json.loads(line) for line in lines]  # each one must be a whole JSON document


def test_json_lines_with_level_timestamp_and_request_id(capsys):
    configure_logging("info", "json")
    structlog.contextvars.bind_contextvars(request_id="req-123")
    logger = structlog.get_logger("test-json")
    logger.info("request", api="openai", status=200, ttft_ms=12.5, outcome="ok", note="a\nb \"q\"")
    logger.debug("hidden at info")
    logger.warning("slow", total_ms=3000)
    (first, second) = json_lines(capsys.readouterr().err)
    assert first["event"] == "request" and first["level"] == "info"
    assert first["request_id"] == "req-123"
    assert (first["api"], first["status"], first["ttft_ms"]) == ("openai", 200, 12.5)
    assert first["note"] == 'a\nb "q"'
    assert first["timestamp"].endswith("Z")
    assert second["level"] == "warning" and second["total_ms"] == 3000


def test_exceptions_render_inside_one_json_line(capsys):
    configure_logging("debug", "json")
    logger = structlog.get_logger("test-exc")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("stream failed")
    (line,) = json_lines(capsys.readouterr().err)
    assert line["level"] == "error" and "RuntimeError: boom" in line["exception"]


@pytest.mark.parametrize("field", ["authorization", "Authorization", "api_key", "x-api-key",
                                   "upstream_api_key", "token"])
def test_secret_fields_are_redacted(capsys, field):
    configure_logging("info", "json")
    structlog.get_logger("test-redact").info("headers", **{field: SECRET})
    (line,) = json_lines(capsys.readouterr().err)
    assert line[field] == "[redacted]"


def test_bearer_tokens_inside_any_text_are_redacted(capsys):
    configure_logging("info", "json")
    structlog.get_logger("test-bearer").info(
        "upstream said", error=f"401 for 'Authorization: Bearer {SECRET}', retry", other="bearer-less"
    )
    out = capsys.readouterr().err
    assert SECRET not in out
    (line,) = json_lines(out)
    assert line["error"] == "401 for 'Authorization: Bearer [redacted]', retry"
    assert line["other"] == "bearer-less"


def test_console_renderer_is_human_text_and_still_redacts(capsys):
    configure_logging("info", "console")
    structlog.get_logger("test-console").info("request", api="native", authorization=SECRET)
    out = capsys.readouterr().err
    assert "request" in out and "api=native" in out
    assert SECRET not in out
    with pytest.raises(ValueError):
        json.loads(out)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_format_is_console_on_a_terminal_and_json_otherwise(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    configure_logging("info", "auto")
    structlog.get_logger("test-auto-tty").info("request", api="native")
    text = re.sub(r"\x1b\[[0-9;]*m", "", terminal.getvalue())  # colours, on a terminal
    assert "request" in text and "api=native" in text
    with pytest.raises(ValueError):
        json.loads(text)

    piped = io.StringIO()  # the journal, a file, a pipe: not a terminal
    monkeypatch.setattr(sys, "stderr", piped)
    configure_logging("info", "auto")
    structlog.get_logger("test-auto-pipe").info("request", api="native")
    (line,) = json_lines(piped.getvalue())
    assert line["event"] == "request" and line["api"] == "native"


def test_log_format_defaults_to_auto():
    assert Settings.from_env({}).log_format == "auto"


def test_every_configured_secret_is_kept_out_of_every_field(capsys):
    """Whatever quotes it -- a provider's message, an exception's text, a
    field of any name -- a configured secret never reaches a line."""
    from gateway.redact import SECRETS

    configured = "cluster-shared-secret-0f1e2d3c"
    SECRETS.add(configured, "short")  # too short to be treated as a secret
    configure_logging("info", "json")
    log = structlog.get_logger("test-redact")
    try:
        raise ValueError(f"Incorrect API key provided: {configured}")
    except ValueError:
        log.exception("upstream failed", detail=f"body quoted {configured} twice: {configured}",
                      note="a short word stays")
    (line,) = json_lines(capsys.readouterr().err)
    assert configured not in json.dumps(line)
    assert line["detail"] == "body quoted [redacted] twice: [redacted]"
    assert "Incorrect API key provided: [redacted]" in line["exception"]
    assert line["note"] == "a short word stays"
