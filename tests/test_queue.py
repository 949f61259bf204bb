"""The queue processor, against real SMTP servers.

Messages are queued as files in a real Maildir and sent through the real
SMTPMailer to the in-process aiosmtpd server (tests/conftest.py) or to
Postfix's smtp-sink, which can answer 421 or drop the connection.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time

import pytest
import transaction
import zope.event
from zope.interface.verify import verifyObject

from mailoutbox.envelope import parse_queue_file
from mailoutbox.interfaces import IMailErrorEvent
from mailoutbox.interfaces import IMailQueueProcessor
from mailoutbox.interfaces import IMailSentEvent
from mailoutbox.maildir import Claim
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread
from mailoutbox.queue import message_id_of
from mailoutbox.retry import RetryPolicy

from ._drain_worker import fill_queue
from ._drain_worker import make_mailer

# -- helpers ------------------------------------------------------------------


@pytest.fixture
def make_processor(queue_path):
    """Build processors for the queue; they are stopped after the test."""
    made = []

    def make(port, *, path=queue_path, mailer=None, **options):
        processor = QueueProcessorThread(**options)
        processor.setMailer(mailer or make_mailer(port, timeout=5))
        processor.setQueuePath(path)
        made.append(processor)
        return processor

    yield make
    for processor in made:
        processor.stop(timeout=10)


def queued(path):
    """The names of the queued messages (not the dot-files)."""
    return sorted(
        name for sub in ("new", "cur") for name in os.listdir(os.path.join(path, sub))
        if not name.startswith(".")
    )


def dotfiles(path, prefix):
    return sorted(
        name for sub in ("new", "cur") for name in os.listdir(os.path.join(path, sub))
        if name.startswith(prefix)
    )


def failed(path):
    """{name: reason} of the failed area."""
    maildir = Maildir(path)
    return {e.name: maildir.reason(e) for e in maildir.failed_entries()}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


class CountingMailer(SMTPMailer):
    """The real mailer, counting how often its connections are closed:
    ``closed`` counts close() (every thread's connections: the processor
    must never call it), ``closed_by`` the threads that called
    close_connection() (their own connection)."""

    closed = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.closed_by = []

    def close(self):
        self.closed += 1
        super().close()

    def close_connection(self):
        self.closed_by.append(threading.current_thread().name)
        super().close_connection()


# -- configuration --------------------------------------------------------------


def test_provides_the_interface(queue_path):
    processor = QueueProcessorThread()
    assert processor.queuePath is None
    assert processor.daemon
    processor.setMailer(object())
    processor.setQueuePath(queue_path)
    verifyObject(IMailQueueProcessor, processor)
    assert processor.queuePath == queue_path
    for folder in ("tmp", "new", "cur"):
        assert os.path.isdir(os.path.join(queue_path, folder))
    assert processor.pollingInterval == 3000
    processor.pollingInterval = 500
    assert processor.interval == 0.5


def test_set_maildir(queue_path):
    maildir = Maildir(queue_path, create=True)
    processor = QueueProcessorThread(0.25)
    processor.setMaildir(maildir)
    assert processor.maildir is maildir
    assert processor.pollingInterval == 250


@pytest.mark.parametrize("options", [
    {"concurrency": 0}, {"concurrency": 1.5}, {"lease": 0},
    {"max_messages_per_pass": 0},
])
def test_invalid_options(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        QueueProcessorThread(**options)


def test_needs_a_mailer_and_a_queue(queue_path):
    processor = QueueProcessorThread()
    with pytest.raises(RuntimeError, match="setMailer"):
        processor.start()
    processor.setQueuePath(queue_path)
    with pytest.raises(RuntimeError, match="setMailer"):
        processor.process_queue()
    processor.stop()  # never started: nothing to do


# -- outcomes -------------------------------------------------------------------


def test_sends_oldest_first_and_empties_the_queue(
        smtp_server, make_processor, queue_path, events, caplog):
    caplog.set_level(logging.INFO, "mailoutbox.queue")
    ids = fill_queue(queue_path, 5)
    processor = make_processor(smtp_server.port, concurrency=1)
    stats = processor.process_queue()
    assert (stats.sent, stats.deferred, stats.failed, stats.skipped) == (5, 0, 0, 0)
    assert (stats.attempted, stats.total, stats.limited) == (5, 5, False)
    assert smtp_server.message_ids() == ids
    assert smtp_server.messages[0].mail_from == "sender@example.org"
    assert smtp_server.messages[0].rcpt_tos == ["rcpt@example.org"]
    assert queued(queue_path) == [] and dotfiles(queue_path, ".") == []
    assert [e.messageId for e in events] == ids
    assert all(IMailSentEvent.providedBy(e) and e.refused == {} for e in events)
    assert f"sent {ids[0]}" in caplog.text


def test_concurrent_workers_send_each_message_once(
        smtp_server, make_processor, queue_path):
    ids = fill_queue(queue_path, 40)
    processor = make_processor(smtp_server.port, concurrency=4)
    assert processor.process_queue().sent == 40
    assert sorted(smtp_server.message_ids()) == sorted(ids)
    # Each worker keeps its connection: at most one per worker.
    assert smtp_server.connections <= 4


def test_partial_refusal_is_sent_with_the_refused_recipients(
        smtp_server, make_processor, queue_path, events, caplog):
    smtp_server.refuse("bad@example.org")
    [mid] = fill_queue(queue_path, 1,
                       recipients=("good@example.org", "bad@example.org"))
    stats = make_processor(smtp_server.port).process_queue()
    assert stats.sent == 1
    assert smtp_server.messages[0].rcpt_tos == ["good@example.org"]
    [event] = events
    assert IMailSentEvent.providedBy(event)
    assert event.messageId == mid
    assert event.refused["bad@example.org"][0] == 550
    assert f"sent {mid}, but the server refused bad@example.org (550" in caplog.text
    assert queued(queue_path) == []


def test_all_recipients_refused_permanently_fails_the_message(
        smtp_server, make_processor, queue_path, events, caplog):
    smtp_server.refuse("bad@example.org")
    [mid] = fill_queue(queue_path, 1, recipients=("bad@example.org",))
    [name] = queued(queue_path)
    stats = make_processor(smtp_server.port).process_queue(now=1000.0)
    assert (stats.sent, stats.failed) == (0, 1)
    assert smtp_server.messages == [] and queued(queue_path) == []
    reason = failed(queue_path)[name]
    assert reason["permanent"] is True and reason["code"] == 550
    assert reason["message_id"] == mid and reason["attempts"] == 1
    assert reason["time"] == reason["first_attempt"] == 1000.0
    assert reason["refused"]["bad@example.org"][0] == 550
    assert "all recipients refused" in reason["error"]
    [event] = events
    assert IMailErrorEvent.providedBy(event)
    assert (event.messageId, event.permanent, event.code) == (mid, True, 550)
    assert event.refused["bad@example.org"][0] == 550
    assert f"moved {mid} ({name}) to the failed area" in caplog.text
    assert dotfiles(queue_path, ".") == []


def test_data_refused_with_5xx_fails_the_message(
        smtp_server, make_processor, queue_path, events):
    smtp_server.reply("DATA", "554 5.6.0 Message content rejected")
    fill_queue(queue_path, 1)
    [name] = queued(queue_path)
    assert make_processor(smtp_server.port).process_queue().failed == 1
    reason = failed(queue_path)[name]
    assert reason["code"] == 554 and "Message content rejected" in reason["error"]
    assert events[0].permanent and events[0].code == 554


def test_greylisted_message_is_deferred_then_sent(
        smtp_server, make_processor, queue_path, events, caplog):
    smtp_server.greylist("rcpt@example.org", times=1)
    [mid] = fill_queue(queue_path, 1)
    [name] = queued(queue_path)
    processor = make_processor(smtp_server.port, retry=RetryPolicy(initial=60))
    now = time.time()
    stats = processor.process_queue(now=now)
    assert (stats.sent, stats.deferred) == (0, 1)
    assert queued(queue_path) == [name]
    assert dotfiles(queue_path, ".sending-") == []
    state = Maildir(queue_path).retry_state(Maildir(queue_path).find(name))
    assert state["attempts"] == 1 and state["code"] == 451
    assert state["first_attempt"] == state["last_attempt"] == now
    assert state["next_attempt"] == now + 60
    [event] = events
    assert (event.messageId, event.permanent, event.code) == (mid, False, 451)
    assert f"could not send {mid} (attempt 1), will try again in 60 s" in caplog.text

    # Not due yet: skipped, even by a new processor (the state is on disk).
    processor = make_processor(smtp_server.port)
    stats = processor.process_queue(now=now + 30)
    assert (stats.skipped, stats.attempted) == (1, 0)
    assert smtp_server.messages == []

    stats = processor.process_queue(now=now + 61)
    assert stats.sent == 1
    assert smtp_server.message_ids() == [mid]
    assert queued(queue_path) == [] and dotfiles(queue_path, ".") == []


def test_zero_delay_policy_retries_on_the_next_pass(
        smtp_server, make_processor, queue_path):
    smtp_server.greylist("rcpt@example.org", times=2)
    fill_queue(queue_path, 1)
    processor = make_processor(smtp_server.port, retry=RetryPolicy(initial=0))
    assert [processor.process_queue().deferred for _ in range(2)] == [1, 1]
    assert processor.process_queue().sent == 1


def test_transient_failures_expire(smtp_server, make_processor, queue_path, events):
    smtp_server.greylist("rcpt@example.org", times=10)
    fill_queue(queue_path, 1)
    [name] = queued(queue_path)
    processor = make_processor(
        smtp_server.port, retry=RetryPolicy(initial=10, max_age=3600))
    assert processor.process_queue(now=1000.0).deferred == 1
    assert processor.process_queue(now=2000.0).deferred == 1
    assert processor.process_queue(now=4600.0).failed == 1
    reason = failed(queue_path)[name]
    assert reason["attempts"] == 3 and reason["first_attempt"] == 1000.0
    assert reason["error"].startswith("expired after 3 attempts in 1.0 h: ")
    assert reason["code"] == 451
    assert [e.permanent for e in events] == [False, False, True]
    assert dotfiles(queue_path, ".") == []


def test_connection_refused_defers(make_processor, queue_path, events):
    fill_queue(queue_path, 2)
    processor = make_processor(free_port())
    stats = processor.process_queue()
    assert stats.deferred == 2
    assert all(not e.permanent and e.code is None for e in events)
    assert "connection" in events[0].errorMessage.lower()


@pytest.mark.smtpsink
@pytest.mark.parametrize(("option", "code"), [("-Q", 421), ("-q", None)])
def test_smtp_sink_421_and_dropped_connection_defer(
        smtp_sink, make_processor, queue_path, events, option, code):
    fill_queue(queue_path, 2)
    sink = smtp_sink(option, "RCPT")
    stats = make_processor(sink.port, concurrency=1).process_queue()
    assert stats.deferred == 2
    assert [(e.permanent, e.code) for e in events] == [(False, code)] * 2
    assert len(queued(queue_path)) == 2


@pytest.mark.smtpsink
@pytest.mark.parametrize(("option", "command", "outcome"), [
    ("-f", "RCPT", "failed"), ("-r", "RCPT", "deferred"),
    ("-f", ".", "failed"), ("-r", "MAIL", "deferred"),
])
def test_smtp_sink_4xx_and_5xx(smtp_sink, make_processor, queue_path,
                               option, command, outcome):
    fill_queue(queue_path, 2)
    sink = smtp_sink(option, command)
    stats = make_processor(sink.port, concurrency=1).process_queue()
    assert getattr(stats, outcome) == 2


@pytest.mark.smtpsink
def test_smtp_sink_accepts(smtp_sink, make_processor, queue_path):
    fill_queue(queue_path, 20)
    sink = smtp_sink()
    assert make_processor(sink.port).process_queue().sent == 20
    assert queued(queue_path) == []


# -- what cannot be sent --------------------------------------------------------


def test_malformed_queue_file_is_failed_and_the_rest_sent(
        smtp_server, make_processor, queue_path, events):
    maildir = Maildir(queue_path, create=True)
    with open(os.path.join(maildir.new, "0.bad"), "wb") as f:
        f.write(b"Subject: no envelope\nMessage-Id: <bad@x>\n\nbody\n")
    with open(os.path.join(maildir.new, "0.short"), "wb") as f:
        f.write(b"X-Zope-From: a@b\n")
    ids = fill_queue(queue_path, 2)
    stats = make_processor(smtp_server.port).process_queue()
    assert (stats.sent, stats.failed) == (2, 2)
    assert sorted(smtp_server.message_ids()) == sorted(ids)
    reasons = failed(queue_path)
    assert reasons["0.bad"]["message_id"] == "bad@x"
    assert reasons["0.bad"]["error"].startswith("malformed queue file: ")
    assert reasons["0.short"]["message_id"] == "0.short"
    errors = {e.messageId: e for e in events if IMailErrorEvent.providedBy(e)}
    assert errors["bad@x"].permanent and errors["0.short"].permanent


def test_symlinks_and_directories_are_failed_unclaimed_and_never_followed(
        smtp_server, make_processor, queue_path, tmp_path, events):
    maildir = Maildir(queue_path, create=True)
    secret = tmp_path / "secret"
    secret.write_bytes(b"X-Zope-From: a@b\nX-Zope-To: rcpt@example.org\n\nsecret\n")
    os.symlink(secret, os.path.join(maildir.new, "1.link"))
    os.mkdir(os.path.join(maildir.cur, "1.dir"))
    stats = make_processor(smtp_server.port).process_queue()
    assert (stats.failed, stats.sent) == (2, 0)
    assert smtp_server.messages == []
    assert secret.read_bytes().endswith(b"secret\n")  # untouched
    reasons = failed(queue_path)
    assert set(reasons) == {"1.link", "1.dir"}
    assert reasons["1.link"]["error"].startswith("not a regular file")
    assert os.path.islink(os.path.join(maildir.failed, "1.link"))
    assert {e.messageId for e in events} == {"1.link", "1.dir"}
    assert dotfiles(queue_path, ".") == []


class RacyMaildir(Maildir):
    """A Maildir whose listing is out of date: every entry looks like a
    regular file (as if it was replaced after the listing)."""

    def scan(self):
        scan = super().scan()
        scan.entries = [type(e)(e.folder, e.name) for e in scan.entries]
        return scan


def test_entry_replaced_by_a_symlink_after_the_listing_is_failed(
        smtp_server, make_processor, queue_path, tmp_path):
    maildir = RacyMaildir(queue_path, create=True)
    target = tmp_path / "target"
    target.write_bytes(b"X-Zope-From: a@b\nX-Zope-To: rcpt@example.org\n\nx\n")
    os.symlink(target, os.path.join(maildir.new, "2.link"))
    processor = make_processor(smtp_server.port)
    processor.setMaildir(maildir)
    assert processor.process_queue().failed == 1
    assert failed(queue_path)["2.link"]["error"].startswith("unreadable queue file: ")
    assert smtp_server.messages == []


def test_directory_moved_away_by_another_processor_is_skipped(
        smtp_server, make_processor, queue_path):
    class Vanishing(Maildir):
        def scan(self):
            scan = super().scan()
            os.rmdir(os.path.join(self.new, "3.dir"))
            return scan

    maildir = Vanishing(queue_path, create=True)
    os.mkdir(os.path.join(maildir.new, "3.dir"))
    processor = make_processor(smtp_server.port)
    processor.setMaildir(maildir)
    assert processor.process_queue().skipped == 1


class HookedMaildir(Maildir):
    """A Maildir that runs *hook(claim)* on every claim it makes."""

    hook = staticmethod(lambda claim: claim)

    def claim(self, entry, lease=30.0):
        claim = super().claim(entry, lease)
        return claim if claim is None else self.hook(claim)


def test_message_purged_after_the_claim_is_skipped(
        smtp_server, make_processor, queue_path):
    fill_queue(queue_path, 1)
    maildir = HookedMaildir(queue_path)

    def purge(claim):
        os.unlink(claim.entry.path)
        return claim

    maildir.hook = purge
    processor = make_processor(smtp_server.port)
    processor.setMaildir(maildir)
    assert processor.process_queue().skipped == 1
    assert smtp_server.messages == [] and dotfiles(queue_path, ".") == []


def test_unexpected_error_before_sending_releases_the_claim(
        smtp_server, make_processor, queue_path, caplog):
    fill_queue(queue_path, 1)
    maildir = HookedMaildir(queue_path)

    class Exploding(Claim):
        def read(self):
            raise MemoryError("no room")

    maildir.hook = lambda c: Exploding(c.maildir, c.entry, c.claim_path)
    processor = make_processor(smtp_server.port)
    processor.setMaildir(maildir)
    assert processor.process_queue().skipped == 1
    assert "unexpected error while processing" in caplog.text
    assert len(queued(queue_path)) == 1 and dotfiles(queue_path, ".") == []
    processor.setMaildir(Maildir(queue_path))
    assert processor.process_queue().sent == 1


def test_sent_message_that_cannot_be_removed_keeps_its_claim(
        smtp_server, make_processor, queue_path, caplog):
    [mid] = fill_queue(queue_path, 1)
    maildir = HookedMaildir(queue_path)

    class Stuck(Claim):
        def complete(self):
            raise PermissionError("read-only file system")

    maildir.hook = lambda c: Stuck(c.maildir, c.entry, c.claim_path)
    processor = make_processor(smtp_server.port)
    processor.setMaildir(maildir)
    assert processor.process_queue().skipped == 1
    assert smtp_server.message_ids() == [mid]
    assert f"sent {mid} but could not remove" in caplog.text
    # Not released: nobody sends it again before the claim expires.
    assert len(dotfiles(queue_path, ".sending-")) == 1
    processor.setMaildir(Maildir(queue_path))
    assert processor.process_queue().skipped == 1
    assert len(smtp_server.messages) == 1


def test_a_failing_classifier_does_not_stop_the_processor(
        smtp_server, make_processor, queue_path, events, caplog):
    smtp_server.reply("DATA", "554 no")
    fill_queue(queue_path, 2)
    processor = make_processor(smtp_server.port)

    def broken(exc):
        raise RuntimeError("classifier bug")

    processor.classify = broken
    stats = processor.process_queue()
    assert stats.deferred == 2
    assert "could not classify the error sending" in caplog.text
    assert all("unclassified error" in e.errorMessage for e in events)


def test_failing_subscribers_and_progress_callbacks_are_logged(
        smtp_server, make_processor, queue_path, caplog):
    def bad_subscriber(event):
        raise RuntimeError("subscriber bug")

    zope.event.subscribers.append(bad_subscriber)
    try:
        fill_queue(queue_path, 2)
        stats = make_processor(smtp_server.port).process_queue(
            on_progress=lambda done, total: 1 / 0)
    finally:
        zope.event.subscribers.remove(bad_subscriber)
    assert stats.sent == 2
    assert "an event subscriber failed" in caplog.text
    assert "the progress callback failed" in caplog.text


# -- passes -----------------------------------------------------------------------


def test_progress_is_reported_for_every_message(smtp_server, make_processor,
                                                queue_path):
    fill_queue(queue_path, 6)
    calls = []
    make_processor(smtp_server.port).process_queue(
        on_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(n, 6) for n in range(1, 7)]


def test_empty_queue(smtp_server, make_processor, queue_path):
    processor = make_processor(smtp_server.port)
    calls = []
    stats = processor.process_queue(on_progress=lambda *a: calls.append(a))
    assert (stats.total, calls) == (0, [])


def test_max_messages_per_pass(smtp_server, make_processor, queue_path):
    ids = fill_queue(queue_path, 7)
    processor = make_processor(smtp_server.port, max_messages_per_pass=3)
    stats = processor.process_queue()
    assert (stats.sent, stats.limited) == (3, True)
    assert sorted(smtp_server.message_ids()) == sorted(ids[:3])
    assert processor.process_queue().sent == 3
    assert processor.process_queue().sent == 1


def test_one_listing_per_pass(smtp_server, make_processor, queue_path):
    class Counting(Maildir):
        scans = 0

        def scan(self):
            self.scans += 1
            return super().scan()

    fill_queue(queue_path, 30)
    maildir = Counting(queue_path)
    processor = make_processor(smtp_server.port)
    processor.setMaildir(maildir)
    processor.process_queue()
    assert maildir.scans == 1


def test_message_claimed_by_a_live_processor_is_skipped(
        smtp_server, make_processor, queue_path):
    fill_queue(queue_path, 2)
    maildir = Maildir(queue_path)
    claim = maildir.claim(maildir.scan().entries[0])
    processor = make_processor(smtp_server.port)
    stats = processor.process_queue()
    assert (stats.sent, stats.skipped) == (1, 1)
    claim.release()
    assert processor.process_queue().sent == 1
    assert len(smtp_server.messages) == 2


def test_stale_zope_sendmail_claim_is_broken(smtp_server, make_processor,
                                             queue_path):
    [mid] = fill_queue(queue_path, 1)
    maildir = Maildir(queue_path)
    [entry] = maildir.scan().entries
    stale = entry.sidecar(".sending-")
    os.link(entry.path, stale)  # as zope.sendmail claims
    os.utime(stale, (time.time() - 3600,) * 2)  # ... and then died
    assert make_processor(smtp_server.port).process_queue().sent == 1
    assert smtp_server.message_ids() == [mid]
    assert dotfiles(queue_path, ".") == []


def test_rejected_files_of_zope_sendmail_are_failed_not_sent(
        smtp_server, make_processor, queue_path):
    fill_queue(queue_path, 1)
    maildir = Maildir(queue_path)
    [entry] = maildir.scan().entries
    os.rename(entry.path, entry.sidecar(".rejected-"))
    stats = make_processor(smtp_server.port).process_queue()
    assert stats.total == 0 and smtp_server.messages == []
    reason = failed(queue_path)[entry.name]
    assert "rejected by zope.sendmail" in reason["error"]


def test_drains_a_queue_written_by_zope_sendmail(smtp_server, make_processor,
                                                 queue_path):
    from zope.sendmail.delivery import QueuedMailDelivery

    delivery = QueuedMailDelivery(queue_path)
    manager = transaction.manager  # zope.sendmail joins the thread's transaction
    with manager:
        delivery.send("from@example.org", ["to@example.org", '"Doe, J" <j@x.org>'],
                      b"Subject: legacy\nMessage-Id: <legacy@x>\n\nHello\n")
    with manager:
        delivery.send("from@example.org", ["to@example.org"],
                      b"Subject: second\n\nno Message-Id\n")
    stats = make_processor(smtp_server.port, concurrency=1).process_queue()
    assert stats.sent == 2
    first, second = sorted(smtp_server.messages, key=lambda m: m.message["Subject"])
    assert first.message_id == "legacy@x"
    assert (first.mail_from, first.rcpt_tos) == (
        "from@example.org", ["to@example.org", "j@x.org"])
    assert second.message.get("Subject") == "second"


def test_works_with_zope_sendmail_mailers(smtp_server, make_processor, queue_path,
                                          events):
    from zope.sendmail.mailer import SMTPMailer as ZopeMailer

    smtp_server.refuse("bad@example.org")
    fill_queue(queue_path, 1)
    fill_queue(queue_path, 1, prefix="bad", recipients=("bad@example.org",))
    mailer = ZopeMailer("127.0.0.1", smtp_server.port, no_tls=True)
    stats = make_processor(None, mailer=mailer, concurrency=1).process_queue()
    assert (stats.sent, stats.failed) == (1, 1)
    assert events[0].refused == {}  # zope.sendmail's mailer returns None
    assert events[1].permanent and events[1].code == 550


# -- the thread -----------------------------------------------------------------


def worker_threads():
    return [t for t in threading.enumerate() if "QueueProcessorThread-worker" in t.name]


def test_run_once_closes_everything(smtp_server, queue_path):
    fill_queue(queue_path, 3)
    mailer = CountingMailer("127.0.0.1", smtp_server.port, no_tls=True)
    processor = QueueProcessorThread(concurrency=2)
    processor.setMailer(mailer)
    processor.setQueuePath(queue_path)
    processor.run(forever=False)
    assert len(smtp_server.messages) == 3
    # each worker closed its own connection as it ended; no one else did
    assert mailer.closed == 0
    assert sorted(mailer.closed_by) == [
        "mailoutbox.queue.QueueProcessorThread-worker-0",
        "mailoutbox.queue.QueueProcessorThread-worker-1"]
    assert smtp_server.commands.count("QUIT") == smtp_server.connections
    assert worker_threads() == []


def test_connections_are_kept_while_busy_and_closed_when_idle(
        smtp_server, make_processor, queue_path):
    mailer = CountingMailer("127.0.0.1", smtp_server.port, no_tls=True)
    processor = make_processor(None, mailer=mailer, concurrency=1)
    for _ in range(3):
        fill_queue(queue_path, 1)
        assert processor.process_queue().sent == 1
    assert (mailer.closed_by, smtp_server.connections) == ([], 1)
    processor.process_queue()  # idle: the worker closes its connection
    wait_until(lambda: smtp_server.commands.count("QUIT") == 1)
    assert len(mailer.closed_by) == 1
    processor.process_queue()
    processor.stop()
    assert len(mailer.closed_by) == 1  # already closed: not again
    assert worker_threads() == [] and mailer.closed == 0


def test_thread_sends_what_is_queued_and_stops_promptly(
        smtp_server, make_processor, queue_path):
    processor = make_processor(smtp_server.port, interval=0.05)
    processor.start()
    assert processor.is_alive()
    ids = fill_queue(queue_path, 3)
    wait_until(lambda: len(smtp_server.messages) == 3)
    assert sorted(smtp_server.message_ids()) == sorted(ids)
    started = time.monotonic()
    processor.stop(timeout=5)
    assert time.monotonic() - started < 1
    assert not processor.is_alive() and worker_threads() == []


def test_thread_keeps_going_after_errors(smtp_server, make_processor, queue_path,
                                         caplog):
    class Flaky(Maildir):
        failures = 2

        def scan(self):
            if self.failures:
                self.failures -= 1
                raise PermissionError("flaky file system")
            return super().scan()

    ids = fill_queue(queue_path, 2)
    processor = make_processor(smtp_server.port, interval=0.01)
    processor.setMaildir(Flaky(queue_path))
    processor.start()
    wait_until(lambda: len(smtp_server.messages) == 2)
    assert sorted(smtp_server.message_ids()) == sorted(ids)
    assert caplog.text.count("error while processing the queue") == 2
    assert processor.is_alive()


def test_stop_finishes_the_messages_in_flight_and_nothing_else(
        smtp_server, make_processor, queue_path):
    smtp_server.slow(0.3)  # each message takes about 0.6 s
    ids = fill_queue(queue_path, 12)
    processor = make_processor(smtp_server.port, interval=0.01, concurrency=3)
    processor.start()
    wait_until(lambda: len(dotfiles(queue_path, ".sending-")) == 3)
    started = time.monotonic()
    processor.stop(timeout=10)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, elapsed  # one message's time, not the queue's
    assert dotfiles(queue_path, ".") == []  # nothing claimed, no state
    sent = smtp_server.message_ids()
    assert len(sent) == len(set(sent)) >= 3
    assert len(sent) + len(queued(queue_path)) == len(ids)
    for entry in Maildir(queue_path).scan().entries:  # intact, still queued
        with open(entry.path, "rb") as f:
            assert parse_queue_file(f.read())[2].startswith(b"From: ")
    assert worker_threads() == []


def test_stop_times_out_while_a_message_is_being_sent(
        smtp_server, make_processor, queue_path):
    smtp_server.slow(0.4)
    fill_queue(queue_path, 1)
    processor = make_processor(smtp_server.port, interval=0.01, concurrency=1)
    processor.start()
    wait_until(lambda: dotfiles(queue_path, ".sending-"))
    with pytest.raises(TimeoutError, match=r"did not stop within 0\.05 s"):
        processor.stop(timeout=0.05)
    processor.stop(timeout=5)
    assert not processor.is_alive() and len(smtp_server.messages) == 1


def test_stop_from_another_thread_ends_a_pass_run_by_process_queue(
        smtp_server, make_processor, queue_path):
    smtp_server.slow(0.2)
    fill_queue(queue_path, 6)
    processor = make_processor(smtp_server.port, concurrency=1)
    result = []
    runner = threading.Thread(target=lambda: result.append(processor.process_queue()))
    runner.start()
    wait_until(lambda: dotfiles(queue_path, ".sending-"))
    with pytest.raises(TimeoutError, match=r"did not end within 0\.01 s"):
        processor.stop(timeout=0.01)
    processor.stop(timeout=5)
    runner.join(5)
    [stats] = result
    assert stats.sent == 1 and stats.total == 1
    assert worker_threads() == [] and dotfiles(queue_path, ".") == []
    # A stopped processor does nothing any more.
    assert processor.process_queue().total == 0


def test_stop_called_by_a_subscriber_ends_the_pass(
        smtp_server, make_processor, queue_path):
    fill_queue(queue_path, 5)
    processor = make_processor(smtp_server.port, concurrency=1)

    def stop_on_first(event):
        processor.stop()

    zope.event.subscribers.append(stop_on_first)
    try:
        stats = processor.process_queue()
    finally:
        zope.event.subscribers.remove(stop_on_first)
    assert stats.sent == 1
    assert worker_threads() == []


def test_keyboard_interrupt_finishes_the_messages_in_flight(
        smtp_server, make_processor, queue_path):
    smtp_server.slow(0.2)  # each message takes about 0.4 s
    fill_queue(queue_path, 10)
    processor = make_processor(smtp_server.port, concurrency=2)
    main = threading.main_thread().ident

    def interrupt_while_sending():
        wait_until(lambda: dotfiles(queue_path, ".sending-"))
        signal.pthread_kill(main, signal.SIGINT)  # as Control-C does

    interrupter = threading.Thread(target=interrupt_while_sending)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        processor.process_queue()
    interrupter.join()
    assert dotfiles(queue_path, ".") == []
    assert 1 <= len(smtp_server.messages) <= 4
    assert len(queued(queue_path)) == 10 - len(smtp_server.messages)
    assert worker_threads() == []


def test_slow_send_is_not_stolen_while_its_claim_is_renewed(
        smtp_server, make_processor, queue_path):
    smtp_server.slow(0.4)  # the send takes 0.8 s, the lease is 0.3 s
    fill_queue(queue_path, 1)
    sender = make_processor(smtp_server.port, lease=0.3, concurrency=1)
    thief = make_processor(smtp_server.port, lease=0.3, concurrency=1)
    runner = threading.Thread(target=sender.process_queue)
    runner.start()
    wait_until(lambda: dotfiles(queue_path, ".sending-"))
    skipped = 0
    while runner.is_alive() and skipped < 200:
        skipped += thief.process_queue().skipped
        time.sleep(0.05)
    runner.join(5)
    assert skipped >= 5
    assert len(smtp_server.messages) == 1


def test_limited_passes_follow_each_other_at_once(
        smtp_server, make_processor, queue_path):
    fill_queue(queue_path, 6)
    processor = make_processor(smtp_server.port, interval=60,
                               max_messages_per_pass=2, concurrency=1)
    processor.start()
    wait_until(lambda: len(smtp_server.messages) == 6, timeout=5)


def test_errors_while_tidying_up_and_closing_are_logged(
        smtp_server, make_processor, queue_path, caplog):
    class Untidy(Maildir):
        def cleanup(self, scan, lease=30.0, now=None):
            raise PermissionError("cannot tidy")

    class Unclosable(SMTPMailer):
        def close_connection(self):
            raise OSError("cannot close")

    fill_queue(queue_path, 1)
    processor = make_processor(
        None, mailer=Unclosable("127.0.0.1", smtp_server.port, no_tls=True))
    processor.setMaildir(Untidy(queue_path))
    assert processor.process_queue().sent == 1
    processor.stop()
    assert "error while tidying up" in caplog.text
    assert "error while closing a connection of" in caplog.text


def test_worker_threads_survive_anything(smtp_server, make_processor, queue_path,
                                         caplog):
    class Exiting:
        def send(self, fromaddr, toaddrs, message):
            raise SystemExit(3)

    fill_queue(queue_path, 2)
    processor = make_processor(None, mailer=Exiting(), concurrency=1)
    processor.process_queue()
    assert "unexpected error in a queue worker thread" in caplog.text
    assert dotfiles(queue_path, ".") == []  # the claim was released
    processor.setMailer(make_mailer(smtp_server.port))
    assert processor.process_queue().sent == 2  # by the same worker thread


def test_atexit_stops_a_running_thread(smtp_server, make_processor, queue_path):
    import atexit

    processor = make_processor(smtp_server.port, interval=0.01)
    registered = []
    original = atexit.register
    atexit.register = registered.append
    try:
        processor.start()
        wait_until(lambda: registered)
    finally:
        atexit.register = original
    [stop] = registered
    stop()
    assert not processor.is_alive()


# -- Message-Id ---------------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), [
    (b"Subject: x\r\nMessage-Id: <a@b>\r\n\r\nbody", "a@b"),
    (b"message-ID:\n  <folded@b>\nSubject: x\n\n", "folded@b"),
    (b"MESSAGE-ID: bare@b\n", "bare@b"),
    (b"Subject: x\n\nMessage-Id: <in-body@b>\n", "default"),
    (b"Subject: x\nMessage-Id: <>\n\n", "default"),
    (b"X-Message-Id: <other@b>\n\n", "default"),
    (b"", "default"),
])
def test_message_id_of(data, expected):
    assert message_id_of(data, "default") == expected


def test_message_id_is_looked_for_in_the_headers_only():
    data = b"Subject: x\nX-Long: " + b"a" * 100_000 + b"\nMessage-Id: <late@b>\n\n"
    assert message_id_of(data, "default") == "default"


def test_reason_file_is_json(smtp_server, make_processor, queue_path):
    smtp_server.reply("DATA", "554 no")
    fill_queue(queue_path, 1)
    [name] = queued(queue_path)
    make_processor(smtp_server.port).process_queue()
    with open(os.path.join(queue_path, "failed", ".reason-" + name)) as f:
        assert json.load(f)["code"] == 554
