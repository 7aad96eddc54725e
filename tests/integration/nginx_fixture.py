"""A real nginx running the shipped site config (deploy/nginx/gateway.conf).

``render_site`` rewrites only what differs on a test machine (ports, the
certificate, log paths, optionally the /metrics allow-list), each by an exact
substitution that must match: if the shipped file changes shape, rendering
fails loudly instead of silently testing something else. ``running_nginx``
loads the result under a main config whose http {} block holds the values
that break streaming (buffering, gzip of text/event-stream, a 1 s read
timeout): the site has to override every one of them, as it must in a real
nginx.conf. nginx runs in the foreground (``daemon off``) as our child, on
free ports, with every path in a temporary directory, and stops at the end.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trustme

SHIPPED_SITE = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "gateway.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

#: What an operator's nginx.conf may well say at http level, every value wrong
#: for SSE. The site config must override each (see the module docstring).
STREAM_HOSTILE_HTTP_DEFAULTS = """
    proxy_buffering on;
    proxy_ignore_headers X-Accel-Buffering;
    proxy_read_timeout 1s;
    gzip on;
    gzip_min_length 1;
    gzip_types text/event-stream application/json;
"""

MAIN_CONFIG = """\
{user}
worker_processes 1;
error_log stderr notice;
pid {workdir}/nginx.pid;
events {{
    worker_connections 1024;
}}
http {{
    default_type application/octet-stream;
    client_body_temp_path {workdir}/tmp/client_body;
    proxy_temp_path {workdir}/tmp/proxy;
    fastcgi_temp_path {workdir}/tmp/fastcgi;
    uwsgi_temp_path {workdir}/tmp/uwsgi;
    scgi_temp_path {workdir}/tmp/scgi;
    access_log {workdir}/logs/default.access.log;
{hostile}
    include {site};
}}
"""

#: nginx logs this (at notice level) once its listening sockets are bound and
#: the worker is forked: the start-up is complete.
STARTED = "start worker process "
START_TIMEOUT_S = 10.0


class RenderError(AssertionError):
    """The shipped config no longer has the line a substitution expects."""


@dataclass(frozen=True, slots=True)
class NginxSite:
    http_port: int
    https_port: int
    #: The test CA that signed nginx's certificate (127.0.0.1, localhost).
    ca: trustme.CA
    rendered: str
    workdir: Path

    def client_ssl(self, *, alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
        """A client context trusting nginx's certificate, offering ``alpn``."""
        return client_context(self.ca, alpn=alpn)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"


def _substitute(text: str, pattern: str, replacement: str, count: int) -> str:
    new_text, found = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if found != count:
        raise RenderError(
            f"{SHIPPED_SITE.name}: expected {count} line(s) matching {pattern!r}, found {found}"
        )
    return new_text


def render_site(
    shipped: str,
    *,
    gateway_port: int,
    http_port: int,
    https_port: int,
    certificate: Path,
    private_key: Path,
    log_dir: Path,
    metrics_allow: Sequence[str] | None = None,
    more_gateway_ports: Sequence[int] = (),
) -> str:
    """The shipped site with the machine-specific values replaced (and, with
    ``more_gateway_ports``, more gateways in its upstream block)."""
    servers = "".join(f"\n\\1 127.0.0.1:{port};" for port in more_gateway_ports)
    text = _substitute(
        shipped, r"^(\s*server) 127\.0\.0\.1:8080;", rf"\1 127.0.0.1:{gateway_port};{servers}", 1
    )
    text = _substitute(text, r"^(\s*listen) 80;", rf"\1 127.0.0.1:{http_port};", 1)
    text = _substitute(text, r"^(\s*listen) 443 ssl http2;", rf"\1 127.0.0.1:{https_port} ssl http2;", 1)
    text = _substitute(text, r"^(\s*ssl_certificate) +\S+;", rf"\1 {certificate};", 1)
    text = _substitute(text, r"^(\s*ssl_certificate_key) +\S+;", rf"\1 {private_key};", 1)
    text = _substitute(text, r"/var/log/nginx/", f"{log_dir}/", 3)
    if metrics_allow is not None:
        allow = " ".join(f"allow {address};" for address in metrics_allow)
        text = _substitute(text, r"^(\s*)allow 127\.0\.0\.1;\n\s*allow ::1;", rf"\1{allow}", 1)
    return text


