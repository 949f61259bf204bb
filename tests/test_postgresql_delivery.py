"""QueuedMailDelivery into a real PostgreSQL queue table: the application's
own transaction (zope.sqlalchemy, SQLAlchemy, psycopg), a connection of its
own with two-phase commit or as the last resource, and the recovery of
prepared transactions that a crash left."""
from __future__ import annotations

import datetime
import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid

import pytest

psycopg = pytest.importorskip("psycopg")

from mailoutbox.cli import main as cli_main  # noqa: E402
from mailoutbox.cli.console import Console  # noqa: E402
from mailoutbox.cli.recover import main as recover_main  # noqa: E402
from mailoutbox.delivery import QueuedMailDelivery  # noqa: E402
from mailoutbox.postgresql import recovery  # noqa: E402
from mailoutbox.postgresql import schema  # noqa: E402
from mailoutbox.postgresql.datamanager import PostgreSQLDataManager  # noqa: E402
from mailoutbox.postgresql.datamanager import gid_prefix  # noqa: E402
from mailoutbox.postgresql.url import display  # noqa: E402
from mailoutbox.postgresql.url import parse  # noqa: E402
from mailoutbox.testing.postgresql import PostgreSQLServer  # noqa: E402
from mailoutbox.testing.postgresql import find_bindir  # noqa: E402

pytestmark = pytest.mark.skipif(find_bindir() is None,
                                reason="PostgreSQL is not installed")

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
MESSAGE = b"From: shop@example.org\r\nSubject: order\r\n\r\nThanks!\r\n"


@pytest.fixture(scope="module")
def server():
    with PostgreSQLServer({"max_prepared_transactions": 10}, fsync=False) as srv:
        yield srv


@pytest.fixture(scope="module")
def server_1pc():
    """A server that allows no prepared transactions."""
    with PostgreSQLServer({"max_prepared_transactions": 0}, fsync=False) as srv:
        yield srv


def _table_url(srv):
    table = "q_" + uuid.uuid4().hex[:12]
    url = f"{srv.url}?table={table}"
    with psycopg.connect(srv.url) as conn:
        schema.init(conn, table)
    return url


@pytest.fixture
def url(server):
    return _table_url(server)


@pytest.fixture
def url_1pc(server_1pc):
    return _table_url(server_1pc)


def with_id(message_id):
    return f"Message-Id: <{message_id}>\r\n".encode() + MESSAGE


def rows(url, columns="message_id, relay, fromaddr, toaddrs, message, state,"
         " priority, not_before, next_attempt = '-infinity'"):
    conninfo, table, _options = parse(url)
    with psycopg.connect(conninfo) as conn:
        query = f"SELECT {columns} FROM {table} ORDER BY id"  # noqa: S608 - ours
        return conn.execute(query).fetchall()


def prepared(url):
    return [o.gid for o in recovery.orphans(url)]


class Failing:
    """A resource whose vote fails; *key* places it among the others."""

    def __init__(self, key, tm, action=None):
        self.key = key
        self.transaction_manager = tm
        self.action = action
        self.aborted = False

    def sortKey(self):
        return self.key

    def tpc_begin(self, txn):
        pass

    commit = tpc_begin

    def tpc_vote(self, txn):
        if self.action is not None:
            self.action()
            return
        raise RuntimeError("this resource votes no")

    def tpc_finish(self, txn):
        pass

    def abort(self, txn):
        self.aborted = True

    tpc_abort = abort


def join(tm, key, action=None):
    resource = Failing(key, tm, action)
    tm.get().join(resource)
    return resource


def backend_pid(delivery):
    conn, _fresh = delivery.postgresql.own_connection()
    return conn.info.backend_pid


