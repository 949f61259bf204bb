"""Waking the queue processor when a message is queued (mailoutbox.wakeup).

The processors here poll every 60 seconds, so that only a wake explains a
message sent within the (generous) bounds of these tests.  Each test first
lets the processor send one message, which proves that its first pass is
over before the message that must wake it is committed.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types

import pytest
import transaction

from mailoutbox import relays
from mailoutbox import wakeup
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread
from mailoutbox.testing.smtpd import SMTPServer

#: Seconds within which a woken processor sends a message: far less than
#: the interval of 60, far more than it takes on a loaded machine.
BOUND = 15.0


# -- helpers -----------------------------------------------------------------------


def wait_for(condition, timeout: float = BOUND) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def commit(queue_path, count=1, *, relay=None, prefix="m"):
    """Queue *count* messages, each in its own transaction, through a real
    delivery; return their Message-Ids."""
    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager,
                                  mailers=[relay] if relay else ())
    ids = []
    for i in range(count):
        with manager:
            ids.append(delivery.send_message((
                f"From: app@example.org\r\nTo: {prefix}-{i}@example.org\r\n"
                f"Message-Id: <{prefix}-{i}-{time.monotonic_ns()}@mailoutbox.test>"
                f"\r\nSubject: {prefix} {i}\r\n\r\nBody\r\n").encode(),
                mailer=relay))
    return ids


def mailer(server):
    return SMTPMailer("127.0.0.1", server.port, no_tls=True, timeout=5)


def counting():
    """A Maildir class counting the passes (listings) over its folders."""
    scans: list[str] = []

    class Counting(Maildir):
        def scan(self):
            scans.append(self.path)
            return super().scan()

    return Counting, scans


@pytest.fixture
def make_processor(queue_path):
    """Start a processor thread (interval 60) for the queue; stop it after."""
    started = []

    def make(server, *, interval=60.0, mailers=None):
        factory, scans = counting()
        processor = QueueProcessorThread(interval, concurrency=2)
        processor.maildir_factory = factory
        processor.setMailer(mailer(server))
        processor.setMailers(mailers or {})
        processor.setQueuePath(queue_path)
        processor.scans = scans
        processor.start()
        started.append(processor)
        return processor

    yield make
    for processor in started:
        processor.stop(30)


@pytest.fixture
def no_direct_wake(monkeypatch):
    """Only the watcher can wake the processor (as for another process)."""
    monkeypatch.setattr(wakeup, "committed", lambda path, names: None)


@pytest.fixture
def no_inotify(monkeypatch):
    """A system without inotify."""
    def unavailable():
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(wakeup, "inotify_init", unavailable)


def first_pass_over(server, queue_path, relay=None):
    """Commit a message and wait for it: the processor's first pass has
    listed the queue by then."""
    [first] = commit(queue_path, relay=relay, prefix="first")
    assert wait_for(lambda: first in server.message_ids())


# -- the processor thread ----------------------------------------------------------


@pytest.mark.parametrize("how", ["inotify", "direct", "direct without inotify"])
def test_a_commit_wakes_the_processor_thread(how, smtp_server, queue_path,
                                             make_processor, monkeypatch, request):
    if how == "inotify":  # the in-process call is skipped, or not made
        request.getfixturevalue("no_direct_wake")
    elif how == "direct":
        monkeypatch.setattr(wakeup.Wakeup, "watcher_factory", None)
    else:
        request.getfixturevalue("no_inotify")
    make_processor(smtp_server)
    first_pass_over(smtp_server, queue_path)
    [second] = commit(queue_path, prefix="second")
    assert wait_for(lambda: second in smtp_server.message_ids())


def test_a_routed_message_wakes_its_relay_folder(smtp_server, queue_path,
                                                 make_processor, no_direct_wake):
    with SMTPServer() as crm:
        make_processor(smtp_server, mailers={"crm": mailer(crm)})
        first_pass_over(crm, queue_path, relay="crm")
        [second] = commit(queue_path, relay="crm", prefix="second")
        assert wait_for(lambda: second in crm.message_ids())
    assert smtp_server.message_ids() == []


@pytest.mark.parametrize("direct", [False, True])
def test_a_relay_folder_made_after_the_start_is_watched(
        direct, smtp_server, queue_path, make_processor, monkeypatch):
    if not direct:
        monkeypatch.setattr(wakeup, "committed", lambda path, names: None)
    with SMTPServer() as late:
        processor = make_processor(smtp_server, mailers={"late": mailer(late)})
        first_pass_over(smtp_server, queue_path)
        assert not os.path.exists(relays.relay_path(queue_path, "late"))
        [routed] = commit(queue_path, relay="late")
        assert wait_for(lambda: routed in late.message_ids())
        # and its next messages too
        [again] = commit(queue_path, relay="late", prefix="again")
        assert wait_for(lambda: again in late.message_ids())
    assert "late" in processor._lanes.lanes


def test_without_inotify_the_interval_is_the_fallback(
        smtp_server, queue_path, make_processor, no_inotify, no_direct_wake,
        caplog):
    caplog.set_level(logging.INFO, "mailoutbox.wakeup")
    processor = make_processor(smtp_server, interval=0.2)
    first_pass_over(smtp_server, queue_path)
    [second] = commit(queue_path, prefix="second")
    assert wait_for(lambda: second in smtp_server.message_ids())
    assert "not watching" in caplog.text
    assert "checking it every interval" in caplog.text
    assert len(processor.scans) >= 2


@pytest.mark.slow
def test_an_idle_processor_passes_only_every_interval(
        smtp_server, queue_path, make_processor):
    """No busy loop: the watcher's thread and the processor's own files
    (claims, retry states) do not wake it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nobody = types.SimpleNamespace(port=sock.getsockname()[1])
    processor = make_processor(nobody, interval=1.0)
    first = commit(queue_path)  # deferred: the connection is refused
    assert wait_for(lambda: any(n.startswith(".retry-") for n in
                                os.listdir(os.path.join(queue_path, "new"))))
    before = len(processor.scans)
    time.sleep(3.0)
    assert len(processor.scans) - before <= 4  # 3 or 4 with interval 1
    assert first and smtp_server.message_ids() == []


