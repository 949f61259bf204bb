"""Waking a processor when a message is committed to a PostgreSQL queue.

The transaction that queues messages sends ``NOTIFY`` on a channel named
after the queue's table (its bare name, without its schema; its full name
is listened to as well), with the relay name as payload ('' for the
default mailer).  :class:`NotifyWatcher` LISTENs on a
connection of its own, in a thread, and wakes the processor's lanes; when
the connection drops (a database restart), it connects again with back-off
and wakes every lane once connected, since what was committed meanwhile was
not heard.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from mailoutbox.postgresql._conn import Connections
from mailoutbox.postgresql._conn import describe
from mailoutbox.wakeup import ALL

__all__ = ["NotifyWatcher"]

log = logging.getLogger("mailoutbox.postgresql")


class NotifyWatcher:
    """Calls ``on_wake({relay})`` (None for the default mailer) from a
    thread of its own for every notification on the queue's channel.

    :meth:`start` waits (at most *timeout* seconds) until the thread
    listens, and returns False (the processor then polls) if it could not;
    :meth:`stop` returns within about *poll* seconds.
    """

    #: Seconds between attempts to connect again, doubling up to the max.
    backoff = (0.2, 10.0)

    def __init__(self, connections: Connections, table: str,
                 on_wake: Callable[[set[str | None]], None], name: str,
                 timeout: float = 10.0, poll: float = 0.5) -> None:
        self.connections = connections
        # The table's bare name; its full name too (schema.table), which
        # some senders may notify on.
        self.channels = sorted({table.split(".")[-1], table})
        self.on_wake = on_wake
        self.name = name
        self.timeout = timeout
        self.poll = poll
        self.thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._failed = threading.Event()

    def covers(self, relay: str | None) -> bool:
        """Whether the thread listens now (then every lane is covered)."""
        return self._listening.is_set()

    def start(self) -> bool:
        thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread = thread
        thread.start()
        for _ in range(int(self.timeout / 0.05) + 1):
            if self._listening.wait(0.05):
                log.info("listening for new messages in %s",
                         self.connections.url.path)
                return True
            if self._failed.is_set():
                break
        log.warning("cannot listen for new messages in %s: checking it every"
                    " interval", self.connections.url.path)
        self.stop()
        return False

    def stop(self) -> None:
        """End the thread; returns promptly."""
        self._stopping.set()
        thread, self.thread = self.thread, None
        if thread is not None:
            thread.join()
        self._listening.clear()

    def close(self) -> None:
        self.stop()

    def _run(self) -> None:
        from psycopg import sql

        delay, most = self.backoff
        first = True
        while not self._stopping.is_set():
            try:
                with self.connections.connect() as conn:
                    for channel in self.channels:
                        conn.execute(sql.SQL("LISTEN {}").format(
                            sql.Identifier(channel)))
                    self._listening.set()
                    if not first:  # what was committed meanwhile went unheard
                        log.info("listening again for new messages in %s",
                                 self.connections.url.path)
                        self.on_wake({ALL})
                    first = False
                    delay = self.backoff[0]
                    self._listen(conn)
            except Exception as exc:
                self._listening.clear()
                if first:
                    self._failed.set()
                log.warning("not listening for new messages in %s (%s): trying"
                            " again in %.1f s", self.connections.url.path,
                            describe(exc, self.connections.url.password),
                            delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, most)

    def _listen(self, conn: Any) -> None:
        while not self._stopping.is_set():
            for note in conn.notifies(timeout=self.poll):
                self.on_wake({note.payload or None})
