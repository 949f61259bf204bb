"""Security properties, end to end: through the deliveries, the queue
processor and the ``mailoutbox`` command, with the real SMTPMailer and real
servers on 127.0.0.1.

- TLS certificates are verified by default: an untrusted one is refused,
  one signed by a CA given with ``ca_file`` is accepted.
- ``force_tls`` never falls back to plain text, whatever a server (or a
  man in the middle) does with STARTTLS, and neither does a mailer without
  it once STARTTLS was offered.
- Credentials never appear in log records, errors, events, the command's
  output or the queue's files.
- The queue's folders and files are private (0700/0600) whatever the umask.
- The processor and the command never follow a symbolic link out of the
  queue, nor take a message id for a path.
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import ssl
import sys
import threading
import time
import traceback

import pytest
import transaction

from mailoutbox.cli import EXIT_NOT_FOUND
from mailoutbox.cli import EXIT_NOT_SENT
from mailoutbox.cli import EXIT_OK
from mailoutbox.delivery import DirectMailDelivery
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.envelope import format_envelope
from mailoutbox.errors import MailAuthenticationError
from mailoutbox.errors import MailError
from mailoutbox.errors import MailTLSError
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread

from .test_cli import cli

USER = "alice"
PASSWORD = "s3cret-pw"  # the tls_server fixture's
WRONG = "wr0ng-Pa55-word"
MESSAGE = b"From: app@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
LATER = 10**10  # a clock at which every deferred message is due


def secret_forms(password: str) -> list[bytes]:
    """The password as it could leak: plain, and as AUTH PLAIN and LOGIN
    send it."""
    raw = password.encode()
    return [raw, base64.b64encode(raw),
            base64.b64encode(b"\0" + USER.encode() + b"\0" + raw),
            base64.b64encode(USER.encode() + b"\0" + USER.encode() + b"\0" + raw)]


def assert_no_secret(text: str | bytes, password: str = PASSWORD) -> None:
    data = text.encode("utf-8", "replace") if isinstance(text, str) else text
    for form in secret_forms(password):
        assert form not in data, f"{form!r} leaked"


def queue_message(queue_path: str, message: bytes = MESSAGE,
                  toaddrs: tuple[str, ...] = ("jane@example.org",)) -> str:
    tm = transaction.TransactionManager()
    with tm:
        return QueuedMailDelivery(queue_path, transaction_manager=tm).send(
            "app@example.org", list(toaddrs), message)


def queue_files(queue_path: str) -> dict[str, bytes]:
    """Every file under the queue, by relative path (links not followed)."""
    found = {}
    for folder, _dirs, names in os.walk(queue_path):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                with open(path, "rb") as f:
                    found[os.path.relpath(path, queue_path)] = f.read()
    return found


@pytest.fixture
def processors():
    """Build queue processors; stopped after the test."""
    made = []

    def make(queue_path, mailer, **options):
        processor = QueueProcessorThread(concurrency=1, **options)
        processor.setMailer(mailer)
        processor.setQueuePath(queue_path)
        made.append(processor)
        return processor

    yield make
    for processor in made:
        processor.stop(timeout=10)


# -- TLS verification -------------------------------------------------------------


def test_queue_refuses_an_untrusted_certificate_by_default(
        tls_server, certificates, queue_path, processors, events):
    message_id = queue_message(queue_path)
    untrusted = processors(queue_path, SMTPMailer("localhost", tls_server.port,
                                                  timeout=5))
    stats = untrusted.process_queue()
    assert (stats.sent, stats.deferred) == (0, 1)
    assert "CERTIFICATE_VERIFY_FAILED" in events[-1].errorMessage
    assert "MAIL" not in tls_server.commands
    untrusted.stop()

    trusted = processors(queue_path, SMTPMailer(
        "localhost", tls_server.port, timeout=5, ca_file=certificates.ca_file))
    assert trusted.process_queue(now=LATER).sent == 1
    assert [(m.message_id, m.tls) for m in tls_server.messages] == [(message_id, True)]


def test_direct_delivery_refuses_an_untrusted_certificate(tls_server, certificates):
    tm = transaction.TransactionManager()
    delivery = DirectMailDelivery(SMTPMailer("localhost", tls_server.port, timeout=5),
                                  transaction_manager=tm)
    with pytest.raises(MailTLSError, match="CERTIFICATE_VERIFY_FAILED"), tm:
        delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
    assert "MAIL" not in tls_server.commands
    delivery.mailer = SMTPMailer("localhost", tls_server.port, timeout=5,
                                 ca_file=certificates.ca_file)
    with tm:
        delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
    assert [m.tls for m in tls_server.messages] == [True]
    delivery.mailer.close()


def test_the_command_verifies_certificates_by_default(tls_server, certificates,
                                                      queue_path):
    queue_message(queue_path)
    server = ["--hostname", "127.0.0.1", "--port", str(tls_server.port)]
    result = cli("run", queue_path, *server)
    assert result.code == EXIT_NOT_SENT
    assert "CERTIFICATE_VERIFY_FAILED" in result.err
    assert tls_server.messages == []
    assert cli("retry", queue_path, "--all").code == EXIT_OK
    result = cli("run", queue_path, *server, "--ca-file", certificates.ca_file)
    assert result.code == EXIT_OK, result.err
    assert [m.tls for m in tls_server.messages] == [True]


# -- no fallback to plain text ---------------------------------------------------


class DowngradeServer:
    """A hostile SMTP peer on 127.0.0.1 that mishandles STARTTLS, to lure
    the client into plain text; it accepts AUTH, MAIL, RCPT and DATA in
    plain text and records every byte it receives before TLS.

    *mode*: ``strip`` does not offer STARTTLS; ``refuse`` answers 454;
    after answering 220, ``garbage`` sends something that is not TLS,
    ``close`` closes, ``midway`` reads the ClientHello and closes, and
    ``certificate`` handshakes with *tls_context* (a certificate the client
    does not trust).
    """

    def __init__(self, mode: str, tls_context: ssl.SSLContext | None = None) -> None:
        self.mode = mode
        self.tls_context = tls_context
        self.received = b""
        self.connections = 0
        self._conn: socket.socket | None = None
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> DowngradeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self._sock.close()

    @property
    def plain_commands(self) -> list[str]:
        return [line.split(b" ")[0].split(b":")[0].decode("ascii", "replace").upper()
                for line in self.received.split(b"\r\n") if line]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _address = self._sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            self._conn = conn
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        conn.sendall(b"220 downgrade.test ESMTP\r\n")
        reader = conn.makefile("rb")
        in_data = False
        for _ in range(1000):
            line = reader.readline(10_000)
            if not line:
                return
            self.received += line
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    conn.sendall(b"250 2.0.0 Stolen\r\n")
                continue
            verb = line.split(b" ")[0].strip().upper()
            if verb in (b"EHLO", b"HELO"):
                tls = b"" if self.mode == "strip" else b"250-STARTTLS\r\n"
                conn.sendall(b"250-downgrade.test\r\n" + tls
                             + b"250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n")
            elif verb == b"STARTTLS":
                self._starttls(conn)
                return
            elif verb == b"AUTH":
                conn.sendall(b"235 2.7.0 Welcome\r\n")
            elif verb == b"DATA":
                in_data = True
                conn.sendall(b"354 Go ahead\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 Bye\r\n")
                return
            else:
                conn.sendall(b"250 OK\r\n")

    def _starttls(self, conn: socket.socket) -> None:
        if self.mode == "refuse":
            conn.sendall(b"454 4.7.0 TLS not available\r\n")
            # Whatever the client says next is in plain text: keep reading.
            with contextlib.suppress(OSError):
                self.received += conn.recv(65536)
            return
        conn.sendall(b"220 2.0.0 Ready to start TLS\r\n")
        if self.mode == "garbage":
            conn.recv(65536)  # the ClientHello
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        elif self.mode == "midway":
            conn.recv(65536)
        elif self.mode == "certificate":
            with contextlib.suppress(OSError, ssl.SSLError):
                self.tls_context.wrap_socket(conn, server_side=True).recv(1)


HOSTILE = ["strip", "refuse", "garbage", "close", "midway", "certificate"]


# Without force_tls, a server without STARTTLS gets plain text: that case is
# test_plain_text_needs_a_server_without_starttls.
@pytest.mark.parametrize(("mode", "force_tls"), [
    *((mode, True) for mode in HOSTILE),
    *((mode, False) for mode in HOSTILE if mode != "strip"),
])
def test_no_fallback_to_plain_text(mode, force_tls, certificates, queue_path,
                                   processors, events):
    queue_message(queue_path)
    with DowngradeServer(mode, certificates.server_context()) as server:
        mailer = SMTPMailer("127.0.0.1", server.port, USER, PASSWORD,
                            force_tls=force_tls, timeout=5)
        processor = processors(queue_path, mailer)
        first = processor.process_queue()
        second = processor.process_queue(now=time.time() + 3600)  # the retry
        tm = transaction.TransactionManager()
        direct = DirectMailDelivery(mailer, transaction_manager=tm)
        with pytest.raises(MailError), tm:
            direct.send("app@example.org", ["jane@example.org"], MESSAGE)
    assert (first.sent, second.sent) == (0, 0)
    assert [e.permanent for e in events[:2]] == [False, False]
    assert server.connections == 3
    assert set(server.plain_commands) <= {"EHLO", "STARTTLS"}, server.plain_commands
    assert_no_secret(server.received)
    assert b"Subject: hello" not in server.received


def test_plain_text_needs_a_server_without_starttls(queue_path, processors):
    """What force_tls is for: without it, a server (or a man in the middle)
    that offers no STARTTLS gets the message, and the credentials, in plain
    text."""
    queue_message(queue_path)
    with DowngradeServer("strip") as server:
        processor = processors(queue_path, SMTPMailer(
            "127.0.0.1", server.port, USER, PASSWORD, timeout=5))
        assert processor.process_queue().sent == 1
    assert server.plain_commands[:3] == ["EHLO", "AUTH", "MAIL"]


# -- credentials are never shown -----------------------------------------------


def _all_text(error: BaseException) -> str:
    return "\n".join([str(error), repr(error), str(vars(error)),
                      "".join(traceback.format_exception(error))])


@pytest.mark.parametrize("password", [PASSWORD, WRONG, "pässwörd-" + WRONG])
def test_credentials_never_in_logs_errors_events_or_files(
        password, tls_server, certificates, queue_path, processors, events,
        caplog):
    caplog.set_level(logging.DEBUG)
    queue_message(queue_path)
    mailer = SMTPMailer("localhost", tls_server.port, USER, password, timeout=5,
                        ca_file=certificates.ca_file)
    processor = processors(queue_path, mailer)
    stats = processor.process_queue()
    assert stats.sent == (password == PASSWORD)
    tm = transaction.TransactionManager()
    delivery = DirectMailDelivery(mailer, transaction_manager=tm)
    mailer.close()
    try:
        with tm:
            delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
    except MailAuthenticationError as exc:
        assert password != PASSWORD
        assert_no_secret(_all_text(exc), password)
    texts = [caplog.text, repr(mailer), *map(repr, events)]
    texts += [str(vars(e)) for e in events]
    texts += [r.getMessage() for r in caplog.records]
    for text in texts:
        assert_no_secret(text, password)
        assert "pässwörd" not in text
    for data in queue_files(queue_path).values():
        assert_no_secret(data, password)
    assert len(tls_server.messages) == 2 * (password == PASSWORD)


def test_the_command_never_shows_credentials(tls_server, certificates, queue_path,
                                             monkeypatch, tmp_path):
    """``run -vv`` (debug log), ``status``, ``list`` and ``show``, for
    messages deferred by a failed login; the config file's password too."""
    queue_message(queue_path)
    queue_message(queue_path, toaddrs=("bob@example.org",))
    ini = tmp_path / "mail.ini"
    ini.write_text(f"[mailoutbox]\nusername = {USER}\npassword = {WRONG}\n")
    server = ["--hostname", "localhost", "--port", str(tls_server.port),
              "--ca-file", certificates.ca_file]
    outputs = [cli("run", queue_path, *server, "--config", str(ini), "-vv",
                   "--retry-initial", "0.5")]
    assert outputs[-1].code == EXIT_NOT_SENT
    monkeypatch.setenv("MAILOUTBOX_TEST_PW", WRONG)
    time.sleep(1.05)  # due, and the first attempt is over --max-age ago
    outputs.append(cli("run", queue_path, *server, "--username", USER,
                       "--password-env", "MAILOUTBOX_TEST_PW", "-vv",
                       "--max-age", "1s"))
    assert "authentication failed" in outputs[-1].err
    assert outputs[-1].out.startswith("sent 0, deferred 0, failed 2")
    names = sorted(os.listdir(os.path.join(queue_path, "failed")))
    names = [n for n in names if not n.startswith(".")]
    assert len(names) == 2
    for command, *rest in (["status"], ["status", "--json"], ["list"],
                           ["list", "--all"], ["list", "--all", "--json"],
                           *(["show", n] for n in names),
                           *(["show", n, "--raw"] for n in names)):
        outputs.append(cli(command, queue_path, *rest, "-vv"))
        assert outputs[-1].code == EXIT_OK, (command, outputs[-1].err)
    assert "authentication failed" in "".join(o.out for o in outputs)
    for output in outputs:
        assert_no_secret(output.out + output.err, WRONG)
    for data in queue_files(queue_path).values():
        assert_no_secret(data, WRONG)
    assert tls_server.messages == []


