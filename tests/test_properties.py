"""Property tests of ``send()``: bad input is refused at once, good input
arrives intact, and no input adds a recipient or a header.

Generated senders, recipients and messages (CR, LF and NUL anywhere,
non-ASCII display names, local parts and IDN domains, long lines, empty
bodies, ``str``/``bytes``/:class:`email.message.Message`, header and
envelope injection attempts) go through ``send()`` of a
:class:`~mailoutbox.delivery.QueuedMailDelivery` (then the real queue
processor) or of a :class:`~mailoutbox.delivery.DirectMailDelivery`, both
with the real :class:`~mailoutbox.mailer.SMTPMailer`, into the real
in-process SMTP server of :mod:`mailoutbox.testing.smtpd`.  For every input
exactly one of these holds (:meth:`SendHarness.check`):

- ``send()`` raises :class:`ValueError` or :class:`TypeError`, and nothing
  was joined to the transaction nor written to the queue; or
- after the commit (and, for the queue, one pass of the processor) the
  server received exactly one message whose envelope is exactly the
  intended addr-specs -- MAIL FROM the sender's (``<>`` for the null
  sender), one RCPT TO per recipient, in order -- and whose data is
  exactly :func:`expected_data`: the message as prepared (``bytes`` as
  given, a ``str`` encoded as UTF-8, a ``Message`` serialized with its own
  policy and no refolding), preceded by ``Message-Id: <ID>`` when it had
  none, ID being what ``send()`` returned, and with every line end (CRLF,
  lone LF, lone CR) as CRLF and a CRLF after the last line.  Its header
  section, split at CRLF on the wire, is the one ``send()`` checked, split
  at LF, so no header appears on the wire that ``send()`` did not see.

Lines longer than 998 octets (RFC 5322 section 2.1.1) are outside this
contract: a server may refuse such a message, which is then not delivered
at all (:meth:`SendHarness.check` says ``"too long"``); if it arrives, it
arrives intact.  :func:`test_overlong_lines_fail_whole` checks the refusal.

``reliability/fuzz_send.py`` runs the same property for many more cases.
"""
from __future__ import annotations

import contextlib
import email.message
import email.policy
import os
import re
import string
import tempfile
from collections.abc import Iterator

import pytest
import transaction
import zope.event
from hypothesis import HealthCheck
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from mailoutbox.delivery import DirectMailDelivery
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.events import MailErrorEvent
from mailoutbox.mailer import SMTPMailer
from mailoutbox.message import format_address
from mailoutbox.message import parse_address
from mailoutbox.queue import QueueProcessorThread
from mailoutbox.testing.smtpd import SMTPServer

EVIL = "evil@evil.example"
#: RFC 5322 section 2.1.1: a line is at most 998 octets, without its CRLF.
MAX_LINE = 998

# -- what "arrived intact" means -----------------------------------------------


def serialise(message: bytes | str | email.message.Message) -> bytes:
    """The message as ``send()`` is documented to prepare it, before the
    Message-Id (may raise for what cannot be serialised)."""
    if isinstance(message, bytes):
        return message
    if isinstance(message, str):
        return message.encode("utf-8")
    return message.as_bytes(policy=message.policy.clone(max_line_length=0))


def header_lines(data: bytes) -> list[bytes] | None:
    """The header section as ``send()`` reads it: lines ending in LF (a CR
    before the LF removed), up to the first empty one; None without one."""
    lines = []
    for line in data.split(b"\n")[:-1]:
        line = line.removesuffix(b"\r")
        if not line:
            return lines
        lines.append(line)
    return None


def wire_header_lines(data: bytes) -> list[bytes]:
    """The header section of received data, split at CRLF."""
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def field_names(lines: list[bytes]) -> list[str]:
    """The names of the header fields of the header *lines*, lower-case."""
    return [line.partition(b":")[0].decode("ascii", "replace").lower()
            for line in lines if line[:1] not in (b" ", b"\t")]


def has_message_id(data: bytes) -> bool:
    return any(re.match(rb"(?i)message-id:", line)
               for line in header_lines(data) or [])


