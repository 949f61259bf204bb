"""The queue processor: sends the messages of a Maildir queue.

:class:`QueueProcessorThread` is a drop-in replacement for zope.sendmail's
thread of the same name.  Each *pass* lists the queue once
(:meth:`mailoutbox.maildir.Maildir.scan`), tidies up after crashes, and
hands the messages, oldest first, to a fixed number of worker threads.  A
worker claims a message, sends it through the mailer and ends the claim with
one of the outcomes described in the documentation chapter "The queue on
disk": sent, deferred (transient failure, tried again later according to the
:class:`~mailoutbox.retry.RetryPolicy`) or failed (permanent failure, moved
to the failed area); how one message is handled is in
:mod:`mailoutbox.sending`.  A thread that does nothing else renews the
claims of the messages in flight (:class:`~mailoutbox.workers.Heartbeat`),
so a slow send is never taken over by another processor, while the claims
of a processor that died are broken after the lease.  Each worker thread
closes its own connections; the processor never calls a mailer's
``close()``, which would close the connections of other threads too.

In a child process made by ``fork()`` (``multiprocessing``, ``gunicorn
--preload``), a processor has no threads: the child does not send the
queue's messages and exits at once, while the parent's processor goes on.

Messages routed to a named mailer are in relay folders inside the queue
(:mod:`mailoutbox.relays`); each relay folder is drained through the mailer
of its name, by worker threads and passes of its own
(:mod:`mailoutbox.lanes`), so that a slow or unreachable relay does not
hold up the others.
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

import zope.component
from zope.interface import implementer

from mailoutbox import errors
from mailoutbox.interfaces import IMailer
from mailoutbox.interfaces import IMailQueueProcessor
from mailoutbox.lanes import Lanes
from mailoutbox.maildir import DEFAULT_LEASE
from mailoutbox.maildir import Maildir
from mailoutbox.metrics import Metrics
from mailoutbox.ratelimit import RateLimits
from mailoutbox.ratelimit import check_max_connections
from mailoutbox.ratelimit import check_rate
from mailoutbox.relays import check_names
from mailoutbox.retry import RetryPolicy
from mailoutbox.sending import MessageSender
from mailoutbox.sending import _MissingMailer
from mailoutbox.sending import message_id_of
from mailoutbox.stores import is_url
from mailoutbox.stores import open_store
from mailoutbox.wakeup import ALL
from mailoutbox.wakeup import Wakeup
from mailoutbox.workers import SKIPPED
from mailoutbox.workers import Pass
from mailoutbox.workers import ProgressCallback
from mailoutbox.workers import Stats

__all__ = [
    "DEFAULT_CONCURRENCY",
    "MAX_CONCURRENCY",
    "ConsoleApp",  # noqa: F822 - from mailoutbox.cli.zope_sendmail, on first use
    "QueueProcessorThread",
    "Stats",
    "message_id_of",
    "run",  # noqa: F822 - from mailoutbox.cli.zope_sendmail, on first use
]

log = logging.getLogger(__name__)

#: Messages sent at the same time per relay, each over its own connection.
#: Enough to hide a relay's round-trip time (with 5 ms, 8 connections send
#: about 30 times as fast as one connection per message), few enough for any
#: relay's per-client limit (Postfix allows 20 by default).
DEFAULT_CONCURRENCY = 8
#: The largest *concurrency* accepted: more connections than any relay
#: allows one client, and threads the process may not be able to start.
MAX_CONCURRENCY = 100


def _check_duration(name: str, value: float, unit: str = "seconds") -> float:
    """*value*, if it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of {unit}, not {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of {unit} > 0,"
                         f" not {value!r}")
    return value


