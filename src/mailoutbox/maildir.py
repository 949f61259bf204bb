"""The queue on disk: a Maildir folder and the states of its messages.

This module is the only code that moves message files (the writer of new
ones, :class:`MaildirMessageWriter`, is in the private ``_writer`` module,
the system calls in ``_files``).  The protocol is described in the
documentation chapter "The queue on disk"; in short::

    tmp/NAME              being written by a transaction (not yet queued)
    new/NAME, cur/NAME    queued
      + .sending-NAME     claimed by a processor (hard link to NAME; its
                          mtime is the claim's lease, renewed while sending)
      + .retry-NAME       deferred: retry state (JSON); its mtime is the
                          time of the next attempt (written before NAME
                          enters new/ for a message sent with not_before)
      .rejected-NAME      rejected by zope.sendmail (adopted into failed/)
    failed/NAME           failed permanently
      + .reason-NAME      why (JSON)
    failed/NAME.refused-HEX   the part of NAME for recipients refused
      + .reason-...       permanently while others accepted it

Queue files begin with the two envelope lines zope.sendmail writes
(``X-Zope-From:`` and ``X-Zope-To:``), so zope.sendmail and mailoutbox can
drain each other's queues; the claim file is zope.sendmail's too, so the two
never send the same message at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from zope.interface import implementer
from zope.interface import provider

from mailoutbox._commit import roll_forward
from mailoutbox._files import DIR_MODE
from mailoutbox._files import FILE_MODE
from mailoutbox._files import O_NOFOLLOW
from mailoutbox._files import O_NONBLOCK
from mailoutbox._files import fsync_dir
from mailoutbox._files import is_folder
from mailoutbox._files import read_json
from mailoutbox._files import unlink
from mailoutbox._files import write_atomically
from mailoutbox._files import write_json_atomically
from mailoutbox._writer import MaildirMessageWriter
from mailoutbox.interfaces import IMaildir
from mailoutbox.interfaces import IMaildirFactory
from mailoutbox.interfaces import IQueueStore
from mailoutbox.schedule import name_mark
from mailoutbox.schedule import priority_of
from mailoutbox.schedule import sort_key

__all__ = [
    "CLAIM_PREFIX",
    "DEFAULT_LEASE",
    "FAILED",
    "QUEUE_FOLDERS",
    "Claim",
    "Entry",
    "Maildir",
    "MaildirMessageWriter",
    "Scan",
]

QUEUE_FOLDERS = ("new", "cur")
FAILED = "failed"
CLAIM_PREFIX = ".sending-"
RETRY_PREFIX = ".retry-"
REASON_PREFIX = ".reason-"
REJECTED_PREFIX = ".rejected-"
#: Ends the name of the part of a message split off into the failed area
#: for the recipients the server refused permanently (followed by 8 hex
#: digits, so that parts split off in several attempts do not collide).
REFUSED_SUFFIX = ".refused-"
#: Seconds after which a claim that was not renewed is taken to belong to
#: a dead processor and may be broken.
DEFAULT_LEASE = 30.0
#: Seconds after which a file left in ``tmp/`` by a crashed writer is removed
#: (the Maildir specification's 36 hours).
TMP_MAX_AGE = 36 * 3600.0


class _Names:
    """Unique, time-ordered file names (``SECONDS.MusecPpidQnRrand.host``)."""

    def __init__(self) -> None:
        self.counter = 0
        self.host = (
            socket.gethostname().replace("/", r"\057").replace(":", r"\072")
        )

    def __call__(self, priority: int = 0) -> str:
        self.counter += 1
        now = time.time()
        seconds = int(now)
        micro = int((now - seconds) * 1e6)
        return (
            f"{seconds}.M{micro:06d}P{os.getpid()}Q{self.counter}"
            f"R{secrets.token_hex(4)}{name_mark(priority)}.{self.host}"
        )


_new_name = _Names()


@dataclass(frozen=True, slots=True)
class Entry:
    """A message file in one of the queue's folders."""

    folder: str  # absolute path of new/, cur/ or failed/
    name: str
    regular: bool = True  # False for directories, symlinks, devices...

    @property
    def path(self) -> str:
        return os.path.join(self.folder, self.name)

    def sidecar(self, prefix: str) -> str:
        return os.path.join(self.folder, prefix + self.name)