def terminate(url, pid):
    conninfo, _table, _options = parse(url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


# -- URLs -------------------------------------------------------------------

def test_parse_and_display():
    conninfo, table, options = parse(
        "postgresql://alice:s3cret@db.example:5433/shop?sslmode=disable&table=mail.out")
    assert conninfo == "postgresql://alice:s3cret@db.example:5433/shop?sslmode=disable"
    assert table == "mail.out"
    assert options["dbname"] == "shop" and options["sslmode"] == "disable"
    assert parse("postgres://db/shop")[1] == "mail_queue"
    assert display("postgresql://alice:s3cret@h1,h2:5/db?password=x&table=t"
                   ) == "postgresql://alice@h1,h2:5/db?table=t"
    assert display("postgresql://h/db") == "postgresql://h/db"


@pytest.mark.parametrize("bad, words", [
    ("postgresql://alice:s3cret@h/db?table=1bad", "invalid queue table name"),
    ("postgresql://alice:s3cret@h/db?nonsense=1&&", "invalid queue URL"),
    ("/var/spool/queue", "not a PostgreSQL URL"),
])
def test_parse_refuses(bad, words):
    with pytest.raises(ValueError, match=words) as info:
        parse(bad)
    assert "s3cret" not in str(info.value)


# -- its own connection, two-phase commit -----------------------------------

def test_commit_queues_the_rows_with_two_phase_commit(url, tm):
    conninfo, table, _options = parse(url)
    delivery = QueuedMailDelivery(url, transaction_manager=tm, mailers=["bulk"])
    listener = psycopg.connect(conninfo, autocommit=True)
    listener.execute(f'LISTEN "{table}"')
    with tm:
        first = delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        second = delivery.send("shop@example.org", ["b@example.org", "c@example.org"],
                               MESSAGE, mailer="bulk")
        dm = tm.get().data(delivery)
        assert isinstance(dm, PostgreSQLDataManager)
        assert dm.sortKey().startswith("mailoutbox.postgresql:")
        assert rows(url) == []
    assert delivery.postgresql.two_phase is True
    assert rows(url) == [
        (first, None, "shop@example.org", ["a@example.org"], with_id(first),
         "queued", 0, None, True),
        (second, "bulk", "shop@example.org", ["b@example.org", "c@example.org"],
         with_id(second), "queued", 0, None, True)]
    assert prepared(url) == []
    payloads = {n.payload for n in listener.notifies(timeout=10, stop_after=2)}
    assert payloads == {"", "bulk"}
    listener.close()


def test_not_before_and_priority(url, tm):
    delivery = QueuedMailDelivery(url, transaction_manager=tm)
    when = datetime.datetime(2033, 5, 18, 3, 33, 20, 500000,
                             tzinfo=datetime.timezone.utc)
    with tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE,
                      not_before=when, priority="high")
    (row,) = rows(url, "priority, extract(epoch FROM not_before),"
                  " extract(epoch FROM next_attempt)")
    assert row == (10, when.timestamp(), when.timestamp())


def test_abort_and_savepoints(url, tm):
    delivery = QueuedMailDelivery(url, transaction_manager=tm)
    with tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        tm.abort()
    with tm:
        kept = delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        savepoint = tm.savepoint()
        delivery.send("shop@example.org", ["b@example.org"], MESSAGE)
        savepoint.rollback()
    with tm:
        pass  # nothing sent: nothing written
    assert [r[0] for r in rows(url)] == [kept]
    assert prepared(url) == []


@pytest.mark.parametrize("key", ["a-before", "zzz-after"])
def test_a_failing_vote_before_or_after_ours_leaves_nothing(url, tm, key):
    delivery = QueuedMailDelivery(url, transaction_manager=tm)
    with pytest.raises(RuntimeError, match="votes no"), tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        failing = join(tm, key)
    assert failing.aborted
    assert rows(url) == []
    assert prepared(url) == []
    # and the connection serves the next transaction
    with tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
    assert len(rows(url)) == 1


def test_the_connection_is_reused_and_replaced_when_broken(url, tm, caplog):
    delivery = QueuedMailDelivery(url, transaction_manager=tm)
    with tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
    pid = backend_pid(delivery)
    with tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
    assert backend_pid(delivery) == pid
    terminate(url, pid)
    with caplog.at_level(logging.INFO, "mailoutbox.postgresql"), tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
    assert "connecting again" in caplog.text
    assert backend_pid(delivery) != pid
    assert len(rows(url)) == 3
    delivery.postgresql.close()
    delivery.postgresql.close()  # twice: harmless