@implementer(IMailQueueProcessor)
class QueueProcessorThread(MessageSender, threading.Thread):
    """See :class:`mailoutbox.interfaces.IMailQueueProcessor`.

    *interval* is the time in seconds between two passes over the queue
    when the processor runs as a thread; *concurrency* the largest number
    of messages sent at once per relay (each worker keeps its own
    connection); with *adaptive* (the default) each pass starts with one
    worker, times its first sends and uses only as many workers as can
    usefully overlap: all of them against a distant or slow relay, fewer
    against a fast local one, where more threads would only compete for
    the interpreter (see :class:`mailoutbox.workers.Pass`); *retry*
    the :class:`~mailoutbox.retry.RetryPolicy`; *lease* how long, in
    seconds, a claim stays valid without being renewed;
    *max_messages_per_pass* makes a pass stop after attempting that many
    messages (the next one starts at once, with a fresh listing).
    *mailers* maps the names of relay folders to their mailers (see
    :meth:`setMailers`); at most *max_relays* relay folders are served at
    the same time, each by *concurrency* worker threads.

    *rate* (messages per second) and *max_connections* limit each relay
    whose mailer sets no ``rate`` or ``max_connections`` of its own (see
    :mod:`mailoutbox.ratelimit`); ``None``, the default, is no limit.

    *interval* and *lease* must be finite and > 0, *concurrency* a whole
    number from 1 to :data:`MAX_CONCURRENCY`, *rate* finite and > 0,
    *max_connections* a whole number >= 1: anything else raises
    :class:`ValueError` (:class:`TypeError` if not a number).

    .. versionadded:: 0.1
       The *rate* and *max_connections* arguments.
    """

    log = log
    #: Turns exceptions raised by the mailer into MailErrors (a seam).
    classify = staticmethod(errors.classify)
    maildir_factory = Maildir
    #: What wakes the running thread when a message is queued (a seam).
    wakeup_factory: Callable[[Any], Any] = Wakeup
    mailer: Any = None
    maildir: Maildir | None = None

    def __init__(self, interval: float = 3.0, *, concurrency: int = DEFAULT_CONCURRENCY,
                 retry: RetryPolicy | None = None, lease: float = DEFAULT_LEASE,
                 max_messages_per_pass: int | None = None,
                 mailers: Mapping[str, Any] | None = None,
                 max_relays: int = 8, adaptive: bool = True,
                 rate: float | None = None,
                 max_connections: int | None = None) -> None:
        super().__init__(name="mailoutbox.queue.QueueProcessorThread", daemon=True)
        if not (isinstance(concurrency, int) and not isinstance(concurrency, bool)
                and 1 <= concurrency <= MAX_CONCURRENCY):
            raise ValueError(
                f"concurrency must be a whole number from 1 to"
                f" {MAX_CONCURRENCY}, not {concurrency!r}")
        _check_duration("lease", lease)
        if max_messages_per_pass is not None and max_messages_per_pass < 1:
            raise ValueError("max_messages_per_pass must be None or >= 1")
        if not (isinstance(max_relays, int) and max_relays >= 1):
            raise ValueError(
                f"max_relays must be an integer >= 1, not {max_relays!r}")
        self.interval = interval
        self.concurrency = concurrency
        self.adaptive = adaptive
        #: Messages per second, and connections, per relay whose mailer
        #: has no limit of its own (None: no limit).
        self.rate = check_rate(rate)
        self.max_connections = check_max_connections(max_connections)
        #: The rate limiters of the relays.
        self.rate_limits = RateLimits()
        self.retry = RetryPolicy() if retry is None else retry
        self.lease = lease
        self.max_messages_per_pass = max_messages_per_pass
        self.max_relays = max_relays
        self.mailers: dict[str, Any] = {}
        self.setMailers(mailers or {})
        self._stopping = threading.Event()
        self._pass_lock = threading.Lock()
        self._lanes = Lanes(self)
        self._pass_owner: threading.Thread | None = None
        #: The processor's numbers, for monitoring (:mod:`mailoutbox.metrics`).
        self.metrics = Metrics(self)
        _processors.add(self)

    # -- configuration (zope.sendmail's API) ----------------------------------

    @property
    def interval(self) -> float:
        """Seconds between two passes over a folder (finite, > 0)."""
        return self._interval

    @interval.setter
    def interval(self, value: float) -> None:
        self._interval = _check_duration("interval", value)

    @property
    def pollingInterval(self) -> int:
        return int(self.interval * 1000)

    @pollingInterval.setter
    def pollingInterval(self, value: int) -> None:
        _check_duration("pollingInterval", value, "milliseconds")
        self.interval = value / 1000.0

    @property
    def queuePath(self) -> str | None:
        return None if self.maildir is None else self.maildir.path

    def setMailer(self, mailer: Any) -> None:
        self.mailer = mailer

    def setMailers(self, mailers: Mapping[str, Any]) -> None:
        """Send the messages of the relay folder *NAME* through
        ``mailers[NAME]``.  A relay folder not named here uses the
        :class:`~mailoutbox.interfaces.IMailer` utility of its name; while
        there is none, its messages are deferred."""
        if not isinstance(mailers, Mapping):
            raise TypeError(
                f"mailers must map names to mailers, not {type(mailers).__name__}")
        check_names(mailers)
        self.mailers = dict(mailers)

    def mailer_for(self, name: str) -> Any:
        """The mailer of the relay folder of *name* (see :meth:`setMailers`)."""
        mailer = self.mailers.get(name)
        if mailer is None:
            mailer = zope.component.queryUtility(IMailer, name)
        return _MissingMailer(name) if mailer is None else mailer

    def setMaildir(self, maildir: Any) -> None:
        """Use *maildir*: a :class:`~mailoutbox.maildir.Maildir`, or another
        :class:`~mailoutbox.interfaces.IMaildir` with a ``path`` (such as
        zope.sendmail's), whose folder is then opened as one."""
        if not hasattr(maildir, "scan"):
            path = getattr(maildir, "path", None)
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(
                    f"cannot process the queue {maildir!r}: it is not a"
                    " mailoutbox Maildir and has no path to open one at")
            maildir = self.maildir_factory(path)
        self.maildir = maildir

    def setQueuePath(self, path: str) -> None:
        """Use the Maildir at *path*, creating it if needed, or the
        PostgreSQL queue at the ``postgresql://`` URL *path* (see
        :mod:`mailoutbox.stores`)."""
        if is_url(path):
            self.setMaildir(open_store(path))
        else:
            self.setMaildir(self.maildir_factory(path, create=True))

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the thread (after :meth:`setMailer` and :meth:`setQueuePath`)."""
        self._check_configured()
        super().start()

    def run(self, forever: bool = True) -> None:
        """Process the queue until :meth:`stop` is called, each of its
        folders every :attr:`interval` seconds; with *forever* false, do
        one pass and return (as zope.sendmail's thread does)."""
        if not forever:
            try:
                self.process_queue()
            except Exception:
                self.log.exception("error while processing the queue %s",
                                   self.queuePath)
            finally:
                self._shutdown()
            return
        atexit.register(self.stop)
        wakeup = self.wakeup_factory(self)
        try:
            with self._pass_lock:
                wakeup.start()
                self._pass_owner = self
                while not self._stopping.is_set():
                    try:
                        self._lanes.run_forever()
                    except Exception:  # pragma: no cover - a bug: keep going
                        self.log.exception("error while processing the queue %s",
                                           self.queuePath)
                        self._stopping.wait(self.interval)
                self._pass_owner = None
        finally:
            wakeup.stop()
            atexit.unregister(self.stop)
            self._shutdown()

    def wake(self, relays: Iterable[str | None] | None = None) -> None:
        """Start a pass of the queue now, rather than after the interval.

        *relays* names the folders to pass over: relay names, and ``None``
        for the queue itself; by default, every folder.  A folder whose
        pass is running gets one more pass after it, however many wakes
        came meanwhile.  Safe to call from any thread; does nothing unless
        the processor's thread runs.  Messages queued in this process, or
        (on Linux) by any process, wake the thread by themselves: see
        :mod:`mailoutbox.wakeup`.
        """
        if isinstance(relays, (str, bytes)):
            raise TypeError(f"give a collection of relay names, not {relays!r}")
        self._lanes.wake([ALL] if relays is None else relays)

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the messages in flight.

        No new message is started.  Returns when the thread has ended (or,
        if it was not started, when a pass that :meth:`process_queue` runs
        in another thread has ended) and the worker threads are gone, each
        having closed its own connections (bounded by the mailer's
        timeout).  Raises :class:`TimeoutError` if
        that takes longer than *timeout* seconds.  Called from one of the
        processor's own threads (an event subscriber, a signal handler
        interrupting a pass), it only asks for the stop and returns.
        """
        self._stopping.set()
        self._lanes.wakeup.set()
        current = threading.current_thread()
        if (current is self or current is self._pass_owner
                or current in self._lanes.threads()):
            return
        if self.is_alive():
            self.join(timeout)
            if self.is_alive():
                raise TimeoutError(
                    f"the queue processor did not stop within {timeout} s: a"
                    " message is still being sent (the mailer's timeout bounds"
                    " this); call stop() again or give a longer timeout"
                )
        else:
            self._shutdown(timeout)

    def _shutdown(self, timeout: float | None = None) -> None:
        if not self._pass_lock.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(
                f"the pass over the queue did not end within {timeout} s"
                " (a message is still being sent); give a longer timeout"
            )
        try:
            self._shutdown_locked()
        finally:
            self._pass_lock.release()

    def _shutdown_locked(self) -> None:
        """End the worker threads (each closes its own connections)."""
        self._lanes.close()

    def _after_fork_in_child(self) -> None:
        """In a child process made by ``fork()``: forget the parent's
        threads, pass and locks (another thread may have held them).  If the
        parent had started the processor's thread, the copy is stopped (a
        thread cannot be started twice): :meth:`stop` returns at once and
        :meth:`process_queue` does nothing."""
        self._pass_lock = threading.Lock()
        self._pass_owner = None
        self._stopping = threading.Event()
        if self.ident is not None:
            self._stopping.set()
        self._lanes = Lanes(self)
        self.metrics._after_fork_in_child()
        self.rate_limits = RateLimits()  # its locks may be held
        atexit.unregister(self.stop)

    def _check_configured(self) -> Maildir:
        if self.mailer is None or self.maildir is None:
            raise RuntimeError(
                "the queue processor has no mailer or no queue: call"
                " setMailer() and setQueuePath() first"
            )
        return self.maildir

    # -- one pass -------------------------------------------------------------

    def process_queue(self, now: float | None = None,
                      on_progress: ProgressCallback | None = None, *,
                      flush: bool = False) -> Stats:
        """Make one pass over the queue and each of its relay folders (in
        parallel) and return their :class:`Stats` added up.

        *now* (seconds since the epoch) replaces the clock for deciding
        which deferred messages are due and when to try them again.
        *on_progress* is called as ``on_progress(done, total)`` after each
        message, from the worker threads, one call at a time.  With *flush*,
        every deferred message is attempted now, whatever the time of its
        next attempt (as Postfix's ``postqueue -f`` does); a message that
        fails again is deferred by the retry policy, its attempts counted.
        A message scheduled for later (``send(..., not_before=...)``) is not
        attempted before its time, flush or not.  Call
        :meth:`stop` when done with the processor: the worker threads and
        connections are kept for the next pass until then.
        """
        self._check_configured()
        clock: Callable[[], float] = time.time if now is None else (lambda: now)
        with self._pass_lock:
            self._pass_owner = threading.current_thread()
            try:
                return self._lanes.run_once(clock, on_progress, flush)
            finally:
                self._pass_owner = None
                if self._stopping.is_set():
                    self._shutdown_locked()

    def _work(self, job: Pass) -> None:
        slot = job.join()
        while (entry := job.next_entry(slot)) is not None:
            # The relay's rate, before the claim (and not timed: waiting
            # for it says nothing about the relay's speed).
            if not job.take_token():
                job.record(SKIPPED)  # stopping
                continue
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                outcome = self._process(job, entry)
            except Exception:
                self.log.exception("unexpected error while processing %s", entry.path)
                self.metrics.error(job.relay)
                outcome = SKIPPED
            job.record(outcome)
            if outcome != SKIPPED:
                job.observe(time.perf_counter() - wall, time.thread_time() - cpu)
                self.metrics.handled(job, entry, outcome)


#: Every processor of the process, to reset in a forked child.
_processors: weakref.WeakSet[QueueProcessorThread] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Reset every processor in a child process made by ``fork()``.

    The child has only the thread that called ``fork()``: the processor
    threads, their workers and heartbeat, and any pass in progress stay
    the parent's (which goes on sending).  Each processor's copy forgets
    them, and its locks, so that nothing in the child waits for a thread
    that does not exist there (at exit, :meth:`QueueProcessorThread.stop`
    returns at once) and nothing is sent twice.
    """
    for processor in list(_processors):
        processor._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def __getattr__(name: str) -> Any:
    # zope.sendmail's console application lives in its queue module; ours
    # is in the command-line package, which imports this module.
    if name in ("ConsoleApp", "run"):
        from mailoutbox.cli import zope_sendmail

        return getattr(zope_sendmail, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