def normalise(data: bytes) -> bytes:
    """Line ends as SMTP carries them."""
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def expected_data(prepared: bytes, message_id: str) -> bytes:
    """What the server must receive for a message prepared as *prepared*
    (:func:`serialise`) and given *message_id* by ``send()``."""
    if not has_message_id(prepared):
        prepared = b"Message-Id: <%s>\r\n" % message_id.encode("ascii") + prepared
    return normalise(prepared)


def longest_line(data: bytes) -> int:
    return max(len(line) for line in normalise(data).split(b"\r\n"))


def mailbox(spec: str) -> tuple[str, str]:
    """``(local part, domain)`` of an addr-spec, the local part unquoted:
    ``"a"@x.org`` and ``a@x.org`` are the same mailbox (RFC 5321 section
    4.1.2), and the server may write either."""
    local, _at, domain = spec.rpartition("@")
    if local.startswith('"') and local.endswith('"') and len(local) > 1:
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return local, domain


def envelope_spec(address: str, *, sender: bool = False) -> tuple[str, str]:
    """The mailbox the server must see for *address* (:func:`mailbox`)."""
    if sender and address.strip(" \t") in ("", "<>"):
        return mailbox("<>")  # aiosmtpd's mail_from for the null reverse-path
    return mailbox(parse_address(address)[1])


# -- the harness -------------------------------------------------------------


class SendHarness:
    """One SMTP server, a queue, a queue processor and both deliveries.

    Make one per case (:func:`fresh_harness`): a message that arrives late
    (after a timeout on a loaded machine) must not be counted in the next
    case, nor in Hypothesis's replay of the same one.  *timeout* is the
    mailers' SMTP timeout, generous so that a slow machine is not a failure.
    """

    def __init__(self, directory: str, timeout: float = 60) -> None:
        self.timeout = timeout
        self.server = SMTPServer().start()
        self.tm = transaction.TransactionManager(explicit=True)
        self.queue_path = os.path.join(directory, "queue")
        self.queued = QueuedMailDelivery(self.queue_path, transaction_manager=self.tm)
        self.direct = DirectMailDelivery(self._mailer(), transaction_manager=self.tm)
        self.processor = QueueProcessorThread(concurrency=1)
        self.processor.setMailer(self._mailer())
        self.processor.setQueuePath(self.queue_path)
        self.errors: list[MailErrorEvent] = []
        zope.event.subscribers.append(self._notified)

    def _mailer(self) -> SMTPMailer:
        return SMTPMailer("127.0.0.1", self.server.port, timeout=self.timeout)

    def _notified(self, event: object) -> None:
        if isinstance(event, MailErrorEvent):
            self.errors.append(event)

    def close(self) -> None:
        zope.event.subscribers.remove(self._notified)
        self.processor.stop(timeout=10)
        self.direct.mailer.close()
        self.server.stop()

    def queue_files(self) -> list[str]:
        """Every file in the queue (message, state and temporary files)."""
        found = []
        for folder in ("tmp", "new", "cur", "failed"):
            path = os.path.join(self.queue_path, folder)
            if os.path.isdir(path):
                found.extend(os.path.join(folder, n) for n in os.listdir(path))
        return found

    def empty_queue(self) -> None:
        for name in self.queue_files():
            os.unlink(os.path.join(self.queue_path, name))

    def check(self, fromaddr, toaddrs, message, valid: bool = False, *,
              direct: bool = False) -> str:
        """Send one message and check the property; return the outcome,
        ``"delivered"``, ``"too long"``, or ``"rejected: <reason>"``.
        With *valid*, ``send()`` must not refuse the input."""
        self.server.reset()
        self.errors.clear()
        delivery = self.direct if direct else self.queued
        txn = self.tm.begin()
        try:
            message_id = delivery.send(fromaddr, toaddrs, message)
        except (ValueError, TypeError) as exc:
            assert txn._resources == [], "send() raised but joined the transaction"
            self.tm.abort()
            assert self.queue_files() == [], "send() raised but wrote to the queue"
            assert self.server.messages == []
            assert not valid, f"send() refused a valid input: {exc}"
            inputs = (fromaddr, toaddrs, message, *_items(toaddrs))
            return f"rejected: {reason_class(exc, inputs)}"
        except BaseException:
            self.tm.abort()
            raise
        try:
            # send() accepted it: the addresses and the message are valid.
            sender = envelope_spec(fromaddr, sender=True)
            recipients = [envelope_spec(a) for a in toaddrs]
            prepared = serialise(message)
        except Exception as exc:
            self.tm.abort()
            raise AssertionError(f"send() accepted invalid input: {exc}") from exc
        try:
            self.tm.commit()
        except BaseException:
            self.tm.abort()
            raise
        if not direct:
            stats = self.processor.process_queue()
            leftover = self.queue_files()
            self.empty_queue()
        received = list(self.server.messages)
        if longest_line(prepared) > MAX_LINE and not received:
            return "too long"  # refused whole by the server (or arrived intact)
        assert self.errors == [], f"not delivered: {self.errors[0].errorMessage}"
        if not direct:
            assert (stats.sent, leftover) == (1, []), (stats, leftover)
        assert len(received) == 1, received
        got = received[0]
        assert mailbox(got.mail_from) == sender
        assert [mailbox(a) for a in got.rcpt_tos] == recipients
        assert got.data == expected_data(prepared, message_id)
        added = 0 if has_message_id(prepared) else 1
        assert wire_header_lines(got.data)[added:] == header_lines(prepared), (
            "the server saw headers that send() did not")
        if isinstance(message, email.message.Message):
            assert field_names(wire_header_lines(got.data)[added:]) == [
                name.lower() for name in message], (
                "the server saw headers that the message does not have")
        assert self.server.commands.count("DATA") == 1
        return "delivered"


