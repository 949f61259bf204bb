"""The mail deliveries: ``send()`` now, the work when the transaction commits.

``send()`` checks and prepares the message (:mod:`mailoutbox.message`) and
hands it to the data manager of the delivery for the current transaction;
there is one per delivery and transaction, holding every message sent in it
in memory.  What the data managers do when the transaction commits is in
:mod:`mailoutbox.datamanager`: :class:`QueuedMailDelivery` writes the
messages into the queue, :class:`DirectMailDelivery` sends them through its
mailer and reports each outcome as an event after the transaction completed.

zope.sendmail's other names are here too: :class:`AbstractMailDelivery`
(the deliveries' base class), :class:`MailDataManager` (its one-call data
manager) and ``QueueProcessorThread`` (from :mod:`mailoutbox.queue`).
"""
from __future__ import annotations

import datetime
import email.message
import logging
import sys
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import transaction
from transaction.interfaces import IDataManagerSavepoint
from transaction.interfaces import ISavepointDataManager
from zope.interface import implementer

from mailoutbox.address import check_recipients
from mailoutbox.address import check_sender
from mailoutbox.datamanager import _OPEN
from mailoutbox.datamanager import DirectDataManager
from mailoutbox.datamanager import QueuedDataManager
from mailoutbox.datamanager import _DataManager
from mailoutbox.datamanager import _Message
from mailoutbox.envelope import format_envelope
from mailoutbox.headers import prepare_send_message
from mailoutbox.interfaces import IDirectMailDelivery
from mailoutbox.interfaces import IQueuedMailDelivery
from mailoutbox.maildir import Maildir
from mailoutbox.message import make_msgid
from mailoutbox.message import prepare_message
from mailoutbox.relays import check_name
from mailoutbox.relays import check_names
from mailoutbox.relays import open_relay
from mailoutbox.schedule import check_not_before
from mailoutbox.schedule import check_priority
from mailoutbox.stores import is_url

__all__ = [
    "AbstractMailDelivery",
    "DirectDataManager",  # from mailoutbox.datamanager
    "DirectMailDelivery",
    "MailDataManager",
    "QueueProcessorThread",  # noqa: F822 - from mailoutbox.queue, on first use
    "QueuedDataManager",  # from mailoutbox.datamanager
    "QueuedMailDelivery",
]

log = logging.getLogger("mailoutbox.delivery")


class AbstractMailDelivery:
    """What both deliveries share: ``send()``, ``send_message()`` and the
    data manager lookup (zope.sendmail's name for their base class)."""

    datamanager_factory: type[_DataManager]
    #: The names of the mailers that messages may be routed to.
    mailer_names: frozenset[str] = frozenset()

    def __init__(self, transaction_manager: Any = None) -> None:
        #: The transaction manager whose current transaction ``send()``
        #: joins; ``None`` for :data:`transaction.manager`, looked up at
        #: each ``send()``.
        self.transaction_manager = transaction_manager

    def newMessageId(self) -> str:
        """A new Message-Id, without angle brackets (zope.sendmail's name;
        override it to make your own)."""
        return make_msgid()

    def _route(self, mailer: str | None) -> str | None:
        """Check the *mailer* given to ``send()``: None or a configured name."""
        if mailer is None or mailer in self.mailer_names:
            return mailer
        check_name(mailer)
        known = ", ".join(repr(n) for n in sorted(self.mailer_names)) or "none"
        raise ValueError(
            f"cannot route a message to the mailer {mailer!r}: it is not one"
            f" this delivery may route to (configured: {known})"
        )

    def _message(self, fromaddr: str, toaddrs: Iterable[str],
                 message: bytes | str | email.message.Message,
                 mailer: str | None, not_before: Any = None,
                 priority: Any = None) -> _Message:
        """Check and prepare what ``send()`` was given."""
        relay = self._route(mailer)
        when = self._not_before(check_not_before(not_before))
        rank = check_priority(priority)
        fromaddr = check_sender(fromaddr)
        recipients = check_recipients(toaddrs)
        data, message_id = prepare_message(message, self.newMessageId)
        prepared = self._prepare(message_id, fromaddr, recipients, data)
        prepared.relay = relay
        prepared.not_before = when
        prepared.priority = rank
        return prepared

    def _not_before(self, when: float | None) -> float | None:
        """Accept the time checked by
        :func:`~mailoutbox.schedule.check_not_before` (or refuse it)."""
        return when

    def _manager(self) -> Any:
        manager = self.transaction_manager
        return transaction.manager if manager is None else manager

    def createDataManager(self, fromaddr: str, toaddrs: Iterable[str],
                          message: bytes | str | email.message.Message
                          ) -> _DataManager:
        """A new data manager holding one message, checked and prepared as
        ``send()`` does, and joined to no transaction: join it yourself
        (``transaction.get().join(dm)``).

        zope.sendmail's ``send()`` calls it for each message; mailoutbox's
        ``send()`` does not (it gathers the messages of a transaction in one
        data manager), so overriding it changes nothing there.
        """
        datamanager = self.datamanager_factory(self, self._manager())
        self._add(datamanager, self._message(fromaddr, toaddrs, message, None))
        return datamanager

    def send(self, fromaddr: str, toaddrs: Iterable[str],
             message: bytes | str | email.message.Message,
             mailer: str | None = None, *,
             not_before: datetime.datetime | datetime.timedelta | float | None = None,
             priority: str | int | None = None) -> str:
        """See :meth:`mailoutbox.interfaces.IMailDelivery.send`."""
        prepared = self._message(fromaddr, toaddrs, message, mailer,
                                 not_before, priority)
        message_id, relay = prepared.message_id, prepared.relay
        manager = self._manager()
        txn = manager.get()
        try:
            datamanager = txn.data(self)
        except KeyError:
            datamanager = None
        if datamanager is None or datamanager.state != _OPEN:
            # The first message, or the data manager joined after a
            # savepoint that was rolled back (which unjoined it).
            if _aborting(txn):
                raise ValueError(
                    f"cannot send message <{message_id}>: the transaction is"
                    " being aborted (send() was called by an abort hook or a"
                    " data manager's abort()); send it after abort() returned,"
                    " or in a transaction of another transaction manager"
                )
            datamanager = self.datamanager_factory(self, manager)
            try:
                txn.join(datamanager)
            except ValueError as exc:
                raise ValueError(
                    f"cannot send message <{message_id}>: {exc}; in an"
                    " after-commit hook or an event subscriber, begin a new"
                    " transaction first (with transaction_manager: ...)"
                ) from exc
            txn.set_data(self, datamanager)
        self._add(datamanager, prepared)
        if relay is None:
            log.debug("message %s will be sent if the transaction commits",
                      message_id)
        else:
            log.debug("message %s will be sent through %r if the transaction"
                      " commits", message_id, relay)
        return message_id

    def _add(self, datamanager: _DataManager, prepared: _Message) -> None:
        datamanager.messages.append(prepared)

    def send_message(self, message: bytes | str | email.message.Message,
                     fromaddr: str | None = None,
                     toaddrs: Iterable[str] | None = None,
                     mailer: str | None = None, *,
                     not_before: datetime.datetime | datetime.timedelta | float
                     | None = None,
                     priority: str | int | None = None) -> str:
        """See :meth:`mailoutbox.interfaces.IMailDelivery.send_message`."""
        fromaddr, toaddrs, data = prepare_send_message(message, fromaddr, toaddrs)
        return self.send(fromaddr, toaddrs, data, mailer=mailer,
                         not_before=not_before, priority=priority)

    def _prepare(self, message_id: str, fromaddr: str,
                 toaddrs: tuple[str, ...], data: bytes) -> _Message:
        return _Message(message_id, fromaddr, toaddrs, data)


