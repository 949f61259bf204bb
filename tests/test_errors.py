"""Tests of mailoutbox.errors: the exception hierarchy and classify()."""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess

import pytest

from mailoutbox import errors
from mailoutbox.errors import MailAuthenticationError
from mailoutbox.errors import MailAuthenticationRefusedError
from mailoutbox.errors import MailConnectionError
from mailoutbox.errors import MailConnectionRefusedError
from mailoutbox.errors import MailError
from mailoutbox.errors import MailHeloError
from mailoutbox.errors import MailTimeoutError
from mailoutbox.errors import MailTLSError
from mailoutbox.errors import PermanentDataRefusedError
from mailoutbox.errors import PermanentMailError
from mailoutbox.errors import PermanentReplyError
from mailoutbox.errors import PermanentSenderRefusedError
from mailoutbox.errors import RecipientsRefused
from mailoutbox.errors import TransientMailError
from mailoutbox.errors import TransientReplyError
from mailoutbox.errors import TransientSenderRefusedError
from mailoutbox.errors import classify


def test_all_names_exist():
    assert sorted(errors.__all__) == sorted(set(errors.__all__))
    for name in errors.__all__:
        assert hasattr(errors, name), name


def test_str_with_and_without_reply():
    assert str(MailError("failed")) == "failed"
    assert str(MailError("failed", 550, "5.1.1 no")) == "failed: 550 5.1.1 no"
    assert str(MailError("failed", 421)) == "failed: 421"
    error = MailError("failed")
    error.args = ()
    assert str(error) == ""


def test_transient_errors_are_also_builtin_errors():
    assert isinstance(MailConnectionError("x"), ConnectionError)
    assert isinstance(MailTimeoutError("x"), TimeoutError)
    for kind in (
        MailConnectionError,
        MailTimeoutError,
        MailTLSError,
        MailAuthenticationError,
    ):
        assert not kind("x").permanent
    assert PermanentMailError("x").permanent


@pytest.mark.parametrize(
    ("codes", "permanent", "code"),
    [
        ((550, 553), True, 553),
        ((550, 451), False, 550),
        ((450,), False, 450),
    ],
)
def test_recipients_refused(codes, permanent, code):
    refused = {f"r{i}@example.org": (c, "no") for i, c in enumerate(codes)}
    error = RecipientsRefused(refused)
    assert error.permanent is permanent
    assert error.code == code
    assert error.refused == refused
    assert str(error).startswith("all recipients refused (r0@example.org: ")


def test_recipients_refused_without_recipients_is_transient():
    error = RecipientsRefused({})
    assert not error.permanent
    assert error.code is None


def test_is_permanent_code():
    assert errors.is_permanent_code(500)
    assert errors.is_permanent_code(599)
    assert not errors.is_permanent_code(421)
    assert not errors.is_permanent_code(250)
    assert not errors.is_permanent_code(600)


def test_classify_keeps_mail_errors():
    error = PermanentMailError("x")
    assert classify(error) is error


def test_classify_recipients_refused_decodes():
    exc = smtplib.SMTPRecipientsRefused({"a@example.org": (550, b"5.1.1 unknown")})
    error = classify(exc)
    assert isinstance(error, RecipientsRefused)
    assert error.refused == {"a@example.org": (550, "5.1.1 unknown")}
    assert error.permanent
    assert error.__cause__ is exc


def _disconnected_after(cause):
    # What smtplib raises when reading a reply fails: the disconnection,
    # with the original error as its context.
    try:
        try:
            raise cause
        except OSError:
            raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")  # noqa: B904
    except smtplib.SMTPServerDisconnected as exc:
        return exc


def test_classify_disconnection():
    error = classify(smtplib.SMTPServerDisconnected("gone"))
    assert type(error) is MailConnectionError
    assert str(error) == "connection closed by the server: gone"
    error = classify(_disconnected_after(ConnectionResetError("reset")))
    assert type(error) is MailConnectionError


def test_classify_disconnection_by_timeout_is_a_timeout():
    error = classify(_disconnected_after(TimeoutError("timed out")))
    assert type(error) is MailTimeoutError


