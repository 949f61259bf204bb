"""``run``: send the queued messages, once or as a daemon.

The options and the ``--config`` file are those of zope.sendmail's
``zope-sendmail`` script, plus mailoutbox's own.  SIGTERM and SIGINT stop
the processor after the messages in flight; a second SIGINT stops at once
(the claims of the messages it interrupts expire after the lease).  The
daemon sends a message as soon as it is queued, by any process (on Linux,
where it watches the queue's folders with inotify; elsewhere, and as a
fallback, at its next check every ``--interval`` seconds): see
:mod:`mailoutbox.wakeup`.  The messages routed to a relay are sent
through the SMTP server of the ``[mailoutbox:relay NAME]`` section of
the ``--config`` file; while a relay has no section, its messages are
deferred.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

from mailoutbox.cli.common import add_common_arguments
from mailoutbox.cli.common import add_queue_argument
from mailoutbox.cli.config import RelaySettings
from mailoutbox.cli.config import Settings
from mailoutbox.cli.config import duration
from mailoutbox.cli.config import factor
from mailoutbox.cli.config import port
from mailoutbox.cli.config import positive_int
from mailoutbox.cli.config import rate
from mailoutbox.cli.config import resolve
from mailoutbox.cli.console import Console
from mailoutbox.cli.errors import EXIT_ERROR
from mailoutbox.cli.errors import EXIT_NOT_SENT
from mailoutbox.cli.errors import EXIT_OK
from mailoutbox.cli.errors import CLIError
from mailoutbox.cli.progress import Progress
from mailoutbox.cli.view import clean
from mailoutbox.queue import DEFAULT_CONCURRENCY
from mailoutbox.relays import relay_folders
from mailoutbox.stores import is_url

__all__ = [
    "ErrorCounter",
    "Runner",
    "add_parser",
    "check_access",
    "make_mailer",
    "make_processor",
    "metrics_address",
    "run",
    "serving_metrics",
]


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        help="send the queued messages (once, or --daemon)",
        description="Send the messages of the queue: once, then exit (the"
        " default), or every --interval seconds until stopped by SIGTERM or"
        " SIGINT (--daemon).  Both stop after the messages in flight.  The"
        " options are those of zope.sendmail's zope-sendmail script, and a"
        " --config file for it works unchanged.  Messages routed to a relay"
        " go through the SMTP server of its [mailoutbox:relay NAME] section"
        " in the --config file.",
    )
    add_queue_argument(parser)
    parser.add_argument(
        "--daemon", action="store_true", default=None,
        help="keep running: send each message as soon as it is queued (on"
        " Linux), and check the queue every --interval seconds",
    )
    parser.add_argument(
        "--flush", action="store_true",
        help="try every deferred message now, whatever the time of its next"
        " attempt, as Postfix's 'postqueue -f' does (with --daemon: in the"
        " first pass only); not those scheduled for later",
    )
    parser.add_argument(
        "--interval", metavar="SECONDS", type=duration,
        help="how often the daemon checks the queue, for messages it was"
        " not woken for (default: 3)",
    )
    smtp = parser.add_argument_group("SMTP server")
    smtp.add_argument(
        "--hostname", metavar="HOST",
        help="the SMTP server to send through (default: localhost)",
    )
    smtp.add_argument(
        "--port", type=port,
        help="its port (default: 25, or 465 with --implicit-tls)",
    )
    tls = smtp.add_mutually_exclusive_group()
    tls.add_argument(
        "--force-tls", action="store_true", default=None,
        help="refuse to send unless the connection is encrypted (STARTTLS)",
    )
    tls.add_argument(
        "--no-tls", action="store_true", default=None,
        help="never use TLS, even when the server offers STARTTLS",
    )
    smtp.add_argument(
        "--implicit-tls", action="store_true", default=None,
        help="speak TLS from the first byte (SMTPS, usually port 465)",
    )
    smtp.add_argument(
        "--ca-file", metavar="PEM",
        help="trust the certificate authorities in this file for the server's"
        " certificate (default: the system's)",
    )
    smtp.add_argument(
        "--timeout", metavar="SECONDS", type=duration,
        help="timeout of each network operation (default: 10)",
    )
    auth = parser.add_argument_group(
        "authentication",
        "Log in to the SMTP server with a username and a password.  The"
        " password can be given by an environment variable or a file, so"
        " that it does not show in the process list.",
    )
    auth.add_argument("--username", metavar="NAME", help="the user name")
    password = auth.add_mutually_exclusive_group()
    password.add_argument(
        "--password", metavar="PASSWORD",
        help="the password (visible to other users of the machine in the"
        " process list: prefer the next two)",
    )
    password.add_argument(
        "--password-env", metavar="VAR",
        help="read the password from the environment variable VAR",
    )
    password.add_argument(
        "--password-file", metavar="PATH",
        help="read the password from the first line of the file PATH",
    )
    queue = parser.add_argument_group("queue processing")
    queue.add_argument(
        "--concurrency", metavar="N", type=positive_int,
        help="at most how many messages are sent at once per relay, each"
        " over its own connection; fewer when the relay answers fast enough"
        f" (default: {DEFAULT_CONCURRENCY})",
    )
    queue.add_argument(
        "--rate", metavar="N", type=rate,
        help="send at most N messages per second through the SMTP server"
        " (or N/m, N/h: per minute, per hour); it is slowed down further"
        " while it answers that the sender is too fast (default: no limit;"
        " a relay's section has a rate of its own)",
    )
    queue.add_argument(
        "--max-connections", metavar="N", type=positive_int,
        help="open at most N connections to the SMTP server at once"
        " (default: --concurrency; a relay's section has a limit of its"
        " own)",
    )
    queue.add_argument(
        "--lease", metavar="SECONDS", type=duration,
        help="how long a claim on a message lasts without being renewed;"
        " a processor that dies loses its claims after it (default: 30)",
    )
    queue.add_argument(
        "--retry-initial", metavar="SECONDS", type=duration,
        help="wait after a first transient failure (default: 60)",
    )
    queue.add_argument(
        "--retry-factor", metavar="FACTOR", type=factor,
        help="multiply the wait by this after each further failure"
        " (default: 2)",
    )
    queue.add_argument(
        "--retry-cap", metavar="SECONDS", type=duration,
        help="never wait longer than this between attempts (default: 1h)",
    )
    queue.add_argument(
        "--max-age", metavar="SECONDS", type=duration,
        help="give up on a message this long after its first failure"
        " (default: 5d)",
    )
    parser.add_argument(
        "--metrics", metavar="HOST:PORT", type=metrics_address,
        help="with --daemon: serve Prometheus metrics at"
        " http://HOST:PORT/metrics (needs mailoutbox[metrics])",
    )
    parser.add_argument(
        "--no-progress", action="store_true",
        help="show no progress bar, even on a terminal",
    )
    add_common_arguments(
        parser, quiet="print no summary line, and log only errors (-qq: not"
        " even those)",
    )
    parser.set_defaults(func=run, log_level=0)


def metrics_address(text: str) -> tuple[str, int]:
    """The ``(host, port)`` of ``--metrics`` (an argparse type)."""
    from mailoutbox.metrics import parse_address

    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@contextlib.contextmanager
def serving_metrics(processor: Any, address: tuple[str, int] | None) -> Iterator[None]:
    """Serve the metrics of *processor* at *address* (if given) meanwhile."""
    if address is None:
        yield
        return
    from mailoutbox.metrics import MetricsServer

    server = MetricsServer(processor, *address)
    try:
        server.start()
    except ImportError as exc:
        raise CLIError(str(exc), EXIT_ERROR) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CLIError(
            f"cannot serve metrics at {address[0]}:{address[1]}: {reason}"
        ) from None
    try:
        yield
    finally:
        server.stop()


def make_mailer(settings: Settings | RelaySettings) -> Any:
    """The :class:`~mailoutbox.mailer.SMTPMailer` for *settings*."""
    from mailoutbox.mailer import SMTPMailer

    if settings.ca_file is not None:
        # Found out now rather than at the first message.
        try:
            ssl.create_default_context(cafile=settings.ca_file)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise CLIError(
                f"cannot use the CA file {settings.ca_file}: {reason}"
            ) from None
    return SMTPMailer(
        settings.hostname,
        settings.smtp_port,
        settings.username,
        settings.password,
        no_tls=settings.no_tls,
        force_tls=settings.force_tls,
        implicit_tls=settings.implicit_tls,
        timeout=settings.timeout,
        ca_file=settings.ca_file,
        rate=settings.rate,
        max_connections=settings.max_connections,
    )


def make_processor(settings: Settings, mailer: Any) -> Any:
    """The :class:`~mailoutbox.queue.QueueProcessorThread` for *settings*."""
    from mailoutbox.queue import QueueProcessorThread
    from mailoutbox.retry import RetryPolicy

    processor = QueueProcessorThread(
        settings.interval,
        concurrency=settings.concurrency,
        retry=RetryPolicy(
            initial=settings.retry_initial,
            factor=settings.retry_factor,
            cap=settings.retry_cap,
            max_age=settings.max_age,
        ),
        lease=settings.lease,
    )
    processor.setMailer(mailer)
    processor.setMailers({
        name: make_mailer(relay) for name, relay in settings.relays.items()
    })
    try:
        processor.setQueuePath(settings.queue_path)
    except ValueError as exc:  # exists, but is not a Maildir
        raise CLIError(str(exc)) from None
    return processor


def check_access(path: str) -> None:
    """Raise :class:`PermissionError` naming the first folder of the queue
    at *path* (its own folders, and those of its relay folders) in which
    this process may not create, rename and delete files: a processor could
    not claim a single message there."""
    if is_url(path):
        return  # the database's permissions apply
    queues = [path, *(folder for _name, folder in relay_folders(path))]
    for queue in queues:
        for folder in (queue, *(os.path.join(queue, sub)
                                for sub in ("tmp", "new", "cur", "failed"))):
            if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), folder)


class ErrorCounter(logging.Handler):
    """Counts the log records of errors that came with an exception, or are
    marked with :data:`mailoutbox.sending.UNHANDLED`: the messages the
    processor could not handle (a permission, a full disk, a bug), which it
    leaves in the queue and counts as skipped."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or getattr(record, "mailoutbox_unhandled", False):
            self.count += 1


