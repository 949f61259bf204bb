"""The transactional deliveries (mailoutbox.delivery) with a real
transaction manager, a real queue on disk and a real SMTP server."""
from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import transaction
import zope.event
from transaction.interfaces import ISavepointDataManager
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailoutbox import datamanager as datamanager_mod
from mailoutbox import delivery as mod
from mailoutbox import maildir as maildir_mod
from mailoutbox.delivery import DirectDataManager
from mailoutbox.delivery import DirectMailDelivery
from mailoutbox.delivery import QueuedDataManager
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.envelope import parse_queue_file
from mailoutbox.errors import MailConnectionError
from mailoutbox.events import MailErrorEvent
from mailoutbox.events import MailSentEvent
from mailoutbox.interfaces import IDirectMailDelivery
from mailoutbox.interfaces import IMailer
from mailoutbox.interfaces import IQueuedMailDelivery
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"


def message(n: int) -> bytes:
    return b"From: a@example.org\r\nSubject: message %d\r\n\r\nbody %d\r\n" % (n, n)


def files(queue_path, folder):
    path = os.path.join(queue_path, folder)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def queued(queue_path):
    """(fromaddr, toaddrs, message) of the queued messages, oldest first."""
    result = []
    for path in Maildir(queue_path):
        with open(path, "rb") as f:
            result.append(parse_queue_file(f.read()))
    return result


