"""The schema of the PostgreSQL queue: versioned, created and upgraded by
``mailoutbox init URL`` (:func:`init`).

One table holds the messages of the queue and of its relays (``relay`` is
NULL for the queue's default mailer).  A message is *queued* (due when
``next_attempt`` has passed and no live processor holds its claim),
*failed* (kept with its ``reason`` until retried or purged) or *sent*
(kept for ``keep_sent`` days as a sent log, if asked for).  A second table,
``TABLE_schema``, records the version of the schema.

Each entry of :data:`MIGRATIONS` takes the schema from one version to the
next; :func:`init` applies those missing, in one transaction, under an
advisory lock, so that running it again (or twice at once) is harmless.
"""
from __future__ import annotations

import re
import zlib
from typing import Any

__all__ = [
    "MIGRATIONS",
    "VERSION",
    "SchemaError",
    "check",
    "check_table_name",
    "init",
    "version_of",
]

#: The DDL of each version, in order; ``{t}`` is the quoted table name,
#: ``{name}`` its bare name (for index names), ``{schema}`` the quoted
#: version table.
MIGRATIONS: tuple[str, ...] = (
    # version 1
    """
    CREATE TABLE {t} (
        id bigserial PRIMARY KEY,
        relay text,
        fromaddr text NOT NULL,
        toaddrs text[] NOT NULL,
        message bytea NOT NULL,
        message_id text,
        queued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        state text NOT NULL DEFAULT 'queued'
            CHECK (state IN ('queued', 'failed', 'sent')),
        next_attempt timestamptz NOT NULL DEFAULT '-infinity',
        retry jsonb,
        reason jsonb,
        claimed_by text,
        claimed_until timestamptz,
        done_at timestamptz
    );
    CREATE INDEX {index_due} ON {t} (relay, next_attempt, id)
        WHERE state = 'queued';
    """,
    # version 2: scheduled sending and priorities
    """
    ALTER TABLE {t} ADD COLUMN priority smallint NOT NULL DEFAULT 0,
                    ADD COLUMN not_before timestamptz;
    DROP INDEX {index_due};
    CREATE INDEX {index_due} ON {t} (relay, priority DESC, id)
        WHERE state = 'queued';
    CREATE INDEX {index_done} ON {t} (done_at) WHERE state = 'sent';
    """,
)
#: The version this code uses.
VERSION = len(MIGRATIONS)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}(\.[A-Za-z_][A-Za-z0-9_]{0,40})?$")


class SchemaError(ValueError):
    """The queue's schema is missing, or of another version."""


def check_table_name(name: object) -> str:
    """*name* if it is a usable table name (``name`` or ``schema.name``,
    letters, digits and underscores); else :class:`ValueError`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"invalid queue table name {name!r}: use letters, digits and"
            " underscores (optionally schema.table), at most 41 characters")
    return name


def _names(table: str) -> dict[str, Any]:
    from psycopg import sql
    parts = check_table_name(table).split(".")
    bare = parts[-1]
    quoted = sql.Identifier(*parts)
    return {
        "t": quoted,
        "schema": sql.Identifier(*parts[:-1], bare + "_schema"),
        "index_due": sql.Identifier(*parts[:-1], bare + "_due"),
        "index_done": sql.Identifier(*parts[:-1], bare + "_done"),
    }


def version_of(conn: Any, table: str) -> int:
    """The schema version of the queue *table* (0: none)."""
    from psycopg import sql
    names = _names(table)
    regclass = table + "_schema"
    row = conn.execute("SELECT to_regclass(%s)", (regclass,)).fetchone()
    if row is None or row[0] is None:
        return 0
    row = conn.execute(sql.SQL("SELECT max(version) FROM {schema}").format(
        **names)).fetchone()
    return int(row[0] or 0)


def check(conn: Any, table: str, url: str) -> None:
    """Raise :class:`SchemaError` unless the schema of *table* is the one
    this code uses (the message names the command that fixes it)."""
    found = version_of(conn, table)
    if found == VERSION:
        return
    if found == 0:
        raise SchemaError(
            f"no mail queue {table!r} in {url}: create it with"
            f" 'mailoutbox init {url}'")
    if found < VERSION:
        raise SchemaError(
            f"the mail queue {table!r} in {url} has schema version {found},"
            f" this mailoutbox needs {VERSION}: upgrade it with"
            f" 'mailoutbox init {url}'")
    raise SchemaError(
        f"the mail queue {table!r} in {url} has schema version {found}, newer"
        f" than this mailoutbox knows ({VERSION}): upgrade mailoutbox")


def init(conn: Any, table: str, target: int = VERSION) -> tuple[int, int]:
    """Create or upgrade the schema of *table* to version *target*, through
    the psycopg connection *conn* (committed here); return ``(before,
    after)`` versions."""
    from psycopg import sql
    names = _names(table)
    if not 1 <= target <= VERSION:
        raise ValueError(f"no schema version {target} (1 to {VERSION})")
    with conn.transaction():
        # One init at a time for this table, whatever the connections.
        conn.execute("SELECT pg_advisory_xact_lock(%s)",
                     (zlib.crc32(table.encode()) - 2**31,))
        before = version_of(conn, table)
        if before > VERSION:
            raise SchemaError(f"the mail queue {table!r} has schema version"
                              f" {before}, newer than this mailoutbox knows")
        if before == 0:
            conn.execute(sql.SQL(
                "CREATE TABLE {schema} (version integer NOT NULL)").format(**names))
        for version in range(before + 1, target + 1):
            conn.execute(sql.SQL(MIGRATIONS[version - 1]).format(**names))
            conn.execute(sql.SQL("INSERT INTO {schema} VALUES (%s)").format(
                **names), (version,))
    return before, max(before, target)
