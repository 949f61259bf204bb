"""``send``: queue one message, through a real transaction.

The message is either read whole from standard input (an RFC 5322 message,
headers and body), or built from ``--subject`` and ``--body`` (or a body
read from standard input).  Either way it is queued by ``send_message()``,
with its checks: the envelope comes from ``--from`` and ``--to``; without
them, from the headers (:mod:`mailoutbox.headers`): the ``Sender`` or
``From`` header, and the ``To``, ``Cc`` and ``Bcc`` headers (or the newest
``Resent-`` block).  The ``Bcc`` headers are always removed from the
message, also when ``--to`` names the recipients.  ``--relay NAME`` queues
the message for the relay NAME.  ``--not-before WHEN`` keeps it back until
WHEN (:func:`parse_when`), ``--priority P`` gives its priority
(:func:`mailoutbox.schedule.check_priority`).  Bad input ends the command
with one line on standard error and exit status 2.
"""
from __future__ import annotations

import argparse
import datetime
import email.policy
import re
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from mailoutbox.address import check_recipients
from mailoutbox.address import check_sender
from mailoutbox.cli.common import add_common_arguments
from mailoutbox.cli.common import add_queue_argument
from mailoutbox.cli.common import queue_path
from mailoutbox.cli.console import Console
from mailoutbox.cli.errors import EXIT_OK
from mailoutbox.cli.errors import CLIError
from mailoutbox.schedule import check_priority

__all__ = ["add_parser", "build_message", "parse_priority", "parse_when", "send",
           "split_addresses"]

_RELATIVE = re.compile(r"\+([0-9]{1,9})([smhd])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "send",
        help="queue one message (from standard input, or built from options)",
        description="Queue one message in a transaction and print its"
        " Message-Id.  Give a whole message on standard input, or --subject"
        " and --body (without --body, the body is read from standard input)."
        "  Without --from and --to, the envelope is taken from the Sender or"
        " From, To, Cc and Bcc headers (or the newest Resent- block).  The"
        " Bcc headers are always removed.",
    )
    add_queue_argument(parser)
    parser.add_argument(
        "--from", dest="fromaddr", metavar="ADDRESS",
        help="the sender (default: the Sender or From header)",
    )
    parser.add_argument(
        "--to", dest="toaddrs", metavar="ADDRESS", action="append",
        help="a recipient; repeat for more (default: the To, Cc and Bcc"
        " headers)",
    )
    parser.add_argument(
        "--relay", metavar="NAME",
        help="queue the message for the relay NAME, whose SMTP server 'run'"
        " takes from its [mailoutbox:relay NAME] section",
    )
    parser.add_argument(
        "--not-before", metavar="WHEN", type=parse_when,
        help="do not send it before WHEN: a date and time in ISO 8601"
        " (2026-12-24T18:00, local time without an offset; or with one,"
        " 2026-12-24T18:00+01:00, ...Z), or a delay from now: +30s, +10m,"
        " +2h, +1d",
    )
    parser.add_argument(
        "--priority", metavar="P", type=parse_priority,
        help="low, normal (the default), high, or a number from -100 to 100;"
        " higher is sent first",
    )
    parser.add_argument("--subject", help="build the message, with this subject")
    parser.add_argument(
        "--body", help="build the message, with this text as its body"
    )
    add_common_arguments(parser)
    parser.set_defaults(func=send)


def parse_when(text: str, now: Callable[[], float] = time.time) -> float:
    """The time ``--not-before`` names, in seconds since the epoch: ``+N``
    followed by ``s``, ``m``, ``h`` or ``d`` is that long from now;
    anything else is read as ISO 8601 (:meth:`datetime.datetime.fromisoformat`),
    in local time when it has no offset.  :class:`argparse.ArgumentTypeError`
    says why not."""
    found = _RELATIVE.match(text.strip())
    if found is not None:
        return now() + int(found.group(1)) * _UNITS[found.group(2)]
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (give an ISO 8601 date and time, e.g."
            " 2026-12-24T18:00 or 2026-12-24T18:00+01:00, or a delay: +30s,"
            " +10m, +2h, +1d)") from None
    if when.tzinfo is None:
        when = when.astimezone()  # local time
    return when.timestamp()


