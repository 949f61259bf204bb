"""Queue interoperability with zope.sendmail, both directions, with real
SMTP servers: a queue written by mailoutbox is drained by zope.sendmail's
processor and mailer, and one written by zope.sendmail is read and drained
by mailoutbox."""
from __future__ import annotations

import os

import transaction
import zope.event
from zope.sendmail.delivery import QueuedMailDelivery as ZopeQueuedMailDelivery
from zope.sendmail.mailer import SMTPMailer as ZopeSMTPMailer
from zope.sendmail.queue import QueueProcessorThread as ZopeProcessor

from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.envelope import parse_queue_file
from mailoutbox.events import MailSentEvent
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread

RECIPIENTS = ['"Doe, Jane" <jane@example.org>', "Bob Smith <bob@example.org>",
              "carol@example.org"]


def message(n):
    return (b"From: shop@example.org\r\nTo: jane@example.org\r\n"
            b"Subject: order %d\r\n\r\nThanks!\r\n" % n)


def zope_drain(queue_path, server):
    processor = ZopeProcessor()
    processor.setMailer(ZopeSMTPMailer(server.host, server.port, no_tls=True))
    processor.setQueuePath(queue_path)
    processor.run(forever=False)


def queue_files(queue_path):
    """The queued messages (no dot-files)."""
    names = (os.listdir(os.path.join(queue_path, "new"))
             + os.listdir(os.path.join(queue_path, "cur")))
    return sorted(n for n in names if not n.startswith("."))


def test_zope_sendmail_drains_a_mailoutbox_queue(queue_path, smtp_server, tm):
    delivery = QueuedMailDelivery(queue_path, tm)
    ids = [delivery.send("shop@example.org", RECIPIENTS, message(n)) for n in range(3)]
    tm.commit()
    zope_drain(queue_path, smtp_server)
    assert sorted(smtp_server.message_ids()) == sorted(ids)
    for received in smtp_server.messages:
        assert received.mail_from == "shop@example.org"
        assert received.rcpt_tos == ["jane@example.org", "bob@example.org",
                                     "carol@example.org"]
    assert queue_files(queue_path) == []


def test_zope_sendmail_respects_a_mailoutbox_claim(queue_path, smtp_server, tm):
    QueuedMailDelivery(queue_path, tm).send("a@example.org", ["b@example.org"],
                                            message(1))
    tm.commit()
    maildir = Maildir(queue_path)
    claim = maildir.claim(maildir.scan().entries[0])
    zope_drain(queue_path, smtp_server)
    assert smtp_server.messages == []  # we are sending it
    claim.release()
    zope_drain(queue_path, smtp_server)
    assert len(smtp_server.messages) == 1


def test_zope_sendmail_rejections_are_adopted(queue_path, smtp_server, tm):
    """zope.sendmail keeps a message refused permanently as a .rejected-
    file; mailoutbox's clean-up moves it into the failed area."""
    smtp_server.refuse("nobody@example.org")
    message_id = QueuedMailDelivery(queue_path, tm).send(
        "a@example.org", ["nobody@example.org"], message(1))
    tm.commit()
    [name] = queue_files(queue_path)
    zope_drain(queue_path, smtp_server)
    assert queue_files(queue_path) == []
    assert os.listdir(os.path.join(queue_path, "new")) == [".rejected-" + name]
    maildir = Maildir(queue_path)
    assert maildir.cleanup(maildir.scan()) == 1
    [failed] = maildir.failed_entries()
    assert failed.name == name
    with open(failed.path, "rb") as f:
        assert message_id.encode() in f.read()
    assert maildir.reason(failed)["permanent"] is True


def zope_queue(queue_path, count):
    """Queue *count* messages with zope.sendmail's own delivery (it uses the
    thread's default transaction manager)."""
    delivery = ZopeQueuedMailDelivery(queue_path)
    transaction.begin()
    ids = [delivery.send("shop@example.org", RECIPIENTS, message(n))
           for n in range(count)]
    transaction.commit()
    return ids


def test_mailoutbox_reads_a_zope_sendmail_queue(queue_path):
    ids = zope_queue(queue_path, 3)
    paths = list(Maildir(queue_path))
    assert len(paths) == 3
    found = []
    for path in paths:
        with open(path, "rb") as f:
            fromaddr, toaddrs, data = parse_queue_file(f.read())
        assert fromaddr == "shop@example.org"
        assert toaddrs == tuple(RECIPIENTS)  # display names with commas survive
        assert data.startswith(b"Message-Id: <")
        found.append(data[len(b"Message-Id: <"):data.index(b">")].decode())
    assert sorted(found) == sorted(ids)


def test_mailoutbox_drains_a_zope_sendmail_queue(queue_path, smtp_server):
    ids = zope_queue(queue_path, 3)
    events = []
    zope.event.subscribers.append(events.append)
    mailer = SMTPMailer(smtp_server.host, smtp_server.port)
    try:
        processor = QueueProcessorThread()
        processor.setMailer(mailer)
        processor.setQueuePath(queue_path)
        processor.run(forever=False)
    finally:
        zope.event.subscribers.remove(events.append)
        mailer.close()
    assert sorted(smtp_server.message_ids()) == sorted(ids)
    for received in smtp_server.messages:
        assert received.rcpt_tos == ["jane@example.org", "bob@example.org",
                                     "carol@example.org"]
    assert sorted(e.messageId for e in events) == sorted(ids)
    assert all(isinstance(e, MailSentEvent) for e in events)
    assert queue_files(queue_path) == []