# -- private files ---------------------------------------------------------------


@contextlib.contextmanager
def umask(mask: int):
    saved = os.umask(mask)
    try:
        yield
    finally:
        os.umask(saved)


def modes(queue_path: str) -> dict[str, int]:
    """The permission bits of the queue and everything in it (lstat)."""
    found = {".": os.lstat(queue_path).st_mode & 0o7777}
    for folder, dirs, names in os.walk(queue_path):
        for name in dirs + names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, queue_path)] = os.lstat(path).st_mode & 0o7777
    return found


@pytest.mark.parametrize("mask", [0o000, 0o022], ids=["umask-000", "umask-022"])
def test_queue_folders_and_files_are_private(mask, smtp_server, queue_path,
                                             processors, tmp_path):
    smtp_server.greylist("later@example.org")
    smtp_server.refuse("never@example.org")
    with umask(mask):
        for rcpt in ("now@example.org", "later@example.org", "never@example.org",
                     "queued@example.org"):
            queue_message(queue_path, toaddrs=(rcpt,))
        processor = processors(queue_path, SMTPMailer(
            "127.0.0.1", smtp_server.port, timeout=5), max_messages_per_pass=3)
        stats = processor.process_queue()
        # The command creates a queue too.
        other = str(tmp_path / "other-queue")
        sent = cli("send", other, "--from", "a@example.org", "--to",
                   "b@example.org", "--subject", "x", "--body", "y")
    assert (stats.sent, stats.deferred, stats.failed) == (1, 1, 1)
    assert sent.code == EXIT_OK, sent.err
    for path in (queue_path, other):
        found = modes(path)
        assert {"tmp", "new", "cur"} <= set(found)
        for name, mode in found.items():
            is_dir = os.path.isdir(os.path.join(path, name))
            assert mode == (0o700 if is_dir else 0o600), (name, oct(mode))
    files = set(modes(queue_path))
    assert any(n.startswith("new/.retry-") for n in files), files
    assert any(n.startswith("failed/.reason-") for n in files), files


