"""The file operations under the queue on disk.

Small helpers for :mod:`mailoutbox.maildir`, which decides what moves where
(the protocol); these only make a directory's entries durable, remove a file
that may be gone, and write and read the JSON state files atomically.  They
know nothing of the queue's folders and are not used elsewhere.
"""
from __future__ import annotations

import json
import os
import secrets
import stat
from typing import Any

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "O_DIRECTORY",
    "O_NOFOLLOW",
    "O_NONBLOCK",
    "fsync_dir",
    "is_folder",
    "read_json",
    "unlink",
    "write_atomically",
    "write_json_atomically",
]

DIR_MODE = 0o700
FILE_MODE = 0o600
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def fsync_dir(path: str) -> None:
    """Make the entries of directory *path* durable."""
    fd = os.open(path, os.O_RDONLY | O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: str) -> bool:
    """Remove *path*; return False if it did not exist."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def is_folder(path: str) -> bool:
    """Whether *path* is a directory (not a symbolic link to one)."""
    return os.path.isdir(path) and not os.path.islink(path)


def write_atomically(tmp_dir: str, path: str, data: bytes, *,
                     mtime: float | None = None, fsync: bool = False,
                     prefix: str = ".state-") -> None:
    """Replace *path* with a file holding *data*, written in *tmp_dir*
    first (mode 0600) and renamed over *path*; with *fsync*, the file's
    contents are on disk before the rename; with *mtime*, the new file's
    modification time."""
    temp = os.path.join(tmp_dir, prefix + secrets.token_hex(8))
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW,
                 FILE_MODE)
    try:
        with open(fd, "wb") as f:  # writes all of it (os.write may not)
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(fd)
        if mtime is not None:
            os.utime(temp, (mtime, mtime))
        os.replace(temp, path)
    except BaseException:
        unlink(temp)  # e.g. the disk is full: leave nothing behind
        raise


def write_json_atomically(tmp_dir: str, path: str, data: dict[str, Any],
                          mtime: float | None = None) -> None:
    """Replace *path* with *data* as JSON, written in *tmp_dir* first; with
    *mtime*, the new file's modification time."""
    write_atomically(tmp_dir, path, json.dumps(data, sort_keys=True).encode(),
                     mtime=mtime)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in *path*: None if there is no file, ``{}`` if it is
    not a JSON object or not a regular file.

    A symbolic link is not followed and a fifo is not waited on: the file
    is opened with ``O_NOFOLLOW | O_NONBLOCK`` and read only if it is a
    regular file, so that nothing put in a state file's place can make a
    reader hang or read another file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:  # a symbolic link (ELOOP), or not readable
        return {}
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return {}  # a fifo, a directory, a device
    with os.fdopen(fd, "rb") as f:
        try:
            data = json.loads(f.read() or b"{}")
        except ValueError:
            return {}
    return data if isinstance(data, dict) else {}
