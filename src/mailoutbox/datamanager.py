"""The data managers that join the deliveries to transactions.

See :class:`transaction.interfaces.ISavepointDataManager` for the protocol
and :doc:`/datamanager` for a walk through it.  A delivery
(:mod:`mailoutbox.delivery`) creates one data manager per transaction, which
holds every message sent through that delivery in it, in memory.  What
happens when the transaction commits:

- :class:`QueuedDataManager`: ``tpc_vote`` writes each message into
  ``tmp/`` of the queue and fsyncs it; ``tpc_finish`` renames them into
  ``new/`` and fsyncs ``new/`` once.  A message sent with ``not_before``
  gets its retry state in ``new/`` in ``tpc_vote`` (written and fsynced,
  and ``new/`` fsynced, before the message can enter it: see
  :mod:`mailoutbox.schedule`).  A message routed to a named mailer
  goes to the relay folder of that mailer instead
  (:mod:`mailoutbox.relays`), in the same way.  A crash between the two leaves only
  files in ``tmp/``, which are never sent and are removed by
  :meth:`mailoutbox.maildir.Maildir.cleanup` after 36 hours.  The messages
  of a transaction that queues two or more enter the queue together, even
  if a crash cuts ``tpc_finish`` short: see :mod:`mailoutbox._commit`.

- :class:`DirectDataManager`: ``tpc_vote`` calls the ``vote()`` of each
  mailer used (an SMTP mailer connects), ``tpc_finish`` sends the messages.  The
  outcome of each is an event, dispatched after the transaction completed
  (see :func:`_dispatch`).

The data managers sort (``sortKey``) before zope.sqlalchemy's (``~sqlalchemy``),
which commits the database in its vote: a failing mail vote then still aborts
the database transaction.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

import zope.event
from transaction.interfaces import IDataManagerSavepoint
from transaction.interfaces import ISavepointDataManager
from zope.interface import implementer

from mailoutbox import wakeup
from mailoutbox._commit import CommitRecord
from mailoutbox._files import unlink
from mailoutbox.address import parse_address
from mailoutbox.errors import classify
from mailoutbox.errors import is_permanent_code
from mailoutbox.events import MailErrorEvent
from mailoutbox.events import MailSentEvent
from mailoutbox.maildir import Maildir
from mailoutbox.maildir import MaildirMessageWriter

if TYPE_CHECKING:
    from mailoutbox.delivery import DirectMailDelivery
    from mailoutbox.delivery import QueuedMailDelivery

__all__ = [
    "DirectDataManager",
    "QueuedDataManager",
]

# The logger (and the sort keys below) keep the name of the module the data
# managers were written in: applications configure "mailoutbox.delivery"
# and the documentation names it.
log = logging.getLogger("mailoutbox.delivery")

#: How often the event dispatcher moves itself behind after-commit hooks
#: added after it before it gives up and dispatches anyway.
MAX_HOOK_DEFERRALS = 10

_OPEN, _VOTED, _FINISHED, _ABORTED = "open", "voted", "finished", "aborted"


@dataclass(slots=True)
class _Message:
    """A message prepared by ``send()``, waiting for the commit."""

    message_id: str
    fromaddr: str
    toaddrs: tuple[str, ...]
    data: bytes
    envelope: bytes = b""  # the queue file's envelope lines
    relay: str | None = None  # the name of the mailer; None: the default
    #: Not to be sent before this time (seconds since the epoch); None: now.
    not_before: float | None = None
    #: Higher goes first (see :mod:`mailoutbox.schedule`); 0: normal.
    priority: int = 0


@implementer(IDataManagerSavepoint)
class _Savepoint:
    """Rolling back forgets the messages sent after the savepoint."""

    def __init__(self, datamanager: _DataManager) -> None:
        self.datamanager = datamanager
        self.length = len(datamanager.messages)

    def rollback(self) -> None:
        dropped = self.datamanager.messages[self.length:]
        del self.datamanager.messages[self.length:]
        for message in dropped:
            log.debug("message %s rolled back to a savepoint", message.message_id)


@implementer(ISavepointDataManager)
class _DataManager:
    """The messages one delivery sends in one transaction.

    See :class:`transaction.interfaces.ISavepointDataManager`.
    """

    kind = "abstract"

    def __init__(self, delivery: Any, transaction_manager: Any) -> None:
        self.delivery = delivery
        self.transaction_manager = transaction_manager
        self.messages: list[_Message] = []
        self.state = _OPEN
        self._sort_key = f"mailoutbox.delivery:{self.kind}:{id(self):x}"

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.state}, {len(self.messages)}"
                " message(s)>")

    def sortKey(self) -> str:
        return self._sort_key

    def savepoint(self) -> _Savepoint:
        return _Savepoint(self)

    def tpc_begin(self, txn: Any) -> None:
        pass

    def commit(self, txn: Any) -> None:
        pass

    def abort(self, txn: Any) -> None:
        if self.state in (_FINISHED, _ABORTED):
            return  # e.g. the clean-up after the after-commit hooks
        self.state = _ABORTED
        self._abort()
        self.messages = []

    tpc_abort = abort

    def _abort(self) -> None:
        raise NotImplementedError


class QueuedDataManager(_DataManager):
    """Writes the messages of a transaction into a Maildir queue.

    See :class:`transaction.interfaces.ISavepointDataManager`.
    """

    kind = "queued"

    def __init__(self, delivery: QueuedMailDelivery,
                 transaction_manager: Any) -> None:
        super().__init__(delivery, transaction_manager)
        self.writers: list[tuple[str, MaildirMessageWriter]] = []
        #: The folders written to, by relay name (None: the queue itself).
        self.maildirs: dict[str | None, Maildir] = {}
        #: The commit record of a transaction with two messages or more.
        self.record: CommitRecord | None = None
        #: The retry states written for scheduled messages (paths).
        self.scheduled: list[str] = []

    def tpc_vote(self, txn: Any) -> None:
        """Write and fsync every message in ``tmp/``; on failure remove what
        was written and raise :class:`OSError` naming the message."""
        self.state = _VOTED
        if not self.messages:
            return
        path = self.delivery.queuePath
        what = f"message <{self.messages[0].message_id}>"
        try:
            for message in self.messages:
                message_id = message.message_id
                what = f"message <{message_id}>"
                relay = message.relay
                maildir = self.maildirs.get(relay)
                if maildir is None:
                    maildir = self.delivery.maildir(relay)
                # newMessage() is IMaildir's: given a priority only when
                # there is one.
                options = (message.priority,) if message.priority else ()
                try:
                    writer = maildir.newMessage(*options)
                except FileNotFoundError:  # the folder was removed: make it
                    maildir = self.delivery.maildir(relay, fresh=True)
                    writer = maildir.newMessage(*options)
                self.maildirs[relay] = maildir
                self.writers.append((message_id, writer))
                writer.write(message.envelope)
                writer.write(message.data)
                writer.sync()
                if message.not_before is not None:
                    self.scheduled.append(
                        maildir.schedule(writer.name, message.not_before))
            if self.scheduled:  # the retry states are in new/ before the messages
                for relay in {m.relay for m in self.messages
                              if m.not_before is not None}:
                    self.maildirs[relay].sync_new()
            if len(self.writers) > 1:
                what = "messages " + ", ".join(f"<{i}>" for i, _w in self.writers)
                self.record = CommitRecord(self.delivery.maildir(None),
                                           self.writers)
        except Exception as exc:
            log.error("could not queue %s in %s", what, path, exc_info=True)
            self._abort()
            if isinstance(exc, OSError) and exc.errno is not None:
                raise OSError(
                    exc.errno,
                    f"could not queue {what} in {path}: {exc.strerror}",
                    exc.filename,
                ) from exc
            if isinstance(exc, ValueError):  # e.g. the path is not a queue
                raise ValueError(f"could not queue {what} in {path}: {exc}") from exc
            raise

    def tpc_finish(self, txn: Any) -> None:
        """Move the messages into ``new/`` and fsync it.  Never raises."""
        self.state = _FINISHED
        record, self.record = self.record, None
        if record is not None:
            try:
                record.commit()
            except Exception:  # e.g. fsync: do the renames all the same
                log.error("could not commit the record of message(s) %s",
                          ", ".join(i for i, _w in self.writers), exc_info=True)
        stuck = False
        for message_id, writer in self.writers:
            try:
                writer.commit(fsync_dir=False)
            except Exception as exc:
                if record is not None and isinstance(exc, FileNotFoundError):
                    # A processor rolled the committed record forward first.
                    log.info("queued message %s as %s", message_id, writer.name)
                    continue
                stuck = True
                log.critical(
                    "could not move message %s from tmp/ into new/ of %s: %s",
                    message_id, self.delivery.queuePath,
                    "it will not be sent" if record is None else
                    "the queue processor will try again", exc_info=True,
                )
            else:
                log.info("queued message %s as %s", message_id, writer.name)
        for maildir in self.maildirs.values() if self.writers else ():
            try:
                maildir.sync_new()
            except Exception:
                log.error(
                    "could not fsync %s after queueing message(s) %s",
                    maildir.new, ", ".join(
                        i for i, w in self.writers if w.maildir.path == maildir.path),
                    exc_info=True,
                )
        if record is not None and not stuck:
            record.remove()  # else roll_forward() moves what is left
        if self.writers:  # start the processor's pass now (never raises)
            wakeup.committed(self.delivery.queuePath, self.maildirs)
        self.writers = []
        self.scheduled = []
        self.messages = []

    def _abort(self) -> None:
        record, self.record = self.record, None
        if record is not None:
            record.remove()
        scheduled, self.scheduled = self.scheduled, []
        for path in scheduled:
            unlink(path)
        for message_id, writer in self.writers:
            try:
                writer.abort()
            except Exception:
                log.error("could not remove the file of message %s from tmp/",
                          message_id, exc_info=True)
            else:
                log.debug("message %s not queued", message_id)
        self.writers = []


class DirectDataManager(_DataManager):
    """Sends the messages of a transaction through a mailer when it commits.

    See :class:`transaction.interfaces.ISavepointDataManager`.
    """

    kind = "direct"

    def __init__(self, delivery: DirectMailDelivery,
                 transaction_manager: Any) -> None:
        super().__init__(delivery, transaction_manager)
        #: The mailers whose vote() was called, in order.
        self.voted: list[Any] = []

    def tpc_vote(self, txn: Any) -> None:
        """Ask each mailer used whether it can send (once, with its first
        message): an SMTP mailer connects."""
        self.state = _VOTED
        for message in self.messages:
            mailer = self.delivery.mailer_for(message.relay)
            if any(voted is mailer for voted in self.voted):
                continue
            self.voted.append(mailer)
            vote = getattr(mailer, "vote", None)
            if vote is None:
                warnings.warn(
                    f"the mailer {mailer!r} has no vote() method: it cannot"
                    " veto the transaction (give it vote() and abort())",
                    DeprecationWarning, stacklevel=2,
                )
                continue
            vote(message.fromaddr, message.toaddrs, message.data)

    def tpc_finish(self, txn: Any) -> None:
        """Send every message; log failures and report every outcome as an
        event after the transaction completed.  Never raises."""
        self.state = _FINISHED
        events = [event for message in self.messages
                  for event in self._send(message)]
        self.messages = []
        if events:
            try:
                _schedule(txn, events)
            except Exception:
                log.error("could not schedule the events of message(s) %s",
                          ", ".join(e.messageId for e in events), exc_info=True)

    def _send(self, message: _Message) -> list[MailSentEvent | MailErrorEvent]:
        try:
            refused = self.delivery.mailer_for(message.relay).send(
                message.fromaddr, message.toaddrs, message.data
            )
            refused = dict(refused or {})
        except Exception as exc:
            error = classify(exc)
            log.error("could not send message %s: %s", message.message_id,
                      error, exc_info=True)
            return [MailErrorEvent(
                message.message_id, str(error), permanent=True,
                code=error.code, refused=error.refused,
            )]
        if refused:
            log.warning("sent message %s, but these recipients were refused:"
                        " %s", message.message_id, refused)
        else:
            log.info("sent message %s", message.message_id)
        sent = [a for a in message.toaddrs
                if a not in refused and parse_address(a)[1] not in refused]
        events: list[MailSentEvent | MailErrorEvent] = [
            MailSentEvent(message.message_id, refused, sent=sent)]
        # A direct delivery never tries again: those refused for now are
        # given up on too, which an error event says.
        later = {a: r for a, r in refused.items() if not is_permanent_code(r[0])}
        if later:
            events.append(MailErrorEvent(
                message.message_id,
                "refused for now, and not tried again by a direct delivery: "
                + ", ".join(f"{a} ({c} {t})" for a, (c, t) in later.items()),
                permanent=True, code=max(c for c, _t in later.values()),
                refused=later))
        return events

    def _abort(self) -> None:
        voted, self.voted = self.voted, []
        for mailer in voted:
            abort = getattr(mailer, "abort", None)
            if abort is None:
                continue  # an old mailer, with nothing to abort
            try:
                abort()
            except Exception:
                log.error("the mailer %r failed to abort message(s) %s", mailer,
                          ", ".join(m.message_id for m in self.messages),
                          exc_info=True)


# -- events --------------------------------------------------------------------

class _EventsKey:
    """Key of the pending events in :meth:`Transaction.data`."""


_EVENTS_KEY = _EventsKey()


def _schedule(txn: Any, events: list[Any]) -> None:
    """Dispatch *events* after *txn* completed, with those of the other
    deliveries, through a single after-commit hook."""
    try:
        pending = txn.data(_EVENTS_KEY)
    except KeyError:
        pending = []
        txn.set_data(_EVENTS_KEY, pending)
        txn.addAfterCommitHook(_dispatch, args=(txn, pending, 0))
    pending.extend(events)


def _dispatch(status: bool, txn: Any, events: list[Any], deferrals: int) -> None:
    """The after-commit hook that notifies the events of a transaction.

    The transaction manager still holds the completed transaction while its
    after-commit hooks run.  A subscriber may start a new transaction with
    the same manager (``with tm:``, ``tm.begin()``, ``tm.attempts()``):
    doing so frees the completed one, which also empties its list of
    after-commit hooks, so hooks that come after this one would never run.
    This hook therefore first moves itself behind every hook added after it
    (at most :data:`MAX_HOOK_DEFERRALS` times).  *status* does not matter:
    the messages were sent either way.
    """
    if not events:
        return  # dispatched already (the transaction was committed again)
    hooks = list(txn.getAfterCommitHooks())
    mine = next(i for i, (hook, args, _kws) in enumerate(hooks)
                if hook is _dispatch and args[1] is events
                and args[2] == deferrals)
    if mine < len(hooks) - 1 and deferrals < MAX_HOOK_DEFERRALS:
        txn.addAfterCommitHook(_dispatch, args=(txn, events, deferrals + 1))
        return
    # Take the events out first: a subscriber that commits the completed
    # transaction again runs its after-commit hooks again, this one too.
    events, pending = list(events), events
    pending.clear()
    for event in events:
        try:
            zope.event.notify(event)
        except Exception:
            log.error("a subscriber failed on %r of message %s", event,
                      event.messageId, exc_info=True)