# -- symbolic links and paths -------------------------------------------------------

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextlib.contextmanager
def recording_opens():
    """Record the paths this process opens (``open`` audit events)."""
    global _OPENED
    _OPENED = opened = []
    try:
        yield opened
    finally:
        _OPENED = None


@pytest.fixture
def outside(tmp_path):
    """A valid queue file outside the queue, as a symbolic link target."""
    path = tmp_path / "outside" / "secret-message"
    path.parent.mkdir()
    path.write_bytes(format_envelope("a@example.org", ["thief@example.org"])
                     + b"Subject: private\n\nthe contents of a private file\n")
    return str(path)


def _fingerprint(path: str) -> tuple:
    info = os.stat(path)
    with open(path, "rb") as f:
        data = f.read()
    return data, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, (
        info.st_mode, info.st_nlink)


def test_symlink_in_the_queue_is_never_followed(outside, queue_path, smtp_server,
                                                processors, events):
    queue_message(queue_path)  # a real message too
    link = os.path.join(queue_path, "new", "1.M1P1Q1.link")
    os.symlink(outside, link)
    before = _fingerprint(outside)
    processor = processors(queue_path, SMTPMailer("127.0.0.1", smtp_server.port,
                                                  timeout=5))
    with recording_opens() as opened:
        stats = processor.process_queue()
        listing = cli("list", "--all", queue_path)
        shown = cli("show", queue_path, "1.M1P1Q1.link")
        retried = cli("retry", queue_path, "1.M1P1Q1.link")
        again = processor.process_queue()
    assert (stats.sent, stats.failed) == (1, 1)
    assert (again.sent, again.failed) == (0, 1)
    assert [m.rcpt_tos for m in smtp_server.messages] == [["jane@example.org"]]
    assert outside not in opened and link not in opened, opened
    assert any(p.startswith(os.path.join(queue_path, "new")) for p in opened)
    assert _fingerprint(outside) == before
    failed = os.path.join(queue_path, "failed", "1.M1P1Q1.link")
    assert os.readlink(failed) == outside
    assert "not a regular file" in events[-1].errorMessage
    assert listing.code == shown.code == retried.code == EXIT_OK
    assert "not a regular file" in shown.out
    assert "private" not in listing.out + shown.out


