"""Checking addresses and preparing messages (mailoutbox.message)."""
from __future__ import annotations

import email.message
import email.policy
import re

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from mailoutbox import address as address_mod
from mailoutbox import message as mod
from mailoutbox.envelope import format_envelope
from mailoutbox.envelope import parse_queue_file
from mailoutbox.message import check_recipients
from mailoutbox.message import check_sender
from mailoutbox.message import format_address
from mailoutbox.message import make_msgid
from mailoutbox.message import parse_address
from mailoutbox.message import prepare_message


def test_all_names_exist():
    for name in mod.__all__:
        assert hasattr(mod, name), name


def test_address_names_are_reexported():
    for name in address_mod.__all__:
        assert getattr(mod, name) is getattr(address_mod, name), name


# -- addresses ---------------------------------------------------------------

VALID = [
    ("jane@example.org", ("", "jane@example.org")),
    ("  jane@example.org\t", ("", "jane@example.org")),
    ("<jane@example.org>", ("", "jane@example.org")),
    ("Jane Doe <jane@example.org>", ("Jane Doe", "jane@example.org")),
    ('"Doe, Jane" <jane@example.org>', ("Doe, Jane", "jane@example.org")),
    ('"Doe \\"JD\\" Jane" <jd@example.org>', ('Doe "JD" Jane', "jd@example.org")),
    ("J. R. Doe <jr@example.org>", ("J. R. Doe", "jr@example.org")),
    ("Jane   Doe   < jane@example.org >", ("Jane Doe", "jane@example.org")),
    ('Jane "  spaced  " Doe <j@example.org>', ("Jane   spaced   Doe", "j@example.org")),
    ('"john doe"@example.org', ("", '"john doe"@example.org')),
    ('"a\\"b@c"@example.org', ("", '"a\\"b@c"@example.org')),
    ("first.last+tag@sub.example.org", ("", "first.last+tag@sub.example.org")),
    ("!#$%&'*+-/=?^_`{|}~@example.org", ("", "!#$%&'*+-/=?^_`{|}~@example.org")),
    ("jane@localhost", ("", "jane@localhost")),
    ("jane@[192.0.2.1]", ("", "jane@[192.0.2.1]")),
    ("jane@[IPv6:2001:db8::1]", ("", "jane@[IPv6:2001:db8::1]")),
    ("jürgen@exämple.org", ("", "jürgen@exämple.org")),
    ("Jürgen Groß <jürgen@exämple.org>", ("Jürgen Groß", "jürgen@exämple.org")),
    ("用户@例子.广告", ("", "用户@例子.广告")),
    ("a@" + "b" * 63 + ".org", ("", "a@" + "b" * 63 + ".org")),
]


@pytest.mark.parametrize(("address", "expected"), VALID)
def test_parse_address_valid(address, expected):
    assert parse_address(address) == expected


INVALID = [
    ("", "it is empty"),
    ("   ", "it is empty"),
    ('"jane"', "no '@' follows the quoted local part"),
    ("jane.", "empty part"),
    ("ja(ne", "the local part contains '('"),
    ("jane@", "the domain (after '@') is empty"),
    ("@example.org", "the local part (before '@') is empty"),
    ("a..b@example.org", "empty part"),
    (".a@example.org", "empty part"),
    ("a.@example.org", "empty part"),
    ("a(b)@example.org", "the local part contains '('"),
    ("a@b@example.org", "the local part contains '@'"),
    ("jane doe@example.org", "space outside quotes"),
    ("jane@exa mple.org", "space outside quotes"),
    ("jane@example.org, bob@example.org", "more than one address"),
    ("Doe, Jane <jane@example.org>", "more than one address"),
    ("Jane <jane@example.org> <bob@example.org>", "more than one '<'"),
    ("jane@example.org>", "'>' without a '<'"),
    ("Jane <jane@example.org", "'>' is missing"),
    ("Jane <jane@example.org> (work)", "text follows"),
    ("Jane <jane@example.org>>", "'>' without a '<'"),
    ('"unclosed@example.org', "not closed"),
    ('"ends in backslash\\', "not closed"),
    ('"quoted"x@example.org', "no '@' follows the quoted local part"),
    ('"a\x01b"@example.org', "the local part contains '\\x01'"),
    ("Jane (work) <jane@example.org>", "display name contains '('"),
    ("Jane: <jane@example.org>", "display name contains ':'"),
    ("jane@example.org <jane@example.org>", "display name contains '@'"),
    ("Ja\x7fne <jane@example.org>", "display name contains '\\x7f'"),
    ("jane@-example.org", "not a host name label"),
    ("jane@example-.org", "not a host name label"),
    ("jane@exa_mple.org", "not a host name label"),
    ("jane@example..org", "not a host name label"),
    ("jane@example.org.", "not a host name label"),
    ("jane@" + "b" * 64 + ".org", "not a host name label"),
    ("jane@" + ".".join(["a" * 60] * 5), "longer than 253"),
    ("jane@[]", "domain literal is malformed"),
    ("jane@[192.0.2.1", "domain literal is malformed"),
    ("<jane@[1 2]>", "domain literal is malformed"),
    ("jane@exä..org", "not a valid IDNA name"),
    ("jane@exa\u00a0mple.org", "not a host name label"),
    ("jane@" + "ä" * 64 + ".org", "not a valid IDNA name"),
]


