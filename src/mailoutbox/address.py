"""Checking and formatting the addresses given to ``send()``.

An address is a bare addr-spec (``jane@example.org``) or an addr-spec with a
display name (``Jane Doe <jane@example.org>``, ``"Doe, Jane"
<jane@example.org>``).  The addr-spec is ``local-part@domain``: the local part
is a dot-atom or a quoted string, the domain a host name (``example.org``,
also internationalised: ``exämple.org``) or an address literal
(``[192.0.2.1]``).  UTF-8 is allowed in the local part; sending such an
address needs a server that offers SMTPUTF8, which is the mailer's business.
A bare dot-atom local part (``root``) is a local recipient or sender, as
``sendmail`` and zope.sendmail take it: the local MTA adds its own domain.
Comments (``(...)``), groups and lists of several addresses are refused.
Folding white space (a line break followed by a space or tab) is unfolded;
any other CR or LF, and NUL, is refused.

These functions are also importable from :mod:`mailoutbox.message`.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "check_recipients",
    "check_sender",
    "format_address",
    "parse_address",
]

#: Characters of an atom besides ASCII letters and digits (RFC 5322 atext).
_ATEXT = frozenset("!#$%&'*+-/=?^_`{|}~")
#: Characters that must be quoted in a display name.
_SPECIALS = frozenset('()<>[]:;@\\,."')
_FORBIDDEN = ("\r", "\n", "\0")
#: Folding white space (RFC 5322 section 2.2.3): a line break followed by
#: a space or tab; unfolding removes the line break.
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_LABEL_TEXT = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: Control characters but TAB (which is white space in a quoted string).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_LABEL = re.compile(_LABEL_TEXT + r"\Z")
#: The common case, checked without the parser: an ASCII dot-atom at a host
#: name (the parser accepts exactly these too).
_SIMPLE = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    rf"@{_LABEL_TEXT}(?:\.{_LABEL_TEXT})*\Z"
)


class _Invalid(ValueError):
    """The reason an address is not valid (completed by the caller)."""


def _is_atext(char: str) -> bool:
    if char.isascii():
        return char.isalnum() or char in _ATEXT
    return char.isprintable() and not char.isspace()


def _end_of_quoted(text: str, start: int) -> int:
    """The index after the quoted string starting at *text[start]* (``"``)."""
    i = start + 1
    while i < len(text):
        char = text[i]
        if char == "\\":
            if i + 1 == len(text):
                break
            i += 2
            continue
        if char == '"':
            return i + 1
        i += 1
    raise _Invalid("a quoted string is not closed")


def _check_local_part(local: str) -> None:
    if not local:
        raise _Invalid("the local part (before '@') is empty")
    if local.startswith('"'):  # a whole quoted string (see _parse_addr_spec)
        for char in local[1:-1]:
            if not (char == " " or char.isprintable()):
                raise _Invalid(f"the local part contains {char!r}")
        return
    for atom in local.split("."):
        if not atom:
            raise _Invalid(
                "the local part has an empty part (a leading, trailing or"
                " doubled '.')"
            )
        for char in atom:
            if not _is_atext(char):
                raise _Invalid(
                    f"the local part contains {char!r} (quote the local part"
                    " to use it)"
                )


def _check_domain(domain: str) -> None:
    if not domain:
        raise _Invalid("the domain (after '@') is empty")
    if domain.startswith("["):
        inside = domain[1:-1] if domain.endswith("]") else ""
        if not inside or any(
            c in "[]\\" or not ("!" <= c <= "~") for c in inside
        ):
            raise _Invalid("the domain literal is malformed")
        return
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise _Invalid(f"the domain is not a valid IDNA name ({exc})") from None
    if len(domain) > 253:
        raise _Invalid("the domain is longer than 253 characters")
    for label in domain.split("."):
        if not _LABEL.match(label):
            raise _Invalid(
                f"the domain label {label!r} is not a host name label (letters,"
                " digits and inner hyphens, 1 to 63 characters)"
            )


def _parse_addr_spec(addr: str) -> str:
    if addr.startswith('"'):
        at = _end_of_quoted(addr, 0)
        if addr[at:at + 1] != "@":
            raise _Invalid(
                "no '@' follows the quoted local part (a local part without"
                " a domain must be a dot-atom, like root)"
            )
    else:
        at = addr.rfind("@")
        if at < 0:
            # A local recipient (root): the local MTA adds its own domain.
            _check_local_part(addr)
            return addr
    _check_local_part(addr[:at])
    _check_domain(addr[at + 1:])
    return addr


def _parse_display_name(text: str) -> str:
    """Unquote a display name; runs of blanks outside quotes become one
    space."""
    words: list[str] = []
    blank = False
    i = 0
    while i < len(text):
        char = text[i]
        if char in " \t":
            blank = True
            i += 1
            continue
        if blank and words:
            words.append(" ")
        blank = False
        if char == '"':
            end = _end_of_quoted(text, i)
            control = _CONTROL.search(text, i, end)
            if control:
                raise _Invalid(f"the display name contains {control.group()!r}")
            words.append(re.sub(r"\\(.)", r"\1", text[i + 1:end - 1]))
            i = end
            continue
        if char in _SPECIALS and char != ".":
            raise _Invalid(
                f"the display name contains {char!r}; put the display name in"
                ' double quotes ("...") to use it'
            )
        if not char.isprintable():
            raise _Invalid(f"the display name contains {char!r}")
        words.append(char)
        i += 1
    return "".join(words)


def _split(address: str) -> tuple[str, str]:
    text = address.strip(" \t")
    if not text:
        raise _Invalid("it is empty")
    opening = closing = None
    i = 0
    while i < len(text):
        char = text[i]
        if char == '"':
            i = _end_of_quoted(text, i)
            continue
        if char == ",":
            raise _Invalid(
                "it has a ',' outside quotes, so it is more than one address"
                ' (pass a list of addresses; quote a display name with a comma:'
                ' "Doe, Jane" <jane@example.org>)'
            )
        if char == "<":
            if opening is not None:
                raise _Invalid("it has more than one '<'")
            opening = i
        elif char == ">":
            if opening is None or closing is not None:
                raise _Invalid("it has a '>' without a '<'")
            closing = i
        elif char in " \t" and opening is None and text.find("<", i) < 0:
            raise _Invalid(
                "it has a space outside quotes and no <...> around the address"
            )
        i += 1
    if opening is None:
        return "", _parse_addr_spec(text)
    if closing != len(text) - 1:
        raise _Invalid("text follows the '<...>' part, or '>' is missing")
    name = _parse_display_name(text[:opening])
    return name, _parse_addr_spec(text[opening + 1:closing].strip(" \t"))


def _unfold(address: str) -> str:
    """*address* with its folding white space unfolded (a CRLF or LF
    followed by a space or tab is removed, the blank kept); raises
    :class:`ValueError` when a CR, LF or NUL is left."""
    unfolded = _FOLD.sub("", address) if "\n" in address else address
    for char in _FORBIDDEN:
        if char in unfolded:
            raise ValueError(
                f"invalid address {address!r}: it contains {char!r}"
                " (CR, LF and NUL are not allowed, except a line break"
                " followed by a space or tab: folding white space)"
            )
    return unfolded


def parse_address(address: str) -> tuple[str, str]:
    """Split one address into ``(display name, addr-spec)``.

    Folding white space is unfolded first: a line break (CRLF or LF)
    followed by a space or tab is removed, so a header value folded by
    :meth:`email.message.Message.as_string` is taken; any other CR or LF,
    and any NUL, is refused.  An addr-spec without ``@`` is a local
    recipient (``root``), which the local MTA qualifies with its own
    domain; its local part must then be a dot-atom.

    The display name is unquoted (``""`` when there is none).  Raises
    :class:`TypeError` when *address* is not a ``str`` and
    :class:`ValueError`, naming the address and the reason, when it is not
    one valid address.
    """
    if not isinstance(address, str):
        raise TypeError(
            f"invalid address {address!r}: an address must be a str, not"
            f" {type(address).__name__}"
        )
    text = _unfold(address)
    if _SIMPLE.match(text) and len(text) - text.index("@") <= 254:
        return "", text
    try:
        return _split(text)
    except _Invalid as exc:
        raise ValueError(f"invalid address {address!r}: {exc}") from None


def format_address(name: str, addr_spec: str) -> str:
    """Join a display name and an addr-spec into one address, quoting the
    name when it needs quotes (and always when it contains a comma)."""
    if not name:
        return addr_spec
    if (
        any(char in _SPECIALS or not char.isprintable() for char in name)
        or name.strip(" ") != name
        or "  " in name
    ):
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        name = f'"{escaped}"'
    return f"{name} <{addr_spec}>"


def check_recipients(toaddrs: Iterable[str]) -> tuple[str, ...]:
    """Check the envelope recipients given to ``send()``; return them as a
    tuple.

    *toaddrs* must be a sequence of one or more addresses (not a single
    string) and each must be valid (see :func:`parse_address`).  They are
    returned unfolded, as they are passed to the mailer and written to the
    queue.
    """
    if isinstance(toaddrs, (str, bytes, bytearray)):
        raise TypeError(
            f"toaddrs must be a sequence of addresses, not a single"
            f" {type(toaddrs).__name__}: {toaddrs!r} (write [{toaddrs!r}])"
        )
    try:
        addresses = tuple(toaddrs)
    except TypeError:
        raise TypeError(
            f"toaddrs must be a sequence of addresses, not {toaddrs!r}"
        ) from None
    if not addresses:
        raise ValueError("toaddrs is empty: a message needs a recipient")
    for address in addresses:
        parse_address(address)
    return tuple(_unfold(address) for address in addresses)


def check_sender(fromaddr: str) -> str:
    """Check the envelope sender given to ``send()``.

    It must be a ``str``: empty or ``<>`` for the null reverse-path, or
    one valid address (see :func:`parse_address`), so that nothing but its
    addr-spec can reach the envelope.  It is returned unfolded, as it is
    passed to the mailer and written to the queue.
    """
    if not isinstance(fromaddr, str):
        raise TypeError(
            f"invalid sender {fromaddr!r}: fromaddr must be a str, not"
            f" {type(fromaddr).__name__}"
        )
    try:
        unfolded = _unfold(fromaddr)
        if unfolded.strip(" \t") not in ("", "<>"):
            parse_address(unfolded)
    except ValueError as exc:
        text = str(exc).replace("invalid address", "invalid sender", 1)
        raise ValueError(text) from None
    return unfolded
