"""status, list, show, retry and purge, on a queue in every state."""
from __future__ import annotations

import io
import json
import os
import time

import pytest

from mailoutbox.cli import EXIT_ERROR
from mailoutbox.cli import EXIT_NOT_FOUND
from mailoutbox.cli import EXIT_OK
from mailoutbox.cli import EXIT_USAGE
from mailoutbox.cli.console import Console
from mailoutbox.cli.repair import _retry_one
from mailoutbox.cli.view import QueueView
from mailoutbox.maildir import Maildir

from .test_cli import add_message
from .test_cli import cli
from .test_cli import write_ini

HOUR = 3600.0


class Queue:
    """A queue with one message in each state (and one overdue deferral)."""

    def __init__(self, path: str) -> None:
        self.maildir = Maildir(path, create=True)
        now = time.time()
        self.queued = add_message(self.maildir, "Queued", message_id="q@x")
        self.deferred = add_message(
            self.maildir, "Deferred", message_id="d@x",
            to=("a@example.org", "b@example.org"),
        )
        claim = self.maildir.claim(self.deferred)
        claim.defer(now + HOUR, {"attempts": 2, "code": 451,
                                 "error": "451 greylisted",
                                 "first_attempt": now - 60,
                                 "next_attempt": now + HOUR})
        self.overdue = add_message(self.maildir, "Overdue", message_id="o@x")
        self.maildir.claim(self.overdue).defer(now - 5, {"attempts": 1})
        self.sending = add_message(self.maildir, "Sending", message_id="s@x")
        self.claim = self.maildir.claim(self.sending)
        failed = add_message(self.maildir, "Failed", message_id="f@x")
        self.failed = self.maildir.claim(failed).fail(
            {"error": "550 5.1.1 no such user", "permanent": True, "code": 550,
             "time": now, "message_id": "f@x"}
        )

    @property
    def path(self) -> str:
        return self.maildir.path


@pytest.fixture
def queue(queue_path):
    return Queue(queue_path)


# -- status ---------------------------------------------------------------------


def test_status_json_counts_every_state(queue):
    result = cli("status", queue.path, "--json")
    assert result.code == EXIT_OK
    data = json.loads(result.out)
    assert set(data) == {
        "version", "queue", "time", "queued", "deferred", "sending", "failed",
        "oldest_age", "next_attempt", "oldest_failed_age", "scheduled",
        "next_scheduled",
    }
    assert data["version"] == 1
    assert data["queue"] == os.path.abspath(queue.path)
    assert (data["queued"], data["deferred"], data["sending"], data["failed"]) == (
        2, 1, 1, 1
    )
    assert abs(data["time"] - time.time()) < 60
    assert 0 <= data["oldest_age"] < 60
    assert 0 <= data["oldest_failed_age"] < 60
    assert data["next_attempt"] == pytest.approx(time.time() + HOUR, abs=60)
    assert (data["scheduled"], data["next_scheduled"]) == (0, None)


def test_status_text(queue):
    result = cli("status", queue.path)
    assert result.code == EXIT_OK
    lines = result.out.splitlines()
    assert lines[0] == f"queue     {os.path.abspath(queue.path)}"
    assert lines[1] == "queued    2"
    assert lines[2].startswith("deferred  1  (next attempt ")
    assert lines[2].endswith(", in 59m)") or lines[2].endswith(", in 1h 00m)")
    assert lines[3:5] == ["sending   1", "failed    1"]
    assert lines[5].startswith("oldest    ")


def test_status_of_an_empty_queue(queue_path):
    Maildir(queue_path, create=True)
    data = json.loads(cli("status", queue_path, "--json").out)
    assert data["oldest_age"] is data["next_attempt"] is None
    assert data["queued"] == 0
    text = cli("status", queue_path).out
    assert "oldest" not in text
    assert "deferred  0\n" in text


def test_status_takes_the_queue_from_the_config_file(queue, tmp_path):
    ini = write_ini(tmp_path, f"[app:zope-sendmail]\nqueue_path = {queue.path}\n")
    assert json.loads(cli("status", "--config", ini, "--json").out)["queued"] == 2


def test_status_of_something_that_is_not_a_queue(tmp_path):
    result = cli("status", str(tmp_path))
    assert result.code == EXIT_USAGE
    assert "is not a mail queue" in result.err


def test_the_age_of_a_message_without_a_timestamp_is_its_mtime(queue_path):
    maildir = Maildir(queue_path, create=True)
    entry = add_message(maildir)
    os.rename(entry.path, os.path.join(maildir.new, "oddname"))
    os.utime(os.path.join(maildir.new, "oddname"), (1000.0, 1000.0))
    (message,) = QueueView(queue_path).messages
    assert message.queued_at == 1000.0


