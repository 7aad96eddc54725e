"""deploy/grafana/gateway.json: valid JSON, the panels the issue asks for,
and every expression refers only to metrics the gateway exposes and parses
(structurally always; as PromQL through promtool when it is installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.metrics_scrape import exposed_metric_names

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "gateway.json"
METRIC = re.compile(r"\bgateway_[a-z0-9_]+\b")
#: Grafana's variables, replaced by what they expand to for promtool.
VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$job": ".*", "$instance": ".*"}
PAIRS = {"(": ")", "[": "]", "{": "}"}


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query target."""
    return [
        (panel["title"], target["expr"])
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def structural_problem(expr: str) -> str | None:
    """Balanced brackets outside string literals, closed strings, and a
    range selector inside every rate()/increase(); None when fine."""
    stack: list[str] = []
    quote: str | None = None
    for char in expr:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in PAIRS:
            stack.append(PAIRS[char])
        elif char in PAIRS.values() and (not stack or stack.pop() != char):
            return f"unbalanced {char!r}"
    if quote or stack:
        return "unclosed string or bracket"
    bare = re.sub(r'"[^"]*"', '""', expr)  # label values may hold any character
    for call in re.finditer(r"\b(rate|increase)\(", bare):
        if not re.match(r"[^()]*\[[^\]]+\]\)", bare[call.end():]):
            return f"{call.group(1)}() without a range selector"
    return None


def test_dashboard_is_a_grafana_dashboard():
    dashboard = load()
    assert dashboard["uid"] == "llm-stream-gateway" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "job", "instance"}
    for panel in all_panels(dashboard["panels"]):
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]


def test_every_expression_uses_only_exposed_metrics_and_is_well_formed():
    exposed = exposed_metric_names()
    dashboard = load()
    queries = expressions(dashboard)
    queries += [("variable " + v["name"], v["definition"])
                for v in dashboard["templating"]["list"] if "definition" in v]
    assert len(queries) > 20
    for title, expr in queries:
        used = set(METRIC.findall(expr))
        assert used, f"{title}: no gateway metric in {expr}"
        assert used <= exposed, f"{title}: unknown {used - exposed}"
        assert structural_problem(expr) is None, (title, expr, structural_problem(expr))
        # Every panel filters by the dashboard's job and instance.
        if not title.startswith("variable"):
            assert 'job=~"$job"' in expr and 'instance=~"$instance"' in expr, title


def test_the_panels_the_issue_asks_for():
    exprs = [expr for _, expr in expressions(load())]
    joined = "\n".join(exprs)
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(e.startswith(f"histogram_quantile({quantile}, ") and "gateway_ttft_seconds_bucket" in e
                   for e in exprs), f"TTFT p{quantile}"
    for metric in ("gateway_queue_wait_seconds_bucket", "gateway_error_ratio_last_100",
                   "gateway_coalesce_total", "gateway_active_streams", "gateway_cancel_seconds_bucket",
                   "gateway_upstream_connections"):
        assert metric in joined, metric
    assert re.search(r'role="follower"[^/]*/[^/]*role="leader"', joined), "coalescing ratio"


def test_the_structural_check_catches_broken_expressions():
    assert structural_problem('sum(rate(gateway_requests_total{api="x"}[1m]))') is None
    assert structural_problem('sum(rate(gateway_requests_total{api="x"}[1m])') is not None
    assert structural_problem('sum(rate(gateway_requests_total{api="x)"}[1m]))') is None
    assert structural_problem("rate(gateway_requests_total)") is not None
    assert structural_problem('gateway_active_streams{job="x}') is not None


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_every_expression_is_valid_promql(tmp_path):
    rules = []
    for number, (_, expr) in enumerate(expressions(load())):
        for variable, value in sorted(VARIABLES.items(), key=lambda item: -len(item[0])):
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:panel_{number}", "expr": expr})
    # JSON is YAML: promtool reads this rules file as it is.
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
