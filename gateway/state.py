"""What the handlers share: one ``GatewayState`` per app, under an AppKey."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from actors.registry import Registry
from gateway.admission import AdmissionQueue
from gateway.config import Settings
from gateway.exchanges.log import ExchangeLog
from gateway.metrics import GatewayMetrics
from gateway.routing.router import Router
from gateway.sse import Keepalive
from gateway.upstream.deadlines import Deadlines
from gateway.upstream.source import SourceTimeouts

if TYPE_CHECKING:
    from gateway.cluster.member import Member


@dataclass(eq=False)
class GatewayState:
    settings: Settings
    metrics: GatewayMetrics
    admission: AdmissionQueue
    registry: Registry
    #: Where requests go, for the start-up line (no credentials).
    upstream_url: str
    #: No UPSTREAM_URL: requests go to the built-in simulator, whose answers
    #: are made up. Said at start, in /readyz and in /stats.
    simulated: bool
    #: Every upstream; picks them per request (gateway/routing/).
    router: Router
    source_timeouts: SourceTimeouts
    #: The read deadlines of every open upstream stream, on one loop timer.
    deadlines: Deadlines
    #: Pings every open event stream that has gone silent.
    keepalive: Keepalive
    #: Cluster mode (REDIS_URL): this process as a member; None: one process.
    cluster: Member | None = None
    active_streams: int = 0
    #: Set on SIGTERM: /readyz answers 503 and new model requests are refused.
    draining: bool = False
    #: The exchange log (and the token counters); None only in apps built
    #: without one.
    exchanges: ExchangeLog | None = None

    @property
    def queue_depth(self) -> int:
        """Requests waiting for admission: in the gateway's queue
        (MAX_QUEUE), or in a routed upstream's own (its max_inflight)."""
        return self.admission.depth + sum(up.waiting for up in self.router.upstreams)


@dataclass(eq=False, slots=True)
class RequestRecord:
    """Filled in by the handler, logged once by the middleware at the end:
    the request's canonical log line."""

    request_id: str
    arrived_at: float
    api: str = "ops"
    role: str | None = None
    key_prefix: str | None = None
    queue_wait_ms: float | None = None
    ttft_ms: float | None = None
    bytes_sent: int = 0
    outcome: str = "ok"
    status: int = 200
    error_code: str | None = None


STATE = web.AppKey("gateway_state", GatewayState)
RECORD = web.RequestKey("gateway_record", RequestRecord)
