"""The PostgreSQL queue store: one table, drained from many hosts.

Each message is a row (see :mod:`mailoutbox.postgresql.schema`).  A
processor claims a due row in one short statement (``FOR UPDATE SKIP
LOCKED``, so that processors never wait on each other), by writing its
claim -- who holds it, and until when (the database's clock plus the
lease) -- into the row; no transaction stays open and no row stays locked
while the message is sent.  Every change that ends a claim is conditional
on the claim still being the caller's, so a processor whose lease ran out
(and whose message another processor took) cannot undo the other's work.

Claims and completions do not wait for the database's disk
(``synchronous_commit`` off for their own transactions): a crash of the
database server may forget those of its last moments (at most three times
its ``wal_writer_delay``, 0.6 s by default).  A forgotten claim is
harmless; a forgotten completion means a message sent again after its
lease.  So the duplicates after a crash of the database are the messages
in flight plus those completed in that last fraction of a second (in
flight only with ``durable_complete=1`` in the URL); nothing is lost.  A
processor's crash duplicates only its messages in flight.

Entries are :class:`mailoutbox.maildir.Entry` objects whose ``folder`` is
:data:`QUEUE` or :data:`FAILED` and whose ``name`` is the row id.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from typing import Any

from zope.interface import implementer

from mailoutbox.envelope import FROM_PREFIX
from mailoutbox.envelope import TO_PREFIX
from mailoutbox.envelope import parse_queue_file
from mailoutbox.interfaces import IQueueClaim
from mailoutbox.interfaces import IQueueStore
from mailoutbox.maildir import Entry
from mailoutbox.maildir import Scan
from mailoutbox.postgresql._conn import Connections
from mailoutbox.postgresql._conn import QueueURL
from mailoutbox.postgresql._conn import describe
from mailoutbox.postgresql.watcher import NotifyWatcher
from mailoutbox.relays import check_name

__all__ = ["FAILED", "QUEUE", "PostgreSQLClaim", "PostgreSQLQueue"]

log = logging.getLogger("mailoutbox.postgresql")

#: The ``folder`` of queued entries.
QUEUE = "queue"
#: The ``folder`` of failed entries.
FAILED = "failed"

#: The longest lease (seconds, about 30 years): an infinite lease (a repair
#: that must never be broken) is that long.
MAX_LEASE = 1e9

#: Seconds during which a lane found without a due and free message is
#: not searched again (see :meth:`PostgreSQLQueue.claim`).
DRY_TIME = 1.0

#: Evaluated by a statement (run on its own, in autocommit mode) for each
#: row it changes, in its RETURNING list: the commit of its implicit
#: transaction does not wait for the disk (``synchronous_commit`` off for
#: that transaction only; the session's setting is untouched).
_NO_WAIT = "set_config('synchronous_commit', 'off', true)"

_HOLDER = f"{socket.gethostname()}:{{pid}}"


def _holder() -> str:
    """A claim's ``claimed_by``: host:pid and a token unique to the claim."""
    return f"{_HOLDER.format(pid=os.getpid())}:{secrets.token_hex(6)}"


def _queue_file(fromaddr: str, toaddrs: list[str], message: bytes) -> bytes:
    return b"%s%s\n%s%s\n%s" % (FROM_PREFIX, fromaddr.encode("utf-8"), TO_PREFIX,
                                ", ".join(toaddrs).encode("utf-8"), message)


def _id(entry: Entry) -> int:
    """The row id of *entry*; FileNotFoundError if it cannot name a row."""
    if not entry.name.isdigit() or len(entry.name) > 18:
        raise FileNotFoundError(f"no message {entry.name!r} in the queue")
    return int(entry.name)


