"""A mailer and a delivery that record messages instead of sending them.

:class:`RecordingMailer` is an :class:`~mailoutbox.interfaces.IMailer`
that keeps what it is given to send.  :class:`RecordingDelivery` is the real
:class:`~mailoutbox.delivery.DirectMailDelivery` on top of one: it joins
the transaction like the deliveries an application uses, so a message is
recorded only when the transaction commits, and the events are sent.
"""
from __future__ import annotations

import email
import email.policy
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Any

from zope.interface import implementer

from mailoutbox.delivery import DirectMailDelivery
from mailoutbox.interfaces import IMailer

__all__ = ["RecordingDelivery", "RecordingMailer", "SentMessage"]


def _addr_spec(address: str) -> str:
    pairs = getaddresses([address])
    spec = pairs[0][1] if pairs and pairs[0][1] else address
    return spec.strip().lower()


@dataclass(frozen=True)
class SentMessage:
    """One message given to a :class:`RecordingMailer`."""

    fromaddr: str
    toaddrs: tuple[str, ...]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        """The data parsed as an :class:`email.message.EmailMessage`."""
        return email.message_from_bytes(self.data, policy=email.policy.default)

    @property
    def subject(self) -> str | None:
        """The decoded Subject header, if any."""
        value = self.message["Subject"]
        return None if value is None else str(value)

    @property
    def message_id(self) -> str | None:
        """The Message-Id header without angle brackets, if any."""
        value = self.message["Message-Id"]
        return None if value is None else str(value).strip().strip("<>")

    @property
    def recipients(self) -> tuple[str, ...]:
        """The envelope recipients as bare, lower-cased addresses."""
        return tuple(_addr_spec(address) for address in self.toaddrs)

    def matches(
        self,
        to: str | None = None,
        subject: str | None = None,
        fromaddr: str | None = None,
    ) -> bool:
        """Whether the message has envelope recipient *to*, the Subject
        *subject* and envelope sender *fromaddr*; addresses compare without
        display names and case, and ``None`` matches anything."""
        if to is not None and _addr_spec(to) not in self.recipients:
            return False
        if subject is not None and self.subject != subject:
            return False
        return fromaddr is None or _addr_spec(fromaddr) == _addr_spec(self.fromaddr)


@implementer(IMailer)
class RecordingMailer:
    """See :class:`mailoutbox.interfaces.IMailer`.

    Records every message in :attr:`sent` (a list of :class:`SentMessage`)
    and accepts it for every recipient.  Set :attr:`error` to an exception
    to have the following calls of :meth:`send` raise it instead.
    """

    def __init__(self) -> None:
        self.sent: list[SentMessage] = []
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def send(
        self, fromaddr: str, toaddrs: Sequence[str], message: bytes
    ) -> dict[str, tuple[int, str]]:
        """See :meth:`mailoutbox.interfaces.IMailer.send`."""
        if self.error is not None:
            raise self.error
        if isinstance(message, str):
            message = message.encode("utf-8")
        with self.lock:
            self.sent.append(SentMessage(fromaddr, tuple(toaddrs), bytes(message)))
        return {}

    def vote(self, fromaddr: str, toaddrs: Sequence[str], message: Any) -> None:
        """See :meth:`mailoutbox.interfaces.IMailer.vote`; raises
        :attr:`error` if it is set."""
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """See :meth:`mailoutbox.interfaces.IMailer.abort`."""

    def close(self) -> None:
        """Nothing to close."""

    @property
    def messages(self) -> list[EmailMessage]:
        """The recorded messages, parsed."""
        with self.lock:
            return [sent.message for sent in self.sent]

    def find(
        self,
        to: str | None = None,
        subject: str | None = None,
        fromaddr: str | None = None,
    ) -> list[SentMessage]:
        """The recorded messages that match (see :meth:`SentMessage.matches`)."""
        with self.lock:
            sent = list(self.sent)
        return [item for item in sent if item.matches(to, subject, fromaddr)]

    def clear(self) -> None:
        """Forget the recorded messages."""
        with self.lock:
            self.sent.clear()


class RecordingDelivery(DirectMailDelivery):
    """A :class:`~mailoutbox.delivery.DirectMailDelivery` that records the
    messages of committed transactions in its :class:`RecordingMailer`.

    See :class:`mailoutbox.interfaces.IDirectMailDelivery`.
    """

    def __init__(
        self, mailer: RecordingMailer | None = None, transaction_manager: Any = None
    ) -> None:
        super().__init__(
            RecordingMailer() if mailer is None else mailer,
            transaction_manager=transaction_manager,
        )

    @property
    def sent(self) -> list[SentMessage]:
        """The messages sent by committed transactions."""
        return self.mailer.sent

    @property
    def messages(self) -> list[EmailMessage]:
        """The same, parsed."""
        return self.mailer.messages

    def find(
        self,
        to: str | None = None,
        subject: str | None = None,
        fromaddr: str | None = None,
    ) -> list[SentMessage]:
        """See :meth:`RecordingMailer.find`."""
        return self.mailer.find(to, subject, fromaddr)

    def clear(self) -> None:
        """See :meth:`RecordingMailer.clear`."""
        self.mailer.clear()
