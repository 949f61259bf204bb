"""Sending one message of the queue, and ending its claim.

:class:`MessageSender` is the part of
:class:`~mailoutbox.queue.QueueProcessorThread` that handles a single
message: a worker claims it, reads and parses the queue file, sends it
through the mailer of the pass and ends the claim with one of the outcomes
described in the documentation chapter "The queue on disk": sent, deferred
(a transient failure, tried again later according to the
:class:`~mailoutbox.retry.RetryPolicy`) or failed (a permanent failure, or
one retried long enough: the message is moved to the failed area).  A
message the server accepted for some recipients only is split: those
refused for now stay queued (the queue file is rewritten to name them
alone), those refused for good go to the failed area.  Each outcome is
logged, naming the Message-Id, and announced with an event.

The class is a mixin: it uses the processor's attributes, among them its
``log`` (the ``mailoutbox.queue`` logger) and ``classify`` seams, so that
a test replaces them on the processor as before.
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import zope.event

from mailoutbox import errors
from mailoutbox._deferrals import Deferrals
from mailoutbox._smtp import envelope_address
from mailoutbox.envelope import format_envelope
from mailoutbox.envelope import parse_queue_file
from mailoutbox.events import MailErrorEvent
from mailoutbox.events import MailSentEvent
from mailoutbox.maildir import Claim
from mailoutbox.maildir import Entry
from mailoutbox.maildir import Maildir
from mailoutbox.metrics import Metrics
from mailoutbox.retry import RetryPolicy
from mailoutbox.retry import record_failure
from mailoutbox.workers import DEFERRED
from mailoutbox.workers import FAILED
from mailoutbox.workers import PUT_BACK
from mailoutbox.workers import SENT
from mailoutbox.workers import SKIPPED
from mailoutbox.workers import Pass

__all__ = ["UNHANDLED", "MessageSender", "message_id_of"]

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


@dataclass(frozen=True)
class _Queued:
    """A queue file, read and parsed."""

    message_id: str
    fromaddr: str
    toaddrs: tuple[str, ...]
    message: bytes


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
    #: Counts the sends and their times (:class:`~mailoutbox.metrics.Metrics`).
    metrics: Metrics

    def _process(self, job: Pass, entry: Entry) -> str:
        maildir = job.maildir
        if not entry.regular:
            return self._reject_foreign(maildir, entry, job.now())
        try:
            if job.flush:  # this one, due or not
                claim = maildir.claim(entry, self.lease, exact=True)
            else:
                claim = maildir.claim(entry, self.lease)
        except PermissionError as exc:
            return self._reject_unclaimable(maildir, entry, exc, job.now())
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
            outcome = self._read_and_send(claim, job.now, job.mailer, via,
                                          job.deferrals, relay=job.relay, job=job)
        except BaseException:
            claim.release()  # nothing was sent: give the message back
            raise
        if not isinstance(outcome, tuple):
            return outcome
        queued, refused = outcome
        refused = dict(refused or {})
        if refused:
            return self._settle(claim, queued, refused, job.now(), via,
                                _address(job.mailer))
        try:
            claim.complete()
        except BaseException:
            self.log.error("sent %s but could not remove %s from the queue: it"
                           " will be sent again when its claim expires",
                           queued.message_id, claim.entry.name)
            raise
        self.log.info("sent %s%s", queued.message_id, via)
        self._notify(MailSentEvent(queued.message_id, sent=queued.toaddrs))
        return SENT

    def _read_and_send(self, claim: Claim, clock: Callable[[], float],
                       mailer: Any, via: str, deferrals: Deferrals, *,
                       relay: str | None = None,
                       job: Pass | None = None) -> str | tuple[_Queued, Any]:
        """Send the message, or end the claim if it cannot be sent (now).

        Returns the outcome, or ``(queued, refused)`` once sent.
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
        queued = _Queued(message_id_of(message, name), fromaddr, toaddrs, message)
        started = time.perf_counter()
        try:
            refused = mailer.send(fromaddr, toaddrs, message)
        except Exception as exc:
            self.metrics.sent_in(relay, time.perf_counter() - started)
            return self._failed_attempt(claim, queued, exc, clock(), via, mailer,
                                        deferrals, job)
        self.metrics.sent_in(relay, time.perf_counter() - started)
        return queued, refused

    def _failed_attempt(self, claim: Claim, queued: _Queued, exc: Exception,
                        now: float, via: str, mailer: Any,
                        deferrals: Deferrals, job: Pass | None = None) -> str:
        """Defer the message, or fail it if the error is permanent or the
        message has been retried long enough.

        A deferral that is the relay's doing (not one of the message's
        recipients refused) is counted in *deferrals*, which the pass logs
        as one line, and logged at INFO only."""
        message_id = queued.message_id
        try:
            error = self.classify(exc)
        except Exception:
            self.log.exception("could not classify the error sending %s", message_id)
            error = errors.TransientMailError(f"unclassified error: {exc!r}")
        if (isinstance(error, errors.MailThrottledError) and job is not None
                and job.throttled(claim.entry)):
            claim.release()  # not counted as an attempt: tried again soon
            self.log.warning("%s throttled %s%s, trying it again later in this"
                             " pass: %s", _server(mailer), message_id, via, error)
            return PUT_BACK
        if (isinstance(error, errors.RecipientsRefused)
                and len({_permanent(reply) for reply in error.refused.values()}) > 1):
            # Some refused for good, others for now: split the message.
            return self._settle(claim, queued, error.refused, now, via,
                                _address(mailer))
        previous = claim.retry_state() or {}
        state = record_failure(self.retry, previous, now,
                               code=error.code, error=str(error))
        for key in ("sent",):  # of a message partly sent before
            if key in previous:
                state[key] = previous[key]
        server = _address(mailer)
        if server is not None:
            state["server"] = server
        if not error.permanent and not state.pop("expired"):
            claim.defer(state["next_attempt"], state)
            wait = state["next_attempt"] - now
            if isinstance(error, _CONFIGURATION_ERRORS):
                self.log.error(
                    "could not send %s%s: configuration problem with %s (fix"
                    " the mailer's settings or the server; the message stays"
                    " queued, attempt %d, next in %.0f s): %s",
                    message_id, via, _server(mailer), state["attempts"], wait,
                    error)
            elif error.refused:  # the message's own recipients
                self.log.warning(
                    "could not send %s%s (attempt %d), will try again in %.0f s:"
                    " %s", message_id, via, state["attempts"], wait, error)
            else:
                deferrals.add(message_id, server, str(error), wait)
                self.log.info(
                    "could not send %s (%d recipient(s))%s%s (attempt %d), will"
                    " try again in %.0f s: %s", message_id, len(queued.toaddrs),
                    via, "" if server is None else f" through {server}",
                    state["attempts"], wait, error)
            self._notify(MailErrorEvent(message_id, str(error), permanent=False,
                                        code=error.code, deferred=error.refused))
            return DEFERRED
        text = str(error)
        if not error.permanent:
            text = _expired(state, now, text)
        return self._fail(claim, message_id, text, now, error=error, state=state,
                          via=via)

    def _settle(self, claim: Claim, queued: _Queued,
                refused: Mapping[str, tuple[int, str]], now: float,
                via: str, server: str | None = None) -> str:
        """End the claim of a message refused for some of its recipients.

        The server accepted it for the others (if any), which must never
        get it again.  Those refused for good (5xx) are split off into the
        failed area, a copy of the message addressed to them alone; for
        those refused for now (4xx) the queue file is rewritten to address
        them alone, and deferred.  Once no recipient is left, the message
        is removed.  In that order, so that a crash in between sends the
        message again (to recipients who had it) rather than lose it.
        """
        message_id = queued.message_id
        keys = {address: _envelope_key(address) for address in queued.toaddrs}
        sent = tuple(a for a in queued.toaddrs
                     if a not in refused and keys[a] not in refused)
        deferred = {a: r for a, r in refused.items() if not _permanent(r)}
        failed = {a: r for a, r in refused.items() if _permanent(r)}
        previous = claim.retry_state() or {}
        earlier = previous.get("sent")
        # Everyone the message was sent to, in this attempt and before.
        had_it = [*(earlier if isinstance(earlier, list) else []), *sent]
        state: dict[str, Any] = {}
        if deferred:
            state = record_failure(
                self.retry, previous, now, code=max(c for c, _ in deferred.values()),
                error="refused for now: " + _listing(deferred))
            state["deferred"] = deferred
            state["sent"] = had_it
            if server is not None:
                state["server"] = server
            if state.pop("expired"):
                failed.update(deferred)
                deferred = {}
        try:
            if failed:
                text = "refused: " + _listing(failed)
                if state and not deferred:
                    text = _expired(state, now, text)
                part = claim.split_failed(
                    format_envelope(queued.fromaddr,
                                    _addresses(queued.toaddrs, keys, failed))
                    + queued.message,
                    _reason(message_id, text, now,
                            max(c for c, _ in failed.values()), failed, state,
                            sent=had_it))
            if deferred:
                claim.rewrite(format_envelope(
                    queued.fromaddr, _addresses(queued.toaddrs, keys, deferred))
                    + queued.message)
                claim.defer(state["next_attempt"], state)
            else:
                claim.complete()
        except BaseException:
            if sent:
                self.log.error(
                    "sent %s%s to %s but could not record it in the queue: it"
                    " will be sent to them again", message_id, via, ", ".join(sent))
            claim.release()
            raise
        if sent:
            self.log.warning("sent %s%s, but the server refused %s", message_id,
                             via, _listing(refused))
        if failed:
            self.log.error("moved %s%s for %s to the failed area as %s: %s",
                           message_id, via, ", ".join(failed), part.name, text)
        if deferred:
            self.log.warning(
                "kept %s%s queued for %s (attempt %d), will try again in %.0f s",
                message_id, via, ", ".join(deferred), state["attempts"],
                state["next_attempt"] - now)
        if sent:
            event: Any = MailSentEvent(message_id, failed, sent=sent,
                                       deferred=deferred)
        else:
            error = errors.RecipientsRefused(refused)
            event = MailErrorEvent(message_id, str(error), permanent=not deferred,
                                   code=error.code, refused=failed,
                                   deferred=deferred)
        self._notify(event)
        if deferred:
            return DEFERRED
        return SENT if sent else FAILED

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

    def _reject_unclaimable(self, maildir: Maildir, entry: Entry,
                            exc: PermissionError, now: float) -> str:
        """Move a queue file this processor may not claim (it belongs to
        another user, e.g. root) to the failed area, unclaimed; if even
        that is not allowed, say so in one line, each pass."""
        try:
            info = os.lstat(entry.path)
        except FileNotFoundError:
            return SKIPPED  # sent or moved by someone else meanwhile
        text = (
            f"cannot be claimed: {exc.strerror} (the file belongs to uid"
            f" {info.st_uid}, mode {info.st_mode & 0o7777:04o}; the processor"
            f" runs as uid {os.geteuid()}): give it to the queue's owner and"
            " run 'mailoutbox retry'"
        )
        try:
            maildir.move_to_failed(entry, _reason(entry.name, text, now))
        except FileNotFoundError:
            return SKIPPED
        except PermissionError as error:
            self.log.error("cannot claim %s, nor move it to the failed area (%s):"
                           " %s", entry.path, error.strerror, text, extra=UNHANDLED)
            return SKIPPED
        self.log.error("moved %s to the failed area: %s", entry.name, text)
        self._notify(MailErrorEvent(entry.name, text, permanent=True))
        return FAILED

    def _notify(self, event: Any) -> None:
        try:
            zope.event.notify(event)
        except Exception:
            self.log.exception("an event subscriber failed on %r", event)


