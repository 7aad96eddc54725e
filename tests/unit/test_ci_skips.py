"""tests/ci_skips.py: under CI=true every kind of skip fails the run, and
nothing else changes; without CI a skip stays a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ci_skips import ci_enabled

ROOT = Path(__file__).resolve().parents[2]

SKIPS = '''
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="the tool is not installed")
def test_skipif():
    pass

def test_skip_inside():
    pytest.skip("skipped from inside")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_xfail():
    assert False
'''

IMPORT_SKIP = '''
import pytest
pytest.importorskip("no_such_module_anywhere")

def test_never_collected():
    pass
'''


def run_pytest(tmp_path: Path, ci: str | None, source: str = SKIPS) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_skips.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "tests.ci_skips",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "-o", "addopts=",
         "-o", "asyncio_default_fixture_loop_scope=function", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, check=False,
    )


def test_under_ci_every_skip_fails_the_run(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "true")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "skipped under CI=true, which must run every test: Skipped: the tool is not installed" in out
    assert "skipped under CI=true, which must run every test: Skipped: skipped from inside" in out
    assert "PASSED test_skips.py::test_runs" in out
    assert "XFAIL test_skips.py::test_xfail" in out
    assert " skipped" not in out.splitlines()[-1]


def test_under_ci_a_module_skipped_at_import_is_a_collection_error(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "true", IMPORT_SKIP)
    assert result.returncode == 2, result.stdout + result.stderr  # interrupted
    assert ("ERROR test_skips.py - skipped under CI=true, which must run every test: "
            "Skipped: could not import 'no_such_module_anywhere'") in result.stdout


def test_without_ci_a_skip_stays_a_skip(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith("1 passed, 2 skipped, 1 xfailed in ")
    result = run_pytest(tmp_path, "false", IMPORT_SKIP)
    assert result.returncode == 5, result.stdout + result.stderr  # no test collected
    assert result.stdout.splitlines()[-1].startswith("1 skipped in ")


@pytest.mark.parametrize(
    ("value", "enabled"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True),
     ("false", False), ("0", False), ("", False), (None, False)],
)
def test_what_counts_as_ci(monkeypatch: pytest.MonkeyPatch, value: str | None, enabled: bool) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert ci_enabled() is enabled
