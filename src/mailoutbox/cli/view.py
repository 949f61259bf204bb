"""A read-only view of a queue for the commands that look after it.

The states shown to people are:

``queued``
    waiting for the next pass of a processor;
``deferred``
    kept back after a transient failure until its next attempt;
``scheduled``
    sent for a time still to come (``send(..., not_before=...)``) and
    never tried yet; a processor counts it as deferred;
``sending``
    claimed by a processor right now;
``failed``
    in the failed area, never tried again unless retried.

The view covers the queue's relay folders too (:mod:`mailoutbox.relays`):
each message knows the folder it is in and the relay it is routed to.
"""
from __future__ import annotations

import email.parser
import email.policy
import os
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from mailoutbox.cli.errors import EXIT_ERROR
from mailoutbox.cli.errors import EXIT_NOT_FOUND
from mailoutbox.cli.errors import EXIT_USAGE
from mailoutbox.cli.errors import CLIError
from mailoutbox.envelope import parse_queue_file
from mailoutbox.maildir import Entry
from mailoutbox.maildir import Maildir
from mailoutbox.schedule import PRIORITIES
from mailoutbox.schedule import scheduled_for
from mailoutbox.stores import is_url
from mailoutbox.stores import open_store

__all__ = [
    "STATES",
    "WAITING",
    "Head",
    "MessageInfo",
    "QueueView",
    "clean",
    "format_age",
    "format_priority",
    "format_time",
    "open_queue",
    "read_file",
    "read_head",
]

STATES = ("queued", "deferred", "sending", "failed", "scheduled")
#: The states of the messages waiting in the queue.
WAITING = ("queued", "deferred", "scheduled", "sending")
#: How much of a queue file is read to show its envelope and headers.
HEAD_SIZE = 64 * 1024


def open_queue(path: str) -> Any:
    """The queue (:class:`~mailoutbox.interfaces.IQueueStore`) at *path*
    (a folder or a ``postgresql://`` URL), or a :class:`CLIError` saying
    why not.

    A folder this process may not look into raises :class:`PermissionError`
    (the command reports ``Permission denied: PATH`` and exits with
    status 4) rather than passing for a missing queue or a folder that is
    not one.
    """
    if is_url(path):
        try:
            return open_store(path)
        except ValueError as exc:  # unreachable (4), else bad URL or schema (2)
            from mailoutbox.postgresql import ConnectError
            code = EXIT_ERROR if isinstance(exc, ConnectError) else EXIT_USAGE
            raise CLIError(str(exc), code) from None
    try:
        return Maildir(path)
    except ValueError:
        pass
    for folder in (path, *(os.path.join(path, sub) for sub in ("tmp", "new", "cur"))):
        try:
            os.stat(folder)
        except PermissionError as exc:
            raise PermissionError(exc.errno, exc.strerror, path) from None
        except OSError:
            break
    if not os.path.exists(path):
        raise CLIError(f"no queue at {path}: no such directory")
    raise CLIError(
        f"{path} is not a mail queue (a Maildir folder with tmp, new and"
        " cur)", EXIT_USAGE,
    )