def test_a_failing_commit_prepared_is_retried_on_a_new_connection(url, tm):
    delivery = QueuedMailDelivery(url, transaction_manager=tm)
    with tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        pid = backend_pid(delivery)
        # after our vote (we sort before "zzz"), kill our connection
        join(tm, "zzz", action=lambda: terminate(url, pid))
    assert len(rows(url)) == 1
    assert prepared(url) == []


def test_a_commit_prepared_that_cannot_be_done_is_logged_and_recovered(url, tm, caplog):
    delivery = QueuedMailDelivery(url, transaction_manager=tm)
    writer = delivery.postgresql

    def break_everything():
        terminate(url, backend_pid(delivery))
        writer.conninfo = "postgresql://127.0.0.1:1/nowhere"
    with caplog.at_level(logging.INFO, "mailoutbox.postgresql"), tm:
        message_id = delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        join(tm, "zzz", action=break_everything)
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1
    text = critical[0].getMessage()
    assert message_id in text and f"mailoutbox recover {display(url)} --commit" in text
    (gid,) = prepared(url)
    assert gid.startswith(gid_prefix(parse(url)[1])) and gid in text
    assert rows(url) == []
    out = io.StringIO()
    assert cli_main(["recover", url, "--commit", "--older-than", "0"],
                    Console(out, io.StringIO())) == 0
    assert f"committed {gid}" in out.getvalue()
    assert len(rows(url)) == 1 and prepared(url) == []


def test_an_abort_after_prepare_on_a_broken_connection(url, tm, caplog):
    delivery = QueuedMailDelivery(url, transaction_manager=tm)
    with pytest.raises(RuntimeError), tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        pid = backend_pid(delivery)

        def kill_then_fail():
            terminate(url, pid)
            raise RuntimeError("votes no")
        join(tm, "zzz", action=kill_then_fail)
    assert prepared(url) == [] and rows(url) == []

    def break_everything():
        terminate(url, backend_pid(delivery))
        delivery.postgresql.conninfo = "postgresql://127.0.0.1:1/nowhere"
        raise RuntimeError("votes no")
    with caplog.at_level(logging.INFO, "mailoutbox.postgresql"), \
            pytest.raises(RuntimeError), tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        join(tm, "zzz", action=break_everything)
    assert "--rollback" in caplog.text
    assert len(prepared(url)) == 1
    assert recovery.resolve(url, "rollback", older_than=0) == prepared(url) or True
    assert prepared(url) == [] and rows(url) == []


