"""Queueing into a PostgreSQL table with the transaction: the data managers
of :class:`~mailoutbox.delivery.QueuedMailDelivery` for a ``postgresql://``
queue.  See :doc:`/postgresql-delivery` for the story.

Two modes, chosen by the delivery's *connection* argument:

- **The application's connection** (``connection=CALLABLE``): ``send()``
  inserts the row (and a ``pg_notify``) at once, through the connection
  ``CALLABLE()`` returns for the current transaction: a SQLAlchemy
  ``Session`` (joined by zope.sqlalchemy, which is told the session
  changed), a SQLAlchemy ``Connection`` or a psycopg ``Connection``.  The
  row commits or aborts with the application's rows, in the same database
  transaction; rolling back a savepoint (``transaction``'s, which
  zope.sqlalchemy turns into the database's, or the database's own) drops
  the rows inserted after it, in step with the application's.  That is why
  the row is written at ``send()``, not at the vote: by the vote,
  zope.sqlalchemy's data manager may have committed already, and a
  savepoint of the database that ``transaction`` does not know of would
  not drop the message.  :class:`ApplicationDataManager` only logs.

- **Its own connection** (no *connection*): :class:`PostgreSQLDataManager`
  inserts the rows in ``tpc_vote`` on a connection of its own (one per
  thread, reused, replaced when broken).  If the server allows prepared
  transactions (``max_prepared_transactions > 0``, asked once per
  delivery), it uses two-phase commit: ``PREPARE TRANSACTION`` in
  ``tpc_vote``, ``COMMIT PREPARED`` in ``tpc_finish``, ``ROLLBACK
  PREPARED`` on abort; the transaction id is ``mailoutbox:TABLE:HEX``
  (:func:`gid_prefix`), so that transactions orphaned by a crash between
  vote and finish can be found (:mod:`mailoutbox.postgresql.recovery`).
  PostgreSQL refuses ``NOTIFY`` in a prepared transaction: the wake-up is
  sent just after ``COMMIT PREPARED``.  Otherwise it commits in
  ``tpc_vote`` as the *last resource*, as zope.sqlalchemy does in its
  one-phase mode: its :meth:`~PostgreSQLDataManager.sortKey` starts with
  ``~~``, which sorts after every other key (``transaction`` sorts the
  data managers by the strings their ``sortKey()`` returns, and calls
  ``tpc_begin``, ``commit``, ``tpc_vote`` and ``tpc_finish`` in that
  order; zope.sqlalchemy's one-phase key starts with ``~sqlalchemy``).
  Every other resource has voted by then; only a resource that also
  commits in its vote and sorts after it, or a failing ``tpc_finish``,
  can still disagree.
"""
from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from mailoutbox.datamanager import _DataManager
from mailoutbox.datamanager import _Message
from mailoutbox.postgresql import schema
from mailoutbox.postgresql.url import display
from mailoutbox.postgresql.url import parse

__all__ = [
    "ApplicationDataManager",
    "PostgreSQLDataManager",
    "QueueWriter",
    "gid_prefix",
]

log = logging.getLogger("mailoutbox.postgresql")

#: The longest NOTIFY channel name PostgreSQL accepts (NAMEDATALEN - 1).
MAX_CHANNEL = 63

#: Seconds to wait for a connection when the URL sets no ``connect_timeout``.
CONNECT_TIMEOUT = 10


def gid_prefix(table: str) -> str:
    """The start of the id of every prepared transaction that queues into
    *table*: ``mailoutbox:TABLE:``."""
    return f"mailoutbox:{table}:"


def _quote(table: str) -> str:
    # check_table_name allows letters, digits and "_" only: nothing to escape.
    return ".".join(f'"{part}"' for part in schema.check_table_name(table).split("."))


_INSERT = """INSERT INTO {table} (relay, fromaddr, toaddrs, message, message_id,
    next_attempt, not_before, priority)
SELECT CAST(%(relay)s AS text), CAST(%(fromaddr)s AS text),
    CAST(%(toaddrs)s AS text[]), CAST(%(message)s AS bytea),
    CAST(%(message_id)s AS text),
    COALESCE(to_timestamp(CAST(%(not_before)s AS float8)), '-infinity'),
    to_timestamp(CAST(%(not_before)s AS float8)), CAST(%(priority)s AS smallint)"""
_NOTIFY = """
FROM (SELECT pg_notify(%(channel)s, COALESCE(CAST(%(relay)s AS text), '')))
    AS notified"""