def _aborting(txn: Any) -> bool:
    """Whether this thread is inside ``txn.abort()`` (in an abort hook, say),
    where a data manager that joins is aborted before ``abort()`` returns:
    it would drop the message."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _ABORT_CODE and frame.f_locals.get("self") is txn:
            return True
        frame = frame.f_back
    return False


_ABORT_CODE = transaction.Transaction.abort.__code__


@implementer(IDataManagerSavepoint)
class _NothingToRollBack:
    def __init__(self, datamanager: MailDataManager) -> None:
        self.datamanager = datamanager

    def rollback(self) -> None:
        pass


@implementer(ISavepointDataManager)
class MailDataManager:
    """zope.sendmail's general data manager: calls ``vote(*args)`` when the
    transaction votes, ``callable(*args)`` when it finishes (an exception
    there is logged, not raised: the other resources have committed) and
    ``onAbort()`` when it aborts.

    mailoutbox's deliveries do not use it (their data managers hold all the
    messages of a transaction); it is here for code written for
    zope.sendmail that joins one to a transaction itself.  Its savepoints
    roll nothing back, as zope.sendmail's do not.
    """

    def __init__(self, callable: Callable[..., Any], args: tuple[Any, ...] = (),
                 vote: Callable[..., Any] | None = None,
                 onAbort: Callable[[], Any] | None = None) -> None:
        self.callable = callable
        self.args = args
        self.vote = vote
        self.onAbort = onAbort
        self.transaction_manager = transaction.manager

    def __repr__(self) -> str:
        return f"<MailDataManager {self.callable!r}>"

    def sortKey(self) -> str:
        return f"mailoutbox.delivery:call:{id(self):x}"

    def savepoint(self) -> _NothingToRollBack:
        return _NothingToRollBack(self)

    def tpc_begin(self, txn: Any, subtransaction: bool = False) -> None:
        pass

    def commit(self, txn: Any) -> None:
        pass

    def tpc_vote(self, txn: Any) -> None:
        if self.vote is not None:
            self.vote(*self.args)

    def tpc_finish(self, txn: Any) -> None:
        try:
            self.callable(*self.args)
        except Exception:
            log.exception("%r failed in tpc_finish", self.callable)

    def abort(self, txn: Any) -> None:
        if self.onAbort is not None:
            self.onAbort()

    tpc_abort = abort

    def beforeCompletion(self, txn: Any) -> None:
        pass

    afterCompletion = beforeCompletion


@implementer(IQueuedMailDelivery)
class QueuedMailDelivery(AbstractMailDelivery):
    """See :class:`mailoutbox.interfaces.IQueuedMailDelivery`.

    The queue folder is created (mode 0700) when the first message is
    queued, if needed; so is the folder of a relay (see
    :mod:`mailoutbox.relays`).  *mailers* names the mailers that messages
    may be routed to with ``send(..., mailer=NAME)``: a collection of
    names, or a mapping whose keys are the names (the mailers themselves
    are the processor's business).

    A ``postgresql://`` URL for *queuePath* queues into a PostgreSQL table
    (:mod:`mailoutbox.postgresql.datamanager`): through the connection
    that *connection* (a callable) returns for the current transaction, or
    through connections of the delivery's own (two-phase commit if the
    server allows it).  *connection* is only for such a URL.
    """

    datamanager_factory = QueuedDataManager
    #: The writer of a PostgreSQL queue (None: a Maildir queue).
    postgresql: Any = None

    def __init__(self, queuePath: str, transaction_manager: Any = None,
                 mailers: Iterable[str] | Mapping[str, Any] | None = None,
                 connection: Callable[[], Any] | None = None) -> None:
        super().__init__(transaction_manager)
        self.queuePath = str(queuePath)
        self.mailer_names = check_names(mailers)
        self._maildirs: dict[str | None, Maildir] = {}
        if is_url(self.queuePath):
            from mailoutbox.postgresql.datamanager import QueueWriter
            self.postgresql = QueueWriter(self.queuePath, connection)
            self.datamanager_factory = self.postgresql.datamanager_factory
        elif connection is not None:
            raise ValueError(
                "connection= needs a postgresql:// queue URL, not the folder"
                f" {self.queuePath!r}")

    def _add(self, datamanager: _DataManager, prepared: _Message) -> None:
        if self.postgresql is not None:
            self.postgresql.add(prepared)
        datamanager.messages.append(prepared)

    def maildir(self, relay: str | None = None, fresh: bool = False) -> Maildir:
        """The :class:`~mailoutbox.maildir.Maildir` of the queue (*relay*
        None) or of the relay folder of the mailer *relay*, created if
        needed when first used (or again with *fresh*)."""
        maildir = self._maildirs.get(relay)
        if maildir is None or fresh:
            if relay is None:
                maildir = Maildir(self.queuePath, create=True)
            else:
                maildir = open_relay(self.queuePath, relay, create=True)
            self._maildirs[relay] = maildir
        return maildir

    def __repr__(self) -> str:
        if self.postgresql is not None:
            return f"<QueuedMailDelivery {self.postgresql.shown!r}>"
        return f"<QueuedMailDelivery {self.queuePath!r}>"

    def _prepare(self, message_id: str, fromaddr: str,
                 toaddrs: tuple[str, ...], data: bytes) -> _Message:
        if self.postgresql is not None:
            return _Message(message_id, fromaddr, toaddrs, data)
        envelope = format_envelope(fromaddr, toaddrs)
        return _Message(message_id, fromaddr, toaddrs, data, envelope)


@implementer(IDirectMailDelivery)
class DirectMailDelivery(AbstractMailDelivery):
    """See :class:`mailoutbox.interfaces.IDirectMailDelivery`.

    The ``vote()`` of each mailer used is called once per transaction, with
    its first message; its ``send()`` once per message.  *mailers* maps the
    names that ``send(..., mailer=NAME)`` accepts to their mailers.
    """

    datamanager_factory = DirectDataManager

    def __init__(self, mailer: Any, transaction_manager: Any = None,
                 mailers: Mapping[str, Any] | None = None) -> None:
        super().__init__(transaction_manager)
        self.mailer = mailer
        if mailers is not None and not isinstance(mailers, Mapping):
            raise TypeError(
                "mailers must map names to mailers, not"
                f" {type(mailers).__name__}"
            )
        self.mailers: dict[str, Any] = dict(mailers or {})
        self.mailer_names = check_names(self.mailers)

    def _not_before(self, when: float | None) -> float | None:
        """A direct delivery cannot wait: a time still to come is refused."""
        if when is not None and when > time.time():
            utc = datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
            raise ValueError(
                "a direct delivery sends when the transaction commits and"
                f" cannot wait: not_before is {utc:%Y-%m-%d %H:%M:%S} UTC;"
                " schedule the message through a queued delivery"
            )
        return when

    def mailer_for(self, relay: str | None) -> Any:
        """The mailer of messages routed to *relay* (None: :attr:`mailer`)."""
        return self.mailer if relay is None else self.mailers[relay]

    def __repr__(self) -> str:
        return f"<DirectMailDelivery {self.mailer!r}>"


def __getattr__(name: str) -> Any:
    # zope.sendmail's delivery module re-exports its QueueProcessorThread
    # (Products.MailHost imports it from there).  Imported when asked for:
    # mailoutbox.queue is not needed to send, and imports much.
    if name == "QueueProcessorThread":
        from mailoutbox.queue import QueueProcessorThread

        return QueueProcessorThread
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
