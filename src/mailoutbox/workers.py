"""The worker threads of the queue processor, and the state of one pass.

A pass hands the entries of one listing of the queue
(:class:`mailoutbox.maildir.Scan`) to the workers, oldest first, one at a
time, and counts what became of them (:class:`Stats`).  The workers are kept
from pass to pass, so that each keeps its own SMTP connection open while
the queue is busy; each closes its own connections when its lane goes idle
and when it ends.  The claims of the messages in flight are registered with
the pass, so that one thread that does nothing else can renew them all
(:class:`Heartbeat`).  The queue
and each of its relay folders has a pool and passes of its own
(:mod:`mailoutbox.lanes`).
"""
from __future__ import annotations

import logging
import math
import queue
import statistics
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from mailoutbox._deferrals import Deferrals
from mailoutbox.maildir import Claim
from mailoutbox.maildir import Entry
from mailoutbox.maildir import Maildir
from mailoutbox.maildir import Scan

__all__ = [
    "DEFERRED", "FAILED", "PUT_BACK", "SENT", "SKIPPED", "Heartbeat", "Pass",
    "Stats",
    "WorkerPool", "WorkerStartError", "close_connection",
]

log = logging.getLogger(__name__)

#: The outcomes of a message in a pass (names of :class:`Stats` counters).
SENT, DEFERRED, FAILED, SKIPPED = "sent", "deferred", "failed", "skipped"
#: Not an outcome: the relay throttled the message, which is tried again
#: later in the pass (see :meth:`Pass.throttled`).
PUT_BACK = "put back"

#: Sends timed, one worker at a time, before a pass decides how many
#: workers to use (see :meth:`Pass.observe`).
SAMPLES = 3
#: A send this slow (seconds) is waiting on the relay, not on the CPU: all
#: workers are used at once.
SLOW_SEND = 0.05

#: ``on_progress(done, total)``: *done* of the *total* messages of the pass
#: have been handled (sent, deferred, failed or skipped).
ProgressCallback = Callable[[int, int], None]