class Runner:
    """Runs a processor in the foreground and stops it on a signal."""

    #: The signals that ask for a graceful stop.
    signals = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, processor: Any, console: Console) -> None:
        self.processor = processor
        self.console = console
        self.stop_requested = threading.Event()
        self._saved: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only take note here: stop() may wait, and this runs between two
        # bytecodes of whatever the main thread was doing.
        if not self.stop_requested.is_set():
            self.console.note(
                "stopping after the messages in flight"
                f" ({signal.Signals(signum).name})"
            )
        self.stop_requested.set()
        # A second Ctrl-C interrupts whatever is going on.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> Runner:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._saved[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved.clear()

    def _until_stopped(self, thread: threading.Thread, poll: float) -> None:
        """Wait for *thread* to end, stopping the processor on a signal."""
        while thread.is_alive():
            if self.stop_requested.wait(poll):
                self.processor.stop()  # waits for the messages in flight
                break
        thread.join()

    def _one_pass(self, on_progress: Callable[[int, int], None] | None,
                  poll: float, flush: bool) -> dict[str, Any]:
        """Make one pass (in a thread, so that a signal can stop it between
        two messages); its stats or the error it raised."""
        outcome: dict[str, Any] = {}

        def one_pass() -> None:
            try:
                outcome["stats"] = self.processor.process_queue(
                    on_progress=on_progress, flush=flush
                )
            except BaseException as exc:  # handed to the main thread
                outcome["error"] = exc

        thread = threading.Thread(
            target=one_pass, name="mailoutbox-run-once", daemon=True
        )
        thread.start()
        self._until_stopped(thread, poll)  # a 2nd Ctrl-C does not wait
        return outcome

    def once(self, on_progress: Callable[[int, int], None] | None,
             poll: float = 0.1, flush: bool = False) -> Any:
        """One pass over the queue (with *flush*, deferred messages are
        due whatever their retry time)."""
        outcome = self._one_pass(on_progress, poll, flush)
        self.processor.stop()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["stats"]

    def forever(self, poll: float = 0.5, flush: bool = False) -> None:
        """Run the processor's thread until a signal asks to stop; with
        *flush*, its first pass is a flush (see :meth:`once`)."""
        if flush:
            outcome = self._one_pass(None, poll, True)
            if "error" in outcome or self.stop_requested.is_set():
                self.processor.stop()
                if "error" in outcome:
                    raise outcome["error"]
                return
        self.processor.start()
        try:
            self._until_stopped(self.processor, poll)
        except KeyboardInterrupt:  # the second Ctrl-C: do not wait at exit
            atexit.unregister(self.processor.stop)
            raise
        self.processor.stop()


