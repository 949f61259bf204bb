"""The events mailoutbox sends through :func:`zope.event.notify`."""
from __future__ import annotations

from collections.abc import Mapping

from zope.interface import implementer

from mailoutbox.interfaces import IMailErrorEvent
from mailoutbox.interfaces import IMailSentEvent

__all__ = ["MailErrorEvent", "MailSentEvent"]


@implementer(IMailSentEvent)
class MailSentEvent:
    """See :class:`mailoutbox.interfaces.IMailSentEvent`."""

    def __init__(
        self, messageId: str, refused: Mapping[str, tuple[int, str]] | None = None
    ) -> None:
        self.messageId = messageId
        self.refused = dict(refused or {})

    def __repr__(self) -> str:
        return f"<MailSentEvent {self.messageId!r} refused={self.refused!r}>"


@implementer(IMailErrorEvent)
class MailErrorEvent:
    """See :class:`mailoutbox.interfaces.IMailErrorEvent`."""

    def __init__(
        self,
        messageId: str,
        errorMessage: str,
        permanent: bool = False,
        code: int | None = None,
        refused: Mapping[str, tuple[int, str]] | None = None,
    ) -> None:
        self.messageId = messageId
        self.errorMessage = errorMessage
        self.permanent = permanent
        self.code = code
        self.refused = dict(refused or {})

    def __repr__(self) -> str:
        kind = "permanent" if self.permanent else "temporary"
        return f"<MailErrorEvent {self.messageId!r} {kind}: {self.errorMessage}>"
