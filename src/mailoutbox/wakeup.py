"""Waking a queue processor when a message is queued.

A processor thread (and so ``mailoutbox run --daemon``) passes over each
folder of its queue every *interval* seconds.  A message committed between
two passes would wait for the next one; this module starts a pass at once
instead, in two ways:

- in the same process, :class:`~mailoutbox.datamanager.QueuedDataManager`
  calls :func:`committed` after it has moved a transaction's messages into
  ``new/``: the processors running for that queue (by its real path) start
  a pass of the folders written to;
- across processes, on Linux, a :class:`FolderWatcher` thread per processor
  watches ``new/`` of the queue and of each of its relay folders with
  inotify (relay folders made later included), and wakes the processor when
  a message is renamed into one of them.  Files whose names begin with a dot
  (claims, retry states) are the processor's own and never wake it.

The in-process call skips the folders the processor's watcher already
watches (the rename woke it).  Wakes coalesce: a wake while a folder's pass
runs makes one more pass of it after that one, however many messages came
meanwhile (:class:`WakeRequests`, :mod:`mailoutbox.lanes`).  Where inotify
is missing (another system, a container without it, the limit of watches
reached), the processor polls every *interval* seconds as before; the
interval also stays the fallback for anything the watcher cannot see
(e.g. messages queued on another host of a network file system).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import struct
import sys
import threading
import weakref
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from typing import Any

from mailoutbox.relays import RELAYS
from mailoutbox.relays import decode_name
from mailoutbox.stores import is_url

__all__ = [
    "ALL",
    "FolderWatcher",
    "WakeRequests",
    "Wakeup",
    "committed",
    "inotify_init",
    "key_of",
]

log = logging.getLogger(__name__)

#: Names a wake request for every folder of the queue.
ALL = "*all*"

# <sys/inotify.h>
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name
#: What a folder holding folders is watched for: a folder made or moved in.
_PARENT_MASK = IN_CREATE | IN_MOVED_TO | IN_ONLYDIR | IN_DONT_FOLLOW
#: What ``new/`` is watched for: a message renamed into it (the only way
#: messages enter a queue; claims are hard links, which are not reported).
_NEW_MASK = IN_MOVED_TO | IN_ONLYDIR | IN_DONT_FOLLOW


# -- inotify through the C library ---------------------------------------------

_libc: Any = None


def _inotify_lib() -> Any:
    global _libc
    if _libc is None:
        if not sys.platform.startswith("linux"):  # pragma: no cover - Linux CI
            raise OSError(errno.ENOSYS, "inotify is only available on Linux")
        lib = ctypes.CDLL(None, use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_init1.restype = ctypes.c_int
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_uint32]
        lib.inotify_add_watch.restype = ctypes.c_int
        _libc = lib
    return _libc


def _check(result: int, what: str, path: str | None = None) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}", path)
    return result


def inotify_init() -> int:
    """A new non-blocking inotify file descriptor (closed on exec); raises
    :class:`OSError` where inotify is not available.  (A seam: tests
    replace it to simulate a system without inotify.)"""
    lib = _inotify_lib()
    return _check(lib.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")


def add_watch(fd: int, path: str, mask: int) -> int:
    """Watch *path* on the inotify descriptor *fd*; its watch descriptor."""
    return _check(_inotify_lib().inotify_add_watch(fd, os.fsencode(path), mask),
                  "inotify_add_watch", path)


# -- wake requests -------------------------------------------------------------

class _Woken:
    """The folders woken since the driver last looked (see
    :meth:`WakeRequests.take`)."""

    def __init__(self, names: frozenset[str | None]) -> None:
        self.names = names

    def __contains__(self, name: str | None) -> bool:
        return ALL in self.names or name in self.names

    def __bool__(self) -> bool:
        return bool(self.names)

    def unknown(self, known: Mapping[str | None, Any]) -> bool:
        """Whether a folder not in *known* was woken (a relay folder made
        since the last look), or every folder."""
        return any(name not in known for name in self.names)


class WakeRequests:
    """The folders of a queue woken and not yet looked at, by lane name
    (``None``: the queue itself; :data:`ALL`: every folder).  Safe to use
    from any thread."""

    def __init__(self) -> None:
        self._names: set[str | None] = set()
        self._lock = threading.Lock()

    def add(self, names: Iterable[str | None]) -> None:
        with self._lock:
            self._names.update(names)

    def take(self) -> _Woken:
        """The folders woken since the last call (and forget them)."""
        with self._lock:
            names, self._names = frozenset(self._names), set()
        return _Woken(names)


# -- the watcher ---------------------------------------------------------------

#: Every open watcher, to close in a child process made by ``fork()``.
_watchers: weakref.WeakSet[FolderWatcher] = weakref.WeakSet()


class FolderWatcher:
    """Watches ``new/`` of the queue at *path* and of its relay folders
    with inotify, and calls ``on_wake(names)`` from a thread of its own
    with the lane names (``None``: the queue itself; :data:`ALL`: every
    one) whose ``new/`` received a message, or whose relay folder appeared.

    :meth:`start` returns False, having logged why, when inotify cannot
    be used; :meth:`stop` returns promptly and closes the descriptors.
    """

    def __init__(self, path: str, on_wake: Callable[[set[str | None]], None],
                 name: str = "mailoutbox-wakeup") -> None:
        self.path = os.fspath(path)
        self.on_wake = on_wake
        self.name = name
        self.fd = -1  # the inotify descriptor, while open
        self.thread: threading.Thread | None = None
        self._pipe = (-1, -1)  # to wake the thread up to stop
        #: watch descriptor -> (kind, lane name, path)
        self._watches: dict[int, tuple[str, str | None, str]] = {}
        #: The lanes whose new/ is watched.
        self._new: set[str | None] = set()
        self._warned = False

    def covers(self, name: str | None) -> bool:
        """Whether ``new/`` of the lane *name* is watched by a live thread
        (safe from any thread)."""
        thread = self.thread
        return thread is not None and thread.is_alive() and name in self._new

    def start(self) -> bool:
        try:
            self.fd = inotify_init()
        except OSError as exc:
            # No inotify here is normal; a limit reached (EMFILE: the
            # user's inotify instances) is worth a warning.
            log.log(logging.INFO if exc.errno == errno.ENOSYS else logging.WARNING,
                    "not watching %s for new messages (%s): checking it every"
                    " interval", self.path, exc)
            return False
        self._pipe = os.pipe()
        _watchers.add(self)
        self._watch_folder(self.path, None, set())
        if None not in self._new:
            log.warning("cannot watch %s for new messages: checking it every"
                        " interval", os.path.join(self.path, "new"))
            self.close()
            return False
        thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.thread = thread
        thread.start()
        return True

    def stop(self) -> None:
        """End the thread and close the descriptors; returns promptly."""
        thread, self.thread = self.thread, None
        if thread is not None:
            os.write(self._pipe[1], b"x")
            thread.join()
        self.close()

    def close(self) -> None:
        _watchers.discard(self)
        for fd in (self.fd, *self._pipe):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd, self._pipe = -1, (-1, -1)
        self._watches.clear()
        self._new.clear()

    # -- watches ----------------------------------------------------------------

    def _add(self, path: str, kind: str, lane: str | None) -> bool:
        mask = _NEW_MASK if kind == "new" else _PARENT_MASK
        try:
            wd = add_watch(self.fd, path, mask)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR) and not self._warned:
                self._warned = True  # e.g. ENOSPC: the limit of watches
                log.warning("cannot watch %s for new messages (%s): checking"
                            " it every interval", path, exc.strerror)
            return False
        self._watches[wd] = (kind, lane, path)
        if kind == "new":
            self._new.add(lane)
        return True

    def _watch_folder(self, path: str, lane: str | None,
                      woken: set[str | None]) -> None:
        """Watch a Maildir folder (its ``new/``, and ``relays/`` in the
        queue itself), then what is in it already."""
        if not self._add(path, "folder", lane):
            return
        self._add(os.path.join(path, "new"), "new", lane)
        if lane is None:
            self._watch_relays(woken)
        else:
            self._woken_if_complete(path, lane, woken)

    def _woken_if_complete(self, path: str, lane: str | None,
                           woken: set[str | None]) -> None:
        """Wake a relay folder made after the start once its ``tmp/``,
        ``new/`` and ``cur/`` are there (``new/`` being watched): a message
        may have been moved in before the watch."""
        if lane in self._new and all(
                os.path.isdir(os.path.join(path, sub)) for sub in ("tmp", "cur")):
            woken.add(lane)

    def _watch_relays(self, woken: set[str | None]) -> None:
        base = os.path.join(self.path, RELAYS)
        if not self._add(base, "relays", None):
            return
        with contextlib.suppress(OSError), os.scandir(base) as entries:
            for entry in entries:
                self._relay_appeared(entry.name, woken)

    def _relay_appeared(self, folder: str, woken: set[str | None]) -> None:
        name = decode_name(folder)
        if name is not None:
            self._watch_folder(os.path.join(self.path, RELAYS, folder), name,
                               woken)

    # -- the thread -------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._pipe[0], select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _event in poller.poll()}
                if self._pipe[0] in ready:
                    return
                try:
                    data = os.read(self.fd, 65536)
                except BlockingIOError:  # pragma: no cover - read by no one else
                    continue
                woken = self.handle(data)
                if woken:
                    self.on_wake(woken)
        except Exception:
            log.exception("stopped watching %s for new messages: checking it"
                          " every interval", self.path)

    def handle(self, data: bytes) -> set[str | None]:
        """The lane names woken by the inotify events in *data*; watches
        the folders that appeared."""
        woken: set[str | None] = set()
        offset = 0
        while offset < len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            name = data[offset:offset + length].rstrip(b"\0")
            offset += length
            child = os.fsdecode(name)
            if mask & IN_Q_OVERFLOW:
                woken.add(ALL)
                continue
            watch = self._watches.get(wd)
            if watch is None:
                continue
            kind, lane, path = watch
            if mask & IN_IGNORED:  # the folder is gone
                del self._watches[wd]
                if kind == "new":
                    self._new.discard(lane)
            elif kind == "new":
                if not child.startswith("."):
                    woken.add(lane)
            elif kind == "relays":
                self._relay_appeared(child, woken)
            elif lane is None:  # the queue itself
                if child == "new":
                    self._add(os.path.join(path, "new"), "new", lane)
                    woken.add(lane)
                elif child == RELAYS:
                    self._watch_relays(woken)
            else:  # a relay folder being made, or repaired
                if child == "new":
                    self._add(os.path.join(path, "new"), "new", lane)
                self._woken_if_complete(path, lane, woken)
        return woken


# -- wiring a processor ----------------------------------------------------------

_registry: dict[str, list[Wakeup]] = {}
_registry_lock = threading.Lock()


class Wakeup:
    """What wakes one running processor: its entry for :func:`committed`,
    and its :class:`FolderWatcher`.  :meth:`start` when the processor's
    thread starts, :meth:`stop` when it ends."""

    #: Makes the watcher of a store: ``(store, on_wake, name)`` (a seam:
    #: None watches nothing).  By default, the store's own
    #: (:meth:`~mailoutbox.interfaces.IQueueStore.watcher`).
    watcher_factory: Callable[..., Any] | None = staticmethod(
        lambda store, on_wake, name: store.watcher(on_wake, name))

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.watcher: FolderWatcher | None = None
        self.key: str | None = None

    def start(self) -> None:
        store = self.processor.maildir
        self.key = store.key
        watcher = None
        if self.watcher_factory is not None:
            watcher = self.watcher_factory(store, self.processor.wake,
                                           f"{self.processor.name}-wakeup")
        if watcher is not None:
            try:
                if watcher.start():
                    self.watcher = watcher
                    log.info("watching %s for new messages", self.key)
            except Exception:  # e.g. out of file descriptors: poll
                log.error("cannot watch %s for new messages: checking it every"
                          " interval", self.key, exc_info=True)
                watcher.close()
        with _registry_lock:
            _registry.setdefault(self.key, []).append(self)

    def stop(self) -> None:
        with _registry_lock:
            handles = _registry.get(self.key or "", [])
            if self in handles:
                handles.remove(self)
                if not handles:
                    del _registry[self.key or ""]
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.stop()

    def committed(self, names: Iterable[str | None]) -> None:
        """Messages were queued in the folders *names*: wake those its
        watcher does not see."""
        watcher = self.watcher
        wanted = [name for name in names
                  if watcher is None or not watcher.covers(name)]
        if wanted:
            self.processor.wake(wanted)


def key_of(queue_path: str) -> str:
    """The key of the queue at *queue_path* (see
    :class:`~mailoutbox.interfaces.IQueueStore`): a folder's real path, or
    a URL's normal form, without its password."""
    if is_url(queue_path):
        from mailoutbox.postgresql._conn import parse_url
        return parse_url(queue_path).key
    return os.path.realpath(queue_path)


def committed(queue_path: str, names: Iterable[str | None]) -> None:
    """Messages were just queued in the folders *names* (lane names, None:
    the queue itself) of the queue at *queue_path*: wake the processors of
    this process that serve it.  Cheap when none runs; never raises."""
    if not _registry:
        return
    try:
        names = list(names)
        with _registry_lock:
            handles = list(_registry.get(key_of(queue_path), ()))
        for handle in handles:
            handle.committed(names)
    except Exception:
        log.error("could not wake the processor of %s", queue_path, exc_info=True)


def _after_fork_in_child() -> None:
    """In a child made by ``fork()``: no processor thread runs here, and the
    watchers' descriptors are the parent's business."""
    global _registry_lock
    _registry_lock = threading.Lock()
    _registry.clear()
    for watcher in list(_watchers):
        watcher.thread = None
        watcher.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