def open_fds(under):
    """The descriptors this process has open on files under *under*."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile, by another thread
            continue
        if target.startswith(under):
            found.append(target)
    return found


@implementer(ISavepointDataManager)
class Resource:
    """Another resource in the transaction, with hooks into its phases.
    Sorted after the deliveries by default."""

    def __init__(self, tm, key="~resource", on_vote=None, on_finish=None):
        self.transaction_manager = tm
        self.key = key
        self.on_vote = on_vote
        self.on_finish = on_finish
        self.calls = []

    def sortKey(self):
        return self.key

    def tpc_begin(self, txn):
        self.calls.append("tpc_begin")

    def commit(self, txn):
        self.calls.append("commit")

    def tpc_vote(self, txn):
        self.calls.append("tpc_vote")
        if self.on_vote:
            self.on_vote()

    def tpc_finish(self, txn):
        self.calls.append("tpc_finish")
        if self.on_finish:
            self.on_finish()

    def abort(self, txn):
        self.calls.append("abort")

    def tpc_abort(self, txn):
        self.calls.append("tpc_abort")

    def savepoint(self):
        return transaction._transaction.NoRollbackSavepoint(self)


@implementer(IMailer)
class RecordingMailer:
    """A stand-in mailer that records calls (the real one is tested below)."""

    def __init__(self, fail_vote=None, fail_send=None, refuse=None):
        self.calls = []
        self.fail_vote = fail_vote
        self.fail_send = fail_send
        self.refuse = refuse

    def vote(self, fromaddr, toaddrs, message):
        self.calls.append(("vote", fromaddr, toaddrs, message))
        if self.fail_vote:
            raise self.fail_vote

    def send(self, fromaddr, toaddrs, message):
        self.calls.append(("send", fromaddr, toaddrs, message))
        if self.fail_send:
            raise self.fail_send
        return self.refuse

    def abort(self):
        self.calls.append(("abort",))

    def names(self):
        return [call[0] for call in self.calls]


def our_datamanagers(txn):
    return [r for r in txn._resources
            if isinstance(r, (QueuedDataManager, DirectDataManager))]


# -- both deliveries ---------------------------------------------------------

def test_module_names():
    for name in mod.__all__:
        assert hasattr(mod, name), name


def test_datamanager_module_names():
    for name in datamanager_mod.__all__:
        assert getattr(mod, name) is getattr(datamanager_mod, name), name


def test_interfaces(queue_path, tm):
    queued_delivery = QueuedMailDelivery(queue_path)
    assert verifyObject(IQueuedMailDelivery, queued_delivery)
    assert queued_delivery.queuePath == queue_path
    assert queued_delivery.transaction_manager is None
    mailer = RecordingMailer()
    direct = DirectMailDelivery(mailer, transaction_manager=tm)
    assert verifyObject(IDirectMailDelivery, direct)
    assert direct.mailer is mailer
    assert direct.transaction_manager is tm
    assert repr(queued_delivery) == f"<QueuedMailDelivery {queue_path!r}>"
    assert repr(direct).startswith("<DirectMailDelivery <")


def test_data_managers_provide_the_savepoint_interface(queue_path, tm):
    QueuedMailDelivery(queue_path, tm).send("a@x.org", ["b@x.org"], MESSAGE)
    DirectMailDelivery(RecordingMailer(), tm).send("a@x.org", ["b@x.org"], MESSAGE)
    queued_dm, direct_dm = our_datamanagers(tm.get())
    for dm in (queued_dm, direct_dm):
        assert verifyObject(ISavepointDataManager, dm)
        assert dm.transaction_manager is tm
        assert isinstance(dm.sortKey(), str)
        assert dm.sortKey() == dm.sortKey()
        # votes before zope.sqlalchemy, which commits in its vote
        assert dm.sortKey() < "~sqlalchemy:1"
        assert "1 message(s)" in repr(dm)
    assert queued_dm.sortKey() != direct_dm.sortKey()


@pytest.mark.parametrize("make", ["queued", "direct"])
@pytest.mark.parametrize(("args", "error", "text"), [
    (("a@x.org", [], MESSAGE), ValueError, "toaddrs is empty"),
    (("a@x.org", "b@x.org", MESSAGE), TypeError, "not a single str: 'b@x.org'"),
    (("a@x.org", b"b@x.org", MESSAGE), TypeError, "not a single bytes"),
    (("a@x.org", [b"b@x.org"], MESSAGE), TypeError, "invalid address b'b@x.org'"),
    (("a@x.org", ["b@x.org\r\nX: y"], MESSAGE), ValueError, "CR, LF and NUL"),
    (("a@x.org", ["b@x.org\0"], MESSAGE), ValueError, "CR, LF and NUL"),
    (("a@x.org", ["b@"], MESSAGE), ValueError, "invalid address 'b@'"),
    (("a@x.org", ["b@x.org, c@x.org"], MESSAGE), ValueError, "more than one"),
    (("a@x.org\n", ["b@x.org"], MESSAGE), ValueError, "invalid sender"),
    ((None, ["b@x.org"], MESSAGE), TypeError, "fromaddr must be a str"),
    (("a@x.org", ["b@x.org"], b"Subject: x\r\nHello,\r\n\r\n"), ValueError,
     "not a header field"),
    (("a@x.org", ["b@x.org"], b"Subject: x\r\n"), ValueError, "no blank line"),
    (("a@x.org", ["b@x.org"], b"Message-Id: bad\r\n\r\n"), ValueError,
     "malformed Message-Id"),
    (("a@x.org", ["b@x.org"], None), TypeError, "message must be"),
])
def test_send_refuses_bad_input_without_joining(queue_path, tm, make, args, error,
                                                text):
    mailer = RecordingMailer()
    delivery = (QueuedMailDelivery(queue_path, tm) if make == "queued"
                else DirectMailDelivery(mailer, tm))
    with pytest.raises(error) as info:
        delivery.send(*args)
    assert text in str(info.value)
    assert tm.get()._resources == []
    tm.commit()
    assert not os.path.exists(queue_path)
    assert mailer.calls == []


@pytest.mark.parametrize("make", ["queued", "direct"])
def test_send_after_commit_in_the_same_transaction_explains(queue_path, tm, make):
    delivery = (QueuedMailDelivery(queue_path, tm) if make == "queued"
                else DirectMailDelivery(RecordingMailer(), tm))
    errors = []

    def hook(status):
        try:
            delivery.send("a@x.org", ["b@x.org"], MESSAGE)
        except ValueError as exc:
            errors.append(str(exc))

    tm.get().addAfterCommitHook(hook)
    tm.commit()
    assert len(errors) == 1
    assert "begin a new transaction first" in errors[0]


# -- queued delivery -----------------------------------------------------------

def test_commit_queues(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, tm)
    message_id = delivery.send('"Doe, Jane" <a@x.org>',
                               ['"Doe, Jane" <jane@x.org>', "bob@x.org"], MESSAGE)
    assert not os.path.exists(queue_path)  # nothing before the commit
    tm.commit()
    assert files(queue_path, "tmp") == []
    [(fromaddr, toaddrs, data)] = queued(queue_path)
    assert fromaddr == '"Doe, Jane" <a@x.org>'
    assert toaddrs == ('"Doe, Jane" <jane@x.org>', "bob@x.org")
    assert data == b"Message-Id: <%s>\r\n" % message_id.encode() + MESSAGE
    [name] = files(queue_path, "new")
    assert os.stat(os.path.join(queue_path, "new", name)).st_mode & 0o777 == 0o600
    for folder in ("", "tmp", "new", "cur"):
        mode = os.stat(os.path.join(queue_path, folder)).st_mode & 0o777
        assert mode == 0o700


def test_queue_folder_removed_while_running_is_made_again(queue_path, tm):
    import shutil

    delivery = QueuedMailDelivery(queue_path, tm)
    delivery.send("a@x.org", ["b@x.org"], message(1))
    tm.commit()
    shutil.rmtree(queue_path)
    delivery.send("a@x.org", ["b@x.org"], message(2))
    delivery.send("a@x.org", ["b@x.org"], message(3))
    tm.commit()
    assert len(queued(queue_path)) == 2


def test_abort_queues_nothing(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, tm)
    delivery.send("a@x.org", ["b@x.org"], MESSAGE)
    tm.abort()
    tm.commit()
    assert not os.path.exists(queue_path)


def test_one_data_manager_per_delivery_and_transaction(queue_path, tm):
    first = QueuedMailDelivery(queue_path, tm)
    second = QueuedMailDelivery(queue_path, tm)
    ids = [first.send("a@x.org", ["b@x.org"], message(n)) for n in range(3)]
    ids.append(second.send("a@x.org", ["b@x.org"], message(3)))
    assert len(set(ids)) == 4
    dms = our_datamanagers(tm.get())
    assert len(dms) == 2
    assert [len(dm.messages) for dm in dms] == [3, 1]
    tm.commit()
    assert len(queued(queue_path)) == 4
    # the next transaction gets a new one
    first.send("a@x.org", ["b@x.org"], message(4))
    [dm] = our_datamanagers(tm.get())
    assert dm not in dms


def test_abort_during_two_phase_commit_leaves_no_file(queue_path, tm):
    seen = []

    def fail():
        # our vote has written the files into tmp/ by now, and the
        # transaction's commit record
        seen.extend(files(queue_path, "tmp"))
        raise RuntimeError("the other resource cannot commit")

    delivery = QueuedMailDelivery(queue_path, tm)
    for n in range(3):
        delivery.send("a@x.org", ["b@x.org"], message(n))
    other = Resource(tm, on_vote=fail)
    tm.get().join(other)
    with pytest.raises(RuntimeError, match="cannot commit"):
        tm.commit()
    assert len(seen) == 4 and seen[0].startswith(".pending-")
    assert files(queue_path, "tmp") == []
    assert files(queue_path, "new") == []
    tm.abort()


def test_savepoint_rollback_discards_later_messages(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, tm)
    delivery.send("a@x.org", ["b@x.org"], message(1))
    outer = tm.savepoint()
    delivery.send("a@x.org", ["b@x.org"], message(2))
    inner = tm.savepoint()
    delivery.send("a@x.org", ["b@x.org"], message(3))
    inner.rollback()
    delivery.send("a@x.org", ["b@x.org"], message(4))
    outer.rollback()
    delivery.send("a@x.org", ["b@x.org"], message(5))
    tm.commit()
    subjects = [data.split(b"\r\n")[2] for _f, _t, data in queued(queue_path)]
    assert subjects == [b"Subject: message 1", b"Subject: message 5"]


def test_savepoint_before_the_first_message(queue_path, tm):
    # The data manager joins after the savepoint: the transaction unjoins it
    # on rollback, and the next send joins a new one.
    delivery = QueuedMailDelivery(queue_path, tm)
    savepoint = tm.savepoint()
    delivery.send("a@x.org", ["b@x.org"], message(1))
    savepoint.rollback()
    assert our_datamanagers(tm.get()) == []
    delivery.send("a@x.org", ["b@x.org"], message(2))
    assert len(our_datamanagers(tm.get())) == 1
    tm.commit()
    [(_f, _t, data)] = queued(queue_path)
    assert b"Subject: message 2" in data


def test_savepoint_of_a_transaction_left_empty(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, tm)
    delivery.send("a@x.org", ["b@x.org"], message(1))
    tm.savepoint(optimistic=True)
    savepoint = tm.savepoint()
    savepoint.rollback()
    first = tm.get()._resources[0]
    first.messages.clear()  # as if every message was rolled back
    tm.commit()
    assert not os.path.exists(queue_path)


def test_default_transaction_manager_is_looked_up_at_send_time(queue_path,
                                                               monkeypatch):
    delivery = QueuedMailDelivery(queue_path)
    replacement = transaction.TransactionManager()
    monkeypatch.setattr(transaction, "manager", replacement)
    delivery.send("a@x.org", ["b@x.org"], MESSAGE)
    [dm] = our_datamanagers(replacement.get())
    assert dm.transaction_manager is replacement
    replacement.commit()
    assert len(queued(queue_path)) == 1


def test_default_thread_transaction_manager(queue_path):
    delivery = QueuedMailDelivery(queue_path)
    results = []

    def worker(n):
        transaction.begin()
        delivery.send("a@x.org", ["b@x.org"], message(n))
        if n % 2:
            transaction.abort()
        else:
            transaction.commit()
        results.append(n)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(results) == [0, 1, 2, 3]
    subjects = sorted(data.split(b"\r\n")[2] for _f, _t, data in queued(queue_path))
    assert subjects == [b"Subject: message 0", b"Subject: message 2"]


def test_new_message_id_can_be_overridden(queue_path, tm):
    class Delivery(QueuedMailDelivery):
        def newMessageId(self):
            return "custom.1@example.org"

    assert Delivery(queue_path, tm).send("a@x.org", ["b@x.org"], MESSAGE) == (
        "custom.1@example.org")
    tm.commit()
    [(_f, _t, data)] = queued(queue_path)
    assert data.startswith(b"Message-Id: <custom.1@example.org>\r\n")


def test_logging_names_the_message_id(queue_path, tm, caplog):
    caplog.set_level(logging.DEBUG, logger="mailoutbox.delivery")
    message_id = QueuedMailDelivery(queue_path, tm).send("a@x.org", ["b@x.org"],
                                                         MESSAGE)
    tm.commit()
    records = [r for r in caplog.records if r.name == "mailoutbox.delivery"]
    assert records
    assert all(message_id in r.getMessage() for r in records)
    assert any("queued message " + message_id in r.getMessage() for r in records)


def test_queue_path_is_not_a_folder(tmp_path, tm, caplog):
    path = tmp_path / "file"
    path.write_bytes(b"")
    delivery = QueuedMailDelivery(str(path), tm)
    message_id = delivery.send("a@x.org", ["b@x.org"], MESSAGE)
    with pytest.raises(ValueError) as info:
        tm.commit()
    assert f"could not queue message <{message_id}> in {path}: {path} is not" \
        " a Maildir folder: it is a file" in str(info.value)
    assert info.value.__cause__ is not None
    assert any(message_id in r.getMessage() and r.exc_info for r in caplog.records)
    tm.abort()


def test_write_error_while_voting_removes_what_was_written(queue_path, tm):
    """A real EFBIG from the kernel (RLIMIT_FSIZE) on the third message."""
    delivery = QueuedMailDelivery(queue_path, tm)
    delivery.send("a@x.org", ["b@x.org"], message(1))
    delivery.send("a@x.org", ["b@x.org"], message(2))
    big_id = delivery.send("a@x.org", ["b@x.org"],
                           b"Subject: big\r\n\r\n" + b"x" * 200_000)
    other = Resource(tm)
    tm.get().join(other)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(OSError) as info:
            tm.commit()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert info.value.errno == 27  # EFBIG
    assert f"could not queue message <{big_id}>" in str(info.value)
    assert files(queue_path, "tmp") == []
    assert files(queue_path, "new") == []
    assert "tpc_finish" not in other.calls
    assert "tpc_abort" in other.calls
    tm.abort()


def test_fsync_error_while_voting(queue_path, tm, monkeypatch):
    calls = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(maildir_mod.os, "fsync", fsync)
    delivery = QueuedMailDelivery(queue_path, tm)
    ids = [delivery.send("a@x.org", ["b@x.org"], message(n)) for n in range(3)]
    with pytest.raises(OSError, match=f"could not queue message <{ids[1]}>.*"
                                      "Input/output error"):
        tm.commit()
    assert files(queue_path, "tmp") == []
    assert files(queue_path, "new") == []
    tm.abort()


def test_unexpected_error_while_voting_is_raised_as_is(queue_path, tm, monkeypatch):
    def broken(self):
        raise RuntimeError("broken")

    delivery = QueuedMailDelivery(queue_path, tm)
    delivery.send("a@x.org", ["b@x.org"], MESSAGE)
    monkeypatch.setattr(Maildir, "newMessage", broken)
    with pytest.raises(RuntimeError, match=r"^broken$"):
        tm.commit()
    tm.abort()


def test_abort_of_tmp_file_failing_is_logged(queue_path, tm, monkeypatch, caplog):
    def unlink(path):
        raise PermissionError(13, "Permission denied", path)

    delivery = QueuedMailDelivery(queue_path, tm)
    message_id = delivery.send("a@x.org", ["b@x.org"], MESSAGE)

    def fail():
        monkeypatch.setattr(maildir_mod.os, "unlink", unlink)
        raise RuntimeError("no")

    tm.get().join(Resource(tm, on_vote=fail))
    with pytest.raises(RuntimeError):
        tm.commit()
    monkeypatch.undo()
    assert any(f"could not remove the file of message {message_id}" in r.getMessage()
               for r in caplog.records)
    tm.abort()


def test_tpc_finish_never_raises(queue_path, tm, caplog):
    """new/ disappears between the vote and the finish: the rename and the
    fsync of new/ fail; both are logged and the transaction commits."""
    delivery = QueuedMailDelivery(queue_path, tm)
    message_id = delivery.send("a@x.org", ["b@x.org"], MESSAGE)
    other = Resource(tm, on_vote=lambda: os.rmdir(os.path.join(queue_path, "new")))
    tm.get().join(other)
    tm.commit()
    assert other.calls[-1] == "tpc_finish"
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1
    assert message_id in critical[0].getMessage()
    assert critical[0].exc_info
    fsync_errors = [r for r in caplog.records if "could not fsync" in r.getMessage()]
    assert len(fsync_errors) == 1
    assert message_id in fsync_errors[0].getMessage()
    # what is left is a file in tmp/, never sent, removed by the clean-up
    [name] = files(queue_path, "tmp")
    maildir = Maildir(queue_path, create=True)
    mtime = os.stat(os.path.join(queue_path, "tmp", name)).st_mtime
    assert maildir.cleanup(maildir.scan(), now=mtime + 36 * 3600 + 1) == 1
    assert files(queue_path, "tmp") == []


def test_finish_renames_then_fsyncs_new_once(queue_path, tm, monkeypatch):
    """The durability order of tpc_finish: every rename into new/, then one
    fsync of new/."""
    log = []
    real_rename, real_fsync = os.rename, os.fsync

    def rename(src, dst):
        log.append(("rename", os.path.basename(os.path.dirname(dst))))
        real_rename(src, dst)

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    delivery = QueuedMailDelivery(queue_path, tm)
    for n in range(3):
        delivery.send("a@x.org", ["b@x.org"], message(n))
    tm.get().join(Resource(tm, on_vote=lambda: log.append(("voted",))))
    monkeypatch.setattr(maildir_mod.os, "rename", rename)
    monkeypatch.setattr(maildir_mod.os, "fsync", fsync)
    tm.commit()
    voted = log.index(("voted",))
    tmp, new = os.path.join(queue_path, "tmp"), os.path.join(queue_path, "new")
    # each file in tmp/, the commit record, tmp/
    assert [e[0] for e in log[:voted]] == ["fsync"] * 5
    assert all(e[1].startswith(tmp + "/") for e in log[:4])
    assert os.path.basename(log[3][1]).startswith(".pending-")
    assert log[4] == ("fsync", tmp)
    # the record is committed, then the messages move
    assert log[voted + 1:] == [("rename", "tmp"), ("fsync", tmp)] + [
        ("rename", "new")] * 3 + [("fsync", new)]
    assert files(queue_path, "tmp") == []


def test_one_message_needs_no_commit_record(queue_path, tm, monkeypatch):
    """A transaction with one message: one fsync, one rename, one fsync."""
    log = []
    real_rename, real_fsync = os.rename, os.fsync

    def rename(src, dst):
        log.append(("rename", os.path.basename(os.path.dirname(dst))))
        real_rename(src, dst)

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    QueuedMailDelivery(queue_path, tm).send("a@x.org", ["b@x.org"], MESSAGE)
    monkeypatch.setattr(maildir_mod.os, "rename", rename)
    monkeypatch.setattr(maildir_mod.os, "fsync", fsync)
    tm.commit()
    assert [e[0] for e in log] == ["fsync", "rename", "fsync"]
    assert log[2] == ("fsync", os.path.join(queue_path, "new"))


def test_many_messages_in_one_transaction(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, tm)
    body = b"x" * 2000
    during = []
    for n in range(3000):
        delivery.send("a@x.org", ["b@x.org"], message(n) + body)
    tm.get().join(Resource(tm, on_vote=lambda: during.append(open_fds(queue_path))))
    tm.commit()
    assert during == [[]]  # all written, none left open after voting
    assert open_fds(queue_path) == []
    assert len(files(queue_path, "new")) == 3000
    assert files(queue_path, "tmp") == []
    assert len(our_datamanagers(tm.get())) == 0


CRASH = textwrap.dedent("""
    import os, sys, transaction
    from transaction.interfaces import IDataManager
    from zope.interface import implementer
    from mailoutbox.delivery import QueuedMailDelivery

    @implementer(IDataManager)
    class Crash:
        transaction_manager = transaction.manager
        def sortKey(self): return "~crash"
        def tpc_begin(self, txn): pass
        def commit(self, txn): pass
        def tpc_vote(self, txn):
            os._exit(3)   # killed between tpc_vote and tpc_finish
        def tpc_finish(self, txn): pass
        def abort(self, txn): pass
        def tpc_abort(self, txn): pass

    QueuedMailDelivery(sys.argv[1]).send("a@x.org", ["b@x.org"],
                                         b"Subject: x\\n\\nbody")
    transaction.get().join(Crash())
    transaction.commit()