# -- list ---------------------------------------------------------------------


def test_list_shows_the_waiting_messages_oldest_first(queue):
    result = cli("list", queue.path)
    assert result.code == EXIT_OK
    # The messages, each tried before with a line under it (not indented).
    lines = [line for line in result.out.splitlines() if not line[0].isspace()]
    assert [line.split()[0] for line in lines] == [
        queue.queued.name, queue.deferred.name, queue.overdue.name,
        queue.sending.name,
    ]
    assert lines[0].split()[1] == "queued"
    assert "a@example.org +1  'Deferred'" in lines[1]
    assert lines[2].split()[1] == "queued"  # overdue: due now
    assert lines[3].split()[1] == "sending"


@pytest.mark.parametrize(("option", "subjects"), [
    ("--failed", ["Failed"]),
    ("--deferred", ["Deferred"]),
    ("--all", ["Queued", "Deferred", "Overdue", "Sending", "Failed"]),
])
def test_list_one_state_or_all(queue, option, subjects):
    data = json.loads(cli("list", queue.path, option, "--json").out)
    assert [m["subject"] for m in data["messages"]] == subjects


def test_list_json_keys(queue):
    data = json.loads(cli("list", queue.path, "--deferred", "--json").out)
    assert set(data) == {"version", "queue", "time", "messages"}
    (message,) = data["messages"]
    assert message == {
        "id": queue.deferred.name,
        "state": "deferred",
        "queued_at": message["queued_at"],
        "age": message["age"],
        "next_attempt": pytest.approx(time.time() + HOUR, abs=60),
        "message_id": "d@x",
        "from": "app@example.org",
        "to": ["a@example.org", "b@example.org"],
        "subject": "Deferred",
        "problem": None,
        "attempts": 2,
        "error": "451 greylisted",
        "code": 451,
        "server": None,
        "not_before": None,
        "priority": 0,
    }


def test_list_empty(queue_path):
    Maildir(queue_path, create=True)
    assert cli("list", queue_path).out == (
        "no queued or deferred or scheduled or sending messages\n")
    assert cli("list", queue_path, "--failed").out == "no failed messages\n"


def test_list_escapes_control_characters(queue_path):
    maildir = Maildir(queue_path, create=True)
    entry = add_message(maildir, "evil\x1b[2J")
    with open(entry.path, "r+b") as f:
        data = f.read().replace(b"jane@", b"x\x1b]0;@", 1)
        f.seek(0)
        f.write(data)
    out = cli("list", queue_path).out
    assert "\x1b" not in out
    assert "\\x1b" in out


def test_list_and_show_odd_files(queue_path):
    maildir = Maildir(queue_path, create=True)
    with open(os.path.join(maildir.new, "1.broken"), "wb") as f:
        f.write(b"no envelope\nhere\n")
    os.symlink("/etc/passwd", os.path.join(maildir.new, "2.link"))
    out = cli("list", queue_path).out
    assert "1.broken  queued" in out
    assert "(queue file does not start with the envelope lines)" in out
    assert "2.link  queued" in out and "(not a regular file)" in out
    result = cli("show", queue_path, "2.link")
    assert result.code == EXIT_OK
    assert "problem:  not a regular file" in result.out
    assert "root:" not in result.out
    result = cli("show", queue_path, "2.link", "--raw")
    assert result.code == EXIT_ERROR
    assert "cannot show 2.link: not a regular file" in result.err


def test_reading_a_message_that_vanished_or_cannot_be_read(queue_path):
    from mailoutbox.cli.view import read_head
    from mailoutbox.maildir import Entry

    maildir = Maildir(queue_path, create=True)
    head = read_head(maildir, Entry(maildir.new, "gone"))
    assert head.problem == "gone (sent or removed meanwhile)"
    assert head.message_id is None and head.header("Subject") is None
    os.mkdir(os.path.join(maildir.new, "adir"))
    assert read_head(maildir, Entry(maildir.new, "adir")).problem == "Is a directory"


# -- show -----------------------------------------------------------------------


def test_show_a_deferred_message_by_name(queue):
    result = cli("show", queue.path, queue.deferred.name)
    assert result.code == EXIT_OK
    out = result.out
    assert f"id:       {queue.deferred.name}\n" in out
    assert "state:    deferred (next attempt " in out
    assert f"file:     {queue.deferred.path}\n" in out
    assert "from:     app@example.org\n" in out
    assert "to:       a@example.org, b@example.org\n" in out
    assert "retry state:\n  attempts: 2\n  code: 451\n  error: 451 greylisted\n" in out
    assert "  first_attempt: 20" in out  # a readable time, then the number
    assert "headers:\n  From: app@example.org\n" in out
    assert "  Message-Id: <d@x>\n" in out


