"""The on-disk queue (mailoutbox.maildir): folders, writers, claims, and the
repairs after crashes.  Real files; a few races are staged through the
module's ``os``."""
from __future__ import annotations

import json
import os
import time

import pytest
from zope.interface.verify import verifyClass
from zope.interface.verify import verifyObject

from mailoutbox import _files
from mailoutbox import _writer
from mailoutbox import maildir as mod
from mailoutbox._files import write_json_atomically
from mailoutbox.interfaces import IMaildir
from mailoutbox.interfaces import IMaildirFactory
from mailoutbox.interfaces import IMaildirMessageWriter
from mailoutbox.maildir import Claim
from mailoutbox.maildir import Entry
from mailoutbox.maildir import Maildir

OLD = time.time() - 3600


def mode(path):
    return os.stat(path).st_mode & 0o777


def put(maildir, data=b"X-Zope-From: a@x.org\nX-Zope-To: b@x.org\n\n", name=None):
    """Queue a message; return its Entry."""
    writer = maildir.newMessage()
    writer.write(data)
    writer.commit()
    entry = Entry(maildir.new, writer.name)
    if name is not None:
        os.rename(entry.path, os.path.join(maildir.new, name))
        entry = Entry(maildir.new, name)
    return entry


@pytest.fixture
def maildir(queue_path):
    return Maildir(queue_path, create=True)


def test_module_names():
    for name in mod.__all__:
        assert hasattr(mod, name), name


def test_helper_module_names():
    for helper in (_files, _writer):
        for name in helper.__all__:
            assert hasattr(helper, name), name
    assert mod.MaildirMessageWriter is _writer.MaildirMessageWriter


def test_interfaces(maildir):
    assert verifyObject(IMaildirFactory, Maildir)
    assert verifyObject(IMaildir, maildir)
    assert verifyClass(IMaildirMessageWriter, mod.MaildirMessageWriter)
    writer = maildir.newMessage()
    assert verifyObject(IMaildirMessageWriter, writer)
    writer.abort()


# -- folders -----------------------------------------------------------------

def test_create_makes_private_folders(queue_path):
    old_umask = os.umask(0)
    try:
        maildir = Maildir(queue_path, create=True)
    finally:
        os.umask(old_umask)
    assert maildir.path == queue_path
    for folder in ("", "tmp", "new", "cur"):
        assert mode(os.path.join(queue_path, folder)) == 0o700
    assert repr(maildir) == f"<Maildir {queue_path!r}>"
    # opening it again, with or without create, works
    assert Maildir(queue_path, create=True).new == os.path.join(queue_path, "new")
    assert Maildir(queue_path).tmp == os.path.join(queue_path, "tmp")


