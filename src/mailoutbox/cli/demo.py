"""``demo``: mailoutbox at work, with no configuration.

A temporary queue, an SMTP server on 127.0.0.1 (:mod:`mailoutbox.testing.smtpd`,
which needs aiosmtpd), three messages queued in one committed transaction,
one in an aborted transaction, and the processor sending the queue while
the events it notifies are printed.  The server refuses one address, to
show a partial refusal and a permanent failure.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
from email.message import EmailMessage
from typing import Any

from mailoutbox.cli.console import Console
from mailoutbox.cli.errors import EXIT_ERROR
from mailoutbox.cli.errors import EXIT_OK
from mailoutbox.cli.errors import CLIError
from mailoutbox.cli.view import QueueView
from mailoutbox.cli.view import clean

__all__ = ["Demo", "add_parser", "demo"]

SENDER = "shop@example.org"
REFUSED = "nobody@example.net"
MESSAGES = [
    ("order-1", ["Alice <alice@example.org>"], "Your order has shipped"),
    ("report-2", ["bob@example.org", REFUSED], "Weekly report"),
    ("hello-3", [REFUSED], "Hello, is anybody there?"),
]
INSTALL_HINT = "pip install aiosmtpd  (or: pip install 'mailoutbox[server]')"


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "demo",
        help="show mailoutbox at work, with no configuration",
        description="Queue messages in transactions in a temporary queue,"
        " send them to an SMTP server started on 127.0.0.1, and print the"
        " events and what the server received.  Needs aiosmtpd ("
        + INSTALL_HINT + ").",
    )
    parser.add_argument(
        "--keep", action="store_true",
        help="keep the temporary queue, to look at it with list and show",
    )
    parser.set_defaults(func=demo, verbose=0, quiet=0)


def _message(name: str, toaddrs: list[str], subject: str) -> bytes:
    message = EmailMessage()
    message["Message-Id"] = f"<{name}@shop.example.org>"
    message["From"] = f"The Shop <{SENDER}>"
    message["To"] = ", ".join(toaddrs)
    message["Subject"] = subject
    message.set_content(f"{subject}.\n\n-- \nThe Shop\n")
    return message.as_bytes()


class Demo:
    """The demo's steps, each printing what it shows."""

    def __init__(self, console: Console, directory: str) -> None:
        self.console = console
        self.queue = f"{directory}/queue"
        self._lock = threading.Lock()

    def out(self, text: str = "") -> None:
        with self._lock:
            self.console.out(text)

    def queue_three(self, manager: Any, delivery: Any) -> list[str]:
        self.out("1. Three messages queued in one transaction, which commits:")
        manager.begin()
        ids = [
            delivery.send(SENDER, toaddrs, _message(name, toaddrs, subject))
            for name, toaddrs, subject in MESSAGES
        ]
        manager.commit()
        for message_id, (_name, toaddrs, _s) in zip(ids, MESSAGES, strict=True):
            self.out(f"   queued <{message_id}> for {', '.join(toaddrs)}")
        self.show_queue()
        return ids

    def show_queue(self) -> None:
        view = QueueView(self.queue)
        counts = view.counts()
        self.out(
            "   The queue holds: "
            + ", ".join(f"{counts[state]} {state}" for state in counts
                        if counts[state] or state != "scheduled")
        )

    def abort_one(self, manager: Any, delivery: Any) -> None:
        self.out()
        self.out("2. A message sent in a transaction that aborts:")
        manager.begin()
        message_id = delivery.send(
            SENDER, ["carol@example.org"],
            _message("never-4", ["carol@example.org"], "Never sent"),
        )
        manager.abort()
        self.out(f"   send() returned <{message_id}>, then the transaction"
                 " aborted; nothing was queued:")
        self.show_queue()

    def on_event(self, event: Any) -> None:
        from mailoutbox.interfaces import IMailErrorEvent
        from mailoutbox.interfaces import IMailSentEvent

        if IMailSentEvent.providedBy(event):
            line = f"   {'sent':<8} <{event.messageId}>"
            if event.refused:
                line += "; refused: " + ", ".join(
                    f"{addr} ({code} {text})"
                    for addr, (code, text) in event.refused.items()
                )
        elif IMailErrorEvent.providedBy(event):
            kind = "failed" if event.permanent else "deferred"
            line = f"   {kind:<8} <{event.messageId}>: {event.errorMessage}"
        else:  # pragma: no cover - other subscribers' events
            return
        self.out(clean(line))

    def process(self, port: int) -> Any:
        import zope.event

        from mailoutbox.mailer import SMTPMailer
        from mailoutbox.queue import QueueProcessorThread

        self.out()
        self.out("3. The queue processor sends the queue; the events it"
                 " notifies:")
        processor = QueueProcessorThread(concurrency=1)
        processor.setMailer(SMTPMailer("127.0.0.1", port, timeout=10))
        processor.setQueuePath(self.queue)
        zope.event.subscribers.append(self.on_event)
        try:
            stats = processor.process_queue()
        finally:
            zope.event.subscribers.remove(self.on_event)
            processor.stop()
        self.out(f"   sent {stats.sent}, deferred {stats.deferred}, failed"
                 f" {stats.failed}")
        self.show_queue()
        return stats

    def received(self, server: Any) -> None:
        self.out()
        self.out(f"4. What the SMTP server on 127.0.0.1:{server.port} received:")
        for message in server.messages:
            self.out(clean(
                f"   from {message.mail_from} to {', '.join(message.rcpt_tos)}:"
                f" {message.message['Subject']!r} <{message.message_id}>"
            ))


def demo(args: argparse.Namespace, console: Console) -> int:
    try:
        import aiosmtpd  # noqa: F401
    except ImportError:
        raise CLIError(
            f"the demo needs aiosmtpd, which is not installed: {INSTALL_HINT}",
            EXIT_ERROR,
        ) from None
    import transaction

    from mailoutbox.delivery import QueuedMailDelivery
    from mailoutbox.testing.smtpd import SMTPServer

    directory = tempfile.mkdtemp(prefix="mailoutbox-demo-")
    try:
        with SMTPServer() as server:
            server.refuse(REFUSED)
            show = Demo(console, directory)
            show.out(f"A queue in {show.queue}; an SMTP server on 127.0.0.1:"
                     f"{server.port}, which refuses {REFUSED}.")
            show.out()
            manager = transaction.TransactionManager()
            delivery = QueuedMailDelivery(show.queue, transaction_manager=manager)
            show.queue_three(manager, delivery)
            show.abort_one(manager, delivery)
            show.process(server.port)
            show.received(server)
        if args.keep:
            console.out()
            console.out(f"The queue is kept: mailoutbox list --all {show.queue}")
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    return EXIT_OK
