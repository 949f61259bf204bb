"""The queue processor threads of a process: at most one per queue folder.

The ``mail:queuedDelivery`` directive (:mod:`mailoutbox.zcml`) and the
Pyramid configuration (:mod:`mailoutbox.pyramid`) start a
:class:`~mailoutbox.queue.QueueProcessorThread` here for their queue,
unless one already serves the folder (by its real path).  The threads are
stopped at interpreter exit; :func:`stop_processor_threads` stops them
earlier (tests, application shutdown).  These functions are documented,
and usually imported, as ``mailoutbox.zcml.start_processor_thread`` etc.

A child process made by ``fork()`` (``gunicorn --preload``,
``multiprocessing``) starts with no processor thread: the registry forgets
the parent's threads (which go on serving their queues in the parent), so
the child neither sends the queue's messages nor waits for them at exit.
A child that should serve a queue of its own calls
:func:`start_processor_thread` itself (e.g. in gunicorn's ``post_fork``
hook).
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

from mailoutbox.maildir import DEFAULT_LEASE
from mailoutbox.queue import DEFAULT_CONCURRENCY
from mailoutbox.queue import QueueProcessorThread
from mailoutbox.retry import RetryPolicy
from mailoutbox.wakeup import key_of

__all__ = [
    "processor_threads",
    "start_processor_thread",
    "stop_processor_threads",
]

# The logger keeps the name of the module these functions were written in:
# applications configure "mailoutbox.zcml".
log = logging.getLogger("mailoutbox.zcml")

#: The class of the processor threads (a seam for tests).
processor_factory: Callable[..., Any] = QueueProcessorThread

_threads: dict[str, Any] = {}
_threads_lock = threading.Lock()
_atexit_registered = False


def processor_threads() -> dict[str, Any]:
    """The running processor threads, by the real path of their queue."""
    with _threads_lock:
        return dict(_threads)


def start_processor_thread(
    queue_path: str,
    mailer: Any,
    *,
    interval: float = 3.0,
    concurrency: int = DEFAULT_CONCURRENCY,
    retry: RetryPolicy | None = None,
    lease: float = DEFAULT_LEASE,
    mailers: Mapping[str, Any] | None = None,
) -> Any:
    """Start a processor thread for *queue_path* unless one runs already.

    *mailers* maps the names of relay folders to their mailers.  Returns the
    thread serving the queue.  A second call for the same folder (by its
    real path) returns the first thread and ignores its arguments, except
    that the mailers of relay folders it does not know yet are added.
    """
    global _atexit_registered
    key = key_of(queue_path)  # a folder's real path, or the URL
    with _threads_lock:
        thread = _threads.get(key)
        if thread is not None and thread.is_alive():
            if thread.mailer is not mailer:
                log.warning(
                    "a processor thread already serves %s; the mailer given"
                    " for it again is not used", thread.queuePath,
                )
            if mailers:
                thread.setMailers({**mailers, **thread.mailers})
            return thread
        thread = processor_factory(
            interval, concurrency=concurrency, retry=retry, lease=lease
        )
        thread.setMailer(mailer)
        if mailers:
            thread.setMailers(mailers)
        thread.setQueuePath(queue_path)
        thread.start()
        _threads[key] = thread
        if not _atexit_registered:
            atexit.register(stop_processor_threads)
            _atexit_registered = True
    log.info("started the processor thread for %s", thread.queuePath)
    return thread


def stop_processor_threads(timeout: float | None = None) -> None:
    """Stop every processor thread started here, and forget them.

    Each thread finishes the messages in flight; with *timeout*, each gets
    that many seconds.  Those that did not stop in time stay registered (a
    later call waits for them again), and the first :class:`TimeoutError`
    is raised once all were asked to stop.
    """
    with _threads_lock:
        threads = list(_threads.items())
        _threads.clear()
    errors: list[TimeoutError] = []
    for key, thread in threads:
        try:
            thread.stop(timeout)
        except TimeoutError as exc:
            log.error("the processor thread for %s did not stop in time", key)
            errors.append(exc)
            with _threads_lock:
                _threads.setdefault(key, thread)
        else:
            log.info("stopped the processor thread for %s", key)
    if errors:
        raise errors[0]


def _forget_after_fork() -> None:
    """In a child process made by ``fork()``: no thread is running here."""
    global _threads_lock
    _threads_lock = threading.Lock()  # another thread may have held it
    _threads.clear()


os.register_at_fork(after_in_child=_forget_after_fork)