@pytest.mark.parametrize("ident", ["f@x", "<f@x>", " <f@x> "])
def test_show_a_failed_message_by_message_id(queue, ident):
    result = cli("show", queue.path, ident)
    assert result.code == EXIT_OK
    assert "state:    failed\n" in result.out
    assert "failure:\n  code: 550\n  error: 550 5.1.1 no such user\n" in result.out


def test_show_a_message_being_sent(queue):
    out = cli("show", queue.path, "s@x").out
    assert "state:    sending (claimed by a processor)\n" in out
    assert "retry state" not in out


def test_show_raw_prints_the_message_itself(queue):
    result = cli("show", queue.path, "q@x", "--raw")
    assert result.code == EXIT_OK
    assert result.out == (
        "From: app@example.org\nTo: jane@example.org\nSubject: Queued\n"
        "Message-Id: <q@x>\n\nThe body.\n"
    )


def test_show_raw_writes_bytes_to_a_binary_stdout(queue, tmp_path):
    from .test_cli import python_m

    done = python_m("show", queue.path, "q@x", "--raw")
    assert done.returncode == EXIT_OK
    assert done.stdout.startswith(b"From: app@example.org\nTo: jane@example.org\n")


def test_show_unknown_and_ambiguous(queue):
    result = cli("show", queue.path, "nothing@x")
    assert result.code == EXIT_NOT_FOUND
    assert result.err == (
        f"mailoutbox: error: no message 'nothing@x' in {queue.path}\n"
    )
    add_message(queue.maildir, "Again", message_id="q@x")
    result = cli("show", queue.path, "q@x")
    assert result.code == EXIT_NOT_FOUND
    assert "2 messages have the Message-Id <q@x>; name one by its id" in result.err


def test_show_with_the_queue_from_the_config_file(queue, tmp_path):
    ini = write_ini(tmp_path, f"[mailoutbox]\nqueue_path = {queue.path}\n")
    assert "state:    queued" in cli("show", "--config", ini, "q@x").out


# -- retry ------------------------------------------------------------------------


def test_retry_a_failed_message(queue):
    result = cli("retry", queue.path, "f@x")
    assert result.code == EXIT_OK
    assert result.out == (
        f"{queue.failed.name}: failed -> queued\n"
        "1 message(s) queued for the next pass\n"
    )
    assert os.path.exists(os.path.join(queue.maildir.new, queue.failed.name))
    assert queue.maildir.failed_entries() == []
    assert queue.maildir.reason(queue.failed) is None


def test_retry_a_deferred_message(queue):
    result = cli("retry", queue.path, queue.deferred.name)
    assert result.out.startswith(f"{queue.deferred.name}: deferred -> queued\n")
    assert queue.maildir.retry_state(queue.deferred) is None
    # the claim taken for the repair was released
    assert queue.maildir.scan().claimed == {queue.sending.name}


def test_retry_leaves_alone_what_is_queued_or_being_sent(queue):
    result = cli("retry", queue.path, "q@x", "s@x")
    assert result.code == EXIT_OK
    assert f"mailoutbox: {queue.queued.name}: already queued\n" in result.err
    assert f"mailoutbox: {queue.sending.name}: being sent now; left alone\n" in (
        result.err
    )
    assert result.out == "0 message(s) queued for the next pass\n"


def test_retry_never_breaks_a_claim_even_an_old_one(queue):
    # A message claimed between the listing and the repair is left alone.
    view = QueueView(queue.path)
    message = view.find(queue.overdue.name)
    other = queue.maildir.claim(queue.overdue)
    os.utime(other.claim_path, (0, 0))  # long past any lease
    err = io.StringIO()
    assert _retry_one(view, message, Console(io.StringIO(), err)) == 0
    assert err.getvalue() == (
        f"mailoutbox: {queue.overdue.name}: being sent now; left alone\n"
    )
    assert queue.maildir.retry_state(queue.overdue) is not None
    # --all skips claimed messages, however old their claim.
    claim = queue.maildir.claim(queue.deferred)
    os.utime(claim.claim_path, (0, 0))
    result = cli("retry", queue.path, "--all")
    assert result.out == (
        f"{queue.failed.name}: failed -> queued\n"
        "1 message(s) queued for the next pass\n"
    )
    assert queue.maildir.retry_state(queue.deferred) is not None
    assert os.path.exists(claim.claim_path)


