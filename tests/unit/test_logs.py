"""gateway.logs: JSON lines, the console renderer, level filtering, redaction.

``configure_logging`` changes structlog's process-wide configuration (and
turns on logger caching): each test restores the previous configuration, and
logs only through loggers of its own, so no module-level logger of the
gateway gets cached with this test's settings.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import re
import select
import sys
from collections.abc import Iterator

import pytest
import structlog

from gateway import json_codec
from gateway.config import Settings
from gateway.logs import TickWriter, configure_logging, say

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


def test_credential_header_lines_inside_any_text_are_redacted(capsys):
    configure_logging("info", "json")
    structlog.get_logger("test-header").info(
        "refused",
        api_key_line=f"b'x-api-key: {SECRET}\\x01'",
        basic=f"Authorization: Basic {SECRET}",
        bare=f"authorization:{SECRET} then",
        clock="at 12:30:00",
    )
    out = capsys.readouterr().err
    assert SECRET not in out
    (line,) = json_lines(out)
    assert line["api_key_line"] == "b'x-api-key: [redacted]'"
    assert line["basic"] == "Authorization: Basic [redacted]"
    assert line["bare"] == "authorization:[redacted] then"
    assert line["clock"] == "at 12:30:00"


def test_console_renderer_is_human_text_and_still_redacts(capsys):
    configure_logging("info", "console")
    structlog.get_logger("test-console").info("request", api="native", authorization=SECRET)
    out = capsys.readouterr().err
    assert "request" in out and "api=native" in out
    assert SECRET not in out
    with pytest.raises(ValueError):
        json.loads(out)


def test_console_lines_write_control_characters_of_a_value_as_escapes(capsys):
    """A client chooses its request path ("/%1b[2J" decodes to an escape
    sequence): on a terminal it must not clear the screen, erase what came
    before (backspace) or reverse the text that follows (U+202E)."""
    configure_logging("info", "console")
    structlog.get_logger("test-console-controls").info(
        "request", path="/v1/\x1b[2Jx\x08\x08\u202eevil", client="10.0.0.1"
    )
    out = capsys.readouterr().err
    assert not any(c in out for c in "\x1b\x08\u202e")
    assert out.endswith(r" client=10.0.0.1 path=/v1/\x1b[2Jx\x08\x08\u202eevil" + "\n")


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


def test_log_format_defaults_to_json():
    assert Settings.from_env({}).log_format == "json"
    assert Settings.from_env({"LOG_FORMAT": "auto"}).log_format == "auto"


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


def test_timestamp_is_iso_utc_with_microseconds_and_now(capsys):
    configure_logging("info", "json")
    before = datetime.datetime.now(datetime.UTC)
    structlog.get_logger("test-time").info("tick")
    after = datetime.datetime.now(datetime.UTC)
    (line,) = json_lines(capsys.readouterr().err)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["timestamp"])
    stamp = datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    assert before - datetime.timedelta(microseconds=1) <= stamp <= after


def test_values_orjson_refuses_still_make_one_json_line(capsys):
    configure_logging("info", "json")
    structlog.get_logger("test-fallback").info(
        "odd values", big=2**70, mapping={1: "int key"}, thing=object, text="é \u2028"
    )
    (line,) = json_lines(capsys.readouterr().err)
    assert line["big"] == 2**70 and line["mapping"] == {"1": "int key"}
    assert line["thing"] == repr(object) and line["text"] == "é \u2028"


def test_standard_library_json_when_orjson_is_off(capsys, monkeypatch):
    # GATEWAY_ORJSON=0: python -m gateway chooses the standard library first.
    for name in ("_fast", "BACKEND", "dumps", "loads"):
        monkeypatch.setattr(json_codec, name, getattr(json_codec, name))  # restored after
    json_codec.use_standard_library()
    configure_logging("info", "json")
    structlog.get_logger("test-stdlib").info("plain", n=1, token=SECRET)
    out = capsys.readouterr().err
    assert SECRET not in out
    (line,) = json_lines(out)
    assert (line["n"], line["token"]) == (1, "[redacted]")


def test_redaction_is_decided_per_field_name_whatever_was_logged_before(capsys):
    configure_logging("info", "json")
    logger = structlog.get_logger("test-redact-order")
    logger.info("first", note="public", count=1)
    logger.info("second", note="public", count=2, Token=SECRET)
    logger.info("third", note="public", count=3)
    out = capsys.readouterr().err
    assert SECRET not in out
    first, second, third = json_lines(out)
    assert second["Token"] == "[redacted]" and second["note"] == "public"
    assert (first["count"], third["count"]) == (1, 3)


class Sink:
    """A text file that keeps each write apart."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_lines_of_one_loop_iteration_leave_in_one_write_in_order() -> None:
    sink = Sink()
    writer = TickWriter(sink)

    async def main() -> list[str]:
        writer.msg("one")
        writer.msg("two")
        seen_in_the_same_iteration = list(sink.writes)
        await asyncio.sleep(0)  # the iteration ends: its lines are written
        writer.msg("three")
        await asyncio.sleep(0)
        return seen_in_the_same_iteration

    assert asyncio.run(main()) == []
    assert sink.writes == ["one\ntwo\n", "three\n"]
    writer.msg("outside a loop")  # no iteration to wait for
    assert sink.writes[-1] == "outside a loop\n"


