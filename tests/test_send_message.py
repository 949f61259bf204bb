"""send_message(): the envelope from the headers, Bcc never sent, and the
module-level mailoutbox.send_message() -- with a real transaction manager,
a real queue and a real SMTP server."""
from __future__ import annotations

import copy
import email
import email.policy
import os
from email.message import EmailMessage
from email.message import Message

import pytest
import transaction
import zope.component
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from zope.interface.interfaces import ComponentLookupError

import mailoutbox
from mailoutbox.delivery import DirectMailDelivery
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.envelope import parse_queue_file
from mailoutbox.headers import HIDDEN_HEADERS
from mailoutbox.headers import envelope_from_headers
from mailoutbox.headers import prepare_send_message
from mailoutbox.headers import remove_headers
from mailoutbox.interfaces import IMailDelivery
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer

RAW = (
    b"From: Jane <jane@example.org>\r\n"
    b"To: a@example.org, \"Doe, John\" <john@example.org>\r\n"
    b"Cc: c@example.org, a@EXAMPLE.org\r\n"
    b"Bcc: hidden@example.org,\r\n secret@example.org\r\n"
    b"Subject: Hi\r\n"
    b"\r\n"
    b"Body.\r\n"
)


def queued(path):
    """(fromaddr, toaddrs, message) of each queued message, oldest first."""
    result = []
    for name in Maildir(path):
        with open(name, "rb") as f:
            result.append(parse_queue_file(f.read()))
    return result


def make_message(**headers):
    message = EmailMessage()
    for name, value in headers.items():
        message[name.replace("_", "-")] = value
    message.set_content("Hello.\n")
    return message


# -- the envelope from the headers ---------------------------------------------


