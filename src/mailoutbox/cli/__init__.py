"""The ``mailoutbox`` command: run the queue processor and look after a queue.

The parser is built by :func:`build_parser` (the documentation renders it)
and :func:`main` runs one command.  Every line the command writes goes
through a :class:`Console`, which tests and embedding applications may
replace.  Exit codes are the ``EXIT_*`` constants below; the documentation
chapter "The mailoutbox command" lists them.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Sequence
from typing import NoReturn

from mailoutbox.cli.console import Console
from mailoutbox.cli.errors import EXIT_BROKEN_PIPE
from mailoutbox.cli.errors import EXIT_ERROR
from mailoutbox.cli.errors import EXIT_INTERRUPTED
from mailoutbox.cli.errors import EXIT_NOT_FOUND
from mailoutbox.cli.errors import EXIT_NOT_SENT
from mailoutbox.cli.errors import EXIT_OK
from mailoutbox.cli.errors import EXIT_USAGE
from mailoutbox.cli.errors import CLIError

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_NOT_SENT",
    "EXIT_OK",
    "EXIT_USAGE",
    "CLIError",
    "Console",
    "build_parser",
    "main",
]

log = logging.getLogger(__name__)

PROG = "mailoutbox"

DESCRIPTION = """\
Send the mail that applications queued with mailoutbox (or zope.sendmail),
and look after the queue: count, list, show, retry, purge and move messages.
"""

EPILOG = """\
exit status: 0 success; 1 'run' could not send every message in the pass;
2 usage or configuration error; 3 no such message; 4 operating system error,
missing dependency or unexpected error; 130 interrupted; 141 the reader of
the output went away (e.g. '| head').
"""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mailoutbox")
    except Exception:  # pragma: no cover - only when run from a bare checkout
        return "unknown"


class _Parser(argparse.ArgumentParser):
    """A parser whose usage errors are one line, like the command's other
    errors (the subcommands' parsers are of the same class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            EXIT_USAGE,
            f"{PROG}: error: {message} (see '{self.prog} --help')\n",
        )


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of the ``mailoutbox`` command and its subcommands."""
    from mailoutbox.cli import demo
    from mailoutbox.cli import init
    from mailoutbox.cli import move
    from mailoutbox.cli import recover
    from mailoutbox.cli import repair
    from mailoutbox.cli import run
    from mailoutbox.cli import send
    from mailoutbox.cli import status

    parser = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}"
    )
    commands = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    run.add_parser(commands)
    init.add_parser(commands)
    status.add_parsers(commands)
    repair.add_parsers(commands)
    send.add_parser(commands)
    move.add_parser(commands)
    demo.add_parser(commands)
    recover.add_parser(commands)
    return parser


_LEVELS = {
    -2: logging.CRITICAL,
    -1: logging.ERROR,
    0: logging.WARNING,
    1: logging.INFO,
    2: logging.DEBUG,
}


class _Formatter(logging.Formatter):
    """Log lines, with tracebacks only if *tracebacks* is true."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if self.tracebacks or not record.exc_info:
            return super().format(record)
        # What format() does, with the exception in one line instead of
        # its traceback.
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        exc = record.exc_info[1]
        return f"{self.formatMessage(record)} ({type(exc).__name__}: {exc})"


def _configure_logging(console: Console, verbosity: int) -> logging.Handler:
    """Send mailoutbox's log records to the console's stderr (with
    tracebacks from ``-vv`` on)."""
    level = _LEVELS[max(-2, min(2, verbosity))]
    handler = logging.StreamHandler(console.stderr)
    handler.setFormatter(_Formatter(verbosity >= 2))
    handler.setLevel(level)
    logger = logging.getLogger("mailoutbox")
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    return handler


def main(argv: Sequence[str] | None = None, console: Console | None = None) -> int:
    """Run the ``mailoutbox`` command with *argv* (default: ``sys.argv[1:]``)
    and return its exit status.

    *console* receives every line written; the default writes to
    ``sys.stdout`` and ``sys.stderr``.
    """
    console = console or Console()
    parser = build_parser()
    try:
        with contextlib.redirect_stdout(console.stdout), contextlib.redirect_stderr(
            console.stderr
        ):
            args = _parse(parser, argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    # run logs warnings by default; the other commands report errors
    # themselves, and log only when asked to with -v.
    verbosity = args.verbose or getattr(args, "log_level", -2) - args.quiet
    logger = logging.getLogger("mailoutbox")
    saved_level = logger.level
    handler = _configure_logging(console, verbosity)
    try:
        return args.func(args, console)
    except CLIError as exc:
        console.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        console.error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away ("mailoutbox list | head -1"): stop quietly,
        # as a Unix tool that SIGPIPE ends does.
        _silence(console)
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        console.error(_describe_os_error(exc))
        return EXIT_ERROR
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        console.error(f"unexpected error: {exc!r} (run with -vv for the traceback)")
        return EXIT_ERROR
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)


def _parse(parser: argparse.ArgumentParser,
           argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse *argv*, also taking message ids that follow an option
    (``retry QUEUE --verbose ID``), which argparse alone refuses."""
    args, extras = parser.parse_known_args(argv)
    ids = getattr(args, "ids", None)
    if ids is not None and not any(e.startswith("-") for e in extras):
        ids.extend(extras)
        extras = []
    if extras:
        parser.exit(
            EXIT_USAGE,
            f"{PROG}: error: unrecognized arguments: {' '.join(extras)}"
            f" (see '{PROG} {args.command} --help')\n",
        )
    return args


def _silence(console: Console) -> None:
    """Point the file descriptor of the console's output, whose reader is
    gone, at /dev/null, so that nothing fails again when the interpreter
    flushes it at exit."""
    try:
        fd = console.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # not a file: nothing to do
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _describe_os_error(exc: OSError) -> str:
    if exc.filename is not None:
        return f"{exc.strerror or exc}: {exc.filename}"
    return str(exc)


