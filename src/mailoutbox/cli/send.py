"""``send``: queue one message, through a real transaction.

The message is either read whole from standard input (an RFC 5322 message,
headers and body), or built from ``--subject`` and ``--body`` (or a body
read from standard input).  The envelope comes from ``--from`` and ``--to``;
without them, from the headers, as ``send_message()`` takes it
(:mod:`mailoutbox.headers`): the ``Sender`` or ``From`` header, and the
``To``, ``Cc`` and ``Bcc`` headers (or the newest ``Resent-`` block).  The
``Bcc`` headers are then removed from the message.  ``--relay NAME``
queues the message for the relay NAME.
"""
from __future__ import annotations

import argparse
import email.policy
from email.message import EmailMessage
from email.utils import formatdate
from email.utils import getaddresses
from typing import Any

from mailoutbox.cli.common import add_common_arguments
from mailoutbox.cli.common import add_queue_argument
from mailoutbox.cli.common import queue_path
from mailoutbox.cli.console import Console
from mailoutbox.cli.errors import EXIT_OK
from mailoutbox.cli.errors import CLIError
from mailoutbox.headers import envelope_from_headers as _envelope
from mailoutbox.headers import remove_headers

__all__ = ["add_parser", "build_message", "envelope_from_headers", "send"]


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "send",
        help="queue one message (from standard input, or built from options)",
        description="Queue one message in a transaction and print its"
        " Message-Id.  Give a whole message on standard input, or --subject"
        " and --body (without --body, the body is read from standard input)."
        "  Without --from and --to, the envelope is taken from the Sender or"
        " From, To, Cc and Bcc headers (or the newest Resent- block), and the"
        " Bcc headers are removed.",
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


def _split_addresses(values: list[str]) -> list[str]:
    """``--to 'a@example.org, b@example.org'`` is two recipients."""
    found: list[str] = []
    for value in values:
        pairs = getaddresses([value])
        if len(pairs) <= 1:
            found.append(value.strip())
        else:
            found.extend(
                f"{name} <{addr}>" if name else addr for name, addr in pairs
            )
    return found


def build_message(fromaddr: str, toaddrs: list[str], subject: str,
                  body: str) -> bytes:
    """A text message from its parts."""
    message = EmailMessage(policy=email.policy.SMTP)
    try:
        message["From"] = fromaddr
        message["To"] = ", ".join(toaddrs)
        message["Subject"] = subject
    except (ValueError, IndexError) as exc:
        raise CLIError(f"invalid header: {exc}") from None
    message["Date"] = formatdate(localtime=True)
    message.set_content(body)
    return message.as_bytes()


def _drop_header(message: bytes, name: bytes) -> bytes:
    """*message* without the header field *name* (see
    :func:`mailoutbox.headers.remove_headers`)."""
    return remove_headers(message, (name,))


def envelope_from_headers(message: bytes) -> tuple[str | None, list[str]]:
    """The sender and recipients named by the headers of *message* (see
    :func:`mailoutbox.headers.envelope_from_headers`)."""
    fromaddr, toaddrs = _envelope(message)
    return fromaddr, list(toaddrs)


def _read_stdin(console: Console, what: str) -> bytes:
    if console.stdin.isatty():
        console.note(f"reading {what} from standard input; end it with Ctrl-D")
    return console.stdin.read()


def send(args: argparse.Namespace, console: Console) -> int:
    path = queue_path(args, console)
    toaddrs = _split_addresses(args.toaddrs or [])
    if args.subject is not None or args.body is not None:
        if not args.fromaddr or not toaddrs:
            raise CLIError("to build a message, give --from and --to")
        body = args.body
        if body is None:
            body = _read_stdin(console, "the body").decode("utf-8", "replace")
        message = build_message(args.fromaddr, toaddrs, args.subject or "", body)
        fromaddr = args.fromaddr
    else:
        message = _read_stdin(console, "the message")
        if not message.strip():
            raise CLIError("no message on standard input")
        try:
            fromaddr, header_to = _envelope(
                message, args.fromaddr or None, toaddrs or None)
        except ValueError as exc:
            raise CLIError(f"cannot queue the message: {exc}") from None
        if not fromaddr:
            raise CLIError("no sender: give --from, or a From (or Sender) header")
        if not toaddrs:
            if not header_to:
                raise CLIError("no recipient: give --to, or To, Cc or Bcc headers")
            message_id = queue_message(path, fromaddr, list(header_to), message,
                                       args.relay, from_headers=True)
            console.out(message_id)
            return EXIT_OK
    message_id = queue_message(path, fromaddr, toaddrs, message, args.relay)
    console.out(message_id)
    return EXIT_OK


def queue_message(path: str, fromaddr: str, toaddrs: list[str],
                  message: bytes, relay: str | None = None, *,
                  from_headers: bool = False) -> str:
    """Queue *message* in the queue at *path* in a transaction of its own,
    for *relay* if given; return its Message-Id.  With *from_headers* the
    recipients came from the headers, and the message is queued by
    ``send_message()``, which removes its Bcc headers."""
    import transaction

    from mailoutbox.delivery import QueuedMailDelivery

    manager = transaction.TransactionManager()
    try:
        delivery = QueuedMailDelivery(
            path, transaction_manager=manager,
            mailers=None if relay is None else [relay])
        manager.begin()
        if from_headers:
            message_id = delivery.send_message(message, fromaddr, toaddrs,
                                               mailer=relay)
        else:
            message_id = delivery.send(fromaddr, toaddrs, message, mailer=relay)
    except (ValueError, TypeError) as exc:
        manager.abort()
        raise CLIError(f"cannot queue the message: {exc}") from None
    manager.commit()
    return str(message_id)
