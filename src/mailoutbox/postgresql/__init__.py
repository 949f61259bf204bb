"""The PostgreSQL queue store (the extra ``mailoutbox[postgresql]``).

:func:`open_queue` opens the queue at a ``postgresql://`` URL: a table,
created by ``mailoutbox init URL`` (:mod:`mailoutbox.postgresql.schema`),
drained by processors on any number of hosts
(:class:`~mailoutbox.postgresql.store.PostgreSQLQueue`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mailoutbox.postgresql._conn import Connections
from mailoutbox.postgresql._conn import QueueURL
from mailoutbox.postgresql._conn import describe
from mailoutbox.postgresql._conn import parse_url
from mailoutbox.postgresql.schema import SchemaError

if TYPE_CHECKING:  # pragma: no cover
    from mailoutbox.postgresql.store import PostgreSQLQueue

__all__ = ["ConnectError", "SchemaError", "connect", "open_queue"]

INSTALL = "pip install 'mailoutbox[postgresql]'"


class ConnectError(ValueError):
    """The database of a queue URL cannot be reached (or refused us)."""


def _psycopg() -> None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ValueError("a postgresql:// queue needs psycopg: "
                         + INSTALL) from None


def connect(url: str) -> tuple[QueueURL, Connections]:
    """The parsed *url* (:class:`~mailoutbox.postgresql._conn.QueueURL`) and
    its :class:`~mailoutbox.postgresql._conn.Connections`, checked by
    connecting once; :class:`ValueError` with a one-line message (without
    the password) if psycopg is missing or the URL is bad,
    :class:`ConnectError` if the server cannot be reached."""
    _psycopg()
    import psycopg

    parsed = parse_url(url)
    connections = Connections(parsed)
    try:
        conn = connections.connect()
    except psycopg.Error as exc:
        raise ConnectError(f"cannot connect to {parsed.path}: "
                           + describe(exc, parsed.password)) from None
    connections._give(conn)
    return parsed, connections


def open_queue(url: str) -> PostgreSQLQueue:
    """The queue (its default lane) at the PostgreSQL *url*.

    :class:`ValueError` when psycopg is missing, the URL is bad, the server
    cannot be reached, or the queue's schema is missing or of another
    version (:class:`SchemaError`, naming ``mailoutbox init URL``).
    """
    from mailoutbox.postgresql.schema import check
    from mailoutbox.postgresql.store import PostgreSQLQueue

    parsed, connections = connect(url)
    try:
        connections.run(lambda conn: check(conn, parsed.table, parsed.path))
    except BaseException:
        connections.close()
        raise
    return PostgreSQLQueue(parsed, connections)