@pytest.mark.slow
def test_a_burst_of_commits_does_not_make_a_pass_per_message(
        smtp_server, queue_path, make_processor):
    processor = make_processor(smtp_server)
    first_pass_over(smtp_server, queue_path)
    smtp_server.slow(0.25)  # each send takes a while: commits come meanwhile,
    # even on a machine whose fsyncs are slow
    ids = commit(queue_path, 20, prefix="burst")
    assert wait_for(lambda: set(ids) <= set(smtp_server.message_ids()), 60)
    # One pass per message would be 21; a wake during a pass makes one more.
    assert len(processor.scans) <= 10


def test_stop_returns_promptly_and_closes_the_watcher(smtp_server, queue_path):
    processor = QueueProcessorThread(60)
    processor.setMailer(mailer(smtp_server))
    processor.setQueuePath(queue_path)
    processor.start()
    assert wait_for(lambda: wakeup._registry.get(os.path.realpath(queue_path)))
    [handle] = wakeup._registry[os.path.realpath(queue_path)]
    watcher = handle.watcher
    assert watcher.covers(None) and not watcher.covers("other")
    started = time.monotonic()
    processor.stop(30)
    assert time.monotonic() - started < 10
    assert watcher.fd == -1 and watcher.thread is None
    assert os.path.realpath(queue_path) not in wakeup._registry


def test_wake_checks_its_argument(queue_path):
    processor = QueueProcessorThread(60)
    with pytest.raises(TypeError, match="collection of relay names"):
        processor.wake("crm")
    processor.wake()  # not running: only noted
    processor.wake(["crm", None])
    assert processor._lanes.requests.take().names == {wakeup.ALL, "crm", None}


# -- the daemon --------------------------------------------------------------------


