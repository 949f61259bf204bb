"""The numbers of a queue processor, for monitoring (Prometheus and others).

Every :class:`~mailoutbox.queue.QueueProcessorThread` keeps a
:class:`Metrics` object as ``processor.metrics``: counters of the messages
sent, deferred and failed, histograms of the time a send took and of the
time a message waited in the queue, the messages waiting as of the last
listing, and the health of the processor.  Its values are plain Python
(:meth:`Metrics.snapshot`); :func:`register` exposes them to a
``prometheus_client`` registry (the optional ``mailoutbox[metrics]``
extra), and ``mailoutbox run --daemon --metrics HOST:PORT`` serves them over
HTTP.

The numbers are gathered where the processor does its work anyway: the
gauges come from the listing each pass makes of its folder, kept current
as the pass's messages are handled, so that reading them never lists the
queue again; only the number of failed messages is counted when the
numbers are read, from the failed area of each folder (a listing of one
directory).  The queue itself is the relay ``""`` (a relay's name is never
empty); each relay folder is the relay of its mailer's name.
"""
from __future__ import annotations

import bisect
import logging
import math
import re
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from mailoutbox.workers import DEFERRED
from mailoutbox.workers import FAILED
from mailoutbox.workers import SENT

__all__ = [
    "QUEUE_SECONDS_BUCKETS",
    "SEND_SECONDS_BUCKETS",
    "Histogram",
    "Metrics",
    "MetricsServer",
    "RelayMetrics",
    "collector",
    "parse_address",
    "queued_time",
    "register",
]

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the buckets of the send-time histogram.
SEND_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0, 30.0, 60.0)
#: Upper bounds (seconds) of the buckets of the time-in-queue histogram:
#: from a second to the default ``max_age`` of five days.
QUEUE_SECONDS_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
                         4 * 3600.0, 86400.0, 5 * 86400.0)

#: The states of the messages of a folder that the gauges count.
STATES = ("queued", "deferred", "sending", "failed")

# Our names (SECONDS.MMICROS...) and zope.sendmail's (SECONDS.…) start with
# the time the message was queued.
_NAME_TIME = re.compile(r"(\d{1,12})(?:\.M(\d{6}))?")


def queued_time(entry: Any) -> float | None:
    """When *entry* (a message of a listing) was queued, in seconds since
    the epoch: its ``queued_at`` if the store gives one, else the time its
    name starts with; None when neither says."""
    when = getattr(entry, "queued_at", None)
    if when is not None:
        return float(when)
    match = _NAME_TIME.match(entry.name)
    if match is None:
        return None
    seconds, micros = match.groups()
    return int(seconds) + (int(micros) / 1e6 if micros else 0.0)


