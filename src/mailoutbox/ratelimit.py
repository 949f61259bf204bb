"""Rate limits of the relays: messages per second and connections.

Providers limit what one sender may send (Amazon SES starts at 14 messages
per second; Gmail and Microsoft 365 count per minute and per day), and a
processor that sends as fast as it can through eight connections is
throttled or blocked.  Each relay (a mailer) of a processor therefore may
have:

- a *rate*, in messages per second, kept by a :class:`RateLimiter` (a token
  bucket holding a burst of :data:`BURST` seconds' worth of messages, at
  least one): a worker takes a token before it claims a message, so that
  no claim is held while it waits;
- a *max_connections*, the most connections (worker threads) the processor
  opens to it at once, whatever its *concurrency*.

Both are read from the mailer (``rate`` and ``max_connections``
attributes, as :class:`~mailoutbox.mailer.SMTPMailer` has) or, for a mailer
that sets none, from the processor; ``None`` means no limit.

A relay that answers with a throttling reply
(:class:`~mailoutbox.errors.MailThrottledError`) is slowed down whether it
has a rate or not: its rate is halved (from the rate it was sent at, if it
had none), down to :data:`FLOOR`, and raised again by a fifth every
:data:`RECOVERY_PERIOD` seconds without throttling, up to where it was.
The message that got the reply is put back, once per pass, and tried again
later in the same pass; if the relay throttles it again, or throttles a
message sent at the floor rate, it is deferred as after any transient
failure.  See the documentation chapter "The queue on disk".
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = [
    "BURST",
    "FLOOR",
    "RECOVERY_PERIOD",
    "RateLimiter",
    "RateLimits",
    "check_max_connections",
    "check_rate",
    "relay_limits",
]

log = logging.getLogger(__name__)

#: The bucket holds this many seconds' worth of messages (at least one):
#: after an idle time, a relay gets that small burst at once.
BURST = 0.1
#: The lowest rate, in messages per second, that throttling brings a relay
#: down to (or its own rate, if lower).
FLOOR = 0.2
#: Seconds without a throttling reply after which a slowed-down relay's
#: rate is raised by :data:`RECOVERY_FACTOR`.
RECOVERY_PERIOD = 10.0
RECOVERY_FACTOR = 1.2
#: Over how many seconds the rate of a relay without a limit is measured
#: when it first throttles.
WINDOW = 1.0


def check_rate(value: Any, name: str = "rate") -> float | None:
    """*value*, a number of messages per second (finite, > 0), as a float;
    ``None`` (no limit) is returned as is.  Anything else raises
    :class:`ValueError` (:class:`TypeError` if not a number)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of messages per second or"
                        f" None, not {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of messages per"
                         f" second > 0 (or None: no limit), not {value!r}")
    return float(value)