class _Shim:
    """Enough of a psycopg connection for :func:`schema.check`, over any
    connection the application gives."""

    def __init__(self, run: Callable[[str, Any], Any]) -> None:
        self.run = run

    def execute(self, query: Any, params: Any = ()) -> Any:
        if not isinstance(query, str):  # psycopg.sql.Composed
            query = query.as_string(None)
        return self.run(query, params)


class QueueWriter:
    """Writes the messages of a :class:`~mailoutbox.delivery.QueuedMailDelivery`
    into the queue table of *url*: through the application's connection
    (*connection*, a callable) or through connections of its own.

    Bad URLs raise :class:`ValueError` here; a missing schema raises
    :class:`~mailoutbox.postgresql.schema.SchemaError` (a ValueError) and
    an unreachable database :class:`ConnectionError` (an OSError) at the
    first ``send()``; each names the URL without its password.
    """

    def __init__(self, url: str,
                 connection: Callable[[], Any] | None = None) -> None:
        self.conninfo, self.table, self.options = parse(url)
        #: The URL to show: without the password.
        self.shown = display(url)
        if len(self.table.encode()) > MAX_CHANNEL:
            raise ValueError(
                f"the queue table name {self.table!r} (in {self.shown}) is"
                f" longer than {MAX_CHANNEL} characters, which PostgreSQL"
                " allows in the name of the NOTIFY channel (the table's name)")
        if connection is not None and not callable(connection):
            raise TypeError(
                "connection must be a callable that returns the current"
                f" transaction's connection, not {type(connection).__name__}")
        self.connection = connection
        #: Whether the server allows prepared transactions (None: not
        #: asked yet); asked once, at the first send().
        self.two_phase: bool | None = None
        self.checked = False
        self.insert = _INSERT.format(table=_quote(self.table))
        self.insert_and_notify = self.insert + _NOTIFY
        self.datamanager_factory = (PostgreSQLDataManager if connection is None
                                    else ApplicationDataManager)
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"<QueueWriter {self.shown!r}>"

    def params(self, message: _Message) -> dict[str, Any]:
        return {"relay": message.relay, "fromaddr": message.fromaddr,
                "toaddrs": list(message.toaddrs), "message": message.data,
                "message_id": message.message_id,
                "not_before": message.not_before,
                "priority": message.priority, "channel": self.table}

    # -- send() -----------------------------------------------------------

    def add(self, message: _Message) -> None:
        """Called by ``send()``: insert *message* through the application's
        connection, or check (once) that the queue can be written to."""
        if self.connection is None:
            if self.two_phase is None:
                self._check_own()
            return
        run = self._runner(self.connection())
        if not self.checked:
            schema.check(_Shim(run), self.table, self.shown)
            self.checked = True
        try:
            run(self.insert_and_notify, self.params(message)).close()
        except Exception:
            log.error("could not queue message %s in %s through the"
                      " application's connection", message.message_id,
                      self.shown, exc_info=True)
            raise
        log.debug("inserted message %s into %s", message.message_id, self.shown)

    def _runner(self, given: Any) -> Callable[[str, Any], Any]:
        """A function that runs SQL through the connection *given* and
        returns the cursor.

        Through SQLAlchemy, the statement goes to the driver's connection
        (psycopg or psycopg2) of the SQLAlchemy connection, in its
        transaction, begun first if needed: SQLAlchemy's execution
        machinery would cost more than the statement (SQLAlchemy's
        ``before_cursor_execute`` events do not see it).
        """
        if hasattr(given, "exec_driver_sql"):  # SQLAlchemy Connection
            if not given.in_transaction():
                given.begin()  # as exec_driver_sql would ("autobegin")
            return _dbapi_runner(given.connection)
        if hasattr(given, "get_bind"):  # SQLAlchemy Session (or scoped)
            session = given() if hasattr(given, "registry") else given
            conn = session.connection()  # begins the session's transaction
            _mark_changed(session)
            return _dbapi_runner(conn.connection)
        if hasattr(given, "pgconn"):  # psycopg Connection
            if given.autocommit and given.info.transaction_status == 0:  # IDLE
                raise ValueError(
                    f"cannot queue into {self.shown} through a psycopg connection"
                    " in autocommit mode outside a transaction: the message"
                    " would be committed at once, whatever the transaction does")
            return given.execute
        raise TypeError(
            "the connection callable returned "
            f"{type(given).__name__!r}: give a SQLAlchemy Session or"
            " Connection, or a psycopg Connection")

    def _check_own(self) -> None:
        conn, _fresh = self.own_connection()
        try:
            schema.check(conn, self.table, self.shown)
            row = conn.execute("SHOW max_prepared_transactions").fetchone()
            conn.rollback()
        except Exception as exc:
            self.discard(conn)
            raise self._error(exc, "cannot use the mail queue") from exc
        self.two_phase = int(row[0]) > 0
        log.info("queueing into %s %s", self.shown,
                 "with two-phase commit" if self.two_phase else
                 "as the last resource (the server allows no prepared transactions)")

    # -- own connections ----------------------------------------------------

    def own_connection(self) -> tuple[Any, bool]:
        """This thread's connection, and whether it is new."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and not conn.broken:
            return conn, False
        import psycopg
        timeout = ({} if "connect_timeout" in self.options
                   else {"connect_timeout": CONNECT_TIMEOUT})
        try:
            conn = psycopg.connect(self.conninfo, **timeout)
        except psycopg.OperationalError as exc:
            raise self._error(exc, "cannot connect to the mail queue") from exc
        self._local.conn = conn
        return conn, True

    def discard(self, conn: Any) -> None:
        """Close *conn* (broken, or in a state we do not know)."""
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        try:
            conn.close()
        except Exception:  # pragma: no cover - close() does not raise in practice
            log.debug("could not close a connection to %s", self.shown, exc_info=True)

    def close(self) -> None:
        """Close this thread's connection (a new one is made when needed)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self.discard(conn)

    def _error(self, exc: BaseException, what: str) -> BaseException:
        """*exc* (a psycopg error) as an error naming the URL without its
        password; a :class:`ValueError` stays as it is."""
        if isinstance(exc, ValueError):
            return exc
        reason = str(exc).strip().replace("\n", " ")
        password = self.options.get("password")
        if password:
            reason = reason.replace(password, "***")
        return (ConnectionError if _lost(exc) else RuntimeError)(
            f"{what} {self.shown}: {reason}")


