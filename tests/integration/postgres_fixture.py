"""A real PostgreSQL server for the exchange log's tests.

Debian's server binaries (``/usr/lib/postgresql/<version>/bin``, or initdb
on PATH), a cluster made by ``initdb`` in a temporary directory owned by the
``postgres`` user (the server refuses to run as root, so every command runs
through ``runuser -u postgres --`` when we are root), listening on
127.0.0.1 and a free port only, its unix socket in the same directory.
Trust authentication: nothing leaves the loopback. ``fsync=off``: a test
cluster need not survive a power cut, and it halves the start-up.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def _bin_dir() -> Path | None:
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


PG_BIN = _bin_dir()
START_TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresServer:
    workdir: Path
    port: int

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str) -> None:
        assert PG_BIN is not None
        command = [str(PG_BIN / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=START_TIMEOUT_S)

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.workdir} "
            "-c fsync=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.workdir / "server.log"),
                  "-o", options, "-w", "-t", str(START_TIMEOUT_S), "start")

    def stop(self) -> None:
        """Fast shutdown: open connections are ended (what a crash or a
        restart looks like to a client)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    assert PG_BIN is not None, "PostgreSQL is not installed (.ci/run installs it)"
    workdir = Path(tempfile.mkdtemp(prefix="pg-test-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(workdir, "postgres", "postgres")
        server = PostgresServer(workdir=workdir, port=free_port())
        server._run("initdb", "-D", str(server.data), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8", "--no-sync")
        server.start()
        try:
            yield server
        finally:
            try:
                server.stop()
            except subprocess.CalledProcessError:
                pass  # already stopped
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
