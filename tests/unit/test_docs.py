"""The documentation stands on its own: every setting is documented, and no
tracked file points outside the repository."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

from prometheus_client import CollectorRegistry

import gateway.cluster.peer  # noqa: F401  (defines an error a client may get)
from gateway.__main__ import environment_variables
from gateway.app import make_app
from gateway.cluster.metrics import ClusterMetrics
from gateway.config import ConfigError, Settings
from gateway.errors import GatewayError
from gateway.exchanges.metrics import ExchangeMetrics
from gateway.metrics import GatewayMetrics, LiveState, UpstreamGauges
from gateway.routing.config import RetryConfig, parse_routing

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "gateway" / "config.py"
CONFIGURATION_DOC = ROOT / "docs" / "configuration.md"
HTTP_API_DOC = ROOT / "docs" / "http-api.md"
README = ROOT / "README.md"
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"
DOCS = ("architecture.md", "configuration.md", "http-api.md", "upstream-http2.md")

#: A variable read by name in gateway/config.py: ``read.<type>("NAME"`` or
#: ``env.get("NAME"`` / ``environ.get("NAME"`` / ``env["NAME"]``.
_READ = re.compile(r"""(?:read\.\w+|\b(?:env|environ|_env)\.get)\(\s*["']([A-Z][A-Z0-9_]+)["']"""
                   r"""|\b(?:env|environ|_env)\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\]""")


def variables_read_by_config() -> set[str]:
    named = {a or b for a, b in _READ.findall(CONFIG.read_text())}
    return named | set(environment_variables())


def test_the_scan_finds_the_variables() -> None:
    found = variables_read_by_config()
    assert {"GATEWAY_PORT", "UPSTREAM_URL", "FIRST_TOKEN_PING_INTERVAL_MS", "LOG_FORMAT"} <= found


def test_every_variable_read_in_config_is_in_docs_configuration() -> None:
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", CONFIGURATION_DOC.read_text()))
    assert sorted(variables_read_by_config() - documented) == []


#: A row of a table that gives the least of some variables:
#: ``| `A`, `B` | 0.1 | what it means |``.
_LEAST_ROW = re.compile(r"^\|((?:\s*`[A-Z][A-Z0-9_]+`,?)+)\s*\|\s*([0-9.]+)\s*\|", re.MULTILINE)


def documented_least() -> dict[str, str]:
    """Each variable of the tables between "Durations" and "Variables" in
    docs/configuration.md, with the least it says that variable takes."""
    section = CONFIGURATION_DOC.read_text().split("## Durations", 1)[1].split("## Variables")[0]
    return {
        name: least
        for names, least in _LEAST_ROW.findall(section)
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", names)
    }


def _is_numeric(name: str) -> bool:
    """A duration or a size: docs/configuration.md's own rule, by the name's
    ending, and the counts its sizes paragraph names."""
    counts = {"MAX_INFLIGHT", "MAX_QUEUE", "EXCHANGE_LOG_QUEUE", "UPSTREAM_MAX_CONNECTIONS"}
    return name.endswith(("_MS", "_S", "_BYTES")) or name in counts


def _accepted(name: str, value: str) -> bool:
    try:
        Settings.from_env({name: value})
    except ConfigError:
        return False
    return True


def test_every_duration_and_size_has_its_least_in_docs_configuration() -> None:
    numeric = {name for name in environment_variables() if _is_numeric(name)}
    assert sorted(numeric - set(documented_least())) == []


def test_the_least_in_docs_configuration_is_the_least_taken() -> None:
    """The documented least starts; one step below it stops the start."""
    wrong = []
    for name, least in documented_least().items():
        below = str(int(least) - 1) if least.isdigit() else str(float(least) - 0.001)
        if not _accepted(name, least) or _accepted(name, below):
            wrong.append(f"{name}={least}")
    assert wrong == []


#: A row of a settings table: ``| `NAME` | default | meaning |``, or
#: ``| `A` / `B` | a / b | ... |`` for two variables at once.
_SETTING_ROW = re.compile(
    r"^\| `([A-Z][A-Z0-9_]+)`(?: / `([A-Z][A-Z0-9_]+)`)? \| ([^|]*) \|", re.MULTILINE
)


def _default_tables(text: str) -> str:
    """The rows of the tables headed ``| variable | default | ...``."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith("| variable | default |"):
            inside = True
        elif not line.startswith("|"):
            inside = False
        elif inside:
            rows.append(line)
    return "\n".join(rows)


def documented_defaults() -> list[tuple[str, str, str]]:
    """(page, variable, default) for every row of a settings table in docs/
    whose default is a value (not a sentence such as "(none)")."""
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for first, second, cell in _SETTING_ROW.findall(_default_tables(page.read_text())):
            names = [first, second] if second else [first]
            values = cell.split(" / ") if second else [cell.split(" (")[0]]
            for name, value in zip(names, values, strict=True):
                value = value.strip()
                if value and not value.startswith("(") and " " not in value:
                    found.append((page.name, name, value))
    return found


def test_the_scan_finds_the_documented_defaults() -> None:
    found = {(name, value) for _, name, value in documented_defaults()}
    assert {("GATEWAY_PORT", "8080"), ("EXCHANGE_LOG_QUEUE_BYTES", "67108864")} <= found


def test_every_documented_default_is_the_default() -> None:
    """Setting a variable to the default its row states changes nothing."""
    default = Settings.from_env({})
    wrong = [
        f"{page}: {name}={value}"
        for page, name, value in documented_defaults()
        if name in variables_read_by_config()
        and (not _accepted(name, value) or Settings.from_env({name: value}) != default)
    ]
    assert wrong == []


def test_the_docs_exist_and_the_readme_points_at_them() -> None:
    readme = README.read_text()
    for name in DOCS:
        assert (ROOT / "docs" / name).is_file(), name
        assert f"docs/{name}" in readme, name


#: A row of a table whose first cell is an endpoint: ``| `GET /v1/models` |``.
_ENDPOINT_ROW = re.compile(r"^\|\s*`([A-Z]+) (/[^`]*)`", re.MULTILINE)


def _endpoint(method: str, path: str) -> str:
    """``method path`` with every ``{parameter}`` spelled ``{}``."""
    return f"{method} {re.sub(r'{[^}]*}', '{}', path)}"


def test_every_route_the_gateway_serves_is_in_docs_http_api() -> None:
    """The endpoint table of docs/http-api.md is the whole contract: a route
    the app answers on and the table does not name is undocumented."""
    app = make_app(Settings())
    served = {
        _endpoint(route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {_endpoint(*row) for row in _ENDPOINT_ROW.findall(HTTP_API_DOC.read_text())}
    assert sorted(served - documented) == []


#: An error code given where the error is raised: ``BadRequest(..., code="invalid_json")``.
_CODE_ARGUMENT = re.compile(r"""\bcode=["']([a-z0-9_]+)["']""")


def _error_classes(base: type[GatewayError]) -> list[type[GatewayError]]:
    found = []
    for cls in base.__subclasses__():
        found += [cls, *_error_classes(cls)]
    return found


def error_codes_a_client_may_get() -> set[str]:
    """The codes of the gateway's error classes, those its API handlers
    raise them with (the TTFT suite's own errors are not the gateway's), and
    those the shipped nginx site answers with itself."""
    declared = {
        cls.__dict__["code"]
        for cls in _error_classes(GatewayError)
        if "code" in cls.__dict__ and not cls.__module__.startswith("gateway.suite")
    }
    raised = {
        code
        for path in (ROOT / "gateway" / "api").glob("*.py")
        for code in _CODE_ARGUMENT.findall(path.read_text())
    }
    answered_by_nginx = {
        code
        for path in (ROOT / "deploy" / "nginx").glob("*.conf")
        for code in re.findall(r'"code": "([a-z0-9_]+)"', path.read_text())
    }
    return declared | raised | answered_by_nginx


def test_the_scan_finds_the_error_codes() -> None:
    found = error_codes_a_client_may_get()
    assert {"invalid_json", "queue_full", "cluster_owner_lost", "gateway_unavailable"} <= found


def test_every_error_code_is_in_docs_http_api() -> None:
    documented = set(re.findall(r"`([a-z0-9_]+)`", HTTP_API_DOC.read_text()))
    assert sorted(error_codes_a_client_may_get() - documented) == []


def _rooms() -> str:
    """The tree drawn under "The rooms" in docs/architecture.md."""
    section = ARCHITECTURE_DOC.read_text().split("## The rooms", 1)[1]
    return section.split("```", 2)[1]


def test_every_module_of_gateway_and_actors_is_in_docs_architecture() -> None:
    """Each module and package right under gateway/ and actors/ has its line
    in the rooms of docs/architecture.md, the map README sends a reader to."""
    named = set(re.findall(r"[\w.]+/?", _rooms()))
    missing = [
        f"{package}/{path.name}"
        for package in ("gateway", "actors")
        for path in sorted((ROOT / package).iterdir())
        if (path.suffix == ".py" and path.name != "__init__.py" and path.name not in named)
        or ((path / "__init__.py").is_file() and f"{path.name}/" not in named)
    ]
    assert missing == []


def test_the_readme_names_every_error_status_of_docs_http_api() -> None:
    """README's one-line summary of the error statuses is the table's."""
    table = set(re.findall(r"^\| (\d{3}) \|", HTTP_API_DOC.read_text(), re.MULTILINE))
    summary = re.search(r"Errors are .*? with\s+((?:\d{3}/)+\d{3})", README.read_text(), re.DOTALL)
    assert summary is not None
    assert sorted(table ^ set(summary.group(1).split("/"))) == []


def exposed_families() -> dict[str, set[str]]:
    """Every family a gateway's /metrics may show (the cluster's included),
    as PromQL names it (counters with ``_total``), with its label names:
    the collectors themselves, each labelled one given a child."""
    metrics = GatewayMetrics(CollectorRegistry())
    ExchangeMetrics(metrics.registry).tokens("m", "default", 1, 1)
    ClusterMetrics(metrics.registry)
    metrics.bind_live_state(
        LiveState(**{field.name: (lambda: 0) for field in dataclasses.fields(LiveState)})
    )
    metrics.bind_upstreams(lambda: [UpstreamGauges("default", False, 0, 0)])
    metrics.upstream_status("200")
    metrics.stream_failures.labels("upstream_timeout").inc()
    metrics.failure("default", "connect")
    metrics.retry("default", "connect")
    metrics.fallback("default")
    metrics.upstream_ttft("default", 0.1)
    families: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        families[name] = {label for s in family.samples for label in s.labels} - {"le"}
    return families


def test_every_metric_is_in_the_docs_with_its_labels() -> None:
    """A metric is documented on a line of README or docs/ that names it
    (not as the prefix of a longer name) and each of its labels."""
    lines = [
        line
        for page in (README, *sorted((ROOT / "docs").glob("*.md")))
        for line in page.read_text().splitlines()
    ]
    undocumented = []
    for name, labels in exposed_families().items():
        named = [line for line in lines if re.search(re.escape(name) + r"(?![a-z0-9_])", line)]
        if not any(all(re.search(rf"\b{label}\b", line) for label in labels) for line in named):
            undocumented.append(f"{name}{sorted(labels)}")
    assert undocumented == []


def _toml_blocks(page: Path) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", page.read_text(), re.DOTALL)


def test_every_routing_file_in_the_docs_is_taken_as_it_stands() -> None:
    """Each TOML example of README and docs/ is a routing file the gateway
    starts with, given the keys its tables name."""
    blocks = [
        (page, block)
        for page in (README, *sorted((ROOT / "docs").glob("*.md")))
        for block in _toml_blocks(page)
    ]
    assert len(blocks) >= 2
    for page, block in blocks:
        keys = {name: "sk-example-key" for name in re.findall(r'api_key_env = "(\w+)"', block)}
        parse_routing(block, keys, source=page.name)


def test_the_routing_defaults_in_docs_routing_are_the_defaults() -> None:
    """docs/routing.md's [routing] table says "these are the defaults"."""
    (block,) = _toml_blocks(ROOT / "docs" / "routing.md")
    routing = parse_routing(block, {"OPENAI_KEY": "sk-example-key"})
    assert routing.retry == RetryConfig()


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation
    dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_link_between_the_docs_reaches_its_page_and_heading() -> None:
    broken = []
    for page in (README, *sorted((ROOT / "docs").glob("*.md"))):
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            destination = page.parent / path if path else page
            if not destination.exists() or (
                anchor and destination.suffix == ".md" and anchor not in _anchors(destination)
            ):
                broken.append(f"{page.name}: {target}")
    assert broken == []


def _tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name]


def test_no_tracked_file_points_outside_the_repository() -> None:
    """Design notes kept beside the repository are not part of it: neither
    the code, the docs nor the tests may send a reader there."""
    # Spelled in pieces so that this file does not name them itself.
    notes = ("ARCHITECTURE", "FIELD" + "-NOTES")
    outside = re.compile(
        r"\.\./" + "shared" + r"\b|\b(?:" + "|".join(notes) + r")(?:\.md)?\b"
    )
    offenders = []
    for path in _tracked_files():
        if path == Path(__file__).resolve() or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        relative = path.relative_to(ROOT).as_posix()
        for n, line in enumerate(text.splitlines(), 1):
            if outside.search(line):
                offenders.append(f"{relative}:{n}")
    assert offenders == []


#: A request body of a curl line in the docs: ``-d '{"model": "sim-1", ...}'``.
_CURL_MODEL = re.compile(r"""-d '\{"model": "([^"]+)\"""")
#: The model the demo page asks for: ``const MODEL = "sim-1";``.
_PAGE_MODEL = re.compile(r"""^const MODEL = "([^"]+)";""", re.MULTILINE)
DEMO_PAGE_SCRIPT = ROOT / "gateway" / "static" / "chat.js"


def test_every_model_asked_of_make_run_is_one_the_simulator_lists() -> None:
    """The model of each curl line aimed at `make run` (127.0.0.1:8080) and
    the demo page's model are ones `GET /v1/models` lists there, so that
    `models.retrieve` of the model a client was shown finds it."""
    from gateway.sim.app import MODELS

    asked = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for command in page.read_text().split("curl ")[1:]:
            if command.startswith("-N http://127.0.0.1:8080/"):
                asked += [(page.name, model) for model in _CURL_MODEL.findall(command)]
    asked += [(DEMO_PAGE_SCRIPT.name, model)
              for model in _PAGE_MODEL.findall(DEMO_PAGE_SCRIPT.read_text())]
    listed = {model["id"] for model in MODELS}
    assert len(asked) >= 3
    assert [(name, model) for name, model in asked if model not in listed] == []