def test_queued_with_the_envelope_of_its_headers_and_without_bcc(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    with tm:
        message_id = delivery.send_message(RAW)
    [(fromaddr, toaddrs, data)] = queued(queue_path)
    assert fromaddr == "jane@example.org"
    assert toaddrs == ("a@example.org", "john@example.org", "c@example.org",
                       "hidden@example.org", "secret@example.org")
    assert b"Bcc" not in data and b"secret" not in data and b"hidden" not in data
    assert data == b"Message-Id: <%s>\r\n%s" % (
        message_id.encode(), remove_headers(RAW, ["Bcc"]))


def test_the_callers_message_is_not_changed(queue_path, tm):
    message = make_message(From="a@example.org", To="b@example.org",
                           Bcc="secret@example.org")
    before = message.as_bytes()
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    with tm:
        delivery.send_message(message)
    assert message.as_bytes() == before
    assert message["Bcc"] == "secret@example.org"
    assert message["Message-Id"] is None
    [(_f, toaddrs, data)] = queued(queue_path)
    assert toaddrs == ("b@example.org", "secret@example.org")
    assert b"secret" not in data


def test_sender_header_wins_over_from(queue_path, tm):
    message = make_message(From="a@example.org, b@example.org",
                           Sender="Office <office@example.org>",
                           To="c@example.org")
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    with tm:
        delivery.send_message(message)
    assert queued(queue_path)[0][:2] == ("office@example.org", ("c@example.org",))


def test_the_newest_resent_block_is_used(queue_path, tm):
    data = (
        b"Resent-Date: Mon, 1 Jan 2026 10:00:00 +0000\n"
        b"Resent-From: forwarder@example.org\n"
        b"Resent-To: new@example.org\n"
        b"Resent-Bcc: quiet@example.org\n"
        b"Received: from somewhere\n"
        b"Resent-Date: Sun, 31 Dec 2025 10:00:00 +0000\n"
        b"Resent-Sender: older@example.org\n"
        b"Resent-To: older-rcpt@example.org\n"
        b"Resent-Bcc: older-quiet@example.org\n"
        b"From: author@example.org\n"
        b"To: original@example.org\n"
        b"Subject: forwarded\n"
        b"\n"
        b"body\n"
    )
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    with tm:
        delivery.send_message(data)
    [(fromaddr, toaddrs, message)] = queued(queue_path)
    assert (fromaddr, toaddrs) == (
        "forwarder@example.org", ("new@example.org", "quiet@example.org"))
    assert b"quiet" not in message  # neither Resent-Bcc block is kept
    assert b"Resent-To: new@example.org\n" in message
    assert b"To: original@example.org\n" in message


def test_resent_sender_wins_and_adjacent_blocks_split():
    data = (b"Resent-Sender: s@example.org\nResent-From: f@example.org\n"
            b"Resent-To: t@example.org\nResent-To: next-block@example.org\n\n")
    assert envelope_from_headers(data) == ("s@example.org", ("t@example.org",))


def test_duplicates_are_collapsed_domains_without_case():
    data = (b"From: a@example.org\nTo: x@example.org, x@EXAMPLE.ORG\n"
            b"Cc: <x@example.org>, X@example.org\nBcc: Mr X <x@Example.org>\n\n")
    assert envelope_from_headers(data)[1] == ("x@example.org", "X@example.org")


def test_groups_comments_and_encoded_names():
    data = (b"From: =?utf-8?q?J=C3=B6rg?= <j@example.org> (the boss)\n"
            b"To: undisclosed-recipients:;\n"
            b"Cc: team: a@example.org, b@example.org;, c@example.org\n\n")
    assert envelope_from_headers(data) == (
        "j@example.org", ("a@example.org", "b@example.org", "c@example.org"))


def test_utf8_addresses_from_an_email_message():
    message = EmailMessage(policy=email.policy.SMTPUTF8)
    message["From"] = "jörg@exämple.org"
    message["To"] = "zoë@example.org"
    message.set_content("x")
    assert envelope_from_headers(message) == ("jörg@exämple.org",
                                              ("zoë@example.org",))


def test_given_values_are_returned_as_they_are():
    assert envelope_from_headers(b"no headers at all", "a@x.org", "b@x.org") == (
        "a@x.org", "b@x.org")
    assert envelope_from_headers(b"From: a@x.org, b@x.org\n\n", "s@x.org") == (
        "s@x.org", ())


@pytest.mark.parametrize(("data", "error"), [
    (b"From: a@example.org, b@example.org\nTo: c@example.org\n\n",
     r"the From header names 2 addresses, and the sender must be one \(add a"
     r" Sender header, or give fromaddr\)"),
    (b"Sender: a@example.org, b@example.org\nTo: c@example.org\n\n",
     r"the Sender header names 2 addresses, and the sender must be one \(give"),
    (b"Resent-From: a@example.org, b@example.org\nResent-To: c@example.org\n\n",
     "the Resent-From header names 2 addresses.*add a Resent-Sender header"),
    (b"From: undisclosed:;\nTo: c@example.org\n\n", "names 0 addresses"),
    (b"From: a@example.org\nTo: alice@example.org <bob@example.org>\n\n",
     "cannot tell the addresses of the To header"),
    (b"From: a@example.org\nTo: c@example.org\nCc: no@domain@\n\n",
     "cannot tell the addresses of the Cc header 'no@domain@'"),
    (b"From: a@example.org\nTo: jane@\n\n",
     r"cannot tell the addresses of the To header .jane@.: it is not a list"),
    (b'From: a@example.org\nTo: "quoted local"\n\n',
     "invalid address '\"quoted local\"': no '@' follows the quoted local part"),
    (b"From: a@example.org\nTo: \xff@example.org\n\n",
     "the To header is not valid UTF-8"),
    (b"From: a@example.org\nTo: c@example.org\n", "no blank line between"),
    (b"Subject: none\n\nbody\n", "no sender: the message has no Sender or From"),
    (b"From: a@example.org\nCc: undisclosed:;\n\n",
     "no recipient: the message has no address in To, Cc or Bcc"),
    (b"Resent-From: a@example.org\nTo: c@example.org\n\n",
     "no recipient.*newest Resent- block"),
])
def test_errors_join_nothing_and_write_nothing(queue_path, tm, data, error):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    tm.begin()
    with pytest.raises(ValueError, match=error):
        delivery.send_message(data)
    assert tm.get()._resources == []
    tm.commit()
    assert not os.path.exists(queue_path)


def test_a_non_utf8_header_that_is_not_needed_is_no_problem():
    data = b"From: a@example.org\nTo: b@example.org\nSubject: \xe9t\xe9\n\n"
    assert envelope_from_headers(data) == ("a@example.org", ("b@example.org",))


def test_explicit_envelope_wins_and_bcc_is_still_removed(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    with tm:
        delivery.send_message(RAW, fromaddr="bounce@example.org",
                              toaddrs=["only@example.org"])
        delivery.send_message(RAW, toaddrs=["two@example.org"])
    [first, second] = queued(queue_path)
    assert first[:2] == ("bounce@example.org", ("only@example.org",))
    assert second[:2] == ("jane@example.org", ("two@example.org",))
    assert b"secret" not in first[2] + second[2]


def test_same_checks_as_send(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    tm.begin()
    with pytest.raises(TypeError, match="not a single str"):
        delivery.send_message(RAW, toaddrs="x@example.org")
    with pytest.raises(ValueError, match="malformed Message-Id"):
        delivery.send_message(b"Message-Id: nope\r\n" + RAW)
    with pytest.raises(TypeError, match="not int"):
        delivery.send_message(42)
    assert tm.get()._resources == []


def test_message_id_is_kept_and_returned(queue_path, tm):
    message = make_message(From="a@example.org", To="b@example.org",
                           Message_Id="<mine@example.org>")
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    with tm:
        assert delivery.send_message(message) == "mine@example.org"


def test_an_aborted_transaction_queues_nothing(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    tm.begin()
    delivery.send_message(RAW)
    tm.abort()
    assert not os.path.exists(queue_path) or queued(queue_path) == []


def test_a_compat32_message_and_a_str(queue_path, tm):
    legacy = email.message_from_string(RAW.decode().replace("\r\n", "\n"))
    assert isinstance(legacy, Message)
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    with tm:
        delivery.send_message(legacy)
        delivery.send_message(RAW.decode())
    [first, second] = queued(queue_path)
    assert first[:2] == second[:2]
    assert len(first[1]) == 5
    assert b"secret" not in first[2] + second[2]


def test_direct_delivery_sends_without_bcc_to_a_real_server(smtp_server, tm):
    mailer = SMTPMailer("127.0.0.1", smtp_server.port, no_tls=True, timeout=5)
    delivery = DirectMailDelivery(mailer, transaction_manager=tm)
    with tm:
        message_id = delivery.send_message(RAW)
    mailer.close()
    [received] = smtp_server.messages
    assert received.message_id == message_id
    assert received.mail_from == "jane@example.org"
    assert received.rcpt_tos == ["a@example.org", "john@example.org",
                                 "c@example.org", "hidden@example.org",
                                 "secret@example.org"]
    assert b"secret" not in received.data and b"Bcc" not in received.data
    assert b"hidden" not in received.data


# -- remove_headers ---------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), [
    (b"A: 1\r\nBcc: x,\r\n\ty\r\nB: 2\r\n\r\nbody", b"A: 1\r\nB: 2\r\n\r\nbody"),
    (b"bcc: x\nRESENT-BCC: y\nA: 1\n\nBcc: in body\n", b"A: 1\n\nBcc: in body\n"),
    (b"Bcc: x\n\nbody", b"\nbody"),
    (b"A: 1\nBcc: x\n\n", b"A: 1\n\n"),
    (b"A: 1\nno separator", b"A: 1\nno separator"),
    (b"A: 1\nBccX: y\n\nb", b"A: 1\nBccX: y\n\nb"),
    (b"\n\nBcc: body only\n", b"\n\nBcc: body only\n"),
])
def test_remove_headers(data, expected):
    assert remove_headers(data, HIDDEN_HEADERS) == expected
    assert remove_headers(data, [b"Bcc", "resent-bcc"]) == expected


ADDRESS = st.builds(
    "{}@{}.example".format,
    st.text("abcdefghij0123456789", min_size=1, max_size=8),
    st.sampled_from(["one", "two", "three"]),
)


@settings(max_examples=200, deadline=None)
@given(to=st.lists(ADDRESS, max_size=4), cc=st.lists(ADDRESS, max_size=4),
       bcc=st.lists(ADDRESS, min_size=1, max_size=4))
def test_property_every_recipient_once_and_bcc_never_sent(to, cc, bcc):
    lines = [b"From: sender@example.org"]
    for name, addresses in (("To", to), ("Cc", cc), ("Bcc", bcc)):
        if addresses:
            lines.append(f"{name}: {', '.join(addresses)}".encode())
    data = b"\r\n".join([*lines, b"", b"body"])
    fromaddr, toaddrs, sent = prepare_send_message(data)
    assert fromaddr == "sender@example.org"
    assert list(toaddrs) == list(dict.fromkeys(to + cc + bcc))
    head = sent.split(b"\r\n\r\n", 1)[0]
    assert b"Bcc" not in head
    assert head.splitlines() == [line for line in lines if not line.startswith(b"Bcc")]


# -- the module-level send_message() ------------------------------------------------


@pytest.fixture
def registered():
    """Register deliveries as global utilities for one test."""
    registry = zope.component.getGlobalSiteManager()
    done = []

    def register(delivery, name="Mail"):
        registry.registerUtility(delivery, IMailDelivery, name)
        done.append((delivery, name))
        return delivery

    yield register
    for delivery, name in done:
        registry.unregisterUtility(delivery, IMailDelivery, name)


def test_module_level_send_message_uses_the_named_delivery(queue_path, registered):
    registered(QueuedMailDelivery(queue_path))
    other = registered(QueuedMailDelivery(queue_path + "-other"), "Other")
    with transaction.manager:
        mailoutbox.send_message(copy.copy(RAW))
        mailoutbox.send_message(RAW, "Other", fromaddr="x@example.org",
                                toaddrs=["y@example.org"])
    assert len(queued(queue_path)) == 1
    assert queued(other.queuePath)[0][:2] == ("x@example.org", ("y@example.org",))


def test_module_level_send_message_without_a_delivery(registered):
    with pytest.raises(ComponentLookupError,
                       match="no mail delivery named 'Nowhere' is registered"):
        mailoutbox.send_message(RAW, "Nowhere")
    with pytest.raises(LookupError, match="'Elsewhere'"):  # a LookupError
        mailoutbox.send_message(RAW, delivery="Elsewhere")


def test_module_level_send_message_with_a_zope_sendmail_delivery(queue_path,
                                                                registered):
    from zope.sendmail.delivery import QueuedMailDelivery as ZopeDelivery

    registered(ZopeDelivery(queue_path))
    with transaction.manager:
        mailoutbox.send_message(RAW)
    [(fromaddr, toaddrs, data)] = queued(queue_path)
    assert fromaddr == "jane@example.org" and len(toaddrs) == 5
    assert b"secret" not in data
    with pytest.raises(TypeError, match="cannot route messages to the mailer 'x'"):
        mailoutbox.send_message(RAW, mailer="x")


def test_public_names():
    assert mailoutbox.__all__ == ["includeme", "send_message"]
    for name in mailoutbox.__all__:
        assert callable(getattr(mailoutbox, name))
