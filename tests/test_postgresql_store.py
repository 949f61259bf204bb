"""The PostgreSQL queue store against a real server: every method of the
store contract, claims racing and expiring, reconnection after a restart,
the NOTIFY watcher, and the errors of open_queue."""
from __future__ import annotations

import os
import re
import sys
import threading
import time

import pytest
from zope.interface.verify import verifyObject

from mailoutbox.interfaces import IQueueClaim
from mailoutbox.interfaces import IQueueStore
from mailoutbox.maildir import Entry
from mailoutbox.postgresql import ConnectError
from mailoutbox.postgresql import SchemaError
from mailoutbox.postgresql import open_queue
from mailoutbox.postgresql._conn import Connections
from mailoutbox.postgresql._conn import parse_url
from mailoutbox.postgresql.store import FAILED
from mailoutbox.postgresql.store import QUEUE
from mailoutbox.postgresql.store import PostgreSQLQueue
from mailoutbox.schedule import scheduled_for
from mailoutbox.stores import open_store
from mailoutbox.wakeup import ALL
from tests import pg_fixtures
from tests.pg_fixtures import insert
from tests.pg_fixtures import psycopg
from tests.pg_fixtures import raw_url
from tests.pg_fixtures import table_url

pg_server = pg_fixtures.pg_server
pg_url = pg_fixtures.pg_url


store = pg_fixtures.pg_store


def sql(store, query, params=None):
    """Run *query* on the store's table ({t})."""
    from psycopg import sql as s
    text = s.SQL(query).format(t=s.Identifier(*store.table.split(".")))
    return store.connections.run(lambda conn: conn.execute(text, params).fetchall()
                                 if conn.execute(text, params).description else [])


def row(store, name, *columns):
    from psycopg import sql as s
    query = s.SQL("SELECT {} FROM {} WHERE id = %s").format(
        s.SQL(", ").join(map(s.Identifier, columns)),
        s.Identifier(*store.table.split(".")))
    return store.connections.run(
        lambda conn: conn.execute(query, (int(name),)).fetchone())


# -- opening ----------------------------------------------------------------------

def test_open_store_gives_the_postgresql_queue(pg_url):
    store = open_store(pg_url)
    try:
        assert isinstance(store, PostgreSQLQueue)
        assert verifyObject(IQueueStore, store)
        assert store.failed == FAILED
        assert repr(store) == f"<PostgreSQLQueue {store.path!r}>"
        assert repr(store.relay("r")) == f"<PostgreSQLQueue {store.path!r} relay 'r'>"
    finally:
        store.close()


def test_path_and_key_have_no_password(pg_server):
    url = table_url(pg_server)
    host = url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@")
    store = open_queue(host)
    try:
        assert "s3cret" not in store.path and "s3cret" not in store.key
        assert store.path == url
        assert store.key == open_queue(url).key
        assert store.key.endswith("?table=" + store.table)
    finally:
        store.close()


def test_password_parameter_is_not_shown():
    parsed = parse_url("postgresql://u@h/db?password=s3cret&sslmode=disable"
                       "&table=s.t&keep_sent=3")
    assert "s3cret" not in parsed.path and parsed.password == "s3cret"
    assert parsed.path == "postgresql://u@h/db?sslmode=disable&table=s.t&keep_sent=3"
    assert parsed.conninfo == "postgresql://u@h/db?password=s3cret&sslmode=disable"
    assert (parsed.table, parsed.keep_sent) == ("s.t", 3)


@pytest.mark.parametrize(("url", "says"), [
    ("mysql://u:s3cret@h/db", "starts with postgresql://"),
    ("postgresql://u:s3cret@h/db?table=a-b", "invalid queue table name"),
    ("postgresql://u:s3cret@h/db?keep_sent=x", "invalid literal"),
    ("postgresql://u:s3cret@h/db?keep_sent=-1", "0 or more days"),
    ("postgresql://u:s3cret@h/db?nonsense=1", 'invalid URI query parameter'),
])
def test_bad_urls(url, says):
    with pytest.raises(ValueError, match=says) as info:
        open_queue(url)
    assert "s3cret" not in str(info.value)
    assert "\n" not in str(info.value)


def test_unreachable_database(pg_server):
    url = f"postgresql://postgres:s3cret@127.0.0.1:{pg_server.port + 1}/x"
    with pytest.raises(ConnectError, match=r"cannot connect to postgresql://"
                       r"postgres@127\.0\.0\.1") as info:
        open_queue(url + "?connect_timeout=5")
    assert "s3cret" not in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_schema_names_the_command(pg_server):
    url = raw_url(pg_server, "nothing_here")
    with pytest.raises(SchemaError, match=re.escape(
            f"create it with 'mailoutbox init {url}'")):
        open_queue(url)


