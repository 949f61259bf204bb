"""Scheduled sending (not_before) and priorities: the API, the Maildir
queue, the processor, zope.sendmail draining such a queue, crashes."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time

import pytest
from zope.sendmail.mailer import SMTPMailer as ZopeSMTPMailer
from zope.sendmail.queue import QueueProcessorThread as ZopeProcessor

from mailoutbox import schedule
from mailoutbox.datamanager import QueuedDataManager
from mailoutbox.delivery import DirectMailDelivery
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.maildir import RETRY_PREFIX
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread
from mailoutbox.retry import RetryPolicy

UTC = datetime.timezone.utc
HOUR = 3600.0


def message(subject: str) -> bytes:
    return (f"From: shop@example.org\r\nTo: jane@example.org\r\n"
            f"Subject: {subject}\r\n\r\nHello.\r\n").encode()


def subjects(server) -> list[str]:
    return [received.message["Subject"] for received in server.messages]


@pytest.fixture
def processor(queue_path, smtp_server):
    made = []

    def make(**options):
        options.setdefault("concurrency", 1)
        p = QueueProcessorThread(**options)
        p.setMailer(SMTPMailer(smtp_server.host, smtp_server.port,
                               no_tls=True, timeout=10))
        p.setQueuePath(queue_path)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop(timeout=10)


def sidecars(path: str) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(path, "new"))
                  if n.startswith(RETRY_PREFIX))


# -- checking what send() is given ------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    (None, 0), ("low", -10), ("normal", 0), ("high", 10), (0, 0),
    (-100, -100), (100, 100), (7, 7),
])
def test_check_priority(value, expected):
    assert schedule.check_priority(value) == expected


@pytest.mark.parametrize(("value", "error", "text"), [
    ("urgent", ValueError, "unknown priority 'urgent'"),
    ("HIGH", ValueError, "'low', 'normal' or 'high'"),
    (101, ValueError, "out of range"),
    (-101, ValueError, "out of range"),
    (True, TypeError, "not bool"),
    (1.5, TypeError, "not float"),
    (b"high", TypeError, "not bytes"),
])
def test_check_priority_refuses(value, error, text):
    with pytest.raises(error, match=text):
        schedule.check_priority(value)


def test_check_not_before():
    aware = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert schedule.check_not_before(None) is None
    assert schedule.check_not_before(aware) == aware.timestamp()
    other = aware.astimezone(datetime.timezone(datetime.timedelta(hours=5)))
    assert schedule.check_not_before(other) == aware.timestamp()
    assert schedule.check_not_before(1700000000) == 1700000000.0
    assert isinstance(schedule.check_not_before(17), float)
    assert schedule.check_not_before(
        datetime.timedelta(minutes=10), now=lambda: 1000.0) == 1600.0
    assert schedule.check_not_before(0.5) == 0.5  # the past: due at once


@pytest.mark.parametrize(("value", "error", "text"), [
    (datetime.datetime(2030, 1, 1), ValueError, "has no time zone"),
    (datetime.timedelta(seconds=-1), ValueError, "negative delay"),
    (-1, ValueError, "finite number"),
    (float("nan"), ValueError, "finite number"),
    (float("inf"), ValueError, "finite number"),
    ("2030-01-01", TypeError, "not str"),
    (True, TypeError, "not bool"),
    (datetime.date(2030, 1, 1), TypeError, "not date"),
])
def test_check_not_before_refuses(value, error, text):
    with pytest.raises(error, match=text):
        schedule.check_not_before(value)


@pytest.mark.parametrize(("options", "error"), [
    ({"priority": "urgent"}, ValueError), ({"priority": 2.0}, TypeError),
    ({"not_before": "tomorrow"}, TypeError),
    ({"not_before": datetime.datetime(2030, 1, 1)}, ValueError),
])
def test_send_refuses_bad_options_and_joins_nothing(queue_path, tm, options,
                                                    error):
    delivery = QueuedMailDelivery(queue_path, tm)
    with pytest.raises(error):
        delivery.send("shop@example.org", ["jane@example.org"], message("x"),
                      **options)
    with pytest.raises(error):
        delivery.send_message(message("x"), **options)
    assert tm.get()._resources == []


def test_send_records_the_options(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, tm)
    when = datetime.datetime.now(UTC) + datetime.timedelta(hours=1)
    delivery.send("shop@example.org", ["jane@example.org"], message("a"),
                  not_before=when, priority="high")
    delivery.send_message(message("b"), priority=-3)
    (datamanager,) = tm.get()._resources
    first, second = datamanager.messages
    assert (first.not_before, first.priority) == (when.timestamp(), 10)
    assert (second.not_before, second.priority) == (None, -3)


def test_a_direct_delivery_cannot_wait(tm, smtp_server):
    mailer = SMTPMailer(smtp_server.host, smtp_server.port, no_tls=True)
    delivery = DirectMailDelivery(mailer, tm)
    with pytest.raises(ValueError, match="cannot wait: not_before is 20"):
        delivery.send("shop@example.org", ["jane@example.org"], message("x"),
                      not_before=datetime.timedelta(minutes=1))
    assert tm.get()._resources == []
    # A time that has come is no reason to wait; the priority is ignored.
    delivery.send("shop@example.org", ["jane@example.org"], message("now"),
                  not_before=time.time() - 1, priority="low")
    tm.commit()
    assert subjects(smtp_server) == ["now"]


# -- the Maildir queue ------------------------------------------------------------

def test_names_record_the_priority_and_the_listing_orders_by_it(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, tm)
    for subject, priority in [("n1", None), ("low", "low"), ("h1", "high"),
                              ("n2", 0), ("h2", "high"), ("top", 100)]:
        delivery.send("shop@example.org", ["jane@example.org"], message(subject),
                      priority=priority)
        tm.commit()
    maildir = Maildir(queue_path)
    entries = maildir.scan().entries
    priorities = [maildir.priority(e) for e in entries]
    assert priorities == [100, 10, 10, 0, 0, -10]
    assert [e.name.split(".")[1].endswith(",p10") for e in entries[1:3]] == [
        True, True]
    assert "," not in entries[3].name  # a normal message's name is as before
    # Within one priority, oldest first (the names start with the time).
    assert entries[1].name < entries[2].name and entries[3].name < entries[4].name


@pytest.mark.parametrize(("name", "priority"), [
    ("1700000000.M1P2Q3Rab,p10.host", 10),
    ("1700000000.M1P2Q3Rab,p-5.host.example.org", -5),
    ("1700000000.M1P2Q3Rab.host,p10", 0),  # in the host part: not ours
    ("1700000000.M1P2Q3Rab,p999.host", 100),  # clamped
    ("1700000000.M1P2Q3Rab,x.host", 0),
    ("1700000000.12345.host,p10.4242", 0),  # zope.sendmail's
    ("weird,p10", 0),
    ("1700000000.1", 0),
])
def test_priority_of_names(name, priority):
    assert schedule.priority_of(name) == priority


def test_a_scheduled_message_has_its_retry_state_before_it_is_queued(
        queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, tm)
    when = time.time() + HOUR
    delivery.send("shop@example.org", ["jane@example.org"], message("later"),
                  not_before=when)
    (datamanager,) = tm.get()._resources
    txn = tm.get()
    datamanager.tpc_begin(txn)
    datamanager.commit(txn)
    datamanager.tpc_vote(txn)
    maildir = Maildir(queue_path)
    (name,) = os.listdir(maildir.tmp)
    (sidecar,) = sidecars(queue_path)
    assert sidecar == RETRY_PREFIX + name
    state = maildir.retry_state(maildir.find(name) or _entry(maildir, name))
    assert state == {"not_before": when, "attempts": 0}
    # A processor tidying up meanwhile keeps it: the message is in tmp/.
    assert maildir.cleanup(maildir.scan()) == 0
    assert sidecars(queue_path) == [sidecar]
    datamanager.tpc_finish(txn)
    scan = maildir.scan()
    assert [e.name for e in scan.entries] == [name]
    assert scan.retry_at[name] == pytest.approx(when, abs=1e-3)
    assert schedule.scheduled_for(maildir.retry_state(scan.entries[0])) == when


def _entry(maildir, name):
    from mailoutbox.maildir import Entry

    return Entry(maildir.new, name)


def test_an_aborted_scheduled_message_leaves_nothing(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, tm)
    delivery.send("shop@example.org", ["jane@example.org"], message("later"),
                  not_before=time.time() + HOUR)
    (datamanager,) = tm.get()._resources
    txn = tm.get()
    datamanager.tpc_vote(txn)
    assert sidecars(queue_path)
    datamanager.tpc_abort(txn)
    assert sidecars(queue_path) == []
    assert os.listdir(os.path.join(queue_path, "tmp")) == []


def test_an_orphaned_schedule_is_removed_once_its_message_is_gone(queue_path):
    maildir = Maildir(queue_path, create=True)
    path = maildir.schedule("1700000000.M1P2Q3Rab.host", time.time() + HOUR)
    assert maildir.cleanup(maildir.scan()) == 1
    assert not os.path.exists(path)


def test_a_relay_message_is_scheduled_in_its_relay_folder(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, tm, mailers=["bulk"])
    when = time.time() + HOUR
    delivery.send("shop@example.org", ["jane@example.org"], message("r"),
                  mailer="bulk", not_before=when, priority="low")
    delivery.send("shop@example.org", ["jane@example.org"], message("q"))
    tm.commit()
    relay = delivery.maildir("bulk")
    (entry,) = relay.scan().entries
    assert relay.priority(entry) == -10
    assert relay.scan().retry_at[entry.name] == pytest.approx(when, abs=1e-3)
    assert sidecars(queue_path) == []


def test_keep_scheduled_without_the_entry_or_state():
    from mailoutbox.maildir import Scan

    class Store:
        def retry_state(self, entry):
            return None

    scan = Scan(entries=[], retry_at={"gone": 10.0**10})
    assert schedule.keep_scheduled(Store(), scan, 0.0).retry_at == {}


@pytest.mark.parametrize(("state", "expected"), [
    (None, None), ({}, None), ({"not_before": 5.0, "attempts": 0}, 5.0),
    ({"not_before": 5, "attempts": 1}, None), ({"not_before": "5"}, None),
    ({"not_before": True}, None), ({"not_before": float("nan")}, None),
    ({"attempts": 0}, None),
])
def test_scheduled_for(state, expected):
    assert schedule.scheduled_for(state) == expected


# -- the processor ---------------------------------------------------------------

def test_a_scheduled_message_is_sent_at_its_time_not_before(
        queue_path, tm, smtp_server, processor):
    delivery = QueuedMailDelivery(queue_path, tm)
    when = time.time() + HOUR
    delivery.send("shop@example.org", ["jane@example.org"], message("later"),
                  not_before=when)
    delivery.send("shop@example.org", ["jane@example.org"], message("now"))
    tm.commit()
    p = processor()
    stats = p.process_queue(now=when - 1)
    assert subjects(smtp_server) == ["now"]
    assert (stats.sent, stats.skipped) == (1, 1)
    # A flush sends the deferred messages now, not the scheduled ones.
    stats = p.process_queue(now=when - 1, flush=True)
    assert subjects(smtp_server) == ["now"]
    assert stats.skipped == 1
    stats = p.process_queue(now=when + 1)
    assert subjects(smtp_server) == ["now", "later"]
    assert stats.sent == 1
    assert sidecars(queue_path) == []


def test_a_scheduled_message_that_fails_counts_its_first_attempt(
        queue_path, tm, smtp_server, processor):
    delivery = QueuedMailDelivery(queue_path, tm)
    when = time.time() + HOUR
    delivery.send("shop@example.org", ["jane@example.org"], message("later"),
                  not_before=when)
    tm.commit()
    smtp_server.greylist("jane@example.org")
    p = processor(retry=RetryPolicy(initial=60))
    assert p.process_queue(now=when + 1).deferred == 1
    maildir = Maildir(queue_path)
    (entry,) = maildir.scan().entries
    state = maildir.retry_state(entry)
    assert state["attempts"] == 1
    assert state["first_attempt"] == when + 1
    assert schedule.scheduled_for(state) is None
    # Deferred now like any other message: a flush tries it.
    assert p.process_queue(now=when + 2, flush=True).sent == 1
    assert subjects(smtp_server) == ["later"]


def test_a_flush_sends_deferred_messages_and_scheduled_ones_whose_time_came(
        queue_path, tm, smtp_server, processor):
    delivery = QueuedMailDelivery(queue_path, tm)
    now = time.time()
    delivery.send("shop@example.org", ["jane@example.org"], message("soon"),
                  not_before=now + 60)
    delivery.send("shop@example.org", ["jane@example.org"], message("later"),
                  not_before=now + HOUR)
    tm.commit()
    smtp_server.greylist("jane@example.org")
    p = processor(retry=RetryPolicy(initial=HOUR))
    assert p.process_queue(now=now + 61).deferred == 1  # "soon", next in 1 h
    assert p.process_queue(now=now + 62, flush=True).sent == 1
    assert subjects(smtp_server) == ["soon"]


def test_higher_priority_is_sent_first_in_a_pass(queue_path, tm, smtp_server,
                                                 processor):
    delivery = QueuedMailDelivery(queue_path, tm, mailers=["bulk"])
    order = [("news-1", "low"), ("receipt-1", None), ("code-1", "high"),
             ("news-2", "low"), ("receipt-2", "normal"), ("code-2", "high"),
             ("urgent", 50)]
    for subject, priority in order:
        delivery.send("shop@example.org", ["jane@example.org"], message(subject),
                      priority=priority)
        tm.commit()
    p = processor()
    assert p.process_queue().sent == len(order)
    assert subjects(smtp_server) == ["urgent", "code-1", "code-2", "receipt-1",
                                     "receipt-2", "news-1", "news-2"]


def test_a_scheduled_high_priority_message_goes_first_once_due(
        queue_path, tm, smtp_server, processor):
    delivery = QueuedMailDelivery(queue_path, tm)
    when = time.time() + HOUR
    delivery.send("shop@example.org", ["jane@example.org"], message("old"))
    tm.commit()
    delivery.send("shop@example.org", ["jane@example.org"], message("vip"),
                  not_before=when, priority="high")
    tm.commit()
    p = processor()
    p.process_queue(now=when - 10)
    assert subjects(smtp_server) == ["old"]
    delivery.send("shop@example.org", ["jane@example.org"], message("new"))
    tm.commit()
    p.process_queue(now=when)
    assert subjects(smtp_server) == ["old", "vip", "new"]


# -- zope.sendmail ---------------------------------------------------------------

def test_zope_sendmail_drains_a_scheduled_and_prioritised_queue(
        queue_path, tm, smtp_server):
    delivery = QueuedMailDelivery(queue_path, tm)
    delivery.send("shop@example.org", ["jane@example.org"], message("later"),
                  not_before=time.time() + HOUR)
    delivery.send("shop@example.org", ["jane@example.org"], message("high"),
                  priority="high")
    delivery.send("shop@example.org", ["jane@example.org"], message("low"),
                  priority=-100)
    tm.commit()
    zope = ZopeProcessor()
    zope.setMailer(ZopeSMTPMailer(smtp_server.host, smtp_server.port,
                                  no_tls=True))
    zope.setQueuePath(queue_path)
    zope.run(forever=False)
    # It ignores both: everything is sent at once.
    assert sorted(subjects(smtp_server)) == ["high", "later", "low"]
    maildir = Maildir(queue_path)
    assert maildir.scan().entries == []
    # What it leaves behind (the retry state) is tidied up by ours.
    assert maildir.cleanup(maildir.scan()) == 1
    assert os.listdir(maildir.new) == []


# -- crashes ---------------------------------------------------------------------

CRASH = r"""
import os, signal, sys, time
import transaction
sys.path.insert(0, sys.argv[3])
from tests._crash_helpers import Killer
from mailoutbox import _writer
from mailoutbox.delivery import QueuedMailDelivery

