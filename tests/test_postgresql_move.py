"""``mailoutbox move`` between a Maildir folder and a PostgreSQL queue, both
ways: relays, priorities and schedules are kept, and a move killed
(SIGKILL, a real process) at any point and resumed leaves every message
exactly once in the destination and none in the source."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import transaction

from mailoutbox.cli import move
from mailoutbox.cli.errors import EXIT_INTERRUPTED
from mailoutbox.cli.errors import EXIT_NOT_SENT
from mailoutbox.cli.errors import EXIT_OK
from mailoutbox.cli.view import QueueView
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.envelope import parse_queue_file
from mailoutbox.maildir import CLAIM_PREFIX
from mailoutbox.postgresql import open_queue
from tests import pg_fixtures
from tests.test_cli import cli
from tests.test_cli import python_m

pg_server = pg_fixtures.pg_server
pg_url = pg_fixtures.pg_url

HERE = os.path.dirname(os.path.abspath(__file__))
RELAYS = ("fast", "slow")
LATER = 4102444800.0  # 2100-01-01


def fill(queue, count=8):
    """Queue *count* messages: some routed, some urgent, some scheduled."""
    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(queue, transaction_manager=manager,
                                  mailers=RELAYS)
    with manager:
        for i in range(count):
            data = (f"From: app@example.org\r\nTo: to-{i}@example.org\r\n"
                    f"Message-Id: <move-{i}@mailoutbox.test>\r\n"
                    f"Subject: move {i}\r\n\r\nBody {i}\r\n").encode()
            delivery.send("app@example.org", [f"to-{i}@example.org"], data,
                          mailer=(None, *RELAYS)[i % 3],
                          priority=(0, 10, -10, 0)[i % 4],
                          not_before=LATER + i if i % 5 == 0 else None)


def contents(queue):
    """(relay, priority, schedule, sender, recipients, message) of each
    waiting message."""
    found = []
    for info in QueueView(queue).messages:
        assert info.state != "failed"
        fromaddr, toaddrs, message = parse_queue_file(info.maildir.read(info.entry))
        found.append((info.relay, info.priority, info.scheduled_for,
                      fromaddr, toaddrs, message))
    return sorted(found, key=repr)


def expire_claims(queue):
    """Let the leases of the claims an interrupted move left run out."""
    if queue.startswith("postgresql://"):
        store = open_queue(queue)
        from psycopg import sql
        query = sql.SQL("UPDATE {} SET claimed_until = now() - interval '1s'"
                        " WHERE claimed_by IS NOT NULL").format(
            sql.Identifier(*store.table.split(".")))
        store.connections.run(lambda conn: conn.execute(query))
        store.close()
        return
    for folder, _dirs, files in os.walk(queue):
        for name in files:
            if name.startswith(CLAIM_PREFIX):
                os.utime(os.path.join(folder, name), (1, 1),
                         follow_symlinks=False)


def kill_move(phase, number, source, dest):
    process = subprocess.run(
        [sys.executable, os.path.join(HERE, "_move_killer.py"), phase,
         str(number), source, dest], capture_output=True, timeout=120)
    assert process.returncode == -9, process.stderr.decode()


@pytest.fixture(params=["maildir-to-pg", "pg-to-maildir"])
def queues(request, pg_url, tmp_path):
    folder = str(tmp_path / "queue")
    if request.param == "maildir-to-pg":
        return folder, pg_url
    return pg_url, folder


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["claimed", "committed", "removed"])
def test_a_killed_move_resumed_moves_each_message_once(queues, phase):
    source, dest = queues
    fill(source)
    before = contents(source)
    assert {m[0] for m in before} == {None, *RELAYS}
    assert {m[1] for m in before} == {0, 10, -10}
    assert {m[2] for m in before} == {None, LATER, LATER + 5}
    kill_move(phase, 3, source, dest)
    moved = len(contents(dest))
    assert moved == {"claimed": 2, "committed": 3, "removed": 3}[phase]
    assert len(contents(source)) == 8 - {"removed": 3}.get(phase, 2)
    expire_claims(source)
    result = python_m("move", source, dest)
    assert result.returncode == 0, result.stderr.decode()
    assert contents(dest) == before  # each exactly once, all kept
    assert contents(source) == []


def rows(url):
    """{state: count} of the rows of the table of *url*."""
    store = open_queue(url)
    from psycopg import sql
    query = sql.SQL("SELECT state, count(*) FROM {} GROUP BY state").format(
        sql.Identifier(*store.table.split(".")))
    try:
        return dict(store.connections.run(
            lambda conn: conn.execute(query).fetchall()))
    finally:
        store.close()


def test_a_moved_message_is_not_logged_as_sent(pg_url, tmp_path):
    # A queue keeping a sent log: the moved rows are not sent, and go.
    source = pg_url + "&keep_sent=7"
    fill(source, 4)
    before = contents(source)
    result = cli("move", source, str(tmp_path / "queue"))
    assert result.code == EXIT_OK, result.err
    assert contents(str(tmp_path / "queue")) == before
    assert rows(pg_url) == {}


def test_an_interrupted_move_holds_its_claims_briefly(pg_url, tmp_path):
    fill(pg_url, 4)
    kill_move("claimed", 2, pg_url, str(tmp_path / "queue"))
    store = open_queue(pg_url)
    from psycopg import sql
    query = sql.SQL("SELECT extract(epoch FROM claimed_until - now())"
                    " FROM {} WHERE claimed_by IS NOT NULL").format(
        sql.Identifier(*store.table.split(".")))
    [(left,)] = store.connections.run(lambda conn: conn.execute(query).fetchall())
    store.close()
    assert 0 < left <= move.LEASE <= 10
    # Before the lease ran out, the message is left where it is...
    result = cli("move", pg_url, str(tmp_path / "queue"))
    assert result.code == EXIT_NOT_SENT
    assert "claimed" in result.err and "run it again" in result.err
    # ...after, it is moved.
    expire_claims(pg_url)
    assert cli("move", pg_url, str(tmp_path / "queue")).code == EXIT_OK
    assert len(contents(str(tmp_path / "queue"))) == 4


def test_a_slow_move_renews_its_claim(pg_url, tmp_path, monkeypatch):
    fill(pg_url, 1)
    monkeypatch.setattr(move, "LEASE", 0.3)
    store = open_queue(pg_url)
    from psycopg import sql
    query = sql.SQL("SELECT count(*) FROM {} WHERE claimed_until > now()").format(
        sql.Identifier(*store.table.split(".")))
    held = []
    real = QueuedMailDelivery.send

    def slow_send(self, *args, **kwargs):
        # Three leases later, the claim still holds.
        time.sleep(1.0)
        held.append(store.connections.run(
            lambda conn: conn.execute(query).fetchone()[0]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(QueuedMailDelivery, "send", slow_send)
    assert cli("move", pg_url, str(tmp_path / "queue")).code == EXIT_OK
    store.close()
    assert held == [1]
    assert len(contents(str(tmp_path / "queue"))) == 1


def test_an_interrupted_move_gives_its_claim_back(pg_url, tmp_path, monkeypatch):
    fill(pg_url, 2)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(QueuedMailDelivery, "send", interrupted)
    assert cli("move", pg_url, str(tmp_path / "queue")).code == EXIT_INTERRUPTED
    monkeypatch.undo()
    # No claim left to run out: the move can be resumed at once.
    assert cli("move", pg_url, str(tmp_path / "queue")).code == EXIT_OK
    assert len(contents(str(tmp_path / "queue"))) == 2
    assert rows(pg_url) == {}
