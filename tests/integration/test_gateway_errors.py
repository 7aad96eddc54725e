"""Bad input, auth and admission: the OpenAI error shape, the right status,
one log line, and the next good request still works."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from gateway.api.ops import STATIC
from gateway.sim.content import answer_tokens
from tests.integration.conftest import FAST_SIM, HELD_SIM, subscribed, upstream_held
from tests.integration.sse_frames import FrameReader, openai_text

GOOD = {"model": "sim", "messages": [{"role": "user", "content": "still serving"}]}


def error_shape(body: dict) -> dict:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code"}
    assert body["error"]["message"]
    return body["error"]


async def assert_still_serving(http: aiohttp.ClientSession, v1: str, **kwargs: object) -> None:
    async with http.post(v1 + "/chat/completions", json=GOOD, **kwargs) as resp:
        assert resp.status == 200
        body = await resp.json()
    expected = "".join(answer_tokens(GOOD["messages"], FAST_SIM.tokens))
    assert body["choices"][0]["message"]["content"] == expected


BAD_INPUT = [
    ("invalid json", "POST", "/v1/chat/completions", b"{not json", "application/json", 400,
     "invalid_json"),
    ("not an object", "POST", "/v1/chat/completions", b"[1, 2]", "application/json", 400,
     "invalid_request"),
    ("missing messages", "POST", "/v1/chat/completions", b'{"model": "m"}', "application/json",
     400, "invalid_value"),
    ("empty messages", "POST", "/v1/chat/completions", b'{"model": "m", "messages": []}',
     "application/json", 400, "invalid_value"),
    ("unknown role", "POST", "/v1/chat/completions",
     b'{"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}', "application/json",
     400, "invalid_value"),
    ("wrong type", "POST", "/v1/stream",
     b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
     "application/json", 400, "invalid_value"),
    ("stream not a bool", "POST", "/v1/chat/completions",
     b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
     "application/json", 400, "invalid_value"),
    ("wrong content type", "POST", "/v1/chat/completions", b"model=m", "text/plain", 400,
     "unsupported_content_type"),
    ("body too large", "POST", "/v1/chat/completions",
     b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}',
     "application/json", 413, "payload_too_large"),
    ("nested too deep", "POST", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000,
     "application/json", 400, "invalid_json"),
    ("NaN is not JSON", "POST", "/v1/chat/completions",
     b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     "application/json", 400, "invalid_json"),
    ("an infinite number", "POST", "/v1/stream",
     b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}',
     "application/json", 400, "invalid_json"),
    # Python's int() refuses more than 4300 digits (CVE-2020-10735's limit).
    ("an integer too long to read", "POST", "/v1/chat/completions",
     b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": ' + b"7" * 5000
     + b"}", "application/json", 400, "invalid_json"),
    ("an integer too long to read, native", "POST", "/v1/stream",
     b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": '
     + b"7" * 5000 + b"}", "application/json", 400, "invalid_json"),
    ("unknown path", "GET", "/v1/nothing-here", b"", "application/json", 404, "not_found"),
    ("missing static file", "GET", "/static/missing.js", b"", "application/json", 404, "not_found"),
    ("outside the static files", "GET", "/static/package.json", b"", "application/json", 404,
     "not_found"),
    ("wrong method", "GET", "/v1/chat/completions", b"", "application/json", 405,
     "method_not_allowed"),
]


@pytest.mark.parametrize(
    ("case", "method", "path", "body", "content_type", "status", "code"),
    BAD_INPUT,
    ids=[case[0] for case in BAD_INPUT],
)
async def test_bad_input(gateway_factory, case, method, path, body, content_type, status, code):
    gateway = await gateway_factory(max_body_bytes=4096 if code == "payload_too_large" else 1 << 20)
    async with aiohttp.ClientSession() as http:
        with capture_logs(processors=[merge_contextvars]) as logs:
            async with http.request(
                method, gateway.url + path, data=body, headers={"Content-Type": content_type}
            ) as resp:
                assert resp.status == status
                assert resp.headers["X-Request-Id"]
                assert error_shape(await resp.json())["code"] == code
                if status == 405:  # RFC 9110 §15.5.6
                    assert resp.headers["Allow"] == "POST"
        request_lines = [line for line in logs if line["event"] == "request"]
        assert len(request_lines) == 1
        assert request_lines[0]["status"] == status
        assert request_lines[0]["request_id"] == resp.headers["X-Request-Id"]
        await assert_still_serving(http, gateway.v1)
    assert gateway.sim.log.records[-1].path == "/v1/chat/completions"
    assert len(gateway.sim.log.records) == 1  # bad input never reached the upstream


async def test_api_keys_bearer_and_x_api_key_and_401(gateway_factory):
    gateway = await gateway_factory(gateway_api_keys=("sk-alpha", "sk-beta"))
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"x-api-key": "nope"}):
            with capture_logs(processors=[merge_contextvars]) as logs:
                async with http.post(gateway.v1 + "/chat/completions", json=GOOD,
                                     headers=headers) as resp:
                    assert resp.status == 401
                    assert error_shape(await resp.json())["type"] == "authentication_error"
            assert "sk-wrong" not in json.dumps(logs, default=str)
        await assert_still_serving(http, gateway.v1, headers={"Authorization": "Bearer sk-beta"})
        await assert_still_serving(http, gateway.v1, headers={"x-api-key": "sk-alpha"})
        async with http.get(gateway.url + "/healthz") as resp:
            assert resp.status == 200  # ops endpoints stay open


async def _raw_post(url: str, header: bytes, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request carrying a header line as given: aiohttp's
    client refuses to send a byte that is not UTF-8."""
    host, port = url.split("//")[1].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + header + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    )
    answer = await reader.read()
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