@dataclass
class Scan:
    """What one listing of the queue folders found, oldest message first."""

    entries: list[Entry] = field(default_factory=list)
    #: name -> time of the next attempt, for deferred messages
    retry_at: dict[str, float] = field(default_factory=dict)
    #: names with a claim file
    claimed: set[str] = field(default_factory=set)
    #: dot-files the processor may need to tidy up: (folder, name)
    dotfiles: list[tuple[str, str]] = field(default_factory=list)


@provider(IMaildirFactory)
@implementer(IMaildir, IQueueStore)
class Maildir:
    """See :class:`mailoutbox.interfaces.IMaildir` and
    :class:`mailoutbox.interfaces.IQueueStore`."""

    #: Whether this call created the queue (its folder, or the ``tmp/``,
    #: ``new/`` and ``cur/`` folders in an empty directory); False when it
    #: opened an existing queue.
    created: bool = False

    def __init__(self, path: str, create: bool = False) -> None:
        """Open the queue at *path*.

        With *create*, a missing *path* is created, and so are the
        ``tmp/``, ``new/`` and ``cur/`` folders in an existing empty
        directory (e.g. one that systemd's ``StateDirectory=`` made), all
        with mode 0700; :attr:`created` tells whether that happened.
        Anything else that is not a queue -- a regular file, a directory
        that holds other things -- raises :class:`ValueError` and nothing
        is created in it.
        """
        self.path = os.fspath(path)
        self.tmp = os.path.join(self.path, "tmp")
        self.new = os.path.join(self.path, "new")
        self.cur = os.path.join(self.path, "cur")
        self.failed = os.path.join(self.path, FAILED)
        folders = (self.tmp, self.new, self.cur)
        if all(os.path.isdir(d) for d in folders):
            return
        problem = "it is not a mail queue"
        if create:
            problem = self._why_not_create()
            if not problem:
                for folder in (self.path, *folders):
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(folder, DIR_MODE)
                self.created = True
                return
        raise ValueError(f"{self.path} is not a Maildir folder: {problem}")

    def _why_not_create(self) -> str:
        """Why *create* may not make a queue at :attr:`path` ("" if it may:
        the path is missing, or an empty directory, or one that holds only
        folders of a queue -- ``tmp/``, ``new/``, ``cur/``, ``failed/``,
        ``relays/`` -- from a creation that was interrupted or is racing
        this one)."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return ""
        except NotADirectoryError:
            if not os.path.lexists(self.path):
                return ""  # a parent is a file: os.mkdir() raises the error
            return "it is a file, not a mail queue; nothing was created"
        for name in names:
            if name not in ("tmp", "new", "cur", FAILED, "relays") or not is_folder(
                os.path.join(self.path, name)
            ):
                return (
                    "it is not a mail queue and not empty (it holds"
                    f" {name!r}); nothing was created in it"
                )
        return ""

    def __repr__(self) -> str:
        return f"<Maildir {self.path!r}>"

    @property
    def key(self) -> str:
        """The queue's real path (see :class:`~mailoutbox.interfaces.IQueueStore`)."""
        return os.path.realpath(self.path)

    # -- the lanes of the queue: its relay folders ----------------------------

    def relays(self) -> list[str]:
        """The names of the relay folders (:mod:`mailoutbox.relays`)."""
        from mailoutbox.relays import relay_folders
        return [name for name, _path in relay_folders(self.path)]

    def relay(self, name: str, create: bool = False) -> Maildir:
        """The Maildir of the relay folder of *name*."""
        from mailoutbox.relays import relay_path
        if create:
            from mailoutbox.relays import open_relay
            return open_relay(self.path, name, create=True)
        return type(self)(relay_path(self.path, name))

    def recover(self) -> int:
        """Roll forward the transactions a crash cut short in ``tpc_finish``
        (see :mod:`mailoutbox._commit`)."""
        return roll_forward(self)

    def watcher(self, on_wake: Any, name: str) -> Any:
        """An inotify watcher of ``new/`` of the queue and of its relay
        folders (:class:`mailoutbox.wakeup.FolderWatcher`)."""
        from mailoutbox.wakeup import FolderWatcher
        return FolderWatcher(self.key, on_wake, name=name)

    # -- writing ------------------------------------------------------------

    def newMessage(self, priority: int = 0) -> MaildirMessageWriter:
        """See :class:`mailoutbox.interfaces.IMaildir`.

        A *priority* other than 0 is recorded in the file's name (see
        :mod:`mailoutbox.schedule`)."""
        for _attempt in range(100):
            name = _new_name(priority)
            path = os.path.join(self.tmp, name)
            try:
                fd = os.open(
                    path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW,
                    FILE_MODE,
                )
            except FileExistsError:  # pragma: no cover - random part collided
                continue
            return MaildirMessageWriter(self, fd, name)
        raise RuntimeError(  # pragma: no cover - 100 collisions of 32 random bits
            f"could not create a unique file in {self.tmp}"
        )

    def sync_new(self) -> None:
        """fsync ``new/`` so that renames into it are durable."""
        fsync_dir(self.new)

    def schedule(self, name: str, not_before: float) -> str:
        """Write the retry state of the message *name*, not yet in ``new/``,
        to keep it back until *not_before* (``{"not_before": T, "attempts":
        0}``, modification time T), and fsync it; return its path.  The
        caller fsyncs ``new/`` (:meth:`sync_new`) before the message enters
        it.  See :mod:`mailoutbox.schedule`."""
        path = Entry(self.new, name).sidecar(RETRY_PREFIX)
        data = json.dumps({"attempts": 0, "not_before": not_before},
                          sort_keys=True).encode()
        write_atomically(self.tmp, path, data, mtime=not_before, fsync=True,
                         prefix=".schedule-")
        return path

    def priority(self, entry: Entry) -> int:
        """The priority of *entry* (higher is sent first; 0 normal)."""
        return priority_of(entry.name)

    # -- reading ------------------------------------------------------------

    def __iter__(self) -> Iterator[str]:
        """See :class:`mailoutbox.interfaces.IMaildir`."""
        return iter([entry.path for entry in self.scan().entries])

    def _list(self, folder: str) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(folder) as it:
                yield from it
        except FileNotFoundError:
            return

    def scan(self) -> Scan:
        """List the queue folders once.

        Names starting with a timestamp sort in time order, so the entries
        are sorted by priority (higher first, as their names record it:
        :func:`mailoutbox.schedule.sort_key`), then by name
        (zope.sendmail's names start with a timestamp too).  Deferred
        messages are in the result with their retry time.
        """
        scan = Scan()
        retry_files = []
        for folder in (self.new, self.cur):
            for dirent in self._list(folder):
                name = dirent.name
                if name.startswith("."):
                    if name.startswith(CLAIM_PREFIX):
                        scan.claimed.add(name[len(CLAIM_PREFIX):])
                    elif name.startswith(RETRY_PREFIX):
                        retry_files.append((name[len(RETRY_PREFIX):], dirent))
                    scan.dotfiles.append((folder, name))
                    continue
                regular = dirent.is_file(follow_symlinks=False)
                scan.entries.append(Entry(folder, name, regular))
        for name, dirent in retry_files:
            with contextlib.suppress(FileNotFoundError):
                scan.retry_at[name] = dirent.stat(follow_symlinks=False).st_mtime
        scan.entries.sort(key=lambda e: sort_key(e.name))
        return scan

    def failed_entries(self) -> list[Entry]:
        """The messages in the failed area, oldest first."""
        entries = [
            Entry(self.failed, d.name, d.is_file(follow_symlinks=False))
            for d in self._list(self.failed)
            if not d.name.startswith(".")
        ]
        entries.sort(key=lambda e: e.name)
        return entries

    def find(self, name: str) -> Entry | None:
        """The queued or failed message called *name*, if there is one."""
        if not name or name.startswith(".") or os.sep in name:
            return None
        for folder in (self.new, self.cur, self.failed):
            if os.path.lexists(os.path.join(folder, name)):
                return Entry(folder, name)
        return None

    def read(self, entry: Entry, size: int = -1) -> bytes:
        """The first *size* bytes of *entry* (all with -1); a symbolic link
        is not followed, nor a fifo waited on."""
        fd = os.open(entry.path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            return f.read(size)

    def queued_at(self, entry: Entry) -> float:
        """When *entry* was queued: the time its name starts with (ours and
        zope.sendmail's names do), else its modification time."""
        prefix = entry.name.split(".", 1)[0]
        if prefix.isdigit() and len(prefix) <= 12:
            return float(prefix)
        try:
            return os.lstat(entry.path).st_mtime
        except FileNotFoundError:
            return time.time()

    def reason(self, entry: Entry) -> dict[str, Any] | None:
        """Why a failed message failed."""
        return read_json(entry.sidecar(REASON_PREFIX))

    def retry_state(self, entry: Entry) -> dict[str, Any] | None:
        """The retry state of a deferred message (None if not deferred)."""
        return read_json(entry.sidecar(RETRY_PREFIX))

    # -- claiming -------------------------------------------------------------

    def claim(self, entry: Entry, lease: float = DEFAULT_LEASE,
              exact: bool = True) -> Claim | None:
        """Claim *entry* for sending; None if it is gone or claimed by a
        live processor.  (A Maildir's claims are always *exact*.)

        A claim whose lease expired (its processor died) is broken first.
        """
        claim_path = entry.sidecar(CLAIM_PREFIX)
        if os.path.lexists(claim_path) and not self._break_stale(
            claim_path, lease
        ):
            return None
        try:
            # Start the lease before the claim is visible.  Only done when
            # no claim exists, so a dead processor's lease is never renewed
            # by others trying to claim the message.
            os.utime(entry.path, follow_symlinks=False)
            os.link(entry.path, claim_path, follow_symlinks=False)
        except FileNotFoundError:
            return None  # sent or moved by someone else meanwhile
        except FileExistsError:
            return None  # claimed by someone else meanwhile
        return Claim(self, entry, claim_path)

    def _break_stale(self, claim_path: str, lease: float) -> bool:
        """Remove the claim at *claim_path* if its lease expired.

        The claim is first renamed to a private name and its age checked
        again, so that a claim renewed (or made anew) in between is put back
        instead of broken.
        """
        try:
            if time.time() - os.lstat(claim_path).st_mtime <= lease:
                return False
            private = claim_path + ".broken-" + secrets.token_hex(4)
            os.rename(claim_path, private)
        except FileNotFoundError:
            return True  # released meanwhile
        try:
            stale = time.time() - os.lstat(private).st_mtime > lease
            if not stale:
                # A new claim may have been made meanwhile: it stands.
                with contextlib.suppress(FileExistsError):
                    os.link(private, claim_path, follow_symlinks=False)
            return stale
        finally:
            unlink(private)

    # -- the failed area and repairs ------------------------------------------

    def _ensure_failed(self) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.failed, DIR_MODE)

    def move_to_failed(self, entry: Entry, reason: dict[str, Any],
                       name: str | None = None) -> Entry:
        """Move *entry* (claimed by the caller, or foreign) to the failed
        area, as *name* (default: its own name), with *reason*; remove its
        retry state."""
        self._ensure_failed()
        target = Entry(self.failed, name or entry.name)
        write_json_atomically(self.tmp, target.sidecar(REASON_PREFIX), reason)
        try:
            os.rename(entry.path, target.path)
        except PermissionError:  # not ours to move: leave no reason behind
            unlink(target.sidecar(REASON_PREFIX))
            raise
        unlink(entry.sidecar(RETRY_PREFIX))
        return target

    def requeue(self, entry: Entry) -> Entry:
        """Put a failed or deferred message back in the queue for an
        immediate attempt."""
        if entry.folder == self.failed:
            target = Entry(self.new, entry.name)
            os.rename(entry.path, target.path)
            fsync_dir(self.new)
            unlink(entry.sidecar(REASON_PREFIX))
            return target
        unlink(entry.sidecar(RETRY_PREFIX))
        return entry

    def purge(self, entry: Entry) -> None:
        """Delete a message and its state files for good."""
        unlink(entry.path)
        for prefix in (RETRY_PREFIX, REASON_PREFIX):
            unlink(entry.sidecar(prefix))

    def cleanup(self, scan: Scan, lease: float = DEFAULT_LEASE,
                now: float | None = None) -> int:
        """Tidy up after crashes; return how many files were handled.

        Removes files older than 36 hours from ``tmp/`` (left by writers
        that crashed before ``tpc_finish``: never sent), claims and retry
        states whose message is gone (a retry state is kept while its
        message is still in ``tmp/``: one written by :meth:`schedule` for a
        transaction not finished yet), and adopts zope.sendmail's
        ``.rejected-`` files into the failed area.
        """
        now = time.time() if now is None else now
        done = 0
        names = {(e.folder, e.name) for e in scan.entries}
        for folder, dotname in scan.dotfiles:
            path = os.path.join(folder, dotname)
            if dotname.startswith(REJECTED_PREFIX):
                self.move_to_failed(
                    Entry(folder, dotname),
                    {"error": "rejected by zope.sendmail (no reason recorded)",
                     "permanent": True, "time": now},
                    name=dotname[len(REJECTED_PREFIX):],
                )
                done += 1
                continue
            for prefix in (CLAIM_PREFIX, RETRY_PREFIX):
                if dotname.startswith(prefix):
                    base = dotname[len(prefix):]
                    if (folder, base) not in names and not (
                        prefix == RETRY_PREFIX and self._in_tmp(base)
                    ) and not os.path.lexists(
                        os.path.join(folder, base)
                    ) and not is_folder(path):  # not ours; unlink() would fail
                        done += unlink(path)
        for dirent in self._list(self.tmp):
            if dirent.is_dir(follow_symlinks=False):
                continue  # not a message file; unlink() would fail on it
            try:
                age = now - dirent.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:  # pragma: no cover - removed meanwhile
                continue
            if age > TMP_MAX_AGE:
                done += unlink(dirent.path)
        return done


    def _in_tmp(self, name: str) -> bool:
        """Whether a message called *name* is being written in ``tmp/``
        (looked at before ``new/``: the rename between them is atomic)."""
        return os.path.lexists(os.path.join(self.tmp, name))


