"""The SMTP session used by :class:`mailoutbox.mailer.SMTPMailer`.

Private: envelope addresses, the encoding of message data for the wire, and
a :class:`smtplib.SMTP` subclass that runs one mail transaction with
PIPELINING (RFC 2920) when the server offers it.  smtplib's exceptions are
raised here; :func:`mailoutbox.errors.classify` turns them into
:class:`~mailoutbox.errors.MailError` at the mailer's boundary.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from email.utils import getaddresses

from .errors import PermanentMailError

__all__ = ["DATA_BYTES_PER_TIMEOUT", "Connection", "encode_data", "envelope_address"]

#: The message data may take the timeout once for every so many bytes (and
#: at least once) to be sent: with the default timeout of 10 s, a server
#: must read at least 25.6 KiB a second.
DATA_BYTES_PER_TIMEOUT = 256 * 1024

# The most written to the socket at once, so that the deadline is checked
# between writes whatever the socket (an SSL socket's sendall() applies the
# timeout to each of its writes, not to the whole).
_CHUNK = 64 * 1024

# An addr-spec without display name, comments, quotes or angle brackets: the
# common case, which needs no parsing.
_ATOMS = r"[^\s\x00-\x1f\x7f<>()\[\]\",;:\\@]+"
_BARE_ADDRESS = re.compile(_ATOMS + "@" + _ATOMS)
# Control characters, except TAB: folding white space around an address,
# which cannot end a command line.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A quoted string, whose '<' and '>' are part of a local part (RFC 5321
# qtextSMTP), not the end of the address.
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')

# Exceptions after which the session is still in step with the server: the
# server refused something and said so.  After anything else (a dropped
# connection, a timeout, a garbled exchange) the connection is closed.
_CLEAN_FAILURES = (
    smtplib.SMTPSenderRefused,
    smtplib.SMTPRecipientsRefused,
    smtplib.SMTPDataError,
)


def envelope_address(address: str, *, sender: bool = False) -> str:
    """The addr-spec of *address* for the SMTP envelope.

    A display name is dropped (``"Doe, Jane" <jane@example.org>`` becomes
    ``jane@example.org``).  For the *sender*, an empty address or ``<>`` is
    the null reverse-path and gives ``""``.  Raises
    :class:`~mailoutbox.errors.PermanentMailError` for control characters
    (which could smuggle commands onto the wire) and for anything that is
    not exactly one address, and :class:`TypeError` for a non-string.
    """
    if not isinstance(address, str):
        raise TypeError(f"an address must be a str, not {type(address).__name__}")
    if _BARE_ADDRESS.fullmatch(address):
        return address
    if _CONTROL.search(address):
        raise PermanentMailError(f"control character in address {address!r}")
    if sender and address.strip() in ("", "<>"):
        return ""
    pairs = getaddresses([address])
    spec = pairs[0][1] if len(pairs) == 1 else ""
    unquoted = _QUOTED.sub("", spec)
    if not spec or "<" in unquoted or ">" in unquoted:
        raise PermanentMailError(f"not a single valid address: {address!r}")
    return spec


def encode_data(message: bytes | str) -> bytes:
    """*message* as it goes on the wire after ``DATA``, with the final
    ``.`` line.

    A ``str`` is encoded as UTF-8.  Line ends (LF, CR or CRLF) become CRLF,
    a last line without one gets one, and lines starting with ``.`` get a
    second one (RFC 5321 section 4.5.2; the server removes it).
    """
    if isinstance(message, str):
        data = message.encode("utf-8")
    elif isinstance(message, bytes):
        data = message
    else:
        raise TypeError(f"a message must be bytes or str, not {type(message).__name__}")
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    data = data.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def _deadline(seconds: float | None) -> float | None:
    return None if seconds is None else time.monotonic() + seconds


def _remaining(deadline: float | None, what: str) -> float | None:
    # The time left before *deadline*; TimeoutError once it has passed.
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"{what} did not complete in time")
    return left


class _Reader:
    """Reads the lines of a reply from a socket before a deadline, which
    bounds the whole reply however slowly the server trickles it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.deadline: float | None = None

    def readline(self, limit: int) -> bytes:
        while True:
            end = self.buffer.find(b"\n", 0, limit)
            if end >= 0 or len(self.buffer) >= limit:
                size = end + 1 if end >= 0 else limit
                line, self.buffer = self.buffer[:size], self.buffer[size:]
                return line
            self.sock.settimeout(_remaining(self.deadline, "the reply"))
            chunk = self.sock.recv(4096)
            if not chunk:  # end of file: what is left, possibly nothing
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += chunk

    def close(self) -> None:
        self.buffer = b""


