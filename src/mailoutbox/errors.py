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
from collections.abc import Mapping


__all__ = [
    "MailAuthenticationError",
    "MailConnectionError",
    "MailError",
    "MailTimeoutError",
    "MailTLSError",
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


class MailTLSError(TransientMailError):
    """TLS was required but not available, or the handshake or the
    certificate verification failed.

    Transient: it is a matter of configuration on one side or the other,
    and the queue keeps the messages until it is fixed (or they expire).
    """


class MailAuthenticationError(TransientMailError):
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
        super().__init__(
            "all recipients refused (%s)"
            % ", ".join(f"{addr}: {code}" for addr, (code, _t) in refused.items()),
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


def _decode(text: bytes | str) -> str:
    if isinstance(text, bytes):
        return text.decode("utf-8", "replace")
    return str(text)


def classify(exc: BaseException) -> MailError:
    """Return the :class:`MailError` that *exc* amounts to.

    A :class:`MailError` is returned unchanged.  SMTP replies are classified
    by their code (5xx permanent, everything else transient); connection
    problems and timeouts are transient; anything unexpected is transient
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
        error = MailConnectionError(f"connection closed by the server: {exc}")
    elif isinstance(exc, smtplib.SMTPResponseException):
        code = exc.smtp_code
        kind = PermanentMailError if is_permanent_code(code) else TransientMailError
        if isinstance(exc, smtplib.SMTPAuthenticationError):
            kind = MailAuthenticationError
        error = kind("SMTP error", code=code, text=_decode(exc.smtp_error))
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
