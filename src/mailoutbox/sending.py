"""Sending one message of the queue, and ending its claim.

:class:`MessageSender` is the part of
:class:`~mailoutbox.queue.QueueProcessorThread` that handles a single
message: a worker claims it, reads and parses the queue file, sends it
through the mailer of the pass and ends the claim with one of the outcomes
described in the documentation chapter "The queue on disk": sent, deferred
(a transient failure, tried again later according to the
:class:`~mailoutbox.retry.RetryPolicy`) or failed (a permanent failure, or
one retried long enough: the message is moved to the failed area).  Each
outcome is logged, naming the Message-Id, and announced with an event.

The class is a mixin: it uses the processor's attributes, among them its
``log`` (the ``mailoutbox.queue`` logger) and ``classify`` seams, so that
a test replaces them on the processor as before.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import zope.event

from mailoutbox import errors
from mailoutbox.envelope import parse_queue_file
from mailoutbox.events import MailErrorEvent
from mailoutbox.events import MailSentEvent
from mailoutbox.maildir import Claim
from mailoutbox.maildir import Entry
from mailoutbox.maildir import Maildir
from mailoutbox.retry import RetryPolicy
from mailoutbox.retry import record_failure
from mailoutbox.workers import DEFERRED
from mailoutbox.workers import FAILED
from mailoutbox.workers import SENT
from mailoutbox.workers import SKIPPED
from mailoutbox.workers import Pass

__all__ = ["MessageSender", "message_id_of"]

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID = re.compile(
    rb"^message-id[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE
)
#: Only so many bytes are searched for the headers.
_HEADER_LIMIT = 64 * 1024


def message_id_of(message: bytes, default: str) -> str:
    """The Message-Id of *message* (``bytes``) without angle brackets, or
    *default* when it has none.  Only the header block is looked at."""
    head = message[:_HEADER_LIMIT]
    end = _HEADER_END.search(head)
    if end is not None:
        head = head[: end.start()]
    match = _MESSAGE_ID.search(head)
    if match is None:
        return default
    value = b"".join(match.group(1).split()).strip(b"<>")
    return value.decode("utf-8", "replace") or default


class MessageSender:
    """Sends the messages a pass hands to a worker (a mixin of
    :class:`~mailoutbox.queue.QueueProcessorThread`, which provides the
    attributes below)."""

    #: The logger of the processor's lines about messages (a seam).
    log: logging.Logger
    #: Turns exceptions raised by the mailer into MailErrors (a seam).
    classify: Callable[[BaseException], errors.MailError]
    retry: RetryPolicy
    #: How long, in seconds, a claim stays valid without being renewed.
    lease: float

    def _process(self, job: Pass, entry: Entry) -> str:
        maildir = job.maildir
        if not entry.regular:
            return self._reject_foreign(maildir, entry, job.now())
        claim = maildir.claim(entry, self.lease)
        if claim is None:
            return SKIPPED  # claimed by another processor, or gone
        job.hold(claim)
        try:
            return self._send(claim, job)
        finally:
            job.drop(claim)

    def _send(self, claim: Claim, job: Pass) -> str:
        """Send the claimed message through the pass's mailer and end the
        claim."""
        via = "" if job.relay is None else f" via relay {job.relay!r}"
        try:
            outcome = self._read_and_send(claim, job.now, job.mailer, via)
        except BaseException:
            claim.release()  # nothing was sent: give the message back
            raise
        if not isinstance(outcome, tuple):
            return outcome
        message_id, refused = outcome
        try:
            claim.complete()
        except BaseException:
            self.log.error("sent %s but could not remove %s from the queue: it"
                           " will be sent again when its claim expires",
                           message_id, claim.entry.name)
            raise
        refused = dict(refused or {})
        if refused:
            self.log.warning(
                "sent %s%s, but the server refused %s", message_id, via,
                ", ".join(f"{a} ({c} {t})" for a, (c, t) in refused.items()))
        else:
            self.log.info("sent %s%s", message_id, via)
        self._notify(MailSentEvent(message_id, refused))
        return SENT

    def _read_and_send(self, claim: Claim, clock: Callable[[], float],
                       mailer: Any, via: str = "") -> str | tuple[str, Any]:
        """Send the message, or end the claim if it cannot be sent (now).

        Returns the outcome, or ``(message_id, refused)`` once sent.
        """
        name = claim.entry.name
        try:
            data = claim.read()
        except FileNotFoundError:  # purged by hand meanwhile
            claim.release()
            return SKIPPED
        except OSError as exc:  # e.g. replaced by a symbolic link
            return self._fail(claim, name, f"unreadable queue file: {exc}", clock())
        try:
            fromaddr, toaddrs, message = parse_queue_file(data)
        except ValueError as exc:
            return self._fail(claim, message_id_of(data, name),
                              f"malformed queue file: {exc}", clock())
        del data  # the message is a copy: keep one in memory
        message_id = message_id_of(message, name)
        try:
            return message_id, mailer.send(fromaddr, toaddrs, message)
        except Exception as exc:
            return self._failed_attempt(claim, message_id, exc, clock(), via)

    def _failed_attempt(self, claim: Claim, message_id: str, exc: Exception,
                        now: float, via: str = "") -> str:
        """Defer the message, or fail it if the error is permanent or the
        message has been retried long enough."""
        try:
            error = self.classify(exc)
        except Exception:
            self.log.exception("could not classify the error sending %s", message_id)
            error = errors.TransientMailError(f"unclassified error: {exc!r}")
        state = record_failure(self.retry, claim.retry_state(), now,
                               code=error.code, error=str(error))
        if not error.permanent and not state.pop("expired"):
            claim.defer(state["next_attempt"], state)
            self.log.warning(
                "could not send %s%s (attempt %d), will try again in %.0f s: %s",
                message_id, via, state["attempts"], state["next_attempt"] - now,
                error)
            self._notify(MailErrorEvent(message_id, str(error), permanent=False,
                                        code=error.code, refused=error.refused))
            return DEFERRED
        text = str(error)
        if not error.permanent:
            hours = (now - state["first_attempt"]) / 3600
            text = (f"expired after {state['attempts']} attempts in"
                    f" {hours:.1f} h: {text}")
        return self._fail(claim, message_id, text, now, error=error, state=state,
                          via=via)

    def _fail(self, claim: Claim, message_id: str, text: str, now: float, *,
              error: errors.MailError | None = None,
              state: dict[str, Any] | None = None, via: str = "") -> str:
        code = error.code if error is not None else None
        refused = error.refused if error is not None else {}
        claim.fail(_reason(message_id, text, now, code, refused, state))
        self.log.error("moved %s%s (%s) to the failed area: %s", message_id,
                       via, claim.entry.name, text)
        self._notify(MailErrorEvent(message_id, text, permanent=True, code=code,
                                    refused=refused))
        return FAILED

    def _reject_foreign(self, maildir: Maildir, entry: Entry, now: float) -> str:
        """Move what is not a regular file out of the queue, unclaimed (it
        cannot be sent, and directories cannot be claimed)."""
        text = "not a regular file (a directory, a symbolic link or a device)"
        try:
            maildir.move_to_failed(entry, _reason(entry.name, text, now))
        except FileNotFoundError:
            return SKIPPED  # another processor moved it
        self.log.error("moved %s to the failed area: %s", entry.name, text)
        self._notify(MailErrorEvent(entry.name, text, permanent=True))
        return FAILED

    def _notify(self, event: Any) -> None:
        try:
            zope.event.notify(event)
        except Exception:
            self.log.exception("an event subscriber failed on %r", event)


def _reason(message_id: str, text: str, now: float, code: int | None = None,
            refused: Mapping[str, Any] | None = None,
            state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What is recorded next to a message in the failed area."""
    state = state or {}
    return {
        "message_id": message_id,
        "permanent": True,
        "code": code,
        "error": text,
        "time": now,
        "attempts": state.get("attempts", 0),
        "first_attempt": state.get("first_attempt", now),
        "refused": dict(refused or {}),
    }


class _MissingMailer:
    """Stands for the mailer of a relay folder that has none: its messages
    are deferred, with an error naming the mailer."""

    def __init__(self, name: str) -> None:
        self.name = name

    def send(self, fromaddr: str, toaddrs: Any, message: bytes) -> None:
        raise errors.TransientMailError(
            f"no mailer named {self.name!r} is configured for its relay folder"
            " (give it to the processor, or register an IMailer utility of"
            " that name)"
        )
