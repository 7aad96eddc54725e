"""``python -m gateway.suite`` (``make ttft``, ``bin/ttft``): the release sign-off.

Exit status: 0 when every gate passes, 1 when one fails or was skipped
(``--phases``), 2 for a usage error, 3 when the system under test could not be started or reached.
SIGTERM is handled like Ctrl-C: the run is cancelled and every process it
started is stopped before exiting.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

from gateway.errors import GatewayError
from gateway.suite.config import SuiteConfig, config_from_args
from gateway.suite.progress import Progress
from gateway.suite.report import SuiteReport
from gateway.suite.run import publish, run


async def _main(config: SuiteConfig) -> SuiteReport:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run(config, Progress(sys.stdout))
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(argv)
    try:
        report = asyncio.run(_main(config))
    except GatewayError as exc:
        print(f"ttft: {exc}", file=sys.stderr)
        return 3
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("ttft: interrupted", file=sys.stderr)
        return 130
    return publish(report, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
