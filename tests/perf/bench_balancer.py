"""Weighted least in-flight against power-of-two-choices, in simulated time.

``python -m tests.perf.bench_balancer``: a discrete-event model of three
upstreams of weights 1, 1 and 2 (weight = capacity), where a stream's
duration grows with the streams already open there (an inference server
batching: ``1 s * (1 + open / (8 * weight))``). Poisson arrivals at
several loads, and a burst of 200 at once; both policies see the exact
in-flight counts (as the router does: one process, its own counts).
Prints the mean and p99 duration and each upstream's share.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.routing.balancer import LeastInFlight


@dataclass(eq=False)
class Up:
    name: str
    weight: float
    in_flight: int = 0
    served: int = 0


Policy = Callable[[Sequence[Up]], Up]


def least_in_flight() -> Policy:
    balancer = LeastInFlight()
    return lambda ups: balancer.order(ups)[0]


def power_of_two(rng: random.Random) -> Policy:
    def pick(ups: Sequence[Up]) -> Up:
        first = rng.choices(ups, weights=[u.weight for u in ups])[0]
        rest = [u for u in ups if u is not first]
        second = rng.choices(rest, weights=[u.weight for u in rest])[0]
        return min((first, second), key=lambda u: (u.in_flight + 1) / u.weight)

    return pick


def run(policy: Policy, arrivals: list[float]) -> tuple[float, float, list[int]]:
    ups = [Up("a", 1), Up("b", 1), Up("c", 2)]
    events: list[tuple[float, int, Up | None]] = [(t, i, None) for i, t in enumerate(arrivals)]
    heapq.heapify(events)
    durations = []
    seq = len(arrivals)
    while events:
        now, _, ending = heapq.heappop(events)
        if ending is not None:
            ending.in_flight -= 1
            continue
        up = policy(ups)
        duration = 1.0 * (1 + up.in_flight / (8 * up.weight))
        up.in_flight += 1
        up.served += 1
        durations.append(duration)
        seq += 1
        heapq.heappush(events, (now + duration, seq, up))
    durations.sort()
    mean = sum(durations) / len(durations)
    return mean, durations[int(0.99 * (len(durations) - 1))], [u.served for u in ups]


def main() -> None:
    print(f"{'load':>12} {'policy':>16} {'mean s':>8} {'p99 s':>8}  share a/b/c")
    for rate in (5.0, 15.0, 25.0):
        rng = random.Random(1)
        t, arrivals = 0.0, []
        for _ in range(20_000):
            t += rng.expovariate(rate)
            arrivals.append(t)
        for name, policy in (("least in-flight", least_in_flight()),
                             ("p2c", power_of_two(random.Random(2)))):
            mean, p99, share = run(policy, arrivals)
            print(f"{rate:>8.0f}/s {name:>16} {mean:>8.3f} {p99:>8.3f}  {share}")
    for name, policy in (("least in-flight", least_in_flight()),
                         ("p2c", power_of_two(random.Random(2)))):
        mean, p99, share = run(policy, [0.0] * 200)
        print(f"{'burst 200':>12} {name:>16} {mean:>8.3f} {p99:>8.3f}  {share}")


if __name__ == "__main__":
    main()