@dataclass
class Histogram:
    """Observations counted in buckets of upper bounds *bounds* (seconds)."""

    bounds: tuple[float, ...]
    #: counts[i]: observations <= bounds[i] and > bounds[i - 1]; the last
    #: one counts those above every bound
    counts: list[int] = field(default_factory=list)
    count: int = 0
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)``, the last bound ``inf``."""
        total = 0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts,
                                strict=True):
            total += count
            buckets.append((bound, total))
        return buckets

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.count, self.sum)


@dataclass
class RelayMetrics:
    """The numbers of one folder of the queue: the queue itself (relay
    ``""``) or a relay folder."""

    #: Messages sent (to every recipient, or to some while the others were
    #: refused), attempts deferred, and messages moved to the failed area.
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    #: Messages the processor could not handle because of an unexpected
    #: error (logged with its traceback; the message stays queued).
    errors: int = 0
    #: Passes over the folder that ended, and passes that could not start
    #: (listing the folder failed, worker threads could not start).
    passes: int = 0
    pass_errors: int = 0
    #: When the last pass ended (seconds since the epoch), None before.
    last_pass: float | None = None
    #: The messages waiting, by state ("queued", "deferred", "sending"), as
    #: of the last listing and the outcomes since then; "failed" is counted
    #: when the numbers are read (:meth:`Metrics.snapshot`).
    messages: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(STATES[:3], 0))
    #: When the oldest message waiting at the last listing was queued.
    oldest: float | None = None
    #: When the folder was last listed.
    listed: float | None = None
    #: Seconds that one call of the mailer's ``send()`` took.
    send_seconds: Histogram = field(
        default_factory=lambda: Histogram(SEND_SECONDS_BUCKETS))
    #: Seconds from when a message was queued to when it was sent.
    queue_seconds: Histogram = field(
        default_factory=lambda: Histogram(QUEUE_SECONDS_BUCKETS))

    def copy(self) -> RelayMetrics:
        copy = RelayMetrics(**{**self.__dict__,
                               "messages": dict(self.messages),
                               "send_seconds": self.send_seconds.copy(),
                               "queue_seconds": self.queue_seconds.copy()})
        return copy


class Metrics:
    """The numbers of one processor; see the module's documentation.

    The processor calls the methods named for events (:meth:`listed`,
    :meth:`handled`, ...) from its threads; applications read
    :meth:`snapshot`, or :attr:`relays` and :meth:`relay` directly.
    """

    def __init__(self, processor: Any = None) -> None:
        self._processor = None if processor is None else weakref.ref(processor)
        self._lock = threading.Lock()
        #: The numbers of each folder, by relay name ("" for the queue).
        self.relays: dict[str, RelayMetrics] = {"": RelayMetrics()}
        self._stores: dict[str, Any] = {}

    def _after_fork_in_child(self) -> None:
        # Another thread of the parent may have held the lock.
        self._lock = threading.Lock()

    def relay(self, name: str | None) -> RelayMetrics:
        """The numbers of the folder of relay *name* (None or "": the queue
        itself), created empty on first use."""
        key = name or ""
        numbers = self.relays.get(key)
        if numbers is None:
            numbers = self.relays[key] = RelayMetrics()
        return numbers

    # -- events of the processor -----------------------------------------

    def listed(self, relay: str | None, store: Any, scan: Any,
               now: float | None = None) -> None:
        """A pass listed the folder *store* of *relay* (*scan*: its
        :class:`~mailoutbox.maildir.Scan`)."""
        now = time.time() if now is None else now
        counts = dict.fromkeys(STATES[:3], 0)
        claimed, retry_at = scan.claimed, scan.retry_at
        for entry in scan.entries:
            name = entry.name
            if name in claimed:
                counts["sending"] += 1
            elif retry_at.get(name, now) > now:
                counts["deferred"] += 1
            else:
                counts["queued"] += 1
        # The listing is in sending order: priority first, then oldest.
        oldest = min((t for t in map(queued_time, scan.entries) if t is not None),
                     default=None)
        with self._lock:
            numbers = self.relay(relay)
            numbers.messages = counts
            numbers.oldest = oldest
            numbers.listed = now
            self._stores[relay or ""] = store

    def handled(self, job: Any, entry: Any, outcome: str,
                now: float | None = None) -> None:
        """A worker of the pass *job* handled *entry*, with *outcome*."""
        if outcome not in (SENT, DEFERRED, FAILED):
            return
        now = time.time() if now is None else now
        queued = queued_time(entry) if outcome == SENT else None
        name, scan = entry.name, job.scan
        with self._lock:
            numbers = self.relay(job.relay)
            # Its state in the listing (its retry time may have come since).
            if name in scan.claimed:
                was = "sending"
            elif scan.retry_at.get(name, -math.inf) > (numbers.listed or 0.0):
                was = "deferred"
            else:
                was = "queued"
            setattr(numbers, outcome, getattr(numbers, outcome) + 1)
            numbers.messages[was] -= 1
            if outcome == DEFERRED:
                numbers.messages["deferred"] += 1
            elif not any(numbers.messages.values()):
                numbers.oldest = None  # nothing waits any more
            if queued is not None:
                numbers.queue_seconds.observe(max(0.0, now - queued))

    def sent_in(self, relay: str | None, seconds: float) -> None:
        """One call of the mailer's ``send()`` for *relay* took *seconds*
        (whether it succeeded or raised)."""
        with self._lock:
            self.relay(relay).send_seconds.observe(seconds)

    def error(self, relay: str | None) -> None:
        """A message of *relay* could not be handled (an unexpected error)."""
        with self._lock:
            self.relay(relay).errors += 1

    def pass_ended(self, relay: str | None, now: float | None = None) -> None:
        with self._lock:
            numbers = self.relay(relay)
            numbers.passes += 1
            numbers.last_pass = time.time() if now is None else now

    def pass_failed(self, relay: str | None) -> None:
        with self._lock:
            self.relay(relay).pass_errors += 1

    # -- reading ------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The numbers now, as plain values::

            {"up": bool, "worker_threads": int, "time": float,
             "relays": {name: RelayMetrics, ...}}

        ``up`` tells whether the processor's thread runs, ``worker_threads``
        how many worker threads it has now; each
        :class:`RelayMetrics` is a copy, with the failed messages of its
        folder counted now (``messages["failed"]``; left out if the failed
        area cannot be read).
        """
        with self._lock:
            relays = {name: numbers.copy() for name, numbers in self.relays.items()}
            stores = dict(self._stores)
        for name, numbers in relays.items():
            failed = _count_failed(stores.get(name))
            if failed is not None:
                numbers.messages["failed"] = failed
        processor = None if self._processor is None else self._processor()
        up, threads = False, 0
        if processor is not None:
            up = processor.is_alive()
            threads = len(processor._lanes.threads())
        return {"up": up, "worker_threads": threads, "time": time.time(),
                "relays": relays}