def test_old_schema_names_the_command(pg_server):
    url = table_url(pg_server, version=1)
    with pytest.raises(SchemaError, match=re.escape(
            f"upgrade it with 'mailoutbox init {url}'")):
        open_queue(url)


def test_without_psycopg(pg_url, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ValueError, match=r"pip install 'mailoutbox\[postgresql\]'"):
        open_queue(pg_url)


# -- the lane -----------------------------------------------------------------------

def test_scan_orders_by_priority_then_age(store):
    low = insert(store)
    high = insert(store, priority=5)
    later = insert(store, not_before=time.time() + 3600)
    other = insert(store)
    insert(store, relay="r1")
    scan = store.scan()
    assert [e.name for e in scan.entries] == [high, low, later, other]
    assert all(e.folder == QUEUE and e.regular for e in scan.entries)
    assert list(scan.retry_at) == [later]
    assert scan.retry_at[later] == pytest.approx(time.time() + 3600, abs=60)
    assert scan.claimed == set()
    claim = store.claim(scan.entries[0], 30)
    assert store.scan().claimed == {high}
    claim.release()


def test_priority_and_schedule(store):
    when = time.time() + 3600
    later = insert(store, not_before=when, priority=-10)
    high = insert(store, priority=10)
    assert store.priority(Entry(QUEUE, high)) == 10
    assert store.priority(Entry(QUEUE, later)) == -10
    assert store.priority(Entry(QUEUE, "999999")) == 0
    state = store.retry_state(Entry(QUEUE, later))
    assert state == {"not_before": pytest.approx(when, abs=1e-3), "attempts": 0}
    assert scheduled_for(state) == pytest.approx(when, abs=1e-3)
    assert store.retry_state(Entry(QUEUE, high)) is None
    claim = store.claim(Entry(QUEUE, later), 30, exact=True)
    claim.defer(when, {**state, "attempts": 1, "error": "451"})
    assert store.retry_state(Entry(QUEUE, later))["attempts"] == 1


def test_claim_takes_the_entry_or_the_next_free_due_one(store):
    first, second = insert(store), insert(store)
    insert(store, not_before=time.time() + 3600)
    one = store.claim(Entry(QUEUE, second), 30)
    assert verifyObject(IQueueClaim, one)
    assert one.entry == Entry(QUEUE, second)
    assert repr(one) == f"<PostgreSQLClaim {second!r}>"
    by, _until = row(store, second, "claimed_by", "claimed_until")
    assert by.startswith(f"{os.uname().nodename}:{os.getpid()}:")
    two = store.claim(Entry(QUEUE, second), 30)  # taken: the next one
    assert two.entry.name == first
    assert store.claim(Entry(QUEUE, first), 30) is None  # nothing due and free
    assert store.claim(Entry(QUEUE, "not-a-row"), 30) is None
    one.release()
    assert store.claim(Entry(QUEUE, "not-a-row"), 30).entry.name == second


def test_an_exact_claim_is_of_the_entry_due_or_not(store):
    first = insert(store)
    later = insert(store, not_before=time.time() + 3600)
    claim = store.claim(Entry(QUEUE, later), float("inf"), exact=True)
    assert claim.entry.name == later
    (until,) = row(store, later, "claimed_until")
    assert until.year > 2050  # "never stale"
    claim.renew()
    assert store.claim(Entry(QUEUE, later), 30, exact=True) is None  # taken
    assert store.claim(Entry(QUEUE, "x"), 30, exact=True) is None
    claim.release()
    assert store.claim(Entry(QUEUE, first), 30, exact=True).entry.name == first


def test_an_expired_claim_is_free(store):
    name = insert(store)
    dead = store.claim(Entry(QUEUE, name), 0.05)
    time.sleep(0.3)
    assert store.scan().claimed == set()
    alive = store.claim(Entry(QUEUE, name), 30)
    assert alive.entry.name == name
    # The dead processor's claim changes nothing any more.
    dead.renew()
    dead.defer(time.time() + 3600, {"attempts": 1})
    dead.rewrite(b"X-Zope-From: a@example.com\nX-Zope-To: b@example.com\n\nx")
    dead.fail({"error": "x"})
    dead.release()
    dead.complete()
    assert row(store, name, "state", "claimed_by", "retry", "fromaddr") == (
        "queued", alive.holder, None, "from@example.com")
    assert store.scan().claimed == {name}
    alive.complete()
    assert store.find(name) is None


