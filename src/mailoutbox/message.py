"""Preparing a message for sending: checking its addresses, turning it into
bytes and giving it a Message-Id.

Everything here runs in ``send()``, before the delivery joins the
transaction, so that a bad address or message is reported to the caller at
once and nothing is queued for it.  The addresses are checked by
:mod:`mailoutbox.address`, whose functions this module re-exports.
"""
from __future__ import annotations

import contextlib
import email.errors
import email.message
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

from mailoutbox.address import check_recipients
from mailoutbox.address import check_sender
from mailoutbox.address import format_address
from mailoutbox.address import parse_address

__all__ = [
    "check_recipients",  # from mailoutbox.address
    "check_sender",  # from mailoutbox.address
    "format_address",  # from mailoutbox.address
    "make_msgid",
    "message_id_domain",
    "message_to_bytes",
    "parse_address",  # from mailoutbox.address
    "prepare_message",
]

_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+\Z")
_ID_PART = rb"[^\x00-\x20\x7f-\xff<>@]+"
_MSG_ID = re.compile(rb"<(%s@%s)>\Z" % (_ID_PART, _ID_PART))

#: A seam for tests: how the domain of generated Message-Ids is found.
_getfqdn = socket.getfqdn


# -- message ids -------------------------------------------------------------


@lru_cache(maxsize=1)
def message_id_domain() -> str:
    """The domain of generated Message-Ids: this host's fully qualified
    name, looked up once per process (the lookup may ask DNS)."""
    name = _getfqdn()
    with contextlib.suppress(UnicodeError):
        name = name.encode("idna").decode("ascii")
    return re.sub(r"[^A-Za-z0-9.-]", "", name).strip(".") or "localhost"


def make_msgid() -> str:
    """A new globally unique Message-Id, without angle brackets.

    ``TIME.RANDOM.PID@DOMAIN``: the UTC time to the microsecond, 64 random
    bits from :mod:`secrets`, the process id and :func:`message_id_domain`.
    """
    now = time.time()
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
    micro = int(now % 1 * 1e6)
    return (
        f"{stamp}.{micro:06d}.{secrets.token_hex(8)}.{os.getpid()}"
        f"@{message_id_domain()}"
    )


# -- messages ----------------------------------------------------------------


def _serialize(message: bytes | str | email.message.Message) -> bytes:
    if isinstance(message, bytes):
        return message
    if isinstance(message, bytearray):
        return bytes(message)
    if isinstance(message, str):
        try:
            return message.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"the message cannot be encoded as UTF-8: {exc}") from None
    if isinstance(message, email.message.Message):
        # The message's own policy, but no refolding of long lines: the
        # headers are sent as they are.
        policy = message.policy.clone(max_line_length=0)
        try:
            return message.as_bytes(policy=policy)
        except (UnicodeError, LookupError) as exc:
            raise ValueError(
                f"the message cannot be serialized: {exc} (give non-ASCII"
                " text parts a charset)"
            ) from exc
        except email.errors.MessageError as exc:  # e.g. a header with a newline
            raise ValueError(f"the message cannot be serialized: {exc}") from exc
    raise TypeError(
        "message must be bytes, str or an email.message.Message, not"
        f" {type(message).__name__}"
    )


class _Headers(NamedTuple):
    """What :func:`_scan_headers` found in a header section."""

    #: The line separator of the header section.
    linesep: bytes
    #: The values of the Message-Id fields, unfolded.
    message_ids: list[bytes]
    #: The names of the fields, in order, lower-case.
    names: list[str]


def _scan_headers(data: bytes) -> _Headers:
    """Check the header section of *data*, as it will be queued or sent:
    every line ends with the separator of the first line (CRLF or LF) and
    is a header field or the continuation of one, and the section ends
    with a blank line."""
    first_end = data.find(b"\n")
    linesep = b"\r\n" if first_end > 0 and data[first_end - 1] == 13 else b"\n"
    crlf = linesep == b"\r\n"
    message_ids: list[list[bytes]] = []
    names: list[str] = []
    current: list[bytes] | None = None
    position = 0
    number = 1
    while True:
        end = data.find(b"\n", position)
        if end < 0:
            raise ValueError(
                "the message has no blank line between its headers and its"
                " body (a message with headers only must end with one)"
            )
        line = data[position:end]
        if crlf:
            if not line.endswith(b"\r"):
                raise ValueError(
                    f"line {number} of the message ends with a bare LF"
                    f" ({line[:60]!r}) while its headers end lines with"
                    " CRLF: a header line must not be split by a bare LF"
                )
            line = line[:-1]
        if b"\r" in line:
            raise ValueError(
                f"line {number} of the message has a CR that does not end the"
                f" line ({line[:60]!r}): it would split the header there on the"
                " wire"
            )
        if not line:
            return _Headers(
                linesep, [b" ".join(parts).strip() for parts in message_ids], names
            )
        if line[:1] in (b" ", b"\t") and number > 1:
            if current is not None:
                current.append(line.strip())
        else:
            name, colon, value = line.partition(b":")
            if not colon or not _FIELD_NAME.match(name):
                raise ValueError(
                    f"line {number} of the message is not a header field"
                    f" ({line[:60]!r}): a message starts with headers, then a"
                    " blank line, then the body"
                )
            current = None
            names.append(name.decode("ascii").lower())
            if names[-1] == "message-id":
                current = [value]
                message_ids.append(current)
        position = end + 1
        number += 1


