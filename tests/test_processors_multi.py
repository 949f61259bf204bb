"""Several processors on one queue, and processors that die.

Real processes (tests/_drain_worker.py) drain one queue into the in-process
SMTP server at the same time; the server counts what it received by
Message-Id.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

from mailoutbox.queue import QueueProcessorThread

from ._drain_worker import fill_queue
from ._drain_worker import make_mailer

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_drain_worker.py")


def start_worker(queue_path, port, *options):
    process = subprocess.Popen(
        [sys.executable, WORKER, queue_path, str(port), *options],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout.readline().strip() == "started"
    return process


def finish(process, timeout=60):
    out, _err = process.communicate(timeout=timeout)
    assert process.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def leftovers(queue_path):
    return sorted(
        name for sub in ("new", "cur")
        for name in os.listdir(os.path.join(queue_path, sub))
    )


def test_processes_draining_one_queue_send_each_message_once(
        smtp_server, queue_path):
    ids = fill_queue(queue_path, 300)
    workers = [
        start_worker(queue_path, smtp_server.port, "--concurrency", "3", "--wait")
        for _ in range(3)
    ]
    for process in workers:  # go, all at once
        process.stdin.write("go\n")
        process.stdin.flush()
    totals = [finish(process) for process in workers]
    received = Counter(smtp_server.message_ids())
    assert sorted(received) == sorted(ids)
    assert set(received.values()) == {1}, "a message was sent twice"
    assert sum(t["sent"] for t in totals) == 300
    assert sum(1 for t in totals if t["sent"]) >= 2, totals  # they did compete
    assert leftovers(queue_path) == []


def test_threads_draining_one_queue_send_each_message_once(
        smtp_server, queue_path):
    ids = fill_queue(queue_path, 200)
    processors = []
    for _ in range(4):
        processor = QueueProcessorThread(concurrency=2)
        processor.setMailer(make_mailer(smtp_server.port))
        processor.setQueuePath(queue_path)
        processors.append(processor)
    results = []
    threads = [
        threading.Thread(target=lambda p=p: results.append(p.process_queue()))
        for p in processors
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for processor in processors:
        processor.stop()
    assert Counter(smtp_server.message_ids()) == Counter(ids)
    assert sum(stats.sent for stats in results) == 200
    assert leftovers(queue_path) == []


def test_messages_of_a_killed_processor_are_sent_by_another(
        smtp_server, queue_path):
    ids = fill_queue(queue_path, 40)
    smtp_server.slow(0.05)  # about 0.1 s per message and connection
    victim = start_worker(queue_path, smtp_server.port, "--concurrency", "3",
                          "--lease", "1")
    deadline = time.monotonic() + 20
    while len(smtp_server.messages) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    # The workers finish their messages at the same moment (the server
    # delays them all alike): kill in the middle of the next ones.
    while not any(n.startswith(".sending-") for n in leftovers(queue_path)):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=10)
    claimed = [n for n in leftovers(queue_path) if n.startswith(".sending-")]
    assert claimed, "the processor died holding no claim: kill it earlier"
    left_at_kill = [n for n in leftovers(queue_path) if not n.startswith(".")]
    smtp_server.slow(0)

    started = time.monotonic()
    survivor = start_worker(queue_path, smtp_server.port, "--lease", "1",
                            "--deadline", "30")
    totals = finish(survivor)
    # The dead processor's claims were broken after the lease (1 s).
    assert time.monotonic() - started < 15
    received = Counter(smtp_server.message_ids())
    assert sorted(received) == sorted(ids), "a message was lost"
    # Only a message in flight at the kill can have been sent twice.
    assert sum(received.values()) - len(ids) <= len(claimed)
    assert leftovers(queue_path) == []  # nothing claimed, nothing left
    assert totals["sent"] == len(left_at_kill)