class Connection(smtplib.SMTP):
    """One SMTP session; connects (and, with *implicit_context*, speaks
    TLS) on construction.

    :attr:`stage` says how far the current or last transaction got:
    ``"start"`` until the server said yes to RSET/NOOP or MAIL (a failure
    there on a reused connection means the server had dropped it while
    idle), ``"rcpt"``, ``"data"`` once the end of data has been sent, and
    ``"done"``.  :attr:`dirty` is true when the server may still hold state
    of a failed transaction, so the next one starts with RSET.

    *timeout* bounds each blocking step as a whole, not each read or write
    of the socket: connecting, each reply (however slowly its lines
    come), each command sent, and the TLS handshake.  The message data
    must be sent within the timeout once for every
    :data:`DATA_BYTES_PER_TIMEOUT` bytes (at least once), and the reply to
    it must come within the timeout after that time at the latest.
    ``None`` means the socket module's default timeout (none, unless it
    was set).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        local_hostname: str | None,
        timeout: float | None,
        implicit_context: ssl.SSLContext | None = None,
    ) -> None:
        self.implicit_context = implicit_context
        self.tls = implicit_context is not None
        self.stage = "done"
        self.dirty = False
        self.seconds = socket.getdefaulttimeout() if timeout is None else timeout
        super().__init__(host, port, local_hostname, self.seconds)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, timeout)
        try:
            # Every write is a whole command group: do not wait for ACKs.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.implicit_context is not None:
                sock = self.implicit_context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        return sock

    def getreply(self, extra: float = 0.0) -> tuple[int, bytes]:
        """smtplib's, with a deadline for the whole reply: the timeout,
        plus *extra* seconds."""
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("not connected")
        if self.file is None:  # a new connection, or TLS just began
            self.file = _Reader(self.sock)
        self.file.deadline = _deadline(
            None if self.seconds is None else self.seconds + extra
        )
        try:
            return super().getreply()
        finally:
            if self.sock is not None:
                self.sock.settimeout(self.seconds)

    def send(self, s: bytes | str) -> None:
        """smtplib's, with a deadline for the whole of *s*."""
        self.send_within(s, self.seconds)

    def send_within(self, data: bytes | str, seconds: float | None) -> None:
        """Send *data*, all of it within *seconds* (``None``: no limit)."""
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        if isinstance(data, str):
            data = data.encode(self.command_encoding)
        sys.audit("smtplib.send", self, data)
        deadline = _deadline(seconds)
        try:
            with memoryview(data) as view:
                sent = 0
                while sent < len(view):
                    self.sock.settimeout(_remaining(deadline, "sending"))
                    sent += self.sock.send(view[sent : sent + _CHUNK])
            self.sock.settimeout(self.seconds)
        except OSError as exc:
            self.close()
            raise smtplib.SMTPServerDisconnected(f"cannot send: {exc}") from exc

    def data_seconds(self, size: int) -> float | None:
        """The time allowed for sending *size* bytes of message data."""
        if self.seconds is None:
            return None
        return self.seconds * max(1.0, size / DATA_BYTES_PER_TIMEOUT)

    def _reply(self, extra: float = 0.0) -> tuple[int, bytes]:
        code, text = self.getreply(extra)
        if code == 421:  # the server is closing the connection
            self.close()
            raise smtplib.SMTPResponseException(code, text)
        return code, text

    def _check_reset(self, verb: str, code: int, text: bytes) -> None:
        # A session that fails RSET or NOOP is not worth keeping: report it
        # as closed, which makes the mailer replace it.
        if code // 100 != 2:
            self.close()
            raise smtplib.SMTPServerDisconnected(
                f"{verb} refused: {code} {text.decode('utf-8', 'replace')}"
            )

    def ping(self) -> None:
        """Check that the session is usable: RSET after a failed
        transaction, NOOP otherwise."""
        self.stage = "start"
        verb = "RSET" if self.dirty else "NOOP"
        self.putcmd(verb)
        self._check_reset(verb, *self._reply())
        self.dirty = False
        self.stage = "done"

    def quit_quietly(self) -> None:
        """Say QUIT, ignore any failure (the server may be gone), and close."""
        try:
            self.quit()
        except (smtplib.SMTPException, OSError):
            pass
        finally:
            self.close()

    def transaction(
        self, sender: str, recipients: Sequence[str], data: bytes, smtputf8: bool
    ) -> dict[str, tuple[int, str]]:
        """Send *data* (from :func:`encode_data`) from *sender* to
        *recipients* and return the refused recipients.

        Raises smtplib's exceptions: :class:`smtplib.SMTPSenderRefused`,
        :class:`smtplib.SMTPRecipientsRefused` (all refused) and
        :class:`smtplib.SMTPDataError` leave the session usable (and dirty);
        after any other the connection is closed.
        """
        features = self.esmtp_features
        params = b" SMTPUTF8" if smtputf8 else b""
        if "8bitmime" in features and not data.isascii():
            params += b" BODY=8BITMIME"
        mail = b"MAIL FROM:<%s>%s\r\n" % (sender.encode(), params)
        rcpts = [b"RCPT TO:<%s>\r\n" % rcpt.encode() for rcpt in recipients]
        pipelined = "pipelining" in features
        rset = self.dirty
        self.dirty = True  # until the server accepted the message
        self.stage = "start"
        try:
            if pipelined:
                group = [b"RSET\r\n", mail] if rset else [mail]
                self.send(b"".join([*group, *rcpts, b"DATA\r\n"]))
            return self._exchange(
                pipelined, rset, mail, rcpts, sender, recipients, data
            )
        except _CLEAN_FAILURES:
            raise
        except BaseException:
            self.close()
            raise

    def _exchange(self, pipelined, rset, mail, rcpts, sender, recipients, data):
        def step(command: bytes) -> tuple[int, bytes]:
            if not pipelined:
                self.send(command)
            return self._reply()

        if rset:
            self._check_reset("RSET", *step(b"RSET\r\n"))
        code, text = step(mail)
        if code // 100 != 2:
            self._skip(pipelined, len(rcpts) + 1)
            raise smtplib.SMTPSenderRefused(code, text, sender)
        self.stage = "rcpt"
        refused = {}
        for address, command in zip(recipients, rcpts, strict=True):
            code, text = step(command)
            if code // 100 != 2:
                refused[address] = (code, text.decode("utf-8", "replace"))
        if len(refused) == len(recipients):
            self._skip(pipelined, 1)
            raise smtplib.SMTPRecipientsRefused(refused)
        code, text = step(b"DATA\r\n")
        if code != 354:
            raise smtplib.SMTPDataError(code, text)
        self.stage = "data"
        # The server may still be reading what the kernel buffered: the
        # reply gets the timeout plus the time the data did not use.
        allowed = self.data_seconds(len(data))
        started = time.monotonic()
        self.send_within(data, allowed)
        unused = 0.0 if allowed is None else started + allowed - time.monotonic()
        code, text = self._reply(max(0.0, unused))
        if code // 100 != 2:
            raise smtplib.SMTPDataError(code, text)
        self.dirty = False
        self.stage = "done"
        return refused

    def _skip(self, pipelined: bool, count: int) -> None:
        # Read the replies to the rest of a pipelined group after a refusal.
        # A server that accepted DATA anyway gets an empty message, which it
        # must refuse for want of recipients (RFC 2920 section 3.1).
        if not pipelined:
            return
        try:
            for _ in range(count):
                if self._reply()[0] == 354:
                    self.send(b".\r\n")
                    self._reply()
        except (smtplib.SMTPException, OSError):
            self.close()
