"""A queued delivery in the same transaction as a real ZODB and a real
SQLAlchemy session (zope.sqlalchemy, SQLite file): they commit or abort
together."""
from __future__ import annotations

import os

import pytest
import transaction
import ZODB
import ZODB.FileStorage
from sqlalchemy import Column
from sqlalchemy import ForeignKey
from sqlalchemy import Integer
from sqlalchemy import String
from sqlalchemy import create_engine
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.orm import declarative_base
from sqlalchemy.orm import sessionmaker
from ZODB.POSException import ConflictError
from zope.sqlalchemy import register

from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.envelope import parse_queue_file
from mailoutbox.maildir import Maildir

Base = declarative_base()


class Order(Base):
    __tablename__ = "orders"
    id = Column(Integer, primary_key=True)
    email = Column(String, nullable=False)


class Line(Base):
    __tablename__ = "lines"
    id = Column(Integer, primary_key=True)
    # checked when the database commits, i.e. in zope.sqlalchemy's tpc_vote
    order_id = Column(Integer, ForeignKey("orders.id", deferrable=True,
                                          initially="DEFERRED"))


def message(n):
    return b"From: shop@example.org\r\nSubject: order %d\r\n\r\nThanks!\r\n" % n


@pytest.fixture
def db(tmp_path):
    database = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs")))
    yield database
    database.close()


@pytest.fixture
def session(tmp_path, tm):
    engine = create_engine(f"sqlite:///{tmp_path / 'shop.sqlite'}")

    @event.listens_for(engine, "connect")
    def foreign_keys(connection, record):
        connection.execute("PRAGMA foreign_keys=ON")

    Base.metadata.create_all(engine)
    factory = sessionmaker(bind=engine)
    sess = factory()
    register(sess, transaction_manager=tm)
    yield sess
    sess.close()
    engine.dispose()


def orders_in_database(session):
    return session.scalars(select(Order.id).order_by(Order.id)).all()


def queued(queue_path):
    result = []
    if not os.path.isdir(queue_path):
        return result
    for path in Maildir(queue_path):
        with open(path, "rb") as f:
            result.append(parse_queue_file(f.read()))
    return result


def tmp_files(queue_path):
    tmp = os.path.join(queue_path, "tmp")
    return os.listdir(tmp) if os.path.isdir(tmp) else []


def zodb_value(db, key):
    other = transaction.TransactionManager()
    conn = db.open(other)
    try:
        return conn.root().get(key)
    finally:
        other.abort()
        conn.close()


def test_sort_order(db, session, tm, queue_path):
    """ZODB votes first, then the queue, then SQLAlchemy (which commits in
    its vote)."""
    conn = db.open(tm)
    conn.root()["x"] = 1
    session.add(Order(id=1, email="a@example.org"))
    session.flush()
    QueuedMailDelivery(queue_path, tm).send("s@x.org", ["a@x.org"], message(1))
    keys = sorted(r.sortKey() for r in tm.get()._resources)
    assert [k.split(":")[0] for k in keys] == [
        os.path.join(os.path.dirname(queue_path), "Data.fs"),
        "mailoutbox.delivery", "~sqlalchemy"]
    tm.abort()
    conn.close()


def test_all_commit_together(db, session, tm, queue_path):
    delivery = QueuedMailDelivery(queue_path, tm)
    conn = db.open(tm)
    conn.root()["orders"] = [1]
    session.add(Order(id=1, email="jane@example.org"))
    message_id = delivery.send("shop@example.org", ["jane@example.org"], message(1))
    tm.commit()
    assert zodb_value(db, "orders") == [1]
    assert orders_in_database(session) == [1]
    [(_f, toaddrs, data)] = queued(queue_path)
    assert toaddrs == ("jane@example.org",)
    assert message_id.encode() in data
    conn.close()


