"""What one run of the suite does: ``SuiteConfig``, and the command line that sets it.

The defaults are the release sign-off (``make ttft``): a realistic simulated
model (``SimProfile``'s defaults, ~100±20 ms TTFT, ~12±2 ms between tokens,
with a concurrency limit and a waiting queue, as a loaded inference server),
32 concurrent streams, the go/no-go thresholds of the shipped alert rules.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.sim.profile import SimProfile
from gateway.suite.client import DEFAULT_MODEL
from gateway.suite.loadgen import LoadShape

PHASES = ("ttft", "burst", "cancel")

_REALISTIC = SimProfile()

#: What "queue wait ~ 0" tolerates: with free admission slots a request's
#: queue wait is the loop's own latency between arrival and admission.
QUEUE_WAIT_TOLERANCE_MS = 5.0


@dataclass(frozen=True, slots=True)
class Thresholds:
    ttft_p95_ms: float = 1500.0
    cancel_p95_ms: float = 300.0
    queue_wait_p95_ms: float = QUEUE_WAIT_TOLERANCE_MS
    #: The TTFT line also fails when more of the TTFT run failed than this
    #: (the alert rules' "error ratio over the last 100 > 1 %").
    max_error_rate: float = 0.01


@dataclass(frozen=True, slots=True)
class SimSettings:
    """The simulator ``make ttft`` starts (unused with ``--target``)."""

    ttft_ms: float = _REALISTIC.ttft_ms
    ttft_jitter_ms: float = _REALISTIC.ttft_jitter_ms
    itl_ms: float = _REALISTIC.itl_ms
    itl_jitter_ms: float = _REALISTIC.itl_jitter_ms
    tokens: int = _REALISTIC.tokens
    max_concurrency: int = 256

    def profile(self) -> SimProfile:
        return SimProfile(
            ttft_ms=self.ttft_ms,
            ttft_jitter_ms=self.ttft_jitter_ms,
            itl_ms=self.itl_ms,
            itl_jitter_ms=self.itl_jitter_ms,
            tokens=self.tokens,
            max_concurrency=self.max_concurrency,
        )


@dataclass(frozen=True, slots=True)
class SuiteConfig:
    #: A deployed gateway's base URL (``https://host/v1``); None: start our own.
    target: str | None = None
    load: LoadShape = LoadShape(concurrency=32)
    #: Measured requests through the gateway in the TTFT run (the baseline
    #: sends as many straight to the simulator, interleaved).
    requests: int = 200
    #: Requests sent first and left out of every figure; None: one per
    #: concurrent slot, so every connection the run uses is already open.
    warmup: int | None = None
    baseline: bool = True
    #: Output tokens per TTFT-run request: TTFT does not depend on the
    #: length, and short answers keep the run to a few seconds.
    max_tokens: int = 16
    burst_size: int = 50
    #: Cancels of each kind (mid-stream, before the first token).
    cancels: int = 10
    #: How long a cancelled request may take to end upstream before it is
    #: counted as never cancelled (its latency then this long).
    cancel_wait_s: float = 2.0
    request_timeout_s: float = 60.0
    thresholds: Thresholds = Thresholds()
    sim: SimSettings = SimSettings()
    #: Extra environment for the gateway process (``COALESCE_ENABLED=0``...).
    gateway_env: tuple[tuple[str, str], ...] = ()
    api_key: str | None = None
    model: str = DEFAULT_MODEL
    phases: frozenset[str] = field(default_factory=lambda: frozenset(PHASES))
    report_path: str = "ttft-report.json"

    @property
    def warmup_requests(self) -> int:
        return self.load.concurrency if self.warmup is None else self.warmup


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not >= 0")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not >= 0")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def _phases(text: str) -> frozenset[str]:
    names = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = names - set(PHASES)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"phases are a comma-separated subset of {','.join(PHASES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    default = SuiteConfig()
    thresholds, sim = default.thresholds, default.sim
    parser = argparse.ArgumentParser(
        prog="ttft",
        description="The TTFT suite: start a simulator and a gateway (or use --target), "
        "measure TTFT, coalescing under a burst, cancellation, errors; the last three "
        "lines are the go/no-go lines; exit status 0 only if all pass.",
    )
    parser.add_argument("--target", help="a deployed gateway's base URL, e.g. https://host/v1")
    parser.add_argument("--api-key", default=os.environ.get("TTFT_API_KEY") or None,
                        help="bearer key for --target (default: $TTFT_API_KEY)")
    parser.add_argument("--model", default=default.model, help="model name sent in requests")

    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=_positive_int, default=default.load.concurrency,
                      help="requests in flight (closed loop), or the cap with --rate")
    load.add_argument("--requests", type=_positive_int, default=default.requests,
                      help="measured requests through the gateway in the TTFT run")
    load.add_argument("--warmup", type=_non_negative_int, default=None,
                      help="requests sent first and excluded from the figures "
                      "(default: as many as --concurrency)")
    load.add_argument("--rate", type=_positive, default=None,
                      help="open loop: arrivals per second (default: closed loop)")
    load.add_argument("--burstiness", type=_positive, default=default.load.burstiness,
                      help="gamma shape of the arrivals: 1 is Poisson, < 1 burstier")
    load.add_argument("--seed", type=int, default=default.load.seed, help="seed of the arrivals")
    load.add_argument("--max-tokens", type=_positive_int, default=default.max_tokens,
                      help="output tokens per TTFT-run request")
    load.add_argument("--no-baseline", dest="baseline", action="store_false",
                      help="do not send the same prompts straight to the simulator")
    load.add_argument("--burst-size", type=_positive_int, default=default.burst_size)
    load.add_argument("--cancels", type=_positive_int, default=default.cancels,
                      help="cancels of each kind (mid-stream, before the first token)")
    load.add_argument("--phases", type=_phases, default=default.phases,
                      help="comma-separated subset of " + ",".join(PHASES))

    gates = parser.add_argument_group("go/no-go thresholds")
    gates.add_argument("--ttft-p95-ms", type=_positive, default=thresholds.ttft_p95_ms)
    gates.add_argument("--cancel-p95-ms", type=_positive, default=thresholds.cancel_p95_ms)
    gates.add_argument("--queue-wait-p95-ms", type=_non_negative, default=thresholds.queue_wait_p95_ms,
                       help=f"the '~ 0' of the queue-wait line (default {QUEUE_WAIT_TOLERANCE_MS:g})")
    gates.add_argument("--max-error-rate", type=_non_negative, default=thresholds.max_error_rate,
                       help="failed share of the TTFT run that fails the TTFT line")

    local = parser.add_argument_group("the simulator and gateway started without --target")
    local.add_argument("--sim-ttft-ms", type=_non_negative, default=sim.ttft_ms)
    local.add_argument("--sim-ttft-jitter-ms", type=_non_negative, default=sim.ttft_jitter_ms)
    local.add_argument("--sim-itl-ms", type=_non_negative, default=sim.itl_ms)
    local.add_argument("--sim-itl-jitter-ms", type=_non_negative, default=sim.itl_jitter_ms)
    local.add_argument("--sim-tokens", type=_positive_int, default=sim.tokens)
    local.add_argument("--sim-max-concurrency", type=_non_negative_int, default=sim.max_concurrency,
                       help="requests the simulated model generates at once (0: unlimited)")
    local.add_argument("--gateway-env", type=_env_pair, action="append", default=[],
                       metavar="NAME=VALUE", help="extra gateway setting, e.g. COALESCE_ENABLED=0")

    parser.add_argument("--report", default=default.report_path, help="where to write the JSON report")
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> SuiteConfig:
    args = build_parser().parse_args(argv)
    return SuiteConfig(
        target=args.target.rstrip("/") if args.target else None,
        load=LoadShape(
            concurrency=args.concurrency, rate=args.rate, burstiness=args.burstiness, seed=args.seed
        ),
        requests=args.requests,
        warmup=args.warmup,
        baseline=args.baseline and not args.target,
        max_tokens=args.max_tokens,
        burst_size=args.burst_size,
        cancels=args.cancels,
        thresholds=Thresholds(
            ttft_p95_ms=args.ttft_p95_ms,
            cancel_p95_ms=args.cancel_p95_ms,
            queue_wait_p95_ms=args.queue_wait_p95_ms,
            max_error_rate=args.max_error_rate,
        ),
        sim=SimSettings(
            ttft_ms=args.sim_ttft_ms,
            ttft_jitter_ms=args.sim_ttft_jitter_ms,
            itl_ms=args.sim_itl_ms,
            itl_jitter_ms=args.sim_itl_jitter_ms,
            tokens=args.sim_tokens,
            max_concurrency=args.sim_max_concurrency,
        ),
        gateway_env=tuple(args.gateway_env),
        api_key=args.api_key,
        model=args.model,
        phases=args.phases,
        report_path=args.report,
    )
