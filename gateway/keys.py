"""The prompt key: which requests may share one upstream answer.

Two requests share only if the upstream would be asked the same question:
the key hashes the canonical request -- model, messages and every parameter
that can change the output -- and leaves out only what cannot (``stream``, and
the options that shape delivery, not content). With ``COALESCE_SCOPE=key`` the
client's credential is part of the key, so two tenants never share an answer:
one sample may serve a burst of the same question, never two tenants.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

#: Fields that change how an answer is delivered, not what it says. Anything
#: not listed here -- including parameters this gateway has never heard of --
#: is part of the key, so an unknown knob can only prevent sharing, never
#: merge two different questions.
DELIVERY_ONLY = frozenset({"stream", "stream_options", "user", "metadata", "store"})


def prompt_key(chat: Mapping[str, Any], *, tenant: str | None) -> str:
    """Hex SHA-256 of the canonical request (and the tenant, when scoped)."""
    canonical = {name: value for name, value in chat.items() if name not in DELIVERY_ONLY}
    digest = hashlib.sha256()
    if tenant is not None:
        # A hash of the credential, length-prefixed so no tenant string can
        # collide with the start of the JSON that follows. The key is never
        # logged whole, and it is a hash: the credential cannot be read back.
        tenant_hash = hashlib.sha256(tenant.encode()).hexdigest()
        digest.update(f"tenant:{tenant_hash}\n".encode())
    digest.update(
        json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    )
    return digest.hexdigest()
