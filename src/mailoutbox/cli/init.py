"""``init``: create or upgrade the schema of a PostgreSQL queue."""
from __future__ import annotations

import argparse
from typing import Any

from mailoutbox.cli.common import add_common_arguments
from mailoutbox.cli.common import queue_path
from mailoutbox.cli.console import Console
from mailoutbox.cli.errors import EXIT_ERROR
from mailoutbox.cli.errors import EXIT_OK
from mailoutbox.cli.errors import EXIT_USAGE
from mailoutbox.cli.errors import CLIError
from mailoutbox.stores import is_url

__all__ = ["add_parser", "init"]


def add_parser(commands: Any) -> None:
    from mailoutbox.postgresql.schema import VERSION

    parser = commands.add_parser(
        "init",
        help="create or upgrade the table of a PostgreSQL queue",
        description="Create the table of the PostgreSQL queue at URL, or"
        " upgrade it to the schema this mailoutbox uses.  Running it again"
        " changes nothing; it is safe while processors run.",
    )
    parser.add_argument(
        "queue", metavar="URL", nargs="?",
        help="the queue's postgresql:// URL (default: queue_path from --config)",
    )
    parser.add_argument(
        "--table", metavar="NAME",
        help="the queue's table (default: the URL's table parameter, else"
        " mail_queue); NAME or SCHEMA.NAME",
    )
    parser.add_argument(
        "--version", dest="target", metavar="N", type=int, default=VERSION,
        choices=range(1, VERSION + 1),
        help=f"the schema version to upgrade to (default: {VERSION}, the"
        " newest)",
    )
    add_common_arguments(parser)
    parser.set_defaults(func=init)


def init(args: argparse.Namespace, console: Console) -> int:
    """Create or upgrade the queue's schema; say what was done."""
    url = queue_path(args, console)
    if not is_url(url):
        raise CLIError(f"{url} is not a postgresql:// URL: a Maildir queue needs"
                       " no init")
    if args.table:
        url += ("&" if "?" in url else "?") + "table=" + args.table
    from mailoutbox.postgresql import INSTALL
    from mailoutbox.postgresql import ConnectError
    from mailoutbox.postgresql import connect
    try:
        import psycopg
    except ImportError:
        raise CLIError(f"a postgresql:// queue needs psycopg: {INSTALL}",
                       EXIT_ERROR) from None
    try:
        parsed, connections = connect(url)
    except ConnectError as exc:
        raise CLIError(str(exc), EXIT_ERROR) from None
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None

    from mailoutbox.postgresql._conn import describe
    from mailoutbox.postgresql.schema import init as init_schema
    try:
        before, after = connections.run(
            lambda conn: init_schema(conn, parsed.table, args.target),
            retry=False)
    except (psycopg.Error, ValueError) as exc:
        raise CLIError(f"cannot create the mail queue {parsed.table!r} in"
                       f" {parsed.path}: {describe(exc, parsed.password)}",
                       EXIT_ERROR) from None
    finally:
        connections.close()
    where = f"the mail queue {parsed.table!r} in {parsed.path}"
    if before == 0:
        console.out(f"created {where} (schema version {after})")
    elif before < after:
        console.out(f"upgraded {where} from schema version {before} to {after}")
    else:
        console.out(f"{where} is up to date (schema version {before})")
    return EXIT_OK
