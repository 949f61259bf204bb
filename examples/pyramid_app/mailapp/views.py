"""The views: send a welcome mail, fail after sending one, show the outbox."""
from __future__ import annotations

from email.message import EmailMessage
from typing import Any

from mailapp.subscribers import outcomes

__all__ = ["failed", "outbox", "send_then_fail", "welcome"]


def _welcome_message(sender: str, to: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = "Welcome"
    message.set_content("Hello, and welcome!\n")
    return message


def welcome(request: Any) -> dict[str, str]:
    """POST ``to=ADDRESS``: send a welcome mail when the request succeeds."""
    sender = request.registry.settings["mailapp.sender"]
    to = request.params["to"]
    message_id = request.mail_delivery.send(
        sender, [to], _welcome_message(sender, to)
    )
    return {"message_id": message_id}


class SignupFailed(Exception):
    """Something went wrong after the welcome mail was sent."""


def send_then_fail(request: Any) -> None:
    """Send a mail, then fail: pyramid_tm aborts, and nothing is sent."""
    welcome(request)
    raise SignupFailed("the account could not be created")


def failed(exc: SignupFailed, request: Any) -> dict[str, str]:
    """The exception view of :class:`SignupFailed`."""
    request.response.status = 500
    return {"error": str(exc)}


def outbox(request: Any) -> list[dict[str, Any]]:
    """GET: what became of the messages sent so far."""
    return outcomes()
