"""SMTP servers that fail at every stage of a session: nothing is lost.

Every case queues one message, makes a pass with the real processor and
the real SMTPMailer against a real server that misbehaves, checks the
outcome (deferred with its retry state, or failed with the reply that made
it permanent), then lets the server recover and checks that the message is
delivered by the next pass.  The servers:

- :class:`ScriptedServer` below, a small SMTP server on a socket that can
  answer any stage (greeting, EHLO/HELO, STARTTLS, AUTH, MAIL, RCPT, DATA,
  end of data) with a given reply, drop the connection, drop it in the
  middle of the data or right after it, or never answer (the mailer's
  timeout ends the wait);
- the in-process aiosmtpd server (its ``reply()``, ``refuse()``,
  ``greylist()``, ``drop_connections()`` and a wrong password);
- Postfix's smtp-sink (``-r`` 4xx, ``-f`` 5xx, ``-Q`` 421 and disconnect,
  ``-q`` disconnect) at every command.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread
from mailoutbox.retry import RetryPolicy

from ._crash_helpers import claims
from ._crash_helpers import is_complete
from ._crash_helpers import queue_messages
from ._crash_helpers import queued

TIMEOUT = 0.5  # the mailer's: how long a silent server is waited for
MESSAGE_ID = "m-0@mailoutbox.test"


class ScriptedServer:
    """An SMTP server on 127.0.0.1 in a thread, speaking just the SMTP the
    mailer needs, that misbehaves at one *stage* of every session.

    *action* is a reply (``"451 4.3.0 Try later"``; after a 421 reply the
    server closes the connection), ``"drop"`` (close without answering),
    ``"hang"`` (never answer), and at the ``"eod"`` stage also
    ``"drop-mid-data"`` (close after the first line of the data) and
    ``"drop-after-data"`` (keep the message, close without answering).
    STARTTLS is offered only while it is the stage that fails; AUTH PLAIN
    is always offered.  :meth:`heal` makes the server behave.
    """

    STAGES = ("greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "eod")

    def __init__(self, stage: str | None = None, action: str | None = None) -> None:
        assert stage is None or stage in self.STAGES
        self.fault = (stage, action)
        self.messages: list[bytes] = []
        self.sessions = 0
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._connections: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._accepter.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._accepter.join(5)
        for conn in self._connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def heal(self) -> None:
        self.fault = (None, None)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _addr = self._listener.accept()
            except TimeoutError:
                continue
            self.sessions += 1
            self._connections.append(conn)
            thread = threading.Thread(target=self._session, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn, contextlib.suppress(OSError):
            self._converse(conn, conn.makefile("rb"))

    def _answer(self, conn: socket.socket, stage: str, normal: str) -> bool:
        """Answer at *stage*; False when the session is over."""
        fault_stage, action = self.fault
        if fault_stage != stage:
            action = normal
        if action == "hang":
            self._stopping.wait(30)
            return False
        if action == "drop":
            return False
        conn.sendall(action.encode() + b"\r\n")
        return not action.startswith("421")

    def _converse(self, conn: socket.socket, lines) -> None:
        if not self._answer(conn, "greeting", "220 scripted ESMTP"):
            return
        while not self._stopping.is_set():
            line = lines.readline()
            if not line:
                return
            verb = line.split(b" ", 1)[0].strip().upper().decode("ascii", "replace")
            if verb == "EHLO":
                features = ["250-scripted", "250-AUTH PLAIN", "250 8BITMIME"]
                if self.fault[0] == "starttls":
                    features.insert(1, "250-STARTTLS")
                ok = self._answer(conn, "ehlo", "\r\n".join(features))
            elif verb == "HELO":
                ok = self._answer(conn, "ehlo", "250 scripted")
            elif verb == "STARTTLS":
                ok = self._answer(conn, "starttls", "220 go ahead")
            elif verb == "AUTH":
                ok = self._answer(conn, "auth", "235 2.7.0 Authenticated")
            elif verb == "MAIL":
                ok = self._answer(conn, "mail", "250 2.1.0 OK")
            elif verb == "RCPT":
                ok = self._answer(conn, "rcpt", "250 2.1.5 OK")
            elif verb == "DATA":
                ok = self._answer(conn, "data", "354 go ahead") and self._data(
                    conn, lines)
            elif verb == "QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:  # RSET, NOOP
                ok = self._answer(conn, "other", "250 OK")
            if not ok:
                return

    def _data(self, conn: socket.socket, lines) -> bool:
        fault_stage, action = self.fault
        if fault_stage == "data":
            return True  # DATA was refused: no data follows
        data = []
        while (line := lines.readline()) not in (b".\r\n", b""):
            data.append(line)
            if fault_stage == "eod" and action == "drop-mid-data":
                return False
        if not line:
            return False
        message = b"".join(data)
        if fault_stage == "eod" and action == "drop-after-data":
            self.messages.append(message)  # the server has it, the client
            return False  # does not know
        accepted = fault_stage != "eod" or action.startswith("2")
        if accepted:
            self.messages.append(message)
        return self._answer(conn, "eod", "250 2.0.0 queued")


@pytest.fixture
def processor(queue_path):
    made = []

    def make(port, **options):
        options.setdefault("no_tls", True)
        processor = QueueProcessorThread(concurrency=1, retry=RetryPolicy(initial=0))
        processor.setMailer(SMTPMailer("127.0.0.1", port, timeout=TIMEOUT, **options))
        processor.setQueuePath(queue_path)
        made.append(processor)
        return processor

    yield make
    for processor in made:
        processor.stop(timeout=10)


def deferred_state(queue_path):
    """The retry state of the one queued message (None if not deferred)."""
    maildir = Maildir(queue_path)
    (entry,) = maildir.scan().entries
    return maildir.retry_state(entry)


def failed_reason(queue_path):
    maildir = Maildir(queue_path)
    (entry,) = maildir.failed_entries()
    return maildir.reason(entry)


def assert_deferred(stats, queue_path, code=None):
    assert (stats.sent, stats.deferred, stats.failed) == (0, 1, 0), stats
    state = deferred_state(queue_path)
    assert state is not None and state["attempts"] == 1
    assert state["code"] == code, state
    assert state["error"]
    assert claims(queue_path) == []
    return state


def assert_failed(stats, queue_path, code, text):
    assert (stats.sent, stats.deferred, stats.failed) == (0, 0, 1), stats
    reason = failed_reason(queue_path)
    assert reason["permanent"] is True and reason["code"] == code, reason
    # The reply's text is in the error, or with the refused recipients.
    assert text in reason["error"] + str(reason["refused"]), reason
    assert reason["message_id"] == MESSAGE_ID
    assert queued(queue_path) == [] and claims(queue_path) == []
    return reason


# Which stages fail a message for good on a 5xx reply: those about the
# message.  A refused greeting, EHLO, STARTTLS or AUTH says nothing about the
# message (the relay or its configuration is at fault): retried.
PERMANENT_STAGES = {"mail", "rcpt", "data", "eod"}
REPLIES = {"4xx": "451 4.3.0 Try again later", "5xx": "554 5.7.1 Not today",
           "421": "421 4.3.2 Shutting down"}


@pytest.mark.parametrize("kind", sorted(REPLIES))
@pytest.mark.parametrize("stage", ScriptedServer.STAGES)
def test_reply_at_every_stage(stage, kind, processor, queue_path):
    reply = REPLIES[kind]
    code = int(reply[:3])
    queue_messages(queue_path, 1)
    with ScriptedServer(stage, reply) as server:
        make = processor(server.port, no_tls=False, username="u", password="p")
        stats = make.process_queue()
        if kind == "5xx" and stage in PERMANENT_STAGES:
            assert_failed(stats, queue_path, code, "Not today")
            assert server.messages == []
            return
        # After "421 at EHLO" the mailer tries HELO on the closed connection.
        expected = None if (stage, kind) == ("ehlo", "421") else code
        assert_deferred(stats, queue_path, expected)
        assert server.messages == []
        # The server recovers: the next pass delivers the message, once.
        server.heal()
        stats = make.process_queue()
        assert stats.sent == 1, stats
        assert len(server.messages) == 1 and is_complete(server.messages[0])
        assert queued(queue_path) == [] and claims(queue_path) == []


@pytest.mark.parametrize("stage", ScriptedServer.STAGES)
@pytest.mark.parametrize("action", ["drop", "hang"])
def test_dropped_or_silent_at_every_stage(stage, action, processor, queue_path):
    queue_messages(queue_path, 1)
    with ScriptedServer(stage, action) as server:
        make = processor(server.port, no_tls=False, username="u", password="p")
        started = time.monotonic()
        stats = make.process_queue()
        if action == "hang":  # the timeout, not the server, ended the wait
            assert TIMEOUT <= time.monotonic() - started < 5 * TIMEOUT
        state = assert_deferred(stats, queue_path)
        assert ("timed out" if action == "hang" else "closed") in state["error"]
        assert server.messages == []
        server.heal()
        assert make.process_queue().sent == 1
        assert len(server.messages) == 1
        assert queued(queue_path) == []


def test_connection_dropped_in_the_middle_of_the_data(processor, queue_path):
    queue_messages(queue_path, 1, size=100_000)
    with ScriptedServer("eod", "drop-mid-data") as server:
        make = processor(server.port)
        assert_deferred(make.process_queue(), queue_path)
        assert server.messages == []
        server.heal()
        assert make.process_queue().sent == 1
        assert len(server.messages) == 1 and is_complete(server.messages[0])


def test_connection_dropped_after_the_data_sends_twice(processor, queue_path):
    """The one window where at-least-once shows: the server kept the
    message but its 250 never arrived, so the message is sent again."""
    queue_messages(queue_path, 1)
    with ScriptedServer("eod", "drop-after-data") as server:
        make = processor(server.port)
        assert_deferred(make.process_queue(), queue_path)
        assert len(server.messages) == 1
        server.heal()
        assert make.process_queue().sent == 1
        assert len(server.messages) == 2
        assert server.messages[0] == server.messages[1]


# -- the aiosmtpd server ------------------------------------------------------------


@pytest.mark.parametrize(("command", "reply", "permanent"), [
    ("MAIL", "451 4.3.0 Try later", False),
    ("MAIL", "550 5.1.0 Sender rejected", True),
    ("RCPT", "450 4.2.0 Mailbox busy", False),
    ("RCPT", "550 5.1.1 No such user", True),
    ("DATA", "452 4.3.1 Out of memory", False),
    ("DATA", "554 5.6.0 Message refused", True),
    ("MAIL", "421 4.3.2 Closing", False),
])
def test_aiosmtpd_replies(command, reply, permanent, processor, queue_path,
                          smtp_server):
    queue_messages(queue_path, 1)
    make = processor(smtp_server.port)
    smtp_server.reply(command, reply)
    stats = make.process_queue()
    code = int(reply[:3])
    if permanent:
        assert_failed(stats, queue_path, code, reply[4:])
    else:
        assert_deferred(stats, queue_path, code)
        smtp_server.reply(command, None)
        assert make.process_queue().sent == 1
    assert smtp_server.message_ids() == ([] if permanent else [MESSAGE_ID])


def test_ehlo_and_helo_refused_then_accepted(processor, queue_path, smtp_server):
    queue_messages(queue_path, 1)
    make = processor(smtp_server.port)
    smtp_server.reply("EHLO", "554 5.7.1 Go away")
    smtp_server.reply("HELO", "554 5.7.1 Go away")
    assert_deferred(make.process_queue(), queue_path, 554)
    smtp_server.reply("HELO", None)  # HELO will do
    assert make.process_queue().sent == 1
    assert smtp_server.message_ids() == [MESSAGE_ID]


def test_greylisting_defers_then_delivers(processor, queue_path, smtp_server):
    queue_messages(queue_path, 1)
    make = processor(smtp_server.port)
    smtp_server.greylist("rcpt@example.org", times=2)
    assert_deferred(make.process_queue(), queue_path, 451)
    stats = make.process_queue()
    assert stats.deferred == 1 and deferred_state(queue_path)["attempts"] == 2
    assert make.process_queue().sent == 1
    assert smtp_server.message_ids() == [MESSAGE_ID]


def test_wrong_password_defers_until_fixed(processor, queue_path, tls_server,
                                           certificates):
    queue_messages(queue_path, 1)
    make = processor(tls_server.port, no_tls=False, username="alice",
                     password="s3cret-pw", ca_file=certificates.ca_file)
    tls_server.users["alice"] = "changed"
    state = assert_deferred(make.process_queue(), queue_path, 535)
    assert "s3cret-pw" not in str(state)
    tls_server.users["alice"] = "s3cret-pw"
    assert make.process_queue().sent == 1
    assert tls_server.message_ids() == [MESSAGE_ID]
    assert tls_server.messages[0].tls and tls_server.messages[0].login == "alice"


def test_connections_dropped_between_messages(processor, queue_path, smtp_server):
    ids = queue_messages(queue_path, 3)
    make = processor(smtp_server.port)
    make.max_messages_per_pass = 1
    for i, reply in enumerate([None, "421 4.4.2 Idle timeout", None]):
        assert make.process_queue().sent == 1
        if i < 2:
            smtp_server.drop_connections(reply)  # the mailer reconnects
    assert smtp_server.message_ids() == ids
    assert smtp_server.connections == 3


# -- Postfix's smtp-sink --------------------------------------------------------------


SINK_COMMANDS = ["CONNECT", "EHLO,HELO", "MAIL", "RCPT", "DATA", "."]


@pytest.mark.parametrize("option", ["-r", "-f", "-Q", "-q"])
@pytest.mark.parametrize("command", SINK_COMMANDS)
@pytest.mark.smtpsink
def test_smtp_sink_faults(command, option, processor, queue_path, smtp_sink,
                          smtp_server):
    queue_messages(queue_path, 1)
    sink = smtp_sink(option, command)
    make = processor(sink.port)
    stats = make.process_queue()
    permanent = option == "-f" and command not in ("CONNECT", "EHLO,HELO")
    if permanent:
        assert_failed(stats, queue_path, 500, "5.3.0 Error: command failed")
    else:
        code = deferred_state(queue_path)["code"]
        if option == "-r":
            assert 400 <= code < 500
        elif option == "-f":  # at the greeting or EHLO/HELO: not permanent
            assert 500 <= code < 600
        elif option == "-Q":  # (after 421 to EHLO, HELO finds it closed)
            assert code == (None if command == "EHLO,HELO" else 421)
        else:
            assert code is None  # closed without a reply
        assert_deferred(stats, queue_path, code)
        # The relay recovers (here: the mailer is pointed at a healthy one).
        make.setMailer(SMTPMailer("127.0.0.1", smtp_server.port, no_tls=True,
                                  timeout=TIMEOUT))
        assert make.process_queue().sent == 1
        assert smtp_server.message_ids() == [MESSAGE_ID]
    # smtp-sink counts the messages whose data it read, whatever it replied.
    assert sink.counters()["mesg"] == (1 if command == "." else 0)