""")


def test_crash_between_vote_and_finish_leaves_only_a_tmp_file(queue_path):
    result = subprocess.run([sys.executable, "-c", CRASH, queue_path],
                            timeout=60, check=False)
    assert result.returncode == 3
    [name] = files(queue_path, "tmp")
    maildir = Maildir(queue_path)
    assert list(maildir) == []  # never sent
    mtime = os.stat(os.path.join(queue_path, "tmp", name)).st_mtime
    assert maildir.cleanup(maildir.scan(), now=mtime + 3600) == 0
    assert maildir.cleanup(maildir.scan(), now=mtime + 36 * 3600 + 1) == 1
    assert files(queue_path, "tmp") == []


# -- direct delivery -----------------------------------------------------------

def test_direct_commit_sends_and_notifies_after_completion(tm, events):
    mailer = RecordingMailer(refuse={"c@x.org": (550, "no such user")})
    delivery = DirectMailDelivery(mailer, tm)
    seen_in_subscriber = []
    other = Resource(tm)
    zope.event.subscribers.insert(0, lambda e: seen_in_subscriber.append(
        list(other.calls)))
    try:
        first = delivery.send("a@x.org", ["b@x.org", "c@x.org"], message(1))
        second = delivery.send("a@x.org", ["d@x.org"], message(2))
        tm.get().join(other)
        assert mailer.calls == []
        tm.commit()
    finally:
        del zope.event.subscribers[0]
    assert mailer.names() == ["vote", "send", "send"]
    assert mailer.calls[0][1:3] == ("a@x.org", ("b@x.org", "c@x.org"))
    assert mailer.calls[1][3].startswith(b"Message-Id: <%s>\r\n" % first.encode())
    assert [type(e) for e in events] == [MailSentEvent, MailSentEvent]
    assert [e.messageId for e in events] == [first, second]
    assert events[0].refused == {"c@x.org": (550, "no such user")}
    # dispatched after every resource finished, never inside the commit
    assert all(calls[-1] == "tpc_finish" for calls in seen_in_subscriber)


def test_direct_abort_sends_nothing(tm, events):
    mailer = RecordingMailer()
    DirectMailDelivery(mailer, tm).send("a@x.org", ["b@x.org"], MESSAGE)
    tm.abort()
    assert mailer.calls == []  # no vote, so no mailer.abort() either
    assert events == []


def test_direct_abort_after_vote_calls_mailer_abort(tm, events):
    mailer = RecordingMailer()
    DirectMailDelivery(mailer, tm).send("a@x.org", ["b@x.org"], MESSAGE)
    tm.get().join(Resource(tm, on_vote=lambda: 1 / 0))
    with pytest.raises(ZeroDivisionError):
        tm.commit()
    assert mailer.names() == ["vote", "abort"]
    assert events == []
    tm.abort()
    assert mailer.names() == ["vote", "abort"]


def test_direct_vote_failure_aborts_the_transaction(tm, events):
    mailer = RecordingMailer(fail_vote=MailConnectionError("no server"))
    other = Resource(tm)
    DirectMailDelivery(mailer, tm).send("a@x.org", ["b@x.org"], MESSAGE)
    tm.get().join(other)
    with pytest.raises(MailConnectionError):
        tm.commit()
    assert mailer.names() == ["vote", "abort"]
    assert "tpc_finish" not in other.calls
    assert events == []
    tm.abort()


def test_direct_mailer_abort_failing_is_logged(tm, caplog):
    mailer = RecordingMailer(fail_vote=MailConnectionError("no server"))
    mailer.abort = lambda: 1 / 0
    message_id = DirectMailDelivery(mailer, tm).send("a@x.org", ["b@x.org"], MESSAGE)
    with pytest.raises(MailConnectionError):
        tm.commit()
    assert any("failed to abort" in r.getMessage() and message_id in r.getMessage()
               for r in caplog.records)
    tm.abort()


def test_direct_send_failure_is_logged_and_reported(tm, events, caplog):
    mailer = RecordingMailer(fail_send=ConnectionResetError("reset"))
    message_id = DirectMailDelivery(mailer, tm).send("a@x.org", ["b@x.org"], MESSAGE)
    tm.commit()  # does not raise
    [event] = events
    assert isinstance(event, MailErrorEvent)
    assert event.messageId == message_id
    assert event.permanent is True
    assert "reset" in event.errorMessage
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert message_id in record.getMessage()
    assert record.exc_info


def test_direct_savepoints(tm, events):
    mailer = RecordingMailer()
    delivery = DirectMailDelivery(mailer, tm)
    kept = delivery.send("a@x.org", ["b@x.org"], message(1))
    savepoint = tm.savepoint()
    delivery.send("a@x.org", ["b@x.org"], message(2))
    savepoint.rollback()
    tm.commit()
    assert [e.messageId for e in events] == [kept]
    assert mailer.names() == ["vote", "send"]


def test_direct_transaction_left_empty_does_not_vote(tm, events):
    mailer = RecordingMailer()
    delivery = DirectMailDelivery(mailer, tm)
    savepoint = tm.savepoint()
    delivery.send("a@x.org", ["b@x.org"], message(1))
    dm = our_datamanagers(tm.get())[0]
    savepoint.rollback()
    tm.get().join(dm)  # joined, but every message rolled back
    tm.commit()
    assert mailer.calls == []
    assert events == []


def test_subscriber_failure_is_logged_and_others_still_notified(tm, events, caplog):
    def broken(event):
        raise RuntimeError("subscriber bug")

    zope.event.subscribers.insert(0, broken)
    try:
        delivery = DirectMailDelivery(RecordingMailer(), tm)
        ids = [delivery.send("a@x.org", ["b@x.org"], message(n)) for n in range(2)]
        tm.commit()
    finally:
        zope.event.subscribers.remove(broken)
    assert events == []  # later subscribers of the same event are skipped...
    failures = [r for r in caplog.records if "a subscriber failed" in r.getMessage()]
    assert [ids[0] in failures[0].getMessage(), ids[1] in failures[1].getMessage()] == [
        True, True]  # ... but every event is dispatched


def test_subscriber_may_commit_its_own_transaction(queue_path, tm, events):
    """A subscriber queues a message with the same transaction manager; hooks
    added after the delivery's still run."""
    queue = QueuedMailDelivery(queue_path, tm)
    direct = DirectMailDelivery(RecordingMailer(), tm)
    second_direct = DirectMailDelivery(RecordingMailer(), tm)
    followups = []
    later_hooks = []

    def subscriber(event):
        with tm:
            followups.append(queue.send("a@x.org", ["audit@x.org"],
                                        b"Subject: sent %s\r\n\r\n"
                                        % event.messageId.encode()))

    zope.event.subscribers.append(subscriber)
    try:
        first = direct.send("a@x.org", ["b@x.org"], message(1))
        second = second_direct.send("a@x.org", ["b@x.org"], message(2))
        tm.get().addAfterCommitHook(lambda status: later_hooks.append(status))
        tm.commit()
    finally:
        zope.event.subscribers.remove(subscriber)
    assert sorted(e.messageId for e in events) == sorted([first, second])
    assert later_hooks == [True]
    assert len(followups) == 2
    subjects = sorted(data.split(b"\r\n")[1] for _f, _t, data in queued(queue_path))
    assert subjects == sorted(b"Subject: sent %s" % i.encode() for i in (first, second))
    # and the manager is usable afterwards
    queue.send("a@x.org", ["b@x.org"], MESSAGE)
    tm.commit()
    assert len(queued(queue_path)) == 3