def check_max_connections(value: Any,
                          name: str = "max_connections") -> int | None:
    """*value*, a whole number >= 1; ``None`` (no limit) is returned as is.
    Anything else raises :class:`ValueError` (:class:`TypeError` if not a
    number)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a whole number or None, not {value!r}")
    if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"{name} must be a whole number >= 1 (or None: no"
                         f" limit), not {value!r}")
    return value


def relay_limits(mailer: Any, rate: float | None,
                 max_connections: int | None) -> tuple[float | None, int | None]:
    """The rate and the most connections for *mailer*: its own (its
    ``rate`` and ``max_connections`` attributes), else *rate* and
    *max_connections* (the processor's).  A bad value of the mailer raises
    :class:`ValueError` or :class:`TypeError`."""
    own_rate = check_rate(getattr(mailer, "rate", None), f"{mailer!r} rate")
    own_max = check_max_connections(getattr(mailer, "max_connections", None),
                                    f"{mailer!r} max_connections")
    return (rate if own_rate is None else own_rate,
            max_connections if own_max is None else own_max)


class RateLimiter:
    """A token bucket for one relay, which slows down when throttled.

    *rate* is the most messages per second (``None``: no limit, until the
    relay throttles); *name* names the relay in log lines.  Thread-safe:
    the workers of a relay share one.
    """

    floor = FLOOR
    recovery_period = RECOVERY_PERIOD
    recovery_factor = RECOVERY_FACTOR

    def __init__(self, rate: float | None, name: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        #: The configured rate (None: no limit).
        self.ceiling = check_rate(rate)
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._local = threading.local()  # when this thread last got a token
        self._current = self.ceiling
        self._peak = self.ceiling  # the rate to recover up to
        self._tokens = self._capacity()
        self._updated = clock()
        self._changed = -math.inf  # when the rate was last lowered or raised
        self._lowered = -math.inf  # when it was last lowered
        self._recent: deque[float] = deque(maxlen=1000)  # times of tokens

    def __repr__(self) -> str:
        return f"<RateLimiter {self.name or '(default)'} rate={self.rate}>"

    @property
    def rate(self) -> float | None:
        """The messages per second allowed now (None: no limit)."""
        with self._lock:
            self._update(self._clock())
            return self._current

    @property
    def slowed_down(self) -> bool:
        """Whether throttling lowered the rate below the configured one."""
        with self._lock:
            self._update(self._clock())
            return self._current != self.ceiling

    def _capacity(self) -> float:
        if self._current is None:
            return 1.0
        return max(1.0, self._current * BURST)

    def _update(self, now: float) -> None:
        """Refill the bucket, and raise a lowered rate after a quiet time
        (the lock is held)."""
        current = self._current
        if current is not None:
            self._tokens = min(self._capacity(),
                               self._tokens + (now - self._updated) * current)
        self._updated = now
        if current == self.ceiling or now - self._changed < self.recovery_period:
            return
        # Lowered (so current and _peak are numbers), and quiet long enough.
        steps = min(100, int((now - self._changed) // self.recovery_period))
        self._changed += steps * self.recovery_period
        current *= self.recovery_factor ** steps  # type: ignore[operator]
        if current >= self._peak:  # type: ignore[operator]
            self._current = self.ceiling
            self._tokens = min(self._tokens, self._capacity())
            log.info("relay %s: no more throttling, back to %s", self._label,
                     _describe(self.ceiling))
        else:
            self._current = current

    @property
    def _label(self) -> str:
        return self.name or "(default)"

    def acquire(self, stopping: threading.Event) -> bool:
        """Wait for a token: True once there is one, False if *stopping* is
        set first (the waiting ends at once)."""
        while not stopping.is_set():
            with self._lock:
                now = self._clock()
                self._update(now)
                if self._current is None or self._tokens > 1 - 1e-9:
                    if self._current is not None:  # (rounding errors aside)
                        self._tokens = max(0.0, self._tokens - 1)
                    self._recent.append(now)
                    self._local.acquired = now
                    return True
                wait = (1 - self._tokens) / self._current
            stopping.wait(wait)
        return False

    def _measured(self, now: float) -> float:
        """The messages per second of the last :data:`WINDOW` seconds
        (over at least a tenth of a second)."""
        recent = [t for t in self._recent if t > now - WINDOW]
        if not recent:
            return 0.0
        return len(recent) / max(now - recent[0], WINDOW / 10)

    def throttled(self) -> bool:
        """The relay throttled the message this thread last got a token
        for: lower the rate.  True if the message is to be tried again at
        the lower rate; False if the rate was at its floor already (the
        relay goes on throttling: the message is to be deferred)."""
        with self._lock:
            now = self._clock()
            self._update(now)
            started = getattr(self._local, "acquired", None)
            if started is not None and started <= self._lowered:
                return True  # sent before the last slow-down
            floor = self.floor if self.ceiling is None else min(self.floor,
                                                                 self.ceiling)
            current = self._current
            if current is None:  # no limit yet: from the rate measured
                current = self._measured(now)
                self._peak = max(current, floor)
            elif current == self.ceiling:
                self._peak = current
            self._changed = now
            if current <= floor:
                return False
            self._current = max(floor, current / 2)
            self._tokens = 0.0
            self._lowered = now
            rate = self._current
        log.warning("relay %s throttles: slowing down to %s", self._label,
                    _describe(rate))
        return True


def _describe(rate: float | None) -> str:
    return "no limit" if rate is None else f"{rate:.3g} messages/s"


class RateLimits:
    """The rate limiters of one processor, one per mailer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # id(mailer) -> (mailer, limiter); the mailer is kept so that its
        # id is not reused.
        self._limiters: dict[int, tuple[Any, RateLimiter]] = {}

    def limiter(self, mailer: Any, rate: float | None,
                name: str | None = None) -> RateLimiter:
        """The limiter of *mailer*, at *rate* (a new one if the rate
        changed)."""
        with self._lock:
            found = self._limiters.get(id(mailer))
            if found is not None and found[1].ceiling == rate:
                return found[1]
            limiter = RateLimiter(rate, name or "")
            self._limiters[id(mailer)] = (mailer, limiter)
            return limiter
