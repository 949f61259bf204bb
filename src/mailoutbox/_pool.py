"""The open SMTP connections of one :class:`mailoutbox.mailer.SMTPMailer`.

Private: which thread owns each connection, which are in use, and which
are to be closed by their thread once it is done with them.
"""

from __future__ import annotations

import threading

from ._smtp import Connection

__all__ = ["ConnectionPool"]


class ConnectionPool:
    """The open connections of one mailer and the thread owning each.

    A connection is *busy* while its thread uses it; nobody else writes to
    or closes a busy connection.  :meth:`close` (any thread, and the
    mailer's finalizer) closes the idle connections at once and marks the
    busy ones, which their threads close when they are done.  Holds no
    reference to the mailer, so that the finalizer does not keep it alive.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owners: dict[Connection, threading.Thread] = {}
        self.busy: set[Connection] = set()
        self.doomed: set[Connection] = set()

    def add(self, connection: Connection) -> None:
        """Keep *connection*, of the calling thread, busy."""
        with self.lock:
            self.owners[connection] = threading.current_thread()
            self.busy.add(connection)

    def take(self, connection: Connection) -> bool:
        """Mark the calling thread's *connection* busy; False when another
        thread closed it meanwhile."""
        with self.lock:
            if connection not in self.owners:
                return False
            self.busy.add(connection)
            return True

    def release(self, connection: Connection) -> bool:
        """The calling thread is done with *connection*: True when it is
        to be closed now (a close() came while it was busy)."""
        with self.lock:
            self.busy.discard(connection)
            if connection not in self.doomed:
                return False
            self.doomed.discard(connection)
            self.owners.pop(connection, None)
            return True

    def remove(self, connection: Connection) -> None:
        """Forget *connection* (of the calling thread)."""
        with self.lock:
            self.owners.pop(connection, None)
            self.busy.discard(connection)
            self.doomed.discard(connection)

    def reap(self) -> None:
        """Close, without QUIT, the connections of threads that ended."""
        with self.lock:
            dead = [c for c, t in self.owners.items() if not t.is_alive()]
            for connection in dead:
                del self.owners[connection]
                self.busy.discard(connection)
                self.doomed.discard(connection)
        for connection in dead:
            connection.close()

    def close(self) -> None:
        """QUIT and close the idle connections; mark the busy ones."""
        with self.lock:
            idle = [c for c in self.owners if c not in self.busy]
            for connection in idle:
                del self.owners[connection]
            self.doomed.update(self.busy)
        for connection in idle:
            connection.quit_quietly()
