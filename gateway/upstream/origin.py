"""Where requests go: scheme, host, port and the base path of UPSTREAM_URL."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

#: What ``Origin.parse`` takes, for the errors that refuse a URL.
ALLOWED = "an http:// or https:// URL including /v1, without a query or fragment"


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    #: The path part of the URL without a trailing slash, e.g. ``/v1``.
    base_path: str

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        if parts.query or parts.fragment:
            # Requests go to the path + "/chat/completions": a query (an
            # api-version, a key) or a fragment would never be sent.
            raise ValueError("a query or fragment")
        port = parts.port  # ValueError when it is not a number, or out of range
        if port == 0:
            # Not "no port": nothing listens on 0, and the default would
            # be a different upstream from the one written.
            raise ValueError("port 0")
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def is_tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        default = 443 if self.is_tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.authority}"


def client_ssl_context(alpn: list[str], cafile: str | None = None) -> ssl.SSLContext:
    """A verifying client context offering ``alpn`` (RFC 7301), e.g.
    ``["h2", "http/1.1"]``; RFC 9113 §9.2 requires TLS 1.2 or later."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(alpn)
    return context
