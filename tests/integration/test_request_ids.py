"""Request ids: a client cannot choose one unless it is a trusted proxy (none
by default), and a supplied id never takes one a live request holds."""

from __future__ import annotations

import ipaddress
import re

import aiohttp

from tests.integration.sse_frames import FrameReader

GATEWAY_ID = re.compile(r"^[0-9a-f]{24}$")
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def chat(prompt: str) -> dict[str, object]:
    return {"model": "sim", "stream": True, "messages": [{"role": "user", "content": prompt}]}


async def test_by_default_no_peer_chooses_its_request_id(gateway):
    async with aiohttp.ClientSession() as http:
        async with http.get(gateway.url + "/healthz", headers={"X-Request-Id": "mine-1"}) as resp:
            assert GATEWAY_ID.match(resp.headers["X-Request-Id"])


async def test_a_supplied_id_held_by_a_live_request_is_replaced(gateway_factory):
    gateway = await gateway_factory(trusted_proxies=LOOPBACK,
                                    gateway_api_keys=("sk-tenant-one", "sk-tenant-two"))
    one = {"Authorization": "Bearer sk-tenant-one", "X-Request-Id": "shared-id"}
    two = {"Authorization": "Bearer sk-tenant-two", "X-Request-Id": "shared-id"}
    async with aiohttp.ClientSession() as http:
        async with http.post(gateway.v1 + "/stream", headers=one,
                             json=chat("first [sim itl_ms=30 tokens=300]")) as first:
            assert first.headers["X-Request-Id"] == "shared-id"
            reader = FrameReader(first)
            while (frame := await reader.next()) is not None and frame.event != "delta":
                pass
            async with http.post(gateway.v1 + "/stream", headers=two,
                                 json=chat("second [sim itl_ms=30 tokens=300]")) as second:
                # Not the live id: a fresh one of the gateway's own.
                assert GATEWAY_ID.match(second.headers["X-Request-Id"])
                # The first tenant's own cancel still reaches its own request.
                cancel = gateway.v1 + "/requests/shared-id/cancel"
                async with http.post(cancel, headers={"Authorization": "Bearer sk-tenant-one"}) as c:
                    assert c.status == 202
                frames = await reader.rest()
                assert frames[-1].json()["finish_reason"] == "cancelled"
                second_id = second.headers["X-Request-Id"]
                other_cancel = gateway.v1 + f"/requests/{second_id}/cancel"
                async with http.post(other_cancel, headers={"Authorization": "Bearer sk-tenant-two"}) as c:
                    assert c.status == 202
                assert (await FrameReader(second).rest())[-1].json()["finish_reason"] == "cancelled"
