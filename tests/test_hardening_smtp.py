"""Hardening of the SMTP mailer and its errors, against real peers.

Servers: aiosmtpd (:class:`mailoutbox.testing.smtpd.SMTPServer`) for normal
exchanges, and :class:`Trickler`, a scripted TCP peer in a thread, for the
hostile behaviour aiosmtpd cannot produce (replies that never end, data
read very slowly).
"""

from __future__ import annotations

import threading

from mailoutbox import errors
from mailoutbox.errors import MailAuthenticationError
from mailoutbox.errors import MailConfigurationError
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
        assert mailer._current() is None
        mailer.close_connection()  # no connection: nothing to do
        assert server.commands.count("QUIT") == 1
        mailer.send(SENDER, TO, message(3))  # a new connection
        assert server.connections == 3
        mailer.close()
        assert len(server.messages) == 3