def _check_fields(message: email.message.Message, found: list[str]) -> None:
    """Refuse a serialized *message* whose header fields (*found*) are not
    exactly the headers the caller set: a value with a line break that is
    not folding white space (a lone surrogate makes compat32 write it raw,
    ``set_raw()`` and :data:`email.policy.default` rejoin its lines) would
    add a header, or end the header section early."""
    keys = [str(key) for key in message]  # the header names
    if found == [key.lower() for key in keys]:
        return
    index = next(
        (i for i, (a, b) in enumerate(zip(found, keys, strict=False))
         if a != b.lower()),
        min(len(found), len(keys)),
    )
    if index < len(found):
        effect = (f"would add a {found[index].title()!r} header the message"
                  " does not have")
    else:
        effect = "would end the headers early"
    if index < len(keys) and not _FIELD_NAME.match(
            keys[index].encode("utf-8", "surrogateescape")):
        raise ValueError(
            f"the header name {keys[index]!r} of the message is not a field"
            " name (printable ASCII except ':'); serialized, it"
            f" {effect}: refused, as header injection"
        )
    raise ValueError(
        f"the {keys[max(index - 1, 0)]!r} header of the message holds a line"
        " break that is not folding white space (a line break followed by a"
        f" space or tab); serialized, it {effect}: refused, as header injection"
    )


def _to_bytes(
    message: bytes | str | email.message.Message,
) -> tuple[bytes, _Headers | None]:
    """*message* serialized, and its header section scanned when it is an
    :class:`email.message.Message` (whose headers are then checked against
    the fields of the bytes)."""
    data = _serialize(message)
    if not isinstance(message, email.message.Message):
        return data, None
    headers = _scan_headers(data)
    _check_fields(message, headers.names)
    return data, headers


def message_to_bytes(message: bytes | str | email.message.Message) -> bytes:
    """*message* as ``bytes``, as :func:`prepare_message` turns it into
    bytes (without adding a Message-Id).

    An :class:`email.message.Message` is checked after serialization as
    :func:`prepare_message` checks it: the header fields of the bytes must
    be exactly its headers (:class:`ValueError` otherwise).

    .. versionadded:: 0.1
    """
    return _to_bytes(message)[0]


def prepare_message(
    message: bytes | str | email.message.Message,
    new_message_id: Callable[[], str] = make_msgid,
) -> tuple[bytes, str]:
    """Return *message* as bytes, with a Message-Id, and that Message-Id
    without angle brackets.

    A ``str`` is encoded as UTF-8 and an :class:`email.message.Message` is
    serialized with its own policy, except that long header lines are not
    refolded.  An existing Message-Id header is kept;
    when there is none, one made by *new_message_id* is added as the first
    header, ending with the line separator the message uses.

    The header section is checked in the bytes, as it will be queued or
    sent.  Raises :class:`ValueError` when the message has no blank line
    after its headers; when a line of the header section is not a header
    field or the continuation of one, or does not end as the first line
    does (a CR inside a line, a bare LF among CRLF line ends); when the
    header fields of a serialized :class:`email.message.Message` are not
    exactly its headers (a value with a line break that is not folding
    white space would add a header or end the headers early); or when the
    Message-Id header is malformed or repeated; and :class:`TypeError` for
    other types.
    """
    data, headers = _to_bytes(message)
    if headers is None:
        headers = _scan_headers(data)
    linesep, values = headers.linesep, headers.message_ids
    if len(values) > 1:
        raise ValueError(
            f"the message has {len(values)} Message-Id headers; it may have"
            " only one"
        )
    if values:
        match = _MSG_ID.match(values[0])
        if match is None:
            raise ValueError(
                f"malformed Message-Id header {values[0]!r}: expected"
                " <unique-part@domain>"
            )
        return data, match.group(1).decode("ascii")
    message_id = new_message_id()
    header = b"Message-Id: <%s>%s" % (message_id.encode("ascii"), linesep)
    return header + data, message_id
