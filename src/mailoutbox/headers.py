"""The envelope that a message's headers name, as mail clients and
``sendmail -t`` take it.

:meth:`~mailoutbox.delivery.QueuedMailDelivery.send_message` and the
``mailoutbox send`` command both use :func:`envelope_from_headers` and
:func:`remove_headers`:

- the sender is the one address of the ``Sender`` header, else of the
  ``From`` header (a ``From`` with several authors needs a ``Sender``);
- the recipients are the addresses of the ``To``, ``Cc`` and ``Bcc``
  headers, in that order, each once;
- when the message has ``Resent-`` headers it was re-sent, and only the
  most recent block of them counts: ``Resent-Sender`` (else
  ``Resent-From``), and ``Resent-To``, ``Resent-Cc`` and ``Resent-Bcc``.
  Blocks are prepended, so the most recent one is the first run of
  ``Resent-`` fields; it ends at the first other field, or at a
  ``Resent-`` field it already has (the start of the next block).

Only addr-specs reach the envelope; display names, comments and group
names are dropped.  A header whose addresses cannot be parsed is an error,
never skipped: a recipient must not be lost, or a wrong one made up, by a
lenient parser.  So is an RFC 2047 encoded word inside an addr-spec, which
the email package would decode (``jane@=?utf-8?q?evil.example?=`` to
``jane@evil.example``) while mail clients show it as it is.  A local
recipient without a domain (``To: root``) is taken; ``send()`` checks it.
"""
from __future__ import annotations

import email.errors
import email.message
import email.policy
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

from mailoutbox.message import message_to_bytes

__all__ = [
    "HIDDEN_HEADERS",
    "envelope_from_headers",
    "prepare_send_message",
    "remove_headers",
]

#: The fields that name recipients who must not be seen by the others.
HIDDEN_HEADERS = ("bcc", "resent-bcc")

_RECIPIENT_FIELDS = ("to", "cc", "bcc")
#: Defects of an address header that do not change which addresses it names.
_HARMLESS_DEFECTS = (
    email.errors.ObsoleteHeaderDefect,
    email.errors.NonASCIILocalPartDefect,
)
#: The defect of a local recipient (``root``), which ``send()`` accepts.
_NO_DOMAIN = "addr-spec local part with no domain"


def _header_lines(data: bytes) -> tuple[list[tuple[int, int]], int] | None:
    """The (start, end) offsets of the lines of the header block of *data*
    (end excludes the line ending), and the offset of the blank line; None
    when there is no blank line."""
    lines: list[tuple[int, int]] = []
    position = 0
    while True:
        end = data.find(b"\n", position)
        if end < 0:
            return None
        stop = end - 1 if end > position and data[end - 1] == 13 else end
        if stop == position:
            return lines, position
        lines.append((position, stop))
        position = end + 1


def _fields(data: bytes) -> list[tuple[str, bytes, list[int]]]:
    """``(lower-case name, unfolded value, line indexes)`` of each header
    field of *data*, in order."""
    found = _header_lines(data)
    if found is None:
        raise ValueError(
            "the message has no blank line between its headers and its"
            " body (a message with headers only must end with one)"
        )
    fields: list[tuple[str, bytes, list[int]]] = []
    for index, (start, stop) in enumerate(found[0]):
        line = data[start:stop]
        if line[:1] in (b" ", b"\t") and fields:
            name, value, indexes = fields[-1]
            fields[-1] = (name, value + line, [*indexes, index])
            continue
        name, _colon, value = line.partition(b":")
        fields.append(
            (name.strip().decode("ascii", "replace").lower(), value, [index])
        )
    return fields


def _text(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"the {name.title()} header is not valid UTF-8") from None


def remove_headers(message: bytes, names: Iterable[str | bytes]) -> bytes:
    """*message* without the header fields called *names* (any case), and
    their continuation lines; every other byte is kept as it was.  A message
    without a blank line after its headers is returned unchanged."""
    wanted = {
        (n.decode("ascii") if isinstance(n, bytes) else n).lower() for n in names
    }
    found = _header_lines(message)
    if found is None:
        return message
    lines, blank = found
    dropped = {
        index
        for name, _value, indexes in _fields(message)
        if name in wanted
        for index in indexes
    }
    if not dropped:
        return message
    kept = []
    for index, (start, _stop) in enumerate(lines):
        if index not in dropped:
            end = lines[index + 1][0] if index + 1 < len(lines) else blank
            kept.append(message[start:end])
    return b"".join(kept) + message[blank:]


def _harmless(defect: email.errors.MessageDefect) -> bool:
    return isinstance(defect, _HARMLESS_DEFECTS) or str(defect) == _NO_DOMAIN


def _tokens(token: Any) -> Iterator[Any]:
    """*token* of a header's parse tree and every token inside it."""
    yield token
    if isinstance(token, list):
        for part in token:
            yield from _tokens(part)


def _encoded_addr_spec(tree: Any) -> str | None:
    """The text of the first addr-spec of the parse *tree* of an address
    header that holds an RFC 2047 encoded word; None if there is none."""
    for token in _tokens(tree):
        if getattr(token, "token_type", None) == "addr-spec" and any(
            getattr(part, "token_type", None) == "encoded-word"
            for part in _tokens(token)
        ):
            return str(token).strip()
    return None