#: The ``extra`` of a log line about a message left in the queue because it
#: could not be handled, without a traceback: ``mailoutbox run`` counts
#: these lines, and those that come with an exception.
UNHANDLED = {"mailoutbox_unhandled": True}


#: The errors that mean the mailer's or the server's configuration is at
#: fault (TLS, authentication): the messages wait, and an ERROR says so.
_CONFIGURATION_ERRORS = errors.MailConfigurationError


def _address(mailer: Any) -> str | None:
    """``host:port`` of the server a mailer sends to, if it has one."""
    host = getattr(mailer, "hostname", None)
    if host is None:
        return None
    return f"{host}:{getattr(mailer, 'port', '')}".rstrip(":")


def _server(mailer: Any) -> str:
    """The server a mailer sends to, for a log line."""
    address = _address(mailer)
    return repr(mailer) if address is None else address


def _permanent(reply: tuple[int, str]) -> bool:
    code = reply[0]
    return isinstance(code, int) and errors.is_permanent_code(code)


def _envelope_key(address: str) -> str:
    """The address as the mailer puts it in the envelope (and names it
    among the refused recipients)."""
    try:
        return envelope_address(address)
    except (errors.MailError, TypeError):
        return address


def _addresses(toaddrs: tuple[str, ...], keys: Mapping[str, str],
               chosen: Mapping[str, Any]) -> list[str]:
    """The recipients of *toaddrs* named in *chosen* (by their address as
    queued or as in the envelope), and those of *chosen* not found there."""
    found = [a for a in toaddrs if a in chosen or keys[a] in chosen]
    named = set(found) | {keys[a] for a in found}
    return [*found, *(a for a in chosen if a not in named)]


def _listing(refused: Mapping[str, tuple[int, str]]) -> str:
    return ", ".join(f"{a} ({c} {t})" for a, (c, t) in refused.items())


def _expired(state: Mapping[str, Any], now: float, text: str) -> str:
    hours = (now - state["first_attempt"]) / 3600
    return f"expired after {state['attempts']} attempts in {hours:.1f} h: {text}"


def _reason(message_id: str, text: str, now: float, code: int | None = None,
            refused: Mapping[str, Any] | None = None,
            state: Mapping[str, Any] | None = None, *,
            sent: list[str] | None = None) -> dict[str, Any]:
    """What is recorded next to a message in the failed area."""
    state = state or {}
    server = {"server": state["server"]} if "server" in state else {}
    return {
        **server,
        "message_id": message_id,
        "permanent": True,
        "code": code,
        "error": text,
        "time": now,
        "attempts": state.get("attempts", 0),
        "first_attempt": state.get("first_attempt", now),
        "refused": dict(refused or {}),
        "sent": list(state.get("sent") or []) if sent is None else sent,
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
