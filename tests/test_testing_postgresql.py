"""The throwaway PostgreSQL server of mailoutbox.testing.postgresql, where
it cannot start, and the store opener for folders."""
from __future__ import annotations

import os
import pwd

import pytest

from mailoutbox.maildir import Maildir
from mailoutbox.stores import open_store
from mailoutbox.testing import postgresql


def test_find_bindir_without_postgresql_or_with_initdb_on_the_path(
        monkeypatch, tmp_path):
    monkeypatch.setattr(postgresql.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(postgresql.shutil, "which", lambda name: None)
    assert postgresql.find_bindir() is None
    with pytest.raises(RuntimeError, match="install Debian's postgresql"):
        postgresql.PostgreSQLServer()
    (tmp_path / "initdb").write_text("")
    monkeypatch.setattr(postgresql.shutil, "which",
                        lambda name: str(tmp_path / name))
    assert postgresql.find_bindir() is None  # no pg_ctl beside it
    (tmp_path / "pg_ctl").write_text("")
    assert postgresql.find_bindir() == os.path.realpath(tmp_path)


def test_a_server_not_started_has_no_folder_and_stops_quietly(tmp_path):
    server = postgresql.PostgreSQLServer(bindir=str(tmp_path))
    with pytest.raises(RuntimeError, match="not started"):
        server.data  # noqa: B018
    server.stop()  # nothing to stop


def test_the_unprivileged_user(monkeypatch):
    known = {"nobody": 65534}

    def getpwnam(name):
        if name not in known:
            raise KeyError(name)
        return pwd.struct_passwd((name, "x", known[name], 0, "", "/", ""))

    monkeypatch.setattr(postgresql.pwd, "getpwnam", getpwnam)
    assert postgresql._unprivileged_uid() == 65534  # no postgres user
    known.clear()
    with pytest.raises(RuntimeError, match="refuses to run as root"):
        postgresql._unprivileged_uid()


def test_open_store_opens_or_creates_a_folder(tmp_path):
    path = str(tmp_path / "queue")
    with pytest.raises(ValueError, match="not a Maildir folder"):
        open_store(path)
    store = open_store(path, create=True)
    assert isinstance(store, Maildir) and store.created
    relay = store.relay("crm", create=True)
    assert store.relays() == ["crm"] and relay.path == store.relay("crm").path
