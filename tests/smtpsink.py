"""Postfix's ``smtp-sink`` as a test server with fault injection.

``smtp-sink`` is a fast SMTP server in C that throws messages away.  It
advertises PIPELINING, and its options make it misbehave per command (the
command names are CONNECT, HELO, EHLO, MAIL, RCPT, DATA, ``.``, RSET, NOOP,
QUIT)::

    -r CMD,...   answer with a 4xx reply        (implies -p: no PIPELINING)
    -f CMD,...   answer with a 5xx reply        (implies -p)
    -Q CMD,...   answer 421 and disconnect
    -q CMD,...   disconnect without answering
    -t SECONDS   drop a connection idle for that long
    -p / -e      do not advertise PIPELINING / ESMTP

:class:`SMTPSink` starts it on ``127.0.0.1`` and a free port and stops it.
Tests that need it carry :data:`requires_smtp_sink`, which skips them when the
binary is missing (it comes with the ``postfix`` package).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import time

import pytest

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"

requires_smtp_sink = [
    pytest.mark.smtpsink,
    pytest.mark.skipif(
        not os.access(SMTP_SINK, os.X_OK),
        reason="Postfix's smtp-sink is not installed (apt-get install postfix)",
    ),
]

_COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SMTPSink:
    """``smtp-sink`` with *options* (e.g. ``"-Q", "MAIL"``) on
    ``127.0.0.1:port``, writing its output into *directory*.

    Use it as a context manager.  :meth:`counters` reads the counters that
    ``-c`` prints (sessions, QUIT commands, messages); the probe that waits
    for the server to listen counts as one session without QUIT.
    """

    host = "127.0.0.1"

    def __init__(self, *options: str, directory: str, timeout: float = 5.0) -> None:
        self.options = options
        self.directory = directory
        self.timeout = timeout
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._stdout = os.path.join(directory, "smtp-sink.out")
        self._stderr = os.path.join(directory, "smtp-sink.err")

    def _argv(self, port: int) -> list[str]:
        argv = [SMTP_SINK, "-c"]
        if os.geteuid() == 0:
            # smtp-sink refuses to run as root without dropping privileges.
            argv += ["-u", pwd.getpwnam("nobody").pw_name]
        return [*argv, *self.options, f"{self.host}:{port}", "64"]

    def start(self) -> SMTPSink:
        """Start the server; retries with another port if the one picked
        was taken in the meantime."""
        errors = ""
        for _attempt in range(5):
            port = free_port()
            with open(self._stdout, "wb") as out, open(self._stderr, "wb") as err:
                self.process = subprocess.Popen(
                    self._argv(port), stdout=out, stderr=err
                )
            if self._wait_listening(port):
                self.port = port
                return self
            self.stop()
            with open(self._stderr, "rb") as err:
                errors = err.read().decode("utf-8", "replace")
            if "in use" not in errors:
                break
        raise RuntimeError(f"smtp-sink did not start: {errors.strip()}")

    def _wait_listening(self, port: int) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with socket.create_connection((self.host, port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Stop the server and wait for it to exit."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(self.timeout)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hung sink
            process.kill()
            process.wait(self.timeout)

    def counters(self, settle: float = 1.0) -> dict[str, int]:
        """The last counters printed, ``{"sess": ..., "quit": ...,
        "mesg": ...}``, once they have not changed for 0.1 s (waiting at
        most *settle* seconds)."""
        deadline = time.monotonic() + settle
        last = None
        while True:
            with open(self._stdout, "rb") as out:
                found = _COUNTERS.findall(out.read())
            current = found[-1] if found else (b"0", b"0", b"0")
            if current == last or time.monotonic() > deadline:
                break
            last = current
            time.sleep(0.1)
        return dict(zip(("sess", "quit", "mesg"), map(int, current), strict=True))

    def __enter__(self) -> SMTPSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