def free_port() -> int:
    """A port nothing listens on now (nginx cannot report a port 0 back)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _write_certificate(ca: trustme.CA, directory: Path) -> tuple[Path, Path]:
    issued = ca.issue_cert("127.0.0.1", "localhost", "gateway.example.com")
    certificate, private_key = directory / "gateway.pem", directory / "gateway.key"
    certificate.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(private_key))
    return certificate, private_key


def client_context(ca: trustme.CA, *, alpn: Sequence[str] = ("http/1.1",)) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(list(alpn))
    return context


class _NginxProcess:
    """The nginx master as our child; its error log (stderr) is read by one
    owned task until nginx exits."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.log_lines: list[str] = []
        self._started = asyncio.Event()
        self._reader = asyncio.create_task(self._read_log(), name="nginx-stderr")

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.log_lines.append(line.decode(errors="replace").rstrip())
            if STARTED in self.log_lines[-1]:
                self._started.set()

    async def wait_started(self) -> bool:
        """True once nginx runs; False if it exited first."""
        started = asyncio.create_task(self._started.wait(), name="nginx-started")
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await asyncio.wait({started, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
            await asyncio.gather(started, return_exceptions=True)
        return self._started.is_set()

    async def stop(self) -> None:
        if self.process.returncode is None:
            # SIGQUIT: graceful shutdown. Streams still open (a test that
            # failed half-way) get SIGTERM's fast shutdown after a moment.
            self.process.send_signal(signal.SIGQUIT)
            try:
                async with asyncio.timeout(3):
                    await self.process.wait()
            except TimeoutError:
                self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(START_TIMEOUT_S):
            await self.process.wait()
            await self._reader


@asynccontextmanager
async def running_nginx(
    gateway_port: int,
    workdir: Path,
    ca: trustme.CA,
    *,
    metrics_allow: Sequence[str] | None = None,
    attempts: int = 3,
    more_gateway_ports: Sequence[int] = (),
) -> AsyncIterator[NginxSite]:
    """nginx with the shipped site in front of 127.0.0.1:``gateway_port``."""
    if NGINX is None:
        raise RuntimeError("nginx is not installed")
    for name in ("logs", "tmp", "tls"):
        (workdir / name).mkdir(parents=True, exist_ok=True)
    certificate, private_key = _write_certificate(ca, workdir / "tls")
    shipped = SHIPPED_SITE.read_text()
    for attempt in range(1, attempts + 1):
        http_port, https_port = free_port(), free_port()
        rendered = render_site(
            shipped,
            gateway_port=gateway_port,
            http_port=http_port,
            https_port=https_port,
            certificate=certificate,
            private_key=private_key,
            log_dir=workdir / "logs",
            metrics_allow=metrics_allow,
            more_gateway_ports=more_gateway_ports,
        )
        site_path = workdir / "gateway.conf"
        site_path.write_text(rendered)
        main_path = workdir / "nginx.conf"
        main_path.write_text(
            MAIN_CONFIG.format(
                # As root, nginx would switch its worker to "nobody", who can
                # read nothing in a test's private temporary directory.
                user="user root;" if os.geteuid() == 0 else "",
                workdir=workdir,
                hostile=STREAM_HOSTILE_HTTP_DEFAULTS,
                site=site_path,
            )
        )
        process = await asyncio.create_subprocess_exec(
            NGINX, "-p", str(workdir), "-c", str(main_path), "-g", "daemon off;",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        nginx = _NginxProcess(process)
        try:
            if not await nginx.wait_started():
                # It exited: its whole error log has been read.
                log = "\n".join(nginx.log_lines)
                # Another process took one of the free ports in between: retry.
                if "Address already in use" in log and attempt < attempts:
                    continue
                raise RuntimeError(f"nginx did not start:\n{log}")
            yield NginxSite(
                http_port=http_port,
                https_port=https_port,
                ca=ca,
                rendered=rendered,
                workdir=workdir,
            )
            return
        finally:
            await nginx.stop()
