"""Hardening of the input side: header injection after serialization,
encoded words in addresses, the ``send`` command, folded addresses and
local recipients -- with a real transaction manager, a real queue, a real
SMTP server and real subprocesses."""
from __future__ import annotations

import email
import email.message
import email.policy
import os
import tempfile
from email.message import EmailMessage
from email.message import Message

import pytest
import transaction
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from mailoutbox.cli import EXIT_OK
from mailoutbox.cli import EXIT_USAGE
from mailoutbox.delivery import DirectMailDelivery
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.envelope import parse_queue_file
from mailoutbox.headers import envelope_from_headers
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.message import check_recipients
from mailoutbox.message import check_sender
from mailoutbox.message import message_to_bytes
from mailoutbox.message import parse_address
from mailoutbox.message import prepare_message

from .test_cli import python_m

THIEF = "thief@example.net"
#: A file name from os.listdir() that is not UTF-8: a lone surrogate.
SURROGATE_SUBJECT = os.fsdecode(b"report\xff\nBcc: " + THIEF.encode())


def queued(path):
    """(fromaddr, toaddrs, message) of each queued message."""
    found = []
    for name in Maildir(path):
        with open(name, "rb") as f:
            found.append(parse_queue_file(f.read()))
    return found


def legacy(subject: str, **headers: str) -> Message:
    message = Message()
    message["From"] = "a@example.org"
    message["To"] = "b@example.org"
    for name, value in headers.items():
        message[name] = value
    message["Subject"] = subject
    message.set_payload("body\n")
    return message


def refused(delivery, tm, call, match):
    """*call* raises ValueError matching *match*, joins nothing and queues
    nothing."""
    tm.begin()
    with pytest.raises(ValueError, match=match):
        call(delivery)
    assert tm.get()._resources == []
    tm.commit()


# -- 1. header injection, checked after serialization ----------------------------


@pytest.mark.parametrize("method", ["send", "send_message"])
def test_a_lone_surrogate_does_not_smuggle_a_bcc(queue_path, tm, method):
    message = legacy(SURROGATE_SUBJECT)
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)

    def call(d):
        if method == "send":
            return d.send("a@example.org", ["b@example.org"], message)
        return d.send_message(message)

    refused(delivery, tm, call,
            r"the 'Subject' header of the message holds a line break that is"
            r" not folding white space .* would add a 'Bcc' header the message"
            r" does not have")
    assert not os.path.exists(queue_path)


def test_a_lone_surrogate_through_a_direct_delivery(smtp_server, tm):
    mailer = SMTPMailer("127.0.0.1", smtp_server.port, no_tls=True, timeout=30)
    delivery = DirectMailDelivery(mailer, transaction_manager=tm)
    message = legacy(SURROGATE_SUBJECT)
    for call in (lambda d: d.send_message(message),
                 lambda d: d.send("a@example.org", ["b@example.org"], message)):
        refused(delivery, tm, call, "would add a 'Bcc' header")
    mailer.close()
    assert smtp_server.messages == []


def _email_message(policy, name, value):
    message = EmailMessage(policy=policy)
    message["From"] = "a@example.org"
    message["To"] = "b@example.org"
    message.set_raw(name, value)
    message.set_content("body\n")
    return message


@pytest.mark.parametrize("policy", [email.policy.default, email.policy.SMTP],
                         ids=["default", "SMTP"])
@pytest.mark.parametrize("value", [
    f"x\nBcc: {THIEF}",  # set_raw() keeps it; the policy rejoins the lines
    f"x\u2028Bcc: {THIEF}",  # str.splitlines() splits here too
    f"x\x85Bcc: {THIEF}",
    f"x\udcff\r\nBcc: {THIEF}",
])
def test_email_message_set_raw_injection(queue_path, tm, policy, value):
    message = _email_message(policy, "Subject", value)
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    refused(delivery, tm, lambda d: d.send_message(message),
            "'Subject' header .* would add a 'Bcc' header")
    refused(delivery, tm,
            lambda d: d.send("a@example.org", ["b@example.org"], message),
            "'Subject' header .* would add a 'Bcc' header")


