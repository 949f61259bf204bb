"""``send``: queue one message, through a real transaction.

The message is either read whole from standard input (an RFC 5322 message,
headers and body), or built from ``--subject`` and ``--body`` (or a body
read from standard input).  Either way it is queued by ``send_message()``,
with its checks: the envelope comes from ``--from`` and ``--to``; without
them, from the headers (:mod:`mailoutbox.headers`): the ``Sender`` or
``From`` header, and the ``To``, ``Cc`` and ``Bcc`` headers (or the newest
``Resent-`` block).  The ``Bcc`` headers are always removed from the
message, also when ``--to`` names the recipients.  ``--relay NAME`` queues
the message for the relay NAME.  Bad input ends the command with one line
on standard error and exit status 2.
"""
from __future__ import annotations

import argparse
import email.policy
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

__all__ = ["add_parser", "build_message", "send", "split_addresses"]


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
    parser.add_argument("--subject", help="build the message, with this subject")
    parser.add_argument(
        "--body", help="build the message, with this text as its body"
    )
    add_common_arguments(parser)
    parser.set_defaults(func=send)


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
    message_id = queue_message(path, fromaddr, toaddrs, message, args.relay)
    console.out(message_id)
    return EXIT_OK


def queue_message(path: str, fromaddr: str | None, toaddrs: list[str] | None,
                  message: bytes, relay: str | None = None) -> str:
    """Queue *message* in the queue at *path* in a transaction of its own,
    for *relay* if given; return its Message-Id.

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
                                           mailer=relay)
    except (ValueError, TypeError) as exc:
        manager.abort()
        # The arguments of send_message() are options here.
        text = str(exc).replace("give fromaddr", "give --from").replace(
            "give toaddrs", "give --to")
        raise CLIError(f"cannot queue the message: {text}") from None
    manager.commit()
    return str(message_id)