def _addresses(name: str, values: Sequence[str]) -> list[str]:
    """The addr-specs named by the header fields *name* with *values*."""
    found = []
    for value in values:
        try:
            header = email.policy.default.header_factory(name, value)
        except Exception:  # the email package fails so on some input
            raise ValueError(
                f"cannot tell the addresses of the {name.title()} header"
                f" {value!r}: it is not a list of valid addresses"
            ) from None
        bad = [d for d in header.defects if not _harmless(d)]
        if bad:
            raise ValueError(
                f"cannot tell the addresses of the {name.title()} header {value!r}:"
                f" {bad[0]}"
            )
        # The email package decodes encoded words wherever it finds them;
        # in an addr-spec they are not allowed (RFC 2047 section 5), and a
        # mail client shows them as they are, not as the address decoded.
        encoded = _encoded_addr_spec(header._parse_tree)
        if encoded is not None:
            raise ValueError(
                f"the {name.title()} header {value!r} has an RFC 2047 encoded"
                f" word inside an address (decoded: {encoded!r}), where it is"
                " not allowed: mail clients show it as it is, so it must not"
                " be sent to the address it decodes to"
            )
        found.extend(address.addr_spec for address in header.addresses)
    return found


def _unique(addresses: Iterable[str]) -> tuple[str, ...]:
    """*addresses* without repeats (domains compare without case)."""
    seen = set()
    unique = []
    for address in addresses:
        local, _at, domain = address.rpartition("@")
        key = (local, domain.lower())
        if key not in seen:
            seen.add(key)
            unique.append(address)
    return tuple(unique)


_Field = tuple[str, bytes, list[int]]


def _newest_resent_block(fields: list[_Field]) -> list[_Field]:
    block: list[_Field] = []
    names: set[str] = set()
    for field in fields:
        name = field[0]
        if not name.startswith("resent-"):
            if block:
                break
            continue
        if name in names:
            break
        names.add(name)
        block.append(field)
    return block


def envelope_from_headers(
    message: bytes | str | email.message.Message,
    fromaddr: str | None = None,
    toaddrs: Iterable[str] | None = None,
) -> tuple[str | None, Iterable[str]]:
    """The envelope sender and recipients named by the headers of
    *message*, as ``(fromaddr, toaddrs)``.

    A *fromaddr* or *toaddrs* given is returned as it is, and the headers
    it would come from are not looked at.  Otherwise the sender is ``None``
    and the recipients an empty tuple when the headers name none.  Raises
    :class:`ValueError` when a header needed is malformed, and when the
    sender's header names more than one address.
    """
    if fromaddr is not None and toaddrs is not None:
        return fromaddr, toaddrs
    fields = _fields(message_to_bytes(message))
    prefix = ""
    block = _newest_resent_block(fields)
    if block:
        fields, prefix = block, "resent-"

    def addresses(name: str) -> list[str]:
        name = prefix + name
        return _addresses(name, [_text(n, v) for n, v, _i in fields if n == name])

    if fromaddr is None:
        for name in ("sender", "from"):
            if any(n == prefix + name for n, _v, _i in fields):
                senders = addresses(name)
                if len(senders) != 1:
                    hint = (f"add a {prefix.title()}Sender header, or "
                            if name == "from" else "")
                    raise ValueError(
                        f"the {(prefix + name).title()} header names {len(senders)}"
                        f" addresses, and the sender must be one ({hint}give"
                        " fromaddr)"
                    )
                fromaddr = senders[0]
                break
    if toaddrs is None:
        toaddrs = _unique(a for name in _RECIPIENT_FIELDS for a in addresses(name))
    return fromaddr, toaddrs


def prepare_send_message(
    message: bytes | str | email.message.Message,
    fromaddr: str | None = None,
    toaddrs: Iterable[str] | None = None,
) -> tuple[str, Iterable[str], bytes]:
    """What ``send_message()`` hands to ``send()``: ``(fromaddr, toaddrs,
    message)``, the envelope completed by :func:`envelope_from_headers` and
    the message as bytes without its :data:`HIDDEN_HEADERS`.

    Raises :class:`ValueError` when the headers name no sender or no
    recipient, besides the reasons of :func:`envelope_from_headers`.
    """
    data = message_to_bytes(message)
    fromaddr, toaddrs = envelope_from_headers(data, fromaddr, toaddrs)
    if fromaddr is None:
        raise ValueError(
            "no sender: the message has no Sender or From header (or"
            " Resent-Sender or Resent-From in its newest Resent- block); add"
            " one or give fromaddr"
        )
    if not toaddrs:
        raise ValueError(
            "no recipient: the message has no address in To, Cc or Bcc (or"
            " Resent-To, Resent-Cc or Resent-Bcc in its newest Resent- block);"
            " add one or give toaddrs"
        )
    return fromaddr, toaddrs, remove_headers(data, HIDDEN_HEADERS)