def test_renew_extends_the_lease(store):
    name = insert(store)
    claim = store.claim(Entry(QUEUE, name), 0.5)
    (before,) = row(store, name, "claimed_until")
    claim.lease = 3600
    claim.renew()
    (after,) = row(store, name, "claimed_until")
    assert (after - before).total_seconds() > 3000
    claim.release()


def test_renew_logs_a_database_error(pg_server, caplog):
    url = parse_url(f"postgresql://postgres@127.0.0.1:{pg_server.port + 1}/x"
                    "?connect_timeout=5")
    from mailoutbox.postgresql.store import PostgreSQLClaim
    gone = PostgreSQLQueue(url, Connections(url))
    gone.connections.reconnect_window = 0.3  # tried again, then given up
    PostgreSQLClaim(gone, Entry(QUEUE, "1"), "h:1:x", 30).renew()
    assert "could not renew the claim of message 1" in caplog.text
    assert "Connection refused" in caplog.text


def test_read_and_retry_state(store):
    name = insert(store, toaddrs=("a@example.com", '"Doe, J" <j@example.com>'),
                  message=b"Subject: x\n\nbody")
    claim = store.claim(Entry(QUEUE, name), 30)
    data = (b"X-Zope-From: from@example.com\nX-Zope-To: a@example.com,"
            b' "Doe, J" <j@example.com>\nSubject: x\n\nbody')
    assert claim.read() == data
    assert store.read(claim.entry, 20) == data[:20]
    assert claim.retry_state() is None
    claim.defer(time.time() + 3600, {"attempts": 1})
    assert store.retry_state(Entry(QUEUE, name)) == {"attempts": 1}
    assert name in store.scan().retry_at
    assert store.claim(Entry(QUEUE, name), 30) is None  # not due
    purged = store.find(name)
    store.purge(purged)
    with pytest.raises(FileNotFoundError):
        claim.read()
    with pytest.raises(FileNotFoundError):
        store.read(Entry(QUEUE, "x"))
    assert store.retry_state(purged) is None
    assert store.reason(purged) is None
    assert store.queued_at(purged) == pytest.approx(time.time(), abs=60)


def test_complete_deletes_or_keeps_a_sent_log(pg_server):
    store = open_queue(table_url(pg_server, keep_sent=2))
    try:
        name = insert(store)
        store.claim(Entry(QUEUE, name), 30).complete()
        assert row(store, name, "state", "claimed_by") == ("sent", None)
        assert store.find(name) is None
        assert store.scan().entries == []
        with pytest.raises(FileNotFoundError):
            store.read(Entry(QUEUE, name))
        assert store.cleanup(store.scan(), 30) == 0  # sent today
        sql(store, "UPDATE {t} SET done_at = now() - interval '3 days'")
        assert store.relay("r").cleanup(store.scan(), 30) == 0  # the queue's job
        assert store.cleanup(store.scan(), 30) == 1
        assert row(store, name, "id") is None
    finally:
        store.close()


def test_cleanup_and_recover_without_a_sent_log(store):
    assert store.recover() == 0
    assert store.cleanup(store.scan(), 30, now=time.time()) == 0


def test_rewrite_split_failed_and_fail(store):
    name = insert(store, toaddrs=("a@example.com", "b@example.com"),
                  message_id="<m@x>", priority=3, relay="r1")
    lane = store.relay("r1")
    claim = lane.claim(Entry(QUEUE, name), 30)
    claim.rewrite(b"X-Zope-From: f@example.com\nX-Zope-To: a@example.com\nS: 1\n\nb")
    assert row(store, name, "fromaddr", "toaddrs", "message") == (
        "f@example.com", ["a@example.com"], b"S: 1\n\nb")
    part = claim.split_failed(
        b"X-Zope-From: f@example.com\nX-Zope-To: b@example.com\nS: 1\n\nb",
        {"error": "refused", "permanent": True})
    assert part.folder == FAILED and part.name != name
    assert row(store, part.name, "state", "relay", "toaddrs", "message_id",
               "priority") == ("failed", "r1", ["b@example.com"], "<m@x>", 3)
    assert lane.reason(part) == {"error": "refused", "permanent": True}
    assert lane.failed_entries() == [part]
    assert store.failed_entries() == []
    failed = claim.fail({"error": "boom"})
    assert failed == Entry(FAILED, name)
    assert lane.failed_entries() == [failed, part]  # by row id
    assert lane.reason(failed) == {"error": "boom"}
    assert store.find(name) == failed
    store.purge(failed)
    with pytest.raises(FileNotFoundError):
        claim.split_failed(b"X-Zope-From: f@example.com\nX-Zope-To: b@example.com"
                           b"\n\nb", {})


