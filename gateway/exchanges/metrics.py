"""Token and exchange-log counters (names fixed by the gateway's contract).

Registered on the app's own ``CollectorRegistry`` beside the gateway's
collectors. The ``model`` label comes from clients, so it is bounded: past
``MAX_MODELS`` distinct names, further ones count as ``other`` and a scrape
never grows without limit.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

MAX_MODELS = 64
OTHER = "other"


class ExchangeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._tokens = Counter(
            "gateway_tokens",
            "Tokens as the upstream reported them, by direction, model and upstream",
            ("direction", "model", "upstream"),
            registry=registry,
        )
        self._children: dict[tuple[str, str], tuple[Counter, Counter]] = {}
        #: The model names with series of their own (at most MAX_MODELS).
        self._models: set[str] = set()
        self.written = Counter(
            "gateway_exchange_log_written",
            "Exchanges written to the exchange log",
            registry=registry,
        )
        self.dropped = Counter(
            "gateway_exchange_log_dropped",
            "Exchanges dropped: the queue was full, the database refused them, or"
            " the recorder failed on them",
            registry=registry,
        )

    def tokens(self, model: str, upstream: str, prompt: int, completion: int) -> None:
        children = self._children.get((model, upstream))
        if children is None:
            # The bound is on model names: the upstreams are configured.
            if model not in self._models:
                if len(self._models) >= MAX_MODELS:
                    model = OTHER
                else:
                    self._models.add(model)
            children = self._children.get((model, upstream))
            if children is None:
                children = self._children[(model, upstream)] = (
                    self._tokens.labels("prompt", model, upstream),
                    self._tokens.labels("completion", model, upstream),
                )
        children[0].inc(prompt)
        children[1].inc(completion)
