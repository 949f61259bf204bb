"""A progress bar on a terminal, for a long pass over the queue."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from mailoutbox.cli.console import Console
from mailoutbox.cli.view import format_age

__all__ = ["Progress"]


class Progress:
    """``progress(done, total)`` draws a bar on the console's stderr: how
    many of the pass's messages are done, at what rate (messages per second
    since the pass started) and the time left at that rate.

    Nothing is drawn during the first *delay* seconds, so a short pass
    stays quiet, nor more often than every *every* seconds.  Safe to call
    from several threads.  :meth:`close` erases the bar.
    """

    width = 30

    def __init__(self, console: Console, delay: float = 0.5, every: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.delay = delay
        self.every = every
        self.clock = clock
        self.started = clock()
        self.drawn = 0.0
        self.shown = False
        self._lock = threading.Lock()
        self._length = 0

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        with self._lock:
            if now - self.started < self.delay:
                return
            if self.shown and now - self.drawn < self.every and done < total:
                return
            self.drawn = now
            self.shown = True
            line = self.render(done, total, now - self.started)
            self._write("\r" + line.ljust(self._length))
            self._length = len(line)

    def render(self, done: int, total: int, elapsed: float) -> str:
        """The bar for *done* of *total* messages after *elapsed* seconds:
        the rate so far, in messages per second, and the time left at that
        rate (left out while nothing is done yet)."""
        filled = self.width * min(done, total) // max(total, 1)
        rate = done / max(elapsed, 1e-9)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"sending [{bar}] {done}/{total}  {rate:.1f} msg/s"
        if done and total > done:
            line += f"  {format_age((total - done) / rate)} left"
        return line

    def close(self) -> None:
        with self._lock:
            if self.shown:
                self._write("\r" + " " * self._length + "\r")
                self.shown = False

    def _write(self, text: str) -> None:
        self.console.stderr.write(text)
        self.console.stderr.flush()