def parse_priority(text: str) -> int:
    """The priority ``--priority`` names (a name or a number)."""
    value: str | int = text.strip()
    if re.fullmatch(r"[+-]?[0-9]+", str(value)):
        value = int(value)
    try:
        return check_priority(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def split_addresses(values: list[str]) -> list[str]:
    """The recipients of the ``--to`` options: ``--to 'a@example.org,
    b@example.org'`` is two.  Each value is split at the commas outside
    quoted strings and angle brackets; nothing else is changed, so that
    ``send_message()`` checks each address as it was given (a CR or LF
    stays in it, and is refused)."""
    found: list[str] = []
    for value in values:
        parts = []
        start = depth = 0
        quoted = escaped = False
        for index, char in enumerate(value):
            if escaped:
                escaped = False
            elif quoted:
                escaped = char == "\\"
                quoted = char != '"'
            elif char == '"':
                quoted = True
            elif char in "<>":
                depth += 1 if char == "<" else -1
            elif char == "," and depth == 0:
                parts.append(value[start:index])
                start = index + 1
        parts.append(value[start:])
        found.extend([part.strip(" \t") for part in parts if part.strip(" \t")]
                     or [value])
    return found


def build_message(fromaddr: str, toaddrs: list[str], subject: str,
                  body: str) -> bytes:
    """A text message from its parts; *fromaddr* and *toaddrs* must have
    been checked (:func:`mailoutbox.address.check_sender`,
    :func:`~mailoutbox.address.check_recipients`).

    Non-ASCII addresses are written as UTF-8 (they need a server that
    offers SMTPUTF8 anyway): the RFC 2047 encoded words that the email
    package would put into them are not allowed in an address.
    """
    ascii_only = all(a.isascii() for a in (fromaddr, *toaddrs))
    message = EmailMessage(
        policy=email.policy.SMTP if ascii_only else email.policy.SMTPUTF8)
    try:
        message["From"] = fromaddr
        message["To"] = ", ".join(toaddrs)
        message["Subject"] = subject
        message["Date"] = formatdate(localtime=True)
        message.set_content(body)
        return message.as_bytes()
    except Exception as exc:  # the email package fails in many ways
        raise CLIError(f"invalid header: {exc}") from None


def _read_stdin(console: Console, what: str) -> bytes:
    if console.stdin.isatty():
        console.note(f"reading {what} from standard input; end it with Ctrl-D")
    return console.stdin.read()


def send(args: argparse.Namespace, console: Console) -> int:
    path = queue_path(args, console)
    fromaddr = args.fromaddr or None
    toaddrs = split_addresses(args.toaddrs or []) or None
    if args.subject is not None or args.body is not None:
        if not fromaddr or not toaddrs:
            raise CLIError("to build a message, give --from and --to")
        try:
            fromaddr = check_sender(fromaddr)
            toaddrs = list(check_recipients(toaddrs))
        except ValueError as exc:
            raise CLIError(f"cannot queue the message: {exc}") from None
        body = args.body
        if body is None:
            body = _read_stdin(console, "the body").decode("utf-8", "replace")
        message = build_message(fromaddr, toaddrs, args.subject or "", body)
    else:
        message = _read_stdin(console, "the message")
        if not message.strip():
            raise CLIError("no message on standard input")
    message_id = queue_message(path, fromaddr, toaddrs, message, args.relay,
                               not_before=args.not_before,
                               priority=args.priority)
    console.out(message_id)
    return EXIT_OK


def queue_message(path: str, fromaddr: str | None, toaddrs: list[str] | None,
                  message: bytes, relay: str | None = None, *,
                  not_before: float | None = None,
                  priority: int | None = None) -> str:
    """Queue *message* in the queue at *path* in a transaction of its own,
    for *relay* if given, not to be sent before *not_before* (seconds since
    the epoch), with *priority*; return its Message-Id.

    The message is queued by ``send_message()``, with its checks: the
    envelope is *fromaddr* and *toaddrs*, or (where they are None) what
    the headers name, and the ``Bcc`` headers are removed.
    """
    import transaction

    from mailoutbox.delivery import QueuedMailDelivery

    manager = transaction.TransactionManager()
    try:
        delivery = QueuedMailDelivery(
            path, transaction_manager=manager,
            mailers=None if relay is None else [relay])
        manager.begin()
        message_id = delivery.send_message(message, fromaddr, toaddrs,
                                           mailer=relay, not_before=not_before,
                                           priority=priority)
    except (ValueError, TypeError) as exc:
        manager.abort()
        # The arguments of send_message() are options here.
        text = str(exc).replace("give fromaddr", "give --from").replace(
            "give toaddrs", "give --to")
        raise CLIError(f"cannot queue the message: {text}") from None
    manager.commit()
    return str(message_id)
