"""A relay that is down is logged as one line per pass, not one per message.

Through the real command (``python -m mailoutbox run`` in a subprocess),
against a closed port and Postfix's smtp-sink answering 421; the log lines
on standard error are counted.
"""
from __future__ import annotations

import logging
import re
import socket

import pytest

from mailoutbox._deferrals import Deferrals
from mailoutbox.cli.errors import EXIT_NOT_SENT
from mailoutbox.maildir import Maildir

from .test_cli import add_message
from .test_cli import cli
from .test_cli import python_m
from .test_cli import write_ini

MANY = 200
LOG_LINE = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ", re.M)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fill(path: str, count: int, prefix: str = "m",
         to: tuple[str, ...] = ("jane@example.org",)) -> list[str]:
    maildir = Maildir(path, create=True)
    ids = [f"{prefix}{number}@example.org" for number in range(count)]
    for message_id in ids:
        add_message(maildir, message_id=message_id, to=to)
    return ids


def log_lines(stderr: bytes) -> list[tuple[str, str]]:
    """(level, line) of each log line."""
    text = stderr.decode()
    return [(m.group(1), line) for line in text.splitlines()
            if (m := LOG_LINE.match(line))]


def test_a_closed_port_is_one_warning_for_200_messages(queue_path):
    fill(queue_path, MANY)
    port = closed_port()
    done = python_m("run", queue_path, "--hostname", "127.0.0.1", "--port",
                    str(port))
    assert done.returncode == EXIT_NOT_SENT, done.stderr
    assert done.stdout.startswith(b"sent 0, deferred 200, failed 0")
    lines = log_lines(done.stderr)
    assert len(lines) == 1, done.stderr.decode()[:2000]
    [(level, line)] = lines
    assert level == "WARNING"
    assert (f"mailoutbox.queue: deferred 200 message(s) through 127.0.0.1:{port},"
            f" e.g. m") in line
    assert f": connection refused by 127.0.0.1:{port};" in line
    assert "the first is tried again in 60 s" in line


@pytest.mark.smtpsink
def test_a_421_for_everyone_is_one_warning_and_one_info_line_per_message(
        queue_path, smtp_sink):
    sink = smtp_sink("-Q", "CONNECT")
    ids = fill(queue_path, MANY, to=("a@example.org", "b@example.org"))
    argv = ["run", queue_path, "--hostname", "127.0.0.1", "--port",
            str(sink.port), "--retry-initial", "90"]
    done = python_m(*argv)
    assert done.returncode == EXIT_NOT_SENT, done.stderr
    lines = log_lines(done.stderr)
    assert [level for level, _line in lines] == ["WARNING"], done.stderr[:2000]
    assert f"deferred 200 message(s) through 127.0.0.1:{sink.port}" in lines[0][1]
    assert "421" in lines[0][1]

    # With -v, each message has its line at INFO (flushed: all are tried).
    done = python_m(*argv, "--flush", "-v")
    lines = log_lines(done.stderr)
    info = [line for level, line in lines if level == "INFO"]
    assert [level for level, _line in lines].count("WARNING") == 1
    assert len(info) == MANY
    for message_id in ids:
        [line] = [line for line in info if f"send {message_id} " in line]
        assert (f"could not send {message_id} (2 recipient(s)) through"
                f" 127.0.0.1:{sink.port} (attempt 2), will try again in 180 s:"
                ) in line
        assert "421" in line


def test_a_relay_is_named_in_its_line(tmp_path, smtp_server):
    queue = str(tmp_path / "queue")
    fill(queue, 2, prefix="main")
    for number in range(3):
        sent = cli("send", queue, "--relay", "crm", "--from", "a@example.org",
                   "--to", "b@example.org", "--subject", f"s{number}",
                   "--body", "b")
        assert sent.code == 0, sent.err
    port = closed_port()
    ini = write_ini(tmp_path, f"""\
        [mailoutbox]
        hostname = 127.0.0.1
        port = {smtp_server.port}
        queue_path = {queue}

        [mailoutbox:relay crm]
        hostname = 127.0.0.1
        port = {port}
        """)
    done = python_m("run", "--config", ini)
    assert done.returncode == EXIT_NOT_SENT, done.stderr
    assert done.stdout.startswith(b"sent 2, deferred 3, failed 0")
    [(level, line)] = log_lines(done.stderr)
    assert level == "WARNING"
    assert (f"deferred 3 message(s) via relay 'crm' through 127.0.0.1:{port}"
            in line)


def test_errors_of_one_message_keep_their_own_lines(queue_path, smtp_server):
    """A recipient refused for good, or for now: a line per message, with
    its Message-Id; no summary line for them."""
    maildir = Maildir(queue_path, create=True)
    add_message(maildir, message_id="gone@example.org", to=("gone@example.org",))
    add_message(maildir, message_id="grey@example.org", to=("grey@example.org",))
    add_message(maildir, message_id="ok@example.org")
    smtp_server.refuse("gone@example.org")
    smtp_server.greylist("grey@example.org")
    done = python_m("run", queue_path, "--hostname", "127.0.0.1", "--port",
                    str(smtp_server.port))
    assert done.stdout.startswith(b"sent 1, deferred 1, failed 1")
    lines = log_lines(done.stderr)
    assert len(lines) == 2, done.stderr
    levels = {"gone" in line: level for level, line in lines}
    assert levels == {True: "ERROR", False: "WARNING"}
    assert any("could not send grey@example.org (attempt 1)" in line
               for _level, line in lines)
    assert not any("deferred 1 message(s)" in line for _level, line in lines)


def test_a_configuration_problem_keeps_a_line_per_message(queue_path, smtp_server):
    fill(queue_path, 3)
    done = python_m("run", queue_path, "--hostname", "127.0.0.1", "--port",
                    str(smtp_server.port), "--force-tls")
    assert done.stdout.startswith(b"sent 0, deferred 3, failed 0")
    lines = log_lines(done.stderr)
    assert [level for level, _line in lines] == ["ERROR"] * 3
    for number in range(3):
        assert any(f"could not send m{number}@example.org: configuration problem"
                   f" with 127.0.0.1:{smtp_server.port}" in line
                   for _level, line in lines)


def test_the_summary_of_several_errors_counts_the_others(caplog):
    deferrals = Deferrals()
    assert deferrals.summary(None) is None
    deferrals.add("a@x", "h:25", "421 busy", 60)
    deferrals.add("b@x", "h:25", "421 busy", 30)
    deferrals.add("c@x", None, "timed out", 120)
    text, args = deferrals.summary("crm")
    logging.getLogger("mailoutbox.test").warning(text, *args)
    assert caplog.records[-1].getMessage() == (
        "deferred 3 message(s) via relay 'crm' through h:25, e.g. a@x: 421 busy"
        " (1 of them for other reasons); the first is tried again in 30 s (-v:"
        " one line per message)")
