"""``move``: move the waiting messages of one queue into another.

For migrating a running system from one store to another (a Maildir
folder and a PostgreSQL queue, either way, or two of a kind).  Each
queued or deferred message of the source (and of its relays) is claimed,
so that no processor sends it meanwhile, queued in the destination by a
transaction of its own (for the same relay, with the same Message-Id and
bytes), and only then removed from the source.  An interrupted move
is resumed by running it again: a message already in the destination
(same envelope and bytes) is not queued twice, only removed from the
source.  Messages being sent are left where they are (run the command
again once they are done); failed messages stay in the source's failed
area.  A moved message starts afresh in the destination: due at once,
its attempts forgotten (a message scheduled for later and never tried
keeps its time, and every message its priority).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
from typing import Any

import transaction

from mailoutbox.cli.common import add_common_arguments
from mailoutbox.cli.console import Console
from mailoutbox.cli.errors import EXIT_NOT_SENT
from mailoutbox.cli.errors import EXIT_OK
from mailoutbox.cli.errors import CLIError
from mailoutbox.cli.view import WAITING
from mailoutbox.cli.view import QueueView
from mailoutbox.cli.view import clean
from mailoutbox.cli.view import open_queue
from mailoutbox.envelope import parse_queue_file
from mailoutbox.maildir import DEFAULT_LEASE
from mailoutbox.message import prepare_message
from mailoutbox.stores import is_url

__all__ = ["add_parser", "move"]

#: Seconds the source keeps a message claimed while it is moved (a claim
#: that an interrupted move left is broken when it is this old).
LEASE = DEFAULT_LEASE


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "move",
        help="move the waiting messages of one queue into another",
        description="Move every queued and deferred message of SOURCE (and"
        " of its relays) into DEST, each in a transaction of its own and"
        " removed from SOURCE only once DEST has it.  Run it again to resume"
        " an interrupted move: nothing is lost or queued twice.  Messages"
        " being sent are left (exit status 1: run it again); failed"
        " messages stay in SOURCE.  Either queue may be a folder or a"
        " postgresql:// URL.",
    )
    parser.add_argument("source", metavar="SOURCE", help="the queue to empty")
    parser.add_argument("dest", metavar="DEST",
                        help="the queue to fill (a folder is created if needed)")
    parser.add_argument("--dry-run", action="store_true",
                        help="say what would be moved, and move nothing")
    add_common_arguments(parser)
    parser.set_defaults(func=move)


def _key(fromaddr: str, toaddrs: tuple[str, ...], message: bytes) -> str:
    digest = hashlib.sha256()
    for part in (fromaddr.encode("utf-8"), "\n".join(toaddrs).encode("utf-8"),
                 message):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _present(dest: str) -> set[str]:
    """The keys of the messages already in the queue at *dest* (none if
    there is no queue there yet)."""
    try:
        view = QueueView(dest)
    except CLIError:
        if is_url(dest):
            raise
        return set()
    keys = set()
    for info in view.messages:
        head = info.head
        if head.problem:
            continue
        fromaddr, toaddrs, message = parse_queue_file(
            info.maildir.read(info.entry))
        keys.add(_key(fromaddr, toaddrs, message))
    return keys


def move(args: argparse.Namespace, console: Console) -> int:
    from mailoutbox.delivery import QueuedMailDelivery

    if args.source == args.dest:
        raise CLIError("SOURCE and DEST are the same queue")
    source = QueueView(args.source)
    if open_queue(args.source).key == _dest_key(args.dest):
        raise CLIError("SOURCE and DEST are the same queue")
    waiting = source.select(WAITING)
    if args.dry_run:
        console.out(f"{len(waiting)} message(s) would be moved")
        return EXIT_OK
    present = _present(args.dest)
    delivery = QueuedMailDelivery(args.dest, mailers=set(source.relays),
                                  transaction_manager=transaction.TransactionManager())
    moved = left = 0
    for info in waiting:
        store = info.maildir
        claim = store.claim(info.entry, LEASE, exact=True)
        if claim is None:
            console.note(f"{clean(info.name)}: being sent now; left in"
                         f" {clean(source.location)}")
            left += 1
            continue
        try:
            fromaddr, toaddrs, message = parse_queue_file(claim.read())
            # A message without a Message-Id gets one made from its name,
            # so that a resumed move recognises it.
            made = _made_id(info.name)
            message, _id = prepare_message(message, functools.partial(str, made))
            key = _key(fromaddr, toaddrs, message)
            if key not in present:
                manager = delivery.transaction_manager
                with manager:
                    delivery.send(fromaddr, toaddrs, message, mailer=info.relay,
                                  not_before=info.scheduled_for,
                                  priority=info.priority)
                present.add(key)
        except BaseException:
            claim.release()
            raise
        claim.complete()
        moved += 1
        console.out(f"{clean(info.name)}: moved")
    console.out(f"{moved} message(s) moved to {clean(args.dest)}"
                + (f", {left} being sent left in place" if left else ""))
    return EXIT_NOT_SENT if left else EXIT_OK


def _dest_key(dest: str) -> str | None:
    try:
        return str(open_queue(dest).key)
    except CLIError:
        return None


def _made_id(name: str) -> str:
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()
    return f"moved.{digest[:32]}@mailoutbox.invalid"
