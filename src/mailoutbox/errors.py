"""Errors raised by mailers, and the one place that classifies failures.

Every failure to send is a :class:`MailError`.  A
:class:`TransientMailError` means "try again later" (4xx replies, refused or
dropped connections, timeouts); a :class:`PermanentMailError` means the
message will never be accepted as it is (5xx replies, every recipient refused
permanently).  :func:`classify` turns any exception raised while talking to a
server into one of them; the queue processor retries the transient ones and
fails the permanent ones, and nothing else makes that decision.
"""
from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess
from collections.abc import Mapping

__all__ = [
    "TEMPORARY_EXIT_STATUSES",
    "MailAuthenticationError",
    "MailConfigurationError",
    "MailConnectionError",
    "MailError",
    "MailTLSError",
    "MailTimeoutError",
    "PermanentMailError",
    "RecipientsRefused",
    "TransientMailError",
    "classify",
    "is_permanent_code",
]

Refused = Mapping[str, tuple[int, str]]


class MailError(Exception):
    """A message could not be sent.

    *code* and *text* are the SMTP reply that caused the failure, when there
    was one; *refused* maps refused recipients to their ``(code, text)``.
    """

    permanent = False

    def __init__(
        self,
        message: str,
        code: int | None = None,
        text: str | None = None,
        refused: Refused | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.text = text
        self.refused = dict(refused or {})

    def __str__(self) -> str:
        message = str(self.args[0]) if self.args else ""
        if self.code is not None:
            return f"{message}: {self.code} {self.text or ''}".rstrip()
        return message


class TransientMailError(MailError):
    """Sending may succeed later; the message stays queued."""

    permanent = False


class PermanentMailError(MailError):
    """Sending will not succeed; the message is moved to the failed area."""

    permanent = True


class MailConnectionError(TransientMailError, ConnectionError):
    """The server could not be reached, or closed the connection."""


class MailTimeoutError(TransientMailError, TimeoutError):
    """The server did not answer in time."""


class MailConfigurationError(TransientMailError):
    """The sender's configuration and the server disagree (TLS,
    authentication): no message can be sent until one of them is fixed.

    Transient, so that the queue keeps the messages until the configuration
    is fixed (or they expire); the queue processor logs these as errors
    naming the problem.
    """


class MailTLSError(MailConfigurationError):
    """TLS was required but not available, or the handshake or the
    certificate verification failed.

    Transient: it is a matter of configuration on one side or the other,
    and the queue keeps the messages until it is fixed (or they expire).
    """


class MailAuthenticationError(MailConfigurationError):
    """Credentials are configured but authentication failed or is not
    offered by the server.

    Transient for the same reason as :class:`MailTLSError`.
    """


class RecipientsRefused(MailError):
    """Every recipient was refused.

    Permanent when every refusal was a 5xx reply, transient otherwise (for
    example, greylisting with 450/451).
    """

    def __init__(self, refused: Refused) -> None:
        codes = sorted({code for code, _text in refused.values()})
        listed = ", ".join(f"{addr}: {code}" for addr, (code, _t) in refused.items())
        super().__init__(
            f"all recipients refused ({listed})",
            code=codes[-1] if codes else None,
            text=None,
            refused=refused,
        )
        self.permanent = bool(codes) and all(is_permanent_code(c) for c in codes)

    def __str__(self) -> str:
        return str(self.args[0])


def is_permanent_code(code: int) -> bool:
    """Whether an SMTP reply *code* is a permanent failure (5xx)."""
    return 500 <= code <= 599


#: Exit statuses of a sendmail-compatible program that mean "try again
#: later": EX_OSERR (71), EX_IOERR (74) and EX_TEMPFAIL (75), as in
#: sendmail's own table.  Every other non-zero status, EX_UNAVAILABLE (69)
#: included, is permanent; death by a signal is transient.
TEMPORARY_EXIT_STATUSES = frozenset({71, 74, 75})

_EXIT_NAMES = {
    64: "EX_USAGE",
    65: "EX_DATAERR",
    66: "EX_NOINPUT",
    67: "EX_NOUSER",
    68: "EX_NOHOST",
    69: "EX_UNAVAILABLE",
    70: "EX_SOFTWARE",
    71: "EX_OSERR",
    72: "EX_OSFILE",
    73: "EX_CANTCREAT",
    74: "EX_IOERR",
    75: "EX_TEMPFAIL",
    76: "EX_PROTOCOL",
    77: "EX_NOPERM",
    78: "EX_CONFIG",
}

# What the failed command was, for the smtplib errors that say which.
_SMTP_WHAT = {
    smtplib.SMTPConnectError: "connection refused by the server",
    smtplib.SMTPHeloError: "HELO/EHLO refused",
    smtplib.SMTPAuthenticationError: "authentication failed",
    smtplib.SMTPDataError: "message refused",
}


def _decode(text: bytes | str) -> str:
    if isinstance(text, bytes):
        return text.decode("utf-8", "replace")
    return str(text)


def _program(cmd: object) -> str:
    if isinstance(cmd, (list, tuple)) and cmd:
        return str(cmd[0])
    return str(cmd)


def _exit_error(exc: subprocess.CalledProcessError) -> MailError:
    status = exc.returncode
    if status < 0:
        how = f"was killed by signal {-status}"
    else:
        how = f"exited with status {status}"
        if status in _EXIT_NAMES:
            how += f" ({_EXIT_NAMES[status]})"
    message = f"{_program(exc.cmd)} {how}"
    lines = _decode(exc.stderr or b"").strip().splitlines()[:5]
    if lines:
        message += ": " + " | ".join(line.strip() for line in lines)[:500]
    temporary = status < 0 or status in TEMPORARY_EXIT_STATUSES
    return (TransientMailError if temporary else PermanentMailError)(message)


def classify(exc: BaseException) -> MailError:
    """Return the :class:`MailError` that *exc* amounts to.

    A :class:`MailError` is returned unchanged.  SMTP replies are classified
    by their code (5xx permanent, everything else transient), except that a
    refused greeting or HELO is a transient :class:`MailConnectionError`;
    connection problems and timeouts are transient; the exit status of a
    sendmail-compatible program (:class:`subprocess.CalledProcessError`) is
    transient if it is in :data:`TEMPORARY_EXIT_STATUSES` or the program was
    killed by a signal, permanent otherwise; anything unexpected is transient
    too, so that no message is dropped because of a bug or a passing
    condition.  The original exception is kept as ``__cause__``.
    """
    if isinstance(exc, MailError):
        return exc
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        refused = {
            _decode(addr): (code, _decode(text))
            for addr, (code, text) in exc.recipients.items()
        }
        error: MailError = RecipientsRefused(refused)
    elif isinstance(exc, smtplib.SMTPServerDisconnected):
        # smtplib reports a timeout while reading a reply as a disconnection.
        if isinstance(exc.__context__, TimeoutError):
            error = MailTimeoutError(f"timed out: {exc}")
        else:
            error = MailConnectionError(f"connection closed by the server: {exc}")
    elif isinstance(exc, smtplib.SMTPResponseException):
        code = exc.smtp_code
        kind = PermanentMailError if is_permanent_code(code) else TransientMailError
        what = _SMTP_WHAT.get(type(exc), "SMTP error")
        if isinstance(exc, smtplib.SMTPAuthenticationError):
            kind = MailAuthenticationError
        elif isinstance(exc, (smtplib.SMTPConnectError, smtplib.SMTPHeloError)):
            # A refused greeting or HELO says nothing about the message.
            kind = MailConnectionError
        elif isinstance(exc, smtplib.SMTPSenderRefused):
            what = f"sender <{_decode(exc.sender)}> refused"
        error = kind(what, code=code, text=_decode(exc.smtp_error))
    elif isinstance(exc, subprocess.CalledProcessError):
        error = _exit_error(exc)
    elif isinstance(exc, subprocess.TimeoutExpired):
        error = MailTimeoutError(
            f"{_program(exc.cmd)} did not finish within {exc.timeout:g}s"
        )
    elif isinstance(exc, (socket.timeout, TimeoutError)):
        error = MailTimeoutError(f"timed out: {exc}")
    elif isinstance(exc, ssl.SSLError):
        error = MailTLSError(f"TLS failure: {exc}")
    elif isinstance(exc, (ConnectionError, OSError)):
        error = MailConnectionError(f"connection failure: {exc}")
    else:
        error = TransientMailError(f"unexpected error: {exc!r}")
    error.__cause__ = exc
    return error