@dataclass
class Stats:
    """What one pass over the queue did."""

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    #: not attempted: deferred until later, claimed by another processor,
    #: gone meanwhile, or an unexpected error (logged)
    skipped: int = 0
    #: the pass stopped at ``max_messages_per_pass``: more may be due
    limited: bool = False
    #: the share of each relay folder, by mailer name (the queue's own
    #: messages are the rest)
    relays: dict[str, Stats] = field(default_factory=dict, repr=False,
                                     compare=False)

    @property
    def attempted(self) -> int:
        """Messages whose state this pass changed."""
        return self.sent + self.deferred + self.failed

    @property
    def total(self) -> int:
        """Messages of the listing that the pass handled."""
        return self.attempted + self.skipped

    def add(self, other: Stats, relay: str | None = None) -> None:
        """Count the messages of *other* too (those of the relay folder
        *relay*, if given)."""
        for name in ("sent", "deferred", "failed", "skipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.limited = self.limited or other.limited
        if relay is not None:
            self.relays[relay] = other


class Pass:
    """The shared state of one pass: the entries still to hand out, the
    counts, and the claims in flight.

    With *adaptive*, the pass starts with one worker and times its first
    sends (:meth:`observe`): the ratio of a send's wall time to the CPU time
    its thread used says how many sends can usefully overlap.  Against a
    distant or slow relay (waiting dominates) every worker is used; against
    a fast local one, where more threads would only compete for the
    interpreter, only as many as the ratio says.
    """

    def __init__(self, maildir: Maildir, scan: Scan, now: Callable[[], float],
                 stopping: threading.Event, limit: int | None,
                 on_progress: ProgressCallback | None, workers: int, *,
                 mailer: Any = None, relay: str | None = None,
                 on_finished: Callable[[], None] | None = None,
                 adaptive: bool = False, limiter: Any = None,
                 flush: bool = False) -> None:
        self.maildir = maildir
        #: Deferred messages are due now: claim each one listed, due or not
        #: (see :meth:`~mailoutbox.interfaces.IQueueStore.claim`).
        self.flush = flush
        #: The relay's :class:`~mailoutbox.ratelimit.RateLimiter` (or None).
        self.limiter = limiter
        self._again: deque[Entry] = deque()  # put back, to try again
        self._put_back: set[str] = set()
        #: The mailer that sends the messages of this pass.
        self.mailer = mailer
        #: The name of the relay folder listed (None: the queue itself).
        self.relay = relay
        self._on_finished = on_finished or (lambda: None)
        self.scan = scan
        self.now = now
        self.total = len(scan.entries)
        self.stats = Stats()
        #: The messages deferred for the relay's reasons (logged as one line).
        self.deferrals = Deferrals()
        self.finished = threading.Event()
        self._stopping = stopping
        self._limit = limit
        self._on_progress = on_progress
        self._index = 0
        self._handed_out = 0
        self._done = 0
        self._workers_left = workers
        self._lock = threading.Lock()
        self._in_flight: set[Claim] = set()
        # The claims have a lock of their own, so that the heartbeat never
        # waits for the pass's (held while the progress callback runs).
        self._claims_lock = threading.Lock()
        self.workers = workers
        #: How many workers may take messages (the others wait).
        self.active = 1 if adaptive else workers
        self._samples: list[float] = []
        self._decided = not adaptive
        self._exhausted = False
        self._slots = 0
        self._gate = threading.Condition(self._lock)

    def join(self) -> int:
        """A worker starts on this pass: its slot number (0, 1, ...)."""
        with self._lock:
            slot = self._slots
            self._slots += 1
            return slot

    def observe(self, wall: float, cpu: float) -> None:
        """Record how long a send took, in wall time and in CPU time of the
        thread that made it; after the first few, decide how many workers
        to use for the rest of the pass."""
        with self._lock:
            if self._decided:
                return
            if wall >= SLOW_SEND:
                wanted = self.workers
            else:
                self._samples.append(wall / max(cpu, 1e-6))
                if len(self._samples) < SAMPLES:
                    return
                wanted = math.ceil(statistics.median(self._samples))
            self.active = max(1, min(self.workers, wanted))
            self._decided = True
            self._gate.notify_all()

    def next_entry(self, slot: int = 0) -> Entry | None:
        """The next message to attempt; None when there is none (or the
        processor is stopping, or the pass reached its limit).  A worker
        whose *slot* is not active waits until it is, or the pass ends."""
        with self._lock:
            while slot >= self.active and not self._exhausted:
                if self._stopping.is_set():
                    return None
                self._gate.wait(0.1)
            entry = self._next_locked()
            if entry is None:
                self._exhausted = True
                self._gate.notify_all()
            return entry

    def _next_locked(self) -> Entry | None:
        if self._again and not self._stopping.is_set():
            return self._again.popleft()
        while self._index < self.total and not self._stopping.is_set():
            if self._limit is not None and self._handed_out >= self._limit:
                self.stats.limited = True
                return None
            entry = self.scan.entries[self._index]
            self._index += 1
            retry_at = self.scan.retry_at.get(entry.name)
            if retry_at is not None and retry_at > self.now():
                self._record(SKIPPED)
                continue
            self._handed_out += 1
            return entry
        return None

    def record(self, outcome: str) -> None:
        if outcome == PUT_BACK:
            return  # counted when it is tried again
        with self._lock:
            self._record(outcome)

    def take_token(self) -> bool:
        """Wait until the relay's rate allows one more message (before it
        is claimed); False if the processor is stopping meanwhile."""
        return self.limiter is None or self.limiter.acquire(self._stopping)

    def throttled(self, entry: Entry) -> bool:
        """The relay throttled the message of *entry*: slow the relay down
        (:meth:`~mailoutbox.ratelimit.RateLimiter.throttled`).  True if the
        message is put back, to be tried again later in this pass at the
        lower rate (once per pass); False if it is to be deferred as after
        any transient failure."""
        if self.limiter is None:
            return False
        again = self.limiter.throttled()
        with self._lock:
            if not again or entry.name in self._put_back:
                return False
            self._put_back.add(entry.name)
            self._again.append(entry)
            return True

    def _record(self, outcome: str) -> None:
        setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        self._done += 1
        if self._on_progress is not None:
            try:
                self._on_progress(self._done, self.total)
            except Exception:
                log.exception("the progress callback failed")

    def hold(self, claim: Claim) -> None:
        with self._claims_lock:
            self._in_flight.add(claim)

    def drop(self, claim: Claim) -> None:
        with self._claims_lock:
            self._in_flight.discard(claim)

    def renew_claims(self) -> None:
        with self._claims_lock:
            claims = list(self._in_flight)
        for claim in claims:
            claim.renew()

    def worker_done(self) -> None:
        with self._lock:
            self._workers_left -= 1
            done = self._workers_left == 0
        if done:
            self.finished.set()
            self._on_finished()


def close_connection(mailer: Any) -> None:
    """Close the calling thread's connection of *mailer*, if the mailer
    can (``close_connection()``, as :class:`~mailoutbox.mailer.SMTPMailer`
    has); errors are logged."""
    close = getattr(mailer, "close_connection", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.exception("error while closing a connection of %r", mailer)


class WorkerStartError(RuntimeError):
    """The worker threads of a pass could not be started (the system's
    limit of threads or memory: lower the concurrency)."""


#: A task for every worker: close your connections (the lane is idle).
IDLE = "idle"


class WorkerPool:
    """Worker threads kept from pass to pass (so that each keeps its own
    SMTP connection open while the queue is busy).

    Each thread has its own queue of tasks, so that each takes part in
    every pass and gets every :meth:`idle` request.  A worker thread is
    the only one to use its connections, and the only one to close them
    (``close_connection()`` of the mailers it used): when the lane goes
    idle (:meth:`idle`) and when the pool ends (:meth:`close`).  So no
    other thread ever waits for a relay to answer QUIT, and a connection
    that another thread of the application opened through the same mailer
    is never touched.

    If a thread cannot be started, those already started are ended and
    :class:`WorkerStartError` is raised.
    """

    def __init__(self, count: int, work: Callable[[Pass], None],
                 name: str, label: str | None = None) -> None:
        self._work = work
        self._queues: list[queue.SimpleQueue[Pass | str | None]] = []
        self.threads: list[threading.Thread] = []
        suffix = "" if label is None else f"[{label}]"
        for i in range(count):
            tasks: queue.SimpleQueue[Pass | str | None] = queue.SimpleQueue()
            try:
                thread = threading.Thread(
                    target=self._loop, args=(tasks,),
                    name=f"{name}-worker-{i}{suffix}", daemon=True)
                thread.start()
            except Exception as exc:  # e.g. RuntimeError: can't start new thread
                log.error("could not start the worker thread %d of %d of %s%s: %s",
                          i + 1, count, name, suffix, exc)
                self.close()
                raise WorkerStartError(
                    f"could not start worker thread {i + 1} of {count} of"
                    f" {name}{suffix} ({exc}): lower the concurrency, or raise"
                    " the limit of threads or memory of the process") from exc
            self._queues.append(tasks)
            self.threads.append(thread)

    def _loop(self, tasks: queue.SimpleQueue[Pass | str | None]) -> None:
        used: list[Any] = []  # the mailers this thread may hold connections of
        while (task := tasks.get()) is not None:
            if isinstance(task, str):  # IDLE
                self._close_connections(used)
                continue
            if not any(task.mailer is mailer for mailer in used):
                used.append(task.mailer)
            try:
                self._work(task)
            except BaseException:
                log.exception("unexpected error in a queue worker thread")
            finally:
                task.worker_done()
        self._close_connections(used)

    @staticmethod
    def _close_connections(used: list[Any]) -> None:
        for mailer in used:
            close_connection(mailer)
        used.clear()

    def submit(self, job: Pass) -> None:
        """Every worker takes part in *job*."""
        for tasks in self._queues:
            tasks.put(job)

    def idle(self) -> None:
        """Every worker closes its connections once its tasks are done."""
        for tasks in self._queues:
            tasks.put(IDLE)

    def close(self, wait: bool = True) -> None:
        """End the threads after their tasks (each closes its connections
        first); with *wait*, return once they have ended."""
        for tasks in self._queues:
            tasks.put(None)
        if wait:
            self.join()

    def join(self) -> None:
        for thread in self.threads:
            thread.join()

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)


class Heartbeat:
    """Renews the claims of the passes in flight every *period* seconds.

    It has a thread of its own that does nothing else: it never waits on
    the network, on a relay or on another thread, so that the claim of a
    message being sent is renewed however long other work takes (listing a
    big queue, a relay that never answers QUIT) and no other processor
    takes the message over while it is sent.  The thread starts with the
    first pass registered (:meth:`add`), which raises if it cannot.
    """

    def __init__(self, period: float, name: str) -> None:
        self.period = period
        self.name = f"{name}-heartbeat"
        self._passes: set[Pass] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, job: Pass) -> None:
        """Renew the claims of *job* from now on."""
        with self._lock:
            if self.thread is None:
                thread = threading.Thread(target=self._loop, name=self.name,
                                          daemon=True)
                thread.start()
                self.thread = thread
            self._passes.add(job)

    def discard(self, job: Pass) -> None:
        with self._lock:
            self._passes.discard(job)

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            with self._lock:
                jobs = list(self._passes)
            for job in jobs:
                try:
                    job.renew_claims()
                except Exception:
                    log.exception("error while renewing the claims in %s",
                                  job.maildir.path)

    def close(self) -> None:
        """End the thread (a later :meth:`add` starts a new one)."""
        with self._lock:
            thread, self.thread = self.thread, None
            self._passes.clear()
        if thread is not None:
            self._stop.set()
            thread.join()
            self._stop.clear()