def test_file_replaced_by_a_symlink_after_the_scan(outside, queue_path, smtp_server,
                                                  processors, events):
    """The processor's race with a local attacker: the message is swapped
    for a link after the listing and the claim; the read does not follow it."""

    class Swapping(Maildir):
        def claim(self, entry, lease=30.0):
            claim = super().claim(entry, lease)
            os.unlink(entry.path)
            os.symlink(outside, entry.path)
            return claim

    queue_message(queue_path)
    before = _fingerprint(outside)
    processor = QueueProcessorThread(concurrency=1)
    processor.maildir_factory = Swapping
    processor.setMailer(SMTPMailer("127.0.0.1", smtp_server.port, timeout=5))
    processor.setQueuePath(queue_path)
    try:
        with recording_opens() as opened:
            stats = processor.process_queue()
    finally:
        processor.stop(timeout=10)
    assert (stats.sent, stats.failed) == (0, 1)
    assert smtp_server.messages == []
    assert outside not in opened
    assert any(p.startswith(os.path.join(queue_path, "new")) for p in opened)
    assert _fingerprint(outside) == before
    assert "unreadable queue file" in events[-1].errorMessage
    [name] = [n for n in os.listdir(os.path.join(queue_path, "failed"))
              if not n.startswith(".")]
    assert os.readlink(os.path.join(queue_path, "failed", name)) == outside