@pytest.mark.parametrize(
    ("exc", "kind", "text"),
    [
        (smtplib.SMTPResponseException(554, b"no"), PermanentReplyError, "SMTP error"),
        (smtplib.SMTPResponseException(451, "later"), TransientReplyError,
         "SMTP error"),
        (
            smtplib.SMTPAuthenticationError(535, b"5.7.8 bad credentials"),
            MailAuthenticationRefusedError,
            "authentication failed at the server; check the username and password",
        ),
        (
            smtplib.SMTPConnectError(554, b"no service"),
            MailConnectionError,
            "connection refused by the server",
        ),
        (
            smtplib.SMTPHeloError(501, b"bad"),
            MailHeloError,
            "HELO/EHLO refused by the server",
        ),
        (smtplib.SMTPDataError(554, b"spam"), PermanentDataRefusedError,
         "message refused"),
        (
            smtplib.SMTPSenderRefused(553, b"bad sender", b"s@example.org"),
            PermanentSenderRefusedError,
            "sender <s@example.org> refused",
        ),
        (
            smtplib.SMTPSenderRefused(451, b"later", "s@example.org"),
            TransientSenderRefusedError,
            "sender <s@example.org> refused",
        ),
    ],
)
def test_classify_replies(exc, kind, text):
    error = classify(exc)
    assert type(error) is kind
    if kind not in (MailConnectionError, MailHeloError):
        # Also smtplib's exception for the reply, as zope.sendmail let
        # through, with its attributes.
        assert isinstance(error, type(exc))
        assert (error.smtp_code, error.smtp_error) == (
            exc.smtp_code, exc.smtp_error if isinstance(exc.smtp_error, bytes)
            else exc.smtp_error.encode())
    assert error.code == exc.smtp_code
    assert str(error).startswith(text + ": ")
    assert error.text == (
        exc.smtp_error.decode() if isinstance(exc.smtp_error, bytes) else exc.smtp_error
    )
    assert error.__cause__ is exc


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (socket.timeout("timed out"), MailTimeoutError),  # noqa: UP041 - on purpose
        (ssl.SSLError(1, "bad record"), MailTLSError),
        (ssl.SSLCertVerificationError(1, "unknown CA"), MailTLSError),
        (ConnectionRefusedError(111, "refused"), MailConnectionRefusedError),
        (OSError(113, "no route"), MailConnectionError),
        (ValueError("a bug"), TransientMailError),
    ],
)
def test_classify_other_exceptions(exc, kind):
    error = classify(exc)
    assert type(error) is kind
    assert error.code is None
    assert error.__cause__ is exc


def _exit(status, stderr=b"", cmd=("/usr/sbin/sendmail", "-i")):
    cmd = cmd if isinstance(cmd, str) else list(cmd)
    return classify(subprocess.CalledProcessError(status, cmd, b"", stderr))


@pytest.mark.parametrize("status", sorted(errors.TEMPORARY_EXIT_STATUSES))
def test_classify_temporary_exit_status(status):
    error = _exit(status)
    assert type(error) is TransientMailError
    assert str(error).startswith(f"/usr/sbin/sendmail exited with status {status} (EX_")


@pytest.mark.parametrize(
    ("status", "name"), [(67, "EX_NOUSER"), (69, "EX_UNAVAILABLE")]
)
def test_classify_permanent_exit_status(status, name):
    error = _exit(status, b"sendmail: fatal: no such user\n")
    assert type(error) is PermanentMailError
    assert str(error) == (
        f"/usr/sbin/sendmail exited with status {status} ({name}):"
        " sendmail: fatal: no such user"
    )


def test_classify_exit_status_quotes_first_lines_of_stderr():
    stderr = "".join(f"line {i}\n" for i in range(10)).encode()
    error = _exit(1, stderr, cmd="sendmail")
    assert type(error) is PermanentMailError
    assert str(error) == (
        "sendmail exited with status 1: line 0 | line 1 | line 2 | line 3 | line 4"
    )


def test_classify_exit_status_stderr_is_shortened():
    error = _exit(75, b"x" * 2000)
    assert len(str(error)) < 600


def test_classify_death_by_signal_is_transient():
    error = _exit(-9)
    assert type(error) is TransientMailError
    assert str(error) == "/usr/sbin/sendmail was killed by signal 9"


def test_classify_subprocess_timeout():
    exc = subprocess.TimeoutExpired(["/usr/sbin/sendmail", "-i"], 2.5)
    error = classify(exc)
    assert type(error) is MailTimeoutError
    assert str(error) == "/usr/sbin/sendmail did not finish within 2.5s"


def test_reply_errors_are_smtplib_exceptions_too():
    """Products.MailHost's callers catch smtplib's exceptions (Plone catches
    SMTPException): the errors for a reply are those too."""
    refused = classify(smtplib.SMTPSenderRefused(553, b"5.7.1 no", b"a@example.org"))
    assert isinstance(refused, smtplib.SMTPSenderRefused)
    assert isinstance(refused, PermanentMailError)
    assert refused.sender == "a@example.org"
    assert refused.permanent and refused.code == 553
    data = classify(smtplib.SMTPDataError(451, b"4.3.0 later"))
    assert isinstance(data, smtplib.SMTPDataError)
    assert isinstance(data, TransientMailError) and not data.permanent
    auth = classify(smtplib.SMTPAuthenticationError(535, b"5.7.8 bad"))
    assert isinstance(auth, smtplib.SMTPAuthenticationError)
    assert isinstance(auth, MailAuthenticationError) and not auth.permanent
    for error in (refused, data, auth):
        assert isinstance(error, smtplib.SMTPException)
