"""The id of an answer (OpenAI's ``chatcmpl-...``, Anthropic's ``msg_...``).

One per upstream stream, the same for every subscriber of it (their frames
are shared), and unique beyond this process: a random prefix drawn when
the process starts, then the stream's number. Clients and their logs key
answers by it; a prefix made of the prompt's key would repeat the same id
for the same prompt after every restart and in every worker.
"""

from __future__ import annotations

import secrets

from actors.subscription import Subscription

#: Drawn per process (workers are started as fresh interpreters, not forked).
_PROCESS = secrets.token_hex(8)


def answer_id(prefix: str, subscription: Subscription) -> str:
    return f"{prefix}{_PROCESS}{subscription.stream_id:x}"
