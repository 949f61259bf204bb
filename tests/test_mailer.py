"""Tests of mailoutbox.mailer against real peers.

- aiosmtpd, through :class:`mailoutbox.testing.smtpd.SMTPServer` (STARTTLS
  with generated certificates, AUTH, per-recipient refusals, greylisting,
  replies per command, dropped connections), with and without PIPELINING;
- Postfix's ``smtp-sink`` (:mod:`tests.smtpsink`) for 421-and-close,
  connections dropped at a given command and 4xx/5xx per command;
- :class:`ScriptedServer`, a TCP peer following a script, for the few
  exchanges neither produces (DATA accepted after every RCPT was refused,
  STARTTLS refused or answered with garbage, unknown AUTH mechanisms);
- a fake sendmail program written by the tests, run as a real subprocess.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
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
from hypothesis import given
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from mailoutbox import mailer as mailer_module
from mailoutbox._smtp import encode_data
from mailoutbox._smtp import envelope_address
from mailoutbox.errors import MailAuthenticationError
from mailoutbox.errors import MailConnectionError
from mailoutbox.errors import MailError
from mailoutbox.errors import MailHeloError
from mailoutbox.errors import MailTimeoutError
from mailoutbox.errors import MailTLSError
from mailoutbox.errors import PermanentDataRefusedError
from mailoutbox.errors import PermanentMailError
from mailoutbox.errors import PermanentSenderRefusedError
from mailoutbox.errors import RecipientsRefused
from mailoutbox.errors import TransientDataRefusedError
from mailoutbox.errors import TransientMailError
from mailoutbox.errors import TransientSenderRefusedError
from mailoutbox.interfaces import IMailer
from mailoutbox.interfaces import ISendmailMailer
from mailoutbox.interfaces import ISMTPMailer
from mailoutbox.mailer import SendmailMailer
from mailoutbox.mailer import SMTPMailer
from mailoutbox.testing.smtpd import SMTPServer

from .smtpsink import free_port

PASSWORD = "s3cret-pw"
SENDER = "sender@example.org"
TO = ["jane@example.org"]
MESSAGE = (
    b"From: sender@example.org\n"
    b"To: jane@example.org\n"
    b"Subject: test\n"
    b"Message-Id: <m1@example.org>\n"
    b"\n"
    b"Hello.\n"
)
WIRE = MESSAGE.replace(b"\n", b"\r\n")


@pytest.fixture(params=[False, True], ids=["sequential", "pipelined"])
def server(request):
    """An aiosmtpd server, once without and once with PIPELINING."""
    with SMTPServer(pipelining=request.param) as server:
        yield server


@pytest.fixture
def make_mailer():
    """Build an SMTPMailer for a server (anything with host and port);
    every mailer built is closed after the test."""
    mailers = []

    def make(server, **kw):
        mailer = SMTPMailer(kw.pop("hostname", server.host), server.port, **kw)
        mailers.append(mailer)
        return mailer

    yield make
    for mailer in mailers:
        mailer.close()


def connects(caplog) -> int:
    """How many connections the mailer opened, by its log."""
    return sum(
        1
        for record in caplog.records
        if record.name == "mailoutbox.mailer"
        and record.getMessage().startswith("connecting to ")
    )


# -- construction and interfaces ----------------------------------------------


def test_interfaces():
    assert verifyObject(ISMTPMailer, SMTPMailer())
    assert verifyObject(IMailer, SMTPMailer())
    assert verifyObject(ISendmailMailer, SendmailMailer())


def test_all():
    assert sorted(mailer_module.__all__) == ["SMTPMailer", "SendmailMailer"]
    for name in mailer_module.__all__:
        assert hasattr(mailer_module, name)


def test_positional_parameters_are_those_of_zope_sendmail():
    from zope.sendmail.mailer import SMTPMailer as ZopeSMTPMailer

    ours = list(inspect.signature(SMTPMailer).parameters)
    theirs = list(inspect.signature(ZopeSMTPMailer).parameters)
    assert ours[:8] == theirs
    mailer = SMTPMailer(
        "mail.example.org", 587, "alice", PASSWORD, False, True, False, 5
    )
    assert (
        mailer.hostname,
        mailer.port,
        mailer.username,
        mailer.password,
        mailer.no_tls,
        mailer.force_tls,
        mailer.implicit_tls,
        mailer.timeout,
    ) == ("mail.example.org", 587, "alice", PASSWORD, False, True, False, 5)
    with pytest.raises(TypeError):
        SMTPMailer("h", 25, None, None, False, False, False, 10, None)


def test_defaults():
    mailer = SMTPMailer()
    assert (mailer.hostname, mailer.port, mailer.timeout) == ("localhost", 25, 10)
    assert mailer.username is mailer.password is mailer.ca_file is None
    assert not (mailer.no_tls or mailer.force_tls or mailer.implicit_tls)
    assert SMTPMailer("h", "2525").port == 2525


def test_no_tls_and_force_tls_contradict():
    with pytest.raises(ValueError, match="no_tls and force_tls"):
        SMTPMailer(no_tls=True, force_tls=True)
    # They do not apply to implicit TLS.
    SMTPMailer(no_tls=True, force_tls=True, implicit_tls=True)


def test_default_ssl_context_verifies_certificates_and_names():
    mailer = SMTPMailer()
    context = mailer.ssl_context
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert mailer.ssl_context is context
    other = ssl.create_default_context()
    mailer.ssl_context = other
    assert mailer.ssl_context is other
    assert SMTPMailer(ssl_context=other).ssl_context is other


def test_repr_names_the_user_never_the_password():
    assert repr(SMTPMailer("mx.example.org", 587)) == "<SMTPMailer mx.example.org:587>"
    text = repr(SMTPMailer("mx.example.org", 587, "alice", PASSWORD))
    assert text == "<SMTPMailer mx.example.org:587 user='alice'>"


# -- sending ------------------------------------------------------------------


def test_send(server, make_mailer):
    mailer = make_mailer(server, local_hostname="client.example.org")
    refused = mailer.send(
        "The Sender <sender@example.org>",
        ['"Doe, Jane" <jane@example.org>', "bob@example.org"],
        MESSAGE,
    )
    assert refused == {}
    [received] = server.messages
    assert received.mail_from == "sender@example.org"
    assert received.rcpt_tos == ["jane@example.org", "bob@example.org"]
    assert received.data == WIRE
    assert received.helo == "client.example.org"
    assert received.mail_options == []
    assert not received.smtputf8
    assert not received.tls
    assert server.commands == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA"]


def test_lines_are_crlf_and_dots_survive(server, make_mailer):
    mailer = make_mailer(server)
    message = (
        b"Subject: dots\r\nX-CR: bare\rX-LF: bare\n\n"
        b".starts with a dot\n..two dots\n.\n. \nend without a line end"
    )
    mailer.send(SENDER, TO, message)
    mailer.send(SENDER, TO, b".odd first line\n\nbody\n")
    first, second = server.messages
    assert first.data == (
        b"Subject: dots\r\nX-CR: bare\r\nX-LF: bare\r\n\r\n"
        b".starts with a dot\r\n..two dots\r\n.\r\n. \r\nend without a line end\r\n"
    )
    assert second.data == b".odd first line\r\n\r\nbody\r\n"


def test_str_message_is_utf8_and_8bit_is_declared(server, make_mailer):
    mailer = make_mailer(server)
    mailer.send(SENDER, TO, "Subject: caf\u00e9\n\nd\u00e9j\u00e0 vu\n")
    [received] = server.messages
    assert received.data == "Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode()
    assert received.mail_options == ["BODY=8BITMIME"]


def test_timeout_none_means_the_default_blocking_socket(smtp_server, make_mailer):
    mailer = make_mailer(smtp_server, timeout=None)
    assert mailer.send(SENDER, TO, MESSAGE) == {}


def test_connection_is_reused_without_rset(server, make_mailer):
    mailer = make_mailer(server)
    for _ in range(3):
        assert mailer.send(SENDER, TO, MESSAGE) == {}
    assert len(server.messages) == 3
    assert server.connections == 1
    assert server.commands == ["EHLO"] + ["MAIL", "RCPT", "DATA"] * 3


def test_refused_recipients_are_returned(server, make_mailer):
    server.refuse("nobody@example.org")
    mailer = make_mailer(server)
    refused = mailer.send(
        SENDER, ["jane@example.org", "No <nobody@example.org>"], MESSAGE
    )
    assert refused == {"nobody@example.org": (550, "5.1.1 No such user")}
    assert server.messages[0].rcpt_tos == ["jane@example.org"]
    # The transaction completed: no RSET before the next one.
    mailer.send(SENDER, TO, MESSAGE)
    assert "RSET" not in server.commands


@pytest.mark.parametrize(
    ("second_reply", "permanent", "code"),
    [
        ("553 5.1.3 Bad address", True, 553),
        ("451 4.7.1 Greylisted", False, 550),
    ],
)
def test_all_recipients_refused(server, make_mailer, second_reply, permanent, code):
    server.refuse("a@example.org", "550 5.1.1 No such user")
    server.refuse("b@example.org", second_reply)
    mailer = make_mailer(server)
    with pytest.raises(RecipientsRefused) as info:
        mailer.send(SENDER, ["a@example.org", "b@example.org"], MESSAGE)
    error = info.value
    assert error.permanent is permanent
    assert error.code == code
    assert error.refused == {
        "a@example.org": (550, "5.1.1 No such user"),
        "b@example.org": (int(second_reply[:3]), second_reply[4:]),
    }
    assert server.messages == []
    # The connection is kept; the next transaction starts with RSET.
    server.reset()
    assert mailer.send(SENDER, ["a@example.org"], MESSAGE) == {}
    assert server.commands == ["RSET", "MAIL", "RCPT", "DATA"]
    assert server.connections == 1


def test_greylisting_is_transient(server, make_mailer):
    server.greylist("jane@example.org", times=1)
    mailer = make_mailer(server)
    with pytest.raises(RecipientsRefused) as info:
        mailer.send(SENDER, TO, MESSAGE)
    assert not info.value.permanent
    assert info.value.code == 451
    assert isinstance(info.value, MailError)
    assert mailer.send(SENDER, TO, MESSAGE) == {}


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        ("553 5.7.1 Sender rejected", PermanentSenderRefusedError),
        ("451 4.3.0 Try again later", TransientSenderRefusedError),
    ],
)
def test_sender_refused(server, make_mailer, reply, kind):
    server.reply("MAIL", reply)
    mailer = make_mailer(server)
    with pytest.raises(MailError) as info:
        mailer.send("Sender <sender@example.org>", TO, MESSAGE)
    assert type(info.value) is kind
    assert info.value.code == int(reply[:3])
    assert str(info.value) == f"sender <sender@example.org> refused: {reply}"
    server.reply("MAIL", None)
    assert mailer.send(SENDER, TO, MESSAGE) == {}
    assert server.connections == 1
    assert server.commands[-4:] == ["RSET", "MAIL", "RCPT", "DATA"]


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        ("554 5.6.0 Message rejected", PermanentDataRefusedError),
        ("452 4.3.1 Insufficient storage", TransientDataRefusedError),
    ],
)
def test_message_refused_at_end_of_data(server, make_mailer, reply, kind):
    server.reply("DATA", reply)
    mailer = make_mailer(server)
    with pytest.raises(MailError) as info:
        mailer.send(SENDER, TO, MESSAGE)
    assert type(info.value) is kind
    assert str(info.value) == f"message refused: {reply}"
    server.reply("DATA", None)
    assert mailer.send(SENDER, TO, MESSAGE) == {}
    assert server.connections == 1


# -- addresses ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "recipient"),
    [
        ("j\u00f6rg@example.org", "jane@example.org"),
        (SENDER, "J\u00f6rg <j\u00f6rg@ex\u00e4mple.org>"),
    ],
)
def test_smtputf8_for_non_ascii_addresses(server, make_mailer, sender, recipient):
    mailer = make_mailer(server)
    assert mailer.send(sender, [recipient], MESSAGE) == {}
    [received] = server.messages
    assert received.smtputf8
    assert received.mail_from == envelope_address(sender)
    assert received.rcpt_tos == [envelope_address(recipient)]


def test_non_ascii_address_without_smtputf8_is_permanent(make_mailer):
    with SMTPServer(smtputf8=False) as server:
        mailer = make_mailer(server)
        with pytest.raises(PermanentMailError, match="does not offer SMTPUTF8"):
            mailer.vote("j\u00f6rg@example.org", TO, MESSAGE)
        with pytest.raises(PermanentMailError, match="does not offer SMTPUTF8"):
            mailer.send(SENDER, ["j\u00f6rg@example.org"], MESSAGE)
        assert "MAIL" not in server.commands
        assert mailer.send(SENDER, TO, MESSAGE) == {}
        assert server.connections == 1


def test_null_sender(server, make_mailer):
    mailer = make_mailer(server)
    mailer.send("<>", TO, MESSAGE)
    mailer.send("", TO, MESSAGE)
    assert [m.mail_from for m in server.messages] == ["<>", "<>"]


@pytest.mark.parametrize(
    "address",
    [
        "jane@example.org\r\nRCPT TO:<evil@example.org>",
        "jane@example.org\x00",
        "Jane <jane@example.org\n>",
        "a@example.org, b@example.org",
        "",
        "<>",
        "Jane <>",
        "<<a@example.org>>",
    ],
)
def test_invalid_recipient_is_permanent_and_nothing_is_sent(
    smtp_server, make_mailer, address
):
    mailer = make_mailer(smtp_server)
    with pytest.raises(PermanentMailError):
        mailer.send(SENDER, ["jane@example.org", address], MESSAGE)
    with pytest.raises(PermanentMailError):
        mailer.vote(SENDER, [address], MESSAGE)
    assert smtp_server.connections == 0


def test_invalid_sender_is_permanent(smtp_server, make_mailer):
    mailer = make_mailer(smtp_server)
    with pytest.raises(PermanentMailError):
        mailer.send("a@example.org\r\nRSET", TO, MESSAGE)
    assert smtp_server.connections == 0


def test_arguments_of_the_wrong_type(smtp_server, make_mailer):
    mailer = make_mailer(smtp_server)
    with pytest.raises(TypeError, match="not one string"):
        mailer.send(SENDER, "jane@example.org", MESSAGE)
    with pytest.raises(TypeError, match="not one string"):
        mailer.vote(SENDER, b"jane@example.org", MESSAGE)
    with pytest.raises(TypeError, match="an address must be a str"):
        mailer.send(SENDER, [b"jane@example.org"], MESSAGE)
    with pytest.raises(TypeError, match="a message must be bytes or str"):
        mailer.send(SENDER, TO, 42)
    with pytest.raises(PermanentMailError, match="no recipients"):
        mailer.send(SENDER, [], MESSAGE)
    assert smtp_server.connections == 0


@pytest.mark.parametrize(
    ("address", "spec"),
    [
        ("jane@example.org", "jane@example.org"),
        ('"Doe, Jane" <jane@example.org>', "jane@example.org"),
        ("Jane Doe <jane@example.org>", "jane@example.org"),
        ("<jane@example.org>", "jane@example.org"),
        ("jane@example.org (Jane Doe)", "jane@example.org"),
        ('"jane doe"@example.org', '"jane doe"@example.org'),
        ("postmaster", "postmaster"),
        ("j\u00f6rg@ex\u00e4mple.org", "j\u00f6rg@ex\u00e4mple.org"),
    ],
)
def test_envelope_address(address, spec):
    assert envelope_address(address) == spec


def test_envelope_address_of_null_sender():
    assert envelope_address("<>", sender=True) == ""
    assert envelope_address(" ", sender=True) == ""
    with pytest.raises(PermanentMailError):
        envelope_address("<>")


def _unstuff(wire: bytes) -> list[bytes]:
    # What a server does with the data: split at CRLF, stop at ".", remove
    # the dot added to lines starting with one.
    assert wire.endswith(b"\r\n.\r\n")
    lines = wire[: -len(b"\r\n.\r\n")].split(b"\r\n")
    for line in lines:
        assert b"\r" not in line
        assert b"\n" not in line
        assert not line.startswith(b".") or line.startswith(b"..")
    return [line[1:] if line.startswith(b".") else line for line in lines]


@given(st.lists(st.sampled_from([b"a", b".", b"..", b"\r", b"\n", b"\r\n", b" "])))
def test_encode_data_keeps_every_line(parts):
    message = b"".join(parts)
    text = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if text.endswith(b"\n"):
        text = text[:-1]
    assert _unstuff(encode_data(message)) == text.split(b"\n")


def test_encode_data():
    assert encode_data(b"") == b"\r\n.\r\n"
    assert encode_data(b".") == b"..\r\n.\r\n"
    assert encode_data("\u00e9\n") == "\u00e9\r\n.\r\n".encode()


# -- servers without ESMTP, connection failures, timeouts --------------------


def test_helo_when_ehlo_is_refused(smtp_server, make_mailer):
    smtp_server.reply("EHLO", "502 5.5.1 EHLO not implemented")
    mailer = make_mailer(smtp_server)
    assert mailer.send(SENDER, TO, MESSAGE) == {}
    assert smtp_server.commands == ["EHLO", "HELO", "MAIL", "RCPT", "DATA"]
    assert smtp_server.messages[0].data == WIRE


def test_helo_only_server_and_non_ascii_addresses(smtp_server, make_mailer):
    smtp_server.reply("EHLO", "502 5.5.1 EHLO not implemented")
    mailer = make_mailer(smtp_server)
    with pytest.raises(PermanentMailError, match="SMTPUTF8"):
        mailer.send("j\u00f6rg@example.org", TO, MESSAGE)


def test_helo_only_server_and_credentials(smtp_server, make_mailer):
    smtp_server.reply("EHLO", "502 5.5.1 EHLO not implemented")
    mailer = make_mailer(smtp_server, username="alice", password=PASSWORD)
    with pytest.raises(MailAuthenticationError, match="does not speak ESMTP"):
        mailer.send(SENDER, TO, MESSAGE)
    assert smtp_server.messages == []


def test_helo_refused_too(smtp_server, make_mailer):
    smtp_server.reply("EHLO", "502 5.5.1 EHLO not implemented")
    smtp_server.reply("HELO", "554 5.7.1 Go away")
    mailer = make_mailer(smtp_server)
    with pytest.raises(MailConnectionError) as info:
        mailer.send(SENDER, TO, MESSAGE)
    assert info.value.code == 554
    assert not info.value.permanent


def test_connection_refused():
    mailer = SMTPMailer("127.0.0.1", free_port())
    with pytest.raises(MailConnectionError):
        mailer.vote(SENDER, TO, MESSAGE)
    with pytest.raises(MailConnectionError):
        mailer.send(SENDER, TO, MESSAGE)
    mailer.close()


def test_timeout(smtp_server, make_mailer):
    smtp_server.slow(1.0)
    mailer = make_mailer(smtp_server, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(MailTimeoutError):
        mailer.send(SENDER, TO, MESSAGE)
    assert time.monotonic() - started < 0.9
    smtp_server.slow(0)
    assert mailer.send(SENDER, TO, MESSAGE) == {}
    # The connection that timed out was not reused.
    assert smtp_server.connections == 2
    assert [m.message_id for m in smtp_server.messages] == ["m1@example.org"]


# -- reuse and replacement of connections ------------------------------------


@pytest.mark.parametrize("reply", [None, "421 4.4.2 mailoutbox.test Error: timeout"])
def test_connection_dropped_while_idle_is_replaced(server, make_mailer, caplog, reply):
    caplog.set_level(logging.INFO, logger="mailoutbox.mailer")
    mailer = make_mailer(server)
    mailer.send(SENDER, TO, MESSAGE)
    assert server.drop_connections(reply) == 1
    assert mailer.send(SENDER, TO, MESSAGE.replace(b"<m1@", b"<m2@")) == {}
    assert server.connections == 2
    assert server.message_ids() == ["m1@example.org", "m2@example.org"]
    assert "closed the idle connection" in caplog.text
    assert "reconnecting to send m2@example.org" in caplog.text


def test_connection_dropped_after_a_failed_transaction(server, make_mailer):
    server.refuse("nobody@example.org")
    mailer = make_mailer(server)
    with pytest.raises(RecipientsRefused):
        mailer.send(SENDER, ["nobody@example.org"], MESSAGE)
    server.drop_connections("421 4.4.2 Idle timeout")
    server.commands.clear()
    assert mailer.send(SENDER, TO, MESSAGE) == {}
    assert server.connections == 2
    # RSET on the old connection (refused with 421), none on the new one.
    assert server.commands == ["EHLO", "MAIL", "RCPT", "DATA"]


def test_connection_refusing_rset_is_replaced(server, make_mailer):
    server.refuse("nobody@example.org")
    mailer = make_mailer(server)
    with pytest.raises(RecipientsRefused):
        mailer.send(SENDER, ["nobody@example.org"], MESSAGE)
    server.reply("RSET", "500 5.5.1 No RSET today")
    assert mailer.send(SENDER, TO, MESSAGE) == {}
    assert server.connections == 2
    assert len(server.messages) == 1


def test_new_connection_is_not_retried(smtp_server, make_mailer, caplog):
    caplog.set_level(logging.DEBUG, logger="mailoutbox.mailer")
    smtp_server.reply("MAIL", "421 4.3.2 Shutting down")
    mailer = make_mailer(smtp_server)
    with pytest.raises(TransientMailError) as info:
        mailer.send(SENDER, TO, MESSAGE)
    assert info.value.code == 421
    assert smtp_server.connections == 1
    assert connects(caplog) == 1


def test_reused_connection_is_retried_once(smtp_server, make_mailer, caplog):
    caplog.set_level(logging.DEBUG, logger="mailoutbox.mailer")
    mailer = make_mailer(smtp_server)
    mailer.send(SENDER, TO, MESSAGE)
    smtp_server.reply("MAIL", "421 4.3.2 Shutting down")
    with pytest.raises(TransientMailError) as info:
        mailer.send(SENDER, TO, MESSAGE)
    assert info.value.code == 421
    assert smtp_server.connections == 2
    assert connects(caplog) == 2


def test_vote_opens_the_connection_send_uses(server, make_mailer):
    mailer = make_mailer(server)
    assert mailer.vote(SENDER, TO, MESSAGE) is None
    assert server.commands == ["EHLO"]
    mailer.send(SENDER, TO, MESSAGE)
    assert server.connections == 1
    assert server.commands == ["EHLO", "MAIL", "RCPT", "DATA"]


def test_vote_checks_a_reused_connection(server, make_mailer):
    server.refuse("nobody@example.org")
    mailer = make_mailer(server)
    mailer.send(SENDER, TO, MESSAGE)
    mailer.vote(SENDER, TO, MESSAGE)
    with pytest.raises(RecipientsRefused):
        mailer.send(SENDER, ["nobody@example.org"], MESSAGE)
    mailer.vote(SENDER, TO, MESSAGE)
    mailer.send(SENDER, TO, MESSAGE)
    assert server.commands == [
        "EHLO",
        *("MAIL", "RCPT", "DATA"),
        "NOOP",
        *("MAIL", "RCPT"),
        "RSET",
        *("MAIL", "RCPT", "DATA"),
    ]
    assert server.connections == 1


@pytest.mark.parametrize("reply", [None, "421 4.4.2 Idle timeout"])
def test_vote_replaces_a_dropped_connection(server, make_mailer, reply):
    mailer = make_mailer(server)
    mailer.send(SENDER, TO, MESSAGE)
    server.drop_connections(reply)
    mailer.vote(SENDER, TO, MESSAGE)
    assert server.connections == 2
    mailer.send(SENDER, TO, MESSAGE)
    assert server.connections == 2


def test_vote_replaces_a_connection_refusing_noop(smtp_server, make_mailer):
    mailer = make_mailer(smtp_server)
    mailer.vote(SENDER, TO, MESSAGE)
    smtp_server.reply("NOOP", "502 5.5.1 No NOOP here")
    mailer.vote(SENDER, TO, MESSAGE)
    assert smtp_server.connections == 2


def test_abort_closes_the_connection(server, make_mailer):
    mailer = make_mailer(server)
    mailer.abort()  # nothing open: nothing to do
    mailer.vote(SENDER, TO, MESSAGE)
    mailer.abort()
    assert server.commands == ["EHLO", "QUIT"]
    mailer.send(SENDER, TO, MESSAGE)
    assert server.connections == 2


def test_close_closes_the_connections_of_all_threads(server, make_mailer):
    mailer = make_mailer(server)
    sent = threading.Barrier(3, timeout=10)
    done = threading.Event()
    errors = []

    def work():
        try:
            mailer.send(SENDER, TO, MESSAGE)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        sent.wait()
        done.wait(10)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    mailer.send(SENDER, TO, MESSAGE)
    sent.wait()
    assert errors == []
    assert server.connections == 3
    mailer.close()
    done.set()
    for thread in threads:
        thread.join(10)
    assert server.commands.count("QUIT") == 3
    mailer.close()  # again: nothing left to close
    mailer.send(SENDER, TO, MESSAGE)
    assert server.connections == 4
    assert len(server.messages) == 4


def test_connections_of_ended_threads_are_closed(server, make_mailer):
    mailer = make_mailer(server)
    thread = threading.Thread(target=mailer.send, args=(SENDER, TO, MESSAGE))
    thread.start()
    thread.join(10)
    [(connection, owner)] = mailer._pool.owners.items()
    assert owner is thread
    mailer.send(SENDER, TO, MESSAGE)
    assert connection.sock is None
    assert list(mailer._pool.owners.values()) == [threading.current_thread()]


def test_failing_quit_does_not_fail(server, make_mailer):
    mailer = make_mailer(server)
    assert mailer.send(SENDER, TO, MESSAGE) == {}
    server.reply("QUIT", "500 5.5.1 Not now")
    mailer.close()
    mailer.vote(SENDER, TO, MESSAGE)
    server.drop_connections()
    mailer.abort()
    assert len(server.messages) == 1


# -- TLS and authentication ---------------------------------------------------


def test_starttls_and_auth(tls_server, certificates, make_mailer, caplog):
    caplog.set_level(logging.DEBUG)
    mailer = make_mailer(
        tls_server,
        hostname="localhost",
        username="alice",
        password=PASSWORD,
        ca_file=certificates.ca_file,
    )
    assert mailer.send(SENDER, TO, MESSAGE) == {}
    [received] = tls_server.messages
    assert received.tls
    assert received.login == "alice"
    # EHLO again after STARTTLS; the STARTTLS and AUTH verbs are not recorded.
    assert tls_server.commands == ["EHLO", "EHLO", "MAIL", "RCPT", "DATA"]
    assert PASSWORD not in caplog.text
    assert "authenticated to localhost" in caplog.text


def test_starttls_without_credentials_and_force_tls(
    tls_server, certificates, make_mailer
):
    mailer = make_mailer(tls_server, force_tls=True, ca_file=certificates.ca_file)
    mailer.send(SENDER, TO, MESSAGE)
    assert tls_server.messages[0].tls
    assert tls_server.messages[0].login is None


@pytest.mark.parametrize("force_tls", [False, True])
def test_untrusted_certificate_is_refused(tls_server, make_mailer, force_tls):
    mailer = make_mailer(tls_server, force_tls=force_tls)
    with pytest.raises(MailTLSError, match="CERTIFICATE_VERIFY_FAILED"):
        mailer.send(SENDER, TO, MESSAGE)
    with pytest.raises(MailTLSError):
        mailer.vote(SENDER, TO, MESSAGE)
    # Never a fallback to plain text: nothing after the first EHLO.
    assert tls_server.commands == ["EHLO", "EHLO"]
    assert tls_server.connections == 2
    assert tls_server.messages == []


def test_host_name_is_checked(tls_server, certificates, make_mailer):
    # 127.1 is 127.0.0.1, but the certificate is not for that name.
    mailer = make_mailer(tls_server, hostname="127.1", ca_file=certificates.ca_file)
    with pytest.raises(MailTLSError, match="Hostname mismatch"):
        mailer.send(SENDER, TO, MESSAGE)
    assert tls_server.messages == []


def test_custom_ssl_context_is_used(tls_server, certificates, make_mailer):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    mailer = make_mailer(tls_server, ssl_context=context)
    assert mailer.ssl_context is context
    mailer.send(SENDER, TO, MESSAGE)
    mailer = make_mailer(tls_server, ssl_context=certificates.client_context())
    mailer.send(SENDER, TO, MESSAGE)
    assert [m.tls for m in tls_server.messages] == [True, True]


def test_no_tls_sends_in_plain_text(tls_server, make_mailer):
    mailer = make_mailer(tls_server, no_tls=True)
    mailer.send(SENDER, TO, MESSAGE)
    assert not tls_server.messages[0].tls
    assert tls_server.commands == ["EHLO", "MAIL", "RCPT", "DATA"]


def test_no_tls_and_auth_offered_only_after_tls(tls_server, make_mailer):
    mailer = make_mailer(tls_server, no_tls=True, username="alice", password=PASSWORD)
    with pytest.raises(MailAuthenticationError, match=r"does not offer AUTH$"):
        mailer.send(SENDER, TO, MESSAGE)


def test_credentials_but_no_auth_offered(smtp_server, make_mailer):
    mailer = make_mailer(smtp_server, username="alice", password=PASSWORD)
    with pytest.raises(
        MailAuthenticationError, match=r"does not offer AUTH \(without TLS\)"
    ):
        mailer.vote(SENDER, TO, MESSAGE)
    assert smtp_server.commands == ["EHLO"]


def test_force_tls_without_starttls(smtp_server, make_mailer):
    mailer = make_mailer(smtp_server, force_tls=True)
    with pytest.raises(MailTLSError, match="does not offer STARTTLS"):
        mailer.send(SENDER, TO, MESSAGE)
    assert smtp_server.commands == ["EHLO"]
    assert smtp_server.messages == []


def test_implicit_tls(certificates, make_mailer):
    with SMTPServer(
        tls_context=certificates.server_context(),
        implicit_tls=True,
        users={"alice": PASSWORD},
    ) as server:
        mailer = make_mailer(
            server,
            username="alice",
            password=PASSWORD,
            implicit_tls=True,
            ca_file=certificates.ca_file,
        )
        mailer.send(SENDER, TO, MESSAGE)
        assert server.messages[0].tls
        assert server.messages[0].login == "alice"
        untrusted = make_mailer(server, implicit_tls=True)
        with pytest.raises(MailTLSError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusted.send(SENDER, TO, MESSAGE)
        assert len(server.messages) == 1


def _secrets(password: str) -> list[str]:
    raw = password.encode()
    return [
        password,
        base64.b64encode(raw).decode(),
        base64.b64encode(b"\0alice\0" + raw).decode(),
        base64.b64encode(b"alice\0alice\0" + raw).decode(),
    ]


def _everything_about(error: BaseException, mailer, caplog) -> list[str]:
    return [
        str(error),
        repr(error),
        "".join(traceback.format_exception(error)),
        repr(mailer),
        str(vars(error)),
        caplog.text,
        *(r.getMessage() for r in caplog.records),
    ]


def test_wrong_password_is_never_shown(tls_server, certificates, make_mailer, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "wr0ng-s3cret-pw"
    mailer = make_mailer(
        tls_server, username="alice", password=wrong, ca_file=certificates.ca_file
    )
    with pytest.raises(MailAuthenticationError) as info:
        mailer.send(SENDER, TO, MESSAGE)
    error = info.value
    assert error.code == 535
    assert str(error).startswith(
        f"authentication failed at {tls_server.host}:{tls_server.port};"
    )
    for text in _everything_about(error, mailer, caplog):
        for secret in _secrets(wrong):
            assert secret not in text


def test_non_ascii_password_is_never_shown(
    tls_server, certificates, make_mailer, caplog
):
    caplog.set_level(logging.DEBUG)
    secret = "p\u00e4ssw\u00f6rd-s3cret"
    mailer = make_mailer(
        tls_server, username="alice", password=secret, ca_file=certificates.ca_file
    )
    with pytest.raises(MailAuthenticationError, match="must be ASCII") as info:
        mailer.send(SENDER, TO, MESSAGE)
    assert info.value.__context__ is None
    for text in _everything_about(info.value, mailer, caplog):
        assert secret not in text
        assert "s3cret" not in text


def test_missing_password_is_an_empty_one(tls_server, certificates, make_mailer):
    mailer = make_mailer(tls_server, username="alice", ca_file=certificates.ca_file)
    with pytest.raises(MailAuthenticationError):
        mailer.send(SENDER, TO, MESSAGE)


# -- logging ------------------------------------------------------------------


def test_log_lines_name_the_message_id(server, make_mailer, caplog):
    caplog.set_level(logging.DEBUG, logger="mailoutbox.mailer")
    server.refuse("nobody@example.org")
    mailer = make_mailer(server)
    mailer.send(SENDER, TO, MESSAGE)
    mailer.send(SENDER, TO, b"Subject: no id\n\nbody\n")
    mailer.send(SENDER, TO, b"Message-ID:\n <folded@example.org>\nSubject: x\n\nbody\n")
    mailer.send(SENDER, [*TO, "nobody@example.org"], MESSAGE.replace(b"<m1@", b"<m4@"))
    messages = [r.getMessage() for r in caplog.records]
    assert "sent m1@example.org to 1 recipient(s)" in messages
    assert "sent (no Message-Id) to 1 recipient(s)" in messages
    assert "sent folded@example.org to 1 recipient(s)" in messages
    assert (
        "sent m4@example.org; refused recipients:"
        " {'nobody@example.org': (550, '5.1.1 No such user')}"
    ) in messages


def test_test_server_drops_connections_only_while_running():
    server = SMTPServer()
    with pytest.raises(RuntimeError, match="not running"):
        server.drop_connections()
    server.stop()  # not started: nothing to stop
    with server:
        assert server.drop_connections() == 0
    server.stop()  # stopped already


# -- Postfix's smtp-sink ------------------------------------------------------


@pytest.mark.smtpsink
def test_sink_one_connection_pipelined(smtp_sink, make_mailer, caplog):
    caplog.set_level(logging.DEBUG, logger="mailoutbox.mailer")
    sink = smtp_sink()
    mailer = make_mailer(sink)
    for _ in range(5):
        assert mailer.send(SENDER, [*TO, "bob@example.org"], MESSAGE) == {}
    mailer.close()
    assert sink.counters() == {"sess": 2, "quit": 1, "mesg": 5}
    assert "PIPELINING: True" in caplog.text


@pytest.mark.smtpsink
@pytest.mark.parametrize(
    ("options", "kind", "code"),
    [
        (("-r", "MAIL"), TransientMailError, 450),
        (("-f", "MAIL"), PermanentMailError, 500),
        (("-r", "RCPT"), RecipientsRefused, 450),
        (("-f", "RCPT"), RecipientsRefused, 500),
        (("-r", "DATA"), TransientMailError, 450),
        (("-f", "DATA"), PermanentMailError, 500),
        (("-r", "."), TransientMailError, 450),
        (("-f", "."), PermanentMailError, 500),
        (("-Q", "MAIL"), TransientMailError, 421),
        (("-Q", "RCPT"), TransientMailError, 421),
        (("-Q", "DATA"), TransientMailError, 421),
        (("-Q", "."), TransientMailError, 421),
        (("-q", "MAIL"), MailConnectionError, None),
        (("-q", "RCPT"), MailConnectionError, None),
        (("-q", "DATA"), MailConnectionError, None),
        (("-q", "."), MailConnectionError, None),
        (("-r", "CONNECT"), MailConnectionError, 450),
        (("-f", "CONNECT"), MailConnectionError, 500),
        (("-Q", "CONNECT"), MailConnectionError, 421),
        (("-q", "CONNECT"), MailConnectionError, None),
        (("-f", "EHLO,HELO"), MailHeloError, 500),
    ],
)
def test_sink_faults(smtp_sink, make_mailer, caplog, options, kind, code):
    caplog.set_level(logging.DEBUG, logger="mailoutbox.mailer")
    sink = smtp_sink(*options)
    mailer = make_mailer(sink)
    with pytest.raises(MailError) as info:
        mailer.send(SENDER, TO, MESSAGE)
    error = info.value
    assert isinstance(error, kind)
    assert error.code == code
    assert error.permanent is (
        code is not None and code >= 500 and not issubclass(kind, MailConnectionError)
    )
    assert connects(caplog) == 1  # a new connection is never retried


@pytest.mark.smtpsink
@pytest.mark.parametrize(
    ("command", "connections"), [("MAIL", 2), ("DATA", 1), (".", 1)]
)
def test_sink_drop_on_a_reused_connection(
    smtp_sink, make_mailer, caplog, command, connections
):
    caplog.set_level(logging.DEBUG, logger="mailoutbox.mailer")
    sink = smtp_sink("-q", command)
    mailer = make_mailer(sink)
    mailer.vote(SENDER, TO, MESSAGE)
    caplog.clear()
    with pytest.raises(MailConnectionError):
        mailer.send(SENDER, TO, MESSAGE)
    # Retried (once) only when nothing of the message had been accepted;
    # never after the end of the data was sent.
    assert connects(caplog) == connections - 1


@pytest.mark.smtpsink
def test_sink_idle_timeout(smtp_sink, make_mailer, caplog):
    caplog.set_level(logging.INFO, logger="mailoutbox.mailer")
    sink = smtp_sink("-t", "1")
    mailer = make_mailer(sink)
    mailer.send(SENDER, TO, MESSAGE)
    time.sleep(1.5)
    assert mailer.send(SENDER, TO, MESSAGE) == {}
    assert "closed the idle connection" in caplog.text
    assert sink.counters()["mesg"] == 2


@pytest.mark.smtpsink
def test_sink_without_ehlo(smtp_sink, make_mailer, caplog):
    caplog.set_level(logging.DEBUG, logger="mailoutbox.mailer")
    sink = smtp_sink("-f", "EHLO")
    mailer = make_mailer(sink)
    assert mailer.send(SENDER, TO, MESSAGE) == {}
    assert "ESMTP: False" in caplog.text


@pytest.mark.smtpsink
@pytest.mark.parametrize("option", ["-q", "-f", "-Q"])
def test_sink_failing_quit(smtp_sink, make_mailer, option):
    sink = smtp_sink(option, "QUIT")
    mailer = make_mailer(sink)
    assert mailer.send(SENDER, TO, MESSAGE) == {}
    mailer.close()
    mailer.vote(SENDER, TO, MESSAGE)
    mailer.abort()
    assert sink.counters()["mesg"] == 1


@pytest.mark.smtpsink
def test_sink_noop_refused_on_vote(smtp_sink, make_mailer, caplog):
    caplog.set_level(logging.DEBUG, logger="mailoutbox.mailer")
    sink = smtp_sink("-f", "NOOP")
    mailer = make_mailer(sink)
    mailer.vote(SENDER, TO, MESSAGE)
    mailer.vote(SENDER, TO, MESSAGE)
    assert connects(caplog) == 2
    assert mailer.send(SENDER, TO, MESSAGE) == {}
    assert connects(caplog) == 2


@pytest.mark.smtpsink
def test_sink_noop_timeout_on_vote(smtp_sink, make_mailer, caplog):
    caplog.set_level(logging.DEBUG, logger="mailoutbox.mailer")
    sink = smtp_sink("-W", "NOOP:2")
    mailer = make_mailer(sink, timeout=0.3)
    mailer.send(SENDER, TO, MESSAGE)
    with pytest.raises(MailTimeoutError):
        mailer.vote(SENDER, TO, MESSAGE)
    assert connects(caplog) == 1
    assert mailer._pool.owners == {}


# -- a scripted peer ----------------------------------------------------------


class ScriptedServer:
    """A real SMTP peer on 127.0.0.1 that follows a script.

    *script* maps a command verb (``"MAIL"``; ``"."`` for the end of data)
    to the reply, sent with CRLF appended.  ``None`` closes the connection
    without a reply; a reply starting with ``close:`` sends the rest as it
    is and then closes; one starting with ``garbage:`` sends the rest, waits
    for the client's next bytes (a TLS ClientHello), answers them with
    something that is not TLS and closes.  A 354 reply makes the next lines
    data.
    Connections are served one after the other; :attr:`lines` records the
    command lines (and ``"."``), :attr:`chunks` every piece read.
    """

    EHLO = "250-scripted.test\r\n250-PIPELINING\r\n250 8BITMIME"
    DEFAULT = {
        "EHLO": EHLO,
        "HELO": "250 scripted.test",
        "MAIL": "250 2.1.0 Ok",
        "RCPT": "250 2.1.5 Ok",
        "DATA": "354 Go ahead",
        ".": "250 2.0.0 Queued",
        "RSET": "250 2.0.0 Ok",
        "NOOP": "250 2.0.0 Ok",
        "QUIT": "close:221 2.0.0 Bye\r\n",
    }

    host = "127.0.0.1"

    def __init__(self, script=None):
        self.script = {**self.DEFAULT, **(script or {})}
        self.lines: list[str] = []
        self.chunks: list[bytes] = []
        self.connections = 0
        self._stop = threading.Event()
        self._conn = None
        self._sock = socket.create_server((self.host, 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self._sock.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _address = self._sock.accept()
            except TimeoutError:
                continue
            self._conn = conn
            with conn:
                conn.settimeout(5)
                self.connections += 1
                with contextlib.suppress(OSError):
                    self._session(conn)

    def _session(self, conn):
        conn.sendall(b"220 scripted.test ESMTP\r\n")
        buffer = b""
        in_data = False
        while not self._stop.is_set():
            while b"\r\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                self.chunks.append(chunk)
                buffer += chunk
            line, buffer = buffer.split(b"\r\n", 1)
            if in_data and line != b".":
                continue
            verb = "." if in_data else line.split(b" ", 1)[0].decode().upper()
            in_data = False
            self.lines.append(line.decode())
            reply = self.script.get(verb, "502 5.5.2 Unknown command")
            if reply is None:
                return
            if reply.startswith("close:"):
                conn.sendall(reply[len("close:") :].encode())
                return
            if reply.startswith("garbage:"):
                conn.sendall(reply[len("garbage:") :].encode() + b"\r\n")
                self.chunks.append(conn.recv(65536))
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                return
            conn.sendall(reply.encode() + b"\r\n")
            in_data = reply.startswith("354")


@pytest.mark.parametrize(("pipelining", "first"), [(True, 1), (False, 0)])
def test_pipelining_sends_the_envelope_in_one_write(make_mailer, pipelining, first):
    ehlo = ScriptedServer.EHLO if pipelining else "250-scripted.test\r\n250 8BITMIME"
    with ScriptedServer({"EHLO": ehlo}) as server:
        mailer = make_mailer(server)
        mailer.send(SENDER, [*TO, "bob@example.org"], MESSAGE)
        envelope = (
            b"MAIL FROM:<sender@example.org>\r\n"
            b"RCPT TO:<jane@example.org>\r\n"
            b"RCPT TO:<bob@example.org>\r\n"
            b"DATA\r\n"
        )
        assert (envelope in server.chunks) is pipelining
        assert (
            b"MAIL FROM:<sender@example.org>\r\n" in server.chunks
        ) is not pipelining
        assert server.chunks[-1] == WIRE + b".\r\n"


def test_data_accepted_after_all_recipients_were_refused(make_mailer):
    script = {"RCPT": "550 5.1.1 No such user", ".": "554 5.5.1 No valid recipients"}
    with ScriptedServer(script) as server:
        mailer = make_mailer(server)
        with pytest.raises(RecipientsRefused):
            mailer.send(SENDER, TO, MESSAGE)
        # An empty message ended the data; the session is still in step.
        assert server.chunks[-1] == b".\r\n"
        mailer.vote(SENDER, TO, MESSAGE)
        assert server.lines[-3:] == ["DATA", ".", "RSET"]
        assert server.connections == 1


def test_connection_closed_after_a_pipelined_refusal(make_mailer):
    with ScriptedServer({"MAIL": "close:550 5.7.1 Go away\r\n"}) as server:
        mailer = make_mailer(server)
        with pytest.raises(
            PermanentMailError, match=r"sender <sender@example\.org> refused"
        ):
            mailer.send(SENDER, TO, MESSAGE)
        assert mailer._pool.owners == {}


def test_starttls_refused(make_mailer):
    script = {
        "EHLO": "250-scripted.test\r\n250 STARTTLS",
        "STARTTLS": "454 4.7.0 TLS not available",
    }
    with ScriptedServer(script) as server:
        mailer = make_mailer(server)
        with pytest.raises(MailTLSError) as info:
            mailer.send(SENDER, TO, MESSAGE)
        assert info.value.code == 454
        assert str(info.value) == (
            f"STARTTLS refused by 127.0.0.1:{server.port}:"
            " 454 4.7.0 TLS not available"
        )
        assert [line.split()[0].upper() for line in server.lines] == [
            "EHLO",
            "STARTTLS",
        ]


@pytest.mark.parametrize("force_tls", [False, True])
def test_starttls_failing_in_the_handshake(make_mailer, force_tls):
    script = {
        "EHLO": "250-scripted.test\r\n250 STARTTLS",
        "STARTTLS": "garbage:220 2.0.0 Ready",
    }
    with ScriptedServer(script) as server:
        mailer = make_mailer(server, force_tls=force_tls)
        with pytest.raises(
            MailTLSError,
            match=f"^TLS handshake with 127.0.0.1:{server.port} after STARTTLS failed",
        ):
            mailer.send(SENDER, TO, MESSAGE)
        assert [line.split()[0].upper() for line in server.lines] == [
            "EHLO",
            "STARTTLS",
        ]
        assert server.connections == 1


def test_no_auth_mechanism_in_common(make_mailer):
    with ScriptedServer(
        {"EHLO": "250-scripted.test\r\n250 AUTH XOAUTH2 GSSAPI"}
    ) as server:
        mailer = make_mailer(server, username="alice", password=PASSWORD, no_tls=True)
        with pytest.raises(
            MailAuthenticationError, match="no AUTH mechanism in common"
        ):
            mailer.send(SENDER, TO, MESSAGE)


# -- SendmailMailer -----------------------------------------------------------

FAKE_SENDMAIL = """\
#!{python}
import json, os, signal, sys, time
here = os.path.dirname(os.path.abspath(__file__))
data = sys.stdin.buffer.read()
with open(os.path.join(here, "argv.json"), "w") as f:
    json.dump(sys.argv[1:], f)
