"""The queue processor draining a PostgreSQL queue into a real SMTP server:
NOTIFY wake-ups, processors racing on the same rows, the lease of a dead
processor, and a database restart mid-drain."""
from __future__ import annotations

import time

import pytest

from mailoutbox.maildir import Entry
from mailoutbox.postgresql import open_queue
from mailoutbox.postgresql.store import QUEUE
from mailoutbox.queue import QueueProcessorThread
from tests import pg_fixtures
from tests._drain_worker import make_mailer
from tests.pg_fixtures import insert

pg_server = pg_fixtures.pg_server
pg_url = pg_fixtures.pg_url


@pytest.fixture
def make_processor():
    made = []

    def make(url, port, **options):
        processor = QueueProcessorThread(**options)
        processor.setMailer(make_mailer(port, timeout=5))
        processor.setQueuePath(url)
        made.append(processor)
        return processor

    yield make
    for processor in made:
        processor.stop(timeout=30)
        processor.maildir.close()


def queue(store, count, start=0, **options):
    """Insert *count* messages; their Message-Ids."""
    ids = []
    for number in range(start, start + count):
        message_id = f"<m{number}@example.com>"
        insert(store, message=(f"Message-Id: {message_id}\nSubject: {number}\n"
                               "\nbody\n").encode(), message_id=message_id,
               **options)
        ids.append(message_id.strip("<>"))
    return ids


