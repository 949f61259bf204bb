"""Drain a queue into an SMTP server on 127.0.0.1, in a process of its own.

Usage::

    python tests/_drain_worker.py QUEUE PORT [--concurrency N] [--lease S]
        [--deadline S] [--wait]

Makes passes over the queue until it is empty (messages claimed by other
processors count as not empty: they may be left by a dead processor) or
*deadline* seconds have passed, then prints the summed counts as JSON and
exits 0 (1 if the deadline passed first).  It prints ``started`` first,
once the processor is set up; with ``--wait`` it then waits for a line on
its standard input, so that several workers can start at once.

The tests of several processors on one queue (test_processors_multi.py) run
it; the helpers below are shared with the other queue tests.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def fill_queue(path: str, count: int, *, prefix: str = "msg", body: bytes = b"",
               recipients: tuple[str, ...] = ("rcpt@example.org",)) -> list[str]:
    """Queue *count* messages in the Maildir at *path* (created if needed),
    oldest first, and return their Message-Ids."""
    from mailoutbox.envelope import format_envelope
    from mailoutbox.maildir import Maildir

    maildir = Maildir(path, create=True)
    ids = []
    for i in range(count):
        message_id = f"{prefix}-{i}@mailoutbox.test"
        writer = maildir.newMessage()
        writer.write(format_envelope("sender@example.org", recipients))
        writer.write(
            b"From: sender@example.org\r\nTo: %s\r\nSubject: test %d\r\n"
            b"Message-Id: <%s>\r\n\r\nBody %d\r\n%s"
            % (", ".join(recipients).encode(), i, message_id.encode(), i, body)
        )
        writer.commit(fsync_dir=False)
        ids.append(message_id)
    return ids


def make_mailer(port: int, **options):
    """An SMTPMailer for the server on 127.0.0.1:*port*."""
    from mailoutbox.mailer import SMTPMailer

    return SMTPMailer("127.0.0.1", port, no_tls=True, **options)


def queue_is_empty(path: str) -> bool:
    for sub in ("new", "cur"):
        for name in os.listdir(os.path.join(path, sub)):
            if not name.startswith(".") or name.startswith(".sending-"):
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("queue")
    parser.add_argument("port", type=int)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--wait", action="store_true",
                        help="wait for a line on stdin before starting")
    args = parser.parse_args(argv)

    from mailoutbox.queue import QueueProcessorThread

    processor = QueueProcessorThread(concurrency=args.concurrency, lease=args.lease)
    processor.setMailer(make_mailer(args.port))
    processor.setQueuePath(args.queue)
    print("started", flush=True)
    if args.wait:
        sys.stdin.readline()
    totals = {"sent": 0, "deferred": 0, "failed": 0, "skipped": 0, "passes": 0}
    deadline = time.monotonic() + args.deadline
    try:
        while time.monotonic() < deadline:
            stats = processor.process_queue()
            totals["passes"] += 1
            for key in ("sent", "deferred", "failed", "skipped"):
                totals[key] += getattr(stats, key)
            if queue_is_empty(args.queue):
                break
            if not stats.attempted:
                time.sleep(0.05)  # others hold claims: look again soon
    finally:
        processor.stop()
    print(json.dumps(totals), flush=True)
    return 0 if queue_is_empty(args.queue) else 1


if __name__ == "__main__":
    sys.exit(main())
