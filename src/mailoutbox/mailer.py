"""Mailers: hand a message to an SMTP relay or to a local sendmail program.

:class:`SMTPMailer` keeps one SMTP connection per thread and reuses it for
consecutive messages, pipelining the envelope when the server allows it.
:class:`SendmailMailer` runs a sendmail-compatible program per message.
Both raise the classified errors of :mod:`mailoutbox.errors`.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import smtplib
import ssl
import subprocess
import threading
import weakref
from collections.abc import Sequence
from typing import NoReturn

from zope.interface import implementer

from ._pool import ConnectionPool
from ._smtp import Connection
from ._smtp import encode_data
from ._smtp import envelope_address
from .errors import MailAuthenticationError
from .errors import MailAuthenticationUnavailableError
from .errors import MailConnectionError
from .errors import MailThrottledError
from .errors import MailTLSError
from .errors import MailTLSUnavailableError
from .errors import PermanentMailError
from .errors import classify
from .interfaces import ISendmailMailer
from .interfaces import ISMTPMailer
from .ratelimit import check_max_connections
from .ratelimit import check_rate

__all__ = ["SMTPMailer", "SendmailMailer"]

log = logging.getLogger(__name__)

Refused = dict[str, tuple[int, str]]

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID = re.compile(rb"^Message-Id:\s*<?([^>\s]+)", re.IGNORECASE | re.MULTILINE)


class _MessageId:
    """The Message-Id of wire-encoded data, found only if a log line that
    names it is emitted."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __str__(self) -> str:
        header = _HEADER_END.split(self.data, 1)[0]
        match = _MESSAGE_ID.search(header)
        return match.group(1).decode("ascii", "replace") if match else "(no Message-Id)"


def _envelope(fromaddr: str, toaddrs: Sequence[str]) -> tuple[str, list[str]]:
    if isinstance(toaddrs, (str, bytes)):
        raise TypeError("toaddrs must be a sequence of addresses, not one string")
    sender = envelope_address(fromaddr, sender=True)
    recipients = [envelope_address(address) for address in toaddrs]
    if not recipients:
        raise PermanentMailError("no recipients")
    return sender, recipients


def _reraise(exc: Exception, server: str | None = None) -> NoReturn:
    error = classify(exc, server)
    if error is exc:
        raise exc
    raise error from exc


def _port(port: object) -> int:
    if isinstance(port, str) and port.strip().isdecimal():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be a whole number from 1 to 65535, not {port!r}")
    return port


def _timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
        if 0 < seconds < math.inf:  # also false for NaN
            return seconds
    raise ValueError(
        f"timeout must be a positive, finite number of seconds or None, not {timeout!r}"
    )