@pytest.mark.parametrize("name", ["../../outside/secret-message", "..", ".",
                                  "/etc/passwd", "new/x", ".sending-x", ""])
def test_message_ids_are_not_paths(name, outside, tmp_path, queue_path):
    queue_message(queue_path)
    os.symlink(os.path.dirname(outside), os.path.join(queue_path, "outside"))
    before = _fingerprint(outside)
    with recording_opens() as opened:
        results = [cli(command, queue_path, name)
                   for command in ("show", "retry", "purge")]
    for result in results:
        assert result.code in (EXIT_NOT_FOUND, 2), (name, result)
        assert "private" not in result.out
    assert outside not in opened
    assert _fingerprint(outside) == before
    assert len(os.listdir(os.path.join(queue_path, "new"))) == 1


def test_terminal_escapes_in_messages_are_not_printed(queue_path):
    """A message's headers and envelope may come from anyone: ``list`` and
    ``show`` escape control characters instead of writing them to the
    administrator's terminal."""
    evil = "\x1b]0;owned\x07\x1b[2J\x9b31m"
    # As another program (zope.sendmail, a script) may write a queue file:
    # send() refuses control characters in addresses.
    writer = Maildir(queue_path, create=True).newMessage()
    writer.write(f"X-Zope-From: {evil}@example.org\nX-Zope-To: \"{evil}\""
                 f" <jane@example.org>\nSubject: {evil}\n\nb".encode())
    writer.commit()
    name = writer.name
    for argv in (["list", queue_path], ["list", "--json", queue_path],
                 ["show", queue_path, name]):
        result = cli(*argv)
        assert result.code == EXIT_OK
        assert "\x1b" not in result.out + result.err
        assert "\x07" not in result.out + result.err
        assert "\x9b" not in result.out + result.err
    json.loads(cli("list", "--json", queue_path).out)