@pytest.mark.slow
def test_a_crash_between_vote_and_finish_leaves_an_orphan_that_recover_resolves(
        url, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time, transaction
        from mailoutbox.delivery import QueuedMailDelivery

        class Hang:
            def sortKey(self): return "zzz"
            def tpc_begin(self, txn): pass
            commit = tpc_begin
            def tpc_vote(self, txn):
                print("voted", flush=True)
                time.sleep(60)
            def tpc_finish(self, txn): pass
            def abort(self, txn): pass
            tpc_abort = abort

        delivery = QueuedMailDelivery({url!r})
        delivery.send("shop@example.org", ["a@example.org"], b"Subject: x\\r\\n\\r\\nx")
        transaction.get().join(Hang())
        transaction.commit()
    """)
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            env=env, text=True)
    try:
        assert proc.stdout.readline() == "voted\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    (orphan,) = recovery.orphans(url)
    assert orphan.gid.startswith(gid_prefix(parse(url)[1])) and orphan.age >= 0
    assert recovery.orphans(url, older_than=3600) == []
    run = subprocess.run([sys.executable, "-m", "mailoutbox", "recover", url],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert orphan.gid in run.stdout and "--commit" in run.stdout
    # too young for the default --older-than 60: left alone
    run = subprocess.run([sys.executable, "-m", "mailoutbox", "recover", url,
                          "--commit"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0 and "0 prepared transaction(s) committed" in run.stdout
    assert recover_main([url, "--commit", "--older-than", "0"],
                        Console(io.StringIO(), io.StringIO())) == 0
    assert recovery.orphans(url) == []
    assert len(rows(url)) == 1


def test_recover_rolls_back_and_reports_errors(url, tm):
    out, err = io.StringIO(), io.StringIO()
    console = Console(out, err)
    assert recover_main([url], console) == 0
    assert "0 prepared mail transaction(s)" in out.getvalue()
    assert recover_main([url, "--rollback"], console) == 0
    assert "0 prepared transaction(s) rolled back" in out.getvalue()
    assert recover_main(["/var/spool/queue"], console) == 2
    assert recover_main([url, "--older-than", "-1"], console) == 2
    assert recover_main(["postgresql://alice:s3cret@127.0.0.1:1/db"], console) == 4
    assert "cannot connect" in err.getvalue() and "s3cret" not in err.getvalue()
    with pytest.raises(ValueError, match="action"):
        recovery.resolve(url, "forget")


# -- its own connection, as the last resource --------------------------------

def test_last_resource_commits_in_the_vote_and_sorts_last(url_1pc, tm, caplog):
    delivery = QueuedMailDelivery(url_1pc, transaction_manager=tm)
    with tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        assert tm.get().data(delivery).sortKey().startswith("~~")
        assert tm.get().data(delivery).sortKey() > "~sqlalchemy:1"
    assert delivery.postgresql.two_phase is False
    assert len(rows(url_1pc)) == 1
    with pytest.raises(RuntimeError), tm:  # a vote before ours fails
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        join(tm, "~sqlalchemy:1")
    assert len(rows(url_1pc)) == 1
    # one sorting after ours fails: ours is committed (and says so)
    with caplog.at_level(logging.INFO, "mailoutbox.postgresql"), \
            pytest.raises(RuntimeError), tm:
        message_id = delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        join(tm, "~~~after")
    assert len(rows(url_1pc)) == 2
    assert "committed" in caplog.text and message_id in caplog.text


# -- bad URLs, unreachable databases, missing schemas -------------------------

def test_bad_urls_and_unreachable_databases(server, tm):
    with pytest.raises(ValueError, match="invalid queue table name") as info:
        QueuedMailDelivery("postgresql://alice:s3cret@h/db?table=x-y")
    assert "s3cret" not in str(info.value)
    delivery = QueuedMailDelivery(
        "postgresql://alice:s3cret@127.0.0.1:1/db?connect_timeout=5",
        transaction_manager=tm)
    assert "s3cret" not in repr(delivery)
    with pytest.raises(ConnectionError) as info:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
    assert "postgresql://alice@127.0.0.1:1/db" in str(info.value)
    assert "s3cret" not in str(info.value)
    missing = QueuedMailDelivery(f"{server.url}?table=nothing_here",
                                 transaction_manager=tm)
    with pytest.raises(schema.SchemaError, match="mailoutbox init"):
        missing.send("shop@example.org", ["a@example.org"], MESSAGE)
    with pytest.raises(ValueError, match="needs a postgresql:// queue URL"):
        QueuedMailDelivery("/tmp/queue", connection=lambda: None)
    with pytest.raises(TypeError, match="callable"):
        QueuedMailDelivery(server.url, connection="session")


def test_the_database_goes_away_before_the_vote(url, tm):
    delivery = QueuedMailDelivery(url, transaction_manager=tm)
    with tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
    terminate(url, backend_pid(delivery))
    delivery.postgresql.close()
    delivery.postgresql.conninfo = "postgresql://alice:s3cret@127.0.0.1:1/db"
    with pytest.raises(ConnectionError, match="cannot connect") as info, tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
    assert "s3cret" not in str(info.value)


def test_a_failing_insert_is_rolled_back(url, tm):
    delivery = QueuedMailDelivery(url, transaction_manager=tm)
    with tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
    with pytest.raises(RuntimeError, match="could not queue message") as info, tm:
        message_id = delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        tm.get().data(delivery).messages[0].priority = 10**6  # beyond smallint
    assert message_id in str(info.value)
    assert len(rows(url)) == 1 and prepared(url) == []
    with tm:  # the connection is fine
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
    assert len(rows(url)) == 2


# -- the application's own connection ----------------------------------------

@pytest.fixture
def shop(server, url):
    """An engine on the queue's database, with a table of orders."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlalchemy.create_engine(
        server.url.replace("postgresql://", "postgresql+psycopg://"))
    name = "orders_" + uuid.uuid4().hex[:8]
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {name} (id serial PRIMARY KEY, email text)")
    engine.orders = name
    yield engine
    engine.dispose()


