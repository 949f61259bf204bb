"""``mailoutbox init`` and the commands on a PostgreSQL queue, against a
real server (in-process for coverage, and as real subprocesses)."""
from __future__ import annotations

import json
import sys
import time

import pytest

from mailoutbox.maildir import Entry
from mailoutbox.postgresql import open_queue
from mailoutbox.postgresql.schema import VERSION
from mailoutbox.postgresql.store import QUEUE
from tests import pg_fixtures
from tests.pg_fixtures import insert
from tests.pg_fixtures import raw_url
from tests.pg_fixtures import table_url
from tests.test_cli import cli
from tests.test_cli import python_m

pg_server = pg_fixtures.pg_server


def one_line(text):
    assert text.endswith("\n") and text.count("\n") == 1, text
    return text


def test_init_creates_then_changes_nothing(pg_server):
    url = raw_url(pg_server, "created")
    result = cli("init", url)
    assert result.code == 0, result.err
    assert result.out == (f"created the mail queue 'created' in {url} (schema"
                          f" version {VERSION})\n")
    again = cli("init", url)
    assert again.code == 0
    assert again.out == (f"the mail queue 'created' in {url} is up to date"
                         f" (schema version {VERSION})\n")
    open_queue(url).close()


def test_init_upgrades_from_version_1(pg_server):
    url = table_url(pg_server, version=1)
    table = url.rsplit("=", 1)[1]
    import psycopg
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table} (fromaddr, toaddrs, message) VALUES"  # noqa: S608
                     " ('a@example.com', '{b@example.com}', 'Subject: x\n\ny')")
    result = python_m("init", url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == (
        f"upgraded the mail queue {table!r} in {url} from schema version 1"
        f" to {VERSION}\n")
    store = open_queue(url)  # the schema is the current one
    try:
        (entry,) = store.scan().entries
        assert store.read(entry).endswith(b"Subject: x\n\ny")
        assert store.claim(entry, 30).entry == entry
    finally:
        store.close()


def test_init_table_option_and_version(pg_server):
    url = pg_server.url
    result = cli("init", url, "--table", "other", "--version", "1")
    assert result.code == 0, result.err
    assert result.out == (f"created the mail queue 'other' in {url}"
                          "?table=other (schema version 1)\n")
    result = cli("init", url + "?sslmode=disable", "--table", "other")
    assert result.code == 0, result.err
    assert "from schema version 1 to" in result.out


def test_init_refuses_bad_urls_and_paths(tmp_path):
    result = cli("init", "postgresql://u:s3cret@h/db?table=no-no")
    assert result.code == 2
    assert "invalid queue table name" in one_line(result.err)
    assert "s3cret" not in result.err
    result = cli("init", str(tmp_path))
    assert result.code == 2
    assert "is not a postgresql:// URL" in one_line(result.err)
    result = cli("init", "postgresql://h/db", "--version", "99")
    assert result.code == 2


def test_init_on_an_unreachable_database(pg_server):
    url = f"postgresql://postgres:s3cret@127.0.0.1:{pg_server.port + 1}/db"
    result = python_m("init", url + "?connect_timeout=5")
    assert result.returncode == 4
    err = one_line(result.stderr.decode())
    assert err.startswith("mailoutbox: error: cannot connect to postgresql://postgres@")
    assert "s3cret" not in err


def test_init_reports_database_errors(pg_server):
    result = cli("init", pg_server.url + "?table=nosuchschema.t")
    assert result.code == 4
    assert "cannot create the mail queue 'nosuchschema.t'" in one_line(result.err)


def test_init_without_psycopg(pg_server, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)
    result = cli("init", pg_server.url)
    assert result.code == 4
    assert "pip install 'mailoutbox[postgresql]'" in one_line(result.err)



# -- the commands on a URL, as subprocesses ---------------------------------------

def fill(store):
    """A queued, a relay's, a deferred and a failed message; their ids."""
    def message(letter, **options):
        return insert(store, message=(f"Message-Id: <{letter}@example.com>\n"
                                      f"Subject: {letter}\n\nbody\n").encode(),
                      message_id=f"<{letter}@example.com>", **options)
    queued = message("a")
    relayed = message("b", relay="r1")
    deferred = message("c")
    claim = store.claim(Entry(QUEUE, deferred), 30, exact=True)
    claim.defer(time.time() + 600, {"attempts": 1, "error": "451 later",
                                    "next_attempt": time.time() + 600})
    failed = message("d")
    store.move_to_failed(Entry(QUEUE, failed), {
        "error": "550 no such user", "permanent": True, "time": time.time()})
    return queued, relayed, deferred, failed


@pytest.fixture
def filled(pg_server):
    url = table_url(pg_server)
    store = open_queue(url)
    yield url, store, fill(store)
    store.close()


def run(*argv):
    result = python_m(*argv)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


@pytest.mark.slow
def test_status_and_list(filled):
    url, _store, (queued, relayed, deferred, failed) = filled
    code, out, err = run("status", url, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["queue"] == url
    assert (data["queued"], data["deferred"], data["sending"], data["failed"]) == (
        2, 1, 0, 1)  # the relay's too
    assert data["relays"]["r1"]["queued"] == 1
    code, out, err = run("list", url, "--all")
    assert code == 0, err
    lines = [line.split()[:2] for line in out.splitlines()
             if not line.startswith(" ")]
    assert lines == [[queued, "queued"], [relayed, "queued"],
                     [deferred, "deferred"], [failed, "failed"]]
    assert "550 no such user" in out and "via r1" in out


def test_show(filled):
    url, _store, (queued, *_rest) = filled
    code, out, err = run("show", url, queued)
    assert code == 0, err
    assert "Message-Id: <a@example.com>" in out and "from@example.com" in out
    code, out, err = run("show", url, "12345")
    assert code == 3
    assert one_line(err)


def test_retry_and_purge(filled):
    url, store, (queued, relayed, deferred, failed) = filled
    code, out, err = run("retry", url, deferred, failed)
    assert code == 0, err
    assert f"{deferred}: deferred -> queued" in out
    assert f"{failed}: failed -> queued" in out
    assert store.scan().retry_at == {} and store.failed_entries() == []
    code, out, err = run("purge", url, queued, relayed)
    assert code == 0, err
    assert "2 message(s) deleted" in out
    assert [e.name for e in store.scan().entries] == [deferred, failed]
    assert store.relay("r1").scan().entries == []


def test_run_sends_the_queue(filled, smtp_server):
    url, store, (queued, relayed, deferred, _failed) = filled
    code, out, err = run("run", url, "--port", str(smtp_server.port),
                         "--no-tls", "--no-progress")
    assert smtp_server.message_ids() == ["a@example.com"]
    assert code == 1, err  # the relay's message has no mailer: deferred
    assert out.startswith("sent 1, ")
    assert "relay r1: sent 0, deferred 1" in out
    assert store.find(queued) is None
    assert set(store.scan().retry_at) == {deferred}
    assert set(store.relay("r1").scan().retry_at) == {relayed}


def test_commands_on_a_missing_schema_or_database(pg_server):
    url = raw_url(pg_server, "absent")
    code, _out, err = run("status", url)
    assert code == 2
    assert f"create it with 'mailoutbox init {url}'" in one_line(err)
    url = f"postgresql://postgres:s3cret@127.0.0.1:{pg_server.port + 1}/db"
    code, _out, err = run("list", url + "?connect_timeout=5")
    assert code != 0
    assert "cannot connect to" in one_line(err) and "s3cret" not in err


def test_a_schema_newer_than_this_mailoutbox(pg_server):
    url = table_url(pg_server)
    table = url.rsplit("=", 1)[1]
    import psycopg
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {table}_schema VALUES (99)")  # noqa: S608
    with pytest.raises(ValueError, match="newer than this mailoutbox knows"):
        open_queue(url)
    result = cli("init", url)
    assert result.code == 4
    assert "newer than this mailoutbox knows" in one_line(result.err)


def test_init_refuses_an_unknown_version(pg_server):
    import psycopg

    from mailoutbox.postgresql.schema import init
    with psycopg.connect(pg_server.url, autocommit=True) as conn, \
            pytest.raises(ValueError, match="no schema version 0"):
        init(conn, "whatever", 0)


def test_scheduled_messages_are_listed_as_such(pg_server):
    url = table_url(pg_server)
    store = open_queue(url)
    try:
        when = time.time() + 3600
        name = insert(store, not_before=when, priority=10,
                      message=b"Subject: later\n\nbody\n")
        code, out, err = run("list", url, "--json")
        assert code == 0, err
        (message,) = json.loads(out)["messages"]
        assert (message["id"], message["state"], message["priority"]) == (
            name, "scheduled", 10)
        assert message["not_before"] == pytest.approx(when, abs=1)
    finally:
        store.close()
