"""``send``: queue one message, through a real transaction.

The message is either read whole from standard input (an RFC 5322 message,
headers and body), or built from ``--subject`` and ``--body`` (or a body
read from standard input).  The envelope comes from ``--from`` and ``--to``;
without them, from the ``From`` (or ``Sender``) header and the ``To``,
``Cc`` and ``Bcc`` headers, as ``sendmail -t`` does: the ``Bcc`` header is
then removed from the message.
"""
from __future__ import annotations

import argparse
import email.parser
import email.policy
import re
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

__all__ = ["add_parser", "build_message", "envelope_from_headers", "send"]


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "send",
        help="queue one message (from standard input, or built from options)",
        description="Queue one message in a transaction and print its"
        " Message-Id.  Give a whole message on standard input, or --subject"
        " and --body (without --body, the body is read from standard input)."
        "  Without --from and --to, the envelope is taken from the From, To,"
        " Cc and Bcc headers, and the Bcc header is removed.",
    )
    add_queue_argument(parser)
    parser.add_argument(
        "--from", dest="fromaddr", metavar="ADDRESS",
        help="the sender (default: the From or Sender header)",
    )
    parser.add_argument(
        "--to", dest="toaddrs", metavar="ADDRESS", action="append",
        help="a recipient; repeat for more (default: the To, Cc and Bcc"
        " headers)",
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


_HEADER_END = re.compile(rb"\r?\n\r?\n")


def _drop_header(message: bytes, name: bytes) -> bytes:
    """*message* without the header field *name* (and its continuation
    lines); everything else is left byte for byte as it was."""
    end = _HEADER_END.search(message)
    if end is None:
        return message
    # The header block's last line ends where the separator starts.
    lines = message[: end.start()].splitlines(keepends=True)
    kept: list[bytes] = []
    dropping = False
    for line in lines:
        if line[:1] not in (b" ", b"\t"):
            dropping = line.split(b":", 1)[0].strip().lower() == name.lower()
        if not dropping:
            kept.append(line)
    head = b"".join(kept)
    for ending in (b"\r\n", b"\n"):
        if head.endswith(ending):
            head = head[: -len(ending)]
            break
    rest = message[end.start():]
    if not head:  # only the dropped field: an empty header block
        rest = rest[2:] if rest.startswith(b"\r\n") else rest[1:]
    return head + rest


def envelope_from_headers(message: bytes) -> tuple[str | None, list[str]]:
    """The sender and recipients named by the headers of *message*."""
    headers = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
        message, headersonly=True
    )
    senders = getaddresses(headers.get_all("From", []) or
                           headers.get_all("Sender", []))
    fromaddr = senders[0][1] if senders and senders[0][1] else None
    recipients = getaddresses(
        [str(v) for field in ("To", "Cc", "Bcc") for v in headers.get_all(field, [])]
    )
    return fromaddr, [addr for _name, addr in recipients if addr]


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
        header_from, header_to = envelope_from_headers(message)
        fromaddr = args.fromaddr or header_from
        if not toaddrs:
            toaddrs = header_to
            message = _drop_header(message, b"Bcc")
        if not fromaddr:
            raise CLIError("no sender: give --from, or a From header")
        if not toaddrs:
            raise CLIError("no recipient: give --to, or To, Cc or Bcc headers")
    message_id = queue_message(path, fromaddr, toaddrs, message)
    console.out(message_id)
    return EXIT_OK


def queue_message(path: str, fromaddr: str, toaddrs: list[str],
                  message: bytes) -> str:
    """Queue *message* in the queue at *path* in a transaction of its own;
    return its Message-Id."""
    import transaction

    from mailoutbox.delivery import QueuedMailDelivery

    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(path, transaction_manager=manager)
    manager.begin()
    try:
        message_id = delivery.send(fromaddr, toaddrs, message)
    except (ValueError, TypeError) as exc:
        manager.abort()
        raise CLIError(f"cannot queue the message: {exc}") from None
    manager.commit()
    return str(message_id)
