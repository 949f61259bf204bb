"""The URL of a PostgreSQL queue, and the connections of one process to it.

A queue URL is a libpq URL (``postgresql://user:password@host:port/db?...``)
with two parameters of our own, removed before the URL goes to libpq:
``table`` (the queue's table, default ``mail_queue``, may be
``schema.table``), ``keep_sent`` (days to keep sent messages as a sent
log, default 0: sent messages are deleted) and ``durable_complete`` (``1``:
the end of a sent message's claim waits for the database's disk; default
``0``, see :meth:`mailoutbox.postgresql.store.PostgreSQLClaim.complete`).

:class:`Connections` lends autocommit connections to one statement (or one
short transaction) at a time, from any thread: a psycopg connection is never
used by two threads at once.  A statement that fails because the connection
broke (a database restart) is run again once on a new connection when it is
idempotent; a server that cannot be reached is waited for a few seconds
(:attr:`Connections.reconnect_window`) before a statement fails.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from typing import TypeVar
from urllib.parse import unquote

from mailoutbox.postgresql.schema import check_table_name

__all__ = ["DEFAULT_TABLE", "Connections", "QueueURL", "describe", "parse_url",
           "redact"]

log = logging.getLogger("mailoutbox.postgresql")

DEFAULT_TABLE = "mail_queue"
#: The URL parameters that are ours, not libpq's.
OWN_PARAMETERS = ("table", "keep_sent", "durable_complete")
#: Seconds to wait for a connection when the URL does not say
#: (``connect_timeout``).
CONNECT_TIMEOUT = 10
_T = TypeVar("_T")


@dataclass(frozen=True)
class QueueURL:
    """A queue URL taken apart."""

    #: The URL for libpq (our own parameters removed; with the password).
    conninfo: str
    #: The URL as given, without its password (for people and logs).
    path: str
    #: Equal for every spelling of the same queue (no password).
    key: str
    table: str
    keep_sent: int
    password: str
    #: The completion of a claim waits for the disk (see
    #: :meth:`mailoutbox.postgresql.store.PostgreSQLClaim.complete`).
    durable_complete: bool = False


def redact(text: str, password: str) -> str:
    """*text* with *password* (if any) masked."""
    return text.replace(password, "***") if password else text


def describe(exc: BaseException, password: str = "") -> str:
    """The first line of the message of *exc* (libpq's run over several),
    with *password* masked."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    return redact(lines[0] if lines and lines[0] else type(exc).__name__,
                  password)


def parse_url(url: str) -> QueueURL:
    """Take the queue URL *url* apart; :class:`ValueError` (without the
    password) if it is not one."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("postgresql", "postgres"):
        raise ValueError("a queue URL starts with postgresql://")
    rest, _, query = rest.partition("?")
    netloc, slash, database = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    shown = f"{scheme}://{user}{at}{hosts}{slash}{database}"
    # libpq's parameters are passed on as they were written (libpq decodes
    # %XX, and not "+", which a parse and re-encode would change).
    raw = [item for item in query.split("&") if item]
    params = [(unquote(k), unquote(v)) for k, _eq, v in
              (item.partition("=") for item in raw)]
    ours = {k: v for k, v in params if k in OWN_PARAMETERS}
    theirs = [item for item, (k, _v) in zip(raw, params, strict=True)
              if k not in OWN_PARAMETERS]
    password = dict(params).get("password", password)
    shown_params = [item for item, (k, _v) in zip(raw, params, strict=True)
                    if k != "password"]
    if shown_params:
        shown += "?" + "&".join(shown_params)
    safe = redact(shown, password)
    table = ours.get("table", DEFAULT_TABLE)
    try:
        check_table_name(table)
        keep_sent = int(ours.get("keep_sent", "0"))
        if keep_sent < 0:
            raise ValueError("keep_sent must be 0 or more days")
        durable = ours.get("durable_complete", "0")
        if durable not in ("0", "1"):
            raise ValueError("durable_complete must be 0 or 1")
    except ValueError as exc:
        raise ValueError(f"invalid queue URL {safe}: {exc}") from None
    conninfo = f"{scheme}://{netloc}{slash}{database}"
    if theirs:
        conninfo += "?" + "&".join(theirs)
    try:
        parts = conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        raise ValueError(f"invalid queue URL {safe}:"
                         f" {describe(exc, password)}") from None
    key = "postgresql://{}@{}:{}/{}?table={}".format(
        parts.get("user", ""), str(parts.get("host", "")).lower(),
        parts.get("port", ""), parts.get("dbname", ""), table)
    return QueueURL(conninfo, safe, key, table, keep_sent, password,
                    durable == "1")


class Connections:
    """Autocommit connections to the database of *url*, lent to one caller
    at a time (see :meth:`run`); at most *idle* are kept open between
    uses."""

    #: Seconds during which a lost server is waited for (a restart) before
    #: a statement fails.
    reconnect_window = 10.0

    def __init__(self, url: QueueURL, idle: int = 8) -> None:
        self.url = url
        self.idle = idle
        self._free: list[Any] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._inherited: list[Any] = []

    def connect(self, autocommit: bool = True) -> Any:
        """A new connection (psycopg's errors if it cannot be made)."""
        import psycopg

        options = {} if "connect_timeout" in self.url.conninfo else {
            "connect_timeout": CONNECT_TIMEOUT}
        return psycopg.connect(self.url.conninfo, autocommit=autocommit,
                               application_name="mailoutbox", **options)

    def reconnect(self) -> Any:
        """A new connection, trying again for :attr:`reconnect_window`
        seconds (with back-off) while the server cannot be reached, as
        while it restarts."""
        import psycopg

        deadline = time.monotonic() + self.reconnect_window
        delay = 0.05
        while True:
            try:
                return self.connect()
            except psycopg.OperationalError:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _take(self) -> Any:
        with self._lock:
            if self._pid != os.getpid():
                # Forked: the parent's connections are not ours to use, nor
                # to close (closing would end the parent's sessions).
                self._inherited += self._free
                self._free, self._pid = [], os.getpid()
            if self._free:
                return self._free.pop()
        return self.reconnect()

    def _give(self, conn: Any) -> None:
        if not conn.broken and not conn.closed:
            with self._lock:
                if len(self._free) < self.idle:
                    self._free.append(conn)
                    return
        conn.close()

    def discard_idle(self) -> None:
        """Close the connections kept open (after one broke: the others
        probably did too)."""
        with self._lock:
            free, self._free = self._free, []
        for conn in free:
            conn.close()

    def run(self, work: Callable[[Any], _T], retry: bool = True) -> _T:
        """``work(connection)``, on a connection of the caller's own for the
        time of the call; if the connection broke (the database restarted),
        again on a new connection when *retry* (the work is idempotent)."""
        import psycopg

        conn = self._take()
        try:
            return work(conn)
        except psycopg.OperationalError as exc:
            if not conn.broken or not retry:
                raise
            log.warning("lost the connection to %s (%s): reconnecting",
                        self.url.path, describe(exc, self.url.password))
            conn.close()
            self.discard_idle()
            conn = self.reconnect()
            return work(conn)
        finally:
            self._give(conn)

    def close(self) -> None:
        """Close the connections kept open."""
        self.discard_idle()
