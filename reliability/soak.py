"""Soak test: a queue under a steady load, sent to a server full of faults.

For *minutes* minutes a producer thread commits transactions through a
:class:`~mailoutbox.delivery.QueuedMailDelivery` (one to three messages
each; one transaction in twenty is aborted instead, and its messages must
never arrive), while a real :class:`~mailoutbox.queue.QueueProcessorThread`
(4 workers) sends the queue to the in-process SMTP server.  The server
misbehaves at random: each MAIL, RCPT and end of data may get a 4xx reply,
a 5xx reply (the message then fails for good, as it should) or a 421; it
drops every connection now and then (with or without a 421); it is slow at
random, sometimes for longer than the mailer's timeout (a reply that comes
too late: the server may have kept a message the processor will send
again, the one way a message is duplicated).  Then the faults stop and the
queue is drained.

Usage (from the top of the repository)::

    python reliability/soak.py [--minutes 2] [--rate 40] [--seed N] [--json]

Prints the messages enqueued, delivered, retried (deferral events), failed
(moved to the failed area after an injected 5xx), duplicated and lost
(enqueued, neither delivered nor failed), and the messages of aborted
transactions that arrived; exits with status 1 if a message was lost or an
aborted one arrived.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import transaction  # noqa: E402
import zope.event  # noqa: E402
from tests._crash_helpers import RECIPIENT  # noqa: E402
from tests._crash_helpers import SENDER  # noqa: E402
from tests._crash_helpers import is_complete  # noqa: E402
from tests._crash_helpers import make_message  # noqa: E402
from tests._crash_helpers import queue_is_idle  # noqa: E402

from mailoutbox.delivery import QueuedMailDelivery  # noqa: E402
from mailoutbox.interfaces import IMailErrorEvent  # noqa: E402
from mailoutbox.interfaces import IMailSentEvent  # noqa: E402
from mailoutbox.maildir import Maildir  # noqa: E402
from mailoutbox.mailer import SMTPMailer  # noqa: E402
from mailoutbox.queue import QueueProcessorThread  # noqa: E402
from mailoutbox.retry import RetryPolicy  # noqa: E402
from mailoutbox.testing.smtpd import SMTPServer  # noqa: E402

MAILER_TIMEOUT = 2.0
RETRY = RetryPolicy(initial=0.5, factor=2, cap=5, max_age=3600)
#: per command: (probability, reply); the rest of the time, no fault
FAULTS = {
    "MAIL": [(0.02, "451 4.3.0 Chaos: try later"), (0.003, "550 5.7.1 Chaos: no"),
             (0.005, "421 4.3.2 Chaos: closing")],
    "RCPT": [(0.02, "450 4.2.0 Chaos: mailbox busy"),
             (0.003, "550 5.1.1 Chaos: no such user")],
    "DATA": [(0.02, "452 4.3.1 Chaos: out of memory"),
             (0.003, "554 5.6.0 Chaos: refused")],
}


class ChaosReplies(dict):
    """Stands in for the server's table of forced replies
    (``SMTPServer.rules.replies``): each lookup may draw a fault."""

    def __init__(self, rng: random.Random, injected: Counter) -> None:
        super().__init__()
        self.rng = rng
        self.injected = injected
        self.enabled = True

    def get(self, command, default=None):
        if self.enabled:
            draw = self.rng.random()
            for probability, reply in FAULTS.get(command, ()):
                if draw < probability:
                    self.injected[f"{command} {reply[:3]}"] += 1
                    return reply
                draw -= probability
        return default


class ChaosRules:
    """Stands in for ``SMTPServer.rules``: random replies and slowness."""

    def __init__(self, rng: random.Random, injected: Counter) -> None:
        self.rng = rng
        self.injected = injected
        self.replies = ChaosReplies(rng, injected)
        self.refuse: dict[str, str] = {}
        self.greylist: dict[str, int] = {}

    @property
    def delay(self) -> float:
        """Read before answering MAIL and the end of the data."""
        if not self.replies.enabled:
            return 0.0
        draw = self.rng.random()
        if draw < 0.001:
            self.injected["too slow"] += 1
            return MAILER_TIMEOUT + 0.5
        if draw < 0.1:
            return self.rng.uniform(0, 0.05)
        return 0.0


def produce(queue: str, rate: float, stop: threading.Event, rng: random.Random,
            committed: list[str], aborted: list[str]) -> None:
    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(queue, transaction_manager=manager)
    number = 0
    next_at = time.monotonic()
    while not stop.is_set():
        manager.begin()
        ids = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            number += 1
            ids.append(delivery.send(SENDER, [RECIPIENT], make_message(
                f"soak-{number}@mailoutbox.test", rng.randrange(200, 20_000))))
        if rng.random() < 0.05:
            manager.abort()
            aborted.extend(ids)
        else:
            manager.commit()
            committed.extend(ids)
        next_at += len(ids) / rate
        stop.wait(max(0.0, next_at - time.monotonic()))


def drop_connections(server: SMTPServer, stop: threading.Event,
                     rng: random.Random, injected: Counter) -> None:
    while not stop.wait(rng.uniform(0.5, 4.0)):
        reply = rng.choice((None, "421 4.4.2 Chaos: dropping you"))
        injected["connections dropped"] += server.drop_connections(reply)


def soak(minutes: float, rate: float, seed: int, say=print) -> dict:
    rng = random.Random(seed)
    injected: Counter = Counter()
    events: Counter = Counter()
    deferrals: dict[str, list[str]] = {}

    def count(event):
        if IMailSentEvent.providedBy(event):
            events["sent"] += 1
        elif IMailErrorEvent.providedBy(event):
            events["failed" if event.permanent else "deferred"] += 1
            if not event.permanent:
                deferrals.setdefault(event.messageId, []).append(event.errorMessage)

    zope.event.subscribers.append(count)
    committed: list[str] = []
    aborted: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="soak-") as workdir, SMTPServer() as server:
        queue = os.path.join(workdir, "queue")
        server.rules = ChaosRules(random.Random(rng.random()), injected)
        processor = QueueProcessorThread(interval=0.2, concurrency=4, retry=RETRY,
                                         lease=10)
        processor.setMailer(SMTPMailer("127.0.0.1", server.port, no_tls=True,
                                       timeout=MAILER_TIMEOUT))
        processor.setQueuePath(queue)
        stop_load = threading.Event()
        threads = [
            threading.Thread(target=produce, args=(
                queue, rate, stop_load, random.Random(rng.random()), committed,
                aborted)),
            threading.Thread(target=drop_connections, args=(
                server, stop_load, random.Random(rng.random()), injected)),
        ]
        for thread in threads:
            thread.start()
        processor.start()
        end = started + minutes * 60
        while time.monotonic() < end:
            time.sleep(min(10.0, max(0.0, end - time.monotonic())))
            say(f"{time.monotonic() - started:5.0f} s: {len(committed)} committed,"
                f" {len(server.messages)} received, {dict(events)}")
        stop_load.set()
        for thread in threads:
            thread.join(30)
        server.rules.replies.enabled = False  # the faults stop: drain
        drained_at = time.monotonic()
        deadline = drained_at + 120
        while not queue_is_idle(queue) and time.monotonic() < deadline:
            time.sleep(0.2)
        processor.stop(timeout=30)
        drain_seconds = time.monotonic() - drained_at
        received = Counter(server.message_ids())
        whole = all(is_complete(m.data) for m in server.messages)
        maildir = Maildir(queue)
        failed = {maildir.reason(e).get("message_id") for e in maildir.failed_entries()}
        left = len(maildir.scan().entries)
    zope.event.subscribers.remove(count)
    delivered = set(received) & set(committed)
    # Why each duplicate was sent again: the failures of its earlier tries.
    causes = Counter(
        error for message_id, n in received.items() if n > 1
        for error in deferrals.get(message_id, ["(no deferral)"])
    )
    lost = set(committed) - delivered - failed
    return {
        "seed": seed,
        "minutes": minutes,
        "enqueued": len(committed),
        "delivered": len(delivered),
        "received": sum(received.values()),
        "retried": events["deferred"],
        "failed": len(failed),
        "failed_after_delivery": len(failed & delivered),
        "duplicated": sum(received.values()) - len(received),
        "lost": len(lost),
        "aborted": len(aborted),
        "aborted_arrived": len(set(received) & set(aborted)),
        "unknown_arrived": len(set(received) - set(committed) - set(aborted)),
        "left_queued": left,
        "all_whole": whole,
        "drain_seconds": round(drain_seconds, 1),
        "injected": dict(sorted(injected.items())),
        "duplicate_causes": dict(causes),
        "failed_events": events["failed"],
        "sent_events": events["sent"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=40.0,
                        help="messages committed per second")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--log-level", default="CRITICAL",
                        help="of mailoutbox's log, on standard error (the"
                             " injected faults make many warnings and errors)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    seed = random.randrange(2**32) if args.seed is None else args.seed
    say = (lambda text: None) if args.json else print
    say(f"soak for {args.minutes:g} min at {args.rate:g} msg/s, seed {seed}")
    result = soak(args.minutes, args.rate, seed, say)
    ok = (result["lost"] == 0 and result["aborted_arrived"] == 0
          and result["unknown_arrived"] == 0 and result["left_queued"] == 0
          and result["all_whole"])
    result["ok"] = ok
    if args.json:
        print(json.dumps(result))
    else:
        for key in ("enqueued", "delivered", "retried", "failed",
                    "failed_after_delivery", "duplicated", "lost", "aborted",
                    "aborted_arrived", "left_queued", "drain_seconds", "injected",
                    "duplicate_causes"):
            print(f"{key + ':':23} {result[key]}")
        print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