queue, mode, when = sys.argv[1], sys.argv[2], float(sys.argv[4])
manager = transaction.TransactionManager()
delivery = QueuedMailDelivery(queue, transaction_manager=manager)
txn = manager.begin()
for subject in ("a", "b"):
    delivery.send("shop@example.org", ["jane@example.org"],
                  b"Subject: " + subject.encode() + b"\r\n\r\nHi\r\n",
                  not_before=when)
report = lambda phase: print(phase, flush=True)
if mode == "vote":
    txn.join(Killer(manager, "vote", "~last", report))
elif mode == "finish":
    txn.join(Killer(manager, "finish", "!first", report))
elif mode == "rename":  # in our tpc_finish, after the first rename
    commit = _writer.MaildirMessageWriter.commit
    def killing_commit(self, fsync_dir=True):
        commit(self, fsync_dir)
        report("rename")
        os.kill(os.getpid(), signal.SIGKILL)
    _writer.MaildirMessageWriter.commit = killing_commit
manager.commit()
report("after")
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("mode", ["vote", "finish", "rename", "after"])
def test_a_crash_never_leaves_a_scheduled_message_due_early(
        queue_path, smtp_server, processor, mode):
    Maildir(queue_path, create=True)
    when = time.time() + HOUR
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", CRASH, queue_path, mode, root, repr(when)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [os.path.join(root, "src"), os.environ.get("PYTHONPATH", "")])},
    )
    assert done.returncode == -9, done.stderr
    assert done.stdout.split() == [mode]
    p = processor()
    stats = p.process_queue(now=when - 1)  # rolls committed records forward
    assert stats.sent == 0 and smtp_server.messages == []
    maildir = Maildir(queue_path)
    queued = [e.name for e in maildir.scan().entries]
    # Queued or not, nothing is due before its time, even after a cleanup
    # long after the crash.
    maildir.cleanup(maildir.scan(), now=when - 2)
    assert p.process_queue(now=when - 1).sent == 0
    stats = p.process_queue(now=when + 1)
    if mode in ("rename", "after"):  # committed: both are sent, on time
        assert len(queued) == 2
        assert sorted(subjects(smtp_server)) == ["a", "b"]
    else:  # never committed: never sent
        assert queued == [] and smtp_server.messages == []
        assert len(os.listdir(maildir.tmp)) == 3  # two messages, the record


