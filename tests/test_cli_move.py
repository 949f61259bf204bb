"""``mailoutbox move``: moving the waiting messages of one queue to another,
resumable without loss or duplicates."""
from __future__ import annotations

import os

import pytest

from mailoutbox.cli.errors import EXIT_INTERRUPTED
from mailoutbox.cli.errors import EXIT_NOT_SENT
from mailoutbox.cli.errors import EXIT_OK
from mailoutbox.cli.errors import EXIT_USAGE
from mailoutbox.cli.view import QueueView
from mailoutbox.envelope import parse_queue_file
from mailoutbox.maildir import CLAIM_PREFIX
from mailoutbox.maildir import Maildir
from tests.test_cli import add_message
from tests.test_cli import cli
from tests.test_routing import route


def contents(path: str) -> list[tuple[str | None, str, tuple[str, ...], bytes]]:
    """(relay, sender, recipients, message) of each waiting message."""
    view = QueueView(path)
    found = []
    for info in view.select(("queued", "deferred", "sending")):
        if not info.entry.regular:
            continue
        fromaddr, toaddrs, message = parse_queue_file(info.maildir.read(info.entry))
        found.append((info.relay, fromaddr, toaddrs, message))
    return sorted(found, key=repr)


@pytest.fixture
def source(tmp_path):
    return str(tmp_path / "source")


@pytest.fixture
def dest(tmp_path):
    return str(tmp_path / "dest")


def test_move_everything_waiting_with_relays_and_failed_left(source, dest):
    route(source, None, 2)
    route(source, "fast", 2)
    maildir = Maildir(source)
    failed = add_message(maildir, "failed one")
    maildir.move_to_failed(failed, {"error": "x"})
    before = contents(source)
    result = cli("move", source, dest)
    assert result.code == EXIT_OK, result.err
    assert "4 message(s) moved" in result.out
    assert contents(dest) == before
    assert contents(source) == []
    assert QueueView(source).counts()["failed"] == 1  # stays
    assert QueueView(dest).counts()["failed"] == 0


def test_a_message_without_message_id_gets_a_stable_one(source, dest):
    maildir = Maildir(source, create=True)
    add_message(maildir, "no id")
    assert cli("move", source, dest).code == EXIT_OK
    [(_relay, _f, _t, message)] = contents(dest)
    assert b"Message-Id: <moved." in message


def test_an_interrupted_move_resumes_without_duplicates(source, dest,
                                                        monkeypatch):
    route(source, None, 3)
    before = contents(source)
    # Interrupted after the destination has the second message, before the
    # source lost it.
    from mailoutbox import maildir as maildir_module

    calls = []
    real = maildir_module.Claim.complete

    def crash(self):
        calls.append(self)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(maildir_module.Claim, "complete", crash)
    assert cli("move", source, dest).code == EXIT_INTERRUPTED
    monkeypatch.setattr(maildir_module.Claim, "complete", real)
    assert len(contents(dest)) == 2 and len(contents(source)) == 2
    # The claim the interrupted move left runs out.
    new = Maildir(source).new
    for name in os.listdir(new):
        if name.startswith(CLAIM_PREFIX):
            os.utime(os.path.join(new, name), (1, 1), follow_symlinks=False)
    result = cli("move", source, dest)
    assert result.code == EXIT_OK, result.err
    assert contents(dest) == before  # each once
    assert contents(source) == []


def test_messages_being_sent_are_left_and_the_status_says_so(source, dest):
    route(source, None, 2)
    maildir = Maildir(source)
    name = sorted(os.listdir(maildir.new))[0]
    os.link(os.path.join(maildir.new, name),
            os.path.join(maildir.new, CLAIM_PREFIX + name))
    result = cli("move", source, dest)
    assert result.code == EXIT_NOT_SENT
    assert "being sent now" in result.err
    assert "1 message(s) moved" in result.out
    assert len(contents(source)) == 1


def test_dry_run_and_refusals(source, dest):
    route(source, None, 2)
    result = cli("move", source, dest, "--dry-run")
    assert (result.code, result.out.strip()) == (EXIT_OK,
                                                 "2 message(s) would be moved")
    assert not os.path.exists(dest)
    assert cli("move", source, source).code == EXIT_USAGE
    assert cli("move", source, source + "/../source").code == EXIT_USAGE
    result = cli("move", dest, source)
    assert result.code != EXIT_OK and "no queue" in result.err


def test_a_destination_without_a_schema_is_refused_before_anything_moves(source):
    route(source, None, 1)
    result = cli("move", source, "postgresql://nobody@127.0.0.1:1/none"
                 "?connect_timeout=2")
    assert result.code != EXIT_OK and "cannot connect" in result.err
    assert len(contents(source)) == 1


def test_entries_of_the_destination_that_are_not_messages_are_ignored(source,
                                                                      dest):
    route(source, None, 1)
    Maildir(dest, create=True)
    os.mkdir(os.path.join(dest, "new", "not-a-message"))
    assert cli("move", source, dest).code == EXIT_OK
    assert len(contents(dest)) == 1 and contents(source) == []