@pytest.mark.parametrize(("address", "reason"), INVALID)
def test_parse_address_invalid(address, reason):
    with pytest.raises(ValueError) as info:
        parse_address(address)
    message = str(info.value)
    assert message.startswith(f"invalid address {address!r}: ")
    assert reason in message


@pytest.mark.parametrize("char", ["\r", "\n", "\0"])
@pytest.mark.parametrize("where", ["jane@exa{}mple.org", "Ja{}ne <jane@example.org>",
                                   '"ja{}ne"@example.org', "jane@example.org{}"])
def test_parse_address_refuses_line_breaks_and_nul(char, where):
    address = where.format(char)
    with pytest.raises(ValueError, match=r"CR, LF and NUL are not allowed") as info:
        parse_address(address)
    assert repr(address) in str(info.value)


@pytest.mark.parametrize("address", [b"jane@example.org", None, 42, ("jane@x",)])
def test_parse_address_needs_str(address):
    with pytest.raises(TypeError, match="an address must be a str") as info:
        parse_address(address)
    assert repr(address) in str(info.value)


def test_format_address():
    assert format_address("", "jane@example.org") == "jane@example.org"
    assert format_address("Jane Doe", "j@example.org") == "Jane Doe <j@example.org>"
    assert format_address("Doe, Jane", "j@x.org") == '"Doe, Jane" <j@x.org>'
    assert format_address('a "b" \\c', "j@x.org") == '"a \\"b\\" \\\\c" <j@x.org>'
    assert format_address(" lead", "j@x.org") == '" lead" <j@x.org>'
    assert format_address("a  b", "j@x.org") == '"a  b" <j@x.org>'
    assert format_address("a\tb", "j@x.org") == '"a\tb" <j@x.org>'
    assert format_address("Jürgen", "j@x.org") == "Jürgen <j@x.org>"


def test_check_recipients():
    assert check_recipients(["a@example.org"]) == ("a@example.org",)
    assert check_recipients(("a@x.org", '"B, C" <b@x.org>')) == (
        "a@x.org", '"B, C" <b@x.org>')
    assert check_recipients(a for a in ["a@x.org"]) == ("a@x.org",)


@pytest.mark.parametrize("toaddrs", ["jane@example.org", b"jane@example.org",
                                     bytearray(b"jane@example.org")])
def test_check_recipients_refuses_a_single_string(toaddrs):
    with pytest.raises(TypeError, match="not a single") as info:
        check_recipients(toaddrs)
    assert repr(toaddrs) in str(info.value)


def test_check_recipients_refuses_non_iterables_and_empty():
    with pytest.raises(TypeError, match="sequence of addresses, not 42"):
        check_recipients(42)
    with pytest.raises(ValueError, match="toaddrs is empty"):
        check_recipients([])


def test_check_recipients_names_the_bad_one():
    with pytest.raises(ValueError, match=r"invalid address 'bob@': the domain"):
        check_recipients(["jane@example.org", "bob@"])
    with pytest.raises(TypeError, match=r"invalid address b'bob@x.org'"):
        check_recipients(["jane@example.org", b"bob@x.org"])


def test_check_sender():
    assert check_sender("") == ""
    assert check_sender("Jane <jane@example.org>") == "Jane <jane@example.org>"
    for bad in ("a@x.org\r\nRCPT TO:<evil@x.org>", "a@x.org\n", "a\0@x.org"):
        with pytest.raises(ValueError, match="invalid sender") as info:
            check_sender(bad)
        assert repr(bad) in str(info.value)
    with pytest.raises(TypeError, match="fromaddr must be a str"):
        check_sender(b"a@x.org")


# -- property tests ------------------------------------------------------------

