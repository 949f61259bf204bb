"""The writing end of the queue on disk: a new message file in ``tmp/``,
renamed into ``new/`` when committed.

Part of the protocol of :mod:`mailoutbox.maildir`, which creates the
writers (``Maildir.newMessage()``) and exports the class; import it from
there.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from zope.interface import implementer

from mailoutbox._files import unlink
from mailoutbox.interfaces import IMaildirMessageWriter

if TYPE_CHECKING:
    from mailoutbox.maildir import Maildir

__all__ = ["MaildirMessageWriter"]


@implementer(IMaildirMessageWriter)
class MaildirMessageWriter:
    """See :class:`mailoutbox.interfaces.IMaildirMessageWriter`.

    Besides the interface, :meth:`sync` does the fallible part of a commit
    (flush, fsync, close) so that a two-phase commit can do it when voting,
    and ``commit(fsync_dir=False)`` lets a caller that commits many
    messages fsync ``new/`` once (:meth:`Maildir.sync_new`).
    """

    def __init__(self, maildir: Maildir, fd: int, name: str) -> None:
        self.maildir = maildir
        self.name = name
        self.tmp_path = os.path.join(maildir.tmp, name)
        self.new_path = os.path.join(maildir.new, name)
        self._file = os.fdopen(fd, "wb")
        self._synced = False
        self._committed = False
        self._aborted = False

    def write(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8")
        self._file.write(data)

    def writelines(self, lines: Iterable[bytes | str]) -> None:
        for line in lines:
            self.write(line)

    def close(self) -> None:
        self._file.close()

    def sync(self) -> None:
        """Flush, fsync and close the file in ``tmp/``."""
        if self._synced:
            return
        if self._aborted:
            raise RuntimeError("Cannot sync, message already aborted")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        self._synced = True

    def commit(self, fsync_dir: bool = True) -> None:
        if self._aborted:
            raise RuntimeError("Cannot commit, message already aborted")
        if self._committed:
            return
        self.sync()
        os.rename(self.tmp_path, self.new_path)
        self._committed = True
        if fsync_dir:
            self.maildir.sync_new()

    def abort(self) -> None:
        if self._committed or self._aborted:
            return
        self._aborted = True
        # Closing flushes what is buffered, which fails again if a write
        # failed (a full disk): the data is being thrown away anyway.
        with contextlib.suppress(OSError):
            self._file.close()
        unlink(self.tmp_path)
