"""Hardening of the SMTP mailer and its errors, against real peers.

Servers: aiosmtpd (:class:`mailoutbox.testing.smtpd.SMTPServer`) for normal
exchanges, and :class:`Trickler`, a scripted TCP peer in a thread, for the
hostile behaviour aiosmtpd cannot produce (replies that never end, data
read very slowly).
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
import threading
import time

import pytest

from mailoutbox import errors
from mailoutbox._smtp import Connection
from mailoutbox.errors import MailAuthenticationError
from mailoutbox.errors import MailConfigurationError
from mailoutbox.errors import MailTimeoutError
from mailoutbox.errors import MailTLSError
from mailoutbox.errors import TransientMailError
from mailoutbox.mailer import SMTPMailer
from mailoutbox.testing.smtpd import SMTPServer

SENDER = "sender@example.org"
TO = ["jane@example.org"]


def message(number: int = 1, body: bytes = b"Hello.\n") -> bytes:
    return (
        b"From: sender@example.org\n"
        b"To: jane@example.org\n"
        b"Subject: test\n"
        b"Message-Id: <m%d@example.org>\n"
        b"\n" % number
    ) + body


# -- close_connection and MailConfigurationError ------------------------------


def test_configuration_error_is_the_base_of_tls_and_auth_errors():
    assert "MailConfigurationError" in errors.__all__
    assert issubclass(MailConfigurationError, TransientMailError)
    assert issubclass(MailTLSError, MailConfigurationError)
    assert issubclass(MailAuthenticationError, MailConfigurationError)


def test_close_connection_closes_only_the_calling_threads_connection():
    with SMTPServer() as server:
        mailer = SMTPMailer(server.host, server.port, timeout=5)
        mailer.send(SENDER, TO, message(1))
        other = threading.Thread(target=mailer.send, args=(SENDER, TO, message(2)))
        other.start()
        other.join(10)
        assert server.connections == 2
        mailer.close_connection()
        assert server.commands.count("QUIT") == 1
        assert getattr(mailer._local, "connection", None) is None
        mailer.close_connection()  # no connection: nothing to do
        assert server.commands.count("QUIT") == 1
        mailer.send(SENDER, TO, message(3))  # a new connection
        assert server.connections == 3
        mailer.close()
        assert len(server.messages) == 3


# -- deadlines: servers that trickle ----------------------------------------


class Trickler:
    """An SMTP peer on 127.0.0.1 that answers normally until *stage* and
    there starts a reply it never finishes: a continuation line every
    *every* seconds, for at most *limit* seconds (so that a client without
    deadlines is not held forever), then it closes the connection.

    *stage* is ``"greeting"``, a command verb (``"EHLO"``, ``"MAIL"``,
    ``"RCPT"``, ``"DATA"``), ``"."`` (the end of the data), ``"reading"``
    (the data is read *read_size* bytes every *every* seconds, from a
    receive buffer of *buffer* bytes) or ``None`` (no fault).  With
    *tls_context*, TLS is spoken from the first byte (implicit TLS).  Each
    connection is served by its own thread; :attr:`messages` holds the
    data received.
    """

    EHLO = b"250-trickler.test\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n"

    def __init__(self, stage, every=0.2, limit=15.0, read_size=1024,
                 buffer=4096, tls_context=None):
        self.stage = stage
        self.every = every
        self.limit = limit
        self.read_size = read_size
        self.tls_context = tls_context
        self.messages: list[bytes] = []
        self.verbs: list[str] = []
        self.host = "127.0.0.1"
        self._stop = threading.Event()
        self._listener = socket.socket()
        if stage == "reading":
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        self._listener.bind((self.host, 0))
        self._listener.listen()
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]

    def __enter__(self):
        self._threads[0].start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        for thread in list(self._threads):
            thread.join(self.limit + 5)
        self._listener.close()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _address = self._listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn):
        with contextlib.suppress(OSError, ssl.SSLError):
            if self.tls_context is not None:
                conn.settimeout(5)
                conn = self.tls_context.wrap_socket(conn, server_side=True)
            with conn:
                conn.settimeout(self.limit)
                self._session(conn, conn.makefile("rb"))

    def _trickle(self, conn, line):
        end = time.monotonic() + self.limit
        while time.monotonic() < end and not self._stop.wait(self.every):
            conn.sendall(line)

    def _answer(self, conn, stage, reply):
        if stage == self.stage:
            self._trickle(conn, reply[:3] + b"-still thinking\r\n")
            return False
        conn.sendall(reply)
        return True

    def _session(self, conn, lines):
        if not self._answer(conn, "greeting", b"220 trickler.test ESMTP\r\n"):
            return
        while line := lines.readline():
            verb = line.split()[0].decode().upper() if line.split() else ""
            self.verbs.append(verb)
            if verb == "QUIT":
                conn.sendall(b"221 Bye\r\n")
                return
            reply = {"EHLO": self.EHLO, "DATA": b"354 Go ahead\r\n"}.get(
                verb, b"250 OK\r\n"
            )
            if not self._answer(conn, verb, reply):
                return
            if verb == "DATA" and not self._data(conn, lines):
                return

    def _data(self, conn, lines):
        data = []
        end = time.monotonic() + self.limit
        while time.monotonic() < end and not self._stop.is_set():
            if self.stage == "reading":
                time.sleep(self.every)
                data.append(lines.read1(self.read_size))
                if not data[-1]:
                    return False
                if not b"".join(data[-2:]).endswith(b"\r\n.\r\n"):
                    continue
            else:
                data.append(lines.readline())
                if data[-1] != b".\r\n":
                    if not data[-1]:
                        return False
                    continue
            self.messages.append(b"".join(data))
            return self._answer(conn, ".", b"250 2.0.0 Queued\r\n")
        return False


def _sends_until_timeout(mailer, message_bytes=None):
    started = time.monotonic()
    with pytest.raises(MailTimeoutError) as info:
        mailer.send(SENDER, TO, message_bytes or message())
    return time.monotonic() - started, info.value


@pytest.mark.parametrize("stage", ["greeting", "EHLO", "MAIL", "RCPT", "DATA", "."])
def test_a_reply_trickled_forever_times_out(stage):
    with Trickler(stage) as server:
        mailer = SMTPMailer(server.host, server.port, timeout=1)
        elapsed, error = _sends_until_timeout(mailer)
        assert elapsed < 8, elapsed  # the timeout was 1 s: not held
        assert f"{server.host}:{server.port}" in str(error)
        assert error.permanent is False
        mailer.close()


def test_data_is_given_a_deadline_proportional_to_its_size():
    from mailoutbox._smtp import DATA_BYTES_PER_TIMEOUT

    class Probe(Connection):
        def __init__(self, seconds):  # no connection: only the arithmetic
            self.seconds = seconds

    assert Probe(10).data_seconds(1000) == 10  # the floor: the timeout
    assert Probe(10).data_seconds(DATA_BYTES_PER_TIMEOUT * 8) == 80
    assert Probe(None).data_seconds(10**9) is None
    assert DATA_BYTES_PER_TIMEOUT == 256 * 1024  # as the docs say


class SmallBuffers(Connection):
    """A session whose socket buffers little, so that a slow reader
    holds up the sending."""

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return sock


def test_a_server_reading_the_data_very_slowly_times_out_over_tls(certificates):
    # An SSL socket's sendall() waits up to the timeout for each write: a
    # server reading a little now and then held the sender indefinitely.
    body = b"x" * 76 + b"\n"
    big = message(body=body * 3000)  # about 230 KB: the deadline is the timeout
    with Trickler(
        "reading", every=0.1, tls_context=certificates.server_context()
    ) as server:
        mailer = SMTPMailer(
            server.host, server.port, timeout=1, implicit_tls=True,
            ca_file=certificates.ca_file,
        )
        mailer.connection_class = SmallBuffers
        elapsed, error = _sends_until_timeout(mailer, big)
        assert "write operation timed out" in str(error)
        assert elapsed < 8, elapsed
        assert server.messages == []
        mailer.close()


def test_a_session_checks_its_deadline_and_its_socket():
    import smtplib

    from mailoutbox._smtp import _remaining

    with pytest.raises(TimeoutError, match="the reply did not complete in time"):
        _remaining(time.monotonic() - 0.001, "the reply")
    assert _remaining(None, "the reply") is None
    with SMTPServer() as server:
        session = Connection(server.host, server.port, local_hostname="x", timeout=5)
        session.quit()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            session.getreply()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            session.send_within(b"NOOP\r\n", 5)


@pytest.mark.slow
def test_a_big_message_gets_more_time_than_the_timeout():
    # 4 MiB read at about 2 MB/s: longer than the timeout of 0.5 s (which
    # was the limit for all of the data), well within the 8 s it now gets.
    body = b"y" * 1023 + b"\n"
    big = message(body=body * 4096)
    with Trickler(
        "reading", every=0.03, read_size=64 * 1024, buffer=64 * 1024
    ) as server:
        mailer = SMTPMailer(server.host, server.port, timeout=0.5)
        assert mailer.send(SENDER, TO, big) == {}
        assert len(server.messages) == 1
        mailer.close()


@pytest.mark.slow
def test_a_processor_pass_against_a_trickling_server_defers_and_stops(tmp_path):
    from mailoutbox.maildir import Maildir
    from mailoutbox.queue import QueueProcessorThread
    from mailoutbox.retry import RetryPolicy

    from ._crash_helpers import claims
    from ._crash_helpers import queue_messages

    path = str(tmp_path / "queue")
    queue_messages(path, 1)
    maildir = Maildir(path)
    with Trickler("greeting", limit=60) as server:
        processor = QueueProcessorThread(
            interval=60, concurrency=1, retry=RetryPolicy(initial=600)
        )
        processor.setMailer(SMTPMailer(server.host, server.port, timeout=2))
        processor.setQueuePath(path)
        started = time.monotonic()
        processor.start()
        try:
            state = None
            while state is None and time.monotonic() - started < 20:
                time.sleep(0.1)
                (entry,) = maildir.scan().entries
                state = maildir.retry_state(entry)
            assert state is not None, "not deferred within 10 times the timeout"
            assert state["attempts"] == 1
            assert "timed out" in state["error"]
            assert f"{server.host}:{server.port}" in state["error"]
        finally:
            processor.stop(timeout=10)
        assert not processor.is_alive()
        assert claims(path) == []


# -- configuration refusals -------------------------------------------------


def test_starttls_required_by_the_server_is_a_configuration_error(certificates):
    with SMTPServer(
        tls_context=certificates.server_context(), require_starttls=True
    ) as server:
        mailer = SMTPMailer(server.host, server.port, no_tls=True, timeout=5)
        with pytest.raises(MailTLSError) as info:
            mailer.send(SENDER, TO, message())
        error = info.value
        assert error.permanent is False
        assert error.code == 530
        assert str(error).startswith(
            f"{server.host}:{server.port} requires TLS; check the TLS settings"
        )
        assert server.messages == []
        mailer.close()


@pytest.mark.parametrize(
    ("command", "reply", "kind", "words"),
    [
        ("MAIL", "530 5.7.0 Authentication required", MailAuthenticationError,
         "requires authentication"),
        ("RCPT", "530 5.7.0 Authentication required", MailAuthenticationError,
         "requires authentication"),
        ("MAIL", "535 5.7.8 Authentication credentials invalid",
         MailAuthenticationError, "authentication failed at"),
        ("MAIL", "534 5.7.9 Authentication mechanism is too weak",
         MailAuthenticationError, "too weak"),
        ("MAIL", "550 5.7.57 Client not authenticated to send mail",
         MailAuthenticationError, "requires authentication"),
        ("RCPT", "530 5.7.0 Must issue a STARTTLS command first", MailTLSError,
         "requires TLS"),
        ("MAIL", "538 5.7.11 Encryption required for requested authentication"
         " mechanism", MailTLSError, "requires TLS"),
        ("DATA", "530 5.7.0 Must issue a STARTTLS command first", MailTLSError,
         "requires TLS"),
    ],
)
def test_configuration_refusals_are_transient_and_name_the_server(
    smtp_server, command, reply, kind, words
):
    smtp_server.reply(command, reply)
    mailer = SMTPMailer(smtp_server.host, smtp_server.port, timeout=5)
    with pytest.raises(MailConfigurationError) as info:
        mailer.send(SENDER, TO, message())
    error = info.value
    assert isinstance(error, kind)
    assert error.permanent is False
    assert error.code == int(reply[:3])
    assert f"{smtp_server.host}:{smtp_server.port}" in str(error)
    assert words in str(error)
    assert reply in str(error)
    mailer.close()


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        ("RCPT", "550 5.7.1 relaying denied"),
        ("MAIL", "554 5.7.1 Relay access denied"),
        ("DATA", "550 5.7.1 Message rejected as spam"),
        ("RCPT", "553 5.7.0 Sender address rejected"),
    ],
)
def test_policy_refusals_stay_permanent(smtp_server, command, reply):
    smtp_server.reply(command, reply)
    mailer = SMTPMailer(smtp_server.host, smtp_server.port, timeout=5)
    with pytest.raises(errors.MailError) as info:
        mailer.send(SENDER, TO, message())
    assert not isinstance(info.value, MailConfigurationError)
    assert info.value.permanent is True
    mailer.close()


def test_a_processor_keeps_messages_a_relay_refuses_without_tls(
    certificates, tmp_path
):
    from mailoutbox.maildir import Maildir
    from mailoutbox.queue import QueueProcessorThread

    from ._crash_helpers import queue_messages

    path = str(tmp_path / "queue")
    queue_messages(path, 1)
    with SMTPServer(
        tls_context=certificates.server_context(), require_starttls=True
    ) as server:
        processor = QueueProcessorThread(concurrency=1)
        processor.setMailer(SMTPMailer(server.host, server.port, no_tls=True))
        processor.setQueuePath(path)
        stats = processor.process_queue()
        processor.stop(timeout=10)
    assert (stats.sent, stats.deferred, stats.failed) == (0, 1, 0)
    maildir = Maildir(path)
    (entry,) = maildir.scan().entries
    assert "requires TLS" in maildir.retry_state(entry)["error"]


# -- one mailer shared by threads ---------------------------------------------


def test_close_while_threads_send_loses_and_corrupts_nothing():
    senders, each = 4, 12
    with SMTPServer(pipelining=True) as server:
        mailer = SMTPMailer(server.host, server.port, timeout=10)
        failures: list[BaseException] = []
        done = threading.Event()

        def send_some(first):
            try:
                for number in range(first, first + each):
                    mailer.send(SENDER, TO, message(number, b"Body %d.\n" % number))
            except BaseException as exc:
                failures.append(exc)

        def close_often():
            while not done.is_set():
                mailer.close()
                time.sleep(0.001)

        closer = threading.Thread(target=close_often)
        threads = [
            threading.Thread(target=send_some, args=(i * each,))
            for i in range(senders)
        ]
        closer.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        done.set()
        closer.join(10)
        mailer.close()
        assert failures == []
        received = {}
        for got in server.messages:
            number = int(got.message_id[1:].split("@")[0])
            assert number not in received, f"message {number} arrived twice"
            received[number] = got.data
        assert sorted(received) == list(range(senders * each))
        for number, data in received.items():
            assert b"quit" not in data.lower()
            expected = message(number, b"Body %d.\n" % number)
            assert data.replace(b"\r\n", b"\n") == expected


def test_close_during_a_transaction_lets_its_thread_finish_then_quit():
    with SMTPServer() as server:
        server.slow(0.5)  # before answering MAIL and the end of the data
        mailer = SMTPMailer(server.host, server.port, timeout=10)
        results = []
        sender = threading.Thread(
            target=lambda: results.append(mailer.send(SENDER, TO, message()))
        )
        sender.start()
        for _ in range(500):
            if "MAIL" in server.commands:
                break
            time.sleep(0.01)
        mailer.close()  # the connection is busy: marked, not touched
        assert "QUIT" not in server.commands
        sender.join(10)
        assert results == [{}]
        assert len(server.messages) == 1
        assert server.commands[-1] == "QUIT"  # said by the sender, when done
        assert mailer._pool.owners == {}
        server.slow(0)
        mailer.send(SENDER, TO, message(2))  # a new connection
        assert server.connections == 2
        mailer.close()


def test_a_connection_closed_by_another_thread_is_replaced():
    with SMTPServer() as server:
        mailer = SMTPMailer(server.host, server.port, timeout=10)
        mailer.vote(SENDER, TO, message())
        closer = threading.Thread(target=mailer.close)
        closer.start()
        closer.join(10)
        assert server.commands.count("QUIT") == 1
        mailer.send(SENDER, TO, message())
        assert server.connections == 2
        mailer.abort()  # QUITs the new connection
        assert server.commands.count("QUIT") == 2
        mailer.abort()  # nothing left
        assert len(server.messages) == 1


# -- a mailer dropped without close() ------------------------------------------


def test_a_dropped_mailer_says_quit_and_leaves_no_socket_open():
    import gc
    import warnings
    import weakref

    with SMTPServer() as server:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mailer = SMTPMailer(server.host, server.port, timeout=10)
            mailer.send(SENDER, TO, message())
            alive = weakref.ref(mailer)
            del mailer
            gc.collect()
        assert alive() is None  # the finalizer does not keep it alive
        assert server.commands[-1] == "QUIT"
        resource = [w for w in caught if issubclass(w.category, ResourceWarning)]
        assert resource == []


def test_connections_left_open_get_quit_at_interpreter_exit():
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from mailoutbox.mailer import SMTPMailer\n"
        "mailer = SMTPMailer('127.0.0.1', int(sys.argv[1]), timeout=10)\n"
        "mailer.send('s@example.org', ['r@example.org'], b'Subject: x\\n\\nx\\n')\n"
        "sys.modules['__main__'].keep = mailer  # alive until the very end\n"
    )
    with SMTPServer() as server:
        process = subprocess.run(
            [sys.executable, "-W", "error::ResourceWarning", "-c", script,
             str(server.port)],
            capture_output=True, timeout=60, check=False,
            env={**__import__("os").environ, "PYTHONPATH": _src_path()},
        )
        assert process.returncode == 0, process.stderr
        assert b"ResourceWarning" not in process.stderr
        assert len(server.messages) == 1
        for _ in range(100):
            if "QUIT" in server.commands:
                break
            time.sleep(0.05)
        assert server.commands[-1] == "QUIT"


def _src_path():
    import os

    import mailoutbox

    return os.path.dirname(os.path.dirname(os.path.abspath(mailoutbox.__file__)))


# -- errors name the server --------------------------------------------------


def test_a_refused_connection_names_the_server():
    from .smtpsink import free_port

    port = free_port()
    mailer = SMTPMailer("127.0.0.1", port, timeout=5)
    with pytest.raises(errors.MailConnectionRefusedError) as info:
        mailer.send(SENDER, TO, message())
    assert str(info.value) == f"connection refused by 127.0.0.1:{port}"
    assert isinstance(info.value, ConnectionRefusedError)  # as zope.sendmail's
    assert isinstance(info.value, errors.MailConnectionError)
    assert info.value.permanent is False
    with pytest.raises(ConnectionRefusedError):
        mailer.vote(SENDER, TO, message())


def test_implicit_tls_against_a_plain_server_hints_at_the_setting(smtp_server):
    mailer = SMTPMailer(
        smtp_server.host, smtp_server.port, implicit_tls=True, timeout=5
    )
    with pytest.raises(MailTLSError) as info:
        mailer.send(SENDER, TO, message())
    text = str(info.value)
    assert text.startswith(
        f"TLS handshake with {smtp_server.host}:{smtp_server.port} failed"
    )
    assert "implicit_tls" in text
    assert smtp_server.messages == []


def test_an_unverified_certificate_names_the_server(certificates):
    with SMTPServer(
        tls_context=certificates.server_context(), implicit_tls=True
    ) as server:
        mailer = SMTPMailer(server.host, server.port, implicit_tls=True, timeout=5)
        with pytest.raises(MailTLSError) as info:
            mailer.send(SENDER, TO, message())
        assert str(info.value).startswith(
            f"the TLS certificate of {server.host}:{server.port} could not be"
            " verified"
        )
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)


def test_other_failures_name_the_server():
    import smtplib

    server = "relay.example.org:587"
    cases = {
        OSError(113, "No route to host"):
            "connection to relay.example.org:587 failed: [Errno 113] No route to host",
        TimeoutError("timed out"): "timed out waiting for relay.example.org:587",
        ssl.SSLError(1, "bad record"): "TLS failure with relay.example.org:587",
        smtplib.SMTPServerDisconnected("gone"):
            "connection closed by relay.example.org:587: gone",
        smtplib.SMTPConnectError(554, b"no service"):
            "connection refused by relay.example.org:587: 554 no service",
    }
    for exc, text in cases.items():
        error = errors.classify(exc, server)
        assert str(error).startswith(text), (exc, str(error))
        assert error.permanent is False


# -- zope.sendmail compatibility of errors -------------------------------------


def test_tls_not_available_is_a_runtime_error(smtp_server):
    mailer = SMTPMailer(smtp_server.host, smtp_server.port, force_tls=True)
    with pytest.raises(RuntimeError) as info:
        mailer.send(SENDER, TO, message())
    assert isinstance(info.value, errors.MailTLSUnavailableError)
    assert isinstance(info.value, MailTLSError)
    assert info.value.permanent is False


def test_username_without_auth_is_a_runtime_error(smtp_server):
    mailer = SMTPMailer(
        smtp_server.host, smtp_server.port, username="alice", password="pw"
    )
    with pytest.raises(RuntimeError) as info:
        mailer.send(SENDER, TO, message())
    assert isinstance(info.value, errors.MailAuthenticationUnavailableError)
    assert isinstance(info.value, MailAuthenticationError)
    assert "pw" not in str(info.value)


def test_helo_refused_is_a_runtime_error(smtp_server):
    smtp_server.reply("EHLO", "502 5.5.2 Not here")
    smtp_server.reply("HELO", "502 5.5.2 Not here either")
    mailer = SMTPMailer(smtp_server.host, smtp_server.port)
    with pytest.raises(RuntimeError) as info:
        mailer.send(SENDER, TO, message())
    error = info.value
    assert isinstance(error, errors.MailHeloError)
    assert isinstance(error, errors.MailConnectionError)
    assert error.permanent is False and error.code == 502
    assert str(error).startswith(
        f"HELO/EHLO refused by {smtp_server.host}:{smtp_server.port}: 502"
    )


def test_refused_recipients_are_smtplibs_too(smtp_server):
    import smtplib

    smtp_server.refuse("jane@example.org", "550 5.1.1 No such user")
    smtp_server.refuse("joe@example.org", "450 4.2.0 Mailbox busy")
    mailer = SMTPMailer(smtp_server.host, smtp_server.port)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        mailer.send(SENDER, ["jane@example.org", "joe@example.org"], message())
    error = info.value
    assert isinstance(error, errors.RecipientsRefused)
    assert error.recipients == {
        "jane@example.org": (550, b"5.1.1 No such user"),
        "joe@example.org": (450, b"4.2.0 Mailbox busy"),
    }
    assert error.refused == {
        "jane@example.org": (550, "5.1.1 No such user"),
        "joe@example.org": (450, "4.2.0 Mailbox busy"),
    }
    assert error.permanent is False  # one refusal was temporary
    assert str(error).startswith("all recipients refused (")
    mailer.close()


def test_a_subclass_setting_zope_sendmails_smtp_factory_is_refused():
    import smtplib

    with pytest.raises(TypeError, match="connection_class"):

        class Legacy(SMTPMailer):
            smtp = smtplib.SMTP

    mailer = SMTPMailer()
    with pytest.raises(TypeError, match="connection_class"):
        mailer.smtp = smtplib.SMTP  # as zope.sendmail's tests do
    # Read, it says which protocol the connections speak (MailHost checks).
    assert mailer.smtp is smtplib.SMTP
    assert SMTPMailer(implicit_tls=True).smtp is smtplib.SMTP_SSL

    class Modern(SMTPMailer):  # connection_class is the seam
        connection_class = SmallBuffers

    assert Modern().connection_class is SmallBuffers


# -- numbers checked at construction -------------------------------------------


@pytest.mark.parametrize("port", [70000, 0, -25, "abc", 25.5, True, None, ""])
def test_a_bad_port_is_refused_at_construction(port):
    with pytest.raises(ValueError, match="port must be a whole number from 1 to"):
        SMTPMailer("localhost", port)


@pytest.mark.parametrize(
    "timeout", [-1, 0, 0.0, math.nan, math.inf, "10", True]
)
def test_a_bad_timeout_is_refused_at_construction(timeout):
    with pytest.raises(ValueError, match="timeout must be a positive, finite"):
        SMTPMailer("localhost", 25, timeout=timeout)


def test_good_numbers_are_kept():
    mailer = SMTPMailer("localhost", "2525", timeout=3)
    assert (mailer.port, mailer.timeout) == (2525, 3.0)
    assert SMTPMailer(timeout=None).timeout is None
    assert SMTPMailer(port=65535).port == 65535