def test_relays_and_their_lanes(store):
    assert store.relays() == []
    insert(store, relay="r2")
    r1 = insert(store, relay="r1")
    insert(store)
    assert store.relays() == ["r1", "r2"]
    lane = store.relay("r1", create=True)
    assert lane.lane == "r1" and lane.key == store.key and lane.path == store.path
    assert [e.name for e in lane.scan().entries] == [r1]
    claim = lane.claim(Entry(QUEUE, "0"), 30)
    assert claim.entry.name == r1
    assert store.claim(Entry(QUEUE, r1), 30).entry.name != r1  # another lane
    with pytest.raises(ValueError):
        store.relay("")
    with pytest.raises(TypeError):
        store.relay(None)


def test_find_and_repairs(store):
    name = insert(store)
    assert store.find(name) == Entry(QUEUE, name)
    assert store.find("99999999") is None
    assert store.find("../x") is None
    assert store.find("9" * 30) is None
    assert store.queued_at(Entry(QUEUE, name)) == pytest.approx(time.time(), abs=60)
    failed = store.move_to_failed(Entry(QUEUE, name), {"error": "foreign"})
    assert failed == Entry(FAILED, name) == store.find(name)
    assert store.reason(failed) == {"error": "foreign"}
    with pytest.raises(FileNotFoundError):
        store.move_to_failed(Entry(QUEUE, name), {})
    assert store.scan().entries == []
    assert store.requeue(failed) == Entry(QUEUE, name)
    assert store.reason(Entry(QUEUE, name)) is None
    assert [e.name for e in store.scan().entries] == [name]
    claim = store.claim(Entry(QUEUE, name), 30)
    claim.defer(time.time() + 3600, {"attempts": 2})
    assert store.requeue(Entry(QUEUE, name)) == Entry(QUEUE, name)
    assert store.scan().retry_at == {} and store.retry_state(Entry(QUEUE, name)) is None
    store.purge(Entry(QUEUE, name))
    with pytest.raises(FileNotFoundError):
        store.requeue(Entry(QUEUE, name))


# -- many processors ------------------------------------------------------------------

