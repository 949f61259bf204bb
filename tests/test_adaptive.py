"""The adaptive number of workers of a pass (mailoutbox.workers.Pass)."""
from __future__ import annotations

import threading
import time

import transaction

from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread
from mailoutbox.workers import SAMPLES
from mailoutbox.workers import SLOW_SEND
from mailoutbox.workers import Pass


def make_pass(tmp_path, count=5, workers=4, adaptive=True, stopping=None):
    queue = str(tmp_path / "queue")
    delivery = QueuedMailDelivery(queue)
    with transaction.manager:
        for i in range(count):
            delivery.send("a@example.org", [f"r{i}@example.org"], b"Subject: s\n\nb\n")
    maildir = Maildir(queue)
    return Pass(maildir, maildir.scan(), time.time, stopping or threading.Event(),
                None, None, workers, adaptive=adaptive)


def test_not_adaptive_uses_every_worker(tmp_path):
    job = make_pass(tmp_path, adaptive=False)
    assert job.active == 4
    job.observe(0.001, 0.001)
    assert job.active == 4


def test_adaptive_starts_with_one_worker_and_decides_from_samples(tmp_path):
    job = make_pass(tmp_path)
    assert job.active == 1
    for _ in range(SAMPLES - 1):
        job.observe(0.002, 0.001)  # half the time waiting: 2 overlap
        assert job.active == 1
    job.observe(0.002, 0.001)
    assert job.active == 2
    job.observe(1.0, 0.0)  # decided: later sends change nothing
    assert job.active == 2


def test_cpu_bound_sends_keep_one_worker(tmp_path):
    job = make_pass(tmp_path)
    for _ in range(SAMPLES):
        job.observe(0.001, 0.001)
    assert job.active == 1


def test_a_slow_send_uses_every_worker_at_once(tmp_path):
    job = make_pass(tmp_path)
    job.observe(SLOW_SEND, 0.001)
    assert job.active == 4


def test_waiting_worker_runs_when_its_slot_becomes_active(tmp_path):
    job = make_pass(tmp_path)
    assert job.join() == 0
    assert job.join() == 1
    got = []
    waiter = threading.Thread(target=lambda: got.append(job.next_entry(1)))
    waiter.start()
    time.sleep(0.15)
    assert got == []  # slot 1 is not active yet
    job.observe(SLOW_SEND, 0.0)
    waiter.join(2)
    assert got and got[0] is not None


def test_waiting_worker_ends_when_the_entries_run_out(tmp_path):
    job = make_pass(tmp_path, count=1)
    got = []
    waiter = threading.Thread(target=lambda: got.append(job.next_entry(1)))
    waiter.start()
    assert job.next_entry(0) is not None
    assert job.next_entry(0) is None
    waiter.join(2)
    assert got == [None]


def test_waiting_worker_ends_when_stopping(tmp_path):
    stopping = threading.Event()
    job = make_pass(tmp_path, stopping=stopping)
    got = []
    waiter = threading.Thread(target=lambda: got.append(job.next_entry(3)))
    waiter.start()
    stopping.set()
    waiter.join(2)
    assert got == [None]


def test_slow_relay_gets_every_connection(tmp_path, smtp_server):
    """Against a relay that takes its time, the pass goes parallel."""
    smtp_server.slow(SLOW_SEND)
    queue = str(tmp_path / "queue")
    delivery = QueuedMailDelivery(queue)
    with transaction.manager:
        for i in range(12):
            delivery.send("a@example.org", [f"r{i}@example.org"], b"Subject: s\n\nb\n")
    processor = QueueProcessorThread(concurrency=4)
    processor.setMailer(SMTPMailer(smtp_server.host, smtp_server.port))
    processor.setQueuePath(queue)
    stats = processor.process_queue()
    processor.stop()
    assert stats.sent == 12
    # The first send was slow: every worker took part, each with its own
    # connection (one at a time would have used one).
    assert smtp_server.connections == 4
