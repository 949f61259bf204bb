"""The events mailoutbox sends through :func:`zope.event.notify`."""
from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping

from zope.interface import implementer

from mailoutbox.interfaces import IMailErrorEvent
from mailoutbox.interfaces import IMailSentEvent

__all__ = ["MailErrorEvent", "MailSentEvent"]

Replies = Mapping[str, tuple[int, str]]


@implementer(IMailSentEvent)
class MailSentEvent:
    """See :class:`mailoutbox.interfaces.IMailSentEvent`."""

    def __init__(
        self,
        messageId: str,
        refused: Replies | None = None,
        *,
        sent: Iterable[str] = (),
        deferred: Replies | None = None,
    ) -> None:
        self.messageId = messageId
        self.refused = dict(refused or {})
        self.sent = tuple(sent)
        self.deferred = dict(deferred or {})

    def __repr__(self) -> str:
        deferred = f" deferred={self.deferred!r}" if self.deferred else ""
        return (f"<MailSentEvent {self.messageId!r} refused={self.refused!r}"
                f"{deferred}>")


@implementer(IMailErrorEvent)
class MailErrorEvent:
    """See :class:`mailoutbox.interfaces.IMailErrorEvent`."""

    def __init__(
        self,
        messageId: str,
        errorMessage: str,
        permanent: bool = False,
        code: int | None = None,
        refused: Replies | None = None,
        *,
        deferred: Replies | None = None,
    ) -> None:
        self.messageId = messageId
        self.errorMessage = errorMessage
        self.permanent = permanent
        self.code = code
        self.refused = dict(refused or {})
        self.deferred = dict(deferred or {})

    def __repr__(self) -> str:
        kind = "permanent" if self.permanent else "temporary"
        return f"<MailErrorEvent {self.messageId!r} {kind}: {self.errorMessage}>"
