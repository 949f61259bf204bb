"""The deferrals of one pass that are the relay's doing, told in one line.

When a relay is down (the connection is refused, it times out, it answers
421 to everyone), every message of a pass is deferred for the same reason.
Rather than one WARNING per message, the processor logs one line per
relay and pass (:meth:`Deferrals.summary`): how many messages were
deferred, the error, and when the first is tried again.  Each message
still has its own line at INFO (``-v``).  Errors specific to one message
(its recipients refused, a permanent failure, a configuration problem)
are logged on their own, not here.
"""
from __future__ import annotations

import threading
from collections import Counter

__all__ = ["Deferrals"]


class Deferrals:
    """Counts the messages a pass deferred, by server and error; safe to
    use from the pass's worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors: Counter[tuple[str | None, str]] = Counter()
        self._first_message: dict[tuple[str | None, str], str] = {}
        self.count = 0
        #: Seconds until the earliest next attempt, as of its deferral.
        self.wait: float | None = None

    def add(self, message_id: str, server: str | None, error: str,
            wait: float) -> None:
        """Count *message_id*, deferred for *error* said by *server*
        (``host:port``, or None), to be tried again in *wait* seconds."""
        key = (server, error)
        with self._lock:
            self.count += 1
            self._errors[key] += 1
            self._first_message.setdefault(key, message_id)
            self.wait = wait if self.wait is None else min(self.wait, wait)

    def summary(self, relay: str | None) -> tuple[str, tuple[object, ...]] | None:
        """The log line for the pass of *relay* (None: the queue itself),
        as a format and its arguments; None when nothing was deferred."""
        with self._lock:
            if not self.count:
                return None
            (server, error), count = self._errors.most_common(1)[0]
            others = self.count - count
            first = self._first_message[(server, error)]
            wait = self.wait
        text = "deferred %d message(s)%s%s, e.g. %s: %s"
        args: list[object] = [
            self.count, "" if relay is None else f" via relay {relay!r}",
            "" if server is None else f" through {server}", first, error]
        if others:
            text += " (%d of them for other reasons)"
            args.append(others)
        text += "; the first is tried again in %.0f s (-v: one line per message)"
        args.append(wait)
        return text, tuple(args)
