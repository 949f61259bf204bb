"""A queue on a full or read-only file system.

The queue lives on a small tmpfs the test mounts (root only; skipped
otherwise), and its transactions also hold a real ZODB (FileStorage) and a
real SQLAlchemy session (zope.sqlalchemy, SQLite) on the normal disk.  A
transaction that cannot queue its mail must fail with the OSError, roll the
other resources back and leave no file behind; what was committed before
is delivered whole, once.  Without root, a limit on the size of the files
a process may write (RLIMIT_FSIZE) stands in for the full disk.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
from collections import Counter

import pytest
import ZODB
import ZODB.FileStorage
from sqlalchemy import Column
from sqlalchemy import Integer
from sqlalchemy import create_engine
from sqlalchemy import select
from sqlalchemy.orm import declarative_base
from sqlalchemy.orm import sessionmaker
from zope.sqlalchemy import register

from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread
from mailoutbox.retry import RetryPolicy

from ._crash_helpers import RECIPIENT
from ._crash_helpers import SENDER
from ._crash_helpers import claims
from ._crash_helpers import is_complete
from ._crash_helpers import listing
from ._crash_helpers import make_message
from ._crash_helpers import queue_messages
from ._crash_helpers import queued
from ._crash_helpers import run_helper

Base = declarative_base()


class Order(Base):
    __tablename__ = "orders"
    id = Column(Integer, primary_key=True)


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount(name, options)`` mounts a tmpfs at tmp_path/name and returns
    its path; everything mounted is unmounted after the test."""
    mounted = []

    def mount(name, options):
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        path = tmp_path / name
        path.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
            capture_output=True, text=True, check=False,
        )
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
        mounted.append(path)
        return str(path)

    yield mount
    for path in reversed(mounted):
        if subprocess.run(["umount", str(path)], check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path, mode):
    subprocess.run(["mount", "-o", f"remount,{mode}", path], check=True)


@pytest.fixture
def zodb(tmp_path, tm):
    db = ZODB.DB(ZODB.FileStorage.FileStorage(str(tmp_path / "Data.fs")))
    connection = db.open(transaction_manager=tm)
    yield db, connection
    connection.close()
    db.close()


@pytest.fixture
def session(tmp_path, tm):
    engine = create_engine(f"sqlite:///{tmp_path / 'orders.sqlite'}")
    Base.metadata.create_all(engine)
    sess = sessionmaker(bind=engine)()
    register(sess, transaction_manager=tm)
    yield sess
    sess.close()
    engine.dispose()


def make_processor(queue, port, **options):
    processor = QueueProcessorThread(concurrency=2, retry=RetryPolicy(initial=0),
                                     **options)
    processor.setMailer(SMTPMailer("127.0.0.1", port, no_tls=True, timeout=5))
    processor.setQueuePath(queue)
    return processor


def drain(queue, port):
    processor = make_processor(queue, port)
    try:
        return processor.process_queue()
    finally:
        processor.stop(timeout=10)


def place_order(tm, connection, session, delivery, number, size):
    """One transaction: an order in the ZODB and in SQL, and three
    messages; returns their Message-Ids."""
    tm.begin()
    connection.root()[f"order-{number}"] = number
    session.add(Order(id=number))
    return [
        delivery.send(SENDER, [RECIPIENT],
                      make_message(f"order{number}-{k}@mailoutbox.test", size))
        for k in range(3)
    ]


def committed_orders(zodb, session):
    db, _connection = zodb
    with contextlib.closing(db.open()) as fresh:
        in_zodb = sorted(v for k, v in fresh.root().items() if k.startswith("order-"))
    session.rollback()
    in_sql = sorted(session.scalars(select(Order.id)))
    return in_zodb, in_sql


def queued_message_ids(queue):
    """The Message-Ids of the queued messages; each must be whole."""
    ids = []
    for entry in Maildir(queue).scan().entries:
        with open(entry.path, "rb") as f:
            data = f.read()
        assert is_complete(data), entry.name
        ids.append(data.split(b"Message-Id: <", 1)[1].split(b">", 1)[0].decode())
    return sorted(ids)


@pytest.mark.parametrize(("options", "size"), [
    ("size=512k", 20_000),  # out of blocks, while writing
    ("size=4m,nr_inodes=32", 200),  # out of inodes, creating the file
])
def test_full_queue_fails_the_transaction_and_rolls_back_the_others(
        options, size, mount_tmpfs, tm, zodb, session, smtp_server):
    small = mount_tmpfs("small", options)
    queue = os.path.join(small, "queue")
    delivery = QueuedMailDelivery(queue, transaction_manager=tm)
    _db, connection = zodb
    committed: list[str] = []
    for number in range(100):  # the file system fills up long before
        ids = place_order(tm, connection, session, delivery, number, size)
        try:
            tm.commit()
        except OSError as exc:
            error = exc
            tm.abort()
            break
        committed.extend(ids)
    else:
        pytest.fail("the file system never filled up")

    assert error.errno == errno.ENOSPC
    assert "No space left on device" in str(error)
    assert "could not queue message" in str(error)
    assert any(f"<{i}>" in str(error) for i in ids)
    orders = len(committed) // 3
    assert orders >= 2
    # The ZODB (which had voted) and the database rolled back too.
    assert committed_orders(zodb, session) == (list(range(orders)),) * 2
    # Nothing half-written is left, and only whole messages are queued.
    assert listing(queue, "tmp") == []
    assert queued_message_ids(queue) == sorted(committed)

    if "nr_inodes" in options:
        # A claim is a hard link, which a tmpfs counts as an inode: with
        # none left, the processor can claim nothing, so it sends nothing
        # (it could not record that it did), until there is room again.
        # (The failed transaction freed what it had written: use it up.)
        use_up_inodes(small)
        stats = drain(queue, smtp_server.port)
        assert stats.sent == 0 and stats.skipped == len(committed)
        assert smtp_server.messages == [] and claims(queue) == []
        remount(small, "nr_inodes=64")
    assert drain(queue, smtp_server.port).sent == len(committed)
    assert Counter(smtp_server.message_ids()) == Counter(committed)
    assert all(is_complete(m.data) for m in smtp_server.messages)
    # Sending freed the space: the next transaction commits.
    ids = place_order(tm, connection, session, delivery, orders, size)
    tm.commit()
    assert queued_message_ids(queue) == sorted(ids)