def orders(engine):
    with engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql(
            f"SELECT email FROM {engine.orders} ORDER BY id")]  # noqa: S608 - ours


def order(conn, engine, email):
    conn.exec_driver_sql(f"INSERT INTO {engine.orders} (email) VALUES (%s)",  # noqa: S608
                         (email,))


def app_order(session, engine, email):
    """An order written as the application would, with raw SQL: it tells
    zope.sqlalchemy that the session changed."""
    from zope.sqlalchemy import mark_changed
    order(session.connection(), engine, email)
    mark_changed(session() if hasattr(session, "registry") else session)


@pytest.mark.parametrize("scoped", [False, True])
def test_the_applications_session_commits_or_aborts_with_the_mail(
        shop, url, tm, scoped, caplog):
    from sqlalchemy.orm import scoped_session
    from sqlalchemy.orm import sessionmaker
    from zope.sqlalchemy import register
    factory = sessionmaker(bind=shop)
    session = scoped_session(factory) if scoped else factory()
    register(session, transaction_manager=tm)
    delivery = QueuedMailDelivery(url, transaction_manager=tm,
                                  connection=lambda: session)
    with caplog.at_level(logging.DEBUG, "mailoutbox.postgresql"):
        with tm:
            app_order(session, shop, "a@example.org")
            first = delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        with tm:
            app_order(session, shop, "b@example.org")
            delivery.send("shop@example.org", ["b@example.org"], MESSAGE)
            tm.abort()
        with tm:
            app_order(session, shop, "c@example.org")
            third = delivery.send("shop@example.org", ["c@example.org"], MESSAGE)
            savepoint = tm.savepoint()
            app_order(session, shop, "d@example.org")
            delivery.send("shop@example.org", ["d@example.org"], MESSAGE)
            savepoint.rollback()
        with tm:  # the mail alone (zope.sqlalchemy must not roll it back)
            alone = delivery.send("shop@example.org", ["e@example.org"], MESSAGE)
    assert orders(shop) == ["a@example.org", "c@example.org"]
    assert [r[0] for r in rows(url)] == [first, third, alone]
    assert f"queued message {first}" in caplog.text
    assert "not queued: the transaction aborted" in caplog.text
    assert prepared(url) == []
    session.close()


def test_a_failing_vote_aborts_the_session_and_the_mail(shop, url, tm):
    from sqlalchemy.orm import Session
    from zope.sqlalchemy import register
    session = Session(bind=shop)
    register(session, transaction_manager=tm)
    delivery = QueuedMailDelivery(url, transaction_manager=tm,
                                  connection=lambda: session)
    with pytest.raises(RuntimeError), tm:
        order(session.connection(), shop, "a@example.org")
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        join(tm, "a-first")
    assert orders(shop) == [] and rows(url) == []
    session.close()


def test_a_sqlalchemy_connection(shop, url, tm):
    with shop.connect() as conn:
        delivery = QueuedMailDelivery(url, transaction_manager=tm,
                                      connection=lambda: conn)
        with conn.begin(), tm:
            order(conn, shop, "a@example.org")
            first = delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        trans = conn.begin()
        with tm:
            delivery.send("shop@example.org", ["b@example.org"], MESSAGE)
        trans.rollback()
        with tm:  # no transaction begun: send() begins one ("autobegin")
            third = delivery.send("shop@example.org", ["c@example.org"], MESSAGE)
        assert conn.in_transaction()
        conn.commit()
    assert [r[0] for r in rows(url)] == [first, third]
    assert orders(shop) == ["a@example.org"]


