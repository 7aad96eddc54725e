"""deploy/systemd: the unit drains before systemd kills, is hardened, and
passes ``systemd-analyze``; the environment example is the real configuration."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import Settings

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "llm-gateway.service"
ENV_EXAMPLE = ROOT / "deploy" / "systemd" / "llm-gateway.env.example"
CONFIGURATION_DOC = ROOT / "docs" / "configuration.md"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> key -> every value (systemd keys may repeat)."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def env_assignments(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(active, commented-out) ``NAME=value`` lines of an environment file."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(#?)([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            (commented if match.group(1) else active)[match.group(2)] = match.group(3)
    return active, commented


class _RecordingEnvironment(dict[str, str]):
    """An empty environment that remembers every name looked up in it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.names.add(key)
        return super().get(key, default)


def configuration_variables() -> set[str]:
    """Every variable ``Settings.from_env`` reads (found by asking it)."""
    environment = _RecordingEnvironment()
    Settings.from_env(environment)
    return environment.names


def test_the_recording_finds_the_documented_variables() -> None:
    names = configuration_variables()
    assert {"GATEWAY_PORT", "UPSTREAM_URL", "TRUSTED_PROXIES", "DRAIN_TIMEOUT_S"} <= names


def test_stopping_drains_before_systemd_would_kill() -> None:
    service = parse_unit(UNIT.read_text())["Service"]
    drain_timeout_s = Settings.from_env(env_assignments(ENV_EXAMPLE.read_text())[0]).drain_timeout_s
    assert service["KillSignal"] == ["SIGTERM"]
    assert float(service["TimeoutStopSec"][0]) >= drain_timeout_s + 10
    assert service["Restart"] == ["on-failure"]  # a drained stop exits 0: no restart
    # The exit status of a bad configuration value (python -m gateway).
    assert service["RestartPreventExitStatus"] == ["2"]
    assert service["ExecStart"][0].endswith("/.venv/bin/python -m gateway --require-upstream")
    assert service["EnvironmentFile"] == ["/etc/llm-gateway/llm-gateway.env"]


def test_unit_is_hardened() -> None:
    service = parse_unit(UNIT.read_text())["Service"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter": "@system-service",
    }.items():
        assert value in service[key], key


def test_environment_example_is_the_real_configuration() -> None:
    active, commented = env_assignments(ENV_EXAMPLE.read_text())
    assert not active.keys() & commented.keys()
    # Every variable the gateway reads, and nothing it does not.
    assert active.keys() | commented.keys() == configuration_variables()
    # The commented-out values are the real defaults...
    assert Settings.from_env(commented) == Settings.from_env({})
    # ... and the active ones a valid configuration.
    settings = Settings.from_env(active)
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)


def _documented_variables(text: str) -> Iterator[str]:
    for row in text.splitlines():
        if row.startswith("| `"):
            yield from re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])


def test_configuration_table_lists_every_variable() -> None:
    assert set(_documented_variables(CONFIGURATION_DOC.read_text())) == configuration_variables()


def _installed_copy(tmp_path: Path) -> Path:
    """The unit as installed here: systemd-analyze verify checks that the
    ExecStart program exists, so point it at this checkout's interpreter."""
    text = UNIT.read_text()
    text, found = re.subn(
        r"^ExecStart=\S+ -m gateway --require-upstream$",
        f"ExecStart={sys.executable} -m gateway --require-upstream", text,
        flags=re.MULTILINE,
    )
    assert found == 1
    text, found = re.subn(r"^WorkingDirectory=\S+$", f"WorkingDirectory={ROOT}", text,
                          flags=re.MULTILINE)
    assert found == 1
    installed = tmp_path / UNIT.name
    installed.write_text(text)
    return installed


@needs_systemd_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    installed = _installed_copy(tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(installed)],  # type: ignore[list-item]
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    # Complaints about other units on this machine are not ours to fix.
    assert [line for line in result.stderr.splitlines() if UNIT.name in line] == []


@needs_systemd_analyze
def test_systemd_analyze_security_rates_it_ok(tmp_path: Path) -> None:
    installed = _installed_copy(tmp_path)
    result = subprocess.run(
        # --threshold is in tenths: fail above an exposure of 2.0 ("OK").
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", "--no-pager",  # type: ignore[list-item]
         str(installed)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze cannot assess a unit file offline (systemd < 250)")
    overall = [line for line in result.stdout.splitlines() if "Overall exposure" in line]
    print(overall)
    assert result.returncode == 0, result.stdout + result.stderr


def _exec_start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The unit's ExecStart, this checkout's interpreter in place of the
    installed one, with ``env`` as its environment file."""
    command = parse_unit(UNIT.read_text())["Service"]["ExecStart"][0].split()
    return subprocess.run(
        [sys.executable, *command[1:]], env={**env, "GATEWAY_PORT": "0"}, cwd=ROOT,
        capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL,
    )


def test_the_unit_refuses_to_start_without_an_upstream() -> None:
    """An environment file without UPSTREAM_URL would have the gateway serve
    the simulator's made-up answers: the unit's command exits at once with
    the status that is not restarted, naming what is missing."""
    active, _ = env_assignments(ENV_EXAMPLE.read_text())
    assert active["UPSTREAM_URL"]
    without = {name: value for name, value in active.items() if name != "UPSTREAM_URL"}
    result = _exec_start(without)
    service = parse_unit(UNIT.read_text())["Service"]
    assert str(result.returncode) in service["RestartPreventExitStatus"]
    (line,) = result.stderr.splitlines()
    assert "UPSTREAM_URL" in line and "GATEWAY_CONFIG" in line
