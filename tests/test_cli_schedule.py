"""The commands and scheduled sending and priorities: ``send --not-before
--priority``, what ``list``, ``show`` and ``status`` say of such messages,
``run --flush`` and ``retry --all`` leaving scheduled messages alone."""
from __future__ import annotations

import argparse
import datetime
import json
import time

import pytest

from mailoutbox.cli import EXIT_OK
from mailoutbox.cli import EXIT_USAGE
from mailoutbox.cli.send import parse_priority
from mailoutbox.cli.send import parse_when
from mailoutbox.cli.view import format_priority
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.maildir import Maildir

from .test_cli import cli
from .test_cli import python_m
from .test_cli_run import to

MESSAGE = b"From: shop@example.org\r\nTo: jane@example.org\r\nSubject: %s\r\n\r\nHi\r\n"


def send(queue_path, subject: str, *options: str) -> str:
    result = cli("send", queue_path, *options, stdin=MESSAGE % subject.encode())
    assert result.code == EXIT_OK, result.err
    return result.out.strip()


def listing(queue_path, *options: str) -> dict:
    result = cli("list", queue_path, "--json", *options)
    assert result.code == EXIT_OK, result.err
    return {m["subject"]: m for m in json.loads(result.out)["messages"]}


# -- parsing WHEN and P ---------------------------------------------------------

def test_parse_when_relative():
    now = lambda: 1000.0  # noqa: E731
    assert parse_when("+30s", now) == 1030.0
    assert parse_when("+10m", now) == 1600.0
    assert parse_when(" +2h", now) == 1000.0 + 7200
    assert parse_when("+1d", now) == 1000.0 + 86400


def test_parse_when_iso():
    assert parse_when("2030-01-02T03:04:05Z") == datetime.datetime(
        2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc).timestamp()
    assert parse_when("2030-01-02T04:04:05+01:00") == parse_when(
        "2030-01-02T03:04:05Z")
    local = datetime.datetime(2030, 1, 2, 3, 4).astimezone()
    assert parse_when("2030-01-02T03:04") == local.timestamp()
    assert parse_when("2030-01-02 03:04") == local.timestamp()


@pytest.mark.parametrize("text", ["tomorrow", "+10", "+10y", "-10m", "10m", ""])
def test_parse_when_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not a time"):
        parse_when(text)


@pytest.mark.parametrize(("text", "value"), [
    ("high", 10), ("low", -10), ("normal", 0), ("5", 5), ("-7", -7), ("+3", 3),
])
def test_parse_priority(text, value):
    assert parse_priority(text) == value


@pytest.mark.parametrize("text", ["urgent", "101", "1.5"])
def test_parse_priority_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_priority(text)


def test_format_priority():
    assert [format_priority(p) for p in (10, 0, -10, 7)] == [
        "high", "normal", "low", "7"]


# -- send, list, show, status ---------------------------------------------------

def test_send_list_and_show_a_scheduled_message(queue_path):
    send(queue_path, "later", "--not-before", "+2h", "--priority", "high")
    send(queue_path, "now", "--priority", "-5")
    messages = listing(queue_path)
    later, now = messages["later"], messages["now"]
    assert later["state"] == "scheduled"
    assert later["priority"] == 10
    assert later["not_before"] == pytest.approx(time.time() + 7200, abs=60)
    assert later["next_attempt"] == later["not_before"]
    assert later["attempts"] == 0  # never tried
    assert (now["state"], now["priority"], now["not_before"]) == ("queued", -5, None)
    text = cli("list", queue_path).out
    line, why = [s for s in text.splitlines() if "later" in s or "scheduled for" in s]
    assert line.split()[1] == "scheduled" and "priority high" in line
    assert why.strip().startswith("scheduled for ")
    assert "(in 1h 59m)" in why or "(in 2h 00m)" in why
    assert "priority -5" in text
    assert list(listing(queue_path, "--scheduled")) == ["later"]
    assert list(listing(queue_path, "--deferred")) == []
    shown = cli("show", queue_path, later["id"]).out
    assert "state:    scheduled (for " in shown
    assert "priority: high" in shown
    assert "not_before:" in shown and "attempts: 0" in shown
    data = json.loads(cli("show", queue_path, later["id"], "--json").out)
    assert data["retry_state"] == {"attempts": 0, "not_before": later["not_before"]}
    assert (data["priority"], data["not_before"]) == (10, later["not_before"])


