"""The simulated LLM upstream: the gateway's embedded default and the peer of
every integration test.

One port serves HTTP/1.1 and HTTP/2 (prior knowledge, or ALPN under TLS) and
speaks the OpenAI chat-completions and Anthropic messages APIs, streaming or
not, with deterministic content (``answer_tokens``), modelled timing, failure
injection, and a request log that shows cancellation from the upstream's side.
"""

from gateway.sim.content import answer_tokens, prompt_digest, prompt_token_count
from gateway.sim.log import Record, RequestLog
from gateway.sim.profile import KnobError, SimProfile
from gateway.sim.server import SimServer

__all__ = [
    "KnobError",
    "Record",
    "RequestLog",
    "SimProfile",
    "SimServer",
    "answer_tokens",
    "prompt_digest",
    "prompt_token_count",
]
