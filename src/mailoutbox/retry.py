"""When to try a deferred message again, and when to give up.

A message that fails with a transient error stays queued with a retry state
(see :meth:`mailoutbox.maildir.Claim.defer`).  The :class:`RetryPolicy`
decides how long it waits before the next attempt and how long, counted from
its first failed attempt, the processor keeps trying before it moves the
message to the failed area.  :func:`record_failure` computes the new retry
state after a failed attempt; the state is plain JSON on disk, so it
survives a restart of the processor.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RetryPolicy", "record_failure"]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with a cap, and an age limit.

    After the first failed attempt a message waits *initial* seconds; each
    further failure multiplies the wait by *factor*, up to *cap* seconds.
    Once *max_age* seconds have passed since the first failed attempt, the
    next transient failure is final.

    >>> from mailoutbox.retry import RetryPolicy
    >>> policy = RetryPolicy(initial=60, factor=2, cap=600)
    >>> [policy.delay(n) for n in range(1, 7)]
    [60.0, 120.0, 240.0, 480.0, 600.0, 600.0]
    >>> policy.expired(first_attempt=0.0, now=5 * 24 * 3600.0)
    True
    """

    initial: float = 60.0
    factor: float = 2.0
    cap: float = 3600.0
    max_age: float = 5 * 24 * 3600.0

    def __post_init__(self) -> None:
        for name in ("initial", "cap", "max_age"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        if not (isinstance(self.factor, (int, float)) and 1 <= self.factor < math.inf):
            raise ValueError(
                f"factor must be a finite number >= 1, not {self.factor!r}")

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the *attempts*-th failed attempt (1 for the
        first failure; smaller numbers count as 1)."""
        exponent = max(attempts, 1) - 1
        try:
            value = self.initial * self.factor**exponent
        except OverflowError:
            return float(self.cap)
        return float(min(value, self.cap))

    def expired(self, first_attempt: float, now: float) -> bool:
        """Whether a message that first failed at *first_attempt* has been
        retried long enough at *now* (both in seconds since the epoch)."""
        return now - first_attempt >= self.max_age


def _number(value: Any, default: float) -> float:
    if (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)):
        return float(value)
    return default


def record_failure(
    policy: RetryPolicy,
    previous: Mapping[str, Any] | None,
    now: float,
    *,
    code: int | None,
    error: str,
) -> dict[str, Any]:
    """The retry state after a failed attempt at *now*.

    *previous* is the state recorded by the last failure (``None`` or an
    empty or damaged mapping for the first one).  The result has
    ``attempts`` (failed attempts so far), ``first_attempt``,
    ``last_attempt``, ``next_attempt``, ``code``, ``error`` and
    ``expired`` (true when the policy gives up: the message is to be moved
    to the failed area instead of deferred).
    """
    previous = previous or {}
    attempts = max(int(_number(previous.get("attempts"), 0)), 0) + 1
    first_attempt = min(_number(previous.get("first_attempt"), now), now)
    return {
        "attempts": attempts,
        "first_attempt": first_attempt,
        "last_attempt": now,
        "next_attempt": now + policy.delay(attempts),
        "code": code,
        "error": error,
        "expired": policy.expired(first_attempt, now),
    }