def test_status_counts_scheduled_messages_apart(queue_path):
    send(queue_path, "later", "--not-before", "+2h")
    send(queue_path, "much later", "--not-before", "+1d")
    status = json.loads(cli("status", queue_path, "--json").out)
    assert (status["queued"], status["deferred"], status["scheduled"]) == (0, 0, 2)
    assert status["next_scheduled"] == pytest.approx(time.time() + 7200, abs=60)
    # Waiting for their time is not mail failing to leave.
    assert (status["oldest_age"], status["next_attempt"]) == (None, None)
    text = cli("status", queue_path).out
    assert "\nscheduled 2  (the first " in text
    assert "in 1h 59m)" in text or "in 2h 00m)" in text
    send(queue_path, "now")
    status = json.loads(cli("status", queue_path, "--json").out)
    assert (status["queued"], status["scheduled"]) == (1, 2)
    assert status["oldest_age"] is not None
    # Without scheduled messages, the text is as it was.
    cli("purge", queue_path, *[m["id"] for m in listing(queue_path, "--scheduled")
                               .values()])
    assert "\nscheduled" not in cli("status", queue_path).out


def test_scheduled_messages_of_relays_in_status(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, tm, mailers=["bulk"])
    delivery.send("shop@example.org", ["jane@example.org"], MESSAGE % b"r",
                  mailer="bulk", not_before=time.time() + 3600)
    tm.commit()
    text = cli("status", queue_path).out
    assert ("relay     bulk: queued 0, deferred 0, sending 0, failed 0,"
            " scheduled 1") in text


def test_purge_deferred_leaves_scheduled_messages(queue_path):
    send(queue_path, "later", "--not-before", "+2h")
    result = cli("purge", queue_path, "--deferred", "--yes")
    assert result.code == EXIT_OK, result.err
    assert list(listing(queue_path)) == ["later"]


def test_a_scheduled_message_whose_time_came_is_listed_as_due(queue_path, tm):
    delivery = QueuedMailDelivery(queue_path, tm)
    delivery.send("shop@example.org", ["jane@example.org"],
                  MESSAGE % b"past", not_before=time.time() - 60)
    tm.commit()
    (message,) = listing(queue_path).values()
    assert message["state"] == "queued"
    assert message["not_before"] == pytest.approx(time.time() - 60, abs=30)
    assert "scheduled for " in cli("list", queue_path).out
    assert ", due" in cli("list", queue_path).out


@pytest.mark.parametrize(("options", "text"), [
    (["--not-before", "soon"], "argument --not-before: not a time: 'soon'"),
    (["--priority", "urgent"], "argument --priority: unknown priority 'urgent'"),
])
def test_send_refuses_bad_options(queue_path, options, text):
    result = cli("send", queue_path, *options, stdin=MESSAGE % b"x")
    assert result.code == EXIT_USAGE
    assert text in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_send_and_list_in_subprocesses(queue_path):
    done = python_m("send", queue_path, "--not-before", "2099-01-01T00:00:00Z",
                    "--priority", "low", stdin=MESSAGE % b"far")
    assert done.returncode == 0, done.stderr
    message_id = done.stdout.decode().strip()
    done = python_m("list", queue_path, "--json")
    assert done.returncode == 0, done.stderr
    (message,) = json.loads(done.stdout)["messages"]
    assert message["message_id"] == message_id
    assert message["priority"] == -10
    assert message["not_before"] == datetime.datetime(
        2099, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
    done = python_m("send", queue_path, "--not-before", "+5x",
                    stdin=MESSAGE % b"bad")
    assert done.returncode == EXIT_USAGE
    assert b"not a time" in done.stderr


# -- run --flush and retry --all ------------------------------------------------

def test_run_flush_does_not_send_scheduled_messages(queue_path, smtp_server):
    send(queue_path, "later", "--not-before", "+1h")
    send(queue_path, "now")
    result = cli("run", queue_path, *to(smtp_server), "--flush")
    assert result.code == EXIT_OK, result.err
    assert [m.message["Subject"] for m in smtp_server.messages] == ["now"]
    assert list(listing(queue_path)) == ["later"]


def test_retry_all_leaves_scheduled_messages_but_a_named_one_is_sent_now(
        queue_path, smtp_server):
    send(queue_path, "later", "--not-before", "+1h")
    result = cli("retry", queue_path, "--all")
    assert result.code == EXIT_OK, result.err
    assert "0 message(s) queued" in result.out
    assert listing(queue_path)["later"]["state"] == "scheduled"
    (entry,) = Maildir(queue_path).scan().entries
    result = cli("retry", queue_path, entry.name)
    assert "scheduled -> queued" in result.out
    assert listing(queue_path)["later"]["state"] == "queued"
    assert cli("run", queue_path, *to(smtp_server)).code == EXIT_OK
    assert len(smtp_server.messages) == 1


def test_move_keeps_the_schedule_and_the_priority(tmp_path):
    source, dest = str(tmp_path / "source"), str(tmp_path / "dest")
    send(source, "later", "--not-before", "+1h", "--priority", "low")
    send(source, "code", "--priority", "high")
    before = listing(source)
    result = cli("move", source, dest)
    assert result.code == EXIT_OK, result.err
    after = listing(dest)
    assert after["later"]["state"] == "scheduled"
    assert after["later"]["not_before"] == before["later"]["not_before"]
    assert [after[s]["priority"] for s in ("later", "code")] == [-10, 10]
