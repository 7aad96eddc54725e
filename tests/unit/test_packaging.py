"""How the project installs: `make run` takes the runtime and the fast
extra only, `make test` adds the test and dev tools, and the demo page ships
as data of the gateway package without a setuptools warning."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def _dry_run(target: str, venv: Path, *variables: str) -> list[str]:
    """The commands ``make <target>`` would run for a fresh clone (no venv yet)."""
    # Not as a sub-make of `make test`: no inherited flags, no directory lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(
        [MAKE, "--no-print-directory", "-n", target, f"VENV={venv}", *variables],  # type: ignore[list-item]
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True, env=env,
    )
    return result.stdout.splitlines()


def _installs(commands: list[str]) -> list[str]:
    return [line.split("-e ", 1)[1] for line in commands if "pip install" in line and "-e " in line]


@needs_make
def test_make_run_installs_the_runtime_and_the_fast_extra_only(tmp_path) -> None:
    commands = _dry_run("run", tmp_path / "venv")
    assert _installs(commands) == ["'.[fast]'"]
    # The demo records its exchanges in the working tree and logs for a
    # terminal unless told otherwise.
    assert commands[-1] == (
        'EXCHANGE_LOG_URL="${EXCHANGE_LOG_URL-sqlite:///.gateway/exchanges.db}" '
        'LOG_FORMAT="${LOG_FORMAT-auto}" '
        f"{tmp_path / 'venv'}/bin/python -m gateway"
    )


@needs_make
@pytest.mark.parametrize("target", ["test", "install", "lint"])
def test_make_test_adds_the_test_and_dev_tools(tmp_path, target) -> None:
    assert _installs(_dry_run(target, tmp_path / "venv")) == ["'.[fast]'", "'.[test,dev,fast]'"]


def test_the_static_files_ship_as_package_data_without_a_warning(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "build_py",
         "--build-lib", str(tmp_path / "lib")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    output = result.stdout + result.stderr
    assert "gateway.static" not in output, output
    shipped = {path.name for path in (tmp_path / "lib" / "gateway" / "static").iterdir()}
    assert {"index.html", "sse-client.js", "chat.js", "style.css"} <= shipped
    assert not (tmp_path / "lib" / "gateway" / "static" / "__init__.py").exists()


@needs_make
def test_make_ttft_passes_a_target_and_the_suites_options(tmp_path) -> None:
    commands = _dry_run("ttft", tmp_path / "venv", "TARGET=https://h/v1", "TTFT_ARGS=--model m-1")
    assert commands[-1].split() == [
        f"{tmp_path / 'venv'}/bin/python", "-m", "gateway.suite", "--target", "https://h/v1",
        "--model", "m-1",
    ]
