"""``GATEWAY_WORKERS=N``: N worker processes sharing one listening port.

The supervisor (the process started as ``python -m gateway``) serves nothing
itself. It binds the address once with SO_REUSEPORT, without listening, only
to resolve port 0 and to fail early on an address in use; then it starts N
``python -m gateway`` workers with ``GATEWAY_PORT`` set to that port and
``GATEWAY_WORKER_INDEX`` to 0..N-1. Each worker listens with SO_REUSEPORT, so
the kernel spreads new connections over them (connections, not requests: a
keep-alive connection stays with its worker), and each is a full cluster
member (REDIS_URL is required) with its own internal listener.

Signals: SIGTERM, SIGINT and SIGHUP are passed on to every worker, which
drains as a single process does (a second one cuts the drain short). The workers run in
their own session, so a terminal's Ctrl-C reaches them once, through here.
A worker still running DRAIN_TIMEOUT_S + KILL_GRACE_S after the first stop
(hung, or stopped with SIGSTOP) gets SIGKILL, and the supervisor exits 1.
If a worker exits when the supervisor did not stop it (a crash, or a signal
sent to that worker alone: status 0 included), it alone is started again,
with the same index, after a back-off (RESTART_DELAY_S, doubling), while the
others serve on. More than GIVE_UP_EXITS such exits within GIVE_UP_WINDOW_S
mean a fault no restart cures: the others are stopped (they drain) and the
supervisor exits 1, for systemd's ``Restart=on-failure`` to restart the lot.
A worker that exits 2 (a bad configuration its start stopped on) is not
restarted: it would exit 2 again. The others are stopped and the supervisor
exits 2 too, which the systemd unit does not retry (RestartPreventExitStatus).
A stop cancels any restart still waiting.
If the supervisor itself is killed, each worker gets SIGKILL (no drain:
``_stop_with_parent``).
"""

from __future__ import annotations

import collections
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
from gateway.logs import say

PR_SET_PDEATHSIG = 1
#: How the supervisor tells a worker which one it is (not an operator setting).
WORKER_INDEX = "GATEWAY_WORKER_INDEX"

#: After the stop signal, how long past the drain timeout a worker may take
#: before it gets SIGKILL.
KILL_GRACE_S = 10.0
#: The signals that stop the workers (each passed on to every worker, which
#: drains on any of them).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: A worker that exits unasked is started again after RESTART_DELAY_S,
#: doubled for each further exit up to RESTART_DELAY_MAX_S (a worker that
#: fails at start does not spin); one that ran RESTART_RESET_S or longer
#: before it exited waits RESTART_DELAY_S again.
RESTART_DELAY_S = 0.1
RESTART_DELAY_MAX_S = 5.0
RESTART_RESET_S = 10.0
#: More than GIVE_UP_EXITS unasked exits (of all workers together) within
#: GIVE_UP_WINDOW_S: the supervisor stops the others and exits 1.
GIVE_UP_EXITS = 5
GIVE_UP_WINDOW_S = 60.0
#: A worker's (and the supervisor's) status for a bad configuration
#: (gateway.__main__.EXIT_BAD_CONFIGURATION): no restart can fix it.
EXIT_BAD_CONFIGURATION = 2