with open(os.path.join(here, "stdin"), "wb") as f:
    f.write(data)
with open(os.path.join(here, "behaviour.json")) as f:
    behaviour = json.load(f)
sys.stderr.write(behaviour["stderr"])
sys.stderr.flush()
if behaviour["status"] == "sleep":
    time.sleep(10)
if behaviour["status"] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(behaviour["status"])
"""


class FakeSendmail:
    """A sendmail-like program that records its arguments and input and
    exits as told."""

    def __init__(self, directory):
        self.directory = directory
        self.path = str(directory / "sendmail")
        with open(self.path, "w") as f:
            f.write(FAKE_SENDMAIL.format(python=sys.executable))
        os.chmod(self.path, 0o755)  # noqa: S103 - it is a program
        self.behave()

    def behave(self, status=0, stderr=""):
        with open(self.directory / "behaviour.json", "w") as f:
            json.dump({"status": status, "stderr": stderr}, f)

    def argv(self):
        with open(self.directory / "argv.json") as f:
            return json.load(f)

    def stdin(self):
        return (self.directory / "stdin").read_bytes()

    def ran(self):
        return (self.directory / "argv.json").exists()


@pytest.fixture
def sendmail(tmp_path):
    return FakeSendmail(tmp_path)


def test_sendmail_defaults():
    mailer = SendmailMailer()
    assert mailer.command == "/usr/sbin/sendmail"
    assert mailer.timeout == 60
    assert repr(mailer) == "<SendmailMailer /usr/sbin/sendmail>"
    assert mailer.abort() is None


def test_sendmail_send(sendmail, caplog):
    caplog.set_level(logging.DEBUG, logger="mailoutbox.mailer")
    mailer = SendmailMailer(sendmail.path)
    mailer.vote("Sender <sender@example.org>", TO, MESSAGE)
    refused = mailer.send(
        "Sender <sender@example.org>",
        ['"Doe, Jane" <jane@example.org>', "-oQ/tmp@example.org"],
        WIRE,
    )
    assert refused == {}
    assert sendmail.argv() == [
        "-i",
        "-f",
        "sender@example.org",
        "--",
        "jane@example.org",
        "-oQ/tmp@example.org",
    ]
    assert sendmail.stdin() == MESSAGE
    assert f"{sendmail.path} accepted m1@example.org (exit status 0)" in caplog.text


def test_sendmail_str_message_and_null_sender(sendmail):
    SendmailMailer(sendmail.path).send("<>", TO, "Subject: caf\u00e9\r\n\r\nbody\r\n")
    assert sendmail.argv()[:3] == ["-i", "-f", "<>"]
    assert sendmail.stdin() == "Subject: caf\u00e9\n\nbody\n".encode()


def test_sendmail_sender_must_not_look_like_an_option(sendmail):
    mailer = SendmailMailer(sendmail.path)
    with pytest.raises(ValueError, match="must not start with '-'"):
        mailer.vote("-bv@example.org", TO, MESSAGE)
    with pytest.raises(ValueError, match="must not start with '-'"):
        mailer.send("-bv@example.org", TO, MESSAGE)
    with pytest.raises(TypeError):
        mailer.send(SENDER, "jane@example.org", MESSAGE)
    with pytest.raises(PermanentMailError):
        mailer.send(SENDER, ["jane@example.org\n-X/tmp/log"], MESSAGE)
    assert not sendmail.ran()


@pytest.mark.parametrize("status", [71, 74, 75])
def test_sendmail_temporary_failure(sendmail, status):
    sendmail.behave(status, "sendmail: queue busy\n")
    with pytest.raises(TransientMailError) as info:
        SendmailMailer(sendmail.path).send(SENDER, TO, MESSAGE)
    assert type(info.value) is TransientMailError
    assert f"exited with status {status}" in str(info.value)
    assert str(info.value).endswith(": sendmail: queue busy")


@pytest.mark.parametrize("status", [1, 67, 69, 78])
def test_sendmail_permanent_failure(sendmail, status):
    sendmail.behave(status, "sendmail: fatal: bad address\nsecond line\n")
    with pytest.raises(PermanentMailError) as info:
        SendmailMailer(sendmail.path).send(SENDER, TO, MESSAGE)
    assert str(info.value).startswith(f"{sendmail.path} exited with status {status}")
    assert str(info.value).endswith(": sendmail: fatal: bad address | second line")


def test_sendmail_killed_by_a_signal(sendmail):
    sendmail.behave("kill")
    with pytest.raises(TransientMailError, match="killed by signal 9"):
        SendmailMailer(sendmail.path).send(SENDER, TO, MESSAGE)


def test_sendmail_timeout(sendmail):
    sendmail.behave("sleep")
    started = time.monotonic()
    with pytest.raises(MailTimeoutError, match=r"did not finish within 0\.5s"):
        SendmailMailer(sendmail.path, timeout=0.5).send(SENDER, TO, MESSAGE)
    assert time.monotonic() - started < 5


def test_sendmail_missing_or_not_executable(sendmail, tmp_path):
    missing = SendmailMailer(str(tmp_path / "no-such-sendmail"))
    with pytest.raises(MailConnectionError, match="is not an executable file"):
        missing.vote(SENDER, TO, MESSAGE)
    with pytest.raises(MailConnectionError, match=r"cannot run .*No such file"):
        missing.send(SENDER, TO, MESSAGE)
    os.chmod(sendmail.path, 0o644)
    with pytest.raises(MailConnectionError, match="is not an executable file"):
        SendmailMailer(sendmail.path).vote(SENDER, TO, MESSAGE)
    with pytest.raises(MailConnectionError, match="is not an executable file"):
        SendmailMailer(str(tmp_path)).vote(SENDER, TO, MESSAGE)
    # A bare name is looked up on PATH.
    SendmailMailer("sh").vote(SENDER, TO, MESSAGE)