def _items(value: object) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


def reason_class(exc: BaseException, inputs: tuple = ()) -> str:
    """The kind of a refusal, without the *inputs* it quotes."""
    text = str(exc)
    quoted = [repr(v) for v in inputs if isinstance(v, (str, bytes))]
    for value in sorted(quoted, key=len, reverse=True):
        text = text.replace(value, "…")
    text = re.sub(r" \([^()]*\)$", "", re.sub(r"\b\d+\b", "N", text))
    return f"{type(exc).__name__}: {text[:90]}"


@contextlib.contextmanager
def fresh_harness(timeout: float = 60) -> Iterator[SendHarness]:
    """A :class:`SendHarness` of its own, in a temporary directory."""
    with tempfile.TemporaryDirectory() as directory:
        made = SendHarness(directory, timeout=timeout)
        try:
            yield made
        finally:
            made.close()


@pytest.fixture
def harness():
    with fresh_harness() as made:
        yield made


# -- strategies -----------------------------------------------------------------
#
# Each part of a case (sender, recipients, message) comes from a "valid"
# strategy, whose values send() must accept, or from a "hostile" one, whose
# values it may refuse.  A case whose parts are all valid must be delivered:
# refusing everything would pass the property otherwise.

_ascii_atext = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"
_letters = st.characters(min_codepoint=0xA0, max_codepoint=0x30FF,
                         categories=("Ll", "Lu", "Lo"))
