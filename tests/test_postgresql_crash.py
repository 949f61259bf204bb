"""Three processor processes drain a PostgreSQL queue while they are killed
(SIGKILL) at random moments and the database restarts mid-drain
(``pg_ctl restart -m immediate``): nothing is lost, no row stays queued or
claimed, and a message is sent twice only if it was in flight at a kill or
at the restart.

The processors are those of the Maildir crash tests
(``tests/_crash_helpers.py drain``: a real
:class:`~mailoutbox.queue.QueueProcessorThread` in its own process); the
in-process SMTP server counts what it received by Message-Id.
"""
from __future__ import annotations

import random
import signal
import time
from collections import Counter

import pytest

from mailoutbox.postgresql import open_queue
from mailoutbox.testing.smtpd import SMTPServer
from tests import pg_fixtures
from tests._crash_helpers import RECIPIENT
from tests._crash_helpers import SENDER
from tests._crash_helpers import is_complete
from tests._crash_helpers import make_message
from tests._crash_helpers import start_processor
from tests.pg_fixtures import insert

pg_server = pg_fixtures.pg_server
pg_url = pg_fixtures.pg_url

MESSAGES = 300
PROCESSES = 3
CONCURRENCY = 3
KILLS = 6


def _count(store, where, params=()):
    from psycopg import sql

    query = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
        sql.Identifier(*store.table.split(".")), sql.SQL(where))
    return store.connections.run(
        lambda conn: conn.execute(query, params).fetchone()[0])


def claims_of(store, pid):
    """The rows claimed by process *pid* (a dead one's claims stay until
    another processor takes the row, one lease later)."""
    return _count(store, "claimed_by LIKE %s", (f"%:{pid}:%",))


def live_claims(store):
    return _count(store, "claimed_until > now()")


def left(store):
    """(queued rows, claimed rows): both 0 once the queue is drained."""
    return (_count(store, "state = 'queued'"),
            _count(store, "claimed_by IS NOT NULL"))


@pytest.mark.slow
def test_processes_killed_and_database_restarted_lose_nothing(pg_server, pg_url):
    # Durable completions: the bound below is then the messages in flight.
    # (By default a crash of the database may also forget the completions
    # of its last moments: test_postgresql_speed checks that nothing is
    # lost or stuck then.)
    pg_url += "&durable_complete=1"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    store = open_queue(pg_url)
    ids = [f"pgcrash-{i}@mailoutbox.test" for i in range(MESSAGES)]
    for message_id in ids:
        insert(store, fromaddr=SENDER, toaddrs=(RECIPIENT,),
               message=make_message(message_id), message_id=f"<{message_id}>")
    options = ("--concurrency", str(CONCURRENCY), "--lease", "1.0")
    claims_at_kills = []
    claims_at_restart = None
    queued_at_restart = None
    restart_after = rng.randrange(1, 3)  # between two early kills
    with SMTPServer() as server:
        server.slow(0.15)  # each send waits twice this: kills land mid-send
        processes = [start_processor(pg_url, server.port, *options)
                     for _ in range(PROCESSES)]
        try:
            for kill in range(KILLS):
                time.sleep(rng.uniform(0.2, 0.8))
                victim = rng.randrange(PROCESSES)
                process = processes[victim]
                process.send_signal(signal.SIGKILL)
                process.communicate(timeout=30)
                claims_at_kills.append(claims_of(store, process.pid))
                processes[victim] = start_processor(pg_url, server.port, *options)
                if kill == restart_after:
                    time.sleep(rng.uniform(0.1, 0.5))
                    claims_at_restart = live_claims(store)
                    queued_at_restart = left(store)[0]
                    pg_server.restart("immediate")
            deadline = time.monotonic() + 240
            while left(store) != (0, 0):
                assert time.monotonic() < deadline, (
                    f"seed {seed}: not drained: {left(store)}")
                time.sleep(0.2)
        finally:
            for process in processes:
                process.send_signal(signal.SIGKILL)
                process.communicate(timeout=30)
            store.close()
        received = Counter(server.message_ids())
        complete = all(is_complete(m.data) for m in server.messages)
    delivered = len(received)
    duplicates = sum(received.values()) - delivered
    lost = set(ids) - set(received)
    # A killed processor held at most CONCURRENCY claims; at the immediate
    # restart each of the PROCESSES processors had at most CONCURRENCY
    # messages in flight (a claim or its end, not yet on disk, may be lost,
    # and a message is sent again only when its claim or its deletion was).
    bound = KILLS * CONCURRENCY + PROCESSES * CONCURRENCY
    figures = (f"seed {seed}: {MESSAGES} messages, {delivered} delivered,"
               f" {duplicates} duplicate(s), {KILLS} kills holding"
               f" {claims_at_kills} claims, 1 immediate restart with"
               f" {claims_at_restart} claims live and {queued_at_restart}"
               f" rows queued; bound {bound}")
    print(figures)
    assert not lost, figures
    assert delivered == MESSAGES, figures
    assert complete, figures
    assert duplicates <= sum(claims_at_kills) + PROCESSES * CONCURRENCY, figures
    assert duplicates <= bound, figures
    assert all(n <= CONCURRENCY for n in claims_at_kills), figures
    # The kills and the restart landed mid-drain.
    assert sum(claims_at_kills) > 0 and queued_at_restart, figures