def test_a_value_that_would_end_the_headers_early():
    message = legacy("x\udcff\n\nfake body", Cc="c@example.org")
    # Subject is set last; put it first so that headers would be hidden.
    message._headers.insert(0, message._headers.pop())
    with pytest.raises(ValueError, match=r"'Subject' header .* would end the"
                       r" headers early"):
        prepare_message(message)


def test_a_header_name_that_is_two_fields():
    message = legacy("x")
    message[f"X-A: 1\nBcc: {THIEF}\nX-B"] = "2"
    with pytest.raises(ValueError, match=r"the header name 'X-A: 1\\nBcc: .* is"
                       r" not a field name .* would add a 'X-A' header"):
        message_to_bytes(message)
    message = legacy("x")
    message["X-A: 1\nX-B"] = "2"
    with pytest.raises(ValueError, match=r"the header name 'X-A: 1.nX-B'"):
        envelope_from_headers(message)


@pytest.mark.parametrize("value", [
    "report\udcff",  # serialized raw: one header, as set
    "report\udcff\n continued",  # folding white space
    "plain\n\tfolded",
])
def test_surrogates_and_folding_without_injection_are_sent(queue_path, tm, value):
    message = legacy(value)
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    with tm:
        delivery.send_message(message)
    [(_fromaddr, toaddrs, data)] = queued(queue_path)
    assert toaddrs == ("b@example.org",)
    names = [line.split(b":")[0] for line in data.split(b"\n\n")[0].split(b"\n")
             if line[:1] not in (b" ", b"\t")]
    assert names == [b"Message-Id", b"From", b"To", b"Subject"]


@pytest.mark.parametrize(("data", "match"), [
    # a bare LF inside a CRLF header section splits the line
    (f"To: b@example.org\r\nSubject: x\nBcc: {THIEF}\r\n\r\nbody".encode(),
     r"line 2 of the message ends with a bare LF"),
    (b"Subject: x\r\nTo: b@example.org\n\r\nbody",
     r"line 2 of the message ends with a bare LF"),
    (b"Subject: x\r\nTo: b@example.org\r\n\nbody",
     r"line 3 of the message ends with a bare LF"),
    # a CR in an LF header section
    (f"To: b@example.org\nSubject: x\r\nBcc: {THIEF}\n\nbody".encode(),
     r"line 2 of the message has a CR that does not end the line"),
    (f"To: b@example.org\nSubject: x\rBcc: {THIEF}\n\nbody",
     r"line 2 of the message has a CR that does not end the line"),
    ("To: b@example.org\nSubject: x\udcff\n\nbody",
     "cannot be encoded as UTF-8"),
])
def test_str_and_bytes_lines_are_split_one_way(queue_path, tm, data, match):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    refused(delivery, tm, lambda d: d.send_message(data, "a@example.org"), match)
    refused(delivery, tm,
            lambda d: d.send("a@example.org", ["b@example.org"], data), match)


_injected = st.sampled_from([
    f"r\udcff\nBcc: {THIEF}", f"r\udcff\r\nCc: {THIEF}", f"r\udcff\rTo: {THIEF}",
    "r\udcff\n\nhidden", f"r\u2028Bcc: {THIEF}", f"r\x1cResent-To: {THIEF}",
    f"r\nBcc: {THIEF}", f"r\r\nSender: {THIEF}",
])
_harmless = st.sampled_from(["plain", "r\udcff", "r\udcff\n folded", "Grüße"])
_names = st.sampled_from(["Subject", "X-Note", "Comments", "Keywords"])