def test_retry_all(queue):
    result = cli("retry", queue.path, "--all")
    assert result.code == EXIT_OK
    assert sorted(result.out.splitlines()) == sorted([
        f"{queue.failed.name}: failed -> queued",
        f"{queue.deferred.name}: deferred -> queued",
        f"{queue.overdue.name}: deferred -> queued",
        "3 message(s) queued for the next pass",
    ])
    data = json.loads(cli("status", queue.path, "--json").out)
    assert (data["queued"], data["deferred"], data["failed"]) == (4, 0, 0)


def test_quiet_repairs_print_only_errors_and_notes(queue):
    result = cli("retry", queue.path, "f@x", "s@x", "-q")
    assert result.code == EXIT_OK
    assert result.out == ""
    assert result.err == (
        f"mailoutbox: {queue.sending.name}: being sent now; left alone\n"
    )
    result = cli("purge", queue.path, "--failed", "--yes", "-q")
    assert (result.code, result.out) == (EXIT_OK, "")


def test_retry_reports_missing_ids_and_does_the_rest(queue):
    result = cli("retry", queue.path, "nothing@x", "f@x", "<f@x>")
    assert result.code == EXIT_NOT_FOUND
    assert "no message 'nothing@x'" in result.err
    assert result.out.endswith("1 message(s) queued for the next pass\n")


def test_retry_of_a_failed_message_that_vanishes(queue):
    view = QueueView(queue.path)
    message = view.find("f@x")
    os.unlink(message.entry.path)
    err = io.StringIO()
    assert _retry_one(view, message, Console(io.StringIO(), err)) == 0
    assert "gone meanwhile" in err.getvalue()


@pytest.mark.parametrize("argv", [[], ["--all", "f@x"]])
def test_retry_needs_ids_or_all(queue, argv):
    result = cli("retry", queue.path, *argv)
    assert result.code == EXIT_USAGE
    assert "name the messages to retry, or give --all (not both)" in result.err


def test_retry_with_the_queue_from_the_config_file(queue, tmp_path):
    ini = write_ini(tmp_path, f"[mailoutbox]\nqueue_path = {queue.path}\n")
    result = cli("retry", "--config", ini, "f@x", "d@x")
    assert result.code == EXIT_OK, result.err
    assert result.out.endswith("2 message(s) queued for the next pass\n")
    # the queue may still be given on the command line
    result = cli("retry", "--config", ini, queue.path, "--all")
    assert result.out.endswith("1 message(s) queued for the next pass\n")


# -- purge ------------------------------------------------------------------------


def test_purge_by_id(queue):
    result = cli("purge", queue.path, "f@x", "q@x", "d@x")
    assert result.code == EXIT_OK
    assert result.out.splitlines() == [
        f"{queue.failed.name}: deleted (failed)",
        f"{queue.queued.name}: deleted (queued)",
        f"{queue.deferred.name}: deleted (deferred)",
        "3 message(s) deleted",
    ]
    names = {m.name for m in QueueView(queue.path).messages}
    assert names == {queue.overdue.name, queue.sending.name}
    leftovers = [n for n in os.listdir(queue.maildir.new) if n.startswith(".")]
    leftovers += [n for n in os.listdir(queue.maildir.failed) if n.startswith(".")]
    # only the overdue message's retry state and the live claim remain
    assert sorted(leftovers) == sorted([
        f".retry-{queue.overdue.name}", f".sending-{queue.sending.name}",
    ])


def test_purge_leaves_a_message_being_sent_alone(queue):
    result = cli("purge", queue.path, "s@x")
    assert result.code == EXIT_OK
    assert "being sent now; left alone" in result.err
    assert os.path.exists(queue.sending.path)


def test_bulk_purge_needs_yes(queue):
    result = cli("purge", queue.path, "--failed", "--deferred")
    assert result.code == EXIT_USAGE
    assert result.err == (
        "mailoutbox: error: 2 failed or deferred message(s) would be deleted;"
        " repeat with --yes to delete them\n"
    )
    assert json.loads(cli("status", queue.path, "--json").out)["failed"] == 1
    result = cli("purge", queue.path, "--failed", "--deferred", "--yes")
    assert result.code == EXIT_OK
    assert result.out.endswith("2 message(s) deleted\n")
    data = json.loads(cli("status", queue.path, "--json").out)
    assert (data["queued"], data["deferred"], data["failed"]) == (2, 0, 0)


@pytest.mark.parametrize("argv", [[], ["--failed", "f@x"]])
def test_purge_needs_ids_or_a_bulk_option(queue, argv):
    result = cli("purge", queue.path, *argv)
    assert result.code == EXIT_USAGE
    assert "name the messages to delete, or give --failed" in result.err


def test_purge_missing(queue):
    result = cli("purge", queue.path, "nothing@x", "-q")
    assert result.code == EXIT_NOT_FOUND
    assert result.out == ""