@pytest.mark.parametrize("keys", [("sk-alpha",), ()], ids=["keys set", "no keys"])
@pytest.mark.parametrize("header", [b"Authorization: Bearer \xff\xfekey", b"x-api-key: \xe9t\xe9",
                                    b"Authorization: Bearer sk alpha"])
async def test_a_malformed_key_is_a_401_and_holds_nothing(gateway_factory, keys, header):
    # aiohttp reads a header's bytes with surrogateescape: hashed or compared
    # as they came, they raised a 500 (and, with no keys set, left the
    # request's subscription and admission slot behind).
    gateway = await gateway_factory(gateway_api_keys=keys, coalesce_scope="global")
    body = json.dumps({**GOOD, "stream": True}).encode()
    with capture_logs() as logs:
        status, payload = await _raw_post(gateway.url, header, body)
    assert status == 401
    assert error_shape(json.loads(payload))["code"] == "invalid_api_key"
    assert [line["status"] for line in logs if line["event"] == "request"] == [401]
    assert gateway.state.admission.inflight == 0
    assert gateway.state.registry.statistics().subscribers == 0
    assert gateway.sim.log.records == []
    async with aiohttp.ClientSession() as http:
        await assert_still_serving(http, gateway.v1, headers={"x-api-key": "sk-alpha"})


async def test_a_401_counts_under_its_api(gateway_factory):
    gateway = await gateway_factory(gateway_api_keys=("sk-alpha",))
    async with aiohttp.ClientSession() as http:
        for path in ("/chat/completions", "/stream", "/messages"):
            with capture_logs() as logs:
                async with http.post(gateway.v1 + path, json=GOOD) as resp:
                    assert resp.status == 401
            assert [line["api"] for line in logs if line["event"] == "request"] == [
                {"/chat/completions": "openai", "/stream": "native", "/messages": "anthropic"}[path]
            ]
        async with http.get(gateway.url + "/metrics") as resp:
            metrics = await resp.text()
    for api in ("openai", "native", "anthropic"):
        assert f'gateway_requests_total{{api="{api}",outcome="rejected"}} 1.0' in metrics


