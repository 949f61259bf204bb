"""Fixtures for the tests of the PostgreSQL queue: one real server per test
module, a fresh queue table per test.  Import the fixtures into a test
module (``from tests.pg_fixtures import pg_server, pg_url  # noqa: F401``)."""
from __future__ import annotations

import itertools

import pytest

psycopg = pytest.importorskip("psycopg")

from mailoutbox.testing.postgresql import PostgreSQLServer  # noqa: E402
from mailoutbox.testing.postgresql import find_bindir  # noqa: E402

__all__ = ["insert", "pg_server", "pg_url", "raw_url", "table_url"]

_tables = itertools.count(1)


@pytest.fixture(scope="module")
def pg_server():
    if find_bindir() is None:
        pytest.skip("PostgreSQL is not installed (Debian's postgresql package)")
    # Commits reach the WAL before an immediate restart ("crash") of the
    # server; fsync is not needed as the machine itself does not crash.
    with PostgreSQLServer({"synchronous_commit": "on"}, fsync=False) as server:
        yield server


def raw_url(server, table):
    """The queue URL of *table* on *server* (no schema made)."""
    return f"{server.url}?table={table}"


def table_url(server, version=None, **params):
    """A queue URL of a new table on *server*, its schema created."""
    from mailoutbox.postgresql.schema import init

    table = f"q{next(_tables)}"
    with psycopg.connect(server.url, autocommit=True) as conn:
        if version is None:
            init(conn, table)
        else:
            init(conn, table, version)
    extra = "".join(f"&{k}={v}" for k, v in params.items())
    return raw_url(server, table) + extra


@pytest.fixture
def pg_url(pg_server):
    """The URL of a fresh queue table (current schema)."""
    return table_url(pg_server)


@pytest.fixture
def pg_store(pg_url):
    """The store of a fresh queue table, closed after the test."""
    from mailoutbox.postgresql import open_queue

    store = open_queue(pg_url)
    yield store
    store.close()


def insert(url_or_store, fromaddr="from@example.com",
           toaddrs=("to@example.com",), message=b"Subject: hi\n\nbody\n",
           relay=None, priority=0, not_before=None, message_id=None,
           notify=False):
    """Queue a message as a delivery would; return its row id (str)."""
    store = url_or_store
    from psycopg import sql
    table = sql.Identifier(*store.table.split("."))
    query = sql.SQL(
        "INSERT INTO {} (relay, fromaddr, toaddrs, message, message_id,"
        " priority, not_before, next_attempt) VALUES (%s, %s, %s, %s, %s, %s,"
        " to_timestamp(%s), coalesce(to_timestamp(%s), '-infinity'))"
        " RETURNING id").format(table)

    def work(conn):
        with conn.transaction():
            row = conn.execute(query, (relay, fromaddr, list(toaddrs), message,
                                       message_id, priority, not_before,
                                       not_before)).fetchone()
            if notify:
                conn.execute("SELECT pg_notify(%s, %s)",
                             (store.table.split(".")[-1], relay or ""))
        return str(row[0])
    return store.connections.run(work)
