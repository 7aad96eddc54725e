"""The go/no-go thresholds, read from the shipped Prometheus rules
(``deploy/prometheus/alerts.yml``) so that ``bin/check-alerts`` and the
alerts cannot disagree.

Text in, thresholds out: no I/O here. The rules file is YAML; what this
reads of it is small and regular -- each ``- alert: NAME`` entry and its
``expr:``, inline or as a block scalar (``|``, ``>``, with ``-``/``+``) --
so it is read without a YAML library. Anything it cannot read, or an
expression that no longer ends in the comparison it expects, raises
``RulesUnreadable`` naming the alert: a changed rule shape fails loudly
instead of leaving a stale threshold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: The rules as shipped: next to the package in a checkout (an installed
#: package does not carry deploy/; pass ``--rules`` there).
DEFAULT_RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "alerts.yml"

TTFT = "GatewayTTFTP95High"
ERROR_RATIO = "GatewayErrorRatioHigh"
QUEUE_WAIT = "GatewayQueueWaitP95High"
COALESCING = "GatewayCoalescingRatioLow"

_NUMBER = r"([0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)"
#: ``<anything> > N`` at the very end: the alert fires above N.
_ABOVE = re.compile(rf"(?s)(.*\S)\s*>\s*{_NUMBER}\s*")
#: ``( followers / leaders ) < R and on (...) <followers a minute> > B``.
_RATIO_UNDER_BURST = re.compile(
    rf"(?s)(.*\S)\s*<\s*{_NUMBER}\s+and\s+on\s*\([^)]*\)(.*\S)\s*>\s*{_NUMBER}\s*"
)
_ALERT = re.compile(r"^(\s*)-\s+alert:\s*(\S+)\s*$")
_EXPR = re.compile(r"^(\s*)expr:\s*(.*?)\s*$")


class RulesUnreadable(Exception):
    """The rules file is missing, or an alert the checker needs is not in the expected shape."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    ttft_p95_max_s: float
    error_ratio_max: float
    queue_wait_p95_max_s: float
    #: Under a burst (more followers than ``burst_min_followers``), each
    #: leader must have at least this many followers.
    coalesce_min_ratio: float
    burst_min_followers: float


def expressions(text: str) -> dict[str, str]:
    """Alert name -> its ``expr``, for every ``- alert:`` entry."""
    lines = text.splitlines()
    found: dict[str, str] = {}
    current: str | None = None
    alert_indent = -1
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        alert = _ALERT.match(line)
        if alert:
            current, alert_indent = alert.group(2), len(alert.group(1))
            continue
        expr = _EXPR.match(line)
        if not expr or current is None or len(expr.group(1)) <= alert_indent:
            continue
        value = expr.group(2)
        if value and value[0] in "|>":
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(expr.group(1))):
                block.append(lines[i].strip())
                i += 1
            value = (" " if value[0] == ">" else "\n").join(part for part in block if part)
        else:
            value = _unquote(value)
        found[current] = value
        current = None
    return found


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def thresholds(text: str) -> Thresholds:
    """The checker's thresholds from the rules' text."""
    exprs = expressions(text)

    def above(alert: str, metric: str) -> float:
        expr = _expr(exprs, alert, metric)
        match = _ABOVE.fullmatch(expr)
        if not match:
            raise RulesUnreadable(f"alert {alert}: expected its expr to end in '> <number>'")
        return float(match.group(2))

    coalescing = _expr(exprs, COALESCING, "gateway_coalesce_total")
    match = _RATIO_UNDER_BURST.fullmatch(coalescing)
    if not match:
        raise RulesUnreadable(
            f"alert {COALESCING}: expected '(<ratio>) < <number> and on (...) <rate> > <number>'"
        )
    return Thresholds(
        ttft_p95_max_s=above(TTFT, "gateway_ttft_seconds"),
        error_ratio_max=above(ERROR_RATIO, "gateway_error_ratio_last_100"),
        queue_wait_p95_max_s=above(QUEUE_WAIT, "gateway_queue_wait_seconds"),
        coalesce_min_ratio=float(match.group(2)),
        burst_min_followers=float(match.group(4)),
    )


def _expr(exprs: dict[str, str], alert: str, metric: str) -> str:
    expr = exprs.get(alert)
    if expr is None:
        raise RulesUnreadable(f"no alert {alert} with an expr in the rules")
    if metric not in expr:
        raise RulesUnreadable(f"alert {alert}: its expr no longer reads {metric}")
    return expr


def load(path: Path = DEFAULT_RULES) -> Thresholds:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesUnreadable(f"cannot read the alert rules {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise RulesUnreadable(f"cannot read the alert rules {path}: not UTF-8 text") from exc
    try:
        return thresholds(text)
    except RulesUnreadable as exc:
        raise RulesUnreadable(f"{path}: {exc}") from exc
