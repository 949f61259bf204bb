"""A throwaway PostgreSQL server for tests and benchmarks.

:class:`PostgreSQLServer` makes a cluster in a temporary folder with
``initdb``, starts it with ``pg_ctl`` on a free port of 127.0.0.1 (and a
Unix socket in that folder), and removes it all when stopped.  Run as root,
the server runs as an unprivileged user (``postgres`` if it exists, else
``nobody``), since PostgreSQL refuses to run as root.  It needs Debian's
``postgresql`` package (or any PostgreSQL whose ``pg_config`` or
``initdb`` is found).
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess  # nosec B404 - runs PostgreSQL's own programs
import tempfile
from typing import Any

__all__ = ["PostgreSQLServer", "find_bindir"]


def find_bindir() -> str | None:
    """The folder of PostgreSQL's server programs (Debian's, newest first,
    or that of the ``initdb`` on the ``PATH``), or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda p: int(p.split("/")[-2]) if
                        p.split("/")[-2].isdigit() else 0, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(os.path.realpath(initdb)))
    for folder in candidates:
        if os.path.exists(os.path.join(folder, "initdb")) and os.path.exists(
                os.path.join(folder, "pg_ctl")):
            return folder
    return None


def _unprivileged_uid() -> int:
    """The uid to run PostgreSQL as when we are root."""
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            continue
    raise RuntimeError("PostgreSQL refuses to run as root, and there is no"
                       " 'postgres' or 'nobody' user to run it as")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgreSQLServer:
    """A PostgreSQL server of its own, for as long as the ``with`` block
    (or between :meth:`start` and :meth:`stop`).

    *settings* are extra ``postgresql.conf`` settings, e.g.
    ``{"max_prepared_transactions": 10}``; *fsync* False trades
    durability for speed (tests; never benchmarks).
    """

    def __init__(self, settings: dict[str, Any] | None = None, *,
                 fsync: bool = True, bindir: str | None = None) -> None:
        self.bindir = bindir or find_bindir()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL's initdb and pg_ctl were not found"
                               " (install Debian's postgresql package)")
        self.settings = {"fsync": "on" if fsync else "off",
                         "synchronous_commit": "on" if fsync else "off",
                         "full_page_writes": "on" if fsync else "off",
                         **(settings or {})}
        self.folder: str | None = None
        self.port = 0
        self.user = "postgres"
        self._run_as: int | None = None

    # -- paths and URLs -------------------------------------------------------

    @property
    def data(self) -> str:
        if self.folder is None:
            raise RuntimeError("the server is not started")
        return os.path.join(self.folder, "data")

    @property
    def url(self) -> str:
        """A URL of the server's ``postgres`` database over TCP."""
        return self.url_of("postgres")

    def url_of(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    # -- running it -----------------------------------------------------------

    def _run(self, *args: str, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        program = os.path.join(str(self.bindir), args[0])
        return subprocess.run(  # noqa: S603 - PostgreSQL's own programs
            [program, *args[1:]], capture_output=True, text=True, check=check,
            timeout=timeout, user=self._run_as, cwd=self.folder,
            env={**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"})

    def start(self) -> PostgreSQLServer:
        self.folder = tempfile.mkdtemp(prefix="mailoutbox-pg-")
        if os.geteuid() == 0:  # pragma: no branch - the tests run as root
            self._run_as = _unprivileged_uid()
            os.chown(self.folder, self._run_as, -1)
        os.chmod(self.folder, 0o700)
        self._run("initdb", "-D", self.data, "-U", self.user, "-A", "trust",
                  "-E", "UTF8", "--no-sync")
        self.port = _free_port()
        with open(os.path.join(self.data, "postgresql.conf"), "a",
                  encoding="utf-8") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.folder}'\n")
            for key, value in self.settings.items():
                conf.write(f"{key} = {value}\n")
        self.pg_ctl("start")
        return self

    def pg_ctl(self, action: str, *options: str) -> None:
        """Run ``pg_ctl ACTION`` (start, stop, restart...) and wait."""
        self._run("pg_ctl", action, "-D", self.data, "-w", "-t", "120",
                  "-l", os.path.join(str(self.folder), "log"), *options)

    def restart(self, mode: str = "fast") -> None:
        """Restart the server (``-m immediate`` is a crash and recovery)."""
        self.pg_ctl("restart", "-m", mode)

    def stop(self) -> None:
        if self.folder is None:
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None

    def __enter__(self) -> PostgreSQLServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