def wait_for(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_pass_sends_in_priority_order(pg_url, smtp_server, make_processor):
    processor = make_processor(pg_url, smtp_server.port, concurrency=1)
    store = processor.maildir
    low = queue(store, 2)
    high = queue(store, 1, start=2, priority=5)
    queue(store, 1, start=3, not_before=time.time() + 3600)
    processor.process_queue()
    assert smtp_server.message_ids() == high + low
    scan = store.scan()  # the one scheduled for later waits
    assert [e.name for e in scan.entries] == list(scan.retry_at)
    assert len(scan.entries) == 1


def test_notify_wakes_an_idle_processor(pg_url, smtp_server, make_processor):
    processor = make_processor(pg_url, smtp_server.port, interval=3600)
    processor.start()
    store = open_queue(pg_url)
    try:
        wait_for(lambda: processor._lanes.wakeup is not None and
                 getattr(processor, "_pass_owner", None) is processor)
        time.sleep(0.5)  # the first pass (an empty queue) is over
        (message_id,) = queue(store, 1, notify=True)
        wait_for(lambda: smtp_server.message_ids() == [message_id])  # not 1 h
    finally:
        store.close()


def test_two_processors_never_send_a_message_twice(pg_url, smtp_server,
                                                   make_processor):
    store = open_queue(pg_url)
    try:
        ids = queue(store, 120)
        first = make_processor(pg_url, smtp_server.port, concurrency=3,
                               interval=0.2)
        second = make_processor(pg_url, smtp_server.port, concurrency=3,
                                interval=0.2)
        first.start()
        second.start()
        wait_for(lambda: len(smtp_server.message_ids()) >= len(ids))
        wait_for(lambda: not store.scan().entries)
        time.sleep(0.3)
        assert sorted(smtp_server.message_ids()) == sorted(ids)  # each once
    finally:
        store.close()


def test_a_dead_processors_claims_expire(pg_url, smtp_server, make_processor):
    store = open_queue(pg_url)
    try:
        ids = queue(store, 3)
        dead = [store.claim(Entry(QUEUE, e.name), 1.0)
                for e in store.scan().entries]
        assert all(dead)
        processor = make_processor(pg_url, smtp_server.port, interval=0.2)
        processor.process_queue()
        assert smtp_server.message_ids() == []  # claimed by a live processor
        time.sleep(1.2)
        processor.process_queue()
        assert sorted(smtp_server.message_ids()) == sorted(ids)
        for claim in dead:  # the dead one comes back: it changes nothing
            claim.complete()
        assert store.scan().entries == []
    finally:
        store.close()


@pytest.mark.slow
def test_a_database_restart_mid_drain(pg_server, smtp_server, make_processor,
                                      caplog):
    # Completions that wait for the disk (see test_postgresql_speed for the
    # default, which may forget the last ones at a crash of the database).
    url = pg_fixtures.table_url(pg_server, durable_complete=1)
    store = open_queue(url)
    try:
        ids = queue(store, 200)
        smtp_server.slow(0.01)
        processor = make_processor(url, smtp_server.port, concurrency=2,
                                   interval=0.2)
        processor.start()
        wait_for(lambda: len(smtp_server.message_ids()) >= 40)
        pg_server.restart("immediate")
        wait_for(lambda: set(smtp_server.message_ids()) >= set(ids), timeout=120)
        wait_for(lambda: not store.scan().entries)
        received = smtp_server.message_ids()
        duplicates = len(received) - len(set(received))
        # Only messages in flight at the restart (at most one per worker)
        # may have been sent twice.
        assert duplicates <= 2, duplicates
        assert set(received) == set(ids)
        # The store waited for the server: no statement failed, so no
        # message sent was left claimed in the queue (to be sent again once
        # its lease ran out).
        assert "could not remove" not in caplog.text
        assert "unexpected error" not in caplog.text
    finally:
        store.close()


def test_a_committed_send_wakes_the_processor(pg_server, smtp_server,
                                             make_processor, tm):
    """End to end: QueuedMailDelivery(url) commits a row and its NOTIFY; an
    idle processor (polling hourly) sends it at once."""
    from mailoutbox.delivery import QueuedMailDelivery

    url = pg_fixtures.table_url(pg_server)
    processor = make_processor(url, smtp_server.port, interval=3600)
    processor.start()
    wait_for(lambda: processor.maildir is not None and getattr(
        processor, "_pass_owner", None) is processor)
    time.sleep(0.5)  # the first pass (of an empty queue) is over
    delivery = QueuedMailDelivery(url, transaction_manager=tm)
    tm.begin()
    message_id = delivery.send("a@example.com", ["b@example.com"],
                               b"Subject: now\n\nbody\n")
    tm.commit()
    wait_for(lambda: smtp_server.message_ids() == [message_id])
    assert processor.maildir.scan().entries == []


def test_a_flush_sends_deferred_rows_now_but_not_scheduled_ones(
        pg_url, smtp_server, make_processor):
    processor = make_processor(pg_url, smtp_server.port, concurrency=1)
    store = processor.maildir
    (deferred,) = queue(store, 1)
    (scheduled,) = queue(store, 1, start=1, not_before=time.time() + 3600)
    [entry] = [e for e in store.scan().entries
               if store.read(e).find(deferred.encode()) >= 0]
    claim = store.claim(entry, 30, exact=True)
    claim.defer(time.time() + 3600, {"attempts": 1, "error": "later"})
    assert processor.process_queue().sent == 0  # neither is due
    stats = processor.process_queue(flush=True)
    assert (stats.sent, smtp_server.message_ids()) == (1, [deferred])
    assert [e.name for e in store.scan().entries] == list(store.scan().retry_at)
    assert scheduled not in smtp_server.message_ids()


def test_a_processor_thread_for_a_url_logs_no_password(pg_url, smtp_server,
                                                       caplog):
    import logging

    from mailoutbox.processors import processor_threads
    from mailoutbox.processors import start_processor_thread
    from mailoutbox.processors import stop_processor_threads

    url = pg_url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@")
    with caplog.at_level(logging.INFO):
        thread = start_processor_thread(url, make_mailer(smtp_server.port))
        again = start_processor_thread(url, make_mailer(smtp_server.port))
        try:
            assert again is thread and list(processor_threads().values()) == [thread]
            (message_id,) = queue(thread.maildir, 1, notify=True)
            wait_for(lambda: smtp_server.message_ids() == [message_id])
        finally:
            stop_processor_threads(timeout=30)
    assert "started the processor thread for" in caplog.text
    assert "already serves" in caplog.text
    assert "s3cret" not in caplog.text
