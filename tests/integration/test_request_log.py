"""The canonical log line: exactly one summary per request, with the
documented fields, and no credential anywhere (logs, errors, metrics)."""

from __future__ import annotations

import json

import aiohttp
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from gateway.sse import PING
from tests.integration.sse_frames import FrameReader

#: The canonical fields of the request's log line, plus the request id.
SUMMARY_FIELDS = {
    "api", "status", "role", "key", "queue_wait_ms", "ttft_ms", "total_ms", "bytes", "outcome",
    "request_id",
}


def chat(prompt: str, *, stream: bool = True) -> dict[str, object]:
    return {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": stream}


def summaries(logs: list[dict]) -> list[dict]:
    return [line for line in logs if line["event"] == "request"]


async def test_one_summary_line_per_streamed_request_with_every_field(gateway):
    async with aiohttp.ClientSession() as http:
        with capture_logs(processors=[merge_contextvars]) as logs:
            async with http.post(gateway.v1 + "/chat/completions", json=chat("log me")) as resp:
                body = await resp.read()
            async with http.post(gateway.v1 + "/stream", json=chat("log me")) as native:
                await native.read()
    lines = summaries(logs)
    assert len(lines) == 2
    line = lines[0]
    assert set(line) >= SUMMARY_FIELDS
    assert line["request_id"] == resp.headers["X-Request-Id"]
    assert (line["api"], line["status"], line["outcome"]) == ("openai", 200, "ok")
    assert line["role"] == "leader" and len(line["key"]) == 12
    meta = json.loads(next(f for f in body.split(b"\n\n") if f.startswith(b": meta "))[7:])
    assert line["ttft_ms"] == meta["ttft_ms"] and line["queue_wait_ms"] == meta["queue_wait_ms"]
    assert line["total_ms"] >= line["ttft_ms"] > 0
    # Every frame after the early ping is counted (the ping is written before
    # the handler starts counting).
    assert len(body) - len(PING) <= line["bytes"] <= len(body)
    second = lines[1]
    assert second["api"] == "native" and second["request_id"] == native.headers["X-Request-Id"]
    assert second["key"] == line["key"]  # same prompt, same key prefix
    assert second["request_id"] != line["request_id"]


async def test_failed_cancelled_and_rejected_requests_log_one_line_each(gateway):
    url = gateway.v1 + "/chat/completions"
    async with aiohttp.ClientSession() as http:
        with capture_logs(processors=[merge_contextvars]) as logs:
            async with http.post(url, json=chat("fails [sim fail_status=500]")) as failed:
                await failed.read()
            async with http.post(url, json={"model": "sim"}) as rejected:
                assert rejected.status == 400
            resp = await http.post(url, json=chat("leaves [sim ttft_ms=10000]"))
            assert (await FrameReader(resp).next()).comment == "ping"
            await gateway.sim.log.wait_for_arrivals(2)  # the 400 never went up
            resp.close()
            await gateway.sim.log.wait_for(1, outcome="reset")
    by_id = {line["request_id"]: line for line in summaries(logs)}
    assert len(by_id) == len(summaries(logs)) == 3
    assert by_id[failed.headers["X-Request-Id"]]["outcome"] == "error"
    assert by_id[failed.headers["X-Request-Id"]]["error"] == "upstream_500"
    assert by_id[rejected.headers["X-Request-Id"]]["outcome"] == "rejected"
    assert by_id[rejected.headers["X-Request-Id"]]["status"] == 400
    cancelled = by_id[resp.headers["X-Request-Id"]]
    assert cancelled["outcome"] == "cancelled" and cancelled["ttft_ms"] is None


async def test_no_credential_in_logs_errors_or_metrics(gateway_factory):
    upstream_key, client_key, wrong_key = "sk-up-SECRET-9f2", "sk-client-SECRET-4c1", "sk-WRONG-77e"
    gateway = await gateway_factory(upstream_api_key=upstream_key, gateway_api_keys=(client_key,))
    auth = {"Authorization": f"Bearer {client_key}"}
    url = gateway.v1 + "/chat/completions"
    seen: list[str] = []
    async with aiohttp.ClientSession() as http:
        with capture_logs(processors=[merge_contextvars]) as logs:
            async with http.post(url, json=chat("ok"), headers=auth) as resp:
                seen.append(await resp.text())
            async with http.post(url, json=chat("bad [sim fail_status=401]", stream=False),
                                 headers=auth) as resp:
                seen.append(await resp.text())
            async with http.post(url, json=chat("bad [sim fail_status=500]"), headers=auth) as resp:
                seen.append(await resp.text())
            async with http.post(url, json=chat("ok"),
                                 headers={"Authorization": f"Bearer {wrong_key}"}) as resp:
                assert resp.status == 401
                seen.append(await resp.text())
            async with http.post(url, data=b"{", headers={**auth, "Content-Type": "application/json"}
                                 ) as resp:
                seen.append(await resp.text())
            for path in ("/metrics", "/stats"):
                async with http.get(gateway.url + path) as resp:
                    seen.append(await resp.text())
    assert all(record.authorization for record in gateway.sim.log.records)  # it was sent
    assert len(summaries(logs)) == 5
    everything = json.dumps(logs, default=str) + "".join(seen)
    for secret in (upstream_key, client_key, wrong_key):
        assert secret not in everything


async def test_an_ops_answer_of_an_error_status_is_logged_as_one(gateway):
    """/readyz's 503 (no upstream reachable) is not a success: its line
    says so, as a 503 of any other route would. A 200 of it is not
    logged at all (probes every few seconds)."""
    async with aiohttp.ClientSession() as http:
        with capture_logs(processors=[merge_contextvars]) as logs:
            async with http.get(gateway.url + "/readyz") as ready:
                assert ready.status == 200
            await gateway.sim.aclose()
            async with http.get(gateway.url + "/readyz") as unready:
                assert unready.status == 503
    [line] = summaries(logs)
    assert line["request_id"] == unready.headers["X-Request-Id"]
    assert (line["api"], line["status"], line["outcome"]) == ("ops", 503, "error")