def start_daemon(*argv):
    return subprocess.Popen(
        [sys.executable, "-m", "mailoutbox", "run", "--daemon", "--interval",
         "60", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop_daemon(process):
    try:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait(10)
    assert process.returncode == 0, err


@pytest.mark.slow
def test_a_commit_in_another_process_wakes_the_daemon(smtp_server, queue_path):
    Maildir(queue_path, create=True)
    process = start_daemon(queue_path, "--hostname", "127.0.0.1", "--port",
                           str(smtp_server.port), "--no-tls")
    try:
        first_pass_over(smtp_server, queue_path)
        [second] = commit(queue_path, prefix="second")
        assert wait_for(lambda: second in smtp_server.message_ids())
    finally:
        stop_daemon(process)


@pytest.mark.slow
def test_a_routed_message_wakes_the_daemon(smtp_server, queue_path, tmp_path):
    with SMTPServer() as crm, SMTPServer() as late:
        ini = tmp_path / "mailoutbox.ini"
        ini.write_text(textwrap.dedent(f"""\
            [mailoutbox]
            queue_path = {queue_path}
            hostname = 127.0.0.1
            port = {smtp_server.port}
            no_tls = true

            [mailoutbox:relay crm]
            hostname = 127.0.0.1
            port = {crm.port}
            no_tls = true

            [mailoutbox:relay late]
            hostname = 127.0.0.1
            port = {late.port}
            no_tls = true
            """))
        relays.open_relay(queue_path, "crm", create=True)
        process = start_daemon("--config", str(ini))
        try:
            first_pass_over(crm, queue_path, relay="crm")
            [second] = commit(queue_path, relay="crm", prefix="second")
            assert wait_for(lambda: second in crm.message_ids())
            [routed] = commit(queue_path, relay="late")  # a new relay folder
            assert wait_for(lambda: routed in late.message_ids())
        finally:
            stop_daemon(process)
    assert smtp_server.message_ids() == []


# -- the parts ---------------------------------------------------------------------


class Collector:
    def __init__(self):
        self.woken = []
        self.event = threading.Event()

    def __call__(self, names):
        self.woken.append(set(names))
        self.event.set()

    def wait_for(self, name):
        return wait_for(lambda: any(name in w for w in self.woken))


@pytest.fixture
def watcher(queue_path):
    Maildir(queue_path, create=True)
    collector = Collector()
    watcher = wakeup.FolderWatcher(queue_path, collector)
    assert watcher.start()
    watcher.collector = collector
    yield watcher
    watcher.stop()


def move_into_new(folder, name):
    tmp = os.path.join(folder, "tmp", name)
    with open(tmp, "wb") as f:
        f.write(b"X-Zope-From: a@example.org\nX-Zope-To: b@example.org\n\n")
    os.rename(tmp, os.path.join(folder, "new", name))


def test_the_watcher_reports_messages_and_ignores_dotfiles(watcher, queue_path):
    move_into_new(queue_path, ".retry-x")
    os.link(os.path.join(queue_path, "new", ".retry-x"),
            os.path.join(queue_path, "new", ".sending-x"))
    move_into_new(queue_path, "message")
    assert watcher.collector.wait_for(None)
    assert all(w == {None} for w in watcher.collector.woken)


def test_the_watcher_follows_relay_folders(watcher, queue_path):
    relays.open_relay(queue_path, "crm", create=True)  # relays/ is new too
    assert watcher.collector.wait_for("crm")
    assert wait_for(lambda: watcher.covers("crm"))
    move_into_new(relays.relay_path(queue_path, "crm"), "message")
    assert wait_for(lambda: sum("crm" in w for w in watcher.collector.woken) >= 2)
    # A folder that is no relay folder, and a relay folder removed.
    os.mkdir(os.path.join(queue_path, "relays", "%zz"))
    os.rmdir(os.path.join(queue_path, "new"))
    assert wait_for(lambda: not watcher.covers(None))
    os.mkdir(os.path.join(queue_path, "new"))  # made again: watched again
    assert wait_for(lambda: watcher.covers(None))
    os.mkdir(os.path.join(queue_path, "failed"))  # nothing to watch in it
    shutil.rmtree(relays.relay_path(queue_path, "crm"))
    assert wait_for(lambda: not watcher.covers("crm"))
    assert wait_for(lambda: all(lane != "crm" for _kind, lane, _path
                                in list(watcher._watches.values())))


def test_the_watcher_of_a_relay_folder_being_made(watcher, queue_path):
    base = relays.relay_path(queue_path, "crm")
    os.makedirs(os.path.join(base, "new"))  # relays/, crm/ and new/ at once
    assert wait_for(lambda: watcher.covers("crm"))
    assert not any("crm" in w for w in watcher.collector.woken)  # incomplete
    os.mkdir(os.path.join(base, "tmp"))
    os.mkdir(os.path.join(base, "cur"))
    assert watcher.collector.wait_for("crm")


def test_the_watcher_of_a_queue_whose_new_folder_appears(queue_path):
    os.makedirs(os.path.join(queue_path, "tmp"))
    os.mkdir(os.path.join(queue_path, "cur"))
    collector = Collector()
    watcher = wakeup.FolderWatcher(queue_path, collector)
    try:
        assert not watcher.start()  # it needs new/ (a processor has one)
        assert watcher.fd == -1
        watcher._pipe = os.pipe()
        watcher.fd = wakeup.inotify_init()
        watcher._watch_folder(queue_path, None, set())
        assert not watcher.covers(None)
        os.mkdir(os.path.join(queue_path, "new"))
        data = os.read(watcher.fd, 65536)
        assert watcher.handle(data) == {None}
        watcher.thread = threading.current_thread()  # only for covers()
        assert watcher.covers(None)
    finally:
        watcher.thread = None
        watcher.close()


def test_a_limit_of_inotify_instances_is_a_warning(queue_path, monkeypatch,
                                                   caplog):
    def limited():
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    Maildir(queue_path, create=True)
    monkeypatch.setattr(wakeup, "inotify_init", limited)
    assert not wakeup.FolderWatcher(queue_path, Collector()).start()
    [record] = caplog.records
    assert record.levelname == "WARNING" and "not watching" in record.getMessage()


def test_without_inotify_a_note_is_logged(queue_path, no_inotify, caplog):
    caplog.set_level(logging.INFO, "mailoutbox.wakeup")
    Maildir(queue_path, create=True)
    assert not wakeup.FolderWatcher(queue_path, Collector()).start()
    [record] = caplog.records
    assert record.levelname == "INFO"


def test_a_missing_queue_is_not_watched(tmp_path, caplog):
    watcher = wakeup.FolderWatcher(str(tmp_path / "nowhere"), Collector())
    assert not watcher.start()
    assert "cannot watch" in caplog.text and watcher.fd == -1


def test_the_watcher_wakes_everything_after_an_overflow(watcher):
    event = wakeup._EVENT.pack(-1, wakeup.IN_Q_OVERFLOW, 0, 0)
    unknown = wakeup._EVENT.pack(12345, wakeup.IN_MOVED_TO, 0, 16) + b"x" * 16
    assert watcher.handle(event + unknown) == {wakeup.ALL}


def test_a_watch_that_cannot_be_added_is_logged_once(queue_path, monkeypatch,
                                                     caplog):
    Maildir(queue_path, create=True)
    calls = []

    def limited(fd, path, mask):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return 1

    monkeypatch.setattr(wakeup, "add_watch", limited)
    watcher = wakeup.FolderWatcher(queue_path, Collector())
    assert not watcher.start()
    assert caplog.text.count("No space left on device") == 1
    assert "cannot watch" in caplog.text
    assert watcher.fd == -1


def test_an_error_in_the_watcher_thread_ends_it(queue_path, caplog):
    Maildir(queue_path, create=True)

    def broken(names):
        raise RuntimeError("broken")

    watcher = wakeup.FolderWatcher(queue_path, broken)
    assert watcher.start()
    thread = watcher.thread
    move_into_new(queue_path, "message")
    thread.join(BOUND)
    assert not thread.is_alive()
    assert "stopped watching" in caplog.text
    assert not watcher.covers(None)  # in-process commits wake it directly
    watcher.stop()


def test_a_watcher_that_fails_to_start_leaves_polling(queue_path, monkeypatch,
                                                      caplog):
    class Broken(wakeup.FolderWatcher):
        def start(self):
            raise OSError(errno.EMFILE, "Too many open files")

    processor = QueueProcessorThread(60)
    processor.setQueuePath(queue_path)
    monkeypatch.setattr(wakeup.Wakeup, "watcher_factory", staticmethod(
        lambda store, wake, name: Broken(store.key, wake, name=name)))
    handle = wakeup.Wakeup(processor)
    handle.start()
    try:
        assert handle.watcher is None
        assert "cannot watch" in caplog.text
        wakeup.committed(queue_path, [None])
        assert processor._lanes.requests.take().names == {None}
    finally:
        handle.stop()
        handle.stop()  # twice: nothing happens


def test_committed_wakes_each_processor_of_the_queue(queue_path, monkeypatch,
                                                    caplog):
    monkeypatch.setattr(wakeup.Wakeup, "watcher_factory", None)
    one, two = QueueProcessorThread(60), QueueProcessorThread(60)
    for processor in (one, two):
        processor.setQueuePath(queue_path)
    handles = [wakeup.Wakeup(one), wakeup.Wakeup(two)]
    wakeup.committed(queue_path, [None])  # none running: nothing
    for handle in handles:
        handle.start()
    try:
        wakeup.committed(os.path.join(queue_path, ".", ""), {None: 1, "crm": 2})
        for processor in (one, two):
            assert processor._lanes.requests.take().names == {None, "crm"}
        monkeypatch.setattr(two, "wake", None)  # not callable: logged
        wakeup.committed(queue_path, [None])
        assert "could not wake the processor" in caplog.text
    finally:
        handles[0].stop()
        assert len(wakeup._registry[os.path.realpath(queue_path)]) == 1
        handles[1].stop()
    assert os.path.realpath(queue_path) not in wakeup._registry


def test_after_fork_the_child_forgets_watchers_and_processors(watcher, monkeypatch):
    monkeypatch.setattr(wakeup, "_registry", {"/somewhere": []})
    monkeypatch.setattr(wakeup, "_registry_lock", wakeup._registry_lock)
    thread = watcher.thread
    os.write(watcher._pipe[1], b"x")  # in a child, the thread does not exist
    thread.join(BOUND)
    wakeup._after_fork_in_child()  # what fork() runs in the child
    assert wakeup._registry == {}
    assert watcher.fd == -1 and watcher.thread is None


def test_wake_requests():
    requests = wakeup.WakeRequests()
    assert not requests.take()
    requests.add(["crm", None])
    woken = requests.take()
    assert woken and None in woken and "crm" in woken and "x" not in woken
    assert not woken.unknown({None: 1, "crm": 2}) and woken.unknown({None: 1})
    requests.add([wakeup.ALL])
    woken = requests.take()
    assert "x" in woken and woken.unknown({None: 1})
