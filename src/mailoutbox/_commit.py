"""Commit records: the messages of one transaction enter the queue together.

A transaction that queues two messages or more could be cut in two by a
crash between the renames of ``tpc_finish`` (some messages in ``new/``, the
rest left in ``tmp/``).  :class:`QueuedDataManager
<mailoutbox.datamanager.QueuedDataManager>` therefore writes a commit
record for such a transaction:

1. ``tpc_vote``, after writing and fsyncing the message files, writes
   ``tmp/.pending-NAME`` in the queue (the JSON list of the message files,
   relative to the queue), fsyncs it and fsyncs the ``tmp/`` folders;
2. ``tpc_finish`` first renames it to ``tmp/.committed-NAME`` (the moment
   the transaction's messages are committed) and fsyncs ``tmp/``, then
   renames the message files into ``new/``, fsyncs ``new/`` and removes the
   record.

After a crash, :func:`roll_forward` (run by the processor before each
listing of the queue) finishes the renames of every committed record; a
pending record and its message files are never sent and are removed with
the other old files of ``tmp/`` after 36 hours.  A transaction with one
message needs no record: its one rename is atomic.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mailoutbox._files import FILE_MODE
from mailoutbox._files import O_NOFOLLOW
from mailoutbox._files import fsync_dir
from mailoutbox._files import unlink

if TYPE_CHECKING:
    from mailoutbox.maildir import Maildir
    from mailoutbox.maildir import MaildirMessageWriter

__all__ = ["COMMITTED_PREFIX", "PENDING_PREFIX", "CommitRecord", "roll_forward"]

log = logging.getLogger("mailoutbox.delivery")

PENDING_PREFIX = ".pending-"
COMMITTED_PREFIX = ".committed-"


class CommitRecord:
    """The record of the message files one transaction moves into ``new/``."""

    def __init__(self, queue: Maildir,
                 writers: Sequence[tuple[str, MaildirMessageWriter]]) -> None:
        """Write and fsync the pending record in ``tmp/`` of *queue*, and
        fsync the ``tmp/`` folders of *writers* (``(Message-Id, writer)``
        pairs), so that their files are there after a power loss."""
        name = secrets.token_hex(12)
        self.pending = os.path.join(queue.tmp, PENDING_PREFIX + name)
        self.committed = os.path.join(queue.tmp, COMMITTED_PREFIX + name)
        self.queue = queue
        root = queue.path
        files = [[os.path.relpath(w.tmp_path, root),
                  os.path.relpath(w.new_path, root), message_id]
                 for message_id, w in writers]
        data = json.dumps({"files": files}).encode()
        fd = os.open(self.pending,
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW, FILE_MODE)
        try:
            with open(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            for folder in sorted({w.maildir.tmp for _i, w in writers} | {queue.tmp}):
                fsync_dir(folder)
        except BaseException:
            unlink(self.pending)
            raise

    def commit(self) -> None:
        """Make the record committed: from now on the messages will be
        queued, by the caller or, after a crash, by :func:`roll_forward`."""
        os.rename(self.pending, self.committed)
        fsync_dir(self.queue.tmp)

    def remove(self) -> None:
        """Forget the record (all its files were moved, or aborted)."""
        unlink(self.pending)
        unlink(self.committed)


def _check(tmp_name: str, new_name: str) -> None:
    """Refuse a record that would move anything but a file of a ``tmp/``
    folder into the ``new/`` beside it, inside the queue."""
    tmp_dir, name = os.path.split(os.path.normpath(tmp_name))
    new_dir, new_base = os.path.split(os.path.normpath(new_name))
    if (name != new_base or name.startswith(".") or os.path.isabs(tmp_dir)
            or ".." in tmp_dir.split(os.sep)
            or os.path.split(tmp_dir) != (os.path.dirname(new_dir), "tmp")
            or os.path.basename(new_dir) != "new"):
        raise ValueError(f"not a move from tmp/ to new/: {tmp_name!r} -> {new_name!r}")


def roll_forward(maildir: Maildir) -> int:
    """Move into ``new/`` the files of the committed records in ``tmp/`` of
    *maildir* (left by a crash in ``tpc_finish``) and remove the records;
    return how many files were moved.  Never raises: errors are logged."""
    moved = 0
    try:
        with os.scandir(maildir.tmp) as it:
            records = [d.path for d in it if d.name.startswith(COMMITTED_PREFIX)]
    except FileNotFoundError:
        return 0  # no queue (yet)
    except OSError:
        log.exception("could not list %s for commit records", maildir.tmp)
        return 0
    for record in records:
        try:
            with open(record, "rb") as f:
                files = json.loads(f.read())["files"]
            folders = set()
            for tmp_name, new_name, message_id in files:
                _check(tmp_name, new_name)
                source = os.path.join(maildir.path, tmp_name)
                target = os.path.join(maildir.path, new_name)
                try:
                    os.rename(source, target)
                except FileNotFoundError:
                    continue  # moved already (before the crash, or meanwhile)
                folders.add(os.path.dirname(target))
                moved += 1
                log.warning("queued message %s as %s: its transaction"
                            " committed, then crashed before queueing it",
                            message_id, target)
            for folder in sorted(folders):
                fsync_dir(folder)
            unlink(record)
        except FileNotFoundError:
            continue  # its transaction finished meanwhile
        except Exception:
            log.exception("could not roll the commit record %s forward", record)
    return moved