class _Queries:
    """The SQL of one table, composed once (``{t}`` is the table; ``{lane}``
    selects the lane's rows, ``{free_due}`` those that may be claimed now,
    ``{mine}`` the row of a claim while the claim holds)."""

    def __init__(self, table: str) -> None:
        from psycopg import sql

        t = sql.Identifier(*table.split("."))

        def q(text: str, **parts: str) -> str:
            fragments = {k: sql.SQL(v) for k, v in parts.items()}
            return sql.SQL(text).format(t=t, **fragments).as_string(None)

        # Rows are in sending order (priority DESC, id) in the lane's index
        # (relay, priority DESC, id); "ORDER BY relay, ..." (one relay in a
        # lane) lets the index give them in that order for the default lane
        # too ("relay IS NULL" is not an equality to the planner): the next
        # due row is found without sorting the lane.
        free_due = ("state = 'queued' AND {lane} AND next_attempt <= now()"
                    " AND (claimed_until IS NULL OR claimed_until < now())")
        for suffix, lane in (("", "relay = %(relay)s"),
                             ("_default", "relay IS NULL")):
            setattr(self, "scan" + suffix, q(
                "SELECT id, next_attempt > now(),"
                " extract(epoch FROM next_attempt)::float8,"
                " coalesce(claimed_until > now(), false)"
                " FROM {t} WHERE state = 'queued' AND {lane}"
                " ORDER BY relay, priority DESC, id", lane=lane))
            setattr(self, "claim" + suffix, q(
                "UPDATE {t} SET claimed_by = %(by)s, claimed_until ="
                " clock_timestamp() + %(lease)s * interval '1 second'"
                " WHERE id = coalesce("
                "(SELECT id FROM {t} WHERE id = %(id)s AND {free_row}"
                " FOR UPDATE SKIP LOCKED), "
                "(SELECT id FROM {t} WHERE {free_due}"
                " ORDER BY relay, priority DESC, id LIMIT 1"
                " FOR UPDATE SKIP LOCKED))"
                " RETURNING id, fromaddr, toaddrs, message, {nowait}",
                nowait=_NO_WAIT, free_due=free_due.replace("{lane}", lane),
                # (Not "relay = ...": found by the primary key, never by
                # scanning the lane's index; relay names are never empty.)
                free_row=free_due.replace(
                    "{lane}", "coalesce(relay, '') = coalesce(%(relay)s, '')")))
            setattr(self, "failed" + suffix, q(
                "SELECT id FROM {t} WHERE state = 'failed' AND {lane}"
                " ORDER BY id", lane=lane))
        self.claim_exact = q(
            "UPDATE {t} SET claimed_by = %(by)s, claimed_until ="
            " clock_timestamp() + %(lease)s * interval '1 second'"
            " WHERE id = %(id)s AND state = 'queued'"
            " AND (claimed_until IS NULL OR claimed_until < now())"
            " RETURNING id, fromaddr, toaddrs, message, {nowait}",
            nowait=_NO_WAIT)
        self.relays = q("SELECT DISTINCT relay FROM {t} WHERE state <> 'sent'"
                        " AND relay IS NOT NULL ORDER BY relay")
        self.find = q("SELECT state FROM {t} WHERE id = %s")
        self.read = q("SELECT fromaddr, toaddrs, message FROM {t}"
                      " WHERE id = %s AND state <> 'sent'")
        self.queued_at = q("SELECT extract(epoch FROM queued_at)::float8"
                           " FROM {t} WHERE id = %s")
        self.reason = q("SELECT reason FROM {t} WHERE id = %s")
        # A message sent with not_before and never tried has the retry
        # state {"not_before": T, "attempts": 0} (see mailoutbox.schedule).
        self.retry = q(
            "SELECT coalesce(retry, CASE WHEN not_before IS NOT NULL THEN"
            " jsonb_build_object('not_before',"
            " extract(epoch FROM not_before)::float8, 'attempts', 0) END)"
            " FROM {t} WHERE id = %s")
        self.priority = q("SELECT priority FROM {t} WHERE id = %s")
        self.to_failed = q(
            "UPDATE {t} SET state = 'failed', reason = %s, retry = NULL,"
            " claimed_by = NULL, claimed_until = NULL WHERE id = %s"
            " AND state = 'queued' RETURNING id")
        self.requeue = q(
            "UPDATE {t} SET state = 'queued', next_attempt = '-infinity',"
            " retry = NULL, reason = NULL WHERE id = %s AND state <> 'sent'"
            " RETURNING id")
        self.purge = q("DELETE FROM {t} WHERE id = %s")
        self.sent_log = q(
            "SELECT id, extract(epoch FROM done_at)::float8, relay, toaddrs,"
            " message_id, substring(message FROM 1 FOR 8192) FROM {t}"
            " WHERE state = 'sent' ORDER BY done_at, id")
        self.tidy = q("DELETE FROM {t} WHERE state = 'sent'"
                      " AND done_at < now() - %s * interval '1 day'")
        # The claim's own changes: only while the claim is the caller's.
        mine = "id = %(id)s AND claimed_by = %(by)s"
        self.renew = q("UPDATE {t} SET claimed_until = clock_timestamp()"
                       " + %(lease)s * interval '1 second' WHERE {mine}",
                       mine=mine)
        self.release = q("UPDATE {t} SET claimed_by = NULL,"
                         " claimed_until = NULL WHERE {mine}", mine=mine)
        self.delete = q("DELETE FROM {t} WHERE {mine}", mine=mine)
        self.sent = q("UPDATE {t} SET state = 'sent', done_at = now(),"
                      " claimed_by = NULL, claimed_until = NULL WHERE {mine}",
                      mine=mine)
        # The same, not waiting for the disk (see PostgreSQLClaim.complete).
        self.delete_nowait = self.delete + " RETURNING " + _NO_WAIT
        self.sent_nowait = self.sent + " RETURNING " + _NO_WAIT
        self.defer = q("UPDATE {t} SET next_attempt = to_timestamp(%(at)s),"
                       " retry = %(state)s, claimed_by = NULL,"
                       " claimed_until = NULL WHERE {mine}", mine=mine)
        self.rewrite = q("UPDATE {t} SET fromaddr = %(from)s, toaddrs ="
                         " %(to)s, message = %(message)s WHERE {mine}", mine=mine)
        self.fail = q("UPDATE {t} SET state = 'failed', reason = %(reason)s,"
                      " retry = NULL, claimed_by = NULL, claimed_until = NULL"
                      " WHERE {mine}", mine=mine)
        self.split = q(
            "INSERT INTO {t} (relay, fromaddr, toaddrs, message, message_id,"
            " queued_at, state, reason, priority, not_before)"
            " SELECT relay, %(from)s, %(to)s, %(message)s, message_id,"
            " queued_at, 'failed', %(reason)s, priority, not_before"
            " FROM {t} WHERE id = %(id)s RETURNING id")