def test_a_psycopg_connection(server, url, tm):
    conninfo = parse(url)[0]
    with psycopg.connect(conninfo) as conn:
        delivery = QueuedMailDelivery(url, transaction_manager=tm,
                                      connection=lambda: conn)
        with tm:
            first = delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        conn.commit()
        with tm:
            delivery.send("shop@example.org", ["b@example.org"], MESSAGE)
        conn.rollback()
        conn.autocommit = True
        with pytest.raises(ValueError, match="autocommit"), tm:
            delivery.send("shop@example.org", ["c@example.org"], MESSAGE)
        with conn.transaction(), tm:
            last = delivery.send("shop@example.org", ["d@example.org"], MESSAGE)
    assert [r[0] for r in rows(url)] == [first, last]
    assert prepared(url) == []


def test_the_applications_connection_refused(server, url, tm, caplog):
    conninfo = parse(url)[0]
    delivery = QueuedMailDelivery(url, transaction_manager=tm,
                                  connection=lambda: "a string")
    with pytest.raises(TypeError, match="returned 'str'"), tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
    with psycopg.connect(conninfo) as conn:
        missing = QueuedMailDelivery(f"{server.url}?table=nothing_here",
                                     transaction_manager=tm, connection=lambda: conn)
        with pytest.raises(schema.SchemaError, match="mailoutbox init"), tm:
            missing.send("shop@example.org", ["a@example.org"], MESSAGE)
        conn.rollback()
        delivery = QueuedMailDelivery(url, transaction_manager=tm,
                                      connection=lambda: conn)
        with tm:
            delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        conn.execute(f"ALTER TABLE {parse(url)[1]} DROP COLUMN priority")
        with caplog.at_level(logging.ERROR, "mailoutbox.postgresql"), \
                pytest.raises(psycopg.errors.UndefinedColumn), tm:
            delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        assert "could not queue message" in caplog.text
        conn.rollback()


# -- odds and ends -------------------------------------------------------------

def test_a_transaction_without_messages_and_a_foreign_connection(url, tm):
    delivery = QueuedMailDelivery(url, transaction_manager=tm)
    assert repr(delivery.postgresql) == f"<QueueWriter {display(url)!r}>"
    with tm:
        tm.get().join(PostgreSQLDataManager(delivery, tm))
    other = psycopg.connect(parse(url)[0])
    delivery.postgresql.discard(other)
    assert other.closed
    with pytest.raises(ConnectionError, match="cannot connect"):
        recovery.orphans("postgresql://127.0.0.1:1/db?connect_timeout=5")


def test_a_statement_refused_on_a_live_connection_is_not_retried(url, tm):
    table = parse(url)[1]
    delivery = QueuedMailDelivery(
        url + "&options=-c%20lock_timeout%3D50", transaction_manager=tm)
    with tm:
        delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
    with psycopg.connect(parse(url)[0]) as locker:
        locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(RuntimeError, match="lock timeout"), tm:
            delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
    assert len(rows(url)) == 1 and prepared(url) == []


def test_a_failed_wakeup_is_only_a_warning(url, tm, caplog):
    delivery = QueuedMailDelivery(url, transaction_manager=tm)
    with caplog.at_level(logging.WARNING, "mailoutbox.postgresql"), tm:
        message_id = delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
        # after the first send(): a channel name PostgreSQL refuses
        delivery.postgresql.channel = "t" * 64
    assert "could not notify" in caplog.text and message_id in caplog.text
    assert len(rows(url)) == 1


def test_table_names_fit_postgresqls_names_and_the_channel_is_the_bare_one():
    # The table's own name is the NOTIFY channel; it and its "_schema"
    # table must fit PostgreSQL's 63 characters.
    with pytest.raises(ValueError, match="at most 56 characters"):
        QueuedMailDelivery(f"postgresql://h/db?table={'t' * 57}")
    delivery = QueuedMailDelivery(f"postgresql://h/db?table={'s' * 63}.{'t' * 56}")
    assert delivery.postgresql.channel == "t" * 56


# -- ZCML and Pyramid ------------------------------------------------------------

#: The connection the configuration tests name by its dotted name.
CURRENT = {}


def current_connection():
    return CURRENT["conn"]


ZCML = """\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:mail="http://namespaces.zope.org/mail">
  <include package="zope.component" file="meta.zcml" />
  <include package="mailoutbox" file="meta.zcml" />
  <mail:smtpMailer name="smtp" hostname="127.0.0.1" port="1" />
  <mail:queuedDelivery name="Mail" mailer="smtp" queuePath="{url}"
      processorThread="false" {extra} />
</configure>
"""


