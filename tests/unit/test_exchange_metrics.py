"""The token counter's model label is bounded by model names, not by
(model, upstream) pairs: a second upstream serving the same models takes
no share of the bound."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gateway.exchanges.metrics import MAX_MODELS, OTHER, ExchangeMetrics


def _models(registry: CollectorRegistry) -> dict[str, set[str]]:
    """upstream -> the model labels of its prompt-token series."""
    seen: dict[str, set[str]] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "gateway_tokens_total" and sample.labels["direction"] == "prompt":
                seen.setdefault(sample.labels["upstream"], set()).add(sample.labels["model"])
    return seen


def test_the_model_bound_counts_names_across_upstreams() -> None:
    registry = CollectorRegistry()
    metrics = ExchangeMetrics(registry)
    names = [f"model-{i}" for i in range(MAX_MODELS)]
    for name in names:
        for upstream in ("a", "b"):
            metrics.tokens(name, upstream, 1, 1)
    metrics.tokens("one-too-many", "a", 1, 1)
    assert _models(registry) == {"a": {*names, OTHER}, "b": set(names)}