def test_the_schedule_is_fsynced_before_the_message_can_enter_new(
        queue_path, tm, monkeypatch):
    """The order of the durable steps: the retry state's file, then
    ``new/``, then (in tpc_finish) the rename."""
    steps = []
    from mailoutbox import _files
    from mailoutbox import maildir as maildir_module

    real_fsync_dir = maildir_module.fsync_dir
    real_write = maildir_module.write_atomically

    def fsync_dir(path):
        steps.append(("fsync_dir", os.path.basename(path)))
        real_fsync_dir(path)

    def write_atomically(*args, **kwargs):
        steps.append(("write", kwargs.get("fsync")))
        real_write(*args, **kwargs)

    monkeypatch.setattr(maildir_module, "fsync_dir", fsync_dir)
    monkeypatch.setattr(maildir_module, "write_atomically", write_atomically)
    delivery = QueuedMailDelivery(queue_path, tm)
    delivery.send("shop@example.org", ["jane@example.org"], message("later"),
                  not_before=time.time() + HOUR)
    (datamanager,) = tm.get()._resources
    assert isinstance(datamanager, QueuedDataManager)
    datamanager.tpc_vote(tm.get())
    assert steps == [("write", True), ("fsync_dir", "new")]
    assert os.listdir(os.path.join(queue_path, "new")) != []  # the sidecar
    assert _files.read_json(os.path.join(
        queue_path, "new", sidecars(queue_path)[0]))["attempts"] == 0
    tm.abort()