def test_not_a_maildir(tmp_path):
    with pytest.raises(ValueError, match="is not a Maildir folder"):
        Maildir(str(tmp_path / "missing"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "new").mkdir()
    with pytest.raises(ValueError, match="half is not a Maildir folder"):
        Maildir(str(tmp_path / "half"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError):
        Maildir(str(tmp_path / "file"))


def test_accepts_path_objects(tmp_path):
    assert Maildir(tmp_path / "q", create=True).path == str(tmp_path / "q")


# -- writing -------------------------------------------------------------------

def test_writer_commit(maildir):
    old_umask = os.umask(0)
    try:
        writer = maildir.newMessage()
    finally:
        os.umask(old_umask)
    assert os.path.dirname(writer.tmp_path) == maildir.tmp
    assert mode(writer.tmp_path) == 0o600
    writer.write(b"X-Zope-From: a@x.org\n")
    writer.write("X-Zope-To: jürgen@x.org\n")
    writer.writelines([b"Subject: s\n", "\n", b"body"])
    assert os.listdir(maildir.new) == []
    writer.commit()
    assert os.listdir(maildir.tmp) == []
    with open(writer.new_path, "rb") as f:
        assert f.read() == ("X-Zope-From: a@x.org\nX-Zope-To: jürgen@x.org\n"
                            "Subject: s\n\nbody").encode()
    assert mode(writer.new_path) == 0o600
    writer.commit()  # again: nothing
    writer.abort()  # after commit: nothing
    assert os.path.exists(writer.new_path)
    writer.close()  # may be called more than once


def test_writer_abort(maildir):
    writer = maildir.newMessage()
    writer.write(b"data")
    writer.abort()
    assert os.listdir(maildir.tmp) == []
    writer.abort()  # again: nothing
    with pytest.raises(RuntimeError, match="already aborted"):
        writer.commit()
    with pytest.raises(RuntimeError, match="already aborted"):
        writer.sync()
    assert os.listdir(maildir.new) == []


def test_writer_sync_then_commit_without_fsyncing_new(maildir, monkeypatch):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(mod.os, "fsync",
                        lambda fd: (calls.append(os.readlink(f"/proc/self/fd/{fd}")),
                                    real_fsync(fd)))
    writer = maildir.newMessage()
    writer.write(b"data")
    writer.sync()
    assert calls == [writer.tmp_path]
    writer.sync()  # again: nothing
    assert writer._file.closed
    writer.commit(fsync_dir=False)
    assert calls == [writer.tmp_path]
    maildir.sync_new()
    assert calls == [writer.tmp_path, maildir.new]
    assert os.path.exists(writer.new_path)


def test_commit_order_is_fsync_file_rename_fsync_folder(maildir, monkeypatch):
    log = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst):
        log.append(("rename", src, dst))
        real_rename(src, dst)

    writer = maildir.newMessage()
    writer.write(b"data")
    monkeypatch.setattr(mod.os, "fsync", fsync)
    monkeypatch.setattr(mod.os, "rename", rename)
    writer.commit()
    assert log == [("fsync", writer.tmp_path),
                   ("rename", writer.tmp_path, writer.new_path),
                   ("fsync", maildir.new)]


def test_failed_fsync_leaves_the_file_in_tmp(maildir, monkeypatch):
    def fsync(fd):
        raise OSError(5, "Input/output error")

    writer = maildir.newMessage()
    writer.write(b"data")
    monkeypatch.setattr(mod.os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output"):
        writer.commit()
    monkeypatch.undo()
    assert writer._file.closed  # no descriptor leaks
    assert os.listdir(maildir.new) == []
    writer.abort()
    assert os.listdir(maildir.tmp) == []


def test_fsync_dir_really_syncs(maildir):
    mod.fsync_dir(maildir.new)  # no error on a real folder
    with pytest.raises(NotADirectoryError):
        mod.fsync_dir(put(maildir).path)


def test_names_are_unique_and_time_ordered(maildir):
    writers = [maildir.newMessage() for _ in range(50)]
    names = [w.name for w in writers]
    for writer in writers:
        writer.abort()
    assert len(set(names)) == 50
    assert names == sorted(names, key=lambda n: (int(n.split(".")[0]), n))
    assert all(n.count(".") >= 2 and "/" not in n for n in names)


def test_host_name_is_escaped(monkeypatch):
    monkeypatch.setattr(mod.socket, "gethostname", lambda: "a/b:c")
    assert mod._Names().host == r"a\057b\072c"


# -- reading -------------------------------------------------------------------

def test_iteration_oldest_first_skipping_dot_files(maildir):
    zope_name = "1500000000.123.host.456"  # a zope.sendmail name, older
    first = put(maildir)
    second = put(maildir)
    third = put(maildir, name=zope_name)
    os.rename(second.path, os.path.join(maildir.cur, second.name))
    for dotfile in (".sending-" + first.name, ".retry-" + first.name, ".hidden"):
        with open(os.path.join(maildir.new, dotfile), "w"):
            pass
    os.mkdir(os.path.join(maildir.new, "a-folder"))
    assert list(maildir) == [third.path, first.path,
                             os.path.join(maildir.cur, second.name),
                             os.path.join(maildir.new, "a-folder")]
    scan = maildir.scan()
    assert [e.regular for e in scan.entries] == [True, True, True, False]
    assert scan.claimed == {first.name}
    assert list(scan.retry_at) == [first.name]
    assert sorted(n for _f, n in scan.dotfiles) == sorted(
        [".sending-" + first.name, ".retry-" + first.name, ".hidden"])


def test_scan_with_missing_folders(maildir):
    os.rmdir(maildir.cur)
    put(maildir)
    assert len(maildir.scan().entries) == 1
    assert maildir.failed_entries() == []


def test_scan_when_a_retry_state_vanishes(maildir, monkeypatch):
    entry = put(maildir)
    retry = entry.sidecar(".retry-")
    with open(retry, "w"):
        pass
    real_list = Maildir._list

    def listing(self, folder):
        yield from real_list(self, folder)
        if folder == self.cur:
            os.unlink(retry)  # removed by another process meanwhile

    monkeypatch.setattr(Maildir, "_list", listing)
    scan = maildir.scan()
    assert scan.retry_at == {}
    assert [e.name for e in scan.entries] == [entry.name]


def test_find(maildir):
    entry = put(maildir)
    assert maildir.find(entry.name) == Entry(maildir.new, entry.name)
    os.rename(entry.path, os.path.join(maildir.cur, entry.name))
    assert maildir.find(entry.name) == Entry(maildir.cur, entry.name)
    failed = maildir.move_to_failed(Entry(maildir.cur, entry.name), {"error": "x"})
    assert maildir.find(entry.name) == failed
    for name in ("", ".sending-" + entry.name, "../new/" + entry.name, "missing"):
        assert maildir.find(name) is None


def test_read_json_states(maildir):
    entry = put(maildir)
    assert maildir.retry_state(entry) is None
    assert maildir.reason(entry) is None
    for content, expected in ((b"", {}), (b"not json", {}), (b"[1]", {}),
                              (b'{"attempts": 2}', {"attempts": 2})):
        with open(entry.sidecar(".retry-"), "wb") as f:
            f.write(content)
        assert maildir.retry_state(entry) == expected


# -- claims --------------------------------------------------------------------

def test_claim_complete(maildir):
    entry = put(maildir)
    os.utime(entry.path, (OLD, OLD))
    claim = maildir.claim(entry)
    assert isinstance(claim, Claim)
    assert repr(claim) == f"<Claim {entry.name!r}>"
    assert os.path.samefile(claim.claim_path, entry.path)
    assert os.path.basename(claim.claim_path) == ".sending-" + entry.name
    assert time.time() - os.stat(claim.claim_path).st_mtime < 60  # lease started
    assert claim.read().startswith(b"X-Zope-From: ")
    assert maildir.claim(entry) is None  # claimed by a live processor
    claim.complete()
    assert os.listdir(maildir.new) == []


def test_claim_of_a_message_gone(maildir):
    entry = put(maildir)
    os.unlink(entry.path)
    assert maildir.claim(entry) is None
    assert os.listdir(maildir.new) == []


def test_claim_lost_race(maildir, monkeypatch):
    entry = put(maildir)
    real_utime = os.utime

    def utime(path, *args, **kwargs):
        real_utime(path, *args, **kwargs)
        if path == entry.path:  # another processor links first
            os.link(entry.path, entry.sidecar(".sending-"))

    monkeypatch.setattr(mod.os, "utime", utime)
    assert maildir.claim(entry) is None


def test_stale_claim_is_broken(maildir):
    entry = put(maildir)
    with open(entry.sidecar(".sending-"), "w"):
        pass
    os.utime(entry.sidecar(".sending-"), (OLD, OLD))
    assert maildir.claim(entry, lease=30) is not None
    assert sorted(os.listdir(maildir.new)) == sorted([entry.name,
                                                      ".sending-" + entry.name])


def test_stale_claim_with_a_long_lease_is_kept(maildir):
    entry = put(maildir)
    os.link(entry.path, entry.sidecar(".sending-"))
    os.utime(entry.path, (OLD, OLD))
    assert maildir.claim(entry, lease=2 * 3600) is None


def test_claim_renewed_while_being_broken_is_put_back(maildir, monkeypatch):
    entry = put(maildir)
    claim_path = entry.sidecar(".sending-")
    os.link(entry.path, claim_path)
    os.utime(claim_path, (OLD, OLD))
    real_rename = os.rename

    def rename(src, dst):
        if src == claim_path:
            os.utime(claim_path)  # its processor renews it just now
        real_rename(src, dst)

    monkeypatch.setattr(mod.os, "rename", rename)
    assert maildir.claim(entry, lease=30) is None
    monkeypatch.undo()
    assert os.path.exists(claim_path)
    assert [n for n in os.listdir(maildir.new) if ".broken-" in n] == []


def test_claim_released_while_being_broken(maildir, monkeypatch):
    entry = put(maildir)
    claim_path = entry.sidecar(".sending-")
    os.link(entry.path, claim_path)
    os.utime(claim_path, (OLD, OLD))
    real_rename = os.rename

    def rename(src, dst):
        if src == claim_path:
            os.unlink(claim_path)  # its processor released it just now
        real_rename(src, dst)

    monkeypatch.setattr(mod.os, "rename", rename)
    claim = maildir.claim(entry, lease=30)
    assert claim is not None
    claim.release()


def test_claim_renew_release(maildir):
    entry = put(maildir)
    claim = maildir.claim(entry)
    os.utime(claim.claim_path, (OLD, OLD))
    claim.renew()
    assert time.time() - os.stat(claim.claim_path).st_mtime < 60
    claim.release()
    assert os.listdir(maildir.new) == [entry.name]
    claim.renew()  # released: nothing to renew, no error
    assert os.listdir(maildir.new) == [entry.name]


def test_claim_read_does_not_follow_symlinks(maildir, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    os.symlink(secret, os.path.join(maildir.new, "1.link"))
    entry = Entry(maildir.new, "1.link", regular=False)
    claim = maildir.claim(entry)
    with pytest.raises(OSError):
        claim.read()
    claim.release()


def test_defer_and_requeue(maildir):
    entry = put(maildir)
    claim = maildir.claim(entry)
    retry_at = time.time() + 600
    claim.defer(retry_at, {"attempts": 1, "error": "451 greylisted"})
    assert not os.path.exists(claim.claim_path)
    scan = maildir.scan()
    assert scan.retry_at[entry.name] == pytest.approx(retry_at, abs=1)
    assert maildir.retry_state(entry) == {"attempts": 1, "error": "451 greylisted"}
    claim = maildir.claim(entry)
    assert claim.retry_state() == {"attempts": 1, "error": "451 greylisted"}
    claim.release()
    assert maildir.requeue(entry) == entry
    assert maildir.retry_state(entry) is None
    assert os.listdir(maildir.tmp) == []  # the state was written via tmp/


def test_fail_and_requeue_from_failed(maildir):
    entry = put(maildir)
    claim = maildir.claim(entry)
    claim.defer(time.time(), {"attempts": 1})
    claim = maildir.claim(entry)
    failed = claim.fail({"error": "550 no such user", "permanent": True})
    assert failed == Entry(maildir.failed, entry.name)
    assert mode(maildir.failed) == 0o700 & ~_umask()
    assert sorted(os.listdir(maildir.failed)) == sorted([entry.name,
                                                         ".reason-" + entry.name])
    assert os.listdir(maildir.new) == []  # retry state and claim gone
    assert maildir.reason(failed) == {"error": "550 no such user", "permanent": True}
    assert maildir.failed_entries() == [failed]
    back = maildir.requeue(failed)
    assert back == Entry(maildir.new, entry.name)
    assert os.listdir(maildir.failed) == []
    assert list(maildir) == [back.path]


def test_fail_twice_into_an_existing_failed_folder(maildir):
    for _ in range(2):
        maildir.claim(put(maildir)).fail({"error": "x"})
    assert len(maildir.failed_entries()) == 2


def test_fail_removes_the_claim_even_when_moving_fails(maildir):
    entry = put(maildir)
    claim = maildir.claim(entry)
    os.unlink(entry.path)  # purged meanwhile
    with pytest.raises(FileNotFoundError):
        claim.fail({"error": "x"})
    assert os.listdir(maildir.new) == []


def test_purge(maildir):
    entry = put(maildir)
    for prefix in (".retry-", ".reason-"):
        with open(entry.sidecar(prefix), "w"):
            pass
    maildir.purge(entry)
    assert os.listdir(maildir.new) == []
    maildir.purge(entry)  # again: nothing


def _umask():
    current = os.umask(0)
    os.umask(current)
    return current


# -- clean-up after crashes ------------------------------------------------------

def test_cleanup(maildir):
    now = time.time()
    kept = put(maildir)
    live_claim = maildir.claim(kept)
    gone = "1600000000.M1P1Q1Rab.host"
    for dotname in (".sending-" + gone, ".retry-" + gone, ".other"):
        with open(os.path.join(maildir.new, dotname), "w"):
            pass
    with open(os.path.join(maildir.cur, ".retry-" + kept.name), "w"):
        pass  # its message is in new/, not cur/: orphan
    rejected = os.path.join(maildir.new, ".rejected-1500000000.1.host.2")
    with open(rejected, "wb") as f:
        f.write(b"X-Zope-From: a@x.org\nX-Zope-To: b@x.org\n\n")
    old_tmp = os.path.join(maildir.tmp, "old")
    young_tmp = os.path.join(maildir.tmp, "young")
    for path, age in ((old_tmp, 36 * 3600 + 10), (young_tmp, 35 * 3600)):
        with open(path, "w"):
            pass
        os.utime(path, (now - age, now - age))
    os.mkdir(os.path.join(maildir.tmp, "a-folder"))
    os.utime(os.path.join(maildir.tmp, "a-folder"), (now - 40 * 3600,) * 2)
    assert maildir.cleanup(maildir.scan(), now=now) == 5
    assert sorted(os.listdir(maildir.new)) == sorted(
        [kept.name, ".sending-" + kept.name, ".other"])
    assert os.listdir(maildir.cur) == []
    assert sorted(os.listdir(maildir.tmp)) == ["a-folder", "young"]
    [adopted] = maildir.failed_entries()
    assert adopted.name == "1500000000.1.host.2"
    reason = maildir.reason(adopted)
    assert reason["permanent"] is True
    assert "zope.sendmail" in reason["error"]
    live_claim.release()
    assert maildir.cleanup(maildir.scan()) == 0  # now=None: the clock


def test_cleanup_keeps_state_of_a_message_queued_after_the_scan(maildir):
    scan = maildir.scan()
    entry = put(maildir)
    with open(entry.sidecar(".sending-"), "w"):
        pass
    assert maildir.cleanup(scan) == 0
    assert os.path.exists(entry.sidecar(".sending-"))


def test_json_state_written_atomically(maildir):
    entry = put(maildir)
    write_json_atomically(maildir.tmp, entry.sidecar(".retry-"), {"a": 1})
    with open(entry.sidecar(".retry-")) as f:
        assert json.load(f) == {"a": 1}
    assert mode(entry.sidecar(".retry-")) == 0o600 & ~_umask()
    assert os.listdir(maildir.tmp) == []