@implementer(ISMTPMailer)
class SMTPMailer:
    """See :class:`mailoutbox.interfaces.ISMTPMailer`.

    One connection is kept per thread.  :meth:`vote` opens (or checks) the
    calling thread's connection; :meth:`send` uses it, opening one if
    needed, and leaves it open for the next message; :meth:`abort` and
    :meth:`close_connection` close it; :meth:`close` closes the idle
    connections of all threads at once and the others as soon as their
    threads are done with them, so it may be called at any time.  The
    connections still open when the mailer is garbage-collected, or when
    the interpreter exits, are closed the same way.  A connection the server
    dropped while idle is replaced transparently, once, as long as nothing
    of the new message was accepted; nothing is retried after the end of the
    data was sent, since that could deliver a message twice.
    """

    #: The class of the SMTP sessions (a :class:`smtplib.SMTP` subclass).
    connection_class = Connection

    _NO_SMTP = (
        "'smtp' is zope.sendmail's SMTP factory, which mailoutbox's SMTPMailer"
        " does not use: set connection_class to a subclass of its class instead"
    )

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "smtp" in vars(cls):
            raise TypeError(f"{cls.__qualname__} sets {cls._NO_SMTP}")

    @property
    def smtp(self) -> type[smtplib.SMTP]:
        """zope.sendmail's attribute, read-only: the protocol the
        connections speak, :class:`smtplib.SMTP_SSL` with *implicit_tls*,
        :class:`smtplib.SMTP` otherwise (Products.MailHost's tests read it).
        It is not a seam here: setting it, on a subclass or an instance,
        raises :class:`TypeError`; :attr:`connection_class` is the seam of
        this mailer."""
        return smtplib.SMTP_SSL if self.implicit_tls else smtplib.SMTP

    @smtp.setter
    def smtp(self, factory: object) -> None:
        raise TypeError(f"cannot set {self._NO_SMTP}")

    def __init__(
        self,
        hostname: str = "localhost",
        port: int = 25,
        username: str | None = None,
        password: str | None = None,
        no_tls: bool = False,
        force_tls: bool = False,
        implicit_tls: bool = False,
        timeout: float | None = 10,
        *,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | None = None,
        local_hostname: str | None = None,
        rate: float | None = None,
        max_connections: int | None = None,
    ) -> None:
        if no_tls and force_tls and not implicit_tls:
            raise ValueError("no_tls and force_tls cannot both be set")
        self.hostname = hostname
        self.port = _port(port)
        self.username = username
        self.password = password
        self.no_tls = no_tls
        self.force_tls = force_tls
        self.implicit_tls = implicit_tls
        self.timeout = _timeout(timeout)
        self.ca_file = ca_file
        self.local_hostname = local_hostname
        self.rate = rate
        self.max_connections = max_connections
        self._ehlo_name = local_hostname  # looked up once, by the first connection
        self._ssl_context = ssl_context
        self._local = threading.local()
        self._pool = ConnectionPool()
        weakref.finalize(self, self._pool.close)

    def __repr__(self) -> str:
        user = f" user={self.username!r}" if self.username else ""
        return f"<{type(self).__name__} {self.hostname}:{self.port}{user}>"

    @property
    def rate(self) -> float | None:
        """See :attr:`mailoutbox.interfaces.ISMTPMailer.rate`; setting it
        checks the value (:class:`ValueError`, :class:`TypeError`)."""
        return self._rate

    @rate.setter
    def rate(self, value: float | None) -> None:
        self._rate = check_rate(value)

    @property
    def max_connections(self) -> int | None:
        """See :attr:`mailoutbox.interfaces.ISMTPMailer.max_connections`;
        setting it checks the value."""
        return self._max_connections

    @max_connections.setter
    def max_connections(self, value: int | None) -> None:
        self._max_connections = check_max_connections(value)

    @property
    def _server(self) -> str:
        return f"{self.hostname}:{self.port}"

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The context for STARTTLS and implicit TLS; by default one that
        verifies certificates and host names against the system's
        authorities, or *ca_file*'s."""
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context(cafile=self.ca_file)
        return self._ssl_context

    @ssl_context.setter
    def ssl_context(self, context: ssl.SSLContext | None) -> None:
        self._ssl_context = context

    # -- IMailer -----------------------------------------------------------

    def vote(self, fromaddr: str, toaddrs: Sequence[str], message: bytes) -> None:
        """See :class:`mailoutbox.interfaces.IMailer`."""
        sender, recipients = _envelope(fromaddr, toaddrs)
        try:
            connection = self._acquire()
            if connection is not None:
                try:
                    connection.ping()
                except (
                    smtplib.SMTPServerDisconnected,
                    smtplib.SMTPResponseException,
                ) as exc:
                    if not self._dropped_while_idle(connection, exc):
                        raise
                    self._forget(connection)
                    connection = None
            if connection is None:
                connection = self._connect()
            self._check_smtputf8(connection, sender, recipients)
        except Exception as exc:
            _reraise(exc, self._server)
        finally:
            self._release()

    def send(
        self, fromaddr: str, toaddrs: Sequence[str], message: bytes | str
    ) -> Refused:
        """See :class:`mailoutbox.interfaces.IMailer`."""
        sender, recipients = _envelope(fromaddr, toaddrs)
        data = encode_data(message)
        try:
            connection = self._acquire()
            reused = connection is not None
            if connection is None:
                connection = self._connect()
            try:
                refused = self._transaction(connection, sender, recipients, data)
            except (
                smtplib.SMTPServerDisconnected,
                smtplib.SMTPResponseException,
            ) as exc:
                if not (reused and self._dropped_while_idle(connection, exc)):
                    raise
                log.info(
                    "%s closed the idle connection (%s); reconnecting to send %s",
                    self._server,
                    exc,
                    _MessageId(data),
                )
                self._forget(connection)
                refused = self._transaction(self._connect(), sender, recipients, data)
        except Exception as exc:
            _reraise(exc, self._server)
        finally:
            self._release()
        if refused:
            log.info("sent %s; refused recipients: %s", _MessageId(data), refused)
        else:
            log.debug("sent %s to %d recipient(s)", _MessageId(data), len(recipients))
        return refused

    def abort(self) -> None:
        """See :class:`mailoutbox.interfaces.IMailer`."""
        connection = self._acquire()
        if connection is not None:
            connection.quit_quietly()
            self._forget(connection)

    def close_connection(self) -> None:
        """See :class:`mailoutbox.interfaces.ISMTPMailer`."""
        self.abort()

    def close(self) -> None:
        """See :class:`mailoutbox.interfaces.ISMTPMailer`."""
        self._pool.close()

    # -- connections -------------------------------------------------------

    def _acquire(self) -> Connection | None:
        # The calling thread's connection, now busy, or None.
        connection = getattr(self._local, "connection", None)
        if connection is None:
            return None
        if not self._pool.take(connection):
            # Closed by close() in another thread: that thread QUITs it.
            self._local.connection = None
            return None
        return connection

    def _release(self) -> None:
        # The calling thread is done with its connection for now.
        connection = getattr(self._local, "connection", None)
        if connection is None:
            return
        if connection.sock is None:
            self._forget(connection)
        elif self._pool.release(connection):
            self._local.connection = None
            connection.quit_quietly()

    def _forget(self, connection: Connection) -> None:
        self._pool.remove(connection)
        self._local.connection = None
        connection.close()

    def _connect(self) -> Connection:
        self._pool.reap()
        log.debug("connecting to %s", self._server)
        try:
            connection = self.connection_class(
                self.hostname,
                self.port,
                local_hostname=self.local_hostname or self._ehlo_name,
                timeout=self.timeout,
                implicit_context=self.ssl_context if self.implicit_tls else None,
            )
        except ssl.SSLError as exc:
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise
            raise MailTLSError(
                f"TLS handshake with {self._server} failed ({exc}); implicit_tls"
                " is set: does the server speak TLS from the start on this port"
                " (SMTPS, usually 465), or plain SMTP with STARTTLS?"
            ) from exc
        try:
            self._handshake(connection)
        except BaseException:
            connection.close()
            raise
        self._ehlo_name = connection.local_hostname
        self._pool.add(connection)
        self._local.connection = connection
        log.debug(
            "connected to %s (TLS: %s, ESMTP: %s, PIPELINING: %s)",
            self._server,
            connection.tls,
            connection.does_esmtp,
            connection.has_extn("pipelining"),
        )
        return connection

    def _handshake(self, connection: Connection) -> None:
        connection.ehlo_or_helo_if_needed()
        if not (self.implicit_tls or self.no_tls):
            if connection.has_extn("starttls"):
                self._starttls(connection)
            elif self.force_tls:
                raise MailTLSUnavailableError(
                    f"{self._server} does not offer STARTTLS,"
                    " and force_tls forbids sending without TLS"
                )
        if self.username:
            self._login(connection)

    def _starttls(self, connection: Connection) -> None:
        try:
            connection.starttls(context=self.ssl_context)
        except smtplib.SMTPResponseException as exc:
            raise MailTLSError(
                f"STARTTLS refused by {self._server}",
                exc.smtp_code,
                exc.smtp_error.decode("utf-8", "replace"),
            ) from exc
        except ssl.SSLError as exc:
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise
            raise MailTLSError(
                f"TLS handshake with {self._server} after STARTTLS failed: {exc}"
            ) from exc
        connection.tls = True
        connection.ehlo_or_helo_if_needed()

    def _login(self, connection: Connection) -> None:
        if not connection.has_extn("auth"):
            raise MailAuthenticationUnavailableError(
                f"a username is configured, but {self._server}"
                " does not offer AUTH"
                + ("" if connection.does_esmtp else " (it does not speak ESMTP)")
                + ("" if connection.tls or self.no_tls else " (without TLS)")
            )
        problem = None
        try:
            connection.login(self.username, self.password or "")
        except UnicodeError:
            # Raised outside this block, so that no traceback shows the
            # encoding error, which quotes the password.
            problem = "the user name and password must be ASCII"
        except smtplib.SMTPException as exc:
            if type(exc) is not smtplib.SMTPException:
                raise
            problem = f"no AUTH mechanism in common with {self._server}"
        if problem is not None:
            raise MailAuthenticationError(problem)
        log.debug("authenticated to %s as %s", self._server, self.username)

    def _check_smtputf8(
        self, connection: Connection, sender: str, recipients: list[str]
    ) -> bool:
        if sender.isascii() and all(address.isascii() for address in recipients):
            return False
        if not connection.has_extn("smtputf8"):
            raise PermanentMailError(
                "the envelope has non-ASCII addresses, but"
                f" {self._server} does not offer SMTPUTF8"
            )
        return True

    def _transaction(
        self, connection: Connection, sender: str, recipients: list[str], data: bytes
    ) -> Refused:
        smtputf8 = self._check_smtputf8(connection, sender, recipients)
        return connection.transaction(sender, recipients, data, smtputf8)

    @staticmethod
    def _dropped_while_idle(connection: Connection, exc: Exception) -> bool:
        # Before the server said yes to anything in this exchange, and the
        # connection was closed (not timed out) or the server said 421 --
        # not to throttle the client, which a new connection would defy.
        if connection.stage != "start" or isinstance(
            error := classify(exc), MailThrottledError
        ):
            return False
        return error.code == 421 or isinstance(error, MailConnectionError)


