"""The behaviour behind the PostgreSQL store's drain speed: claims and
completions in one statement each, not waiting for the disk unless the URL
asks (``durable_complete=1``), and a lane found without a due message not
searched again for a while (no timings here: see benchmarks/)."""
from __future__ import annotations

import pytest

from mailoutbox.maildir import Entry
from mailoutbox.postgresql import open_queue
from mailoutbox.postgresql._conn import parse_url
from mailoutbox.postgresql.store import QUEUE
from tests import pg_fixtures
from tests.pg_fixtures import insert
from tests.pg_fixtures import table_url

pg_server = pg_fixtures.pg_server
pg_url = pg_fixtures.pg_url


store = pg_fixtures.pg_store


def state(store, name):
    from psycopg import sql
    query = sql.SQL("SELECT state, claimed_by FROM {} WHERE id = %s").format(
        sql.Identifier(*store.table.split(".")))
    return store.connections.run(
        lambda conn: conn.execute(query, (int(name),)).fetchone())


def setting(store):
    """synchronous_commit of a connection of the store, after its use."""
    return store.connections.run(
        lambda conn: conn.execute("SHOW synchronous_commit").fetchone()[0])


def test_durable_complete_in_the_url():
    assert parse_url("postgresql://u@h/db").durable_complete is False
    assert parse_url("postgresql://u@h/db?durable_complete=0").durable_complete is False
    parsed = parse_url("postgresql://u:pw@h/db?durable_complete=1&table=t")
    assert (parsed.durable_complete, parsed.table) == (True, "t")
    assert "durable_complete" not in parsed.conninfo  # not for libpq
    assert parsed.path == "postgresql://u@h/db?durable_complete=1&table=t"
    with pytest.raises(ValueError, match="durable_complete must be 0 or 1") as exc:
        parse_url("postgresql://u:s3cret@h/db?durable_complete=yes")
    assert "s3cret" not in str(exc.value)


@pytest.mark.parametrize("durable", ["0", "1"])
@pytest.mark.parametrize("keep_sent", ["0", "2"])
def test_complete_durable_or_not(pg_server, durable, keep_sent):
    store = open_queue(table_url(pg_server, durable_complete=durable,
                                 keep_sent=keep_sent))
    try:
        assert store.url.durable_complete is (durable == "1")
        name = insert(store)
        claim = store.claim(Entry(QUEUE, name), 30)
        assert claim.read().endswith(b"body\n")
        assert state(store, name)[1] == claim.holder
        claim.complete()
        assert state(store, name) == (None if keep_sent == "0" else ("sent", None))
        assert store.scan().entries == []
        # The claim and the completion did not wait for the disk in their own
        # transactions only: the connection's setting is the server's.
        assert setting(store) == "on"
    finally:
        store.close()


def test_a_completion_of_a_lost_claim_changes_nothing(store):
    name = insert(store)
    claim = store.claim(Entry(QUEUE, name), 30)
    claim.release()
    other = store.claim(Entry(QUEUE, name), 30)
    claim.complete()  # no longer its claim
    assert state(store, name) == ("queued", other.holder)
    other.complete()
    assert state(store, name) is None