def clean(text: object) -> str:
    """*text* made safe for a terminal: control characters escaped."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_age(seconds: float) -> str:
    """A duration for people: ``45s``, ``12m``, ``3h 05m``, ``2d 04h``."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s" if minutes < 10 else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def format_time(timestamp: float) -> str:
    """A local time for people, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def format_priority(priority: int) -> str:
    """A priority for people: its name (``high``), else its number."""
    names = {number: name for name, number in PRIORITIES.items()}
    return names.get(priority, str(priority))


@dataclass
class Head:
    """The envelope and headers of a queue file (or why they are missing)."""

    fromaddr: str | None = None
    toaddrs: tuple[str, ...] = ()
    headers: EmailMessage | None = None
    problem: str | None = None

    def header(self, name: str) -> str | None:
        if self.headers is None:
            return None
        value = self.headers.get(name)
        return None if value is None else str(value)

    @property
    def message_id(self) -> str | None:
        value = self.header("Message-Id")
        return value.strip().strip("<>") if value else None


def read_file(store: Any, entry: Entry, size: int = -1) -> bytes:
    """The first *size* bytes of *entry* (all with -1) of *store*; a
    symbolic link is not followed."""
    return bytes(store.read(entry, size))


def read_head(store: Any, entry: Entry, size: int = HEAD_SIZE) -> Head:
    """Read the envelope and headers of *entry* of *store*; symbolic links
    and other odd files are not followed or read."""
    if not entry.regular:
        return Head(problem="not a regular file")
    try:
        data = read_file(store, entry, size)
    except FileNotFoundError:
        return Head(problem="gone (sent or removed meanwhile)")
    except OSError as exc:
        return Head(problem=exc.strerror or str(exc))
    try:
        fromaddr, toaddrs, message = parse_queue_file(data)
    except ValueError as exc:
        return Head(problem=str(exc))
    parser = email.parser.BytesParser(policy=email.policy.default)
    headers = parser.parsebytes(message, headersonly=True)
    return Head(fromaddr, toaddrs, headers)  # type: ignore[arg-type]


@dataclass
class MessageInfo:
    """One message of the queue and its state."""

    entry: Entry
    state: str
    queued_at: float
    retry_at: float | None = None
    _head: Head | None = None
    #: The store of the message's lane: the queue, or a relay's.
    maildir: Any = None
    #: The name of the relay (mailer) it is routed to; None: the default.
    relay: str | None = None
    _record: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def head(self) -> Head:
        if self._head is None:
            self._head = read_head(self.maildir, self.entry)
        return self._head

    @property
    def record(self) -> dict[str, Any]:
        """What the queue recorded about it: the retry state of a message
        tried before (see :func:`mailoutbox.retry.record_failure`), or why
        a failed message failed; ``{}`` when there is nothing (or nothing
        readable)."""
        if self._record is None:
            maildir: Any = self.maildir
            read = maildir.reason if self.state == "failed" else maildir.retry_state
            self._record = read(self.entry) or {}
        return self._record

    @property
    def priority(self) -> int:
        """Its priority (higher is sent first; 0 normal)."""
        return int(self.maildir.priority(self.entry))  # type: ignore[union-attr]

    @property
    def scheduled_for(self) -> float | None:
        """The time it was sent for (``not_before``), if it was never tried
        since; else None."""
        if self.state == "failed":
            return None
        return scheduled_for(self.record)

    def last_error(self) -> dict[str, Any]:
        """``attempts``, ``error``, ``code`` and ``server`` of the last
        failed attempt (each None when unknown, or not of the right type in
        a damaged record)."""
        record = self.record
        return {
            "attempts": _typed(record, "attempts", int),
            "error": _typed(record, "error", str),
            "code": _typed(record, "code", int),
            "server": _typed(record, "server", str),
        }

    def as_dict(self, now: float) -> dict[str, Any]:
        """The message as JSON-able data (see the ``list --json`` keys)."""
        head = self.head
        routed = {} if self.relay is None else {"relay": self.relay}
        return {
            **self.last_error(),
            **routed,
            "id": self.name,
            "state": self.state,
            "queued_at": self.queued_at,
            "age": round(max(0.0, now - self.queued_at), 3),
            "next_attempt": (self.retry_at if self.state in ("deferred", "scheduled")
                             else None),
            "not_before": self.scheduled_for,
            "priority": self.priority,
            "message_id": head.message_id,
            "from": head.fromaddr,
            "to": list(head.toaddrs),
            "subject": head.header("Subject"),
            "problem": head.problem,
        }


def _typed(record: dict[str, Any], key: str, kind: type) -> Any:
    value = record.get(key)
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    return None


class QueueView:
    """The messages of the queue at *path*, as of the moment it was made."""

    def __init__(self, path: str, now: float | None = None) -> None:
        self.maildir = open_queue(path)
        self.now = time.time() if now is None else now
        self.messages: list[MessageInfo] = []
        #: The stores of the relays, by relay name.
        self.relays: dict[str, Any] = {}
        self._add(self.maildir, None)
        for name in self.maildir.relays():
            try:
                maildir = self.maildir.relay(name)
            except ValueError:  # not a Maildir: no processor reads it either
                continue
            self.relays[name] = maildir
            self._add(maildir, name)

    @property
    def location(self) -> str:
        """The queue, for people: an absolute path, or a URL."""
        if is_url(self.maildir.path):
            return str(self.maildir.path)
        return os.path.abspath(self.maildir.path)

    def _add(self, maildir: Any, relay: str | None) -> None:
        scan = maildir.scan()
        for entry in scan.entries:
            retry_at = scan.retry_at.get(entry.name)
            if entry.name in scan.claimed:
                state = "sending"
            elif retry_at is not None and retry_at > self.now:
                state = "deferred"
            else:
                state = "queued"
            info = MessageInfo(entry, state, maildir.queued_at(entry), retry_at,
                               maildir=maildir, relay=relay)
            if state == "deferred" and info.scheduled_for is not None:
                info.state = "scheduled"
            self.messages.append(info)
        for entry in maildir.failed_entries():
            self.messages.append(MessageInfo(
                entry, "failed", maildir.queued_at(entry), maildir=maildir,
                relay=relay,
            ))

    def select(self, states: tuple[str, ...] | list[str],
               messages: list[MessageInfo] | None = None) -> list[MessageInfo]:
        """The messages (of *messages*, default all) in *states*, oldest
        first."""
        chosen = [m for m in (self.messages if messages is None else messages)
                  if m.state in states]
        chosen.sort(key=lambda m: (m.queued_at, m.name))
        return chosen

    def routed_to(self, relay: str) -> list[MessageInfo]:
        """The messages of the relay folder of *relay*."""
        return [m for m in self.messages if m.relay == relay]

    def counts(self, messages: list[MessageInfo] | None = None) -> dict[str, int]:
        """The number of messages (of *messages*, default all) in each
        state."""
        counts = dict.fromkeys(STATES, 0)
        for message in self.messages if messages is None else messages:
            counts[message.state] += 1
        return counts

    def find(self, ident: str) -> MessageInfo:
        """The message whose file name or Message-Id is *ident*."""
        for message in self.messages:
            if message.name == ident:
                return message
        wanted = ident.strip().strip("<>")
        found = [m for m in self.messages if m.head.message_id == wanted]
        if len(found) == 1:
            return found[0]
        if found:
            raise CLIError(
                f"{len(found)} messages have the Message-Id <{clean(wanted)}>;"
                " name one by its id: "
                + ", ".join(m.name for m in found),
                EXIT_NOT_FOUND,
            )
        raise CLIError(
            f"no message {clean(ident)!r} in {self.maildir.path}", EXIT_NOT_FOUND
        )