@implementer(ISendmailMailer)
class SendmailMailer:
    """See :class:`mailoutbox.interfaces.ISendmailMailer`.

    The message goes to the program's standard input with LF line ends (the
    local convention; the program converts them for SMTP).  A null sender
    is passed as ``-f <>``.  The exit status is classified by
    :func:`mailoutbox.errors.classify`: EX_OSERR (71), EX_IOERR (74),
    EX_TEMPFAIL (75) and death by a signal are transient, any other
    non-zero status is permanent; the error names the status and quotes the
    first lines the program wrote to its standard error.  A program that
    runs longer than *timeout* seconds is killed (transient error).
    """

    def __init__(
        self, command: str = "/usr/sbin/sendmail", timeout: float | None = 60
    ) -> None:
        self.command = command
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.command}>"

    def _arguments(self, fromaddr: str, toaddrs: Sequence[str]) -> list[str]:
        sender, recipients = _envelope(fromaddr, toaddrs)
        if sender.startswith("-"):
            raise ValueError(f"the sender must not start with '-': {sender!r}")
        return [self.command, "-i", "-f", sender or "<>", "--", *recipients]

    def vote(self, fromaddr: str, toaddrs: Sequence[str], message: bytes) -> None:
        """Check the addresses, and that the command is an executable file."""
        self._arguments(fromaddr, toaddrs)
        if shutil.which(self.command) is None:
            raise MailConnectionError(f"{self.command} is not an executable file")

    def send(
        self, fromaddr: str, toaddrs: Sequence[str], message: bytes | str
    ) -> Refused:
        """See :class:`mailoutbox.interfaces.IMailer`; returns ``{}``."""
        argv = self._arguments(fromaddr, toaddrs)
        if isinstance(message, str):
            message = message.encode("utf-8")
        data = message.replace(b"\r\n", b"\n")
        try:
            process = subprocess.run(  # noqa: S603 - no shell; "--" ends options
                argv,
                input=data,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=self.timeout,
                check=True,
            )
        except OSError as exc:
            raise MailConnectionError(
                f"cannot run {self.command}: {exc.strerror}"
            ) from exc
        except subprocess.SubprocessError as exc:
            _reraise(exc)
        log.debug(
            "%s accepted %s (exit status %d)",
            self.command,
            _MessageId(data),
            process.returncode,
        )
        return {}

    def abort(self) -> None:
        """Nothing to undo: no process is started before :meth:`send`."""
