"""``status`` on a PostgreSQL queue shows the prepared transactions a crash
left (and warns, exit status 1, once they are older than a minute);
``list --sent`` shows the sent log of a queue that keeps one."""
from __future__ import annotations

import json

import pytest

from mailoutbox.cli import status as status_module
from mailoutbox.cli.errors import EXIT_NOT_SENT
from mailoutbox.cli.errors import EXIT_OK
from mailoutbox.cli.errors import EXIT_USAGE
from mailoutbox.maildir import Entry
from mailoutbox.postgresql import open_queue
from mailoutbox.postgresql import recovery
from mailoutbox.postgresql.datamanager import gid_prefix
from mailoutbox.postgresql.store import QUEUE
from mailoutbox.testing.postgresql import PostgreSQLServer
from mailoutbox.testing.postgresql import find_bindir
from tests.pg_fixtures import insert
from tests.pg_fixtures import table_url
from tests.test_cli import cli

psycopg = pytest.importorskip("psycopg")


@pytest.fixture(scope="module")
def pg_server():
    if find_bindir() is None:
        pytest.skip("PostgreSQL is not installed (Debian's postgresql package)")
    with PostgreSQLServer({"max_prepared_transactions": 4}, fsync=False) as server:
        yield server


@pytest.fixture
def pg_url(pg_server):
    return table_url(pg_server)


@pytest.fixture
def orphan(pg_server, pg_url):
    """A prepared transaction of the queue, as a crash between vote and
    finish leaves one; rolled back afterwards."""
    table = pg_url.rpartition("table=")[2]
    gid = gid_prefix(table) + "crashed-1"
    conn = psycopg.connect(pg_server.url)
    conn.tpc_begin(gid)
    conn.execute("SELECT 1")
    conn.tpc_prepare()
    conn.close()
    # Another queue's: not shown.
    other = psycopg.connect(pg_server.url)
    other.tpc_begin(gid_prefix(table + "x") + "crashed-2")
    other.tpc_prepare()
    other.close()
    yield gid
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        for (left,) in conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall():
            conn.execute(f"ROLLBACK PREPARED '{left}'")


def test_status_without_orphans(pg_url):
    result = cli("status", pg_url)
    assert result.code == EXIT_OK and "orphaned" not in result.out
    result = cli("status", pg_url, "--json")
    assert result.code == EXIT_OK
    assert json.loads(result.out)["orphaned_transactions"] == []


def test_a_maildir_queue_has_no_orphans(tmp_path):
    from mailoutbox.maildir import Maildir
    Maildir(str(tmp_path / "q"), create=True)
    result = cli("status", str(tmp_path / "q"), "--json")
    assert result.code == EXIT_OK
    assert "orphaned_transactions" not in json.loads(result.out)


def test_status_shows_an_orphan(pg_url, orphan):
    result = cli("status", pg_url)
    # Young: perhaps a commit under way; shown, not alarming.
    assert result.code == EXIT_OK, result.err
    assert "orphaned  1 prepared transaction(s), the oldest" in result.out
    assert "mailoutbox recover URL" in result.out and result.err == ""
    result = cli("status", pg_url, "--json")
    [found] = json.loads(result.out)["orphaned_transactions"]
    assert found["gid"] == orphan and found["age"] >= 0
    assert found["owner"] == "postgres" and found["database"] == "postgres"
    assert found["prepared"] > 1e9


def test_an_old_orphan_makes_status_warn(pg_url, orphan, monkeypatch):
    monkeypatch.setattr(status_module, "ORPHAN_AGE", 0.0)
    for options in ((), ("--json",)):
        result = cli("status", pg_url, *options)
        assert result.code == EXIT_NOT_SENT
        assert "warning: 1 prepared transaction(s) left by a crash" in result.err
        assert f"mailoutbox recover {pg_url}" in result.err
    assert json.loads(result.out)["orphaned_transactions"][0]["gid"] == orphan
    # Resolved, all is well again.
    assert recovery.resolve(pg_url, "rollback", older_than=0) == [orphan]
    assert cli("status", pg_url).code == EXIT_OK


def sent_queue(url):
    """Queue three messages and send them (as a processor would)."""
    store = open_queue(url)
    ids = [
        insert(store, message=b"Subject: first\n\nbody\n", message_id="<a@x>"),
        insert(store, toaddrs=("one@example.com", "two@example.com"),
               message=b"Subject: second\n\nbody\n", relay="fast"),
        insert(store, message=b"To: x@example.com\n\nno subject\n"),
    ]
    for row_id in ids:
        store.claim(Entry(QUEUE, row_id), 30, exact=True).complete()
    store.close()
    return ids


def test_list_sent_shows_the_sent_log(pg_server):
    url = table_url(pg_server, keep_sent=7)
    first, second, third = sent_queue(url)
    result = cli("list", url, "--sent")
    assert result.code == EXIT_OK, result.err
    lines = result.out.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{first}  sent  ")
    assert lines[0].endswith("to@example.com  'first'")
    assert lines[1].endswith("via fast  one@example.com +1  'second'")
    assert lines[2].endswith("  to@example.com")
    result = cli("list", url, "--sent", "--json")
    data = json.loads(result.out)
    assert data["keep_sent"] == 7 and "password" not in data["queue"]
    assert [m["id"] for m in data["messages"]] == [first, second, third]
    assert data["messages"][0]["message_id"] == "<a@x>"
    assert data["messages"][1]["to"] == ["one@example.com", "two@example.com"]
    assert data["messages"][1]["relay"] == "fast"
    assert data["messages"][2]["subject"] is None
    assert data["messages"][0]["sent_at"] <= data["time"]
    # Nothing else is listed as sent.
    assert cli("list", url).out.strip() == "no queued or deferred or scheduled" \
        " or sending messages"


def test_list_sent_without_a_sent_log(pg_server, pg_url, tmp_path):
    sent_queue(pg_url)  # deleted once sent
    result = cli("list", pg_url, "--sent")
    assert result.code == EXIT_OK
    assert result.out == ("no sent messages (the queue URL sets no"
                          " keep_sent=DAYS: sent messages are deleted)\n")
    result = cli("list", table_url(pg_server, keep_sent=1), "--sent")
    assert result.out == "no sent messages\n"
    from mailoutbox.maildir import Maildir
    Maildir(str(tmp_path / "q"), create=True)
    result = cli("list", str(tmp_path / "q"), "--sent")
    assert result.code == EXIT_USAGE
    assert "a Maildir queue keeps no sent log" in result.err