_atom_chars = st.sampled_from(
    "abcxyzABCXYZ0189!#$%&'*+-/=?^_`{|}~" + "äßéü用户"
)
_atoms = st.text(_atom_chars, min_size=1, max_size=8)
_dot_atoms = st.lists(_atoms, min_size=1, max_size=3).map(".".join)
_printable = st.characters(min_codepoint=32, max_codepoint=0x2ff,
                           exclude_categories=("Cc", "Cf", "Zl", "Zp", "Zs", "Cs"))


def _quote(text):
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


_quoted_local = st.text(_printable | st.just(" "), max_size=8).map(_quote)
_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_domains = st.lists(_labels, min_size=1, max_size=3).map(".".join) | st.sampled_from(
    ["exämple.org", "例子.广告", "[192.0.2.7]"])
_addr_specs = st.builds(lambda local, domain: f"{local}@{domain}",
                        _dot_atoms | _quoted_local, _domains)
_names = st.text(
    st.characters(min_codepoint=32, max_codepoint=0x2ff,
                  exclude_categories=("Cc", "Cf", "Zl", "Zp", "Cs")),
    max_size=12,
).filter(lambda n: n.isprintable() and "  " not in n and n.strip(" ") == n)


@settings(max_examples=300, deadline=None)
@given(name=_names, spec=_addr_specs)
def test_property_format_then_parse_round_trips(name, spec):
    assert parse_address(format_address(name, spec)) == (name, spec)


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(_names, _addr_specs), min_size=1, max_size=4))
def test_property_envelope_round_trips(pairs):
    addresses = [format_address(n, s) for n, s in pairs]
    data = format_envelope("sender@example.org", addresses) + b"Subject: x\n\nbody"
    fromaddr, toaddrs, message = parse_queue_file(data)
    assert fromaddr == "sender@example.org"
    assert message == b"Subject: x\n\nbody"
    assert [parse_address(a)[1] for a in toaddrs] == [s for _n, s in pairs]
    assert [parse_address(a)[0] for a in toaddrs] == [n for n, _s in pairs]


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=30))
def test_property_parse_address_only_raises_value_error(text):
    try:
        name, spec = parse_address(text)
    except ValueError as exc:
        assert str(exc).startswith(f"invalid address {text!r}: ")
    else:
        assert not any(c in text for c in "\r\n\0")
        assert "@" in spec or spec[:1] not in ('"', "")
        assert parse_address(format_address(name, spec)) == (name, spec)


_addressish = st.text(st.sampled_from("aZ09.-_+@<>\" ,!~é"), max_size=24)


@settings(max_examples=500, deadline=None)
@given(text=_addressish | _addr_specs)
def test_property_fast_path_agrees_with_the_parser(text):
    """Simple addresses skip the parser; the parser accepts them as they are."""
    if address_mod._SIMPLE.match(text) and len(text) - text.index("@") <= 254:
        assert address_mod._split(text) == ("", text)
    try:
        expected = address_mod._split(text)
    except ValueError:
        expected = None
    try:
        assert parse_address(text) == expected
    except ValueError:
        assert expected is None


def test_long_simple_domain_goes_through_the_parser():
    domain = ".".join(["a" * 63] * 4)  # 255 characters
    assert address_mod._SIMPLE.match("j@" + domain)
    with pytest.raises(ValueError, match="longer than 253"):
        parse_address("j@" + domain)


# -- message ids ---------------------------------------------------------------

MSGID = re.compile(r"\d{14}\.\d{6}\.[0-9a-f]{16}\.\d+@[A-Za-z0-9.-]+\Z")


def test_make_msgid_form_and_uniqueness():
    ids = {make_msgid() for _ in range(2000)}
    assert len(ids) == 2000
    for message_id in ids:
        assert MSGID.match(message_id), message_id


def test_message_id_domain_is_looked_up_once(monkeypatch):
    calls = []

    def fqdn():
        calls.append(1)
        return "Mail-01.exämple.org"

    monkeypatch.setattr(mod, "_getfqdn", fqdn)
    mod.message_id_domain.cache_clear()
    try:
        for _ in range(50):
            assert make_msgid().endswith("@Mail-01.xn--exmple-cua.org")
        assert len(calls) == 1
    finally:
        mod.message_id_domain.cache_clear()


