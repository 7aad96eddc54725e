"""A pytest plugin: under ``CI=true`` a skipped test fails the run.

CI installs every tool a test needs (``.ci/run``), so a skip there is a test
that did not run while the run looks green: a missing package, a renamed
binary, an import that broke. Locally a skip stays a skip (a laptop without
nginx still runs the rest). An xfail is not a skip and is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

_PREFIX = "skipped under CI=true, which must run every test: "


def ci_enabled() -> bool:
    """``CI`` set to a true value, as GitHub Actions, GitLab and most runners set it."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _fail_a_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and ci_enabled():
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = _PREFIX + reason


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A skip in setup (``skipif``) or in the test (``pytest.skip``)."""
    report = yield
    _fail_a_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    """A whole module skipped at import (``pytest.importorskip``)."""
    report = yield
    _fail_a_skip(report)
    return report