def test_all_abort_together(db, session, tm, queue_path):
    delivery = QueuedMailDelivery(queue_path, tm)
    conn = db.open(tm)
    conn.root()["orders"] = [1]
    session.add(Order(id=1, email="jane@example.org"))
    delivery.send("shop@example.org", ["jane@example.org"], message(1))
    tm.abort()
    assert zodb_value(db, "orders") is None
    assert orders_in_database(session) == []
    assert queued(queue_path) == []
    conn.close()


def test_failing_database_vote_leaves_no_queued_message(db, session, tm, queue_path):
    """The deferred foreign key fails when zope.sqlalchemy commits, in its
    vote, after the queue voted (wrote and fsynced the file into tmp/)."""
    delivery = QueuedMailDelivery(queue_path, tm)
    conn = db.open(tm)
    conn.root()["orders"] = [1]
    session.add(Line(id=1, order_id=999))  # no such order
    delivery.send("shop@example.org", ["jane@example.org"], message(1))
    with pytest.raises(sa_exc.IntegrityError, match="FOREIGN KEY"):
        tm.commit()
    tm.abort()
    assert queued(queue_path) == []
    assert tmp_files(queue_path) == []
    assert os.path.isdir(os.path.join(queue_path, "tmp"))  # the vote did run
    assert zodb_value(db, "orders") is None
    conn.close()


def test_failing_queue_vote_aborts_the_database(db, session, tm, tmp_path):
    """The queue votes before zope.sqlalchemy commits: a queue that cannot be
    written leaves the database untouched."""
    not_a_folder = tmp_path / "queue"
    not_a_folder.write_bytes(b"")
    delivery = QueuedMailDelivery(str(not_a_folder), tm)
    conn = db.open(tm)
    conn.root()["orders"] = [1]
    session.add(Order(id=1, email="jane@example.org"))
    delivery.send("shop@example.org", ["jane@example.org"], message(1))
    with pytest.raises(ValueError, match="could not queue message"):
        tm.commit()
    tm.abort()
    assert orders_in_database(session) == []
    assert zodb_value(db, "orders") is None
    conn.close()


def test_conflict_retry_queues_exactly_one_message(db, session, tm, queue_path):
    """A real ZODB write conflict with another connection makes the first
    attempt fail; the retry commits, and one message is queued."""
    delivery = QueuedMailDelivery(queue_path, tm)
    setup = transaction.TransactionManager()
    conn2 = db.open(setup)
    conn2.root()["counter"] = 0
    setup.commit()
    conn = db.open(tm)
    attempts = []
    ids = []
    for attempt in tm.attempts(3):
        with attempt:
            root = conn.root()
            counter = root["counter"]
            attempts.append(counter)
            if len(attempts) == 1:
                # another client wins the race
                conn2.root()["counter"] = 100
                setup.commit()
            root["counter"] = counter + 1
            session.add(Order(id=len(attempts), email="jane@example.org"))
            ids.append(delivery.send("shop@example.org", ["jane@example.org"],
                                     message(len(attempts))))
    assert attempts == [0, 100]
    assert zodb_value(db, "counter") == 101
    assert orders_in_database(session) == [2]
    [(_f, _t, data)] = queued(queue_path)
    assert ids[1].encode() in data
    assert tmp_files(queue_path) == []
    conn.close()
    conn2.close()


def test_conflict_error_is_what_the_first_attempt_raised(db, tm, queue_path):
    setup = transaction.TransactionManager()
    conn2 = db.open(setup)
    conn2.root()["counter"] = 0
    setup.commit()
    conn = db.open(tm)
    assert conn.root()["counter"] == 0  # loads the state
    conn2.root()["counter"] = 1
    setup.commit()
    conn.root()["counter"] = 2
    QueuedMailDelivery(queue_path, tm).send("s@x.org", ["a@x.org"], message(1))
    with pytest.raises(ConflictError):
        tm.commit()
    tm.abort()
    assert queued(queue_path) == []
    assert tmp_files(queue_path) == []
    conn.close()
    conn2.close()