_atoms = st.text(st.sampled_from(_ascii_atext) | _letters, min_size=1, max_size=8)
_dot_atoms = st.lists(_atoms, min_size=1, max_size=3).map(".".join)
# RFC 5321 qtextSMTP and quoted-pairSMTP: printable ASCII (and, with
# SMTPUTF8, non-ASCII), no TAB.
_quoted_locals = st.text(st.sampled_from(' ,@<>()[]:;."\\abcé') | _letters,
                         max_size=8).map(
    lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"')
_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_idn_labels = st.sampled_from(["exämple", "例子", "广告", "пример", "bücher", "ñ"])
_domains = (
    st.lists(_labels | _idn_labels, min_size=1, max_size=3).map(".".join)
    | st.sampled_from(["[192.0.2.7]", "[IPv6:2001:db8::1]", "localhost"])
)
addr_specs = st.builds("{}@{}".format, _dot_atoms | _quoted_locals, _domains)

#: Characters that break naive address and header handling.
TRICKY = '\r\n\0\t <>,"\\@:;()[].\x7f\x1b\u2028\x85é例'
_tricky_text = st.text(st.sampled_from(TRICKY) | st.characters(max_codepoint=0x7E)
                       | _letters, max_size=12)
#: Display names: any printable text (format_address quotes what needs it).
_printable_names = st.text(
    st.characters(min_codepoint=32, max_codepoint=0x2FF, categories=(
        "L", "M", "N", "P", "S", "Zs")) | st.sampled_from('"\\<>,@()'),
    max_size=12)
_names = _printable_names | st.text(st.sampled_from(TRICKY), max_size=6)

valid_addresses = st.one_of(
    addr_specs,
    st.builds(format_address, _printable_names, addr_specs),
    addr_specs.map("<{}>".format),
    addr_specs.map(" \t{} ".format),
    st.builds('"{}" <{}>'.format, st.text(st.sampled_from("ab ,.@<>:;é例\t"),
                                          max_size=8), addr_specs),
    # a local recipient, which the local MTA qualifies
    _dot_atoms,
    st.builds(format_address, _printable_names, _dot_atoms),
    # folded, as in a header value: a line break before a space is removed
    st.builds(lambda address, sep: address.replace(" ", sep + " ", 1),
              st.builds(format_address, _printable_names.filter(bool), addr_specs),
              st.sampled_from(["\n", "\r\n"])),
)
valid_senders = st.sampled_from(["", "<>", " <> "]) | valid_addresses


def _hostile_forms(name: str, spec: str) -> st.SearchStrategy[str]:
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return st.sampled_from([
        f"{name} <{spec}>",
        f'"{name}" <{spec}>',
        f"{spec} ({name})",
        f"undisclosed: {spec};",
        f"{spec}\r\nBcc: {EVIL}",
        f"{spec}\nBcc: {EVIL}",
        f"{spec}\rBcc: {EVIL}",
        f"{spec}\0{EVIL}",
        f"{spec}>, <{EVIL}",
        f"{spec}>\r\nRCPT TO:<{EVIL}",
        f"{spec}, {EVIL}",
        f"{spec};{EVIL}",
        f"{quoted} <{spec}>, {EVIL}",
        f"{spec} <{EVIL}>",
        f"<{spec}> <{EVIL}>",
        f"<{spec}>{EVIL}",
        f'"{spec}>, <{EVIL}" <{spec}>',
        f'"{name}<{EVIL}>" <{spec}>',
        f"{quoted} <{spec}",
        f"{quoted} {spec}>",
        f'"{spec}',
        f"{spec}\n<{EVIL}>",
        f"{name}\r <{spec}>",
        f"{spec.rpartition('@')[0]}@=?utf-8?q?evil.example?=",
        f'"{spec.rpartition("@")[0]}"',
    ])


#: Anything, and injection attempts around valid addr-specs.
hostile_addresses = st.one_of(
    st.builds(_hostile_forms, _names, addr_specs).flatmap(lambda s: s),
    _tricky_text,
    st.builds("{}@{}".format, _tricky_text, _domains),
    st.builds("{}@{}".format, _dot_atoms, _tricky_text),
)
valid_recipients = st.lists(valid_addresses, min_size=1, max_size=4)
hostile_recipients = st.one_of(
    st.builds(lambda good, bad, i: [*good[:i], bad, *good[i:]],
              st.lists(valid_addresses, max_size=3), hostile_addresses,
              st.integers(0, 3)),
    st.lists(hostile_addresses, min_size=1, max_size=3),
    st.sampled_from([[], "a@example.org", b"a@example.org", None,
                     [b"a@example.org"], [None]]),
)

_field_names = st.from_regex(r"[!-9;-~]{1,12}", fullmatch=True).filter(
    lambda name: name.lower() != "message-id") | st.sampled_from(
    ["Subject", "To", "Bcc", "X-Zope-To", "X-Zope-From", ".dot", "From"])
_valid_values = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=0x30FF,
                          exclude_categories=("Cs", "Cc")), max_size=20),
    st.sampled_from(["", "\t", f" <{EVIL}>", "x\n continued", "x\n\tcontinued",
                     "Grüße ☃", "a\0b"]),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=900,
            max_size=980),
)
_hostile_values = st.one_of(
    _tricky_text,
    st.sampled_from([f"x\r\nBcc: {EVIL}", f"x\nBcc: {EVIL}", f"x\rBcc: {EVIL}",
                     "x\r continued", "\r\n", "x\n\nbody"]),
)
#: Values that the email package serializes raw, with their line breaks:
#: compat32 with a lone surrogate, or anything split by str.splitlines()
#: (set_raw(), and policy.default rejoins the lines).
_injected_values = st.sampled_from([
    f"report\udcff\nBcc: {EVIL}", f"x\udcff\r\nBcc: {EVIL}",
    f"x\udcff\rBcc: {EVIL}", "x\udcff\n\nbody", "x\udcff\n continued",
    f"x\u2028Bcc: {EVIL}", f"x\x85Bcc: {EVIL}", f"x\x0cBcc: {EVIL}",
    f"x\nBcc: {EVIL}", "x\n continued",
])
_message_ids = st.sampled_from(["<fixed.1@example.org>", " <folded@x.example>",
                                "\n <folded@x.example>", "<a@b> <c@d>",
                                "no-brackets@x", "<>", "<a b@c>"])
