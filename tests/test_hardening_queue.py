"""Hardening of the queue: state files that are not regular files, queue
files the processor may not claim, configuration problems of a relay, and
recipients refused with 4xx while others were accepted.

Real parts throughout: FIFOs and symbolic links in a real queue, a real
privilege drop to ``nobody`` (as root), the real SMTPMailer against the
in-process aiosmtpd server and Postfix's smtp-sink, and zope.sendmail's own
processor draining what mailoutbox left in the queue.
"""
from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401 - imported before dropping root (see as_nobody)
import os
import subprocess
import sys
import threading

import pytest

from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread
from mailoutbox.testing.smtpd import SMTPServer

from ._crash_helpers import queue_messages

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


def make_processor(path, port, **options):
    options.setdefault("concurrency", 1)
    processor = QueueProcessorThread(**options)
    processor.setMailer(SMTPMailer("127.0.0.1", port, no_tls=True, timeout=5))
    processor.setQueuePath(path)
    return processor


@pytest.fixture
def processor(queue_path, smtp_server):
    made = make_processor(queue_path, smtp_server.port)
    yield made
    made.stop(timeout=10)


def in_thread(function, timeout=10.0):
    """Run *function* in a thread; fail (instead of hanging) if it does not
    return within *timeout* seconds."""
    results = []
    thread = threading.Thread(target=lambda: results.append(function()),
                              daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{function} blocked"
    return results[0]


# -- 4. state files that are not regular files ----------------------------------


def _entry(queue_path):
    queue_messages(queue_path, 1)
    maildir = Maildir(queue_path)
    [entry] = maildir.scan().entries
    return maildir, entry


@pytest.mark.parametrize("prefix", [".retry-", ".reason-"])
def test_a_fifo_as_state_file_is_damaged_state_not_a_hang(queue_path, prefix):
    maildir, entry = _entry(queue_path)
    os.mkfifo(entry.sidecar(prefix))
    read = maildir.retry_state if prefix == ".retry-" else maildir.reason
    assert in_thread(lambda: read(entry)) == {}


@pytest.mark.parametrize("prefix", [".retry-", ".reason-"])
def test_a_symlink_as_state_file_is_not_followed(queue_path, tmp_path, prefix):
    maildir, entry = _entry(queue_path)
    target = tmp_path / "elsewhere.json"
    target.write_text('{"attempts": 7, "error": "from outside"}')
    os.symlink(target, entry.sidecar(prefix))
    read = maildir.retry_state if prefix == ".retry-" else maildir.reason
    assert read(entry) == {}
    os.unlink(entry.sidecar(prefix))
    os.symlink(tmp_path / "missing", entry.sidecar(prefix))  # dangling
    assert read(entry) == {}


def test_a_directory_as_state_file_is_damaged_state(queue_path):
    maildir, entry = _entry(queue_path)
    os.mkdir(entry.sidecar(".reason-"))
    assert maildir.reason(entry) == {}


def test_a_pass_is_not_held_up_by_a_fifo_retry_state(processor, queue_path,
                                                     smtp_server, tmp_path):
    ids = queue_messages(queue_path, 2)
    maildir = Maildir(queue_path)
    first, second = maildir.scan().entries
    os.mkfifo(first.sidecar(".retry-"))
    os.utime(first.sidecar(".retry-"), (0, 0))  # due long ago
    target = tmp_path / "state.json"
    target.write_text('{"attempts": 1}')
    os.symlink(target, second.sidecar(".retry-"))
    os.utime(second.sidecar(".retry-"), (0, 0), follow_symlinks=False)
    stats = in_thread(processor.process_queue)
    assert stats.sent == 2
    assert sorted(smtp_server.message_ids()) == sorted(ids)
    assert os.listdir(maildir.new) == []
    assert target.read_text() == '{"attempts": 1}'  # never written through


def test_a_fifo_retry_state_is_replaced_when_the_message_is_deferred(
        processor, queue_path, smtp_server):
    maildir, entry = _entry(queue_path)
    os.mkfifo(entry.sidecar(".retry-"))
    os.utime(entry.sidecar(".retry-"), (0, 0))
    smtp_server.reply("MAIL", "451 4.3.0 Try later")
    stats = in_thread(processor.process_queue)
    assert stats.deferred == 1
    assert os.path.isfile(entry.sidecar(".retry-"))
    assert maildir.retry_state(entry)["attempts"] == 1


def test_show_does_not_hang_on_fifo_state_files(queue_path):
    maildir, entry = _entry(queue_path)
    os.mkfifo(entry.sidecar(".retry-"))
    queue_messages(queue_path, 1, prefix="f")
    other = next(e for e in maildir.scan().entries if e != entry)
    failed = maildir.move_to_failed(other, {"error": "x"})
    os.unlink(failed.sidecar(".reason-"))
    os.mkfifo(failed.sidecar(".reason-"))
    env = dict(os.environ, PYTHONPATH=SRC)
    for name in (entry.name, failed.name):
        result = subprocess.run(
            [sys.executable, "-m", "mailoutbox", "show", queue_path, name],
            capture_output=True, text=True, timeout=20, env=env, check=False)
        assert result.returncode == 0, result.stderr
        assert f"id:       {name}" in result.stdout


# -- 1. recipients refused with 4xx while others were accepted -----------------

GOOD, GREY, BAD = "good@example.org", "grey@example.org", "bad@example.org"
MESSAGE = (b"From: shop@example.org\r\nTo: good@example.org\r\n"
           b"Message-Id: <partial-1@mailoutbox.test>\r\nSubject: order\r\n"
           b"\r\nThanks for your order.\r\n")


def enqueue(path, recipients, message=MESSAGE):
    """Queue *message* for *recipients* in the Maildir at *path*; return
    its entry."""
    from mailoutbox.envelope import format_envelope

    maildir = Maildir(path, create=True)
    writer = maildir.newMessage()
    writer.write(format_envelope("shop@example.org", recipients) + message)
    writer.commit()
    return next(e for e in maildir.scan().entries if e.name == writer.name)


def queue_file(entry):
    with open(entry.path, "rb") as f:
        return f.read()


def received(server):
    """(recipients, Message-Id, message bytes) of what the server got."""
    return [(m.rcpt_tos, m.message_id, m.data) for m in server.messages]


def failed_parts(path):
    maildir = Maildir(path)
    return {e.name: (queue_file(e), maildir.reason(e))
            for e in maildir.failed_entries()}


def test_4xx_refused_recipients_stay_queued_across_restarts(
        queue_path, smtp_server, events):
    smtp_server.greylist(GREY, times=2)
    smtp_server.refuse(BAD)
    entry = enqueue(queue_path, ['"Good, Guy" <good@example.org>', GREY, BAD])

    first = make_processor(queue_path, smtp_server.port)
    stats = first.process_queue(now=1000.0)
    first.stop(timeout=10)
    assert (stats.sent, stats.deferred, stats.failed) == (0, 1, 0)
    assert [r[0] for r in received(smtp_server)] == [[GOOD]]
    [event] = events
    assert event.sent == ('"Good, Guy" <good@example.org>',)
    assert event.deferred == {GREY: (451, "4.7.1 Greylisted, try again later")}
    assert event.refused == {BAD: (550, "5.1.1 No such user")}
    # The queue file now names the deferred recipient alone; the message
    # itself is the same, byte for byte.
    assert queue_file(entry) == (b"X-Zope-From: shop@example.org\n"
                                 b"X-Zope-To: grey@example.org\n" + MESSAGE)
    maildir = Maildir(queue_path)
    state = maildir.retry_state(entry)
    assert (state["attempts"], state["code"], state["next_attempt"]) == (1, 451, 1060)
    assert state["sent"] == ['"Good, Guy" <good@example.org>']
    assert state["deferred"] == {GREY: [451, "4.7.1 Greylisted, try again later"]}
    # The recipient refused for good is in the failed area, with its code.
    [(name, (data, reason))] = failed_parts(queue_path).items()
    assert name.startswith(entry.name + ".refused-")
    assert data == (b"X-Zope-From: shop@example.org\n"
                    b"X-Zope-To: bad@example.org\n" + MESSAGE)
    assert reason["refused"] == {BAD: [550, "5.1.1 No such user"]}
    assert reason["sent"] == ['"Good, Guy" <good@example.org>']
    assert reason["message_id"] == "partial-1@mailoutbox.test"
    assert os.listdir(maildir.tmp) == []

    # A new processor (a restart) goes on from the state on disk.
    second = make_processor(queue_path, smtp_server.port)
    assert second.process_queue(now=1030.0).skipped == 1  # not due yet
    assert second.process_queue(now=1060.0).deferred == 1  # greylisted again
    second.stop(timeout=10)
    assert len(smtp_server.messages) == 1
    assert events[-1].deferred == {GREY: (451, "4.7.1 Greylisted, try again later")}
    assert not events[-1].permanent and events[-1].refused == {}
    assert maildir.retry_state(entry)["attempts"] == 2
    assert maildir.retry_state(entry)["sent"] == ['"Good, Guy" <good@example.org>']

    third = make_processor(queue_path, smtp_server.port)
    assert third.process_queue(now=1180.0).sent == 1
    third.stop(timeout=10)
    assert received(smtp_server) == [
        ([GOOD], "partial-1@mailoutbox.test", MESSAGE),
        ([GREY], "partial-1@mailoutbox.test", MESSAGE),
    ]
    assert events[-1].sent == (GREY,) and events[-1].refused == {}
    assert sorted(os.listdir(maildir.new)) == []


def test_all_refused_some_for_now_others_for_good(queue_path, smtp_server,
                                                  processor, events):
    smtp_server.greylist(GREY, times=1)
    smtp_server.refuse(BAD)
    entry = enqueue(queue_path, [BAD, GREY])
    stats = processor.process_queue(now=1000.0)
    assert (stats.sent, stats.deferred, stats.failed) == (0, 1, 0)
    [event] = events
    assert not event.permanent and event.code == 550
    assert event.refused == {BAD: (550, "5.1.1 No such user")}
    assert event.deferred == {GREY: (451, "4.7.1 Greylisted, try again later")}
    assert queue_file(entry).split(b"\n")[1] == b"X-Zope-To: grey@example.org"
    [(data, reason)] = failed_parts(queue_path).values()
    assert data.split(b"\n")[1] == b"X-Zope-To: bad@example.org"
    assert reason["sent"] == [] and reason["attempts"] == 1
    assert processor.process_queue(now=1060.0).sent == 1
    assert received(smtp_server) == [([GREY], "partial-1@mailoutbox.test", MESSAGE)]


def test_a_recipient_refused_for_now_until_the_message_expires(
        queue_path, smtp_server, events):
    from mailoutbox.retry import RetryPolicy

    other = "other@example.org"
    smtp_server.greylist(GREY, times=100)
    smtp_server.greylist(other, times=1)
    entry = enqueue(queue_path, [GOOD, GREY, other])
    processor = make_processor(queue_path, smtp_server.port,
                               retry=RetryPolicy(initial=60, max_age=100))
    try:
        assert processor.process_queue(now=1000.0).deferred == 1
        assert queue_file(entry).split(b"\n")[1] == (
            b"X-Zope-To: grey@example.org, other@example.org")
        # Sent to the other one, past max_age: the last one is given up.
        assert processor.process_queue(now=1200.0).sent == 1
        assert [r[0] for r in received(smtp_server)] == [[GOOD], [other]]
        assert events[-1].sent == (other,)
        assert events[-1].refused == {GREY: (451, "4.7.1 Greylisted, try again later")}
        [(data, reason)] = failed_parts(queue_path).values()
        assert data.split(b"\n")[1] == b"X-Zope-To: grey@example.org"
        assert reason["error"].startswith("expired after 2 attempts in 0.1 h")
        assert reason["sent"] == [GOOD, other]
        assert list(Maildir(queue_path).scan().entries) == []

        # Refused for now alone, past max_age: the whole (rewritten) file
        # fails, and its reason remembers who had the message.
        smtp_server.greylist(GREY, times=100)
        entry = enqueue(queue_path, [GOOD, GREY])
        assert processor.process_queue(now=2000.0).deferred == 1
        assert processor.process_queue(now=2200.0).failed == 1
        reason = Maildir(queue_path).reason(
            next(e for e in Maildir(queue_path).failed_entries()
                 if e.name == entry.name))
        assert reason["sent"] == [GOOD]
        assert reason["refused"] == {GREY: [451, "4.7.1 Greylisted, try again later"]}
    finally:
        processor.stop(timeout=10)


def test_a_routed_message_keeps_its_deferred_recipients(queue_path, smtp_server,
                                                        events):
    from mailoutbox.relays import open_relay

    partner = SMTPServer().start()
    try:
        partner.greylist(GREY, times=1)
        relay = open_relay(queue_path, "partner", create=True)
        entry = enqueue(relay.path, [GOOD, GREY])
        processor = make_processor(queue_path, smtp_server.port, mailers={
            "partner": SMTPMailer("127.0.0.1", partner.port, no_tls=True,
                                  timeout=5)})
        try:
            assert processor.process_queue(now=1000.0).deferred == 1
            assert queue_file(entry).split(b"\n")[1] == b"X-Zope-To: grey@example.org"
            assert relay.retry_state(entry)["attempts"] == 1
            assert processor.process_queue(now=1060.0).sent == 1
        finally:
            processor.stop(timeout=10)
        assert [r[0] for r in received(partner)] == [[GOOD], [GREY]]
        assert smtp_server.messages == []
        assert [e.sent for e in events] == [(GOOD,), (GREY,)]
    finally:
        partner.stop()


def test_zope_sendmail_drains_the_rewritten_queue_file(queue_path, smtp_server,
                                                       processor):
    from zope.sendmail.mailer import SMTPMailer as ZopeSMTPMailer
    from zope.sendmail.queue import QueueProcessorThread as ZopeProcessor

    smtp_server.greylist(GREY, times=1)
    enqueue(queue_path, [GOOD, GREY])
    assert processor.process_queue(now=1000.0).deferred == 1
    zope = ZopeProcessor()
    zope.setMailer(ZopeSMTPMailer("127.0.0.1", smtp_server.port, no_tls=True))
    zope.setQueuePath(queue_path)
    zope.run(forever=False)
    assert received(smtp_server) == [
        ([GOOD], "partial-1@mailoutbox.test", MESSAGE),
        ([GREY], "partial-1@mailoutbox.test", MESSAGE),
    ]
    # What zope.sendmail left (the retry state) is tidied by the next pass.
    assert processor.process_queue().total == 0
    assert os.listdir(os.path.join(queue_path, "new")) == []


def test_list_and_show_the_part_refused_for_good(queue_path, smtp_server,
                                                 processor):
    smtp_server.refuse(BAD)
    enqueue(queue_path, [GOOD, BAD])
    assert processor.process_queue().sent == 1
    [name] = failed_parts(queue_path)
    env = dict(os.environ, PYTHONPATH=SRC)
    listed = subprocess.run(
        [sys.executable, "-m", "mailoutbox", "list", queue_path, "--failed"],
        capture_output=True, text=True, timeout=60, env=env, check=False)
    assert name in listed.stdout and BAD in listed.stdout, listed
    shown = subprocess.run(
        [sys.executable, "-m", "mailoutbox", "show", queue_path, name],
        capture_output=True, text=True, timeout=60, env=env, check=False)
    assert "550" in shown.stdout and "sent: ['good@example.org']" in shown.stdout


def test_a_lost_queue_folder_after_a_partial_send_is_logged(
        queue_path, smtp_server, processor, caplog):
    """If the bookkeeping after a partial acceptance fails (here: tmp/ is
    gone), the message stays queued whole: sent again rather than lost."""
    smtp_server.refuse(BAD)
    entry = enqueue(queue_path, [GOOD, BAD])
    os.rmdir(os.path.join(queue_path, "tmp"))
    stats = processor.process_queue()
    assert stats.skipped == 1
    assert ("sent partial-1@mailoutbox.test to good@example.org but could not"
            " record it in the queue") in caplog.text
    assert queue_file(entry).split(b"\n")[1] == (
        b"X-Zope-To: good@example.org, bad@example.org")
    assert not os.path.exists(entry.sidecar(".sending-"))


class _OddMailer:
    """Names a refused recipient the queue file does not list (as a mailer
    that rewrites addresses might)."""

    def __init__(self):
        self.calls = []

    def send(self, fromaddr, toaddrs, message):
        self.calls.append(tuple(toaddrs))
        if len(self.calls) == 1:
            return {"Someone@Example.org": (452, "4.5.3 Too many recipients")}
        return {}


def test_refused_recipients_named_differently_by_the_mailer(queue_path):
    entry = enqueue(queue_path, [GOOD])
    with open(entry.path, "wb") as f:  # an address the mailer would refuse
        f.write(b"X-Zope-From: shop@example.org\n"
                b"X-Zope-To: good@example.org, x\x01y@example.org\n" + MESSAGE)
    mailer = _OddMailer()
    processor = QueueProcessorThread(concurrency=1)
    processor.setMailer(mailer)
    processor.setQueuePath(queue_path)
    try:
        assert processor.process_queue(now=1000.0).deferred == 1
        assert queue_file(entry).split(b"\n")[1] == b"X-Zope-To: Someone@Example.org"
        assert processor.process_queue(now=1060.0).sent == 1
    finally:
        processor.stop(timeout=10)
    assert mailer.calls[1] == ("Someone@Example.org",)


def test_mixed_refusals_with_the_queue_folder_damaged(queue_path, smtp_server,
                                                      processor, caplog):
    smtp_server.greylist(GREY, times=1)
    smtp_server.refuse(BAD)
    entry = enqueue(queue_path, [GREY, BAD])
    os.rmdir(os.path.join(queue_path, "tmp"))
    assert processor.process_queue().skipped == 1
    assert "could not record" not in caplog.text  # nobody had it
    assert queue_file(entry).split(b"\n")[1] == (
        b"X-Zope-To: grey@example.org, bad@example.org")


def test_a_failed_atomic_write_leaves_nothing_in_tmp(queue_path):
    from mailoutbox._files import write_atomically

    maildir, entry = _entry(queue_path)
    os.mkdir(entry.sidecar(".retry-"))
    os.mkdir(os.path.join(entry.sidecar(".retry-"), "inside"))
    with pytest.raises(OSError):
        write_atomically(maildir.tmp, entry.sidecar(".retry-"), b"{}")
    assert os.listdir(maildir.tmp) == []


def test_events_say_who_was_sent_deferred_and_refused():
    from zope.interface.verify import verifyObject

    from mailoutbox.events import MailErrorEvent
    from mailoutbox.events import MailSentEvent
    from mailoutbox.interfaces import IMailErrorEvent
    from mailoutbox.interfaces import IMailSentEvent

    sent = MailSentEvent("m@x", {BAD: (550, "no")}, sent=[GOOD],
                         deferred={GREY: (451, "later")})
    verifyObject(IMailSentEvent, sent)
    assert sent.sent == (GOOD,)
    assert "deferred=" in repr(sent)
    assert "deferred=" not in repr(MailSentEvent("m@x"))
    error = MailErrorEvent("m@x", "all refused", deferred={GREY: (451, "later")})
    verifyObject(IMailErrorEvent, error)
    assert (error.deferred, error.refused) == ({GREY: (451, "later")}, {})
    assert repr(error) == "<MailErrorEvent 'm@x' temporary: all refused>"


# -- 2. configuration problems of the mailer or the server ----------------------


def test_a_wrong_password_is_an_error_naming_the_server(
        queue_path, tls_server, certificates, caplog, events):
    queue_messages(queue_path, 1)
    processor = QueueProcessorThread(concurrency=1)
    processor.setMailer(SMTPMailer(
        "127.0.0.1", tls_server.port, username="alice", password="wrong-pw",
        ca_file=certificates.ca_file, timeout=5))
    processor.setQueuePath(queue_path)
    try:
        for now in (1000.0, 1060.0):
            assert processor.process_queue(now=now).deferred == 1
    finally:
        processor.stop(timeout=10)
    records = [r for r in caplog.records if r.name == "mailoutbox.queue"]
    assert [r.levelname for r in records] == ["ERROR", "ERROR"]
    server = f"127.0.0.1:{tls_server.port}"
    assert f"configuration problem with {server}" in records[0].getMessage()
    assert "535" in records[0].getMessage()
    assert "wrong-pw" not in caplog.text
    assert [e.permanent for e in events] == [False, False]


def test_a_tls_problem_of_any_mailer_is_an_error(queue_path, caplog):
    from mailoutbox.errors import MailTLSError
    from mailoutbox.testing import RecordingMailer

    queue_messages(queue_path, 1)
    mailer = RecordingMailer()
    mailer.error = MailTLSError("the relay's certificate expired")
    processor = QueueProcessorThread(concurrency=1)
    processor.setMailer(mailer)
    processor.setQueuePath(queue_path)
    try:
        assert processor.process_queue().deferred == 1
    finally:
        processor.stop(timeout=10)
    [record] = [r for r in caplog.records if r.name == "mailoutbox.queue"]
    assert record.levelname == "ERROR"
    assert "configuration problem with <mailoutbox.testing" in record.getMessage()
    assert "certificate expired" in record.getMessage()


def test_a_direct_send_reports_recipients_refused_for_now(smtp_server, events):
    import transaction

    from mailoutbox.delivery import DirectMailDelivery
    from mailoutbox.events import MailErrorEvent
    from mailoutbox.events import MailSentEvent

    smtp_server.greylist(GREY, times=1)
    smtp_server.refuse(BAD)
    manager = transaction.TransactionManager()
    mailer = SMTPMailer("127.0.0.1", smtp_server.port, no_tls=True, timeout=5)
    with manager:
        message_id = DirectMailDelivery(mailer, manager).send(
            "shop@example.org", ["Good <good@example.org>", GREY, BAD], MESSAGE)
    mailer.close()
    sent, error = events
    assert isinstance(sent, MailSentEvent) and sent.messageId == message_id
    assert sent.sent == ("Good <good@example.org>",) and sent.deferred == {}
    assert sorted(sent.refused) == [BAD, GREY]
    assert isinstance(error, MailErrorEvent) and error.permanent
    assert error.refused == {GREY: (451, "4.7.1 Greylisted, try again later")}
    assert error.code == 451 and GREY in error.errorMessage
    assert [r[0] for r in received(smtp_server)] == [[GOOD]]


# -- 3. queue files this processor may not claim ---------------------------------

NOBODY = 65534
needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root, to make a file that an unprivileged processor cannot claim")


@pytest.fixture
def nobodys_queue():
    """A queue owned by ``nobody`` (outside pytest's private tmp folder)
    holding a message of nobody's and one written by root, mode 0600."""
    import shutil
    import tempfile

    top = tempfile.mkdtemp(prefix="mailoutbox-nobody-")
    path = os.path.join(top, "queue")
    ids = queue_messages(path, 2)
    maildir = Maildir(path)
    _mine, roots = maildir.scan().entries
    for folder, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            os.chown(os.path.join(folder, name), NOBODY, NOBODY)
    os.chown(top, NOBODY, NOBODY)
    os.chown(roots.path, 0, 0)
    os.chmod(roots.path, 0o600)
    yield path, ids, roots
    shutil.rmtree(top)


@contextlib.contextmanager
def as_nobody():
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@needs_root
def test_a_file_of_another_user_goes_to_failed_with_the_reason(
        nobodys_queue, smtp_server, events, caplog):
    path, ids, roots = nobodys_queue
    processor = make_processor(path, smtp_server.port)
    with as_nobody():
        stats = processor.process_queue()
        again = processor.process_queue()
        processor.stop(timeout=10)
    assert (stats.sent, stats.failed, stats.skipped) == (1, 1, 0)
    assert again.total == 0  # nothing left to trip over
    assert smtp_server.message_ids() == ids[:1]
    maildir = Maildir(path)
    [failed] = maildir.failed_entries()
    assert failed.name == roots.name
    reason = maildir.reason(failed)
    assert reason["error"].startswith("cannot be claimed: Permission denied")
    assert "uid 0, mode 0600" in reason["error"]
    assert f"runs as uid {NOBODY}" in reason["error"]
    [event] = [e for e in events if getattr(e, "permanent", False)]
    assert event.messageId == roots.name
    assert "unexpected" not in caplog.text
    # Given to the queue's owner and retried, it is sent.
    os.chown(failed.path, NOBODY, NOBODY)
    maildir.requeue(failed)
    processor = make_processor(path, smtp_server.port)
    with as_nobody():
        assert processor.process_queue().sent == 1
        processor.stop(timeout=10)
    assert smtp_server.message_ids() == ids


@needs_root
def test_a_file_that_can_be_neither_claimed_nor_moved_is_one_line_a_pass(
        nobodys_queue, smtp_server, caplog):
    path, ids, roots = nobodys_queue
    new = os.path.dirname(roots.path)
    os.rename(roots.path, os.path.join(path, "cur", roots.name))
    os.chown(os.path.join(path, "cur"), 0, 0)  # nobody may read, not write
    os.chmod(os.path.join(path, "cur"), 0o755)  # noqa: S103 - on purpose
    processor = make_processor(path, smtp_server.port)
    with as_nobody():
        first = processor.process_queue()
        second = processor.process_queue()
        processor.stop(timeout=10)
    assert (first.sent, first.failed, first.skipped) == (1, 0, 1)
    assert (second.sent, second.failed, second.skipped) == (0, 0, 1)
    lines = [r for r in caplog.records if r.name == "mailoutbox.queue"
             and r.levelname == "ERROR"]
    assert len(lines) == 2
    assert "nor move it to the failed area" in lines[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)
    assert Maildir(path).failed_entries() == []
    assert os.listdir(os.path.join(path, "failed")) == []
    assert os.listdir(new) == []
    assert smtp_server.message_ids() == ids[:1]


@needs_root
def test_a_processor_process_running_as_nobody(nobodys_queue, smtp_server):
    """The same in a child process that drops root for good."""
    import json

    path, ids, roots = nobodys_queue
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        status = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            child = make_processor(path, smtp_server.port)
            stats = child.process_queue()
            child.stop(timeout=10)
            os.write(write, json.dumps([stats.sent, stats.failed, os.getuid()]
                                       ).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        result = f.read()
    _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert json.loads(result) == [1, 1, NOBODY]
    assert smtp_server.message_ids() == ids[:1]
    [failed] = Maildir(path).failed_entries()
    assert failed.name == roots.name
    assert "cannot be claimed" in Maildir(path).reason(failed)["error"]


@needs_root
@pytest.mark.parametrize("when", ["before the look", "before the move"])
def test_an_unclaimable_file_gone_meanwhile_is_skipped(nobodys_queue, smtp_server,
                                                       events, when):
    """Another processor (running as root) sent it in between."""
    path, _ids, roots = nobodys_queue

    class Racy(Maildir):
        def claim(self, entry, lease=30.0):
            try:
                return super().claim(entry, lease)
            except PermissionError:
                if when == "before the look":
                    os.unlink(entry.path)
                raise

        def move_to_failed(self, entry, reason, name=None):
            os.unlink(entry.path)
            return super().move_to_failed(entry, reason, name)

    processor = make_processor(path, smtp_server.port)
    processor.setMaildir(Racy(path))
    with as_nobody():
        stats = processor.process_queue()
        processor.stop(timeout=10)
    assert (stats.sent, stats.failed, stats.skipped) == (1, 0, 1)
    assert not os.path.exists(roots.path)
    assert [e for e in events if getattr(e, "permanent", False)] == []


def test_all_refused_some_for_now_past_max_age(queue_path, smtp_server, events):
    from mailoutbox.retry import RetryPolicy

    smtp_server.greylist(GREY, times=1)
    smtp_server.refuse(BAD)
    enqueue(queue_path, [GREY, BAD])
    processor = make_processor(queue_path, smtp_server.port,
                               retry=RetryPolicy(max_age=0))
    try:
        assert processor.process_queue(now=1000.0).failed == 1
    finally:
        processor.stop(timeout=10)
    [event] = events
    assert event.permanent and event.deferred == {}
    assert sorted(event.refused) == [BAD, GREY]
    [(data, reason)] = failed_parts(queue_path).values()
    assert data.split(b"\n")[1] == b"X-Zope-To: grey@example.org, bad@example.org"
    assert reason["error"].startswith("expired after 1 attempts")
    assert list(Maildir(queue_path).scan().entries) == []


def test_a_server_requiring_starttls_is_a_configuration_error(queue_path, caplog):
    queue_messages(queue_path, 1)
    with SMTPServer() as server:
        server.reply("MAIL", "530 5.7.0 Must issue a STARTTLS command first")
        processor = make_processor(queue_path, server.port)  # no_tls=True
        try:
            assert processor.process_queue().deferred == 1
        finally:
            processor.stop(timeout=10)
        assert server.messages == []
    [record] = [r for r in caplog.records if r.name == "mailoutbox.queue"]
    assert record.levelname == "ERROR"
    message = record.getMessage()
    assert f"configuration problem with 127.0.0.1:{server.port}" in message
    assert "530" in message


@pytest.mark.smtpsink
def test_smtp_sink_refusing_every_recipient_for_now(queue_path, smtp_sink, events):
    """Postfix's smtp-sink refuses per command, not per recipient: with
    452 to every RCPT nobody has the message, so the queue file is kept as
    it is (not rewritten) and the message deferred whole."""
    entry = enqueue(queue_path, [GOOD, GREY])
    before = queue_file(entry)
    refusing = smtp_sink("-r", "RCPT", "-b", "452 4.5.3 Error: too many recipients")
    processor = make_processor(queue_path, refusing.port)
    try:
        assert processor.process_queue(now=1000.0).deferred == 1
        assert queue_file(entry) == before
        assert Maildir(queue_path).failed_entries() == []
        [event] = events
        assert not event.permanent and sorted(event.deferred) == [GOOD, GREY]
        assert event.deferred[GOOD][0] == 452
        healthy = smtp_sink()
        processor.setMailer(SMTPMailer("127.0.0.1", healthy.port, no_tls=True,
                                       timeout=5))
        assert processor.process_queue(now=1060.0).sent == 1
    finally:
        processor.stop(timeout=10)
    assert healthy.counters()["mesg"] == 1
    assert refusing.counters()["mesg"] == 0
