"""The exchange log as the app owns it: recorder, writer and store together."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry

from gateway.exchanges.metrics import ExchangeMetrics
from gateway.exchanges.recorder import Recorder
from gateway.exchanges.store import open_store
from gateway.exchanges.writer import ExchangeWriter

log = structlog.get_logger("gateway")


@dataclass(frozen=True, slots=True)
class ExchangeLog:
    recorder: Recorder
    #: None when EXCHANGE_LOG_URL is unset (tokens are still counted).
    writer: ExchangeWriter | None
    metrics: ExchangeMetrics


@asynccontextmanager
async def exchange_log(
    *,
    url: str | None,
    keep_content: bool,
    max_queue: int,
    max_queue_bytes: int,
    upstream: str,
    registry: CollectorRegistry,
) -> AsyncIterator[ExchangeLog]:
    """Start the writer (a database down at start delays the log, never the
    gateway: the writer keeps trying; a URL the store cannot use raises
    ``StoreMisconfigured``); on exit, write what is queued and close the
    store."""
    metrics = ExchangeMetrics(registry)
    writer = None
    if url is not None:
        writer = ExchangeWriter(
            open_store(url), metrics, max_queue=max_queue, max_queue_bytes=max_queue_bytes
        )
    recorder = Recorder(
        upstream=upstream,
        keep_content=keep_content,
        on_exchange=None if writer is None else writer.submit,
        tokens=metrics.tokens,
        record_failed=metrics.dropped.inc,
    )
    if writer is not None:
        await writer.start()
        log.info("exchange log", store=writer.store.description, content=keep_content)
    try:
        yield ExchangeLog(recorder=recorder, writer=writer, metrics=metrics)
    finally:
        if writer is not None:
            await writer.aclose()