class Claim:
    """A processor's exclusive hold on one queued message.

    Exactly one of :meth:`complete`, :meth:`defer`, :meth:`fail` or
    :meth:`release` ends it.  :meth:`renew` extends the lease; call it more
    often than the lease runs out while sending.
    """

    def __init__(self, maildir: Maildir, entry: Entry, claim_path: str) -> None:
        self.maildir = maildir
        self.entry = entry
        self.claim_path = claim_path

    def __repr__(self) -> str:
        return f"<Claim {self.entry.name!r}>"

    def read(self) -> bytes:
        """The queue file's contents.  Symbolic links are not followed, and a
        fifo (put in place of the file after the listing) is not waited on."""
        return self.maildir.read(self.entry)

    def renew(self) -> None:
        """Extend the lease (touch the claim)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.claim_path, follow_symlinks=False)

    def retry_state(self) -> dict[str, Any] | None:
        return self.maildir.retry_state(self.entry)

    def release(self) -> None:
        """Give the message back to the queue untouched."""
        unlink(self.claim_path)

    def complete(self) -> None:
        """The message was sent: remove it and its state."""
        unlink(self.entry.path)
        unlink(self.entry.sidecar(RETRY_PREFIX))
        unlink(self.claim_path)

    def defer(self, retry_at: float, state: dict[str, Any]) -> None:
        """Keep the message queued until *retry_at*, recording *state*."""
        write_json_atomically(
            self.maildir.tmp, self.entry.sidecar(RETRY_PREFIX), state, retry_at
        )
        unlink(self.claim_path)

    def rewrite(self, data: bytes) -> None:
        """Replace the queue file's contents with *data*, atomically: the
        new file is written in ``tmp/``, fsynced and renamed over the
        message (the claim keeps the old file's inode until it ends)."""
        write_atomically(self.maildir.tmp, self.entry.path, data, fsync=True,
                         prefix=".rewrite-")

    def split_failed(self, data: bytes, reason: dict[str, Any]) -> Entry:
        """Put *data*, a queue file for some of the message's recipients,
        in the failed area with *reason*, as ``NAME.refused-HEX``; the
        claimed message stays where it is."""
        self.maildir._ensure_failed()
        target = Entry(self.maildir.failed, self.entry.name + REFUSED_SUFFIX
                       + secrets.token_hex(4))
        write_json_atomically(self.maildir.tmp, target.sidecar(REASON_PREFIX),
                              reason)
        write_atomically(self.maildir.tmp, target.path, data, fsync=True,
                         prefix=".refused-")
        return target

    def fail(self, reason: dict[str, Any]) -> Entry:
        """Move the message to the failed area with *reason*."""
        try:
            return self.maildir.move_to_failed(self.entry, reason)
        finally:
            unlink(self.claim_path)
