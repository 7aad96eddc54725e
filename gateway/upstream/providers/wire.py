"""Small, strict helpers for the JSON that providers send and receive.

Provider payloads are untrusted input: a field of the wrong type is a protocol
error with a clear message, never a ``TypeError`` deep in the actor. Missing
and ``null`` fields are the same thing ("absent"), as in the providers' own
SDKs.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from gateway import json_codec
from gateway.errors import BadRequest, UpstreamProtocolError, UpstreamStatusError
from gateway.upstream.base import ResponseHead

JsonObject = dict[str, Any]

#: How much of a non-JSON error body we keep in a message (it may be HTML).
MAX_ERROR_TEXT = 500


def encode_json(payload: object) -> bytes:
    """Compact UTF-8 JSON, as providers expect and without wasted bytes.

    The payload holds the client's values, which the parser read however
    deep they nest (up to its own limit); encoding them again goes deeper
    into the stack than parsing did, so near that limit it can fail: the
    client's body is then refused as the parser would refuse it."""
    try:
        return json_codec.dumps_to_keep(payload)
    except json_codec.NestedTooDeeply as exc:
        raise BadRequest("request body is nested too deeply", code="invalid_json") from exc


def parse_object(text: str, *, what: str) -> JsonObject:
    """Parse one JSON object (an SSE ``data`` payload) or fail as a protocol error."""
    try:
        value = json_codec.loads(text)
    except ValueError as exc:
        raise UpstreamProtocolError(f"upstream sent invalid JSON in {what}") from exc
    if not isinstance(value, dict):
        raise UpstreamProtocolError(f"upstream sent a JSON {type(value).__name__} as {what}")
    return value


def get_object(obj: JsonObject, key: str) -> JsonObject | None:
    value = obj.get(key)
    if value is None or isinstance(value, dict):
        return value
    raise _wrong_type(key, "an object")


def get_list(obj: JsonObject, key: str) -> list[Any] | None:
    value = obj.get(key)
    if value is None or isinstance(value, list):
        return value
    raise _wrong_type(key, "an array")


def get_str(obj: JsonObject, key: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _wrong_type(key, "a string")


def get_int(obj: JsonObject, key: str) -> int | None:
    value = obj.get(key)
    # bool is an int subclass in Python, but never a valid count.
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise _wrong_type(key, "an integer")


def _wrong_type(key: str, description: str) -> UpstreamProtocolError:
    return UpstreamProtocolError(f"upstream field {key!r} is not {description}")


def header(head: ResponseHead, name: str) -> str | None:
    """A response header by name, case-insensitively (HTTP/1.1 keeps case)."""
    value = head.header(name)
    if value is not None:
        return value
    for key, candidate in head.headers:
        if key.lower() == name:
            return candidate
    return None


def retry_after(head: ResponseHead) -> str | None:
    """Retry-After is only meaningful to pass on with a 429 (RFC 6585 §4);
    a 5xx becomes our 502, where the provider's hint would mislead."""
    return header(head, "retry-after") if head.status == 429 else None


def content_coding(head: ResponseHead) -> str | None:
    """The body's content coding, if it has one: nothing here decodes one
    (the transports ask for identity, RFC 9110 §12.5.3), so such a body
    cannot be read."""
    coding = header(head, "content-encoding")
    if coding is None or coding.strip().lower() in ("", "identity"):
        return None
    return coding


def readable_body(head: ResponseHead, body: bytes) -> bytes:
    """``body``, or nothing when a content coding makes it unreadable: its
    bytes are no message, and no JSON."""
    return b"" if content_coding(head) is not None else body


def parse_error_body(body: bytes) -> JsonObject | None:
    """The error response as a JSON object, or ``None`` if it is not one."""
    try:
        value = json_codec.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def fallback_message(status: int, body: bytes) -> str:
    """A message for an error body we could not parse: its text, cut short,
    or the status phrase when there is no text."""
    text = body.decode("utf-8", "replace").strip()
    if text:
        return text[:MAX_ERROR_TEXT]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"upstream answered {status}"


def status_error(
    head: ResponseHead, body: bytes, message: str | None, code: str | None
) -> UpstreamStatusError:
    """The error for a non-2xx response, from what the provider's own error
    shape yielded (message, code), with the generic fallbacks."""
    return UpstreamStatusError(
        head.status,
        message or fallback_message(head.status, body),
        code=code,
        retry_after=retry_after(head),
    )
