"""``retry`` and ``purge``: repair a queue.

Neither command ever touches a message a processor is sending: queued and
deferred messages are claimed first, exactly as a processor claims them
(and a claim is never broken here, however old), so the two cannot race.
"""
from __future__ import annotations

import argparse
import io
from typing import Any

from mailoutbox.cli.common import add_common_arguments
from mailoutbox.cli.common import add_queue_argument
from mailoutbox.cli.common import queue_path
from mailoutbox.cli.common import split_queue_and_ids
from mailoutbox.cli.console import Console
from mailoutbox.cli.errors import EXIT_NOT_FOUND
from mailoutbox.cli.errors import EXIT_OK
from mailoutbox.cli.errors import CLIError
from mailoutbox.cli.view import MessageInfo
from mailoutbox.cli.view import QueueView

__all__ = ["add_parsers", "purge", "retry"]

#: Repairs never break another process's claim.
NEVER_STALE = float("inf")
QUIET = "print only errors and the messages left alone, not what was done"


def add_parsers(commands: Any) -> None:
    parser = commands.add_parser(
        "retry",
        help="queue failed or deferred messages for the next pass",
        description="Put failed or deferred messages back in the queue, to be"
        " tried at the next pass of the processor.  Messages being sent are"
        " left alone.",
    )
    add_queue_argument(parser)
    parser.add_argument(
        "ids", metavar="ID", nargs="*",
        help="a message's id (as 'list' prints it) or Message-Id",
    )
    parser.add_argument(
        "--all", action="store_true",
        help="retry every failed and deferred message (not those scheduled"
        " for later: name them to send them now)",
    )
    add_common_arguments(parser, quiet=QUIET)
    parser.set_defaults(func=retry)

    parser = commands.add_parser(
        "purge",
        help="delete messages from the queue for good",
        description="Delete messages, named by id or in bulk, with their"
        " retry or failure state.  Bulk deletion needs --yes; without it,"
        " purge tells what it would delete.  Messages being sent are left"
        " alone.",
    )
    add_queue_argument(parser)
    parser.add_argument(
        "ids", metavar="ID", nargs="*",
        help="a message's id (as 'list' prints it) or Message-Id",
    )
    parser.add_argument(
        "--failed", action="store_true", help="delete every failed message"
    )
    parser.add_argument(
        "--deferred", action="store_true", help="delete every deferred message"
    )
    parser.add_argument(
        "--yes", action="store_true", help="really delete, for --failed/--deferred"
    )
    add_common_arguments(parser, quiet=QUIET)
    parser.set_defaults(func=purge)


class _Discard(io.StringIO):
    """Where ``--quiet`` sends what it silences."""

    def write(self, text: str) -> int:
        return len(text)


def _targets(
    view: QueueView, ids: list[str], console: Console
) -> tuple[list[MessageInfo], bool]:
    """The messages named by *ids*, and whether one was missing."""
    found: list[MessageInfo] = []
    missing = False
    for ident in ids:
        try:
            message = view.find(ident)
        except CLIError as exc:
            console.error(str(exc))
            missing = True
            continue
        if message not in found:
            found.append(message)
    return found, missing


def retry(args: argparse.Namespace, console: Console) -> int:
    split_queue_and_ids(args)
    if args.all == bool(args.ids):
        raise CLIError("name the messages to retry, or give --all (not both)")
    view = QueueView(queue_path(args, console))
    if args.all:
        messages = [
            m for m in view.messages
            if m.state == "failed"
            or (m.state not in ("sending", "scheduled") and m.retry_at is not None)
        ]
        missing = False
    else:
        messages, missing = _targets(view, args.ids, console)
    done = _each(messages, _retry_one, view, args, console)
    if not args.quiet:
        console.out(f"{done} message(s) queued for the next pass")
    return EXIT_NOT_FOUND if missing else EXIT_OK


def _each(messages: list[MessageInfo], action, view: QueueView,
          args: argparse.Namespace, console: Console) -> int:
    """Apply *action* to each message (reporting on a console that
    ``--quiet`` silences); return how many it changed."""
    report = Console(_Discard(), console.stderr) if args.quiet else console
    return sum(action(view, message, report) for message in messages)


def _retry_one(view: QueueView, message: MessageInfo, console: Console) -> int:
    maildir = message.maildir or view.maildir
    if message.state == "failed":
        try:
            maildir.requeue(message.entry)
        except FileNotFoundError:
            console.note(f"{message.name}: gone meanwhile")
            return 0
        console.out(f"{message.name}: failed -> queued")
        return 1
    if message.retry_at is None:
        if message.state == "sending":
            console.note(f"{message.name}: being sent now; left alone")
        else:
            console.note(f"{message.name}: already queued")
        return 0
    claim = maildir.claim(message.entry, lease=NEVER_STALE, exact=True)
    if claim is None:
        console.note(f"{message.name}: being sent now; left alone")
        return 0
    try:
        maildir.requeue(message.entry)
    finally:
        claim.release()
    was = "scheduled" if message.state == "scheduled" else "deferred"
    console.out(f"{message.name}: {was} -> queued")
    return 1


def purge(args: argparse.Namespace, console: Console) -> int:
    split_queue_and_ids(args)
    bulk = [s for s in ("failed", "deferred") if getattr(args, s)]
    if bool(bulk) == bool(args.ids):
        raise CLIError(
            "name the messages to delete, or give --failed and/or --deferred"
            " (not both)"
        )
    view = QueueView(queue_path(args, console))
    missing = False
    if bulk:
        messages = view.select(bulk)
        if not args.yes:
            raise CLIError(
                f"{len(messages)} {' or '.join(bulk)} message(s) would be"
                " deleted; repeat with --yes to delete them"
            )
    else:
        messages, missing = _targets(view, args.ids, console)
    done = _each(messages, _purge_one, view, args, console)
    if not args.quiet:
        console.out(f"{done} message(s) deleted")
    return EXIT_NOT_FOUND if missing else EXIT_OK


def _purge_one(view: QueueView, message: MessageInfo, console: Console) -> int:
    maildir = message.maildir or view.maildir
    if message.state == "failed":
        maildir.purge(message.entry)
    else:
        claim = maildir.claim(message.entry, lease=NEVER_STALE, exact=True)
        if claim is None:
            console.note(f"{message.name}: being sent now; left alone")
            return 0
        claim.complete()
    console.out(f"{message.name}: deleted ({message.state})")
    return 1