def use_up_inodes(directory):
    """Create empty files in *directory* until its file system has no inode
    left."""
    for number in range(1_000):  # bounded; nr_inodes=32 runs out at once
        try:
            with open(os.path.join(directory, f"inode-{number}"), "wb"):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            return
    pytest.fail("the file system never ran out of inodes")


def fill_up(directory):
    """Fill the file system of *directory*; return the filler's path."""
    filler = os.path.join(directory, "filler")
    with open(filler, "wb", buffering=0) as f:
        for _ in range(10_000):  # bounded; a tmpfs of 512k fills at once
            try:
                f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return filler


def test_processor_on_a_full_disk_loses_nothing(mount_tmpfs, smtp_server):
    small = mount_tmpfs("small", "size=512k")
    queue = os.path.join(small, "queue")
    ids = queue_messages(queue, 4)
    filler = fill_up(small)
    processor = make_processor(queue, smtp_server.port)
    try:
        # A transient failure cannot be recorded (no room for the retry
        # state): the message stays queued as it was, for the next pass.
        smtp_server.reply("MAIL", "451 4.3.0 Try later")
        stats = processor.process_queue()
        assert stats.deferred == stats.sent == stats.failed == 0
        assert len(queued(queue)) == 4 and claims(queue) == []
        # Neither can a permanent one (no room for the reason).
        smtp_server.reply("MAIL", "550 5.1.0 Go away")
        stats = processor.process_queue()
        assert stats.failed == 0
        assert len(queued(queue)) == 4 and claims(queue) == []
        # Nothing was left behind by the failed attempts to write.
        assert listing(queue, "tmp") == []
        assert smtp_server.messages == []
        # Sending needs no room: the messages go once the server takes them.
        smtp_server.reply("MAIL", None)
        assert processor.process_queue().sent == 4
        assert Counter(smtp_server.message_ids()) == Counter(ids)
        assert queued(queue) == [] and claims(queue) == []
    finally:
        processor.stop(timeout=10)
    os.unlink(filler)


def test_read_only_queue_fails_the_transaction_and_sends_nothing(
        mount_tmpfs, tm, zodb, session, smtp_server):
    small = mount_tmpfs("ro", "size=4m")
    queue = os.path.join(small, "queue")
    earlier = queue_messages(queue, 3)
    remount(small, "ro")
    delivery = QueuedMailDelivery(queue, transaction_manager=tm)
    _db, connection = zodb
    place_order(tm, connection, session, delivery, 0, 200)
    with pytest.raises(OSError) as caught:
        tm.commit()
    tm.abort()
    assert caught.value.errno == errno.EROFS
    assert "could not queue message <order0-0@mailoutbox.test>" in str(caught.value)
    assert committed_orders(zodb, session) == ([], [])

    # A processor cannot claim (or later remove) anything: it sends nothing,
    # since it could not record that it did.
    stats = drain(queue, smtp_server.port)
    assert stats.sent == 0 and stats.skipped == 3
    assert smtp_server.messages == []

    remount(small, "rw")
    assert drain(queue, smtp_server.port).sent == 3
    assert Counter(smtp_server.message_ids()) == Counter(earlier)
    assert listing(queue, "tmp") == [] and queued(queue) == []


@pytest.mark.parametrize("recipients", [1, 150])
def test_file_size_limit_leaves_no_partial_file(queue_path, recipients):
    """No root needed: writes beyond RLIMIT_FSIZE fail with EFBIG.  With
    150 recipients the envelope alone passes the limit, so the error comes
    while a write is still buffered."""
    process = run_helper("fsize-limit", queue_path, "4096", "500", "1000", "5000",
                         "20000", "500", "--recipients", str(recipients))
    out, _err = process.communicate(timeout=30)
    assert process.returncode == 0, out
    outcomes = json.loads(out)
    for outcome in outcomes:
        assert outcome["errno"] in (None, errno.EFBIG), outcome
    failed = [o for o in outcomes if o["errno"]]
    assert failed and all("could not queue message <" in o["error"] for o in failed)
    assert listing(queue_path, "tmp") == []
    assert queued_message_ids(queue_path) == sorted(
        o["id"] for o in outcomes if o["errno"] is None)


def test_state_files_are_written_whole_or_not_at_all(queue_path):
    """A retry state or a reason that cannot be written whole (here: the
    file size limit; in life: a full disk) is not left half-written, and
    the message stays queued, unclaimed, for the next pass."""
    process = run_helper("state-fsize", queue_path, "40")
    out, _err = process.communicate(timeout=30)
    assert process.returncode == 0, out
    assert json.loads(out) == {"defer": errno.EFBIG, "fail": errno.EFBIG}
    maildir = Maildir(queue_path)
    assert listing(queue_path, "tmp") == []
    assert [n for n in listing(queue_path, "new") if n.startswith(".")] == []
    assert len(maildir.scan().entries) == 2
    assert maildir.failed_entries() == []