@pytest.mark.parametrize(("fqdn", "domain"), [
    ("host_name.local", "hostname.local"),
    ("..", "localhost"),
    ("", "localhost"),
    ("bad..\u00e4", "bad"),
    ("a" * 70 + "\u00e4", "a" * 70),
    ("\u00e4.example", "xn--4ca.example"),
])
def test_message_id_domain_is_sanitised(monkeypatch, fqdn, domain):
    monkeypatch.setattr(mod, "_getfqdn", lambda: fqdn)
    mod.message_id_domain.cache_clear()
    try:
        assert mod.message_id_domain() == domain
    finally:
        mod.message_id_domain.cache_clear()


# -- preparing messages --------------------------------------------------------

def fixed_id():
    return "fixed.1@example.org"


def test_prepare_adds_message_id_first_lf():
    data, message_id = prepare_message(b"Subject: hi\n\nbody\n", fixed_id)
    assert message_id == "fixed.1@example.org"
    assert data == b"Message-Id: <fixed.1@example.org>\nSubject: hi\n\nbody\n"


def test_prepare_adds_message_id_first_crlf():
    data, _ = prepare_message(b"Subject: hi\r\n\r\nbody\r\n", fixed_id)
    assert data == b"Message-Id: <fixed.1@example.org>\r\nSubject: hi\r\n\r\nbody\r\n"


def test_prepare_generates_unique_ids_by_default():
    first, id1 = prepare_message(b"Subject: a\n\n")
    _second, id2 = prepare_message(b"Subject: a\n\n")
    assert id1 != id2
    assert MSGID.match(id1)
    assert first.startswith(b"Message-Id: <%s>\n" % id1.encode())


@pytest.mark.parametrize("header", [
    b"Message-Id: <kept.1@example.org>",
    b"MESSAGE-ID:<kept.1@example.org>",
    b"message-id:   <kept.1@example.org>   ",
    b"Message-ID:\n <kept.1@example.org>",
    b"Message-ID:\n\t<kept.1@example.org>",
])
def test_prepare_keeps_an_existing_message_id(header):
    raw = b"From: a@x.org\n" + header + b"\nSubject: s\n\nbody"
    data, message_id = prepare_message(raw, fixed_id)
    assert message_id == "kept.1@example.org"
    assert data == raw


@pytest.mark.parametrize("value", [
    b"kept@example.org", b"<kept@example.org", b"kept@example.org>",
    b"<kept>", b"<kept@>", b"<@example.org>", b"<a b@example.org>",
    b"<a@b@example.org>", b"<a@example.org> (comment)", b"", b"<a@\n exa.org>",
    b"<a\xc3\xa4@example.org>",
])
def test_prepare_refuses_a_malformed_message_id(value):
    raw = b"Subject: s\nMessage-Id: " + value + b"\n\nbody"
    with pytest.raises(ValueError, match="malformed Message-Id header"):
        prepare_message(raw, fixed_id)


def test_prepare_refuses_two_message_ids():
    raw = b"Message-Id: <a@x.org>\nMessage-Id: <b@x.org>\n\nbody"
    with pytest.raises(ValueError, match="2 Message-Id headers"):
        prepare_message(raw)


def test_prepare_continuation_of_other_headers_is_ignored():
    raw = b"Subject: a\n  long subject\nX-Other: y\n Message-Id: <no@x.org>\n\nb"
    data, message_id = prepare_message(raw, fixed_id)
    assert message_id == "fixed.1@example.org"
    assert data.endswith(raw)


@pytest.mark.parametrize("raw", [
    b"",
    b"Subject: no newline at all",
    b"Subject: headers only\n",
    b"Subject: headers only\r\nFrom: a@x.org\r\n",
])
def test_prepare_needs_a_blank_line(raw):
    with pytest.raises(ValueError, match="no blank line between its headers"):
        prepare_message(raw)


@pytest.mark.parametrize(("raw", "line"), [
    (b"Hello Bob,\n\nhow are you?", 1),
    (b"Subject: x\nbody text\n\nmore", 2),
    (b"From jane@example.org Mon Jan  1 00:00:00 2024\nSubject: x\n\n", 1),
    (b" continued\nSubject: x\n\n", 1),
    (b": empty name\n\n", 1),
    (b"Subject: x\nSome Header: y\n\n", 2),
])
def test_prepare_needs_header_fields(raw, line):
    with pytest.raises(ValueError, match=f"line {line} of the message is not a header"):
        prepare_message(raw)


@pytest.mark.parametrize("raw", [
    b"Subject: headers only\n\n",
    b"Subject: empty body\r\n\r\n",
    b"\nbody without headers",
    b"\r\n",
])
def test_prepare_accepts_headers_only_and_empty_bodies(raw):
    data, message_id = prepare_message(raw, fixed_id)
    assert data.endswith(raw)
    assert message_id == "fixed.1@example.org"