def test_racing_claimers_send_each_message_once(store):
    names = {insert(store) for _ in range(60)}
    scan = store.scan()
    sent = []
    lock = threading.Lock()

    def drain():
        own = open_queue(store.url.conninfo + "&table=" + store.table) \
            if "?" in store.url.conninfo else open_queue(
                store.url.conninfo + "?table=" + store.table)
        try:
            for entry in scan.entries:  # every one lists the same entries
                claim = own.claim(entry, 30)
                if claim is not None:
                    with lock:
                        sent.append(claim.entry.name)
                    claim.complete()
        finally:
            own.close()

    threads = [threading.Thread(target=drain) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(sent) == sorted(names)  # each once
    assert store.scan().entries == []


# -- connections -------------------------------------------------------------------

def test_statements_survive_a_database_restart(pg_server, caplog):
    store = open_queue(table_url(pg_server))
    try:
        name = insert(store)
        for _ in range(3):  # connections kept open, all broken by the restart
            store.connections._give(store.connections.connect())
        pg_server.restart("immediate")
        assert [e.name for e in store.scan().entries] == [name]
        assert "lost the connection" in caplog.text
        pg_server.restart("immediate")
        with pytest.raises(psycopg.OperationalError):  # not idempotent
            store.connections.run(lambda conn: conn.execute("SELECT 1"), retry=False)
        assert store.claim(Entry(QUEUE, name), 30).entry.name == name
    finally:
        store.close()


def test_errors_that_do_not_break_the_connection_are_raised(store):
    def slow(conn):
        conn.execute("SET statement_timeout = 10")
        try:
            conn.execute("SELECT pg_sleep(1)")
        finally:
            conn.execute("SET statement_timeout = 0")
    with pytest.raises(psycopg.errors.QueryCanceled):
        store.connections.run(slow)
    with pytest.raises(psycopg.errors.UndefinedTable):
        store.connections.run(lambda conn: conn.execute("SELECT * FROM nowhere"))
    assert store.scan().entries == []  # the connections still work


def test_idle_connections_are_bounded(store):
    conns = store.connections
    conns.discard_idle()
    extra = [conns.connect() for _ in range(conns.idle + 2)]
    for conn in extra:
        conns._give(conn)
    assert len(conns._free) == conns.idle
    assert sum(c.closed for c in extra) == 2
    kept = list(conns._free)
    conns._pid = -1  # as in a child after fork(): the parent's are not used
    assert store.scan().entries == []
    assert conns._pid == os.getpid()
    assert conns._inherited == kept and not any(c.closed for c in kept)
    for conn in kept:
        conn.close()


# -- the watcher -----------------------------------------------------------------------

def wait_for(predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_watcher_wakes_on_notify(store):
    woken = []
    watcher = store.watcher(woken.append, "test-wakeup")
    assert watcher.covers(None) is False
    assert watcher.start() is True
    try:
        assert watcher.covers(None) and watcher.covers("r1")
        insert(store, notify=True)
        insert(store, relay="r1", notify=True)
        wait_for(lambda: len(woken) == 2)
        assert woken == [{None}, {"r1"}]
    finally:
        watcher.stop()
    assert not watcher.covers(None)
    watcher.close()


def test_watcher_listens_again_after_a_restart(pg_server):
    store = open_queue(table_url(pg_server))
    woken = []
    watcher = store.watcher(woken.append, "test-wakeup")
    watcher.backoff = (0.1, 0.4)
    assert watcher.start()
    try:
        pg_server.restart("immediate")
        wait_for(lambda: {ALL} in woken)
        assert watcher.covers(None)
        insert(store, notify=True)
        wait_for(lambda: {None} in woken)
    finally:
        watcher.close()
        store.close()


def test_watcher_start_fails_without_a_server(pg_server, caplog):
    url = parse_url(f"postgresql://postgres@127.0.0.1:{pg_server.port + 1}/x"
                    "?connect_timeout=5")
    store = PostgreSQLQueue(url, Connections(url))
    watcher = store.watcher(lambda names: None, "test-wakeup")
    assert watcher.start() is False
    assert watcher.thread is None
    assert "cannot listen for new messages" in caplog.text


@pytest.mark.slow
def test_watcher_start_gives_up_on_a_silent_server(caplog):
    import socket

    from mailoutbox.postgresql.watcher import NotifyWatcher
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        port = silent.getsockname()[1]
        url = parse_url(f"postgresql://postgres@127.0.0.1:{port}/x"
                        "?connect_timeout=2")
        assert url.path == f"postgresql://postgres@127.0.0.1:{port}/x" \
            "?connect_timeout=2"
        watcher = NotifyWatcher(Connections(url), "t", lambda names: None,
                                "test-wakeup", timeout=0.3)
        assert watcher.start() is False
    assert "cannot listen for new messages" in caplog.text


def test_a_url_without_parameters():
    parsed = parse_url("postgres://h/db")
    assert (parsed.path, parsed.table, parsed.keep_sent) == (
        "postgres://h/db", "mail_queue", 0)
    assert parsed.key == "postgresql://@h:/db?table=mail_queue"


def test_describe_gives_one_line_without_the_password():
    from mailoutbox.postgresql._conn import describe
    assert describe(OSError("x s3cret\n\tmore"), "s3cret") == "x ***"
    assert describe(OSError("")) == "OSError"


def test_reconnect_gives_up_after_its_window(pg_server):
    url = parse_url(f"postgresql://postgres@127.0.0.1:{pg_server.port + 1}/x"
                    "?connect_timeout=5")
    conns = Connections(url)
    conns.reconnect_window = 0.3
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        conns.run(lambda conn: None)
    assert 0.1 < time.monotonic() - started < 30  # slept, then gave up


def test_watcher_hears_both_names_of_a_qualified_table(store):
    from mailoutbox.postgresql.watcher import NotifyWatcher
    woken = []
    watcher = NotifyWatcher(store.connections, "public.outbox", woken.append,
                            "test-wakeup")
    assert watcher.channels == ["outbox", "public.outbox"]
    assert watcher.start()
    try:
        for channel, relay in (("outbox", ""), ("public.outbox", "r1")):
            store.connections.run(lambda conn, c=channel, r=relay: conn.execute(
                "SELECT pg_notify(%s, %s)", (c, r)))
        wait_for(lambda: len(woken) == 2)
        assert woken == [{None}, {"r1"}]
    finally:
        watcher.close()
