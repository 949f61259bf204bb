"""The envelope lines of queue files (mailoutbox.envelope)."""
from __future__ import annotations

from email.utils import getaddresses as _getaddresses

import pytest
from hypothesis import given
from hypothesis import strategies as st
from zope.sendmail.queue import QueueProcessorThread

from mailoutbox import envelope
from mailoutbox.envelope import _plain_addresses
from mailoutbox.envelope import format_envelope
from mailoutbox.envelope import parse_queue_file
from mailoutbox.message import format_address as _format_address

MESSAGE = b"Subject: s\r\n\r\nbody\r\n"


def test_all_names_exist():
    for name in envelope.__all__:
        assert hasattr(envelope, name), name


def test_format_envelope():
    assert format_envelope("a@x.org", ["b@x.org", "c@x.org"]) == (
        b"X-Zope-From: a@x.org\nX-Zope-To: b@x.org, c@x.org\n"
    )


def test_format_envelope_quotes_display_names():
    lines = format_envelope(
        "Sender <a@x.org>",
        ['"Doe, Jane" <jane@x.org>', "Bob <bob@x.org>", "<carol@x.org>",
         "J. Doe <jd@x.org>"],
    )
    assert lines == (
        b"X-Zope-From: Sender <a@x.org>\n"
        b'X-Zope-To: "Doe, Jane" <jane@x.org>, Bob <bob@x.org>, carol@x.org,'
        b' "J. Doe" <jd@x.org>\n'
    )


def test_format_envelope_writes_utf8_as_is():
    lines = format_envelope("jürgen@exämple.org", ["Jürgen <jürgen@exämple.org>"])
    assert lines == (
        "X-Zope-From: jürgen@exämple.org\nX-Zope-To: Jürgen <jürgen@exämple.org>\n"
    ).encode()
    assert parse_queue_file(lines + MESSAGE) == (
        "jürgen@exämple.org", ("Jürgen <jürgen@exämple.org>",), MESSAGE)


def test_format_envelope_refuses_invalid_addresses():
    with pytest.raises(ValueError, match=r"invalid address 'Doe, Jane <j@x\.org>'"):
        format_envelope("a@x.org", ["Doe, Jane <j@x.org>"])


def test_round_trip_keeps_display_names_with_commas():
    toaddrs = ('"Doe, Jane" <jane@x.org>', '"Smith, Bob \\"B\\"" <bob@x.org>',
               "c@x.org")
    data = format_envelope("a@x.org", toaddrs) + MESSAGE
    assert parse_queue_file(data) == ("a@x.org", toaddrs, MESSAGE)


def test_zope_sendmail_reads_our_envelope():
    """zope.sendmail's processor splits the lines the same way."""
    toaddrs = ('"Doe, Jane" <jane@x.org>', "Bob <bob@x.org>", "c@x.org")
    data = format_envelope("a@x.org", toaddrs) + MESSAGE
    parsed = QueueProcessorThread()._parseMessage(data)
    assert parsed == ("a@x.org", toaddrs, MESSAGE)


def test_parse_queue_file_written_by_zope_sendmail():
    # zope.sendmail joins the recipients with ", " as they were given.
    data = (b"X-Zope-From: a@x.org\nX-Zope-To: b@x.org, Carol <c@x.org>\n" + MESSAGE)
    assert parse_queue_file(data) == ("a@x.org", ("b@x.org", "Carol <c@x.org>"),
                                      MESSAGE)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "too short"),
    (b"X-Zope-From: a@x.org\n", "too short"),
    (b"From: a@x.org\nX-Zope-To: b@x.org\n\n", "does not start with the envelope"),
    (b"X-Zope-From: a@x.org\nTo: b@x.org\n\n", "does not start with the envelope"),
    (b"X-Zope-From: a@x.org\nX-Zope-To: \n\n", "names no recipient"),
    (b"X-Zope-From: \xff\nX-Zope-To: b@x.org\n\n", "not UTF-8"),
])
def test_parse_queue_file_errors(data, reason):
    with pytest.raises(ValueError, match=reason):
        parse_queue_file(data)


# -- the fast path for bare addresses agrees with the full parser ------------

_atoms = st.text(
    alphabet="abcXYZ019!#$%&'*+/=?^_`{|}~.-", min_size=1, max_size=8
)
_plain = st.builds(lambda local, domain: f"{local}@{domain}", _atoms,
                   st.text(alphabet="abc019.-", min_size=1, max_size=8))


@given(st.lists(st.one_of(_plain, st.just(""), st.just(" ")), max_size=5))
def test_plain_addresses_match_the_full_parser(parts):
    line = ", ".join(parts)
    fast = _plain_addresses(line)
    full = tuple(_format_address(n, a) for n, a in _getaddresses([line]) if a)
    assert fast is not None
    assert fast == full


@pytest.mark.parametrize("line", [
    '"Doe, Jane" <jane@example.org>',
    "Jane <jane@example.org>",
    "jane@example.org (Jane)",
    "jöe@example.org",
    "a@x.org, <b@x.org>",
])
def test_plain_addresses_leave_the_rest_to_the_full_parser(line):
    assert _plain_addresses(line) is None
