"""Subscribers of mailoutbox's events: log and remember every outcome."""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

__all__ = ["clear", "mail_failed", "mail_sent", "outcomes"]

log = logging.getLogger(__name__)

_outcomes: deque[dict[str, Any]] = deque(maxlen=100)
_lock = threading.Lock()


def mail_sent(event: Any) -> None:
    """An IMailSentEvent: the relay accepted the message."""
    log.info("mail %s sent", event.messageId)
    with _lock:
        _outcomes.append({"message_id": event.messageId, "sent": True})


def mail_failed(event: Any) -> None:
    """An IMailErrorEvent: the message was refused (for now, or for good)."""
    log.warning("mail %s not sent: %s", event.messageId, event.errorMessage)
    with _lock:
        _outcomes.append({
            "message_id": event.messageId,
            "sent": False,
            "permanent": event.permanent,
            "error": event.errorMessage,
        })


def outcomes() -> list[dict[str, Any]]:
    """The recorded outcomes, oldest first."""
    with _lock:
        return list(_outcomes)


def clear() -> None:
    """Forget the recorded outcomes."""
    with _lock:
        _outcomes.clear()
