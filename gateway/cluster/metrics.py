"""The cluster's Prometheus series, registered only in cluster mode."""

from __future__ import annotations

from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Where a cluster-mode request's answer comes from.
ROLES = ("owner", "local_follower", "remote_follower")
REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class ClusterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "gateway_cluster_up", "1 while the cluster directory (Redis) answers", registry=registry
        )
        requests = Counter(
            "gateway_cluster_requests",
            "Cluster-mode requests by where their answer comes from",
            ("role",),
            registry=registry,
        )
        self.requests = {role: requests.labels(role) for role in ROLES}
        self.redis_seconds = Histogram(
            "gateway_cluster_redis_seconds",
            "Round trips to the cluster directory",
            buckets=REDIS_BUCKETS,
            registry=registry,
        )
        self.redis_errors = Counter(
            "gateway_cluster_redis_errors",
            "Directory calls that failed or timed out (served locally instead)",
            registry=registry,
        )
        self.peer_streams = Counter(
            "gateway_cluster_peer_streams",
            "Streams this process served to other members' relays",
            registry=registry,
        )
        #: The same counts as plain numbers, and the recent round trips, for /stats.
        self.peer_streams_total = 0
        self.redis_errors_total = 0
        self.redis_recent_s: deque[float] = deque(maxlen=1000)
        self.takeovers = Counter(
            "gateway_cluster_takeovers",
            "Keys taken over from an owner that did not answer",
            registry=registry,
        )

    def served_peer(self) -> None:
        self.peer_streams.inc()
        self.peer_streams_total += 1

    def redis_error(self) -> None:
        self.redis_errors.inc()
        self.redis_errors_total += 1

    def redis_round_trip(self, seconds: float) -> None:
        self.redis_seconds.observe(seconds)
        self.redis_recent_s.append(seconds)
