"""The simulator's knobs: defaults, environment, flags, headers, directives."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from gateway.sim.profile import (
    KnobError,
    SimProfile,
    add_knob_arguments,
    directive_overrides,
    header_overrides,
    profile_from_process,
)


def test_defaults_model_an_8b_model() -> None:
    profile = SimProfile()
    assert (profile.ttft_ms, profile.ttft_jitter_ms) == (100, 20)
    assert (profile.itl_ms, profile.itl_jitter_ms) == (12, 2)
    assert (profile.tokens, profile.token_size, profile.max_concurrency) == (64, None, 0)
    assert (profile.max_concurrent_streams, profile.initial_window_size) == (1000, 65535)
    assert profile.fail_status is None and profile.retry_after_s == 1
    assert profile.reset_after is None and profile.kill_after is None and profile.goaway is None
    assert profile.malformed_after is None and profile.seed == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        profile.tokens = 3  # type: ignore[misc]


def test_environment_then_flags() -> None:
    parser = argparse.ArgumentParser()
    add_knob_arguments(parser)
    args = parser.parse_args(["--ttft-ms", "7", "--goaway", "refuse", "--max-concurrency", "4"])
    environ = {"SIM_TTFT_MS": "50", "SIM_TOKENS": "9", "SIM_TOKEN_SIZE": "none", "HOME": "/"}
    profile = profile_from_process(args, environ)
    assert profile.ttft_ms == 7  # the flag beats the environment
    assert profile.tokens == 9
    assert profile.token_size is None
    assert profile.goaway == "refuse"
    assert profile.max_concurrency == 4


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"SIM_TOKENS": "many"}, "tokens"),
        ({"SIM_FAIL_STATUS": "200"}, "fail_status"),
        ({"SIM_GOAWAY": "sometimes"}, "goaway"),
        ({"SIM_ITL_MS": "-1"}, "itl_ms"),
        ({"SIM_TTFT_MS": "nan"}, "ttft_ms must be a finite number >= 0"),
        ({"SIM_ITL_JITTER_MS": "inf"}, "itl_jitter_ms must be a finite number >= 0"),
        ({"SIM_INITIAL_WINDOW_SIZE": str(2**31)}, "initial_window_size"),
    ],
)
def test_bad_values_name_the_knob(environ: dict[str, str], message: str) -> None:
    with pytest.raises(KnobError, match=message):
        SimProfile.from_env(environ)


def test_headers_map_to_knobs() -> None:
    headers = [
        ("content-type", "application/json"),
        ("x-sim-ttft-ms", "1500"),
        ("x-sim-itl-jitter-ms", "0"),
        ("x-sim-retry-after", "7"),
        ("x-sim-reset-after", "3"),
    ]
    overrides = header_overrides(headers)
    assert overrides == {
        "ttft_ms": "1500",
        "itl_jitter_ms": "0",
        "retry_after_s": "7",
        "reset_after": "3",
    }
    profile = SimProfile().with_overrides(overrides, per_request=True)
    assert (profile.ttft_ms, profile.retry_after_s, profile.reset_after) == (1500, 7, 3)


def test_unknown_sim_header_is_an_error() -> None:
    with pytest.raises(KnobError, match="x-sim-ttft"):
        header_overrides([("x-sim-ttft", "5")])


def test_process_knobs_cannot_be_set_per_request() -> None:
    with pytest.raises(KnobError, match="per process"):
        SimProfile().with_overrides({"max_concurrency": "1"}, per_request=True)
    with pytest.raises(KnobError, match="x-sim-max-concurrent-streams"):
        header_overrides([("x-sim-max-concurrent-streams", "5")])


def test_directives_in_prompt_text() -> None:
    text = "Tell me a story [sim ttft_ms=1500 tokens=20] please [sim  tokens=3\tfail_status=503 ]"
    assert directive_overrides(text) == {"ttft_ms": "1500", "tokens": "3", "fail_status": "503"}
    assert directive_overrides("no directive, [simple] text, [sim]") == {}
    profile = SimProfile().with_overrides(directive_overrides(text), per_request=True)
    assert (profile.ttft_ms, profile.tokens, profile.fail_status) == (1500, 3, 503)


def test_bad_directives() -> None:
    with pytest.raises(KnobError, match="name=value"):
        directive_overrides("[sim tokens]")
    with pytest.raises(KnobError, match="unknown sim knob 'tokenz'"):
        SimProfile().with_overrides(directive_overrides("[sim tokenz=3]"), per_request=True)


def test_directive_regex_is_linear_on_hostile_text() -> None:
    # A long run of spaces without the closing bracket must not backtrack.
    assert directive_overrides("[sim" + " " * 50_000 + "x") == {}
