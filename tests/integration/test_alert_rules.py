"""The shipped alert rules, proven with promtool: the files are valid, the
rule tests pass, and the rule tests fail when a rule is weakened or
tightened (so a passing run means something). Also: every alert has its
annotations, a runbook section, and firing and quiet cases."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.metrics_scrape import exposed_metric_names

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts.test.yml"
RUNBOOK = DEPLOY / "ALERTING.md"

GO_NO_GO = {
    "GatewayTTFTP95High",
    "GatewayErrorRatioHigh",
    "GatewayQueueWaitP95High",
    "GatewayCoalescingRatioLow",
}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: prometheus)")


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def alert_blocks(text: str) -> dict[str, str]:
    """Each ``- alert: Name`` block of a rules file, by name (the file is ours
    and regular; promtool checks that it is valid YAML and PromQL)."""
    parts = re.split(r"^\s*- alert: (\w+)\s*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@needs_promtool
def test_promtool_check_rules():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 4 rules found" in result.stdout


@needs_promtool
def test_promtool_check_config_loads_the_rules():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


@needs_promtool
def test_promtool_rule_tests_pass():
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


#: (what changes, text in alerts.yml, replacement). Each must break a rule test.
MUTATIONS = [
    ("TTFT line looser", ") > 1.5\n", ") > 2.5\n"),
    ("TTFT line stricter", ") > 1.5\n", ") > 1.4\n"),
    ("TTFT quantile", "(0.95,\n            sum by (job, instance, le) (rate(gateway_ttft",
     "(0.9,\n            sum by (job, instance, le) (rate(gateway_ttft"),
    ("TTFT for shorter", ") > 1.5\n        for: 5m", ") > 1.5\n        for: 2m"),
    ("TTFT for longer", ") > 1.5\n        for: 5m", ") > 1.5\n        for: 6m"),
    ("error line inclusive", "last_100 > 0.01", "last_100 >= 0.01"),
    ("error line looser", "last_100 > 0.01", "last_100 > 0.03"),
    ("error without for", "last_100 > 0.01\n        for: 1m", "last_100 > 0.01\n        for: 0s"),
    ("queue line looser", ") > 1\n", ") > 2.5\n"),
    ("queue line stricter", ") > 1\n", ") > 0.9\n"),
    ("coalescing ratio line", ") < 10\n", ") < 5\n"),
    ("burst line inclusive", "* 60 > 10", "* 60 >= 10"),
    ("burst line higher", "* 60 > 10", "* 60 > 40"),
    ("coalescing without the burst condition",
     '          and on (job, instance)\n          sum by (job, instance) (rate(gateway_coalesce_total'
     '{role="follower"}[2m])) * 60 > 10\n', "\n"),
]


@needs_promtool
@pytest.mark.parametrize(("change", "old", "new"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_rule_tests_catch_a_changed_rule(tmp_path, change, old, new):
    rules = ALERTS.read_text()
    assert rules.count(old) == 1, f"mutation {change!r} must change exactly one place"
    (tmp_path / ALERTS.name).write_text(rules.replace(old, new))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    assert promtool("check", "rules", ALERTS.name, cwd=tmp_path).returncode == 0  # still valid
    result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0, f"the rule tests did not notice: {change}"
    assert "FAILED" in result.stdout + result.stderr


def test_the_four_go_no_go_alerts_with_annotations_and_runbooks():
    blocks = alert_blocks(ALERTS.read_text())
    assert set(blocks) == GO_NO_GO
    runbook = RUNBOOK.read_text()
    headings = {line[3:].strip() for line in runbook.splitlines() if line.startswith("## ")}
    for name, block in blocks.items():
        for annotation in ("summary", "description", "runbook_url"):
            assert re.search(rf"^\s+{annotation}: \S", block, re.MULTILINE), (name, annotation)
        assert re.search(r"^\s+severity: (page|ticket)$", block, re.MULTILINE), name
        assert f'runbook_url: "deploy/ALERTING.md#{name.lower()}"' in block
        assert name in headings, f"ALERTING.md has no '## {name}' section"
        section = runbook.split(f"## {name}", 1)[1].split("\n## ", 1)[0]
        for part in ("What it means", "How to check", "What to do"):
            assert f"### {part}" in section, (name, part)


def test_every_alert_has_firing_and_quiet_rule_tests():
    text = RULE_TESTS.read_text()
    cases = re.findall(r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", text)
    for name in GO_NO_GO:
        kinds = {bool(quiet) for alert, quiet in cases if alert == name}
        assert kinds == {True, False}, f"{name}: needs a firing and a quiet case"


def test_the_rules_use_only_metrics_the_gateway_exposes():
    exposed = exposed_metric_names()
    used = set(re.findall(r"\bgateway_[a-z0-9_]+", ALERTS.read_text()))
    assert used and used <= exposed, used - exposed
