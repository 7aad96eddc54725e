"""h2's connection state machine, configured for this client.

What differs from a plain ``h2.connection.H2Connection``:

- Outbound header validation and normalisation are off: the client builds
  its own request headers (lower-case names, no connection-specific fields;
  RFC 9113 §8.2).
- Inbound header validation is off too. h2 raises a malformed response head
  (RFC 9113 §8.1.1) as a connection error, which would end every stream on
  the connection, and the ``ProtocolError`` it raises does not say which
  stream it came from. A malformed response is a stream error (§8.1.1,
  §5.4.2): the protocol core checks each response's fields itself
  (``protocol.response_head``, ``protocol.check_trailers``) and resets only
  that stream. What h2 still checks whatever this setting says stays a
  connection error: the frames and their sequence, HPACK decoding (§4.3),
  and the content-length of a body.
- Server push is off: our SETTINGS carry ENABLE_PUSH 0 (RFC 9113 §6.5.2).
  The client reads no pushed response, and h2 would keep every stream a
  PUSH_PROMISE reserves for the connection's life; with push off, h2 treats
  a PUSH_PROMISE as the connection error §6.5.2 prescribes.
- A GOAWAY does not close the state machine. h2 moves to CLOSED on any
  GOAWAY it receives (python-hyper/h2#1181), after which it rejects the
  frames of the streams that GOAWAY lets finish (those at or below its
  last-stream-id, RFC 9113 §6.8). The protocol core opens no stream after a
  GOAWAY itself, so keeping the state open is safe.
- A GOAWAY does not drop what was queued to send. h2 empties its outbound
  buffer on any GOAWAY it receives; see ``clear_outbound_data_buffer``.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
from hyperframe.frame import Frame, GoAwayFrame

_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
)


class GoawayTolerantConnection(h2.connection.H2Connection):
    """An ``H2Connection`` whose state, and the bytes it has queued to send,
    survive a received GOAWAY."""

    #: True while h2 handles a received GOAWAY.
    _receiving_goaway = False

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        # h2's own initial values, and push off. Initial values, not an
        # update: they are what initiate_connection() sends in the preface,
        # before any stream a server could push on exists (§8.4).
        self.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.DEFAULT_MAX_HEADER_LIST_SIZE,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        state = self.state_machine.state
        self._receiving_goaway = True
        try:
            result = super()._receive_goaway_frame(frame)
        finally:
            self._receiving_goaway = False
        self.state_machine.state = state
        return result

    def clear_outbound_data_buffer(self) -> None:
        """Empties the outbound buffer, except while a received GOAWAY is
        handled: h2 would drop what we queued before reading it, such as the
        WINDOW_UPDATEs a running answer waits for (they leave at the end of
        the loop iteration that read its DATA). Those frames crossed the
        GOAWAY on the wire (RFC 9113 §6.8): the peer ignores the ones on
        streams above its last-stream-id, which the core fails as refused and
        the pool sends again, and processes the rest, which must reach it."""
        if not self._receiving_goaway:
            super().clear_outbound_data_buffer()


def client_state_machine() -> h2.connection.H2Connection:
    return GoawayTolerantConnection(config=_CONFIG)