def _lost(exc: BaseException) -> bool:
    """Whether *exc* says the server cannot be reached (or went away),
    rather than that it refused a statement."""
    import psycopg
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(exc, OSError) or (
        isinstance(exc, psycopg.OperationalError)
        and (sqlstate is None or sqlstate.startswith("08")))


def _dbapi_runner(dbapi: Any) -> Callable[[str, Any], Any]:
    def run(query: str, params: Any) -> Any:
        cursor = dbapi.cursor()
        cursor.execute(query, params)
        return cursor
    return run


def _mark_changed(session: Any) -> None:
    """Tell zope.sqlalchemy that *session* wrote (it would roll back a
    session it believes unchanged instead of committing it)."""
    try:
        from zope.sqlalchemy import datamanager
    except ImportError:  # pragma: no cover - zope.sqlalchemy is installed for tests
        return
    state = datamanager._SESSION_STATE.get(session)
    if state is not None and state is not datamanager.STATUS_CHANGED:
        datamanager.mark_changed(session)


class ApplicationDataManager(_DataManager):
    """The messages of a transaction whose rows ``send()`` inserted through
    the application's connection: the database transaction commits or
    aborts them; this only logs.

    See :class:`transaction.interfaces.ISavepointDataManager`.
    """

    kind = "postgresql-application"

    def tpc_vote(self, txn: Any) -> None:
        self.state = "voted"

    def tpc_finish(self, txn: Any) -> None:
        """Log the messages queued (if the database committed). Never raises."""
        self.state = "finished"
        for message in self.messages:
            log.info("queued message %s in %s (with the application's"
                     " transaction)", message.message_id,
                     self.delivery.postgresql.shown)
        self.messages = []

    def _abort(self) -> None:
        for message in self.messages:
            log.debug("message %s not queued: the transaction aborted",
                      message.message_id)


