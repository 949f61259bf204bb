"""Arguments shared by the subcommands."""
from __future__ import annotations

import argparse
import os

from mailoutbox.cli.config import read_config
from mailoutbox.cli.console import Console
from mailoutbox.cli.errors import CLIError

__all__ = [
    "add_common_arguments",
    "add_queue_argument",
    "queue_path",
    "split_queue_and_ids",
]


def add_common_arguments(parser: argparse.ArgumentParser,
                         quiet: str | None = None) -> None:
    """``--config``, ``--verbose``, and ``--quiet`` (described by *quiet*)
    if the command has something to leave out."""
    parser.add_argument(
        "-c", "--config", metavar="INI",
        help="read settings from this INI file ('-': standard input): its"
        " [mailoutbox] section, or zope.sendmail's [app:zope-sendmail]"
        " section; options on the command line win",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="log what happens to each message (-vv: debugging details)",
    )
    if quiet is None:
        parser.set_defaults(quiet=0)
    else:
        parser.add_argument("-q", "--quiet", action="count", default=0, help=quiet)


def add_queue_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "queue", metavar="QUEUE", nargs="?",
        help="the queue's directory (default: queue_path from --config)",
    )


def queue_path(args: argparse.Namespace, console: Console) -> str:
    """The queue given on the command line or by the ``--config`` file."""
    if args.queue:
        return str(args.queue)
    if args.config:
        path = read_config(args.config, console).get("queue_path")
        if path:
            return str(path)
    raise CLIError(
        "no queue: give the queue's directory, or a --config file that sets"
        " queue_path"
    )


def split_queue_and_ids(args: argparse.Namespace) -> None:
    """With ``--config``, ``CMD ID...`` names no queue: argparse took the
    first id for the queue.  A message id is never a directory."""
    if args.config and args.queue and not os.path.isdir(args.queue):
        args.ids.insert(0, args.queue)
        args.queue = None