@st.composite
def injected_messages(draw) -> email.message.Message:
    """A message From a@example.org To b@example.org, with other headers
    whose values may hold line breaks that are not folding."""
    kind = draw(st.sampled_from(["compat32", "default", "SMTP"]))
    headers = draw(st.lists(st.tuples(_names, _injected | _harmless),
                            min_size=1, max_size=3))
    if kind == "compat32":
        message = Message()
    else:
        message = EmailMessage(policy=getattr(email.policy, kind))
    message["From"] = "a@example.org"
    message["To"] = "b@example.org"
    for name, value in headers:
        if kind == "compat32":
            message[name] = value
        elif value.isascii() or "\udcff" in value:
            message.set_raw(name, value)
    message.set_payload("body\n", "utf-8")
    return message


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(message=injected_messages(), method=st.sampled_from(["send", "send_message"]))
def test_property_no_header_the_caller_did_not_set(message, method):
    """Whatever the header values, send() and send_message() either refuse
    the message (joining nothing), or queue exactly the headers the message
    has (less Bcc) for exactly the recipients it names."""
    manager = transaction.TransactionManager()
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "queue")
        delivery = QueuedMailDelivery(path, transaction_manager=manager)
        manager.begin()
        try:
            if method == "send":
                delivery.send("a@example.org", ["b@example.org"], message)
            else:
                delivery.send_message(message)
        except ValueError:
            assert manager.get()._resources == []
            manager.abort()
            assert not os.path.exists(path)
            return
        manager.commit()
        [(fromaddr, toaddrs, data)] = queued(path)
    assert (fromaddr, toaddrs) == ("a@example.org", ("b@example.org",))
    head = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    names = [line.split(b":")[0].decode().lower() for line in head.split(b"\n")
             if line[:1] not in (b" ", b"\t")]
    assert names == ["message-id", *(n.lower() for n in message)]


# -- 2. RFC 2047 encoded words inside addresses -----------------------------------


@pytest.mark.parametrize("header", [
    "To", "Cc", "Bcc", "Sender", "From", "Resent-To", "Resent-Bcc", "Resent-From",
])
@pytest.mark.parametrize("address", [
    "jane@=?utf-8?q?evil.example?=",
    "Jane <jane@=?utf-8?q?evil.example?=>",
    "=?utf-8?q?jane?= @example.org",
])
def test_encoded_words_in_an_addr_spec_are_refused(queue_path, tm, header, address):
    headers = {"From": "a@example.org", "To": "b@example.org"}
    if header.startswith("Resent-"):
        headers.update({"Resent-From": "r@example.org", "Resent-To": "c@example.org"})
    headers[header] = address
    data = "".join(f"{n}: {v}\n" for n, v in headers.items()) + "\nbody\n"
    with pytest.raises(ValueError, match=f"the {header} header .*(has an RFC 2047"
                       " encoded word inside an address|after encoded-word)"):
        envelope_from_headers(data.encode())
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    refused(delivery, tm, lambda d: d.send_message(data), "encoded.word")


def test_encoded_words_in_display_names_are_fine():
    data = (b"From: =?utf-8?q?J=C3=B6rg?= <j@example.org>\n"
            b"To: =?utf-8?q?A?= <a@example.org>, b@example.org\n\n")
    assert envelope_from_headers(data) == (
        "j@example.org", ("a@example.org", "b@example.org"))