_line_seps = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def _bodies(draw, overlong: bool = False) -> str:
    """Bodies with lines of up to 998 octets (as UTF-8), or longer ones
    with *overlong*, and any line ends."""
    lines = draw(st.lists(
        st.one_of(
            _tricky_text,
            st.sampled_from([".", "..", ".\r", "From x", "\0", "\r.\r", "\n.\n",
                             "\r\n.\r\n", "\r\n.", "-- "]),
            st.text(st.characters(min_codepoint=32, max_codepoint=126),
                    min_size=990, max_size=3000 if overlong else MAX_LINE),
            st.text(min_size=1, max_size=40),
        ),
        max_size=6,
    ))
    return "".join(line + draw(_line_seps) for line in lines) + draw(
        st.sampled_from(["", "no newline at the end", "."]))


@st.composite
def raw_messages(draw, valid: bool) -> bytes | str:
    """Messages as text or bytes; *valid* ones have a header section of
    header fields and a blank line, and encode."""
    values = _valid_values if valid else _valid_values | _hostile_values
    headers = draw(st.lists(st.tuples(_field_names, values), max_size=5))
    sep = draw(st.sampled_from(["\n", "\r\n"]))
    if draw(st.booleans()):
        headers.insert(draw(st.integers(0, len(headers))),
                       ("Message-Id", "<fixed.1@example.org>" if valid
                        else draw(_message_ids)))
    if not valid:
        bad_name = st.sampled_from(["From ", "Bad Name", "", " X", "é", "Message-Id"])
        if draw(st.booleans()):
            headers.append((draw(bad_name), draw(values)))
    seps = [sep if valid else draw(st.sampled_from([sep, sep, "\n", "\r\n"]))
            for _header in headers]
    head = "".join(f"{n}:{v.replace(chr(10), s)}{s}"
                   for (n, v), s in zip(headers, seps, strict=True))
    blank = sep if valid else draw(st.sampled_from([sep, "", "\r", sep + "\r"]))
    text = head + blank + draw(_bodies(overlong=not valid))
    encoding = draw(st.sampled_from(["utf-8", "latin-1", "str"]
                                    + ([] if valid else ["surrogate"])))
    if encoding == "str":
        return text
    if encoding == "surrogate":  # a str that cannot be encoded
        return text + "\udcff"
    return text.encode(encoding, "replace") + draw(st.binary(max_size=8))


class _Shown:
    def __repr__(self) -> str:
        try:
            return f"<{type(self).__name__} {serialise(self)!r}>"
        except Exception as exc:
            return f"<{type(self).__name__} not serialisable: {exc!r}>"


class ShownMessage(_Shown, email.message.Message):
    """A legacy Message that hypothesis can show."""


class ShownEmailMessage(_Shown, email.message.EmailMessage):
    """An EmailMessage that hypothesis can show."""


@st.composite
def message_objects(draw, valid: bool) -> email.message.Message:
    """:class:`email.message.Message` objects, modern and legacy; a valid
    one has header values without line ends and a charset for its text."""
    values = _valid_values.filter(lambda v: len(v.splitlines()) < 2)
    if not valid:
        values |= _hostile_values | _injected_values
    headers = draw(st.lists(st.tuples(_field_names, values), max_size=4))
    body = draw(_bodies())
    if draw(st.booleans()):
        message = ShownEmailMessage(policy=draw(st.sampled_from(
            [email.policy.default, email.policy.SMTP])))
        raw = not valid and draw(st.booleans())  # non-ASCII would not encode
        for name, value in headers:
            if raw:  # stored as it is, folded when serialized
                message.set_raw(name, value)
                continue
            with contextlib.suppress(Exception):  # refused by the email package
                message[name] = value
        try:
            message.set_content(body)
        except Exception:
            message.set_content("fallback")
        return message
    message = ShownMessage()
    for name, value in headers:
        message[name] = value
    charsets = ["utf-8"] if valid else [None, "utf-8"]
    message.set_payload(body, draw(st.sampled_from(charsets)))
    return message


