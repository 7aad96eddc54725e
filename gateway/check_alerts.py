"""``bin/check-alerts [URL]``: the four go/no-go lines, read from a running
gateway's ``/stats``, without Prometheus.

Prints one line per threshold (name, value, the line, OK/ALERT/n/a) and exits
0 when nothing is alerting, 1 on any alert, 2 when ``/stats`` or the rules
cannot be read.
The thresholds are read from the alert rules themselves
(``deploy/prometheus/alerts.yml``, or ``--rules``; gateway/alert_rules.py), so
the two cannot drift; the runbook is ``deploy/ALERTING.md``. "n/a" means
there is nothing to judge yet (no samples, or no burst for the coalescing
line) and does not fail the check.

A command-line tool with no event loop: a plain blocking ``urllib`` call is
the right tool here.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gateway import alert_rules
from gateway.alert_rules import RulesUnreadable, Thresholds

DEFAULT_URL = "http://127.0.0.1:8080"

EXIT_OK, EXIT_ALERT, EXIT_UNREADABLE = 0, 1, 2

Status = Literal["OK", "ALERT", "n/a"]


class StatsUnreadable(Exception):
    """``/stats`` did not answer, or not with the documented JSON."""


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    value: str
    line: str
    status: Status


def _number(stats: Mapping[str, Any], *path: str) -> float | None:
    """The number at ``path`` (None stays None: no samples yet)."""
    node: Any = stats
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            raise StatsUnreadable(f"/stats has no field {'.'.join(path)}")
        node = node[part]
    if node is None:
        return None
    if isinstance(node, bool) or not isinstance(node, int | float):
        raise StatsUnreadable(f"/stats field {'.'.join(path)} is not a number: {node!r}")
    return float(node)


def _at_most(name: str, value: float | None, limit: float, unit: str, digits: int) -> Check:
    line = f"<= {limit:g} {unit}"
    if value is None:
        return Check(name, "no samples", line, "n/a")
    return Check(name, f"{value:.{digits}f} {unit}", line, "OK" if value <= limit else "ALERT")


def evaluate(stats: Mapping[str, Any], thresholds: Thresholds | None = None) -> list[Check]:
    """The four checks for one ``/stats`` document, against ``thresholds``
    (by default those of the shipped rules)."""
    lines = thresholds or alert_rules.load()
    error_rate = _number(stats, "error_rate")
    leaders = _number(stats, "coalesce", "leaders") or 0.0
    followers = _number(stats, "coalesce", "followers") or 0.0
    checks = [
        _at_most("ttft p95", _number(stats, "ttft_ms", "p95"), lines.ttft_p95_max_s * 1000, "ms", 1),
        _at_most(
            "error rate",
            None if error_rate is None else error_rate * 100,
            lines.error_ratio_max * 100,
            "%",
            2,
        ),
        _at_most(
            "queue wait p95",
            _number(stats, "queue_wait_ms", "p95"),
            lines.queue_wait_p95_max_s * 1000,
            "ms",
            1,
        ),
    ]
    line = f">= {lines.coalesce_min_ratio:g} followers/leader under burst"
    if followers <= lines.burst_min_followers:
        checks.append(Check("coalescing", f"{followers:.0f} followers", line, "n/a"))
    else:
        # No leader at all under a burst is perfect sharing (ratio infinite).
        ratio = followers / leaders if leaders else float("inf")
        status: Status = "OK" if ratio >= lines.coalesce_min_ratio else "ALERT"
        checks.append(Check("coalescing", f"{ratio:.1f}", line, status))
    return checks


def render(checks: Sequence[Check]) -> str:
    return "\n".join(
        f"{check.name:<16}{check.value:<14}{check.line:<40}{check.status}" for check in checks
    )


def stats_url(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith("/stats") else base + "/stats"


def fetch_stats(url: str, timeout_s: float) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise StatsUnreadable(f"{url} answered {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatsUnreadable(f"cannot read {url}: {reason}") from exc
    except (ValueError, http.client.InvalidURL) as exc:
        # A URL that cannot be one (a port that is no number, an unclosed
        # IPv6 bracket): unreadable, exit 2, not an alert's exit 1.
        raise StatsUnreadable(f"cannot read {url}: {exc}") from exc
    except http.client.HTTPException as exc:
        # Its text quotes what the server sent instead of a status line.
        raise StatsUnreadable(f"{url} did not answer HTTP") from exc
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise StatsUnreadable(f"{url} did not answer JSON") from exc
    if not isinstance(document, dict):
        raise StatsUnreadable(f"{url} did not answer a JSON object")
    return document


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="check-alerts",
        description="Check a running gateway's /stats against the go/no-go alert lines "
        "(runbook: deploy/ALERTING.md). Exit 0: all OK, 1: an alert, 2: /stats or the rules "
        "unreadable.",
    )
    parser.add_argument("url", nargs="?", default=DEFAULT_URL,
                        help=f"the gateway's base URL (default {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="how long to wait for /stats (default 5)")
    parser.add_argument("--rules", type=Path, default=alert_rules.DEFAULT_RULES, metavar="FILE",
                        help="the Prometheus alert rules the thresholds are read from "
                        "(default: deploy/prometheus/alerts.yml of this checkout)")
    args = parser.parse_args(argv)
    url = stats_url(args.url)
    try:
        thresholds = alert_rules.load(args.rules)
        checks = evaluate(fetch_stats(url, args.timeout), thresholds)
    except (StatsUnreadable, RulesUnreadable) as exc:
        print(f"check-alerts: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(render(checks))
    alerting = [check.name for check in checks if check.status == "ALERT"]
    if alerting:
        print(f"ALERT: {', '.join(alerting)} (runbook: deploy/ALERTING.md)")
        return EXIT_ALERT
    print("OK: no alert")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
