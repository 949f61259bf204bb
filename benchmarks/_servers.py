"""Servers the benchmarks start by themselves, all on 127.0.0.1.

- Postfix's ``smtp-sink`` (a fast C sink that advertises PIPELINING);
- an aiosmtpd sink in its own process, optionally with STARTTLS;
- a TCP proxy in its own process that delays every chunk by a fixed time in
  each direction, to add round-trip time on loopback;
- a durable PostgreSQL server in a temporary folder.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def find_smtp_sink() -> str | None:
    return shutil.which("smtp-sink") or (
        "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None
    )


@contextlib.contextmanager
def _process(argv: list[str], port: int):
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def smtp_sink():
    """Postfix's smtp-sink on a free port; yields the port."""
    binary = find_smtp_sink()
    if binary is None:
        raise SystemExit(
            "smtp-sink not found: apt-get install postfix (it ships smtp-sink)"
        )
    port = free_port()
    argv = [binary]
    if os.getuid() == 0:
        argv += ["-u", "nobody"]
    argv += [f"127.0.0.1:{port}", "1000"]
    with _process(argv, port):
        yield port


@contextlib.contextmanager
def aiosmtpd_sink(tls_dir: str | None = None):
    """An aiosmtpd server that discards messages, in its own process;
    with *tls_dir* (holding server.pem and server.key) it offers
    STARTTLS.  Yields the port."""
    port = free_port()
    argv = [sys.executable, os.path.join(HERE, "_sink_server.py"), str(port)]
    if tls_dir:
        argv.append(tls_dir)
    with _process(argv, port):
        yield port


@contextlib.contextmanager
def delaying_proxy(target_port: int, one_way_delay: float):
    """A proxy adding *one_way_delay* seconds each way; yields its port."""
    port = free_port()
    argv = [
        sys.executable, os.path.join(HERE, "_delay_proxy.py"),
        str(port), str(target_port), str(one_way_delay),
    ]
    with _process(argv, port):
        yield port


@contextlib.contextmanager
def postgresql_server(settings: dict | None = None):
    """A durable PostgreSQL server of its own (fsync on, as in production)
    in a temporary folder; yields the
    :class:`mailoutbox.testing.postgresql.PostgreSQLServer` (its ``url``:
    its ``postgres`` database)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise SystemExit(
            "psycopg not found: pip install 'mailoutbox[postgresql]'"
        ) from None
    from mailoutbox.testing.postgresql import PostgreSQLServer
    from mailoutbox.testing.postgresql import find_bindir

    if find_bindir() is None:
        raise SystemExit(
            "PostgreSQL's initdb not found: apt-get install postgresql"
        )
    with PostgreSQLServer(settings, fsync=True) as server:
        yield server


def server_cpu(server) -> float:
    """The CPU seconds used so far by the PostgreSQL *server*: its
    postmaster, its live processes, and those that ended (backends of
    closed connections, reaped by the postmaster)."""
    with open(os.path.join(server.data, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(pid) == postmaster:
            total += sum(int(x) for x in fields[11:15])  # and its children's
        elif int(fields[1]) == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")