valid_messages = raw_messages(valid=True) | message_objects(valid=True)
hostile_messages = raw_messages(valid=False) | message_objects(valid=False)


@st.composite
def cases(draw) -> tuple[str, list[str], bytes | str | email.message.Message, bool]:
    """``(fromaddr, toaddrs, message, valid)``: half of the cases are all
    valid; in the others each part may be hostile."""
    if draw(st.booleans()):
        return (draw(valid_senders), draw(valid_recipients), draw(valid_messages),
                True)
    return (
        draw(valid_senders | valid_senders | hostile_addresses),
        draw(valid_recipients | hostile_recipients),
        draw(valid_messages | hostile_messages),
        False,
    )


# -- the properties -------------------------------------------------------------

_settings = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)


@_settings
@given(case=cases())
@example(case=("a@example.org", [f"b@example.org\r\nBcc: {EVIL}"],
               b"Subject: x\n\nbody", False))
@example(case=(f"a@example.org>, <{EVIL}", ["b@example.org"],
               b"Subject: x\n\nbody", False))
@example(case=("a@example.org", [f'"b@example.org>, <{EVIL}" <b@x.org>'],
               b"Subject: x\n\nbody", True))
@example(case=("", ["a@example.org"], f"Subject:x\rBcc: {EVIL}\n\n".encode(), False))
@example(case=('"\x1f"<a@example.org>', ['"\x7f" <b@example.org>'], b"\n", False))
def test_queued_send(case):
    with fresh_harness() as harness:
        harness.check(*case)


@_settings
@given(case=cases())
@example(case=("a@example.org", [f"b@example.org, {EVIL}"], "Subject: x\n\nbody",
               False))
@example(case=('"\x1f"<a@example.org>', ["b@example.org"], b"\n", False))
@example(case=("", [" \t0@exämple "], b"\n", True))
def test_direct_send(case):
    with fresh_harness() as harness:
        harness.check(*case, direct=True)


