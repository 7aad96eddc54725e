"""bin/check-alerts: the thresholds on /stats documents, then the real
launcher against a live gateway, healthy (exit 0) and failing (exit 1)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.check_alerts import evaluate, main
from tests.integration.conftest import HELD_SIM, subscribed, upstream_held
from tests.integration.sse_frames import FrameReader
from tests.loopback import serving

LAUNCHER = Path(__file__).resolve().parents[2] / "bin" / "check-alerts"


def stats(*, ttft=400.0, error_rate=0.0, queue_wait=1.0, leaders=1, followers=20) -> dict:
    return {
        "ttft_ms": {"p50": ttft, "p95": ttft, "samples": 10},
        "queue_wait_ms": {"p95": queue_wait, "samples": 10},
        "error_rate": error_rate,
        "requests_in_window": 10,
        "coalesce": {"leaders": leaders, "followers": followers},
        "active_streams": 0,
        "active_actors": 0,
        "queue_depth": 0,
        "upstream_connections": 1,
    }


def statuses(document: dict) -> dict[str, str]:
    return {check.name: check.status for check in evaluate(document)}


ALL_OK = {"ttft p95": "OK", "error rate": "OK", "queue wait p95": "OK", "coalescing": "OK"}


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (stats(), ALL_OK),
        (stats(ttft=1500.0), ALL_OK),  # the lines themselves are still OK
        (stats(ttft=1500.01), {**ALL_OK, "ttft p95": "ALERT"}),
        (stats(error_rate=0.01), ALL_OK),
        (stats(error_rate=0.02), {**ALL_OK, "error rate": "ALERT"}),
        (stats(queue_wait=1000.0), ALL_OK),
        (stats(queue_wait=1000.5), {**ALL_OK, "queue wait p95": "ALERT"}),
        (stats(leaders=2, followers=20), ALL_OK),  # exactly 10 per leader
        (stats(leaders=3, followers=20), {**ALL_OK, "coalescing": "ALERT"}),
        (stats(leaders=5, followers=10), {**ALL_OK, "coalescing": "n/a"}),  # no burst
        (stats(leaders=0, followers=50), ALL_OK),  # every request shared: ratio infinite
        (stats(ttft=None, queue_wait=None, leaders=0, followers=0),
         {"ttft p95": "n/a", "error rate": "OK", "queue wait p95": "n/a", "coalescing": "n/a"}),
    ],
)
def test_thresholds(document, expected):
    assert statuses(document) == expected


async def test_a_stats_document_without_a_field_is_unreadable(capsys):
    """A loopback server answers /stats with the document less its
    ``coalesce`` field; check-alerts reads it over HTTP and names the field."""
    broken = stats()
    del broken["coalesce"]

    async def serve_stats(request: web.Request) -> web.Response:
        return web.json_response(broken)

    app = web.Application()
    app.router.add_get("/stats", serve_stats)
    async with serving(app) as url:
        # main() blocks on urllib: off the loop that serves /stats.
        status = await asyncio.to_thread(main, [url])
    assert status == 2
    assert capsys.readouterr() == ("", "check-alerts: /stats has no field coalesce.leaders\n")


async def check_alerts(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(LAUNCHER), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def lines_by_name(output: str) -> dict[str, str]:
    table = {}
    for line in output.splitlines()[:4]:
        name, _, rest = line.partition("  ")
        table[name.strip()] = rest.split()[-1]
    return table


async def stream(http: aiohttp.ClientSession, url: str, prompt: str) -> None:
    body = {"model": "sim", "messages": [{"role": "user", "content": prompt}], "stream": True}
    async with http.post(url + "/chat/completions", json=body) as resp:
        await FrameReader(resp).rest()


async def test_live_gateway_ok_then_alert(gateway_factory):
    gateway = await gateway_factory(sim_profile=HELD_SIM)
    prompt = "check alerts burst [sim ttft_ms=300 tokens=40 itl_ms=5]"
    async with aiohttp.ClientSession() as http:
        # Held upstream: the 11 followers are in before the leader's answer.
        async with asyncio.timeout(10), asyncio.TaskGroup() as clients:
            async with upstream_held(gateway):
                clients.create_task(stream(http, gateway.v1, prompt))
                await gateway.sim.log.wait_for_arrivals(1)
                for _ in range(11):
                    clients.create_task(stream(http, gateway.v1, prompt))
                await subscribed(gateway, 12)

        status, out, err = await check_alerts(gateway.url)
        assert (status, err) == (0, ""), out + err
        assert lines_by_name(out) == ALL_OK
        assert "11.0" in out  # 11 followers on one leader
        assert out.splitlines()[-1] == "OK: no alert"

        # Failing traffic: two upstream errors (and two more leaders).
        for n in range(2):
            await stream(http, gateway.v1, f"fails {n} [sim fail_status=500]")
        status, out, err = await check_alerts(gateway.url + "/")

    assert status == 1, out + err
    assert lines_by_name(out) == {**ALL_OK, "error rate": "ALERT", "coalescing": "ALERT"}
    assert "14.29 %" in out  # 2 of 14
    assert out.splitlines()[-1] == "ALERT: error rate, coalescing (runbook: deploy/ALERTING.md)"


async def test_unreadable_stats_exit_2(gateway):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    status, out, err = await check_alerts(f"http://127.0.0.1:{closed_port}", "--timeout", "2")
    assert (status, out) == (2, "")
    assert err.startswith(f"check-alerts: cannot read http://127.0.0.1:{closed_port}/stats:")
    status, out, err = await check_alerts(gateway.url + "/nope")
    assert (status, out) == (2, "")
    assert err == f"check-alerts: {gateway.url}/nope/stats answered 404 Not Found\n"


@pytest.mark.parametrize("url", ["http://127.0.0.1:eighty", "http://[::1"])
def test_a_url_that_cannot_be_one_is_unreadable_not_an_alert(capsys, url):
    assert main([url, "--timeout", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"check-alerts: cannot read {url}/stats: ") and err.count("\n") == 1


async def test_a_server_that_does_not_speak_http_is_unreadable_not_an_alert(capsys):
    async def greet_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet_and_close, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        # main() blocks on urllib: off the loop that serves the greeting.
        status = await asyncio.to_thread(main, [f"http://127.0.0.1:{port}", "--timeout", "5"])
    assert status == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"check-alerts: http://127.0.0.1:{port}/stats did not answer HTTP\n"