async def test_two_tenants_never_share_an_answer(gateway_factory):
    """The same prompt under two tenants' keys: a call for each tenant, and
    the first tenant's second request shares its first. The upstream holds
    the calls until all three requests are subscribed, so what they share
    does not depend on how fast they arrive."""
    gateway = await gateway_factory(sim_profile=HELD_SIM, gateway_api_keys=("sk-one", "sk-two"))
    body = {"model": "sim", "messages": [{"role": "user", "content": "tenant"}]}
    answer = "".join(answer_tokens(body["messages"], FAST_SIM.tokens))
    async with aiohttp.ClientSession() as http:

        async def one(key: str) -> str:
            async with http.post(gateway.v1 + "/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {key}"}) as resp:
                assert resp.status == 200
                return (await resp.json())["choices"][0]["message"]["content"]

        async with asyncio.timeout(10), asyncio.TaskGroup() as clients:
            async with upstream_held(gateway):
                first = clients.create_task(one("sk-one"))
                await gateway.sim.log.wait_for_arrivals(1)
                others = [clients.create_task(one(key)) for key in ("sk-two", "sk-one")]
                await subscribed(gateway, 3)
    assert [task.result() for task in (first, *others)] == [answer] * 3
    assert len(gateway.sim.log.records) == 2
    assert all(not r.authorization for r in gateway.sim.log.records)  # client keys stay here


async def test_full_queue_answers_429_with_retry_after(gateway_factory):
    gateway = await gateway_factory(max_inflight=1, max_queue=0)
    async with aiohttp.ClientSession() as http:
        slow = await http.post(
            gateway.v1 + "/chat/completions",
            json={**GOOD, "messages": [{"role": "user", "content": "hold [sim ttft_ms=5000]"}],
                  "stream": True},
        )
        assert (await slow.content.readany()).startswith(b": ping")
        await gateway.sim.log.wait_for_arrivals(1)
        async with http.post(gateway.v1 + "/chat/completions", json=GOOD) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            assert error_shape(await resp.json())["code"] == "queue_full"
        slow.close()
        async with asyncio.timeout(5):
            await gateway.state.registry.wait_idle()
        await assert_still_serving(http, gateway.v1)


async def test_queue_timeout_is_503_before_the_200_and_in_stream_after(gateway_factory):
    gateway = await gateway_factory(max_inflight=1, max_queue=4, queue_timeout_ms=150)
    async with aiohttp.ClientSession() as http:
        slow = await http.post(
            gateway.v1 + "/chat/completions",
            json={**GOOD, "messages": [{"role": "user", "content": "hold [sim ttft_ms=5000]"}],
                  "stream": True},
        )
        await gateway.sim.log.wait_for_arrivals(1)
        async with http.post(gateway.v1 + "/chat/completions", json=GOOD) as resp:
            assert resp.status == 503
            assert error_shape(await resp.json())["code"] == "queue_timeout"
        async with http.post(gateway.v1 + "/chat/completions",
                             json={**GOOD, "stream": True}) as resp:
            assert resp.status == 200
            frames = await FrameReader(resp).rest()
        assert frames[0].raw == b": ping\n\n"
        assert frames[-1].json()["error"]["code"] == "queue_timeout"
        slow.close()
        async with asyncio.timeout(5):
            await gateway.state.registry.wait_idle()
        # A queue timeout is our overload, not the prompt's failure: not remembered.
        await assert_still_serving(http, gateway.v1)