@pytest.mark.parametrize(("direct", "line"), [(False, MAX_LINE), (True, 200)])
def test_huge_messages(direct, line):
    """A 2 MB message arrives intact.  Long lines keep it quick: the test
    server handles each line in Python, slowly under coverage.  A harness
    of its own and a generous timeout: a loaded machine is not a failure."""
    chunk = (b"x" * (line - 1) + b".\n")
    body = chunk * (2_000_000 // len(chunk))
    with fresh_harness(timeout=300) as harness:
        outcome = harness.check("a@example.org", ["b@example.org"],
                                b"Subject: big\n\n" + body, True, direct=direct)
    assert outcome == "delivered"


# -- the definitions above, and the known limits ---------------------------------


def test_normalise():
    assert normalise(b"a\rb\nc\r\nd") == b"a\r\nb\r\nc\r\nd\r\n"
    assert normalise(b"a\r\n") == b"a\r\n"
    assert normalise(b"a\r\r\n") == b"a\r\n\r\n"


def test_expected_data():
    assert expected_data(b"S: x\n\nb", "i@d") == (
        b"Message-Id: <i@d>\r\nS: x\r\n\r\nb\r\n")
    assert expected_data(b"message-id: <j@d>\n\n", "i@d") == (
        b"message-id: <j@d>\r\n\r\n")
    assert header_lines(b"no blank line\n") is None


def test_reason_class():
    error = ValueError("invalid address 'a\\r2': it contains '\\r' (CR)")
    assert reason_class(error, ("a\r2",)) == (
        "ValueError: invalid address …: it contains '\\r'")


def test_check_reports_a_violation(harness):
    """The harness can fail: a mailer that adds a recipient is caught."""
    class Injecting(SMTPMailer):
        def send(self, fromaddr, toaddrs, message):
            return super().send(fromaddr, [*toaddrs, EVIL], message)

    mailer, harness.direct.mailer = harness.direct.mailer, Injecting(
        "127.0.0.1", harness.server.port, timeout=10)
    try:
        with pytest.raises(AssertionError):
            harness.check("a@example.org", ["b@example.org"], b"S: x\n\nb", direct=True)
    finally:
        harness.direct.mailer.close()
        harness.direct.mailer = mailer


@pytest.mark.parametrize("direct", [False, True])
def test_overlong_lines_fail_whole(harness, direct):
    """A line over 998 octets is not refused by ``send()`` (zope.sendmail
    passes such messages on too); a strict server refuses the whole message,
    which the queue moves to the failed area with the server's reply."""
    message = b"Subject: x\n\n" + b"y" * 2000 + b"\n"
    assert harness.check("a@example.org", ["b@example.org"], message,
                         direct=direct) == "too long"
    if direct:
        assert "Line too long" in harness.errors[0].errorMessage
    else:
        assert [e.permanent for e in harness.errors] == [True]


# -- regressions found by these properties ------------------------------------


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("recipient", [
    '"a<b>c"@example.org',  # the mailer refused '<' and '>' in quoted local parts
    'Jane <"x>, <y"@example.org>',
    " \tb@example.org ",  # the mailer took TAB for a control character
    "Jane\t<b@example.org>",
])
def test_addresses_send_refused_to_deliver(harness, direct, recipient):
    assert harness.check("a@example.org", [recipient], b"S: x\n\nb",
                         direct=direct) == "delivered"


@pytest.mark.parametrize("sender", [
    f"a@example.org>, <{EVIL}",
    f"a@example.org, {EVIL}",
    "postmaster@",
    '"postmaster"',
    "a@example.org (comment)",
])
def test_sender_must_be_an_address(harness, sender):
    """send() accepted any sender without CR, LF and NUL; the mailer then
    refused it when sending (a failed message instead of an error)."""
    with pytest.raises(ValueError, match="invalid sender"):
        harness.queued.send(sender, ["b@example.org"], b"S: x\n\nb")


def _legacy_message_with_header(value: str) -> email.message.Message:
    message = ShownMessage()
    message["Subject"] = value
    message.set_payload("body")
    return message


def _raw_email_message_with_header(value: str) -> email.message.EmailMessage:
    message = ShownEmailMessage(policy=email.policy.default)
    message.set_raw("Subject", value)
    message.set_content("body")
    return message


@pytest.mark.parametrize("message", [
    # a CR inside a header line: send() saw one header, the wire two
    f"Subject: x\rBcc: {EVIL}\n\nbody".encode(),
    f"Subject: x\r\n continued\rBcc: {EVIL}\r\n\r\nbody",
    # the email package's own error (HeaderParseError) escaped send()
    _legacy_message_with_header(f"x\nBcc: {EVIL}"),
    # a lone surrogate: compat32 wrote the value raw, with its line break
    _legacy_message_with_header(f"report\udcff\nBcc: {EVIL}"),
    # set_raw(): policy.default joined the lines of the value with CRLF/LF
    _raw_email_message_with_header(f"x\u2028Bcc: {EVIL}"),
    # a bare LF among CRLF line ends
    f"To: a@example.org\r\nSubject: x\nBcc: {EVIL}\r\n\r\nbody",
], ids=["bytes", "str", "Message", "surrogate", "set_raw", "bare LF"])
def test_header_injection_refused_at_send(harness, message):
    outcome = harness.check("a@example.org", ["b@example.org"], message)
    assert outcome.startswith("rejected: ValueError"), outcome


@pytest.mark.parametrize("address", ['"\x1f" <b@example.org>',
                                     '"a\x7fb" <b@example.org>'])
def test_control_characters_in_quoted_display_names_refused(harness, address):
    """They were accepted, then refused by the mailer when sending."""
    with pytest.raises(ValueError, match="the display name contains"):
        harness.queued.send("a@example.org", [address], b"S: x\n\nb")
    with pytest.raises(ValueError, match="invalid sender"):
        harness.queued.send(address, ["b@example.org"], b"S: x\n\nb")
