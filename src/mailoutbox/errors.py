"""Errors raised by mailers, and the one place that classifies failures.

Every failure to send is a :class:`MailError`.  A
:class:`TransientMailError` means "try again later" (4xx replies, refused or
dropped connections, timeouts); a :class:`PermanentMailError` means the
message will never be accepted as it is (5xx replies, every recipient refused
permanently).  :func:`classify` turns any exception raised while talking to a
server into one of them; the queue processor retries the transient ones and
fails the permanent ones, and nothing else makes that decision.

The transient errors::

    TransientMailError
        MailConnectionError (ConnectionError)
            MailConnectionRefusedError (ConnectionRefusedError)
            MailHeloError (RuntimeError)
        MailTimeoutError (TimeoutError)
        MailThrottledError
            RecipientsThrottled (RecipientsRefused)
        MailConfigurationError
            MailTLSError
                MailTLSUnavailableError (RuntimeError)
            MailAuthenticationError
                MailAuthenticationUnavailableError (RuntimeError)
                MailAuthenticationRefusedError (smtplib.SMTPAuthenticationError)
        TransientReplyError (smtplib.SMTPResponseException)
        TransientSenderRefusedError (smtplib.SMTPSenderRefused)
        TransientDataRefusedError (smtplib.SMTPDataError)

The permanent errors::

    PermanentMailError
        PermanentReplyError (smtplib.SMTPResponseException)
        PermanentSenderRefusedError (smtplib.SMTPSenderRefused)
        PermanentDataRefusedError (smtplib.SMTPDataError)

A :class:`MailConfigurationError` is a disagreement between the sender's
settings and the server (TLS, authentication) that no retry cures by
itself: the queue processor logs it as an error, and keeps the messages
until it is fixed or they expire.  A :class:`MailThrottledError` is a
server asking the sender to slow down (see :func:`is_throttling`): the
queue processor lowers the relay's rate (:mod:`mailoutbox.ratelimit`).
:class:`RecipientsRefused` is transient or permanent depending on the
replies.

The built-in classes in parentheses are those zope.sendmail raised or let
through in the same cases (its ``RuntimeError`` for "TLS not available", a
username without ESMTP and a refused HELO; smtplib's exceptions for a
reply, among them :class:`~smtplib.SMTPRecipientsRefused`, which
:class:`RecipientsRefused` also is): code that catches them keeps working.
"""
from __future__ import annotations

import re
import smtplib
import socket
import ssl
import subprocess
from collections.abc import Mapping