def test_dispatch_gives_up_moving_behind_other_hooks(tm, events, monkeypatch):
    """Two hooks that both want to be last: ours stops deferring."""
    monkeypatch.setattr(datamanager_mod, "MAX_HOOK_DEFERRALS", 3)
    calls = []

    def greedy(status, txn, n=0):
        calls.append(n)
        if n < 20:
            txn.addAfterCommitHook(greedy, args=(txn, n + 1))

    DirectMailDelivery(RecordingMailer(), tm).send("a@x.org", ["b@x.org"], MESSAGE)
    txn = tm.get()
    tm.get().join(Resource(tm, on_finish=lambda: txn.addAfterCommitHook(
        greedy, args=(txn,))))
    tm.commit()
    assert len(events) == 1
    assert calls == list(range(21))


def test_scheduling_failure_is_logged(tm, events, caplog, monkeypatch):
    def broken(txn, events):
        raise RuntimeError("cannot schedule")

    monkeypatch.setattr(datamanager_mod, "_schedule", broken)
    message_id = DirectMailDelivery(RecordingMailer(), tm).send(
        "a@x.org", ["b@x.org"], MESSAGE)
    tm.commit()
    assert any("could not schedule the events" in r.getMessage()
               and message_id in r.getMessage() for r in caplog.records)
    assert events == []


