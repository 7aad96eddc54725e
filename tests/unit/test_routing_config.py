"""The routing file: what it accepts, and one clear line for what it does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, Settings
from gateway.routing.config import RoutingConfigError, load_routing, parse_routing

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "gateway.example.toml"
KEYS = {"OPENAI_API_KEY": "sk-1", "AZURE_EAST_KEY": "az-2", "ANTHROPIC_API_KEY": "sk-ant-3"}


def test_the_example_file_is_a_valid_configuration() -> None:
    routing = load_routing(str(EXAMPLE), KEYS)
    names = [up.name for up in routing.upstreams]
    assert names == ["openai", "azure-east", "claude", "backup"]
    openai = routing.upstreams[0]
    assert openai.api_key == "sk-1" and "sk-1" not in repr(openai)
    assert openai.upstream_model("gpt-4o") == "gpt-4o-2024-08-06"
    assert openai.upstream_model("gpt-4o-mini") == "gpt-4o-mini"
    assert [up.name for up in routing.candidates("gpt-4o")] == ["openai", "azure-east", "backup"]
    assert [up.name for up in routing.candidates("llama")] == ["backup"]
    assert routing.listed_models() == ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5"]
    assert routing.retry.circuit_failures == 5


def test_defaults_of_a_minimal_table() -> None:
    routing = parse_routing('[[upstream]]\nname = "a"\nurl = "http://h:1/v1/"\n', {})
    (only,) = routing.upstreams
    assert (only.url, only.format, only.protocol, only.models, only.priority, only.weight) == (
        "http://h:1/v1", "openai", "auto", ("*",), 0, 1.0)
    assert routing.from_file


BAD = [
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\nweight = -1\n',
     "line 4: upstream[0].weight: must be a number > 0"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\n\n[[upstream]]\nname = "b"\n'
     'url = "ftp://h"\n', "line 7: upstream[1].url: an http:// or https:// URL"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\nformat = "cohere"\n',
     "line 4: upstream[0].format: must be one of openai, anthropic"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\napi_key_env = "NOPE"\n',
     "line 4: upstream[0].api_key_env: the environment has no NOPE"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\nmodels = []\n',
     "line 4: upstream[0].models: must be a non-empty list"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\nwieght = 2\n',
     "line 4: upstream[0].wieght: unknown field"),
    ('[[upstream]]\nurl = "http://h/v1"\n', "line 1: upstream[0].name: missing"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\n[[upstream]]\nname = "a"\nurl = "http://i/v1"\n',
     "line 5: upstream[1].name: 'a' is used by another upstream"),
    ('[[upstream]]\nname = "a"\nurl = "https://h/v1"\nprotocol = "h2c"\n',
     "line 4: upstream[0].protocol: h2c is cleartext"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\npriority = true\n',
     "line 4: upstream[0].priority: must be an integer"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\n[routing]\nmax_attempts = 0\n',
     "line 5: max_attempts: must be an integer >= 1"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\n[routing]\nretries = 3\n',
     "line 5: retries: unknown field in [routing]"),
    # A model_map entry for a model the table does not serve is never used
    # (a typo of a served name would pass it on unmapped).
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\nmodels = ["gpt-4o"]\n'
     'model_map = { "gpt4o" = "gpt-4o-2024-08-06" }\n',
     "line 5: upstream[0].model_map: 'gpt4o' is not one of its models"),
    # In a [upstream.model_map] sub-table, or as dotted keys, the entry's
    # own line, and the entry of its own [[upstream]].
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\nmodels = ["gpt-4o"]\n\n'
     '[upstream.model_map]\n"gpt-4o" = "gpt-4o-2024-08-06"\ngpt4o = "x"\n',
     "line 8: upstream[0].model_map: 'gpt4o' is not one of its models"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\n[upstream.model_map]\nb = "x"\n'
     '[[upstream]]\nname = "b"\nurl = "http://i/v1"\n[upstream.model_map]\na = "y"\nb = 4\n',
     "line 11: upstream[1].model_map: must be a table of names"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\nmodels = ["gpt-4o"]\n'
     'model_map."gpt-4o" = "gpt-4o-2024-08-06"\nmodel_map.gpt4o = "x"\n',
     "line 6: upstream[0].model_map: 'gpt4o' is not one of its models"),
    # A duration, as in the environment, is at most a day: past a float
    # (or a timer), the start ended in an OverflowError traceback.
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\nfirst_token_timeout_ms = 86400001\n',
     "line 4: upstream[0].first_token_timeout_ms: must be an integer >= 1 and <= 86400000"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\n[routing]\ncircuit_cooldown_ms = 1'
     + "0" * 400 + "\n", "line 5: circuit_cooldown_ms: must be an integer >= 1 and <= 86400000"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1"\n[routing]\nmax_retry_after_ms = 86400001\n',
     "line 5: max_retry_after_ms: must be an integer >= 0 and <= 86400000"),
    ('[upstreams]\nname = "a"\n', "line 1: upstreams: unknown table or key"),
    ("# nothing\n", "no [[upstream]] table"),
    ('upstream = "x"\n', "line 1: upstream: must be [[upstream]] tables"),
    ('[[upstream]]\nname = "a"\nurl = "http://h/v1\n', "not valid TOML: "),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_a_bad_file_names_its_line_and_field(text: str, message: str) -> None:
    with pytest.raises(RoutingConfigError) as caught:
        parse_routing(text, {}, source="gw.toml")
    line = str(caught.value)
    assert line.startswith("gw.toml: ") and message in line, line
    assert "\n" not in line


def test_the_toml_syntax_error_carries_its_line() -> None:
    with pytest.raises(RoutingConfigError, match=r"at line 3"):
        parse_routing('[[upstream]]\nname = "a"\nurl = = 1\n', {})


def test_settings_read_the_file_and_refuse_it_with_upstream_url(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('[[upstream]]\nname = "a"\nurl = "http://h/v1"\napi_key_env = "K"\n')
    settings = Settings.from_env({"GATEWAY_CONFIG": str(path), "K": "secret"})
    assert settings.routing is not None and settings.routing.upstreams[0].api_key == "secret"
    hash(settings)  # frozen settings stay hashable
    assert "secret" not in repr(settings)
    with pytest.raises(ConfigError, match="UPSTREAM_URL"):
        Settings.from_env({"GATEWAY_CONFIG": str(path), "K": "k", "UPSTREAM_URL": "http://x/v1"})
    with pytest.raises(ConfigError, match=r"GATEWAY_CONFIG: .*missing.toml: cannot read"):
        Settings.from_env({"GATEWAY_CONFIG": str(tmp_path / "missing.toml")})


@pytest.mark.parametrize(("variable", "value"), [
    ("UPSTREAM_API_KEY", "sk-CANARY"), ("UPSTREAM_FORMAT", "anthropic"), ("UPSTREAM_PROTOCOL", "h2"),
])
def test_settings_refuse_an_upstream_variable_the_file_replaces(
    tmp_path: Path, variable: str, value: str
) -> None:
    # Each [[upstream]] has its own api_key_env, format and protocol: the
    # variable would be ignored, and requests go without the key it holds.
    path = tmp_path / "gw.toml"
    path.write_text('[[upstream]]\nname = "a"\nurl = "http://h/v1"\n')
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({"GATEWAY_CONFIG": str(path), variable: value})
    assert raised.value.variable == variable
    assert "CANARY" not in str(raised.value)
    assert Settings.from_env({"GATEWAY_CONFIG": str(path), variable: " "}).routing is not None


def test_settings_take_upstream_api_key_when_a_table_names_it(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('[[upstream]]\nname = "a"\nurl = "http://h/v1"\napi_key_env = "UPSTREAM_API_KEY"\n')
    settings = Settings.from_env({"GATEWAY_CONFIG": str(path), "UPSTREAM_API_KEY": "sk-named"})
    assert settings.routing is not None
    assert [up.api_key for up in settings.routing.upstreams] == ["sk-named"]


def test_a_day_is_the_longest_duration_the_file_takes() -> None:
    routing = parse_routing(
        '[[upstream]]\nname = "a"\nurl = "http://h/v1"\nfirst_token_timeout_ms = 86400000\n'
        "[routing]\ncircuit_cooldown_ms = 86400000\nmax_retry_after_ms = 86400000\n", {}
    )
    assert routing.upstreams[0].first_token_timeout_ms == 86_400_000
    assert (routing.retry.circuit_cooldown_ms, routing.retry.max_retry_after_ms) == (86_400_000,) * 2
