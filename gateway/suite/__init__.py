"""The TTFT suite behind ``make ttft``: load generator, probes, report.

``python -m gateway.suite`` starts the simulator and a gateway in their own
processes (or uses ``--target URL``), runs the phases -- the TTFT run with the
gateway's overhead against a direct baseline, a burst of identical prompts,
client cancels, the error rate -- and ends with the three go/no-go lines.
``python -m gateway.suite.smoke`` is the one-request early-bytes check.
"""

from gateway.suite.config import SuiteConfig, Thresholds
from gateway.suite.processes import Endpoints
from gateway.suite.run import run_suite

__all__ = ["Endpoints", "SuiteConfig", "Thresholds", "run_suite"]