def test_prepare_str_is_utf8():
    data, _ = prepare_message("Subject: Grüße\n\nKöln ✓\n", fixed_id)
    expected = "Message-Id: <fixed.1@example.org>\nSubject: Grüße\n\nKöln ✓\n"
    assert data == expected.encode()


def test_prepare_str_that_cannot_be_utf8():
    with pytest.raises(ValueError, match="cannot be encoded as UTF-8"):
        prepare_message("Subject: x\n\n\udcff", fixed_id)


def test_prepare_bytearray():
    data, _ = prepare_message(bytearray(b"Subject: x\n\n"), fixed_id)
    assert isinstance(data, bytes)


@pytest.mark.parametrize("value", [None, 42, ["Subject: x\n\n"], memoryview(b"x")])
def test_prepare_refuses_other_types(value):
    with pytest.raises(TypeError, match="message must be bytes, str or an email"):
        prepare_message(value)


def test_prepare_email_message_keeps_its_policy_and_non_ascii():
    msg = email.message.EmailMessage()
    msg["From"] = "Jürgen <j@example.org>"
    msg["To"] = '"Doe, Jane" <jane@example.org>'
    msg["Subject"] = "Grüße aus Köln " * 8
    msg.set_content("Grüße\nÜberall ✓\n")
    expected = msg.as_bytes(policy=msg.policy.clone(max_line_length=0))
    data, _ = prepare_message(msg, fixed_id)
    assert data == b"Message-Id: <fixed.1@example.org>\n" + expected
    assert "Message-Id" not in msg  # the caller's object is left alone
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["Subject"] == "Grüße aus Köln " * 8
    assert parsed.get_content() == "Grüße\nÜberall ✓\n"
    assert parsed["Message-Id"] == "<fixed.1@example.org>"


def test_prepare_email_message_with_smtp_policy_uses_crlf():
    msg = email.message.EmailMessage(policy=email.policy.SMTP)
    msg["Subject"] = "x"
    msg["Message-Id"] = "<own.1@example.org>"
    msg.set_content("body")
    data, message_id = prepare_message(msg, fixed_id)
    assert message_id == "own.1@example.org"
    assert data == msg.as_bytes()
    assert b"\r\n\r\n" in data


@pytest.mark.parametrize("policy", [email.policy.compat32, email.policy.default])
def test_prepare_parsed_message_keeps_long_headers(policy):
    raw = (b"Subject: " + b"word " * 30 + b"\nX-Long: " + b"x" * 120
           + b"\nX-Folded: a\n  b\n\nbody\n")
    msg = email.message_from_bytes(raw, policy=policy)
    data, _ = prepare_message(msg, fixed_id)
    assert data == b"Message-Id: <fixed.1@example.org>\n" + raw


def test_prepare_email_message_parsed_from_8bit_bytes():
    raw = "Subject: Grüße\nContent-Type: text/plain; charset=utf-8\n\nKöln\n".encode()
    msg = email.message_from_bytes(raw)
    data, _ = prepare_message(msg, fixed_id)
    assert data == b"Message-Id: <fixed.1@example.org>\n" + raw


def test_prepare_email_message_that_cannot_be_serialized():
    msg = email.message.Message()
    msg["Subject"] = "x"
    msg.set_payload("Grüße")  # no charset
    with pytest.raises(ValueError, match="cannot be serialized"):
        prepare_message(msg, fixed_id)


_header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,10}", fullmatch=True).filter(
    lambda n: n.lower() != "message-id")
_header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126),
                         max_size=20)


@settings(max_examples=200, deadline=None)
@given(
    headers=st.lists(st.tuples(_header_names, _header_values), max_size=5),
    body=st.binary(max_size=50),
    crlf=st.booleans(),
    message_id=st.one_of(st.none(), st.from_regex(r"[a-z0-9.]{1,10}@[a-z.]{1,10}",
                                                  fullmatch=True)),
)
def test_property_prepare(headers, body, crlf, message_id):
    sep = b"\r\n" if crlf else b"\n"
    lines = [f"{n}:{v}".encode() for n, v in headers]
    if message_id:
        lines.insert(len(lines) // 2, b"Message-Id: <%s>" % message_id.encode())
    raw = b"".join(line + sep for line in lines) + sep + body
    data, got = prepare_message(raw, fixed_id)
    if message_id:
        assert (data, got) == (raw, message_id)
    else:
        assert got == "fixed.1@example.org"
        assert data == b"Message-Id: <fixed.1@example.org>" + sep + raw