def test_a_lane_run_dry_is_not_searched_again_for_a_while(store, monkeypatch):
    # Long enough whatever the machine's load, until the end of the test.
    monkeypatch.setattr("mailoutbox.postgresql.store.DRY_TIME", 3600.0)
    first, second, third = (insert(store) for _ in range(3))
    assert [e.name for e in store.scan().entries] == [first, second, third]
    held = store.claim(Entry(QUEUE, first), 30)
    # Taken: the next due one instead.
    assert store.claim(Entry(QUEUE, first), 30).entry.name == second
    assert store.claim(Entry(QUEUE, third), 30).entry.name == third
    assert store.claim(Entry(QUEUE, second), 30) is None  # the lane ran dry
    # Dry: not asked again (a message queued meanwhile is in the next pass)...
    fourth = insert(store)
    assert store.claim(Entry(QUEUE, fourth), 30) is None
    # ... but for an exact claim (a repair).
    exact = store.claim(Entry(QUEUE, fourth), 30, exact=True)
    assert exact.entry.name == fourth
    # A release of a claim of the lane: asked again.
    exact.release()
    assert store.claim(Entry(QUEUE, first), 30).entry.name == fourth
    assert store.claim(Entry(QUEUE, first), 30) is None  # dry again
    # A new listing: asked again.
    fifth = insert(store)
    store.scan()
    assert store.claim(Entry(QUEUE, first), 30).entry.name == fifth
    # Once DRY_TIME has passed: asked again.
    monkeypatch.setattr("mailoutbox.postgresql.store.DRY_TIME", 0.0)
    assert store.claim(Entry(QUEUE, first), 30) is None
    sixth = insert(store)
    assert store.claim(Entry(QUEUE, first), 30).entry.name == sixth
    held.release()


def test_an_exact_claim_does_not_make_the_lane_dry(store):
    name = insert(store)
    claim = store.claim(Entry(QUEUE, name), 30)
    assert store.claim(Entry(QUEUE, name), 30, exact=True) is None
    claim.release()
    other = insert(store)
    # Not dry: a taken entry gives the next due one.
    assert store.claim(Entry(QUEUE, name), 30).entry.name == name
    assert store.claim(Entry(QUEUE, name), 30).entry.name == other


def test_a_relay_lane_run_dry(store):
    lane = store.relay("r")
    first = insert(store, relay="r")
    insert(store)  # the default lane's
    lane.scan()
    claim = lane.claim(Entry(QUEUE, first), 30)
    assert lane.claim(Entry(QUEUE, first), 30) is None  # dry
    claim.release()
    assert lane.claim(Entry(QUEUE, first), 30).entry.name == first
    assert lane.claim(Entry(QUEUE, "x"), 30) is None


@pytest.mark.slow
def test_a_database_crash_may_send_the_last_completed_again(pg_server, smtp_server):
    """Completions not waiting for the disk: an immediate restart of the
    database (a crash) may forget the last ones, whose messages are sent
    again once their lease ran out: duplicates, nothing lost, nothing
    stuck."""
    from mailoutbox.queue import QueueProcessorThread
    from tests._drain_worker import make_mailer
    from tests.test_postgresql_processor import queue
    from tests.test_postgresql_processor import wait_for

    url = table_url(pg_server)
    store = open_queue(url)
    processor = QueueProcessorThread(concurrency=2, interval=0.2, lease=2)
    processor.setMailer(make_mailer(smtp_server.port, timeout=5))
    processor.setQueuePath(url)
    try:
        ids = queue(store, 200)
        smtp_server.slow(0.01)
        processor.start()
        wait_for(lambda: len(smtp_server.message_ids()) >= 40)
        pg_server.restart("immediate")
        wait_for(lambda: set(smtp_server.message_ids()) >= set(ids), timeout=120)
        wait_for(lambda: not store.scan().entries)
        received = smtp_server.message_ids()
        assert set(received) == set(ids)  # nothing lost
        assert len(received) < 2 * len(ids)
    finally:
        processor.stop(timeout=30)
        processor.maildir.close()
        store.close()


@pytest.mark.parametrize("relay", [None, "r"])
def test_the_next_due_row_comes_from_the_index_unsorted(store, relay):
    """A claim finds the next due row of its lane by the lane's index
    (relay, priority DESC, id), without sorting the lane (for the default
    lane too, whose rows have relay NULL)."""
    lane = store if relay is None else store.relay(relay)
    query = lane._lane("claim").replace("UPDATE", "EXPLAIN UPDATE", 1)

    def plan(conn):
        with conn.transaction():
            conn.execute("SET LOCAL enable_sort TO off")
            return "\n".join(row[0] for row in conn.execute(query, {
                "by": "x", "lease": 30, "relay": relay, "id": 0}))
    text = store.connections.run(plan)
    assert "Sort" not in text, text
    assert "_due" in text, text