def run(args: argparse.Namespace, console: Console) -> int:
    if args.metrics is not None and not args.daemon:
        raise CLIError("--metrics needs --daemon (a single pass has nothing to"
                       " serve metrics for)")
    settings = resolve(args, console)
    processor = make_processor(settings, make_mailer(settings))
    path = str(settings.queue_path)
    if getattr(processor.maildir, "created", False) and not args.quiet:
        console.note(f"created a new, empty queue at {path}")
    check_access(path)
    with Runner(processor, console) as runner:
        if args.daemon:
            with serving_metrics(processor, args.metrics):
                runner.forever(flush=args.flush)
            return EXIT_OK
        show = console.is_terminal() and not args.no_progress and not args.quiet
        progress = Progress(console) if show else None
        started = time.monotonic()
        errors = ErrorCounter()
        logger = logging.getLogger("mailoutbox")
        logger.addHandler(errors)
        try:
            stats = runner.once(progress, flush=args.flush)
        finally:
            logger.removeHandler(errors)
            if progress is not None:
                progress.close()
    if not args.quiet:
        elapsed = time.monotonic() - started
        console.out(
            f"sent {stats.sent}, deferred {stats.deferred}, failed"
            f" {stats.failed}, skipped {stats.skipped} ({elapsed:.1f} s)"
        )
        for name, relay in stats.relays.items():
            console.out(clean(
                f"  relay {name}: sent {relay.sent}, deferred {relay.deferred},"
                f" failed {relay.failed}, skipped {relay.skipped}"
            ))
    if errors.count:
        console.error(
            f"{errors.count} error(s) while processing the queue: some messages"
            " could not be handled and were left in it (see the log lines"
            " above; -vv shows the tracebacks)"
        )
        return EXIT_ERROR
    return EXIT_NOT_SENT if stats.deferred or stats.failed else EXIT_OK