# -- direct delivery with the real SMTP mailer and server -------------------------

@pytest.fixture
def smtp_mailer(smtp_server):
    mailer = SMTPMailer(smtp_server.host, smtp_server.port, timeout=10)
    yield mailer
    mailer.close()


def test_direct_real_smtp(smtp_server, smtp_mailer, tm, events):
    delivery = DirectMailDelivery(smtp_mailer, tm)
    ids = [delivery.send("a@example.org", ['"Doe, Jane" <jane@example.org>'],
                         message(n)) for n in range(2)]
    tm.commit()
    assert smtp_server.message_ids() == ids
    assert smtp_server.messages[0].rcpt_tos == ["jane@example.org"]
    assert [type(e) for e in events] == [MailSentEvent, MailSentEvent]
    assert [e.refused for e in events] == [{}, {}]


def test_direct_real_smtp_non_ascii(smtp_server, smtp_mailer, tm, events):
    import email.message

    msg = email.message.EmailMessage()
    msg["From"] = "Jürgen <a@example.org>"
    msg["To"] = "b@example.org"
    msg["Subject"] = "Grüße aus Köln"
    msg.set_content("Grüße ✓\n")
    message_id = DirectMailDelivery(smtp_mailer, tm).send(
        "a@example.org", ["b@example.org"], msg)
    tm.commit()
    [received] = smtp_server.messages
    assert received.message_id == message_id
    assert received.message["Subject"] == "Grüße aus Köln"
    assert received.message.get_content() == "Grüße ✓\r\n"  # CRLF on the wire


