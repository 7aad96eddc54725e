"""``GATEWAY_WORKERS=N``: N worker processes sharing one listening port.

The supervisor (the process started as ``python -m gateway``) serves nothing
itself. It binds the address once with SO_REUSEPORT, without listening, only
to resolve port 0 and to fail early on an address in use; then it starts N
``python -m gateway`` workers with ``GATEWAY_PORT`` set to that port and
``GATEWAY_WORKER_INDEX`` to 0..N-1. Each worker listens with SO_REUSEPORT, so
the kernel spreads new connections over them (connections, not requests: a
keep-alive connection stays with its worker), and each is a full cluster
member (REDIS_URL is required) with its own internal listener.

Signals: SIGTERM/SIGINT are passed on to every worker, which drains as a
single process does (a second one cuts the drain short). The workers run in
their own session, so a terminal's Ctrl-C reaches them once, through here.
If a worker exits on its own with a failure, the others are stopped and the
supervisor exits 1 (systemd's ``Restart=on-failure`` restarts the lot). If
the supervisor itself is killed, each worker gets SIGTERM (and drains).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

from gateway.config import Settings

PR_SET_PDEATHSIG = 1
#: How the supervisor tells a worker which one it is (not an operator setting).
WORKER_INDEX = "GATEWAY_WORKER_INDEX"

#: After the stop signal, how long past the drain timeout a worker may take.
KILL_GRACE_S = 10.0


def _stop_with_parent(supervisor: int) -> None:
    """In the worker, before exec: SIGKILL when the supervisor dies (Linux's
    PR_SET_PDEATHSIG), so a supervisor killed outright leaves no worker
    behind. (A supervisor that stops normally forwards SIGTERM and each
    worker drains; one that was killed gave its workers no drain either.)
    A supervisor that died between the fork and this call sends nothing:
    then the worker's parent is no longer ``supervisor``, and it stops here."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: systemd's KillMode=mixed still ends them
    if os.getppid() != supervisor:
        os._exit(1)


def reserve_port(settings: Settings) -> socket.socket:
    """The workers' address, bound (not listening) with SO_REUSEPORT for as
    long as they run; OSError when it is in use.

    A bind with SO_REUSEPORT succeeds next to any other socket that has it,
    another supervisor's workers included, so whether the address is free
    is asked first by a bind without it (SO_REUSEADDR only: a listener makes
    it busy, connections of an earlier process in TIME_WAIT do not). The
    bind that holds the port needs SO_REUSEADDR too: SO_REUSEPORT alone
    fails next to the TIME_WAIT entries a single gateway leaves on its port
    for 60 s after closing keep-alive connections in its drain."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((settings.host, settings.port))
        port = probe.getsockname()[1]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((settings.host, port))
    except OSError:
        sock.close()
        raise
    return sock


def supervise(settings: Settings, env: Mapping[str, str], placeholder: socket.socket) -> int:
    """Run the workers on ``placeholder``'s port (``reserve_port``) until they end."""
    port = placeholder.getsockname()[1]
    stopping: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopping.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    children: list[subprocess.Popen[bytes]] = []
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        for index in range(settings.workers):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gateway"],
                    env={**env, "GATEWAY_PORT": str(port), WORKER_INDEX: str(index)},
                    start_new_session=True,
                    preexec_fn=functools.partial(_stop_with_parent, os.getpid()),
                )
            )
        while any(child.poll() is None for child in children):
            for child in children:
                code = child.poll()
                if code not in (None, 0) and not stopping:
                    print(f"llm-stream-gateway: worker {child.pid} exited with status {code}; "
                          "stopping the others", file=sys.stderr, flush=True)
                    status = 1
                    forward(signal.SIGTERM, None)
            time.sleep(0.1)
    finally:
        deadline = time.monotonic() + settings.drain_timeout_s + KILL_GRACE_S
        for child in children:
            if child.poll() is None:
                if not stopping:
                    child.terminate()
                try:
                    child.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        placeholder.close()
    if any(child.returncode not in (0, -signal.SIGTERM, -signal.SIGINT) for child in children):
        status = 1
    return status


def as_worker(settings: Settings, env: Mapping[str, str]) -> Settings:
    """The settings of a worker started by the supervisor (unchanged in a
    process started on its own)."""
    raw = env.get(WORKER_INDEX, "")
    if not raw.isdigit() or int(raw) >= settings.workers:
        return settings
    return dataclasses.replace(settings, worker_index=int(raw))
