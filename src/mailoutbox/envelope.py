"""The envelope lines at the top of every queue file.

A queue file is::

    X-Zope-From: SENDER\\n
    X-Zope-To: RECIPIENT, RECIPIENT, ...\\n
    MESSAGE

exactly as zope.sendmail writes and reads it.  Recipients are joined with
``", "`` and split with :func:`email.utils.getaddresses`, so display names
containing commas must be quoted (``"Doe, Jane" <jane@example.org>``);
:func:`format_envelope` quotes them.  Addresses are written as UTF-8 as
they are (display names are not RFC 2047-encoded), so addresses with UTF-8
local parts or domains survive the round trip.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from email.utils import getaddresses

from mailoutbox.address import format_address
from mailoutbox.address import parse_address

__all__ = ["format_envelope", "parse_queue_file"]

FROM_PREFIX = b"X-Zope-From: "
TO_PREFIX = b"X-Zope-To: "


def format_envelope(fromaddr: str, toaddrs: Sequence[str]) -> bytes:
    """The two envelope lines for a queue file.

    *fromaddr* must not contain CR, LF or NUL; each of *toaddrs* must be a
    valid address (see :func:`mailoutbox.address.parse_address`, which
    raises :class:`ValueError` otherwise).  Display names are quoted when
    they need it.
    """
    to = ", ".join(format_address(*parse_address(a)) for a in toaddrs)
    return b"%s%s\n%s%s\n" % (
        FROM_PREFIX, fromaddr.encode("utf-8"), TO_PREFIX, to.encode("utf-8")
    )


#: A bare ASCII addr-spec with nothing getaddresses() would treat specially.
_PLAIN = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+\Z")


def _plain_addresses(to: str) -> tuple[str, ...] | None:
    """The recipients of an envelope line that lists only bare ASCII
    addresses (the common case), without the cost of the full address
    parser; None when any of them needs it."""
    parts = [part.strip() for part in to.split(",")]
    if all(_PLAIN.match(part) for part in parts if part):
        return tuple(part for part in parts if part)
    return None


def parse_queue_file(data: bytes) -> tuple[str, tuple[str, ...], bytes]:
    """Split a queue file into ``(fromaddr, toaddrs, message)``.

    Raises :class:`ValueError` when the envelope lines are missing or name
    no recipient.
    """
    try:
        first, second, message = data.split(b"\n", 2)
    except ValueError:
        raise ValueError("queue file is too short to hold the envelope") from None
    if not first.startswith(FROM_PREFIX) or not second.startswith(TO_PREFIX):
        raise ValueError("queue file does not start with the envelope lines")
    try:
        fromaddr = first[len(FROM_PREFIX):].decode("utf-8")
        to = second[len(TO_PREFIX):].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("envelope lines are not UTF-8") from None
    toaddrs = _plain_addresses(to)
    if toaddrs is None:
        toaddrs = tuple(
            format_address(name, addr)
            for name, addr in getaddresses([to])
            if addr
        )
    if not toaddrs:
        raise ValueError("envelope names no recipient")
    return fromaddr.strip(), toaddrs, message
