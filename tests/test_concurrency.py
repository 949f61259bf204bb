"""Many writers and two processors on one queue at once.

Eight threads commit 200 transactions each and four processes 100 each
(one message per transaction, through QueuedMailDelivery), while two
processor processes (tests/_crash_helpers.py ``drain``) send the queue to
the in-process SMTP server.  Every message must arrive exactly once.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
import transaction

from mailoutbox.delivery import QueuedMailDelivery

from ._crash_helpers import RECIPIENT
from ._crash_helpers import SENDER
from ._crash_helpers import claims
from ._crash_helpers import is_complete
from ._crash_helpers import listing
from ._crash_helpers import make_message
from ._crash_helpers import queued
from ._crash_helpers import run_helper
from ._crash_helpers import start_processor

THREADS, PER_THREAD = 8, 200
PROCESSES, PER_PROCESS = 4, 100


def commit_messages(queue, prefix, count, ids, errors):
    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(queue, transaction_manager=manager)
    try:
        for i in range(count):
            with manager:
                ids.append(delivery.send(
                    SENDER, [RECIPIENT], make_message(f"{prefix}-{i}@mailoutbox.test")))
    except BaseException as exc:  # reported by the test
        errors.append(exc)


@pytest.mark.slow
def test_writers_and_processors_at_once_deliver_each_message_once(
        queue_path, smtp_server):
    started = time.monotonic()
    processors = [
        start_processor(queue_path, smtp_server.port, "--concurrency", "2",
                        "--lease", "5", "--until-stdin", "--deadline", "60")
        for _ in range(2)
    ]
    producers = [
        run_helper("produce", queue_path, f"process{p}", str(PER_PROCESS), "--wait")
        for p in range(PROCESSES)
    ]
    for process in producers:
        assert process.stdout.readline().strip() == "started"
    thread_ids: list[str] = []
    errors: list[BaseException] = []
    threads = [
        threading.Thread(
            target=commit_messages,
            args=(queue_path, f"thread{t}", PER_THREAD, thread_ids, errors),
        )
        for t in range(THREADS)
    ]
    for process in producers:  # go, all at once
        process.stdin.write("go\n")
        process.stdin.flush()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    process_ids = []
    for process in producers:
        out, _err = process.communicate(timeout=60)
        assert process.returncode == 0
        process_ids.extend(out.split())
    # Everything is committed: let the processors finish the queue.
    totals = []
    for process in processors:
        process.stdin.write("done\n")
        process.stdin.flush()
    for process in processors:
        out, _err = process.communicate(timeout=60)
        assert process.returncode == 0, out
        totals.append(json.loads(out.strip().splitlines()[-1]))

    ids = thread_ids + process_ids
    assert len(ids) == len(set(ids)) == THREADS * PER_THREAD + PROCESSES * PER_PROCESS
    received = Counter(smtp_server.message_ids())
    assert received == Counter(ids), "a message was lost or sent twice"
    assert all(is_complete(m.data) for m in smtp_server.messages)
    assert sum(t.get("sent", 0) for t in totals) == len(ids)
    assert all(t.get("sent", 0) for t in totals), totals  # both took part
    assert queued(queue_path) == [] and claims(queue_path) == []
    assert listing(queue_path, "tmp") == []
    assert time.monotonic() - started < 60