async def test_upstream_429_keeps_status_and_retry_after(gateway):
    body = {"model": "sim",
            "messages": [{"role": "user", "content": "limited [sim fail_status=429 retry_after_s=7]"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/chat/completions", json=body) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "7"
            assert error_shape(await resp.json())["type"] == "rate_limit_error"
        async with http.post(gateway.v1 + "/chat/completions", json={**body, "stream": True}) as r:
            frames = await FrameReader(r).rest()
        assert r.status == 200  # the 200 left before the upstream answered
        # The provider's own error code is passed on (OpenAI's, from the simulator).
        assert frames[-1].json()["error"]["code"] == "rate_limit_exceeded"
        assert openai_text(frames[:-1]) == ""


async def test_upstream_key_is_sent_but_never_logged_or_returned(gateway_factory):
    secret = "sk-upstream-SECRET-123"
    gateway = await gateway_factory(upstream_api_key=secret)
    async with aiohttp.ClientSession() as http:
        with capture_logs(processors=[merge_contextvars]) as logs:
            await assert_still_serving(http, gateway.v1)
            async with http.get(gateway.url + "/metrics") as resp:
                metrics_text = await resp.text()
            async with http.get(gateway.url + "/stats") as resp:
                stats_text = await resp.text()
    assert gateway.sim.log.records[-1].authorization
    for text in (json.dumps(logs, default=str), metrics_text, stats_text):
        assert secret not in text


async def test_a_malformed_last_event_id_is_no_resume_point(gateway):
    body = {**GOOD, "stream": True}
    async with aiohttp.ClientSession() as http:
        for bad in ("\u00b2", "9" * 5000, "-3", "abc"):
            async with http.post(gateway.v1 + "/stream", json=body,
                                 headers={"Last-Event-ID": bad}) as resp:
                assert resp.status == 200
                frames = await FrameReader(resp).rest()
            assert frames[-1].event == "done"
            assert [int(f.id) for f in frames if f.event == "delta"][0] == 1


async def test_only_the_owner_may_cancel_a_request(gateway_factory):
    gateway = await gateway_factory(gateway_api_keys=("sk-owner", "sk-other"))
    body = {"model": "sim", "stream": True,
            "messages": [{"role": "user", "content": "mine [sim itl_ms=30 tokens=200]"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/stream", json=body,
                             headers={"Authorization": "Bearer sk-owner"}) as resp:
            request_id = resp.headers["X-Request-Id"]
            reader = FrameReader(resp)
            while (frame := await reader.next()) is not None and frame.event != "delta":
                pass
            cancel_url = gateway.v1 + f"/requests/{request_id}/cancel"
            async with http.post(cancel_url, headers={"Authorization": "Bearer sk-other"}) as other:
                assert other.status == 404  # looks unknown: no hint that it exists
            with capture_logs(processors=[merge_contextvars]) as logs:
                async with http.post(cancel_url, headers={"Authorization": "Bearer sk-owner"}) as mine:
                    assert mine.status == 202
                async with http.get(gateway.url + "/healthz") as alive:
                    assert alive.status == 200
            frames = await reader.rest()
    assert frames[-1].json()["finish_reason"] == "cancelled"
    # Who cancelled leaves a line; a health check's read does not.
    lines = [(line["method"], line["path"], line["status"]) for line in logs
             if line["event"] == "request" and line["path"] != "/v1/stream"]
    assert lines == [("POST", f"/v1/requests/{request_id}/cancel", 202)]


async def test_the_demo_pages_files_are_served(gateway):
    async with aiohttp.ClientSession() as http:
        for name, kind in (("sse-client.js", "javascript"), ("style.css", "text/css"),
                           ("index.html", "text/html")):
            async with http.get(gateway.url + "/static/" + name) as resp:
                assert resp.status == 200 and kind in resp.content_type, name
                assert await resp.read() == (STATIC / name).read_bytes()


async def test_a_body_nested_as_deep_as_the_parser_reads_is_never_a_500(gateway):
    """Past what the JSON parser reads, a body is a 400 ``invalid_json``;
    just short of it, the parser reads it but the upstream request built
    from it nests as deep, and encoding that ran out of stack (a 500).
    Every depth across the edge is now answered or refused as bad input."""
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession() as http:
        for depth in range(900, 1001):
            nested = b"[" * depth + b"]" * depth
            body = (b'{"model": "m", "stream": false, "max_tokens": 1, "messages": '
                    b'[{"role": "user", "content": "deep"}], "metadata": {"x": ' + nested + b"}}")
            async with http.post(gateway.v1 + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"}) as resp:
                statuses[depth] = resp.status
                if resp.status != 200:
                    assert error_shape(await resp.json())["code"] == "invalid_json"
    assert set(statuses.values()) == {200, 400}
    assert statuses[900] == 200 and statuses[1000] == 400
