"""bin/check-alerts reads its thresholds from the shipped alert rules: a
threshold changed in the rules changes the checker, and a rule it can no
longer read is an error, not a stale constant."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway import check_alerts
from gateway.alert_rules import DEFAULT_RULES, RulesUnreadable, Thresholds, expressions, load, thresholds


def stats(*, ttft: float = 400.0, error_rate: float = 0.0, queue_wait: float = 1.0,
          leaders: int = 1, followers: int = 20) -> dict:
    return {
        "ttft_ms": {"p50": ttft, "p95": ttft, "samples": 10},
        "queue_wait_ms": {"p95": queue_wait, "samples": 10},
        "error_rate": error_rate,
        "coalesce": {"leaders": leaders, "followers": followers},
    }


def test_the_shipped_rules_give_the_go_no_go_lines() -> None:
    assert load() == Thresholds(
        ttft_p95_max_s=1.5,
        error_ratio_max=0.01,
        queue_wait_p95_max_s=1.0,
        coalesce_min_ratio=10.0,
        burst_min_followers=10.0,
    )


def _copy_with(tmp_path: Path, old: str, new: str) -> Path:
    text = DEFAULT_RULES.read_text()
    assert text.count(old) == 1, old
    copy = tmp_path / "alerts.yml"
    copy.write_text(text.replace(old, new))
    return copy


@pytest.mark.parametrize(
    ("old", "new", "document", "line"),
    [
        (") > 1.5\n", ") > 1.2\n", stats(ttft=1400.0), "ttft p95"),
        ("gateway_error_ratio_last_100 > 0.01", "gateway_error_ratio_last_100 > 0.005",
         stats(error_rate=0.008), "error rate"),
        (") > 1\n", ") > 0.5\n", stats(queue_wait=700.0), "queue wait p95"),
        (") < 10\n", ") < 25\n", stats(leaders=1, followers=20), "coalescing"),
    ],
)
def test_the_checker_follows_a_threshold_changed_in_the_rules(
    tmp_path, monkeypatch, capsys, old, new, document, line
) -> None:
    monkeypatch.setattr(check_alerts, "fetch_stats", lambda url, timeout_s: document)
    assert check_alerts.main(["http://gateway.invalid"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "OK: no alert"

    changed = _copy_with(tmp_path, old, new)
    assert check_alerts.main(["http://gateway.invalid", "--rules", str(changed)]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == f"ALERT: {line} (runbook: deploy/ALERTING.md)"


def test_the_burst_line_follows_the_rules_too(tmp_path) -> None:
    changed = _copy_with(tmp_path, "* 60 > 10", "* 60 > 30")
    lines = load(changed)
    assert lines.burst_min_followers == 30
    # 20 followers on 3 leaders: a burst under the shipped line, not under this one.
    (shipped,) = [c for c in check_alerts.evaluate(stats(leaders=3, followers=20)) if c.name == "coalescing"]
    (moved,) = [c for c in check_alerts.evaluate(stats(leaders=3, followers=20), lines)
                if c.name == "coalescing"]
    assert (shipped.status, moved.status) == ("ALERT", "n/a")


def test_inline_quoted_and_folded_expressions_are_read() -> None:
    text = """
groups:
  - name: g
    rules:
      - alert: A
        expr: "gateway_error_ratio_last_100 > 0.02"
        for: 1m
      - alert: B
        expr: >-
          histogram_quantile(0.95,
            rate(gateway_ttft_seconds_bucket[1m])) > 2
        labels:
          severity: page
      - alert: C
        expr: up == 0
"""
    assert expressions(text) == {
        "A": "gateway_error_ratio_last_100 > 0.02",
        "B": "histogram_quantile(0.95, rate(gateway_ttft_seconds_bucket[1m])) > 2",
        "C": "up == 0",
    }


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("alert: GatewayTTFTP95High", "alert: GatewayTTFTSlow",
         "no alert GatewayTTFTP95High with an expr in the rules"),
        ("gateway_error_ratio_last_100 > 0.01", "gateway_error_ratio_last_100 >= 0.01 * 2",
         "alert GatewayErrorRatioHigh: expected its expr to end in '> <number>'"),
        ("gateway_error_ratio_last_100 > 0.01", "gateway_errors > 0.01",
         "alert GatewayErrorRatioHigh: its expr no longer reads gateway_error_ratio_last_100"),
    ],
)
def test_a_rule_the_checker_cannot_read_is_an_error(tmp_path, capsys, old, new, message) -> None:
    changed = _copy_with(tmp_path, old, new)
    with pytest.raises(RulesUnreadable, match="^" + re.escape(message)):
        thresholds(changed.read_text())
    assert check_alerts.main(["http://gateway.invalid", "--rules", str(changed)]) == 2
    assert capsys.readouterr().err == f"check-alerts: {changed}: {message}\n"


def test_missing_rules_file_is_exit_2(tmp_path, capsys) -> None:
    missing = tmp_path / "none.yml"
    assert check_alerts.main(["http://gateway.invalid", "--rules", str(missing)]) == 2
    assert capsys.readouterr().err.startswith(f"check-alerts: cannot read the alert rules {missing}:")


def test_a_rules_file_that_is_not_text_is_exit_2(tmp_path, capsys) -> None:
    binary = tmp_path / "alerts.yml.gz"
    binary.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe not UTF-8")
    assert check_alerts.main(["http://gateway.invalid", "--rules", str(binary)]) == 2
    assert capsys.readouterr().err == (
        f"check-alerts: cannot read the alert rules {binary}: not UTF-8 text\n"
    )