def test_a_line_pending_when_its_loop_ends_leaves_with_the_next_one() -> None:
    sink = Sink()
    writer = TickWriter(sink)
    loop = asyncio.new_event_loop()
    loop.call_soon(writer.msg, "last of a loop")
    loop.call_soon(loop.stop)  # the loop stops after this iteration: the flush never runs
    loop.run_forever()
    loop.close()
    assert sink.writes == []

    async def main() -> None:
        writer.msg("first of the next")
        await asyncio.sleep(0)

    asyncio.run(main())
    assert sink.writes == ["last of a loop\nfirst of the next\n"]


def test_a_secret_inside_a_nested_field_is_redacted(capsys):
    """Headers or extras logged as a mapping or a list are searched too."""
    from gateway.redact import SECRETS

    configured = "nested-secret-7a6b5c4d"
    SECRETS.add(configured)
    configure_logging("info", "json")
    structlog.get_logger("test-nested").info(
        "upstream said", headers={"Authorization": "Bearer x", "x-note": f"key {configured}"},
        attempts=[f"sent {configured}", 2],
    )
    (line,) = json_lines(capsys.readouterr().err)
    assert configured not in json.dumps(line)
    assert line["headers"] == {"Authorization": "[redacted]", "x-note": "key [redacted]"}
    assert line["attempts"] == ["sent [redacted]", 2]


def test_a_tick_longer_than_pipe_buf_leaves_in_whole_lines_of_at_most_pipe_buf() -> None:
    """Workers share one stderr pipe: a write of at most PIPE_BUF bytes is
    atomic there, a longer one can be spliced with another worker's."""
    sink = Sink()
    writer = TickWriter(sink)
    lines = [f"line {n} " + "é" * 300 for n in range(40)]  # 2-byte characters: bytes count
    long_line = "x" * (select.PIPE_BUF + 10)

    async def main() -> None:
        for line in [*lines[:20], long_line, *lines[20:]]:
            writer.msg(line)
        await asyncio.sleep(0)

    asyncio.run(main())
    assert "".join(sink.writes) == "".join(f"{line}\n" for line in [*lines[:20], long_line, *lines[20:]])
    assert long_line + "\n" in sink.writes  # alone, as it is longer than any atomic write
    for write in sink.writes:
        assert write.endswith("\n")
        if write != long_line + "\n":
            assert len(write.encode()) <= select.PIPE_BUF
    assert len(sink.writes) < 20  # still few writes, not one per line


class _RawWrites(io.RawIOBase):
    """A raw stream that keeps each write it is given apart."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[no-untyped-def, override]
        self.writes.append(bytes(data))
        return len(data)


def test_a_said_line_leaves_in_one_write_where_print_would_split_it() -> None:
    """stdout as PYTHONUNBUFFERED (the systemd unit's setting) makes it: a
    supervisor's workers share the pipe, and two writes per line let their
    lines splice."""
    printed, said = _RawWrites(), _RawWrites()
    print("worker 1 of 2", file=io.TextIOWrapper(printed, write_through=True), flush=True)
    say("worker 1 of 2", file=io.TextIOWrapper(said, write_through=True))
    assert printed.writes == [b"worker 1 of 2", b"\n"]
    assert said.writes == [b"worker 1 of 2\n"]