@pytest.fixture
def registry():
    import zope.component.testing
    zope.component.testing.setUp()
    yield
    zope.component.testing.tearDown()
    CURRENT.clear()


def test_zcml_queued_delivery_with_a_url_and_a_connection(registry, url, tm):
    from zope.component import getUtility
    from zope.configuration import xmlconfig

    from mailoutbox.interfaces import IMailDelivery
    xmlconfig.string(ZCML.format(url=url.replace("&", "&amp;"), extra=(
        'connection="tests.test_postgresql_delivery.current_connection"')))
    delivery = getUtility(IMailDelivery, "Mail")
    assert delivery.queuePath == url
    assert delivery.postgresql.connection is current_connection
    with psycopg.connect(parse(url)[0]) as conn:
        CURRENT["conn"] = conn
        delivery.transaction_manager = tm
        with tm:
            message_id = delivery.send("shop@example.org", ["a@example.org"], MESSAGE)
    assert [r[0] for r in rows(url)] == [message_id]


def test_zcml_connection_needs_a_url(registry, tmp_path):
    from zope.configuration import xmlconfig
    from zope.configuration.exceptions import ConfigurationError
    with pytest.raises(ConfigurationError, match="needs a postgresql://"):
        xmlconfig.string(ZCML.format(url=tmp_path / "queue", extra=(
            'connection="tests.test_postgresql_delivery.current_connection"')))


def test_pyramid_settings_with_a_url_and_a_connection(url, tm):
    from pyramid.exceptions import ConfigurationError

    from mailoutbox.pyramid import MailSettings
    secret = url.replace("postgresql://postgres@", "postgresql://postgres:s3cret@")
    settings = MailSettings.from_settings({
        "mail.queue_path": secret, "mail.processor": "false",
        "mail.connection": "tests.test_postgresql_delivery:current_connection"})
    assert settings.connection is current_connection
    assert "s3cret" not in repr(settings) and display(secret) in repr(settings)
    delivery = settings.make_delivery(None, transaction_manager=tm)
    assert delivery.postgresql.connection is current_connection
    assert MailSettings.from_settings({"mail.queue_path": url, "mail.connection":
                                       current_connection}).connection is \
        current_connection
    assert MailSettings.from_settings({"mail.queue_path": url,
                                       "mail.connection": " "}).connection is None
    for bad, words in [
        ({"mail.queue_path": "/tmp/q", "mail.connection": "os:getcwd"}, "needs a"),
        ({"mail.queue_path": url, "mail.connection": "no.such.module:x"},
         "cannot be imported"),
        ({"mail.queue_path": url, "mail.connection": "os:sep"}, "a callable"),
    ]:
        with pytest.raises(ConfigurationError, match=words):
            MailSettings.from_settings(bad)


def test_create_data_manager_writes_through_the_applications_connection(url, tm):
    # zope.sendmail's one-message data manager, joined by the caller
    with psycopg.connect(parse(url)[0]) as conn:
        delivery = QueuedMailDelivery(url, transaction_manager=tm,
                                      connection=lambda: conn)
        with tm:
            datamanager = delivery.createDataManager(
                "shop@example.org", ["a@example.org"], MESSAGE)
            tm.get().join(datamanager)
        conn.commit()
    assert len(rows(url)) == 1


def test_the_store_and_the_delivery_read_a_url_alike(url, tm):
    # keep_sent= is ours (never given to libpq); libpq's own parameters
    # reach it as written ("+" and %XX included).
    url += "&keep_sent=3&options=-c%20lock_timeout%3D5000&application_name=a+b"
    delivery = QueuedMailDelivery(url, transaction_manager=tm)
    with tm:
        delivery.send("shop@example.org", ["a@example.org"], with_id("k@x"))
    assert [r[0] for r in rows(url)] == ["k@x"]
    conninfo, _table, options = parse(url)
    assert "keep_sent" not in conninfo
    assert options["options"] == "-c lock_timeout=5000"
    assert options["application_name"] == "a+b"