class PostgreSQLDataManager(_DataManager):
    """Inserts the messages of a transaction into the queue table on a
    connection of its own: with two-phase commit, or as the last resource.

    See :class:`transaction.interfaces.ISavepointDataManager`.
    """

    kind = "postgresql"

    def __init__(self, delivery: Any, transaction_manager: Any) -> None:
        super().__init__(delivery, transaction_manager)
        self.writer: QueueWriter = delivery.postgresql
        self.conn: Any = None
        #: The prepared transaction's id (two-phase commit).
        self.gid: str | None = None
        #: Two-phase commit: None, "begun" or "prepared".
        self.tpc: str | None = None
        self.committed = False

    def sortKey(self) -> str:
        """Last of all (``~~``) when committing in the vote; else the usual
        order (before zope.sqlalchemy's one-phase ``~sqlalchemy``, which
        then commits only after this prepared)."""
        if self.writer.two_phase:
            return f"mailoutbox.postgresql:{id(self):x}"
        return f"~~mailoutbox.postgresql:{id(self):x}"

    def _ids(self) -> str:
        return ", ".join(m.message_id for m in self.messages)

    def tpc_vote(self, txn: Any) -> None:
        """Insert the messages; prepare (two-phase commit) or commit (last
        resource).  A reused connection found broken is replaced once."""
        self.state = "voted"
        if not self.messages:
            return
        import psycopg
        writer = self.writer
        for _attempt in range(2):  # pragma: no branch - returns or raises
            conn, fresh = writer.own_connection()
            self.conn = conn
            try:
                self._write(conn)
                return
            except psycopg.OperationalError as exc:
                self._undo()
                if fresh or not conn.broken:
                    raise writer._error(
                        exc, f"could not queue message(s) {self._ids()} in") from exc
                log.info("the connection to %s was broken: connecting again",
                         writer.shown)
            except Exception as exc:
                self._undo()
                raise writer._error(
                    exc, f"could not queue message(s) {self._ids()} in") from exc

    def _write(self, conn: Any) -> None:
        writer = self.writer
        params = [writer.params(m) for m in self.messages]
        if writer.two_phase:
            self.gid = gid_prefix(writer.table) + uuid.uuid4().hex
            conn.tpc_begin(self.gid)
            self.tpc = "begun"
            with conn.cursor() as cursor:
                cursor.executemany(writer.insert, params)
            conn.tpc_prepare()
            self.tpc = "prepared"
        else:
            with conn.cursor() as cursor:
                cursor.executemany(writer.insert_and_notify, params)
            conn.commit()
            self.committed = True

    def tpc_finish(self, txn: Any) -> None:
        """Commit the prepared transaction and wake the processors.  Never
        raises: a failure is logged CRITICAL with the command to run."""
        self.state = "finished"
        writer = self.writer
        if self.tpc == "prepared":
            self.tpc = None
            try:
                self.conn.tpc_commit()
            except Exception:
                writer.discard(self.conn)
                if not self._resolve("commit"):
                    log.critical(
                        "could not commit the prepared transaction %s that"
                        " queues message(s) %s in %s: they will not be sent until"
                        " it is committed; run 'mailoutbox recover %s --commit'"
                        " (or COMMIT PREPARED '%s' in the database)", self.gid,
                        self._ids(), writer.shown, writer.shown, self.gid,
                        exc_info=True)
                    self.messages = []
                    return
            self._notify()
        for message in self.messages:
            log.info("queued message %s in %s", message.message_id, writer.shown)
        self.messages = []

    def _resolve(self, action: str) -> bool:
        """COMMIT/ROLLBACK PREPARED our transaction from a new connection;
        whether that worked (errors are logged)."""
        try:
            conn, _fresh = self.writer.own_connection()
            getattr(conn, f"tpc_{action}")(self.gid)
        except Exception:
            log.error("could not %s the prepared transaction %s from a new"
                      " connection", action, self.gid, exc_info=True)
            return False
        return True

    def _notify(self) -> None:
        """Wake the processors (after COMMIT PREPARED: NOTIFY cannot be
        prepared).  A failure only delays the processors' next poll."""
        relays = sorted({m.relay or "" for m in self.messages})
        try:
            conn, _fresh = self.writer.own_connection()
            for relay in relays:
                conn.execute("SELECT pg_notify(%s, %s)", (self.writer.table, relay))
            conn.commit()
        except Exception:
            log.warning("could not notify the processors of %s of message(s)"
                        " %s: they find them at their next poll",
                        self.writer.shown, self._ids(), exc_info=True)

    def _undo(self) -> None:
        """Roll back what the vote did on its connection."""
        conn, self.conn = self.conn, None
        tpc, self.tpc = self.tpc, None
        if conn is None:
            return
        try:
            if tpc:
                conn.tpc_rollback()
            else:
                conn.rollback()
        except Exception:
            self.writer.discard(conn)
            if tpc == "prepared" and not self._resolve("rollback"):
                log.critical(
                    "could not roll back the prepared transaction %s of"
                    " message(s) %s in %s: run 'mailoutbox recover %s"
                    " --rollback' (or ROLLBACK PREPARED '%s' in the database)",
                    self.gid, self._ids(), self.writer.shown, self.writer.shown,
                    self.gid)

    def _abort(self) -> None:
        if self.committed:
            log.critical(
                "message(s) %s were committed into %s as the last resource,"
                " but the transaction aborted after: they will be sent",
                self._ids(), self.writer.shown)
            return
        self._undo()
        for message in self.messages:
            log.debug("message %s not queued", message.message_id)