def _stop_with_parent(supervisor: int) -> None:
    """In the worker, before exec: SIGKILL when the supervisor dies (Linux's
    PR_SET_PDEATHSIG), so a supervisor killed outright leaves no worker
    behind. (A supervisor that stops normally forwards SIGTERM and each
    worker drains; one that was killed gave its workers no drain either.)
    A supervisor that died between the fork and this call sends nothing:
    then the worker's parent is no longer ``supervisor``, and it stops here.
    The stop signals the supervisor held while forking are let through
    again (a blocked signal mask survives exec)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
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
    supervisor = _Supervisor(settings, env, placeholder.getsockname()[1])
    previous = {s: signal.signal(s, supervisor.on_signal) for s in STOP_SIGNALS}
    try:
        return supervisor.run()
    finally:
        supervisor.kill_all()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        placeholder.close()


@dataclasses.dataclass
class _Slot:
    """One worker index: the process running as it, and its restarts."""

    index: int
    #: None before the first start and while a restart waits.
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    #: The wait before the next restart.
    delay: float = RESTART_DELAY_S
    #: When the next restart is due; None when none waits.
    restart_at: float | None = None


class _Supervisor:
    """The workers of one supervisor, their restarts, and when they must be
    gone by."""

    def __init__(self, settings: Settings, env: Mapping[str, str], port: int) -> None:
        self.settings = settings
        self.env = env
        self.port = port
        self.slots = [_Slot(index) for index in range(settings.workers)]
        #: When the unasked exits of the last GIVE_UP_WINDOW_S happened.
        self.exits: collections.deque[float] = collections.deque()
        #: Set by the first stop: when workers still running get SIGKILL.
        self.deadline: float | None = None
        self.status = 0

    def on_signal(self, signum: int, frame: object) -> None:
        self.stop(signum)

    def stop(self, signum: int) -> None:
        """Pass ``signum`` to every running worker and cancel the restarts
        that wait; the first stop starts the kill deadline (the drain timeout
        plus KILL_GRACE_S)."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.settings.drain_timeout_s + KILL_GRACE_S
        for slot in self.slots:
            slot.restart_at = None
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(signum)

    def run(self) -> int:
        for slot in self.slots:
            if not self._spawn(slot):
                break  # stopped while starting: no more workers
        while True:
            now = time.monotonic()
            if self.deadline is None:
                self._check_exits(now)
                self._restart_due(now)
            elif not self._running():
                break
            elif now >= self.deadline:
                self._kill_late()
                break
            time.sleep(0.1)
        # A worker stopped by a stop signal before its own handler was in
        # place died of it: stopped as asked, as one that drained.
        stopped = {0, *(-signum for signum in STOP_SIGNALS)}
        if self.status == 0 and any(
            child.returncode not in stopped for child in self._children()
        ):
            self.status = 1
        return self.status

    def _spawn(self, slot: _Slot) -> bool:
        """Start worker ``slot.index``, unless a stop came first (False).
        The stop signals are held until it is in its slot: one arriving
        meanwhile then reaches it too, where it would have reached only the
        workers started before. (Blocking them runs the handler of any that
        came just before, so the deadline is current here.)"""
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            if self.deadline is not None:
                return False
            slot.process = subprocess.Popen(
                [sys.executable, "-m", "gateway"],
                env={**self.env, "GATEWAY_PORT": str(self.port), WORKER_INDEX: str(slot.index)},
                start_new_session=True,
                preexec_fn=functools.partial(_stop_with_parent, os.getpid()),
            )
            slot.started = time.monotonic()
            return True
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _children(self) -> list[subprocess.Popen[bytes]]:
        return [slot.process for slot in self.slots if slot.process is not None]

    def _running(self) -> list[subprocess.Popen[bytes]]:
        return [child for child in self._children() if child.poll() is None]

    def _check_exits(self, now: float) -> None:
        """A worker that exited before any stop did so unasked, whatever its
        status (one sent SIGTERM on its own drains and exits 0): schedule its
        restart, or give up when workers keep exiting: stop the others,
        exit 1, and Restart=on-failure starts the lot again. One that exited
        2 stops the others at once, and the supervisor exits 2."""
        for slot in self.slots:
            if self.deadline is not None:
                return  # a stop came meanwhile: nothing more to restart
            if slot.process is None or (code := slot.process.poll()) is None:
                continue
            line = (f"llm-stream-gateway: worker {slot.index + 1} of {len(self.slots)} "
                    f"(pid {slot.process.pid}) exited with status {code}")
            slot.process = None
            if code == EXIT_BAD_CONFIGURATION:
                say(f"{line}; a bad configuration, which no restart can fix: stopping the "
                    "others", file=sys.stderr)
                self.status = EXIT_BAD_CONFIGURATION
                self.stop(signal.SIGTERM)
                return
            self.exits.append(now)
            while self.exits[0] <= now - GIVE_UP_WINDOW_S:
                self.exits.popleft()
            if len(self.exits) > GIVE_UP_EXITS:
                say(f"{line}; giving up: stopping the others ({len(self.exits)} worker exits "
                    f"in {GIVE_UP_WINDOW_S:g} s)", file=sys.stderr)
                self.status = 1
                self.stop(signal.SIGTERM)
                return
            if now - slot.started >= RESTART_RESET_S:
                slot.delay = RESTART_DELAY_S
            say(f"{line}; restarting it in {slot.delay:g} s", file=sys.stderr)
            slot.restart_at = now + slot.delay
            slot.delay = min(slot.delay * 2, RESTART_DELAY_MAX_S)

    def _restart_due(self, now: float) -> None:
        for slot in self.slots:
            if slot.restart_at is not None and now >= slot.restart_at:
                slot.restart_at = None
                if not self._spawn(slot):
                    return

    def _kill_late(self) -> None:
        """Past the deadline: SIGKILL whatever still runs (a hung or stopped
        worker would otherwise keep the supervisor, and its port, forever)."""
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                say(f"llm-stream-gateway: worker {slot.index + 1} of {len(self.slots)} still "
                    f"running {self.settings.drain_timeout_s + KILL_GRACE_S:g} s after the "
                    "stop; killing it", file=sys.stderr)
        self.kill_all()

    def kill_all(self) -> None:
        """SIGKILL every worker still running and reap it."""
        for child in self._children():
            if child.poll() is None:
                child.kill()
            child.wait()


def as_worker(settings: Settings, env: Mapping[str, str]) -> Settings:
    """The settings of a worker started by the supervisor (unchanged in a
    process started on its own)."""
    raw = env.get(WORKER_INDEX, "")
    if not raw.isdigit() or int(raw) >= settings.workers:
        return settings
    return dataclasses.replace(settings, worker_index=int(raw))