def _count_failed(store: Any) -> int | None:
    """The number of messages in the failed area of *store*."""
    if store is None:
        return None
    try:
        return len(store.failed_entries())
    except OSError as exc:
        log.warning("cannot count the failed messages of %s: %s", store, exc)
        return None


# -- prometheus_client ---------------------------------------------------------

#: (name, type, help) of the metric families, in the order they are shown.
_FAMILIES = (
    ("mailoutbox_up", "gauge",
     "1 while the queue processor's thread runs"),
    ("mailoutbox_worker_threads", "gauge",
     "Worker threads of the queue processor"),
    ("mailoutbox_messages", "gauge",
     "Messages in the queue by state (queued, deferred, sending: as of the"
     " last pass; failed: now)"),
    ("mailoutbox_oldest_message_age_seconds", "gauge",
     "Age of the oldest message waiting in the queue at the last pass"
     " (0 when none)"),
    ("mailoutbox_sent", "counter", "Messages sent"),
    ("mailoutbox_deferred", "counter", "Attempts deferred (transient failures)"),
    ("mailoutbox_failed", "counter", "Messages moved to the failed area"),
    ("mailoutbox_message_errors", "counter",
     "Messages the processor could not handle (unexpected errors)"),
    ("mailoutbox_passes", "counter", "Passes over the queue that ended"),
    ("mailoutbox_pass_errors", "counter",
     "Passes over the queue that could not start (listing, threads)"),
    ("mailoutbox_last_pass_timestamp_seconds", "gauge",
     "When the last pass over the queue ended"),
    ("mailoutbox_send_duration_seconds", "histogram",
     "Time of one send through the mailer"),
    ("mailoutbox_time_in_queue_seconds", "histogram",
     "Time from queueing a message to sending it"),
)


