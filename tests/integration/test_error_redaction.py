"""What a client is told of an upstream failure: the cause in our words, with
no configured secret, no upstream host:port and no library's exception name,
before the 200 and in-stream alike; the details go to the log, which holds no
secret either. A real gateway process in front of a raw misbehaving upstream."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal

import aiohttp
import pytest

from gateway.app import running_gateway
from gateway.config import Settings
from tests.integration.faulty_upstream import faulty_upstream
from tests.integration.test_shutdown import gateway_process

UPSTREAM_KEY = "sk-upstream-TOPSECRET-0123456789"
CLIENT_KEY = "sk-client-ALSOSECRET-9876543210"

#: Words a client must never see in an error message.
LIBRARY_WORDS = ("TransferEncodingError", "ClientPayloadError", "ServerDisconnected",
                 "ContentLengthError", "aiohttp", "Traceback", "[DONE]")


async def _ask(http: aiohttp.ClientSession, url: str, path: str, prompt: str,
               stream: bool) -> tuple[int, bytes]:
    body = {"model": "m", "stream": stream, "messages": [{"role": "user", "content": prompt}]}
    async with http.post(url + path, json=body,
                         headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as resp:
        return resp.status, await resp.read()


def _error_of(path: str, stream: bool, raw: bytes) -> dict[str, object]:
    if not stream and path.endswith("/completions"):
        return json.loads(raw)["error"]  # type: ignore[no-any-return]
    if path.endswith("/completions"):
        last = raw.strip().split(b"\n\n")[-1]
        return json.loads(last.removeprefix(b"data: "))["error"]  # type: ignore[no-any-return]
    last = raw.strip().split(b"\n\n")[-1]
    assert last.startswith(b"event: error\n"), raw
    return json.loads(last.split(b"data: ", 1)[1])  # type: ignore[no-any-return]


CASES = [
    # (behaviour, the words the client gets)
    # A 401 is about our key: none of the provider's words reach the client.
    ("echo-key", "the upstream refused the gateway's credentials"),
    ("echo-key-mid", "Incorrect API key provided: [redacted]"),
    ("html", "the upstream sent an answer the gateway could not read"),
    ("bad-chunk", "the upstream sent an answer the gateway could not read"),
    ("drop", "the connection to the upstream was lost"),
    ("status-page", "the upstream answered 502"),
]


async def test_errors_reach_clients_in_our_words_and_no_secret_is_logged():
    async with faulty_upstream() as upstream, gateway_process(
        upstream.url, UPSTREAM_PROTOCOL="http1", UPSTREAM_API_KEY=UPSTREAM_KEY,
        GATEWAY_API_KEYS=CLIENT_KEY, LOG_LEVEL="debug", ERROR_TTL_MS="0",
    ) as gateway, aiohttp.ClientSession() as http:
        seen: list[bytes] = []
        for behaviour, words in CASES:
            for path in ("/v1/chat/completions", "/v1/stream"):
                for stream in (True, False) if path.endswith("completions") else (True,):
                    prompt = f"{behaviour} {path} {stream}"
                    status, raw = await _ask(http, gateway.url, path, prompt, stream)
                    seen.append(raw)
                    error = _error_of(path, stream, raw)
                    assert error["message"].startswith(words), (behaviour, path, stream, raw)
                    text = raw.decode()
                    assert UPSTREAM_KEY not in text and CLIENT_KEY not in text
                    assert f"127.0.0.1:{upstream.port}" not in text and "10.0.0.7" not in text
                    for word in LIBRARY_WORDS:
                        assert word not in str(error["message"]), (behaviour, word)
        gateway.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await gateway.process.wait() == 0
    # Each request reached the upstream once: a malformed answer is not sent
    # again, nor one that failed after its first token.
    assert upstream.requests == len(seen)
    logged = json.dumps(gateway.log)
    assert UPSTREAM_KEY not in logged and CLIENT_KEY not in logged
    # Each upstream failure is one warning line, with what the client is not told.
    failures = [line for line in gateway.log if line["event"] == "upstream failed"]
    assert len(failures) == len(seen)
    assert {line["level"] for line in failures} == {"warning"}
    assert {line["upstream"] for line in failures} == {upstream.url}
    assert {line["subscribers"] for line in failures} == {1}
    assert any("TransferEncodingError" in str(line["detail"]) for line in failures)
    assert any("text/html" in str(line["detail"]) or "[DONE]" in str(line["detail"])
               for line in failures)


@pytest.mark.parametrize("stream", [True, False])
async def test_a_provider_message_quoting_the_key_is_redacted_in_process(stream):
    """The same boundary in the in-process gateway the other tests use (an
    in-stream error: a 401's message is not relayed at all)."""
    settings = Settings(host="127.0.0.1", port=0, upstream_protocol="http1",
                        upstream_api_key=UPSTREAM_KEY)
    async with faulty_upstream() as upstream, running_gateway(
        dataclasses.replace(settings, upstream_url=upstream.url)
    ) as (_, url):
        async with aiohttp.ClientSession() as http:
            body = {"model": "m", "stream": stream,
                    "messages": [{"role": "user", "content": "echo-key-mid in process"}]}
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                raw = await resp.read()
    assert UPSTREAM_KEY.encode() not in raw
    assert b"[redacted]" in raw


async def test_a_provider_code_or_retry_after_quoting_the_key_is_not_relayed():
    """A provider's error code and Retry-After go to the client, the exchange
    log, other cluster members and (the code's kind) a metric label as they
    are: an identifier and a delay pass, a value quoting our key does not."""
    settings = Settings(host="127.0.0.1", port=0, upstream_protocol="http1",
                        upstream_api_key=UPSTREAM_KEY, error_ttl_ms=0)
    async with faulty_upstream() as upstream, running_gateway(
        dataclasses.replace(settings, upstream_url=upstream.url)
    ) as (_, url), aiohttp.ClientSession() as http:
        answers = {}
        for prompt in ("key-in-code", "rate-limited"):
            body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
            async with http.post(url + "/v1/chat/completions", json=body) as resp:
                answers[prompt] = (resp.status, resp.headers.get("Retry-After"), await resp.json())
        async with http.get(url + "/metrics") as resp:
            metrics = await resp.text()
    assert answers["key-in-code"][:2] == (429, None)
    assert answers["key-in-code"][2]["error"]["code"] == "upstream_429"
    assert UPSTREAM_KEY not in json.dumps(answers["key-in-code"][2])
    assert answers["rate-limited"][:2] == (429, "7")
    assert answers["rate-limited"][2]["error"]["code"] == "rate_limit_exceeded"
    assert UPSTREAM_KEY not in metrics
    assert 'gateway_stream_failures_total{cause="upstream_429"} 2.0' in metrics


#: Header lines the HTTP parser refuses (a control character in the value):
#: its error quotes the whole line, credential included.
REFUSED_CREDENTIAL_LINES = (
    b"x-api-key: sk-unknown-TOPSECRET-5566778899\x01",
    b"Authorization: Basic dXNlcjpUT1BTRUNSRVQtcGFzc3dvcmQ=\x01",
)


async def test_a_credential_in_a_header_line_the_parser_refuses_is_not_logged(sim):
    async with gateway_process(sim.url, GATEWAY_API_KEYS=CLIENT_KEY) as gateway:
        for line in REFUSED_CREDENTIAL_LINES:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n" + line
                         + b"\r\nContent-Length: 2\r\n\r\n{}")
            async with asyncio.timeout(10):
                answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.0 400 Bad Request\r\n"), answer
            assert b'"code": "invalid_http"' in answer
        gateway.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await gateway.process.wait() == 0
    refused = [line for line in gateway.log if line["event"] == "request refused by the HTTP parser"]
    assert len(refused) == len(REFUSED_CREDENTIAL_LINES)
    logged = json.dumps(gateway.log)
    assert "sk-unknown-TOPSECRET-5566778899" not in logged
    assert "dXNlcjpUT1BTRUNSRVQtcGFzc3dvcmQ=" not in logged
    assert "x-api-key: [redacted]" in str(refused[0]["detail"])
    assert "Authorization: Basic [redacted]" in str(refused[1]["detail"])
