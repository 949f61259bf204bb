"""``mailoutbox recover URL``: list, commit or roll back the prepared
transactions that a crash left in a PostgreSQL queue
(:mod:`mailoutbox.postgresql.recovery`)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from mailoutbox.cli.console import Console
from mailoutbox.cli.errors import EXIT_OK
from mailoutbox.cli.errors import CLIError

__all__ = ["add_parser", "main", "recover"]

HELP = "list, commit or roll back the prepared transactions a crash left"

DESCRIPTION = """\
A delivery that queues into PostgreSQL with two-phase commit prepares its
transaction when the transaction votes and commits it when it finishes. A
crash in between leaves a prepared transaction (id mailoutbox:TABLE:...):
its messages are not queued, and it holds locks. Commit it if the
application's transaction committed (its data is there; the CRITICAL log
line names the transaction), roll it back if that aborted. Without
--commit or --rollback, list them.
"""


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("recover", help=HELP, description=DESCRIPTION)
    _arguments(parser)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="the queue's postgresql:// URL")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--commit", dest="action", action="store_const",
                        const="commit", help="commit them")
    action.add_argument("--rollback", dest="action", action="store_const",
                        const="rollback", help="roll them back")
    parser.add_argument(
        "--older-than", metavar="SECONDS", type=float, default=None,
        help="only those prepared this long ago (default: 60 with --commit"
        " or --rollback, which leaves alone commits still under way; 0"
        " when listing)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help=argparse.SUPPRESS)
    parser.set_defaults(func=recover, quiet=0)


def recover(args: argparse.Namespace, console: Console) -> int:
    """Run ``mailoutbox recover`` with the parsed *args*."""
    from mailoutbox.stores import is_url
    if not is_url(args.url):
        raise CLIError(f"recover works on PostgreSQL queues (postgresql://...),"
                       f" not {args.url!r}")
    try:
        from mailoutbox.postgresql import recovery
        from mailoutbox.postgresql.url import display
        shown = display(args.url)
        older = args.older_than
        if older is not None and older < 0:
            raise ValueError(f"--older-than must be 0 or more, not {older:g}")
        if args.action is None:
            found = recovery.orphans(args.url, older or 0)
        else:
            done = recovery.resolve(args.url, args.action,
                                    60 if older is None else older)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.action is not None:
        verb = "committed" if args.action == "commit" else "rolled back"
        for gid in done:
            console.out(f"{verb} {gid}")
        console.out(f"{len(done)} prepared transaction(s) {verb} in {shown}")
        return EXIT_OK
    for orphan in found:
        console.out(f"{orphan.gid}  prepared {orphan.prepared:%Y-%m-%d %H:%M:%S%z}"
                    f" ({orphan.age:.0f} s ago) by {orphan.owner}")
    console.out(f"{len(found)} prepared mail transaction(s) in {shown}")
    if found:
        console.out("commit them (--commit) if their applications' transactions"
                    " committed, roll them back (--rollback) if those aborted")
    return EXIT_OK


def main(argv: Sequence[str] | None = None, console: Console | None = None) -> int:
    """``mailoutbox recover ARGS``; see :func:`mailoutbox.cli.main`."""
    from mailoutbox.cli import main as cli_main
    return cli_main(["recover", *(sys.argv[1:] if argv is None else argv)], console)
