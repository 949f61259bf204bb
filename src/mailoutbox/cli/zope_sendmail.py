"""zope.sendmail's ``zope-sendmail`` console application, on mailoutbox.

:class:`ConsoleApp` and :func:`run` have the names and the options of
zope.sendmail's (``mailoutbox.queue`` exports them, as
``zope.sendmail.queue`` does); the work is done by ``mailoutbox run``,
which takes the same options and ``--config`` file, and more (see
:doc:`/cli`).
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any
from typing import BinaryIO

from mailoutbox.cli import main as mailoutbox_main
from mailoutbox.cli import run as run_command
from mailoutbox.cli.config import ZOPE_SENDMAIL_KEYS
from mailoutbox.cli.config import ZOPE_SENDMAIL_SECTION
from mailoutbox.cli.config import resolve
from mailoutbox.cli.console import Console
from mailoutbox.cli.errors import CLIError
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread

__all__ = ["ConsoleApp", "run"]


class _OneCommand:
    """Stands in for argparse's subcommands so that ``run``'s parser is
    built as a parser of its own, named after the script."""

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.parser = argparse.ArgumentParser(prog=prog)

    def add_parser(self, name: str, help: str = "",
                   **kwargs: Any) -> argparse.ArgumentParser:
        self.parser = argparse.ArgumentParser(prog=self.prog, **kwargs)
        return self.parser


class _Console(Console):
    """Reads ``--config -`` from :data:`sys.stdin` even when it was replaced
    by a text stream without a binary buffer (zope.sendmail's tests do)."""

    @property
    def stdin(self) -> BinaryIO:
        buffer = getattr(sys.stdin, "buffer", None)
        if buffer is not None:
            return buffer
        return io.BytesIO(sys.stdin.read().encode("utf-8"))


class ConsoleApp:
    """Runs the queue processor from the console, as zope.sendmail's
    ``zope-sendmail`` script does: ``ConsoleApp(argv).main()``.

    *argv* (default: :data:`sys.argv`) starts with the script's name.  Bad
    options exit (:class:`SystemExit`, status 2) with a message on
    standard error.  The settings are those of ``mailoutbox run`` (a
    superset of zope.sendmail's): after parsing, the attributes of
    zope.sendmail's application hold them (``daemon``, ``interval``,
    ``hostname``, ``port``, ``username``, ``password``, ``force_tls``,
    ``no_tls``, ``queue_path``), and :attr:`settings` all of them.
    Unlike zope.sendmail's, options on the command line win over the
    ``--config`` file.
    """

    INI_SECTION = ZOPE_SENDMAIL_SECTION
    INI_NAMES = list(ZOPE_SENDMAIL_KEYS)
    #: Replace either to run another processor or mailer, called as
    #: zope.sendmail calls them.
    QueueProcessorKind: Any = QueueProcessorThread
    MailerKind: Any = SMTPMailer

    def __init__(self, argv: Sequence[str] | None = None,
                 verbose: bool = True) -> None:
        argv = list(sys.argv if argv is None else argv)
        self.argv = argv
        self.script_name = argv[0]
        self.verbose = verbose
        self.console = _Console()
        parser = self.parser = self.build_parser()
        args = parser.parse_args(argv[1:])
        try:
            settings = resolve(args, self.console, need_queue=False)
        except CLIError as exc:
            parser.error(str(exc))
        if not settings.queue_path:
            parser.error("please specify the queue path (or queue_path in"
                         " the --config file)")
        self.settings = settings
        self.daemon = bool(args.daemon)
        self.interval = settings.interval
        self.hostname = settings.hostname
        self.port = settings.smtp_port
        self.username = settings.username
        self.password = settings.password
        self.force_tls = settings.force_tls
        self.no_tls = settings.no_tls
        self.queue_path = settings.queue_path
        if self.MailerKind is SMTPMailer:
            self.mailer = run_command.make_mailer(settings)
        else:
            self.mailer = self.MailerKind(
                self.hostname, self.port, self.username, self.password,
                self.no_tls, self.force_tls,
            )

    def build_parser(self) -> argparse.ArgumentParser:
        """The parser of ``mailoutbox run``, named after the script."""
        commands = _OneCommand(os.path.basename(self.script_name))
        run_command.add_parser(commands)
        return commands.parser

    def main(self) -> int:
        """Send the queued messages (once, or until stopped with
        ``--daemon``) and return the exit status of ``mailoutbox run``."""
        if (self.QueueProcessorKind is QueueProcessorThread
                and self.MailerKind is SMTPMailer):
            return mailoutbox_main(["run", *self.argv[1:]], self.console)
        processor = self.QueueProcessorKind(self.interval)
        processor.setMailer(self.mailer)
        processor.setQueuePath(self.queue_path)
        processor.run(forever=self.daemon)
        return 0


def run(argv: Sequence[str] | None = None) -> int:
    """The ``zope-sendmail`` script: ``ConsoleApp(argv).main()``."""
    logging.basicConfig()
    return ConsoleApp(argv).main()