__all__ = [
    "TEMPORARY_EXIT_STATUSES",
    "MailAuthenticationError",
    "MailAuthenticationRefusedError",
    "MailAuthenticationUnavailableError",
    "MailConfigurationError",
    "MailConnectionError",
    "MailConnectionRefusedError",
    "MailError",
    "MailHeloError",
    "MailTLSError",
    "MailTLSUnavailableError",
    "MailThrottledError",
    "MailTimeoutError",
    "PermanentDataRefusedError",
    "PermanentMailError",
    "PermanentReplyError",
    "PermanentSenderRefusedError",
    "RecipientsRefused",
    "RecipientsThrottled",
    "TransientDataRefusedError",
    "TransientMailError",
    "TransientReplyError",
    "TransientSenderRefusedError",
    "classify",
    "is_permanent_code",
    "is_throttling",
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


class MailConnectionRefusedError(MailConnectionError, ConnectionRefusedError):
    """The server refused the connection (nothing listens on the port).

    Also a :class:`ConnectionRefusedError`, which zope.sendmail let through.
    """


class MailHeloError(MailConnectionError, RuntimeError):
    """The server refused both EHLO and HELO.

    Also a :class:`RuntimeError`, which zope.sendmail raises in this case.
    """


class MailTimeoutError(TransientMailError, TimeoutError):
    """The server did not answer in time."""


class MailThrottledError(TransientMailError):
    """The server asks the sender to slow down (a throttling reply, see
    :func:`is_throttling`): too many messages or connections for now.

    .. versionadded:: 0.1
    """


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


class MailTLSUnavailableError(MailTLSError, RuntimeError):
    """TLS is required (*force_tls*) but the server does not offer STARTTLS.

    Also a :class:`RuntimeError`, which zope.sendmail raises in this case.
    """


class MailAuthenticationUnavailableError(MailAuthenticationError, RuntimeError):
    """A username is configured but the server does not offer AUTH (or does
    not speak ESMTP at all).

    Also a :class:`RuntimeError`, which zope.sendmail raises in this case.
    """


class _SMTPReply:
    """A mixin for errors that are also one of smtplib's exceptions for the
    same reply, with its attributes (``smtp_code``, ``smtp_error`` as bytes,
    ``sender``): zope.sendmail let smtplib's exceptions through, and sites
    catch them (Plone catches :class:`smtplib.SMTPException`)."""

    def __init__(self, message: str, code: int | None = None,
                 text: str | None = None, refused: Refused | None = None,
                 *, sender: str = "") -> None:
        # smtplib's constructors take other arguments: set what they set.
        Exception.__init__(self, message)
        self.code = code
        self.text = text
        self.refused = dict(refused or {})
        self.smtp_code = code
        self.smtp_error = (text or "").encode("utf-8", "replace")
        self.sender = sender


class MailAuthenticationRefusedError(
        _SMTPReply, MailAuthenticationError, smtplib.SMTPAuthenticationError):
    """The server refused the credentials (or asked for them).

    Also an :class:`smtplib.SMTPAuthenticationError`.
    """


class TransientReplyError(_SMTPReply, TransientMailError,
                          smtplib.SMTPResponseException):
    """A 4xx reply.  Also an :class:`smtplib.SMTPResponseException`."""


class PermanentReplyError(_SMTPReply, PermanentMailError,
                          smtplib.SMTPResponseException):
    """A 5xx reply.  Also an :class:`smtplib.SMTPResponseException`."""


class TransientSenderRefusedError(_SMTPReply, TransientMailError,
                                  smtplib.SMTPSenderRefused):
    """MAIL FROM got a 4xx reply.  Also an :class:`smtplib.SMTPSenderRefused`."""


class PermanentSenderRefusedError(_SMTPReply, PermanentMailError,
                                  smtplib.SMTPSenderRefused):
    """MAIL FROM got a 5xx reply.  Also an :class:`smtplib.SMTPSenderRefused`."""


class TransientDataRefusedError(_SMTPReply, TransientMailError,
                                smtplib.SMTPDataError):
    """DATA or the end of the data got a 4xx reply.  Also an
    :class:`smtplib.SMTPDataError`."""


class PermanentDataRefusedError(_SMTPReply, PermanentMailError,
                                smtplib.SMTPDataError):
    """DATA or the end of the data got a 5xx reply.  Also an
    :class:`smtplib.SMTPDataError`."""


#: The classes of the errors for a reply, by smtplib's class and whether
#: the reply is permanent.
_REPLY_CLASSES: dict[tuple[type, bool], type[MailError]] = {
    (smtplib.SMTPResponseException, False): TransientReplyError,
    (smtplib.SMTPResponseException, True): PermanentReplyError,
    (smtplib.SMTPSenderRefused, False): TransientSenderRefusedError,
    (smtplib.SMTPSenderRefused, True): PermanentSenderRefusedError,
    (smtplib.SMTPDataError, False): TransientDataRefusedError,
    (smtplib.SMTPDataError, True): PermanentDataRefusedError,
}


class RecipientsRefused(MailError, smtplib.SMTPRecipientsRefused):
    """Every recipient was refused.

    Permanent when every refusal was a 5xx reply, transient otherwise (for
    example, greylisting with 450/451).

    Also an :class:`smtplib.SMTPRecipientsRefused`, which zope.sendmail let
    through: its :attr:`recipients` maps each refused address to
    ``(code, text as bytes)`` as smtplib's does, while :attr:`refused` has
    the text as ``str``.
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
        # smtplib.SMTPRecipientsRefused.__init__ (reached through the MRO)
        # took the message for the recipients.
        self.recipients = {
            addr: (code, text.encode("utf-8"))
            for addr, (code, text) in self.refused.items()
        }
        self.permanent = bool(codes) and all(is_permanent_code(c) for c in codes)

    def __str__(self) -> str:
        return str(self.args[0])


class RecipientsThrottled(RecipientsRefused, MailThrottledError):
    """Every recipient was refused with a throttling reply (such as
    Postfix's "450 4.7.1 Error: too many recipients from ...").

    .. versionadded:: 0.1
    """


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

# What the failed command was, for the smtplib errors that say which;
# "{server}" is replaced by the server's host:port, or "the server".
_SMTP_WHAT = {
    smtplib.SMTPConnectError: "connection refused by {server}",
    smtplib.SMTPHeloError: "HELO/EHLO refused by {server}",
    smtplib.SMTPAuthenticationError: "authentication failed at {server}",
    smtplib.SMTPDataError: "message refused",
}

# Replies about the client's configuration rather than the message: RFC
# 3207's "530 Must issue a STARTTLS command first", RFC 4954's 530
# (authentication required), 534 (mechanism too weak), 535 (credentials
# invalid) and 538 (encryption required for the mechanism), and the
# enhanced status codes of RFC 4954/5248 that say the same whatever the
# reply code; 5.7.57 is Microsoft's "client not authenticated".  A policy
# refusal such as "550 5.7.1 relaying denied" is none of these.
_AUTH_CODES = frozenset({530, 534, 535})
_TLS_CODES = frozenset({538})
_AUTH_STATUSES = frozenset({"7.8", "7.9", "7.57"})
_TLS_STATUSES = frozenset({"7.10", "7.11"})
_STATUS = re.compile(r"\s*[245]\.(\d{1,3}\.\d{1,3})\b")
_MENTIONS_TLS = re.compile(r"STARTTLS|\bTLS\b|\bSSL\b|encrypt", re.IGNORECASE)


# Throttling replies (see is_throttling), as providers and MTAs word them:
# Amazon SES "454 Throttling failure: Maximum sending rate exceeded" and
# "... Daily message quota exceeded"; Postfix's anvil "421 4.7.0 Error: too
# many connections from ...", "450 4.7.1 Error: too much mail from ..." and
# "... too many recipients from ..."; Gmail "421 4.7.0 Try again later,
# closing connection"; Microsoft 365 "432 4.3.2 ... sender thread limit
# exceeded" and "451 4.7.500 Server busy. Please try again later".
_THROTTLING = re.compile(
    r"rate[ -]?limit|throttl|slow(ing)? down|too much mail"
    r"|too many (messages|mails?|e-?mails|connections|concurrent|sessions"
    r"|requests|deliveries|transactions)"
    r"|(sending|message|submission) (rate|quota)"
    r"|(thread|connection|session|concurrency|sending|submission) limit",
    re.IGNORECASE,
)
# Words that mean throttling in a policy reply (enhanced status 4.7.x) only:
# elsewhere "try again later" is any temporary failure.
_THROTTLING_IF_POLICY = re.compile(
    r"too many|try (it )?(again )?later|retry later|come back later|busy",
    re.IGNORECASE,
)
_GREYLISTING = re.compile(r"gr[ae]y[ -]?list", re.IGNORECASE)


def is_throttling(code: int, text: str) -> bool:
    """Whether the SMTP reply *code* *text* asks the sender to slow down.

    It must be a 4xx reply that is not about greylisting, nor about one
    mailbox or one message (enhanced status 4.2.x, such as a full mailbox,
    or 4.5.x, such as "452 4.5.3 too many recipients" for one message);
    and its text must say "rate limit", "throttl...", "slow down", "too
    much mail", "too many messages" (or mails, connections, sessions,
    requests...), "sending rate", "message quota", "thread limit" (or
    connection, session, sending... limit), or, with an enhanced status of
    4.7.x (a policy), "too many", "try again later", "retry later" or
    "busy".  Case does not matter.

    .. versionadded:: 0.1
    """
    if not 400 <= code <= 499 or _GREYLISTING.search(text):
        return False
    match = _STATUS.match(text)
    status = match.group(1) if match else ""
    if status.startswith(("2.", "5.")):
        return False
    return bool(_THROTTLING.search(text)) or (
        status.startswith("7.") and bool(_THROTTLING_IF_POLICY.search(text))
    )


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


def _configuration_error(
    code: int, text: str, server: str
) -> MailConfigurationError | None:
    # The error for a reply about the configuration, or None.
    match = _STATUS.match(text)
    status = match.group(1) if match else ""
    if (
        code in _TLS_CODES
        or status in _TLS_STATUSES
        or (code == 530 and _MENTIONS_TLS.search(text))
    ):
        return MailTLSError(
            f"{server} requires TLS; check the TLS settings (no_tls)",
            code=code,
            text=text,
        )
    if code == 535 or status == "7.8":
        what = f"authentication failed at {server}; check the username and password"
    elif code == 534 or status == "7.9":
        what = f"{server} refuses the authentication mechanism as too weak"
    elif code in _AUTH_CODES or status in _AUTH_STATUSES:
        what = f"{server} requires authentication; configure a username and password"
    else:
        return None
    return MailAuthenticationRefusedError(what, code=code, text=text)


def _reply_error(exc: smtplib.SMTPResponseException, server: str) -> MailError:
    code = exc.smtp_code
    text = _decode(exc.smtp_error)
    configuration = _configuration_error(code, text, server)
    if configuration is not None:
        return configuration
    if is_throttling(code, text):
        return MailThrottledError(f"throttled by {server}", code=code, text=text)
    what = _SMTP_WHAT.get(type(exc), "SMTP error").format(server=server)
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return MailAuthenticationRefusedError(what, code=code, text=text)
    if isinstance(exc, smtplib.SMTPHeloError):
        # A refused greeting or HELO says nothing about the message.
        return MailHeloError(what, code=code, text=text)
    if isinstance(exc, smtplib.SMTPConnectError):
        return MailConnectionError(what, code=code, text=text)
    permanent = is_permanent_code(code)
    if isinstance(exc, smtplib.SMTPSenderRefused):
        sender = _decode(exc.sender)
        return _REPLY_CLASSES[smtplib.SMTPSenderRefused, permanent](
            f"sender <{sender}> refused", code=code, text=text, sender=sender)
    family = (smtplib.SMTPDataError if isinstance(exc, smtplib.SMTPDataError)
              else smtplib.SMTPResponseException)
    return _REPLY_CLASSES[family, permanent](what, code=code, text=text)


def _refusals_error(exc: smtplib.SMTPRecipientsRefused, server: str) -> MailError:
    refused = {
        _decode(addr): (code, _decode(text))
        for addr, (code, text) in exc.recipients.items()
    }
    errors = [_configuration_error(c, t, server) for c, t in refused.values()]
    if errors and all(errors):
        # Every recipient refused because of TLS or authentication.
        return errors[0]  # type: ignore[return-value]
    if refused and all(is_throttling(c, t) for c, t in refused.values()):
        return RecipientsThrottled(refused)
    return RecipientsRefused(refused)


def _tls_error(exc: ssl.SSLError, server: str) -> MailTLSError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return MailTLSError(
            f"the TLS certificate of {server} could not be verified: {exc}"
        )
    return MailTLSError(f"TLS failure with {server}: {exc}")


def classify(exc: BaseException, server: str | None = None) -> MailError:
    """Return the :class:`MailError` that *exc* amounts to.

    A :class:`MailError` is returned unchanged.  SMTP replies are classified
    by their code (5xx permanent, everything else transient), except that a
    refused greeting or HELO is a transient :class:`MailConnectionError`
    and a reply about the client's configuration (TLS required,
    authentication required or failed: 530, 534, 535, 538 and the matching
    enhanced status codes) is a transient :class:`MailTLSError` or
    :class:`MailAuthenticationError`; a throttling reply
    (:func:`is_throttling`) is a transient :class:`MailThrottledError`, and
    every recipient refused with one a :class:`RecipientsThrottled`;
    connection problems and timeouts are transient; the exit status of a
    sendmail-compatible program (:class:`subprocess.CalledProcessError`) is
    transient if it is in :data:`TEMPORARY_EXIT_STATUSES` or the program was
    killed by a signal, permanent otherwise; anything unexpected is transient
    too, so that no message is dropped because of a bug or a passing
    condition.  The original exception is kept as ``__cause__``.

    *server* (``"host:port"``) is named in the messages of the errors about
    the connection, TLS and the configuration.

    .. versionchanged:: 0.1
       The *server* argument.
    """
    if isinstance(exc, MailError):
        return exc
    where = server or "the server"
    error: MailError
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        error = _refusals_error(exc, where)
    elif isinstance(exc, smtplib.SMTPServerDisconnected):
        # smtplib reports a timeout while reading a reply as a disconnection.
        if isinstance(exc.__context__, TimeoutError):
            error = MailTimeoutError(f"timed out waiting for {where}: {exc}")
        else:
            error = MailConnectionError(f"connection closed by {where}: {exc}")
    elif isinstance(exc, smtplib.SMTPResponseException):
        error = _reply_error(exc, where)
    elif isinstance(exc, subprocess.CalledProcessError):
        error = _exit_error(exc)
    elif isinstance(exc, subprocess.TimeoutExpired):
        error = MailTimeoutError(
            f"{_program(exc.cmd)} did not finish within {exc.timeout:g}s"
        )
    elif isinstance(exc, (socket.timeout, TimeoutError)):
        error = MailTimeoutError(f"timed out waiting for {where}: {exc}")
    elif isinstance(exc, ssl.SSLError):
        error = _tls_error(exc, where)
    elif isinstance(exc, ConnectionRefusedError):
        error = MailConnectionRefusedError(f"connection refused by {where}")
    elif isinstance(exc, OSError):
        error = MailConnectionError(f"connection to {where} failed: {exc}")
    else:
        error = TransientMailError(f"unexpected error: {exc!r}")
    error.__cause__ = exc
    return error