def test_direct_real_smtp_refused_recipient(smtp_server, smtp_mailer, tm, events):
    smtp_server.refuse("bad@example.org")
    DirectMailDelivery(smtp_mailer, tm).send(
        "a@example.org", ["b@example.org", "bad@example.org"], MESSAGE)
    tm.commit()
    [event] = events
    assert isinstance(event, MailSentEvent)
    assert list(event.refused) == ["bad@example.org"]
    assert event.refused["bad@example.org"][0] == 550


def test_direct_real_smtp_all_refused(smtp_server, smtp_mailer, tm, events):
    smtp_server.refuse("bad@example.org")
    message_id = DirectMailDelivery(smtp_mailer, tm).send(
        "a@example.org", ["bad@example.org"], MESSAGE)
    tm.commit()
    [event] = events
    assert isinstance(event, MailErrorEvent)
    assert event.messageId == message_id
    assert event.permanent is True
    assert event.code == 550
    assert list(event.refused) == ["bad@example.org"]
    assert smtp_server.messages == []


def test_direct_real_smtp_data_rejected(smtp_server, smtp_mailer, tm, events, caplog):
    smtp_server.reply("DATA", "554 5.6.0 message rejected")
    message_id = DirectMailDelivery(smtp_mailer, tm).send(
        "a@example.org", ["b@example.org"], MESSAGE)
    tm.commit()
    [event] = events
    assert isinstance(event, MailErrorEvent)
    assert event.code == 554
    assert "message rejected" in event.errorMessage
    assert any(message_id in r.getMessage() for r in caplog.records
               if r.levelno == logging.ERROR)


def test_direct_real_smtp_server_down_aborts(smtp_server, tm, events):
    smtp_server.stop()
    mailer = SMTPMailer(smtp_server.host, smtp_server.port, timeout=5)
    other = Resource(tm)
    DirectMailDelivery(mailer, tm).send("a@example.org", ["b@example.org"], MESSAGE)
    tm.get().join(other)
    with pytest.raises(MailConnectionError):
        tm.commit()
    assert "tpc_finish" not in other.calls
    assert events == []
    tm.abort()
