"""``mailoutbox init`` and the commands on a PostgreSQL queue, against a
real server (in-process for coverage, and as real subprocesses)."""
from __future__ import annotations

import sys

from mailoutbox.postgresql import open_queue
from mailoutbox.postgresql.schema import VERSION
from tests import pg_fixtures
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

