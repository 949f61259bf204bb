"""Processes for the reliability tests, and the crash-mid-drain harness.

Run as a script, this module is one of these processes::

    python tests/_crash_helpers.py drain QUEUE PORT [--concurrency N]
        [--lease S] [--until-empty | --until-stdin] [--deadline S]
    python tests/_crash_helpers.py produce QUEUE PREFIX COUNT [--size BYTES]
        [--wait]
    python tests/_crash_helpers.py commit-crash QUEUE MODE
    python tests/_crash_helpers.py fsize-limit QUEUE LIMIT SIZE...
        [--recipients N]
    python tests/_crash_helpers.py state-fsize QUEUE LIMIT

``drain`` runs a real :class:`~mailoutbox.queue.QueueProcessorThread` (a
thread, passes every 50 ms) sending to an SMTP server on 127.0.0.1:PORT.
It prints ``started``, then runs until it is killed; with
``--until-empty`` it stops once the queue holds no message and no claim,
with ``--until-stdin`` it first waits for a line on its standard input.
When it stops it prints what it did as JSON (``sent``, ``deferred``,
``failed``, from the processor's events) and exits 0 (1 when *deadline*
seconds passed first).

``produce`` commits COUNT transactions of one message each through a
:class:`~mailoutbox.delivery.QueuedMailDelivery`, printing each Message-Id
once its transaction committed; with ``--wait`` it prints ``started`` and
waits for a line on its standard input first.

``commit-crash`` queues three messages in a transaction that also holds a
data manager killing the process (SIGKILL) at the moment MODE names:
``vote`` (in its vote, which comes after the queue's), ``finish`` (in its
finish, which comes before the queue's) or ``after`` (once ``commit()``
returned).  It prints the Message-Ids, then what the queue looked like at
the kill.

``fsize-limit`` limits the size of the files the process may write to
LIMIT bytes (RLIMIT_FSIZE: a disk that fills up, without root), then
commits one message of each SIZE (to N recipients) and prints the
outcomes as JSON.  ``state-fsize`` queues two messages, claims them, and
under the same limit defers the first and fails the second (their state
files are larger than LIMIT); it prints the errno of each as JSON.

The messages carry a checksum of their body (:func:`make_message`), so
:func:`is_complete` tells a whole message from a truncated one.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.abspath(__file__)
SENDER = "sender@example.org"
RECIPIENT = "rcpt@example.org"


# -- messages -------------------------------------------------------------------


def make_message(message_id: str, size: int = 200) -> bytes:
    """A message of about *size* bytes whose headers carry the SHA-256 of
    its body."""
    line = b"%s lorem ipsum dolor sit amet\r\n" % message_id.encode()
    body = (line * (size // len(line) + 1))[:size]
    body = body[: body.rfind(b"\r\n") + 2] if b"\r\n" in body else b"x\r\n"
    digest = hashlib.sha256(body).hexdigest()
    return (
        b"From: %s\r\nTo: %s\r\nSubject: reliability\r\nMessage-Id: <%s>\r\n"
        b"X-Body-SHA256: %s\r\n\r\n%s"
        % (SENDER.encode(), RECIPIENT.encode(), message_id.encode(),
           digest.encode(), body)
    )


def is_complete(message: bytes) -> bool:
    """Whether *message* (line ends LF or CRLF) has the whole body its
    ``X-Body-SHA256`` header promises."""
    message = message.replace(b"\r\n", b"\n")
    head, sep, body = message.partition(b"\n\n")
    if not sep:
        return False
    for line in head.split(b"\n"):
        name, _colon, value = line.partition(b":")
        if name.lower() == b"x-body-sha256":
            body = body.replace(b"\n", b"\r\n")
            return hashlib.sha256(body).hexdigest() == value.strip().decode()
    return False


def queue_messages(path: str, count: int, prefix: str = "m",
                   size: int = 200) -> list[str]:
    """Write *count* messages straight into the queue at *path* (created
    if needed) and return their Message-Ids, oldest first."""
    from mailoutbox.envelope import format_envelope
    from mailoutbox.maildir import Maildir

    maildir = Maildir(path, create=True)
    envelope = format_envelope(SENDER, [RECIPIENT])
    ids = []
    for i in range(count):
        message_id = f"{prefix}-{i}@mailoutbox.test"
        writer = maildir.newMessage()
        writer.write(envelope + make_message(message_id, size))
        writer.commit(fsync_dir=False)
        ids.append(message_id)
    maildir.sync_new()
    return ids


# -- looking at a queue ---------------------------------------------------------


def listing(path: str, folder: str) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(os.listdir(os.path.join(path, folder)))
    return []


def queued(path: str) -> list[str]:
    """The messages in ``new/`` and ``cur/``."""
    return [n for f in ("new", "cur") for n in listing(path, f)
            if not n.startswith(".")]


def claims(path: str) -> list[str]:
    """The claim files in ``new/`` and ``cur/``."""
    return [n for f in ("new", "cur") for n in listing(path, f)
            if n.startswith(".sending-")]


def claim_times(path: str) -> dict[str, int]:
    """``{claim file: its mtime in ns}`` (renewing a claim touches it)."""
    times = {}
    for folder in ("new", "cur"):
        for name in listing(path, folder):
            if name.startswith(".sending-"):
                with contextlib.suppress(FileNotFoundError):
                    times[name] = os.lstat(os.path.join(path, folder, name)).st_mtime_ns
    return times


def queue_is_idle(path: str) -> bool:
    """No message queued and no claim held."""
    return not queued(path) and not claims(path)


# -- the processes ----------------------------------------------------------------


def _drain(args: argparse.Namespace) -> int:
    import zope.event

    from mailoutbox.interfaces import IMailErrorEvent
    from mailoutbox.interfaces import IMailSentEvent
    from mailoutbox.mailer import SMTPMailer
    from mailoutbox.queue import QueueProcessorThread
    from mailoutbox.retry import RetryPolicy

    counts = Counter()

    def count(event):
        if IMailSentEvent.providedBy(event):
            counts["sent"] += 1
        elif IMailErrorEvent.providedBy(event):
            counts["failed" if event.permanent else "deferred"] += 1

    zope.event.subscribers.append(count)
    processor = QueueProcessorThread(
        interval=0.05, concurrency=args.concurrency, lease=args.lease,
        retry=RetryPolicy(initial=0.1, cap=1.0),
    )
    processor.setMailer(SMTPMailer("127.0.0.1", args.port, no_tls=True, timeout=10))
    processor.setQueuePath(args.queue)
    processor.start()
    print("started", flush=True)
    if args.until_stdin:
        sys.stdin.readline()
    elif not args.until_empty:
        while True:  # until killed
            time.sleep(3600)
    deadline = time.monotonic() + args.deadline
    while not queue_is_idle(args.queue) and time.monotonic() < deadline:
        time.sleep(0.05)
    processor.stop(timeout=30)
    print(json.dumps(dict(counts)), flush=True)
    return 0 if queue_is_idle(args.queue) else 1


def _produce(args: argparse.Namespace) -> int:
    import transaction

    from mailoutbox.delivery import QueuedMailDelivery

    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(args.queue, transaction_manager=manager)
    if args.wait:
        print("started", flush=True)
        sys.stdin.readline()
    for i in range(args.count):
        message_id = f"{args.prefix}-{i}@mailoutbox.test"
        with manager:
            delivery.send(SENDER, [RECIPIENT], make_message(message_id, args.size))
        print(message_id, flush=True)
    return 0


class Killer:
    """A data manager that kills its process in ``tpc_vote`` or
    ``tpc_finish``, sorted after or before the other data managers."""

    def __init__(self, manager, when: str, sort_key: str, report) -> None:
        self.transaction_manager = manager
        self.when = when
        self.key = sort_key
        self.report = report

    def sortKey(self) -> str:
        return self.key

    def abort(self, txn) -> None:
        pass

    tpc_begin = commit = tpc_abort = abort

    def _maybe_die(self, phase: str) -> None:
        if phase == self.when:
            self.report(phase)
            os.kill(os.getpid(), signal.SIGKILL)

    def tpc_vote(self, txn) -> None:
        self._maybe_die("vote")

    def tpc_finish(self, txn) -> None:
        self._maybe_die("finish")


def _commit_crash(args: argparse.Namespace) -> int:
    import transaction

    from mailoutbox.delivery import QueuedMailDelivery

    def report(phase: str) -> None:
        folders = {f: listing(args.queue, f) for f in ("tmp", "new")}
        print(json.dumps({"phase": phase, **folders}), flush=True)

    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(args.queue, transaction_manager=manager)
    txn = manager.begin()
    ids = [
        delivery.send(SENDER, [RECIPIENT], make_message(f"crash-{i}@mailoutbox.test"))
        for i in range(3)
    ]
    print(json.dumps(ids), flush=True)
    # Ours is "mailoutbox.delivery:queued:...": "~" sorts after it, "!" before.
    if args.mode == "vote":
        txn.join(Killer(manager, "vote", "~last", report))
    elif args.mode == "finish":
        txn.join(Killer(manager, "finish", "!first", report))
    manager.commit()
    report("after")
    os.kill(os.getpid(), signal.SIGKILL)
    return 1  # killed above


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past *limit* bytes of a file fail with EFBIG meanwhile."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG, not death
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:  # coverage writes its data at exit
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _fsize_limit(args: argparse.Namespace) -> int:
    import transaction

    from mailoutbox.delivery import QueuedMailDelivery

    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(args.queue, transaction_manager=manager)
    recipients = [f"recipient-{i:04d}@example.org" for i in range(args.recipients)]
    outcomes = []
    with file_size_limit(args.limit):
        for i, size in enumerate(args.sizes):
            message_id = f"fsize-{i}@mailoutbox.test"
            try:
                with manager:
                    delivery.send(SENDER, recipients, make_message(message_id, size))
            except OSError as exc:
                outcomes.append(
                    {"id": message_id, "errno": exc.errno, "error": str(exc)})
            else:
                outcomes.append({"id": message_id, "errno": None})
    print(json.dumps(outcomes), flush=True)
    return 0


def _state_fsize(args: argparse.Namespace) -> int:
    from mailoutbox.maildir import Maildir

    queue_messages(args.queue, 2)
    maildir = Maildir(args.queue)
    first, second = (maildir.claim(entry) for entry in maildir.scan().entries)
    outcomes = {}
    with file_size_limit(args.limit):
        for name, claim, end in [
            ("defer", first, lambda: first.defer(time.time(), {"error": "x" * 200})),
            ("fail", second, lambda: second.fail({"error": "y" * 200})),
        ]:
            try:
                end()
            except OSError as exc:
                claim.release()  # as the processor does
                outcomes[name] = exc.errno
            else:
                outcomes[name] = None
    print(json.dumps(outcomes), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="_crash_helpers.py")
    commands = parser.add_subparsers(dest="command", required=True)
    drain = commands.add_parser("drain")
    drain.add_argument("queue")
    drain.add_argument("port", type=int)
    drain.add_argument("--concurrency", type=int, default=3)
    drain.add_argument("--lease", type=float, default=1.0)
    drain.add_argument("--deadline", type=float, default=120.0)
    until = drain.add_mutually_exclusive_group()
    until.add_argument("--until-empty", action="store_true")
    until.add_argument("--until-stdin", action="store_true")
    drain.set_defaults(run=_drain)
    produce = commands.add_parser("produce")
    produce.add_argument("queue")
    produce.add_argument("prefix")
    produce.add_argument("count", type=int)
    produce.add_argument("--size", type=int, default=200)
    produce.add_argument("--wait", action="store_true")
    produce.set_defaults(run=_produce)
    crash = commands.add_parser("commit-crash")
    crash.add_argument("queue")
    crash.add_argument("mode", choices=["vote", "finish", "after"])
    crash.set_defaults(run=_commit_crash)
    fsize = commands.add_parser("fsize-limit")
    fsize.add_argument("queue")
    fsize.add_argument("limit", type=int)
    fsize.add_argument("sizes", type=int, nargs="+")
    fsize.add_argument("--recipients", type=int, default=1)
    fsize.set_defaults(run=_fsize_limit)
    state = commands.add_parser("state-fsize")
    state.add_argument("queue")
    state.add_argument("limit", type=int)
    state.set_defaults(run=_state_fsize)
    args = parser.parse_args(argv)
    return args.run(args)


# -- running the processes --------------------------------------------------------


def run_helper(*args: str, **options) -> subprocess.Popen:
    """Start this script with *args*; its output is text, line-buffered."""
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, **options,
    )


def start_processor(queue: str, port: int, *options: str) -> subprocess.Popen:
    """Start a ``drain`` process; returns once it said ``started``."""
    process = run_helper("drain", queue, str(port), *options)
    line = process.stdout.readline().strip()
    if line != "started":
        process.kill()
        process.communicate()
        raise RuntimeError(f"the processor did not start: {line!r}")
    return process


@dataclass
class CrashDrainResult:
    """What :func:`crash_drain` found."""

    messages: int
    kills: int
    concurrency: int
    #: claims (``.sending-`` files) each killed processor held when killed
    claims_at_kills: list[int] = field(default_factory=list)
    delivered: int = 0  # distinct Message-Ids the server received
    received: int = 0  # messages the server received, duplicates included
    duplicates: int = 0
    lost: int = 0
    stranded_claims: int = 0  # claim files left after the final processor
    left_queued: int = 0  # messages still queued after the final processor
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def crash_drain(workdir: str, *, messages: int = 200, kills: int = 5,
                concurrency: int = 3, lease: float = 1.0, slow: float = 0.02,
                run_for: tuple[float, float] = (0.2, 1.0), seed: int | None = None,
                progress=None) -> CrashDrainResult:
    """Queue *messages*, then drain them into an in-process SMTP server
    with processor processes, killing (SIGKILL) *kills* of them after a
    random time in *run_for* seconds and starting a new one each time; a
    last processor then runs until the queue is empty.  Counts what the
    server received by Message-Id."""
    from mailoutbox.testing.smtpd import SMTPServer

    started = time.monotonic()
    rng = random.Random(seed)
    queue = os.path.join(workdir, "queue")
    ids = queue_messages(queue, messages, prefix="drain")
    result = CrashDrainResult(messages, kills, concurrency)
    options = ("--concurrency", str(concurrency), "--lease", str(lease))
    with SMTPServer() as server:
        server.slow(slow)  # each send waits twice this: kills land mid-send
        for kill in range(kills):
            before = claim_times(queue)
            process = start_processor(queue, server.port, *options)
            time.sleep(rng.uniform(*run_for))
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=30)
            # The claims this processor made or renewed (a dead one's
            # claims do not change).
            held = claim_times(queue).items() - before.items()
            result.claims_at_kills.append(len(held))
            if progress is not None:
                progress(f"kill {kill + 1}: {len(server.messages)} received,"
                         f" {len(queued(queue))} queued,"
                         f" {result.claims_at_kills[-1]} claim(s) held")
        process = start_processor(queue, server.port, *options, "--until-empty")
        process.communicate(timeout=300)
        received = Counter(server.message_ids())
    result.received = sum(received.values())
    result.delivered = len(received)
    result.duplicates = result.received - result.delivered
    result.lost = len(set(ids) - set(received))
    result.stranded_claims = len(claims(queue))
    result.left_queued = len(queued(queue))
    result.seconds = round(time.monotonic() - started, 1)
    return result


if __name__ == "__main__":
    sys.exit(main())
