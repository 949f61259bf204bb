"""A real SMTP server in a background thread, for tests.

:class:`SMTPServer` runs aiosmtpd on ``127.0.0.1`` on a free port, records
every message it accepts, and can be told to refuse recipients, greylist,
answer any command with a given reply, require STARTTLS or AUTH, or be slow.
It needs the ``aiosmtpd`` package (``pip install mailoutbox[server]``).
"""
from __future__ import annotations

import asyncio
import email
import email.policy
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field

__all__ = ["ReceivedMessage", "SMTPServer"]


@dataclass
class ReceivedMessage:
    """One message as the server received it."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    smtputf8: bool = False
    tls: bool = False
    login: str | None = None
    #: The parameters of the MAIL command, e.g. ``["BODY=8BITMIME"]``.
    mail_options: list[str] = field(default_factory=list)
    #: The name the client gave in HELO or EHLO.
    helo: str | None = None

    @property
    def message(self) -> email.message.EmailMessage:
        """The data parsed as an :class:`email.message.EmailMessage`."""
        return email.message_from_bytes(self.data, policy=email.policy.default)

    @property
    def message_id(self) -> str | None:
        """The Message-Id header without angle brackets, if any."""
        value = self.message["Message-Id"]
        return str(value).strip().strip("<>") if value else None


@dataclass
class _Rules:
    # command name (EHLO, MAIL, ...) -> reply replacing the normal one
    replies: dict[str, str] = field(default_factory=dict)
    # recipient address -> reply
    refuse: dict[str, str] = field(default_factory=dict)
    # recipient address -> how many more times to answer 451 (greylisting)
    greylist: dict[str, int] = field(default_factory=dict)
    delay: float = 0.0


class _Handler:
    def __init__(self, server: SMTPServer) -> None:
        from aiosmtpd.smtp import MISSING

        self.server = server
        self.missing = MISSING  # "use aiosmtpd's normal reply"

    async def _pause(self) -> None:
        delay = self.server.rules.delay
        if delay:
            await asyncio.sleep(delay)

    def _record(self, command: str) -> None:
        with self.server.lock:
            self.server.commands.append(command)

    def _reply(self, command: str):
        return self.server.rules.replies.get(command, self.missing)

    async def handle_HELO(self, server, session, envelope, hostname):
        self._record("HELO")
        return self._reply("HELO")

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self._record("EHLO")
        session.host_name = hostname
        reply = self.server.rules.replies.get("EHLO")
        if reply is not None:
            # aiosmtpd sends each item of the list as one line.
            return [reply]
        if self.server.pipelining:
            responses.insert(-1, "250-PIPELINING")
        # Without users, aiosmtpd still advertises AUTH with no mechanism.
        return [line for line in responses if line.rstrip() != "250-AUTH"]

    async def handle_NOOP(self, server, session, envelope, arg):
        self._record("NOOP")
        return self._reply("NOOP")

    async def handle_RSET(self, server, session, envelope):
        self._record("RSET")
        return self._reply("RSET")

    async def handle_QUIT(self, server, session, envelope):
        self._record("QUIT")
        return self._reply("QUIT")

    async def handle_MAIL(self, server, session, envelope, address, options):
        self._record("MAIL")
        await self._pause()
        reply = self.server.rules.replies.get("MAIL")
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, options):
        self._record("RCPT")
        rules = self.server.rules
        reply = rules.replies.get("RCPT") or rules.refuse.get(address)
        if reply:
            return reply
        left = rules.greylist.get(address, 0)
        if left > 0:
            rules.greylist[address] = left - 1
            return "451 4.7.1 Greylisted, try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self._record("DATA")
        await self._pause()
        reply = self.server.rules.replies.get("DATA")
        if reply:
            return reply
        received = ReceivedMessage(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content,
            smtputf8=envelope.smtp_utf8,
            tls=server.transport.get_extra_info("ssl_object") is not None,
            login=session.auth_data,
            mail_options=list(envelope.mail_options),
            helo=session.host_name,
        )
        with self.server.lock:
            self.server.messages.append(received)
        return "250 OK queued"


class SMTPServer:
    """An SMTP server on ``127.0.0.1`` and a free port, in a thread.

    *tls_context* is a server-side :class:`ssl.SSLContext`; with it the
    server offers STARTTLS, or, with *implicit_tls*, speaks TLS from the
    first byte.  *users* maps user names to passwords and enables AUTH
    (PLAIN and LOGIN, after STARTTLS only if *tls_context* is given).
    *require_starttls* refuses commands before STARTTLS.  *smtputf8* offers
    the SMTPUTF8 extension.  *pipelining* advertises PIPELINING (RFC 2920);
    aiosmtpd reads pipelined commands correctly either way.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    Received messages are in :attr:`messages`; :attr:`commands` lists the
    verbs of the commands received (``EHLO``, ``HELO``, ``MAIL``, ``RCPT``,
    ``RSET``, ``NOOP``, ``QUIT``, and ``DATA`` once the data of a message
    has been received), and :attr:`connections` counts the connections.
    """

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        users: Mapping[str, str] | None = None,
        require_starttls: bool = False,
        smtputf8: bool = True,
        ready_timeout: float = 5.0,
        pipelining: bool = False,
    ) -> None:
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.users = dict(users or {})
        self.require_starttls = require_starttls
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self.ready_timeout = ready_timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.messages: list[ReceivedMessage] = []
        self.commands: list[str] = []
        self.lock = threading.Lock()
        self.rules = _Rules()
        self.connections = 0
        self._protocols: list = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    # -- configuration of faults -------------------------------------------

    def reply(self, command: str, reply: str | None) -> None:
        """Answer *command* (``HELO``, ``EHLO``, ``MAIL``, ``RCPT``,
        ``DATA`` (at the end of the data), ``RSET``, ``NOOP`` or ``QUIT``)
        with *reply* instead of the normal answer; ``None`` restores it.
        The connection stays open whatever the reply says."""
        if reply is None:
            self.rules.replies.pop(command.upper(), None)
        else:
            self.rules.replies[command.upper()] = reply

    def refuse(self, address: str, reply: str = "550 5.1.1 No such user") -> None:
        """Refuse the recipient *address* with *reply*."""
        self.rules.refuse[address] = reply

    def greylist(self, address: str, times: int = 1) -> None:
        """Answer 451 the next *times* times *address* is a recipient."""
        self.rules.greylist[address] = times

    def slow(self, delay: float) -> None:
        """Wait *delay* seconds before answering MAIL and end of data."""
        self.rules.delay = delay

    def reset(self) -> None:
        """Forget the configured faults and the received messages."""
        self.rules = _Rules()
        with self.lock:
            self.messages.clear()
            self.commands.clear()

    def drop_connections(self, reply: str | None = None) -> int:
        """Close every open client connection, as a server does with idle
        ones; with *reply* (e.g. ``"421 4.4.2 Idle timeout"``) send it
        first.  Returns the number of connections closed."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the server is not running; call start() first")

        async def drop() -> int:
            closed = 0
            for protocol in self._protocols:
                transport = protocol.transport
                if transport is None or transport.is_closing():
                    continue
                if reply is not None:
                    transport.write(reply.encode() + b"\r\n")
                transport.close()
                closed += 1
            return closed

        future = asyncio.run_coroutine_threadsafe(drop(), loop)
        return future.result(self.ready_timeout)

    # -- life cycle -------------------------------------------------------

    def _make_protocol(self):
        from aiosmtpd.smtp import SMTP
        from aiosmtpd.smtp import AuthResult

        def authenticate(server, session, envelope, mechanism, auth_data):
            login = getattr(auth_data, "login", b"")
            password = getattr(auth_data, "password", b"")
            name = login.decode() if isinstance(login, bytes) else str(login)
            word = password.decode() if isinstance(password, bytes) else str(password)
            ok = name in self.users and self.users[name] == word
            return AuthResult(success=ok, handled=False, auth_data=name if ok else None)

        self.connections += 1
        protocol = SMTP(
            _Handler(self),
            hostname="mailoutbox.test",
            enable_SMTPUTF8=self.smtputf8,
            tls_context=None if self.implicit_tls else self.tls_context,
            require_starttls=self.require_starttls,
            authenticator=authenticate if self.users else None,
            auth_require_tls=self.tls_context is not None and not self.implicit_tls,
            auth_exclude_mechanism=[] if self.users else ["LOGIN", "PLAIN"],
        )
        self._protocols.append(protocol)
        return protocol

    def start(self) -> SMTPServer:
        """Start serving; returns when the port is bound."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            # gather() at shutdown needs the loop to be this thread's loop.
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(
                        self._make_protocol,
                        self.host,
                        0,
                        ssl=self.tls_context if self.implicit_tls else None,
                    )
                )
            except BaseException as exc:  # pragma: no cover - bind failure
                errors.append(exc)
                ready.set()
                loop.close()
                return
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            self._server.close()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(
                asyncio.gather(*pending, return_exceptions=True)
            )
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(
            target=serve, name="mailoutbox-test-smtpd", daemon=True
        )
        self._thread.start()
        if not ready.wait(self.ready_timeout):  # pragma: no cover
            raise TimeoutError(
                f"the SMTP server did not start within {self.ready_timeout:.1f}s;"
                " raise ready_timeout"
            )
        if errors:  # pragma: no cover
            raise errors[0]
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread to end."""
        if self._thread is None:
            return
        if self._loop is not None:  # pragma: no branch - set before ready
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self.ready_timeout)
        self._thread = None

    def __enter__(self) -> SMTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- inspection -------------------------------------------------------

    def message_ids(self) -> list[str | None]:
        """The Message-Ids of the received messages, in order."""
        with self.lock:
            return [m.message_id for m in self.messages]
