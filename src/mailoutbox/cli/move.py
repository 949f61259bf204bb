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

While a message is moved, its claim in the source is renewed every third
of its lease.  A move that is killed leaves the claim of the message it
was moving, which runs out after the lease (:data:`LEASE`, 10 seconds, in
a PostgreSQL queue, whose claims say when they end; 30 in a Maildir
folder, whose claims are broken when older than the processors' lease): a
resumed move leaves that message until then (exit status 1: run it
again).  A message
moved out of a PostgreSQL queue that keeps a sent log is deleted, not
logged as sent.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import threading
from collections.abc import Iterator
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
from mailoutbox.envelope import parse_queue_file
from mailoutbox.maildir import DEFAULT_LEASE
from mailoutbox.message import prepare_message
from mailoutbox.stores import is_url

__all__ = ["add_parser", "move"]

#: Seconds the lease of a PostgreSQL source's claim of a message lasts
#: while it is moved (renewed every third of it); a claim that an
#: interrupted move left runs out after this long.
LEASE = 10.0


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


def _destination(dest: str) -> QueueView | None:
    """The queue at *dest*; None for a folder that is no queue yet (the
    delivery makes it)."""
    try:
        return QueueView(dest)
    except CLIError:
        if is_url(dest):
            raise
        return None


def _present(view: QueueView | None) -> set[str]:
    """The keys of the messages already in the queue of *view*."""
    keys = set()
    for info in view.messages if view is not None else ():
        head = info.head
        if head.problem:
            continue
        fromaddr, toaddrs, message = parse_queue_file(
            info.maildir.read(info.entry))
        keys.add(_key(fromaddr, toaddrs, message))
    return keys


def move(args: argparse.Namespace, console: Console) -> int:
    from mailoutbox.delivery import QueuedMailDelivery

    source = QueueView(args.source)
    target = _destination(args.dest)
    if target is not None and target.maildir.key == source.maildir.key:
        raise CLIError("SOURCE and DEST are the same queue")
    waiting = source.select(WAITING)
    if args.dry_run:
        console.out(f"{len(waiting)} message(s) would be moved")
        return EXIT_OK
    present = _present(target)
    delivery = QueuedMailDelivery(args.dest, mailers=set(source.relays),
                                  transaction_manager=transaction.TransactionManager())
    # A Maildir claim is broken when older than *lease*: not before the
    # processors' own claims would be.
    lease = LEASE if is_url(args.source) else DEFAULT_LEASE
    moved = left = 0
    for info in waiting:
        store = info.maildir
        claim = store.claim(info.entry, lease, exact=True)
        if claim is None:
            console.note(f"{clean(info.name)}: being sent now (or claimed by"
                         f" an interrupted move, for up to {lease:g} s); left in"
                         f" {clean(source.location)}: run it again")
            left += 1
            continue
        try:
            with _renewing(claim, lease):
                _put(delivery, claim, info, present)
        except BaseException:
            claim.release()
            raise
        # Gone from the source, not logged as sent (a PostgreSQL queue
        # keeping a sent log would: its claims can discard instead).
        getattr(claim, "discard", claim.complete)()
        moved += 1
        console.out(f"{clean(info.name)}: moved")
    console.out(f"{moved} message(s) moved to {clean(args.dest)}"
                + (f", {left} being sent left in place" if left else ""))
    return EXIT_NOT_SENT if left else EXIT_OK


def _put(delivery: Any, claim: Any, info: Any, present: set[str]) -> None:
    """Queue the message of *claim* in the destination, unless it is there
    already (*present*: the keys of the messages there)."""
    fromaddr, toaddrs, message = parse_queue_file(claim.read())
    # A message without a Message-Id gets one made from its name, so that
    # a resumed move recognises it.
    made = _made_id(info.name)
    message, _id = prepare_message(message, functools.partial(str, made))
    key = _key(fromaddr, toaddrs, message)
    if key not in present:
        with delivery.transaction_manager:
            delivery.send(fromaddr, toaddrs, message, mailer=info.relay,
                          not_before=info.scheduled_for, priority=info.priority)
        present.add(key)


@contextlib.contextmanager
def _renewing(claim: Any, lease: float) -> Iterator[None]:
    """Renew *claim* every third of *lease* meanwhile."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease / 3):
            claim.renew()

    thread = threading.Thread(target=renew, name="mailoutbox-move-renew",
                              daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _made_id(name: str) -> str:
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()
    return f"moved.{digest[:32]}@mailoutbox.invalid"
