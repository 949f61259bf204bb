"""mailoutbox send: queue a message through a real transaction."""
from __future__ import annotations

import email
import email.policy
import os

import pytest

from mailoutbox.cli import EXIT_OK
from mailoutbox.cli import EXIT_USAGE
from mailoutbox.cli.send import split_addresses
from mailoutbox.envelope import parse_queue_file
from mailoutbox.maildir import Maildir

from .test_cli import TTYBytes
from .test_cli import cli
from .test_cli import python_m
from .test_cli import write_ini

MESSAGE = (
    b"From: Jane <jane@example.org>\r\n"
    b"To: a@example.org, \"Doe, John\" <john@example.org>\r\n"
    b"Cc: c@example.org\r\n"
    b"Bcc: hidden@example.org,\r\n secret@example.org\r\n"
    b"Subject: Hi\r\n"
    b"\r\n"
    b"Body.\r\n"
)


def queued(path: str) -> list[tuple[str, tuple[str, ...], bytes]]:
    maildir = Maildir(path)
    files = []
    for queue_file in maildir:
        with open(queue_file, "rb") as f:
            files.append(parse_queue_file(f.read()))
    return files


def test_a_whole_message_with_the_envelope_from_its_headers(queue_path):
    result = cli("send", queue_path, stdin=MESSAGE)
    assert result.code == EXIT_OK, result.err
    message_id = result.out.strip()
    ((fromaddr, toaddrs, message),) = queued(queue_path)
    assert fromaddr == "jane@example.org"
    assert toaddrs == ("a@example.org", "john@example.org", "c@example.org",
                       "hidden@example.org", "secret@example.org")
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert parsed["Bcc"] is None
    assert parsed["Message-Id"] == f"<{message_id}>"
    assert b"secret" not in message
    assert message.endswith(b"Subject: Hi\r\n\r\nBody.\r\n")


def test_envelope_options_win_and_bcc_is_still_removed(queue_path):
    result = cli("send", queue_path, "--from", "bounces@example.org",
                 "--to", "x@example.org, y@example.org", "--to", "z@example.org",
                 stdin=MESSAGE)
    assert result.code == EXIT_OK, result.err
    ((fromaddr, toaddrs, message),) = queued(queue_path)
    assert fromaddr == "bounces@example.org"
    assert toaddrs == ("x@example.org", "y@example.org", "z@example.org")
    assert b"Bcc" not in message and b"secret" not in message
    assert message.endswith(MESSAGE.replace(
        b"Bcc: hidden@example.org,\r\n secret@example.org\r\n", b""))


def test_a_message_built_from_options(queue_path):
    result = cli("send", queue_path, "--from", "Shop <shop@example.org>",
                 "--to", "jane@example.org", "--subject", "Grüße",
                 "--body", "Hello there.")
    assert result.code == EXIT_OK, result.err
    ((fromaddr, toaddrs, message),) = queued(queue_path)
    assert (fromaddr, toaddrs) == ("Shop <shop@example.org>", ("jane@example.org",))
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert parsed["Subject"] == "Grüße"
    assert parsed["Date"] is not None
    assert parsed.get_content() == "Hello there.\r\n"


def test_the_body_from_stdin_and_a_note_on_a_terminal(queue_path):
    stdin = TTYBytes(b"Line one\nLine two\n")
    result = cli("send", queue_path, "--from", "a@example.org", "--to",
                 "b@example.org", "--subject", "S", stdin=stdin)
    assert result.code == EXIT_OK
    assert result.err == (
        "mailoutbox: reading the body from standard input; end it with Ctrl-D\n"
    )
    ((_f, _t, message),) = queued(queue_path)
    assert message.endswith(b"Line one\r\nLine two\r\n")


def test_sender_from_the_sender_header(queue_path):
    result = cli("send", queue_path,
                 stdin=b"Sender: s@example.org\nTo: t@example.org\n\nx\n")
    assert result.code == EXIT_OK
    assert queued(queue_path)[0][0] == "s@example.org"


@pytest.mark.parametrize(("argv", "stdin", "message"), [
    ([], b"", "no message on standard input"),
    ([], b"To: a@example.org\n\nbody\n",
     "cannot queue the message: no sender: the message has no Sender or From"),
    ([], b"To: a@example.org\n\nbody\n", "add one or give --from"),
    ([], b"From: a@example.org\n\nbody\n", "add one or give --to"),
    ([], b"From: a@example.org\n\nbody\n",
     "cannot queue the message: no recipient: the message has no address"),
    (["--subject", "s", "--to", "a@example.org"], b"",
     "to build a message, give --from and --to"),
    (["--to", "not an address"], MESSAGE,
     "cannot queue the message: invalid address 'not an address'"),
    (["--from", "a@example.org", "--to", "b@example.org", "--subject",
      "two\nlines", "--body", "x"], b"", "invalid header"),
])
def test_errors(queue_path, argv, stdin, message):
    result = cli("send", queue_path, *argv, stdin=stdin)
    assert result.code == EXIT_USAGE
    assert message in result.err
    assert result.err.count("\n") == 1
    assert result.out == ""
    # nothing was queued (the queue is created by the first commit)
    assert not os.path.exists(queue_path)


def test_send_with_the_queue_from_the_config_file(queue_path, tmp_path):
    ini = write_ini(tmp_path, f"[mailoutbox]\nqueue_path = {queue_path}\n")
    result = cli("send", "--config", ini, stdin=MESSAGE)
    assert result.code == EXIT_OK
    assert len(queued(queue_path)) == 1


def test_send_as_a_process_from_stdin(queue_path):
    done = python_m("send", queue_path, stdin=MESSAGE)
    assert done.returncode == EXIT_OK, done.stderr
    message_id = done.stdout.decode().strip()
    assert "@" in message_id and "<" not in message_id
    ((_f, toaddrs, message),) = queued(queue_path)
    assert len(toaddrs) == 5
    assert f"Message-Id: <{message_id}>".encode() in message


@pytest.mark.parametrize(("values", "expected"), [
    (["a@x.org"], ["a@x.org"]),
    ([" a@x.org, b@x.org ", "c@x.org"], ["a@x.org", "b@x.org", "c@x.org"]),
    (['"Doe, J" <j@x.org>, k@x.org'], ['"Doe, J" <j@x.org>', "k@x.org"]),
    (['"a\\",b" <j@x.org>'], ['"a\\",b" <j@x.org>']),
    (["<a,b@x.org>, c@x.org"], ["<a,b@x.org>", "c@x.org"]),
    (["a@x.org,"], ["a@x.org"]),
    ([""], [""]),
    (["a@x\r\nBcc: evil@x"], ["a@x\r\nBcc: evil@x"]),
])
def test_split_addresses(values, expected):
    assert split_addresses(values) == expected