class _Collector:
    """A ``prometheus_client`` collector reading a :class:`Metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def _families(self) -> dict[str, Any]:
        from prometheus_client import core

        kinds = {"gauge": core.GaugeMetricFamily,
                 "counter": core.CounterMetricFamily,
                 "histogram": core.HistogramMetricFamily}
        families = {}
        for name, kind, text in _FAMILIES:
            labels = [] if name in ("mailoutbox_up", "mailoutbox_worker_threads") \
                else ["relay"]
            if name == "mailoutbox_messages":
                labels.append("state")
            families[name] = kinds[kind](name, text, labels=labels)
        return families

    def describe(self) -> Iterator[Any]:
        return iter(self._families().values())

    def collect(self) -> Iterator[Any]:
        data = self.metrics.snapshot()
        families = self._families()
        families["mailoutbox_up"].add_metric([], 1 if data["up"] else 0)
        families["mailoutbox_worker_threads"].add_metric([], data["worker_threads"])
        now = data["time"]
        for relay, numbers in sorted(data["relays"].items()):
            for state, count in numbers.messages.items():
                families["mailoutbox_messages"].add_metric([relay, state], count)
            age = 0.0 if numbers.oldest is None else max(0.0, now - numbers.oldest)
            families["mailoutbox_oldest_message_age_seconds"].add_metric(
                [relay], age)
            for key in ("sent", "deferred", "failed"):
                families[f"mailoutbox_{key}"].add_metric(
                    [relay], getattr(numbers, key))
            families["mailoutbox_message_errors"].add_metric([relay], numbers.errors)
            families["mailoutbox_passes"].add_metric([relay], numbers.passes)
            families["mailoutbox_pass_errors"].add_metric(
                [relay], numbers.pass_errors)
            if numbers.last_pass is not None:
                families["mailoutbox_last_pass_timestamp_seconds"].add_metric(
                    [relay], numbers.last_pass)
            for name, histogram in (
                ("mailoutbox_send_duration_seconds", numbers.send_seconds),
                ("mailoutbox_time_in_queue_seconds", numbers.queue_seconds),
            ):
                families[name].add_metric(
                    [relay], [(_bound(b), c) for b, c in histogram.cumulative()],
                    histogram.sum)
        return iter(families.values())


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


def collector(processor: Any) -> Any:
    """A ``prometheus_client`` collector of the numbers of *processor* (a
    :class:`~mailoutbox.queue.QueueProcessorThread`, or its
    :class:`Metrics`)."""
    metrics = processor if isinstance(processor, Metrics) else processor.metrics
    return _Collector(metrics)


def register(processor: Any, registry: Any = None) -> Any:
    """Expose the numbers of *processor* in the ``prometheus_client``
    *registry* (default: its global ``REGISTRY``) and return the collector
    (``registry.unregister(collector)`` takes them out again).

    One registry holds the numbers of one processor: registering a second
    raises :class:`ValueError` (the names are taken).  Raises
    :class:`ImportError` when ``prometheus_client`` is not installed
    (``pip install mailoutbox[metrics]``).
    """
    try:
        import prometheus_client
    except ImportError as exc:
        raise ImportError(
            "exposing the metrics needs prometheus_client: pip install"
            f" 'mailoutbox[metrics]' ({exc})") from exc
    if registry is None:
        registry = prometheus_client.REGISTRY
    found = collector(processor)
    registry.register(found)
    return found


def parse_address(text: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[V6ADDRESS]:PORT`` for an IPv6
    address); :class:`ValueError` saying what is wrong otherwise."""
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host:
        raise ValueError(
            f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9101; 0.0.0.0:9101 for"
            " every interface)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{port!r} in {text!r} is not a port number (1-65535)")
    return host, int(port)


class MetricsServer:
    """Serves the numbers of *processor* over HTTP at
    ``http://HOST:PORT/metrics`` in Prometheus' text format, from a thread
    of its own, with those of the process (memory, CPU, file descriptors).

    :meth:`start` raises :class:`ImportError` without ``prometheus_client``
    and :class:`OSError` when it cannot listen at the address (a name that
    does not resolve, a port in use).
    """

    def __init__(self, processor: Any, host: str, port: int) -> None:
        self.processor = processor
        self.host = host
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            import prometheus_client
        except ImportError as exc:
            raise ImportError(
                "serving metrics needs prometheus_client: pip install"
                f" 'mailoutbox[metrics]' ({exc})") from exc
        registry = prometheus_client.CollectorRegistry()
        register(self.processor, registry)
        prometheus_client.ProcessCollector(registry=registry)
        prometheus_client.PlatformCollector(registry=registry)
        prometheus_client.GCCollector(registry=registry)
        self._server, self._thread = prometheus_client.start_http_server(
            self.port, self.host, registry=registry)
        log.info("serving metrics at http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        """Stop serving (at once: a scrape in progress is cut)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