@implementer(IQueueStore)
class PostgreSQLQueue:
    """See :class:`mailoutbox.interfaces.IQueueStore`.

    A lane of the queue in a PostgreSQL table: the messages of the default
    mailer (*relay* None) or those of one relay.  Made by
    :func:`mailoutbox.postgresql.open_queue`; :meth:`relay` makes the
    others, sharing the connections.
    """

    failed = FAILED

    def __init__(self, url: QueueURL, connections: Connections,
                 relay: str | None = None, queries: _Queries | None = None) -> None:
        self.url = url
        self.path = url.path
        self.key = url.key
        self.table = url.table
        self.keep_sent = url.keep_sent
        self.lane = relay
        self.connections = connections
        self.sql = queries or _Queries(url.table)
        #: Until when (time.monotonic()) the lane is known to have no due
        #: and free message (see :meth:`claim`).
        self._dry_until = 0.0

    def __repr__(self) -> str:
        lane = "" if self.lane is None else f" relay {self.lane!r}"
        return f"<PostgreSQLQueue {self.path!r}{lane}>"

    # -- statements ------------------------------------------------------------

    def _all(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        return self.connections.run(
            lambda conn: conn.execute(query, params).fetchall())

    def _one(self, query: str, params: Any = None, retry: bool = True) -> Any:
        """The first row of *query* (None if none)."""
        return self.connections.run(
            lambda conn: conn.execute(query, params).fetchone(), retry=retry)

    def _lane(self, name: str) -> str:
        return getattr(self.sql, name if self.lane is not None else name + "_default")

    # -- the lane --------------------------------------------------------------

    def scan(self) -> Scan:
        """See :class:`mailoutbox.interfaces.IQueueStore`.  The entries are in
        sending order: higher priority first, then oldest first."""
        scan = Scan()
        self._dry_until = 0.0
        for row_id, later, at, claimed in self._all(self._lane("scan"),
                                                    {"relay": self.lane}):
            name = str(row_id)
            scan.entries.append(Entry(QUEUE, name))
            if later:
                scan.retry_at[name] = at
            if claimed:
                scan.claimed.add(name)
        return scan

    def claim(self, entry: Entry, lease: float,
              exact: bool = False) -> PostgreSQLClaim | None:
        """See :class:`mailoutbox.interfaces.IQueueStore`: *entry* if it is
        due and free, else the next due and free message of the lane; with
        *exact*, *entry* if it is free, due or not.

        Once a claim found no due and free message in the lane, the claims
        that follow give None without asking the database, for
        :data:`DRY_TIME` seconds or until the next :meth:`scan` or a
        release of a claim of this lane, whichever comes first: processors
        that listed the same lane do not each search it again for every
        entry of their listing once others took its messages.  A message
        freed meanwhile by another processor (or by a lease running out),
        or coming due, is sent in a later pass."""
        if not exact and time.monotonic() < self._dry_until:
            return None
        holder = _holder()
        params = {"by": holder, "lease": min(float(lease), MAX_LEASE),
                  "relay": self.lane,
                  "id": int(entry.name) if entry.name.isdigit() else 0}
        query = self.sql.claim_exact if exact else self._lane("claim")
        # One statement, one round trip.  It need not wait for the disk: if
        # a crash of the database loses the claim, the message is still
        # queued (and was in flight).
        row = self._one(query, params)
        if row is None:
            if not exact:
                self._dry_until = time.monotonic() + DRY_TIME
            return None
        return PostgreSQLClaim(self, Entry(QUEUE, str(row[0])), holder, lease,
                               _queue_file(*row[1:4]))

    def recover(self) -> int:
        """Nothing to roll forward: a row is queued by its transaction's
        commit, and expired claims are free to claim."""
        return 0

    def cleanup(self, scan: Scan, lease: float, now: float | None = None) -> int:
        """Delete the sent messages kept longer than ``keep_sent`` days."""
        if not self.keep_sent or self.lane is not None:
            return 0
        return int(self.connections.run(
            lambda conn: conn.execute(self.sql.tidy, (self.keep_sent,)).rowcount))

    def relays(self) -> list[str]:
        """The relays that have queued or failed messages."""
        return [row[0] for row in self._all(self.sql.relays)]

    def relay(self, name: str, create: bool = False) -> PostgreSQLQueue:
        """The lane of the relay *name* (any valid name: a lane exists as
        soon as a message is queued for it; *create* changes nothing)."""
        return PostgreSQLQueue(self.url, self.connections, check_name(name),
                               self.sql)

    # -- looking and repairing ---------------------------------------------------

    def failed_entries(self) -> list[Entry]:
        return [Entry(FAILED, str(row[0])) for row in
                self._all(self._lane("failed"), {"relay": self.lane})]

    def find(self, name: str) -> Entry | None:
        try:
            row_id = _id(Entry(QUEUE, name))
        except FileNotFoundError:
            return None
        row = self._one(self.sql.find, (row_id,))
        if row is None or row[0] == "sent":
            return None
        return Entry(QUEUE if row[0] == "queued" else FAILED, name)

    def read(self, entry: Entry, size: int = -1) -> bytes:
        row = self._one(self.sql.read, (_id(entry),))
        if row is None:
            raise FileNotFoundError(f"message {entry.name} is gone from {self.path}")
        data = _queue_file(*row)
        return data if size < 0 else data[:size]

    def _value(self, query: str, entry: Entry) -> Any:
        row = self._one(query, (_id(entry),))
        if row is None:
            raise FileNotFoundError(f"message {entry.name} is gone from {self.path}")
        return row[0]

    def queued_at(self, entry: Entry) -> float:
        """When *entry* was queued (now if it is gone)."""
        try:
            return float(self._value(self.sql.queued_at, entry))
        except FileNotFoundError:
            return time.time()

    def reason(self, entry: Entry) -> dict[str, Any] | None:
        try:
            return self._value(self.sql.reason, entry)  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None

    def retry_state(self, entry: Entry) -> dict[str, Any] | None:
        try:
            return self._value(self.sql.retry, entry)  # type: ignore[no-any-return]
        except FileNotFoundError:
            return None

    def priority(self, entry: Entry) -> int:
        """The priority of *entry* (0 if it is gone)."""
        try:
            return int(self._value(self.sql.priority, entry))
        except FileNotFoundError:
            return 0

    def move_to_failed(self, entry: Entry, reason: dict[str, Any]) -> Entry:
        from psycopg.types.json import Jsonb

        if self._one(self.sql.to_failed, (Jsonb(reason), _id(entry))) is None:
            raise FileNotFoundError(
                f"message {entry.name} is not queued in {self.path}")
        return Entry(FAILED, entry.name)

    def requeue(self, entry: Entry) -> Entry:
        if self._one(self.sql.requeue, (_id(entry),)) is None:
            raise FileNotFoundError(f"message {entry.name} is gone from {self.path}")
        return Entry(QUEUE, entry.name)

    def purge(self, entry: Entry) -> None:
        self.connections.run(lambda conn: conn.execute(self.sql.purge, (_id(entry),)))

    def sent_entries(self) -> list[dict[str, Any]]:
        """The sent log (every lane's), oldest first: for each sent message
        kept (see ``keep_sent``), its ``id``, ``sent_at`` (seconds since the
        epoch), ``relay``, ``to`` (the recipients), ``message_id`` and
        ``subject`` (None if it has none)."""
        from email.parser import BytesHeaderParser
        from email.policy import default

        parser = BytesHeaderParser(policy=default)
        entries = []
        for row_id, sent_at, relay, toaddrs, message_id, head in self._all(
                self.sql.sent_log):
            subject = parser.parsebytes(bytes(head))["Subject"]
            entries.append({"id": str(row_id), "sent_at": sent_at, "relay": relay,
                            "to": list(toaddrs), "message_id": message_id,
                            "subject": None if subject is None else str(subject)})
        return entries

    def watcher(self, on_wake: Any, name: str) -> NotifyWatcher:
        """A thread that LISTENs for the messages committed to this table."""
        return NotifyWatcher(self.connections, self.table, on_wake, name)

    def close(self) -> None:
        """Close the connections kept open (those of every lane)."""
        self.connections.close()


@implementer(IQueueClaim)
class PostgreSQLClaim:
    """See :class:`mailoutbox.interfaces.IQueueClaim`.

    Every change is conditional on the row still being claimed by this
    claim (its ``claimed_by`` token): once the lease ran out and another
    processor claimed the row, this claim changes nothing.
    """

    def __init__(self, store: PostgreSQLQueue, entry: Entry, holder: str,
                 lease: float, data: bytes | None = None) -> None:
        self.store = store
        self.entry = entry
        self.holder = holder
        self.lease = min(float(lease), MAX_LEASE)
        #: The message as claimed (read once without asking the database).
        self._data = data
        self._params = {"id": int(entry.name), "by": holder}

    def __repr__(self) -> str:
        return f"<PostgreSQLClaim {self.entry.name!r}>"

    def _mine(self, query: str, retry: bool = True, **params: Any) -> int:
        """Run *query* on the claimed row; the number of rows changed."""
        return int(self.store.connections.run(
            lambda conn: conn.execute(query, {**self._params, **params}).rowcount,
            retry=retry))

    def read(self) -> bytes:
        data, self._data = self._data, None
        return self.store.read(self.entry) if data is None else data

    def renew(self) -> None:
        """Extend the lease; a database error is logged (the claim then
        lasts its lease)."""
        import psycopg

        try:
            self._mine(self.store.sql.renew, lease=self.lease)
        except psycopg.Error as exc:
            log.warning("could not renew the claim of message %s in %s: %s",
                        self.entry.name, self.store.path,
                        describe(exc, self.store.url.password))

    def retry_state(self) -> dict[str, Any] | None:
        return self.store.retry_state(self.entry)

    def release(self) -> None:
        self._mine(self.store.sql.release)
        self.store._dry_until = 0.0  # the lane has a free message again

    def complete(self) -> None:
        """Delete the row (or mark it sent, with ``keep_sent``).  Unless the
        URL says ``durable_complete=1``, the commit does not wait for the
        disk: a crash of the database server (or of its machine) may forget
        the completions of its last moments (at most three times its
        ``wal_writer_delay``, 0.6 s by default), and those messages are
        sent again after their lease -- duplicates, never a loss."""
        sql, store = self.store.sql, self.store
        if store.url.durable_complete:
            self._mine(sql.sent if store.keep_sent else sql.delete)
        else:
            self._mine(sql.sent_nowait if store.keep_sent else sql.delete_nowait)

    def discard(self) -> None:
        """Delete the claimed row, never keeping it in the sent log (the
        message was moved to another queue, not sent)."""
        self._mine(self.store.sql.delete)

    def defer(self, retry_at: float, state: dict[str, Any]) -> None:
        from psycopg.types.json import Jsonb

        self._mine(self.store.sql.defer, at=float(retry_at), state=Jsonb(state))

    def rewrite(self, data: bytes) -> None:
        fromaddr, toaddrs, message = parse_queue_file(data)
        self._data = None
        self._mine(self.store.sql.rewrite, **{"from": fromaddr, "to": list(toaddrs),
                                              "message": message})

    def split_failed(self, data: bytes, reason: dict[str, Any]) -> Entry:
        from psycopg.types.json import Jsonb

        fromaddr, toaddrs, message = parse_queue_file(data)
        # Not run again on a new connection: the row may have been added.
        row = self.store._one(self.store.sql.split, {
            "id": self._params["id"], "from": fromaddr, "to": list(toaddrs),
            "message": message, "reason": Jsonb(reason)}, retry=False)
        if row is None:
            raise FileNotFoundError(f"message {self.entry.name} is gone"
                                    f" from {self.store.path}")
        return Entry(FAILED, str(row[0]))

    def fail(self, reason: dict[str, Any]) -> Entry:
        from psycopg.types.json import Jsonb

        self._mine(self.store.sql.fail, reason=Jsonb(reason))
        return Entry(FAILED, self.entry.name)