def test_the_retry_state_is_json(queue_path):
    maildir = Maildir(queue_path, create=True)
    path = maildir.schedule("x", 2e9)
    with open(path) as f:
        assert json.load(f) == {"attempts": 0, "not_before": 2e9}
    assert os.stat(path).st_mtime == 2e9


# -- the module-level send_message() ------------------------------------------------

def test_module_level_send_message_passes_the_options_on(queue_path):
    import zope.component
    from zope.sendmail.delivery import QueuedMailDelivery as ZopeDelivery

    import mailoutbox
    from mailoutbox.interfaces import IMailDelivery

    registry = zope.component.getGlobalSiteManager()
    ours, zope_delivery = QueuedMailDelivery(queue_path), ZopeDelivery(queue_path)
    registry.registerUtility(ours, IMailDelivery, "Scheduled")
    registry.registerUtility(zope_delivery, IMailDelivery, "Zope")
    try:
        import transaction

        when = time.time() + HOUR
        with transaction.manager:
            mailoutbox.send_message(message("later"), "Scheduled",
                                    not_before=when, priority="high")
        maildir = Maildir(queue_path)
        (entry,) = maildir.scan().entries
        assert maildir.priority(entry) == 10
        assert maildir.scan().retry_at[entry.name] == pytest.approx(when, abs=1e-3)
        with pytest.raises(TypeError, match=r"cannot schedule .*\(priority\)"):
            mailoutbox.send_message(message("x"), "Zope", priority="low")
        with pytest.raises(TypeError, match=r"\(not_before\)"):
            mailoutbox.send_message(message("x"), "Zope", not_before=when)
    finally:
        registry.unregisterUtility(ours, IMailDelivery, "Scheduled")
        registry.unregisterUtility(zope_delivery, IMailDelivery, "Zope")


