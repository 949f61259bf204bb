"""Scheduled sending and priorities: what ``send()`` accepts, and how a
Maildir queue records them.

``send(..., not_before=WHEN, priority=P)`` (see
:meth:`mailoutbox.interfaces.IMailDelivery.send`) checks its two options
with :func:`check_not_before` and :func:`check_priority`; the prepared
message carries them as ``not_before`` (seconds since the epoch, or None)
and ``priority`` (an int, higher first, 0 normal).

In a Maildir queue (see the documentation chapter "The queue on disk"):

- a priority other than 0 is part of the message's file name (``,p10`` at
  the end of its middle part: ``SECONDS.M…R…,p10.HOST``), so that a
  listing orders the messages -- priority first, then oldest first --
  without opening them (:func:`priority_of`, :func:`sort_key`);
- a message not to be sent before a time gets, before it enters ``new/``,
  the retry state ``{"not_before": T, "attempts": 0}`` with the
  modification time T, as a deferred message has: the processor leaves it
  alone until then, and its first attempt is counted as the first.

zope.sendmail ignores both (it sends every message at once, oldest first).
"""
from __future__ import annotations

import datetime
import math
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

__all__ = [
    "HIGH",
    "LOW",
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "NORMAL",
    "PRIORITIES",
    "check_not_before",
    "check_priority",
    "keep_scheduled",
    "name_mark",
    "priority_of",
    "scheduled_for",
    "sort_key",
]

LOW = -10
NORMAL = 0
HIGH = 10
#: The names ``priority=`` accepts, and their numbers.
PRIORITIES = {"low": LOW, "normal": NORMAL, "high": HIGH}
#: The range of the numbers ``priority=`` accepts.
MIN_PRIORITY = -100
MAX_PRIORITY = 100

_MARK = re.compile(r",p(-?[0-9]{1,3})\Z")


def check_priority(value: Any) -> int:
    """The priority *value* as a number: None is ``0`` (normal);
    ``"low"``, ``"normal"`` and ``"high"`` are -10, 0 and 10; an int from
    :data:`MIN_PRIORITY` to :data:`MAX_PRIORITY` (-100 to 100) is itself.
    Higher is sent first.

    >>> from mailoutbox.schedule import check_priority
    >>> check_priority("high"), check_priority(None), check_priority(-5)
    (10, 0, -5)

    Raises :class:`TypeError` for anything else than None, a str or an
    int, and :class:`ValueError` for another name or a number out of range.
    """
    if value is None:
        return NORMAL
    if isinstance(value, str):
        try:
            return PRIORITIES[value]
        except KeyError:
            raise ValueError(
                f"unknown priority {value!r}: give 'low', 'normal' or 'high',"
                f" or a number from {MIN_PRIORITY} to {MAX_PRIORITY}"
            ) from None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(
            "priority must be 'low', 'normal', 'high' or an int, not"
            f" {type(value).__name__}"
        )
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise ValueError(
            f"priority {value} is out of range: give a number from"
            f" {MIN_PRIORITY} to {MAX_PRIORITY}"
        )
    return int(value)


def check_not_before(value: Any,
                     now: Callable[[], float] = time.time) -> float | None:
    """The time *value* stands for, in seconds since the epoch, or None
    (send as soon as possible).

    Accepted: None; a timezone-aware :class:`~datetime.datetime`; a
    :class:`~datetime.timedelta` from now (not negative); a number of
    seconds since the epoch (an int or a float).  A naive ``datetime`` is
    refused: the time it means depends on the time zone of the machine,
    which for a queue drained elsewhere is a guess; give it a ``tzinfo``
    (e.g. ``datetime.now(timezone.utc) + timedelta(hours=1)``).  A time in
    the past is kept: the message is due at once.

    Raises :class:`TypeError` for another type, :class:`ValueError` for a
    naive datetime, a negative timedelta, or a number that is negative,
    infinite or not a number.
    """
    if value is None:
        return None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"not_before {value.isoformat()} has no time zone: give an"
                " aware datetime (e.g. with tzinfo=datetime.timezone.utc)"
            )
        return value.timestamp()
    if isinstance(value, datetime.timedelta):
        if value < datetime.timedelta(0):
            raise ValueError(f"not_before must not be a negative delay: {value}")
        return now() + value.total_seconds()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(
            "not_before must be an aware datetime, a timedelta or seconds"
            f" since the epoch, not {type(value).__name__}"
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"not_before must be a finite number of seconds since the epoch,"
            f" not {value!r}"
        )
    return float(value)


# -- the Maildir queue's file names -------------------------------------------

def name_mark(priority: int) -> str:
    """What the middle part of a queue file's name ends with for
    *priority* (``""`` for 0)."""
    return f",p{priority}" if priority else ""


def priority_of(name: str) -> int:
    """The priority a queue file's *name* records (0 without a mark: also
    for zope.sendmail's names and anything foreign)."""
    if "," not in name:
        return NORMAL
    parts = name.split(".", 2)
    if len(parts) < 3:
        return NORMAL
    found = _MARK.search(parts[1])
    if found is None:
        return NORMAL
    return max(MIN_PRIORITY, min(MAX_PRIORITY, int(found.group(1))))


def sort_key(name: str) -> tuple[int, str]:
    """The order of a queue listing: higher priority first, then by name
    (the time the message was queued, oldest first)."""
    return (-priority_of(name), name)


# -- scheduled messages -------------------------------------------------------

def scheduled_for(state: dict[str, Any] | None) -> float | None:
    """The time a message with the retry *state* is scheduled for, if it
    was sent with ``not_before`` and never tried (else None)."""
    if not state:
        return None
    when = state.get("not_before")
    if (not isinstance(when, (int, float)) or isinstance(when, bool)
            or not math.isfinite(when) or state.get("attempts")):
        return None
    return float(when)


def keep_scheduled(store: Any, scan: Any, now: float) -> Any:
    """The *scan* of *store* for a flush (``process_queue(flush=True)``,
    ``mailoutbox run --flush``): every deferred message due now, except the
    messages scheduled for later, which keep their time.

    Reads the retry state of each message not due yet (a flush is rare).
    """
    entries = {entry.name: entry for entry in scan.entries}
    kept = {}
    for name, retry_at in scan.retry_at.items():
        entry = entries.get(name)
        if retry_at <= now or entry is None:
            continue
        when = scheduled_for(store.retry_state(entry))
        if when is not None and when > now:
            kept[name] = retry_at
    return replace(scan, retry_at=kept)
