"""Prepared transactions left behind by a crash between vote and finish.

A :class:`~mailoutbox.postgresql.datamanager.PostgreSQLDataManager` using
two-phase commit prepares its transaction in ``tpc_vote`` and commits it in
``tpc_finish``.  A process that dies in between (or loses its connection
and cannot reach the server again) leaves a prepared transaction: its rows
are not queued, and it holds its locks until someone decides.
:func:`orphans` lists them (their ids start with
:func:`~mailoutbox.postgresql.datamanager.gid_prefix`); :func:`resolve`
commits or rolls them back; ``mailoutbox recover URL`` does both.

Which to choose: the prepared mail transaction should be **committed** if
the transaction it belonged to committed its other resources (the
application's rows are there; the CRITICAL log line "could not commit the
prepared transaction GID" says so: ``tpc_finish`` only runs after every
resource voted yes), and **rolled back** if they aborted (the rows are not
there).  This module cannot know which; it never decides by itself.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

from mailoutbox.postgresql.datamanager import gid_prefix
from mailoutbox.postgresql.url import display
from mailoutbox.postgresql.url import parse

__all__ = ["Orphan", "orphans", "resolve"]


@dataclass(frozen=True)
class Orphan:
    """A prepared transaction of the queue, from ``pg_prepared_xacts``."""

    gid: str
    prepared: datetime.datetime
    #: Seconds since it was prepared.
    age: float
    owner: str
    database: str


_QUERY = """SELECT gid, prepared, extract(epoch FROM now() - prepared),
    owner, database FROM pg_prepared_xacts
WHERE database = current_database() AND left(gid, %s) = %s
ORDER BY prepared, gid"""


def _connect(url: str):  # type: ignore[no-untyped-def]
    import psycopg
    conninfo, table, options = parse(url)
    timeout = {} if "connect_timeout" in options else {"connect_timeout": 10}
    try:
        conn = psycopg.connect(conninfo, autocommit=True, **timeout)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().replace("\n", " ")
        if options.get("password"):
            reason = reason.replace(options["password"], "***")
        raise ConnectionError(
            f"cannot connect to the mail queue {display(url)}: {reason}") from exc
    return conn, table


def orphans(url: str, older_than: float = 0) -> list[Orphan]:
    """The prepared transactions that queue into the table of *url*,
    prepared at least *older_than* seconds ago, oldest first.

    A bad URL raises :class:`ValueError`, an unreachable database
    :class:`ConnectionError`, both naming the URL without its password.
    """
    conn, table = _connect(url)
    with conn:
        prefix = gid_prefix(table)
        rows = conn.execute(_QUERY, (len(prefix), prefix)).fetchall()
    return [Orphan(gid, prepared, float(age), owner, database)
            for gid, prepared, age, owner, database in rows
            if float(age) >= older_than]


def resolve(url: str, action: str, older_than: float = 60) -> list[str]:
    """Commit (*action* ``"commit"``) or roll back (``"rollback"``) the
    orphans of *url* prepared at least *older_than* seconds ago; return
    their ids.  The default of 60 seconds leaves alone a transaction whose
    ``tpc_finish`` is still to come in a living process.
    """
    if action not in ("commit", "rollback"):
        raise ValueError(f"action must be 'commit' or 'rollback', not {action!r}")
    found = orphans(url, older_than)
    conn, _table = _connect(url)
    done = []
    with conn:
        conn.autocommit = False  # psycopg's tpc_* refuse autocommit
        for orphan in found:
            getattr(conn, f"tpc_{action}")(orphan.gid)
            done.append(orphan.gid)
    return done