def test_the_metrics_find_the_oldest_message_behind_higher_priorities(queue_path,
                                                                       tm):
    from mailoutbox.metrics import Metrics

    delivery = QueuedMailDelivery(queue_path, tm)
    delivery.send("shop@example.org", ["jane@example.org"], message("old"))
    tm.commit()
    time.sleep(0.01)
    delivery.send("shop@example.org", ["jane@example.org"], message("new"),
                  priority="high")
    tm.commit()
    maildir = Maildir(queue_path)
    scan = maildir.scan()
    first, second = scan.entries
    assert maildir.priority(first) == 10  # listed first, queued last
    metrics = Metrics()
    metrics.listed(None, maildir, scan)
    seconds, middle = second.name.split(".")[:2]
    assert metrics.relay(None).oldest == pytest.approx(
        int(seconds) + int(middle[1:7]) / 1e6, abs=1e-4, rel=0)


def test_a_failure_to_schedule_aborts_and_leaves_nothing(queue_path, tm,
                                                         monkeypatch):
    import errno

    delivery = QueuedMailDelivery(queue_path, tm)
    for subject in ("a", "b"):
        delivery.send("shop@example.org", ["jane@example.org"], message(subject),
                      not_before=time.time() + HOUR)
    real = Maildir.schedule
    calls = []

    def schedule_once(self, name, not_before):
        calls.append(name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, not_before)

    monkeypatch.setattr(Maildir, "schedule", schedule_once)
    with pytest.raises(OSError, match=r"could not queue message <.*No space left"):
        tm.commit()
    assert len(calls) == 2
    assert sidecars(queue_path) == []
    assert os.listdir(os.path.join(queue_path, "tmp")) == []
    assert Maildir(queue_path).scan().entries == []
