"""h2's connection state machine, configured for this client.

Two things differ from a plain ``h2.connection.H2Connection``:

- Outbound header validation and normalisation are off: the client builds
  its own request headers (lower-case names, no connection-specific fields;
  RFC 9113 §8.2). What the upstream sends is still validated.
- A GOAWAY does not close the state machine. h2 moves to CLOSED on any
  GOAWAY it receives (python-hyper/h2#1181), after which it rejects the
  frames of the streams that GOAWAY lets finish (those at or below its
  last-stream-id, RFC 9113 §6.8). The protocol core opens no stream after a
  GOAWAY itself, so keeping the state open is safe.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
from hyperframe.frame import Frame, GoAwayFrame

_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)


class GoawayTolerantConnection(h2.connection.H2Connection):
    """An ``H2Connection`` whose state survives a received GOAWAY."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        state = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        self.state_machine.state = state
        return result


def client_state_machine() -> h2.connection.H2Connection:
    return GoawayTolerantConnection(config=_CONFIG)
