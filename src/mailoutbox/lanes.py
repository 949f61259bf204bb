"""The lanes of a queue processor: the queue itself, and each relay folder.

A *lane* is one Maildir folder whose messages go through one mailer: the
queue itself (the processor's default mailer) or one of its relay folders
(:mod:`mailoutbox.relays`; the mailer of that name).  Each lane has its
own worker threads (*concurrency* of them, or the relay's *max_connections*
if fewer: see :mod:`mailoutbox.ratelimit`; each with its own connection to
the lane's relay) and its own passes (:class:`~mailoutbox.workers.Pass`),
so that a slow or unreachable relay never holds up the messages of the
others:

- :meth:`Lanes.run_once` (``process_queue()``) makes one pass over every
  lane, the lanes in parallel, and returns when all are done;
- :meth:`Lanes.run_forever` (the processor's thread) starts a new pass of a
  lane *interval* seconds after its last one ended, whatever the other
  lanes are doing.

At most ``max_relays`` relay folders are served at once (besides the queue
itself), which bounds the processor's threads to ``concurrency * (1 +
max_relays)``; the other relay folders wait their turn, the one served
longest ago first.  The worker threads of a relay folder end when a pass of
it finds it empty, or when another relay folder needs threads and
``max_relays`` folders have them already.

The thread that drives the lanes never waits on the network: each worker
thread closes its own connections (when its lane goes idle, and when its
pool ends), and a relay folder's pool is ended without waiting for its
threads (they are joined when the processor stops).  The claims of the
messages in flight are renewed by a thread of their own
(:class:`~mailoutbox.workers.Heartbeat`).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailoutbox.ratelimit import relay_limits
from mailoutbox.schedule import keep_scheduled
from mailoutbox.wakeup import WakeRequests
from mailoutbox.workers import Heartbeat
from mailoutbox.workers import Pass
from mailoutbox.workers import ProgressCallback
from mailoutbox.workers import Stats
from mailoutbox.workers import WorkerPool

__all__ = ["Lane", "Lanes"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Lane:
    """One folder of the queue, its worker threads and its current pass."""

    name: str | None  # the relay's mailer name; None for the queue itself
    maildir: Any  # its IQueueStore
    pool: WorkerPool | None = None
    job: Pass | None = None
    connections_open: bool = False  # the pool's workers may have some
    due: float = 0.0  # when the next pass may start (time.monotonic())
    started: float = -math.inf  # when the last pass started
    again: bool = False  # woken during its pass: one more pass after it

    @property
    def busy(self) -> bool:
        return self.job is not None


class _Progress:
    """Adds up the progress of the passes of several lanes."""

    def __init__(self, callback: ProgressCallback) -> None:
        self.callback = callback
        self.total = 0
        self.done = 0
        self.lock = threading.Lock()

    def __call__(self, _done: int, _total: int) -> None:
        with self.lock:  # one call at a time, as a single pass makes them
            self.done += 1
            self.callback(self.done, self.total)


class Lanes:
    """The lanes of one processor (see the module's documentation).

    It uses the processor's settings (``concurrency``, ``interval``,
    ``lease``, ``max_messages_per_pass``, ``max_relays``), its queue, its
    ``mailer_for()``, its worker function and its stop event.
    """

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.lanes: dict[str | None, Lane] = {}
        #: Set when a pass ends (and by stop()): the driver looks again.
        self.wakeup = threading.Event()
        #: The lanes woken (:mod:`mailoutbox.wakeup`) and not yet started.
        self.requests = WakeRequests()
        self._unusable: set[str] = set()
        #: Renews the claims of the passes in flight.
        self.heartbeat = Heartbeat(processor.lease / 3, processor.name)
        #: Pools being ended (their threads are closing their connections).
        self._ending: list[WorkerPool] = []

    # -- which lanes there are ------------------------------------------------

    def refresh(self) -> None:
        """Add a lane for each new relay folder; forget the idle lanes of
        relay folders that are gone."""
        processor = self.processor
        main = self.lanes.get(None)
        if main is None:
            self.lanes[None] = Lane(None, processor.maildir)
        elif main.maildir is not processor.maildir and not main.busy:
            main.maildir = processor.maildir  # setMaildir() was called
        self._ending = [pool for pool in self._ending if pool.alive()]
        found = set()
        for name in processor.maildir.relays():
            found.add(name)
            if name in self.lanes:
                continue
            try:
                maildir = processor.maildir.relay(name)
            except ValueError as exc:
                if name not in self._unusable:
                    processor.log.warning("ignoring the relay %r of %s: %s",
                                          name, processor.maildir.path, exc)
                    self._unusable.add(name)
                continue
            self.lanes[name] = Lane(name, maildir)
        for name, lane in list(self.lanes.items()):
            if name is not None and name not in found and not lane.busy:
                self._retire(lane)
                del self.lanes[name]

    def _order(self) -> list[Lane]:
        """The queue first, then the relay folders served longest ago."""
        relays = [lane for lane in self.lanes.values() if lane.name is not None]
        relays.sort(key=lambda lane: (lane.started, lane.name))
        main = self.lanes.get(None)
        return ([main] if main is not None else []) + relays

    def _slot_free(self, lane: Lane) -> bool:
        if lane.name is None:
            return True
        busy = sum(1 for other in self.lanes.values()
                   if other.name is not None and other.busy)
        return busy < self.processor.max_relays

    # -- one pass of one lane -------------------------------------------------

    def start(self, lane: Lane, clock: Callable[[], float],
              on_progress: _Progress | None, flush: bool = False) -> None:
        """List the lane's folder, tidy it up and hand its messages to its
        workers (with *flush*, the deferred ones too, due or not, but for
        those scheduled for later).  Errors
        of the listing, and :class:`~mailoutbox.workers.WorkerStartError`,
        are raised (the lane is then idle)."""
        processor = self.processor
        maildir = lane.maildir
        maildir.recover()  # transactions that a crash cut short
        scan = maildir.scan()
        processor.metrics.listed(lane.name, maildir, scan, clock())
        try:
            if maildir.cleanup(scan, processor.lease):
                processor.log.info("tidied up after crashes in %s", maildir.path)
        except Exception:
            processor.log.exception("error while tidying up %s", maildir.path)
        mailer = processor.mailer if lane.name is None else \
            processor.mailer_for(lane.name)
        if flush:  # every deferred message is due, but for scheduled ones
            scan = keep_scheduled(maildir, scan, clock())
        rate, connections = relay_limits(mailer, processor.rate,
                                         processor.max_connections)
        workers = min(processor.concurrency, connections or processor.concurrency)
        job = Pass(maildir, scan, clock, processor._stopping,
                   processor.max_messages_per_pass, on_progress,
                   workers, mailer=mailer, relay=lane.name,
                   on_finished=self.wakeup.set,
                   adaptive=processor.adaptive,
                   limiter=processor.rate_limits.limiter(mailer, rate, lane.name))
        lane.started = time.monotonic()
        if not job.total:
            job.finished.set()
            lane.job = job
            return
        if lane.pool is not None and len(lane.pool.threads) != workers:
            self._retire(lane)  # the relay's limits changed
        if lane.pool is None:
            if lane.name is not None:
                self._make_room()
            lane.pool = WorkerPool(workers, processor._work,
                                   processor.name, lane.name)
        self.heartbeat.period = processor.lease / 3
        self.heartbeat.add(job)
        lane.job = job
        if on_progress is not None:
            with on_progress.lock:
                on_progress.total += job.total
        lane.pool.submit(job)

    def collect(self, lane: Lane) -> Stats | None:
        """The stats of the lane's pass if it ended (the lane is then
        idle), else None."""
        job = lane.job
        if job is None or not job.finished.is_set():
            return None
        lane.job = None
        self.heartbeat.discard(job)
        self.processor.metrics.pass_ended(lane.name)
        summary = job.deferrals.summary(lane.name)
        if summary is not None:
            self.processor.log.warning(summary[0], *summary[1])
        stats = job.stats
        if stats.attempted:
            lane.connections_open = True
        elif lane.connections_open and lane.pool is not None:  # idle:
            lane.connections_open = False  # do not keep connections open
            lane.pool.idle()  # each worker closes its own
        if not job.total and lane.name is not None:
            self._retire(lane)  # an empty relay folder needs no threads
        return stats

    def _make_room(self) -> None:
        """Before a relay folder gets worker threads: end those of the idle
        relay folders served longest ago, so that at most ``max_relays``
        relay folders have threads."""
        pooled = [lane for lane in self.lanes.values()
                  if lane.name is not None and lane.pool is not None]
        idle = sorted((lane for lane in pooled if not lane.busy),
                      key=lambda lane: lane.started)
        for lane in idle[:max(0, len(pooled) + 1 - self.processor.max_relays)]:
            self._retire(lane)

    def _retire(self, lane: Lane) -> None:
        """End the worker threads of an idle lane, without waiting for
        them (each closes its connections first)."""
        lane.connections_open = False
        if lane.pool is not None:
            lane.pool.close(wait=False)
            self._ending.append(lane.pool)
            lane.pool = None

    def in_flight(self) -> list[Pass]:
        return [lane.job for lane in self.lanes.values() if lane.job is not None]

    def wake(self, names: Any) -> None:
        """Start a pass of the lanes *names* as soon as possible (one more
        after the current one, if busy); see :mod:`mailoutbox.wakeup`."""
        self.requests.add(names)
        self.wakeup.set()

    def wait(self, timeout: float) -> None:
        """Wait until a pass ends or *timeout* seconds have passed."""
        self.wakeup.wait(max(0.0, timeout))
        self.wakeup.clear()

    def threads(self) -> list[threading.Thread]:
        """The worker threads; safe to call from any thread."""
        pools = [lane.pool for lane in list(self.lanes.values())]  # one copy
        pools += list(self._ending)
        return [t for pool in pools if pool is not None for t in pool.threads]

    # -- driving the lanes ----------------------------------------------------

    def run_once(self, clock: Callable[[], float],
                 on_progress: ProgressCallback | None,
                 flush: bool = False) -> Stats:
        """One pass over every lane; return the sum of their stats.  With
        *flush*, deferred messages are due whatever their retry time.

        An error listing the queue itself is raised; an error listing a
        relay folder is logged.
        """
        processor = self.processor
        total = Stats()
        if processor._stopping.is_set():
            return total
        self.refresh()
        progress = None if on_progress is None else _Progress(on_progress)
        pending = deque(self._order())
        main = pending.popleft()
        try:
            self.start(main, clock, progress, flush)  # the queue itself, first
        except Exception:
            processor.metrics.pass_failed(None)
            raise
        running = [main]
        try:
            while True:
                self.wakeup.clear()
                for lane in list(running):
                    stats = self.collect(lane)
                    if stats is not None:
                        running.remove(lane)
                        total.add(stats, lane.name)
                while (pending and not processor._stopping.is_set()
                       and self._slot_free(pending[0])):
                    lane = pending.popleft()
                    try:
                        self.start(lane, clock, progress, flush)
                    except Exception:
                        processor.metrics.pass_failed(lane.name)
                        processor.log.exception(
                            "error while processing the queue %s",
                            lane.maildir.path)
                        continue
                    running.append(lane)
                if not running and (not pending or processor._stopping.is_set()):
                    return total
                if all(lane.job is not None and lane.job.finished.is_set()
                       for lane in running):
                    continue  # every pass ended: collect them at once
                self.wait(processor.lease / 3)
        except BaseException:  # e.g. KeyboardInterrupt in the main thread
            processor._stopping.set()  # start no other message,
            self.finish()  # finish those in flight
            raise

    def run_forever(self) -> None:
        """Run every lane, each *interval* seconds after its last pass
        ended (at once if that pass was cut by ``max_messages_per_pass``, or
        if the lane was woken meanwhile), and at once when woken, until the
        processor is stopped; errors are logged."""
        processor = self.processor
        stopping = processor._stopping
        next_refresh = -math.inf
        while not stopping.is_set():
            self.wakeup.clear()
            now = time.monotonic()
            woken = self.requests.take()
            if now >= next_refresh or woken.unknown(self.lanes):
                next_refresh = now + processor.interval
                try:
                    self.refresh()
                except Exception:
                    processor.metrics.pass_failed(None)
                    processor.log.exception("error while processing the queue %s",
                                            processor.queuePath)
            for lane in self._order():
                stats = self.collect(lane)
                if stats is not None:
                    lane.due = now + (0.0 if stats.limited or lane.again
                                      else processor.interval)
                    lane.again = False
                if lane.name in woken:
                    lane.again = lane.busy
                    lane.due = min(lane.due, now)
                if (lane.busy or lane.due > now or stopping.is_set()
                        or not self._slot_free(lane)):
                    continue
                try:
                    self.start(lane, time.time, None)
                except Exception:
                    processor.metrics.pass_failed(lane.name)
                    processor.log.exception("error while processing the queue %s",
                                            lane.maildir.path)
                    lane.due = now + processor.interval
                    continue
                stats = self.collect(lane)
                if stats is not None:  # nothing to send
                    lane.due = now + processor.interval
            waits = [next_refresh - now]
            waits += [lane.due - now for lane in self.lanes.values()
                      if not lane.busy and self._slot_free(lane)]
            self.wait(min(waits))  # a lane waiting for a slot: until a pass ends

    def finish(self) -> None:
        """Wait for the passes in flight to end (the heartbeat renews their
        claims meanwhile)."""
        lease = self.processor.lease
        while not all(job.finished.is_set() for job in self.in_flight()):
            self.wait(lease / 3)
        for lane in list(self.lanes.values()):
            self.collect(lane)

    def close(self) -> None:
        """End every worker thread (after the passes in flight), each
        closing its connections, all at once; return when they have ended.
        """
        self.finish()
        for lane in self.lanes.values():
            self._retire(lane)
        self.lanes.clear()
        ending, self._ending = self._ending, []
        for pool in ending:
            pool.join()
        self.heartbeat.close()
