"""Where routed messages are queued: one Maildir folder per relay.

A message sent with ``send(..., mailer=NAME)`` is queued in
``QUEUE/relays/ENCODED-NAME/`` instead of ``QUEUE/`` itself::

    QUEUE/                  the queue; its messages go through the default
        tmp/ new/ cur/      mailer (zope.sendmail's layout, unchanged)
        failed/
        relays/
            crm-1/          a Maildir folder like QUEUE itself, whose
                tmp/ new/   messages go through the mailer named "crm-1"
                cur/ failed/

The routing is thus where the file is, never in the file: queue files keep
zope.sendmail's format, and a zope.sendmail processor, which only reads
``QUEUE/new`` and ``QUEUE/cur``, never sees a routed message.  Inside a
relay folder, messages move exactly as in the queue itself
(:mod:`mailoutbox.maildir`).

The folder name is the mailer's name with every byte of its UTF-8 form
other than ``A-Z``, ``a-z``, ``0-9``, ``_`` and ``-`` written as ``%XX``
(upper-case hex).  A name therefore never contains ``/`` and never starts
with or is ``.`` or ``..``; :func:`decode_name` accepts exactly the names
:func:`encode_name` makes.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable

from mailoutbox.maildir import Maildir

__all__ = [
    "MAX_NAME_LENGTH",
    "RELAYS",
    "check_name",
    "check_names",
    "decode_name",
    "encode_name",
    "open_relay",
    "relay_folders",
    "relay_path",
]

#: The folder of the relay folders, inside the queue.
RELAYS = "relays"
#: The longest encoded name (file systems allow 255 bytes per name).
MAX_NAME_LENGTH = 200

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ENCODED = re.compile(r"(?:[A-Za-z0-9_-]|%[0-9A-F]{2})+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DIR_MODE = 0o700


def encode_name(name: str) -> str:
    """The folder name of the relay called *name*."""
    return "".join(
        chr(byte) if byte in _SAFE else f"%{byte:02X}"
        for byte in name.encode("utf-8")
    )


def check_name(name: object) -> str:
    """Return *name* if it can name a relay; raise :class:`TypeError` or
    :class:`ValueError` saying why not.

    A name is a non-empty ``str`` without control characters, whose
    encoded form has at most :data:`MAX_NAME_LENGTH` characters.
    """
    if not isinstance(name, str):
        raise TypeError(f"a mailer name must be a str, not {name!r}")
    if not name:
        raise ValueError("a mailer name cannot be empty")
    if _CONTROL.search(name):
        raise ValueError(f"the mailer name {name!r} contains a control character")
    try:
        encoded = encode_name(name)
    except UnicodeEncodeError:  # a lone surrogate
        raise ValueError(f"the mailer name {name!r} is not valid text") from None
    if len(encoded) > MAX_NAME_LENGTH:
        raise ValueError(f"the mailer name {name!r} is too long")
    return name


def check_names(names: Iterable[str] | None) -> frozenset[str]:
    """The names in *names* (any collection of names, or a mapping whose
    keys are names), each checked by :func:`check_name`."""
    if names is None:
        return frozenset()
    if isinstance(names, (str, bytes)):
        raise TypeError(
            f"give a collection of mailer names, not one string: {names!r}"
            f" (write [{names!r}])"
        )
    return frozenset(check_name(name) for name in names)


def decode_name(folder: str) -> str | None:
    """The relay name that *folder* (a folder name) stands for; ``None`` if
    :func:`encode_name` does not make *folder* from any name."""
    if not _ENCODED.match(folder) or len(folder) > MAX_NAME_LENGTH:
        return None
    raw = bytearray()
    i = 0
    while i < len(folder):
        if folder[i] == "%":
            raw.append(int(folder[i + 1:i + 3], 16))
            i += 3
        else:
            raw.append(ord(folder[i]))
            i += 1
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if encode_name(name) != folder or _CONTROL.search(name):
        return None  # e.g. "%41" for "A", or a control character
    return name


def relay_path(queue_path: str, name: str) -> str:
    """The folder of the relay *name* in the queue at *queue_path*."""
    return os.path.join(os.fspath(queue_path), RELAYS, encode_name(check_name(name)))


def open_relay(queue_path: str, name: str, create: bool = False) -> Maildir:
    """The Maildir of the relay *name* in the queue at *queue_path*.

    With *create*, the queue, its ``relays`` folder and the relay's folder
    are created (mode 0700) when they do not exist.  Raises
    :class:`ValueError` when the folder is not a Maildir folder or is a
    symbolic link.
    """
    path = relay_path(queue_path, name)
    if create:
        Maildir(queue_path, create=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(os.path.dirname(path), _DIR_MODE)
    for folder in (os.path.dirname(path), path):
        if os.path.islink(folder):
            raise ValueError(f"{folder} is a symbolic link, not a relay folder")
    return Maildir(path, create=create)


def relay_folders(queue_path: str) -> list[tuple[str, str]]:
    """``(name, path)`` of every relay folder of the queue at *queue_path*,
    sorted by name.

    Entries of ``relays/`` that are not folders (symbolic links included)
    or whose names :func:`decode_name` does not accept are left out.
    """
    base = os.path.join(os.fspath(queue_path), RELAYS)
    if os.path.islink(base):
        return []
    found = []
    try:
        with os.scandir(base) as entries:
            for entry in entries:
                name = decode_name(entry.name)
                if name is not None and entry.is_dir(follow_symlinks=False):
                    found.append((name, entry.path))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found.sort()
    return found