def test_send_keeps_encoded_words_literal_or_refuses_them(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    with pytest.raises(ValueError, match="is not a host name label"):
        delivery.send("a@example.org", ["jane@=?utf-8?q?evil.example?="],
                      b"S: x\n\nb")
    with pytest.raises(ValueError, match="invalid sender"):
        delivery.send("jane@=?utf-8?q?evil.example?=", ["b@example.org"],
                      b"S: x\n\nb")
    # In a local part, '=' and '?' are atext: the address is used literally.
    with tm:
        delivery.send("a@example.org", ["=?utf-8?q?jane?=@example.org"], b"S: x\n\nb")
    [(_f, toaddrs, _m)] = queued(queue_path)
    assert toaddrs == ("=?utf-8?q?jane?=@example.org",)


def test_the_queue_file_envelope_is_never_decoded():
    data = (b"X-Zope-From: a@example.org\n"
            b"X-Zope-To: jane@=?utf-8?q?evil.example?=, =?utf-8?q?x?= <x@y.org>\n"
            b"Subject: x\n\nbody")
    _f, toaddrs, _m = parse_queue_file(data)
    assert toaddrs == ("jane@=?utf-8?q?evil.example?=", "=?utf-8?q?x?= <x@y.org>")


# -- 3. the send command ---------------------------------------------------------

MESSAGE = (b"From: Jane <jane@example.org>\n"
           b"To: a@example.org\n"
           b"Bcc: hidden@example.org\n"
           b"Subject: Hi\n\nBody.\n")


def _one_line_error(done, text):
    assert done.returncode == EXIT_USAGE, done.stderr
    err = done.stderr.decode()
    assert text in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert done.stdout == b""


def test_cli_to_with_a_line_break_is_refused(queue_path):
    done = python_m("send", queue_path, "--to", f"b@example.org\r\nBcc: {THIEF}",
                    stdin=MESSAGE)
    _one_line_error(done, "invalid address 'b@example.org\\r\\nBcc: thief")
    assert not os.path.exists(queue_path)
    done = python_m("send", queue_path, "--from", "a@example.org", "--to",
                    f"b@example.org,\nBcc: {THIEF}", "--subject", "s", "--body", "b")
    _one_line_error(done, "invalid address '\\nBcc: thief@example.net'")
    assert not os.path.exists(queue_path)


def test_cli_to_still_removes_bcc(queue_path):
    done = python_m("send", queue_path, "--to", "c@example.org", stdin=MESSAGE)
    assert done.returncode == EXIT_OK, done.stderr
    [(fromaddr, toaddrs, data)] = queued(queue_path)
    assert (fromaddr, toaddrs) == ("jane@example.org", ("c@example.org",))
    assert b"Bcc" not in data and b"hidden" not in data


@pytest.mark.parametrize(("argv", "stdin", "text"), [
    (["--to", "jane@"], MESSAGE, "invalid address 'jane@': the domain"),
    ([], MESSAGE.replace(b"To: a@example.org", b"To: jane@"),
     "cannot tell the addresses of the To header 'jane@'"),
    (["--from", "jane@", "--to", "b@example.org", "--subject", "s", "--body", "b"],
     b"", "invalid sender 'jane@': the domain"),
    (["--from", "a@example.org", "--to", "b@", "--subject", "s", "--body", "b"],
     b"", "invalid address 'b@': the domain"),
    ([], MESSAGE.replace(b"To: a@example.org", b"To: a@=?utf-8?q?evil.example?="),
     "RFC 2047"),
])
def test_cli_bad_addresses_are_one_line_errors(queue_path, argv, stdin, text):
    done = python_m("send", queue_path, *argv, stdin=stdin)
    _one_line_error(done, text)
    assert "index out of range" not in done.stderr.decode()
    assert not os.path.exists(queue_path)


def test_cli_builds_utf8_addresses_without_encoded_words(queue_path):
    done = python_m("send", queue_path, "--from", "jöe@example.org", "--to",
                    "root, Jürgen <jü@exämple.org>", "--subject", "s", "--body", "b")
    assert done.returncode == EXIT_OK, done.stderr
    [(_fromaddr, toaddrs, data)] = queued(queue_path)
    assert toaddrs == ("root", "Jürgen <jü@exämple.org>")
    assert "From: jöe@example.org\n".encode() in data.replace(b"\r\n", b"\n")
    assert b"=?" not in data


# -- 4. folded addresses ------------------------------------------------------------

LONG_NAME = "The Editorial Team of the Website of the Example Organisation"


def folded_from() -> str:
    """The From header of a message folded by EmailMessage.as_string(), as
    Products.MailHost takes it for the envelope sender."""
    message = EmailMessage()
    message["From"] = f"{LONG_NAME} <noreply@example.com>"
    text = message.as_string()
    value = email.message_from_string(text)["From"]
    assert "\n " in value
    return value


@pytest.mark.parametrize("fold", ["\n ", "\r\n ", "\n\t", "\r\n\t"])
def test_folded_addresses_are_unfolded(queue_path, tm, fold):
    sender = folded_from().replace("\n ", fold)
    recipient = f"Jane{fold}Doe <jane@example.org>"
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    with tm:
        delivery.send(sender, [recipient, "b@example.org"], b"S: x\n\nb")
        delivery.send_message(b"To: c@example.org\n\nb", fromaddr=sender)
    for fromaddr, _toaddrs, _data in queued(queue_path):
        assert "\n" not in fromaddr and "\r" not in fromaddr
        assert parse_address(fromaddr) == (LONG_NAME, "noreply@example.com")
    toaddrs = sorted(t for _f, t, _d in queued(queue_path))
    assert toaddrs == [("Jane Doe <jane@example.org>", "b@example.org"),
                       ("c@example.org",)]


def test_folded_sender_reaches_the_smtp_envelope(smtp_server, tm):
    mailer = SMTPMailer("127.0.0.1", smtp_server.port, no_tls=True, timeout=30)
    delivery = DirectMailDelivery(mailer, transaction_manager=tm)
    with tm:
        delivery.send(folded_from(), ["Jane\r\n Doe <jane@example.org>"],
                      b"S: x\n\nb")
    mailer.close()
    [received] = smtp_server.messages
    assert received.mail_from == "noreply@example.com"
    assert received.rcpt_tos == ["jane@example.org"]


@pytest.mark.parametrize("address", [
    "Jane\n<jane@example.org>",  # a line break not followed by white space
    "jane@example.org\n",
    "jane@example.org\r\n",
    "Jane\r <jane@example.org>",  # a CR alone is not a line break
    "Jane\n\n <jane@example.org>",
    f"jane@example.org\r\nBcc: {THIEF}",
])
def test_line_breaks_that_are_not_folding_are_refused(address):
    with pytest.raises(ValueError, match="CR, LF and NUL are not allowed"):
        check_recipients([address])
    with pytest.raises(ValueError, match="invalid sender"):
        check_sender(address)


def test_check_returns_the_unfolded_address():
    assert check_sender("A\n <a@example.org>") == "A <a@example.org>"
    assert check_sender(" \n <>") == "  <>"
    assert check_recipients(["B\r\n\t<b@example.org>"]) == ("B\t<b@example.org>",)


# -- 5. local recipients without a domain -------------------------------------------


def test_local_recipients_are_queued(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, transaction_manager=tm)
    with tm:
        delivery.send("root", ["root", "Admin <post.master>"], b"S: x\n\nb")
        delivery.send_message(b"From: www-data\nTo: root\nCc: Ops <ops>\n\nb")
    assert sorted((f, t) for f, t, _d in queued(queue_path)) == [
        ("root", ("root", "Admin <post.master>")),
        ("www-data", ("root", "ops")),
    ]


def test_local_recipients_are_sent_directly(smtp_server, tm):
    mailer = SMTPMailer("127.0.0.1", smtp_server.port, no_tls=True, timeout=30)
    delivery = DirectMailDelivery(mailer, transaction_manager=tm)
    with tm:
        delivery.send("root", ["root", "Admin <postmaster>"], b"S: x\n\nb")
    mailer.close()
    [received] = smtp_server.messages
    assert (received.mail_from, received.rcpt_tos) == ("root", ["root", "postmaster"])


@pytest.mark.parametrize(("address", "reason"), [
    ('"root"', "no '@' follows the quoted local part"),
    ('"ro ot"', "no '@' follows the quoted local part"),
    ("ro ot", "space outside quotes"),
    ("root.", "empty part"),
    ("ro<ot", "'>' is missing"),
    ("root\nBcc: x", "CR, LF and NUL"),
])
def test_local_recipients_must_be_dot_atoms(address, reason):
    with pytest.raises(ValueError, match=reason):
        check_recipients([address])
