"""The configured secrets, and text with them taken out.

One registry per process: the log processor (gateway/logs.py) and the error
boundary (``gateway.errors.for_client``) both read it, so a secret is kept
out of every log line and every error a client sees, whichever layer wrote
the text -- a provider's message quoting our key ("Incorrect API key
provided: sk-..."), an exception's text, a URL. Whoever loads a secret
(settings, a routing table's ``api_key_env``, the cluster secret) adds it.
"""

from __future__ import annotations

import re
import threading

#: Shorter values are not treated as secrets: replacing every "abc" in every
#: log line would wreck the logs and protect nothing worth the name.
MIN_SECRET_CHARS = 8
REDACTED = "[redacted]"


class Secrets:
    """A set of secret strings and one compiled pattern matching any of them."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, *secrets: str) -> None:
        with self._lock:
            added = {s for s in secrets if len(s) >= MIN_SECRET_CHARS} - self._secrets
            if not added:
                return
            self._secrets |= added
            # Longest first: a secret that contains another is taken whole.
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(s) for s in ordered))

    def redact(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None:
            return text
        return pattern.sub(REDACTED, text)


#: The process's secrets.
SECRETS = Secrets()


def redact(text: str) -> str:
    return SECRETS.redact(text)
