"""Hardening of the queue processor, against real peers.

Servers: aiosmtpd (:class:`mailoutbox.testing.smtpd.SMTPServer`), and
:class:`Peer`, a scripted SMTP peer in a thread, for behaviour aiosmtpd
cannot produce: a relay that never answers QUIT, one that takes seconds
to accept the data, one that trickles its reply.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import socket
import threading
import time
import weakref

import pytest

from mailoutbox import processors
from mailoutbox import queue
from mailoutbox import relays
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import MAX_CONCURRENCY
from mailoutbox.queue import QueueProcessorThread
from mailoutbox.testing.smtpd import SMTPServer
from mailoutbox.workers import Heartbeat
from mailoutbox.workers import Pass
from mailoutbox.workers import WorkerStartError

from ._drain_worker import fill_queue
from ._drain_worker import make_mailer
from ._drain_worker import queue_is_empty


def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def workers():
    return [t for t in threading.enumerate()
            if t.name.startswith("mailoutbox.queue.QueueProcessorThread-")]


class Peer:
    """An SMTP server on 127.0.0.1 in a thread, with scripted misbehaviour.

    *answer_quit* false: QUIT is never answered (the connection stays open
    until the client closes it).  *data_delay*: seconds before the reply to
    the end of the data.  *trickle*: the reply to the end of the data is
    sent one byte every *trickle* seconds, and never ends.  ``messages``
    lists the Message-Id lines of the messages accepted.
    """

    def __init__(self, *, answer_quit=True, data_delay=0.0, trickle=0.0):
        self.answer_quit = answer_quit
        self.data_delay = data_delay
        self.trickle = trickle
        self.messages = []
        self.commands = []
        self.data_started = threading.Event()
        self._closing = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    def _serve(self):
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._session, args=(conn,),
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def _session(self, conn):
        conn.settimeout(0.1)
        reader = _Lines(conn, self._closing)
        try:
            conn.sendall(b"220 peer ESMTP\r\n")
            while (line := reader.line()) is not None:
                verb = line[:4].upper()
                self.commands.append(verb.decode())
                if verb == b"EHLO":
                    conn.sendall(b"250-peer\r\n250 8BITMIME\r\n")
                elif verb == b"QUIT":
                    if self.answer_quit:
                        conn.sendall(b"221 bye\r\n")
                        return
                    while reader.line() is not None:  # until the client closes
                        pass
                    return
                elif verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    self.data_started.set()
                    ids = []
                    while (data := reader.line()) not in (b".", None):
                        if data.lower().startswith(b"message-id:"):
                            ids.append(data.split(b":", 1)[1].strip().decode())
                    if self._closing.wait(self.data_delay):
                        return
                    if self.trickle:
                        while not self._closing.wait(self.trickle):
                            conn.sendall(b"2")
                        return
                    self.messages.extend(ids)
                    conn.sendall(b"250 accepted\r\n")
                else:
                    conn.sendall(b"250 ok\r\n")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self._closing.set()
        for thread in self._threads:
            thread.join(10)
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class _Lines:
    def __init__(self, conn, closing):
        self.conn, self.closing, self.buffer = conn, closing, b""

    def line(self):
        """The next line without its end; None once closed."""
        while b"\r\n" not in self.buffer:
            if self.closing.is_set():
                return None
            try:
                chunk = self.conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line


def make_processor(queue_path, mailer, **options):
    processor = QueueProcessorThread(**options)
    processor.setMailer(mailer)
    processor.setQueuePath(queue_path)
    return processor


# -- 1. claims are renewed whatever the network does --------------------------


@pytest.mark.slow
def test_a_relay_that_never_answers_quit_does_not_starve_claim_renewal(queue_path):
    with Peer(answer_quit=False) as hung, Peer(data_delay=8.0) as slow:
        relays.open_relay(queue_path, "hung", create=True)
        fill_queue(relays.relay_path(queue_path, "hung"), 1, prefix="hung")
        fill_queue(queue_path, 1, prefix="main")
        made = []
        for _ in range(2):
            processor = make_processor(
                queue_path, make_mailer(slow.port, timeout=20), interval=0.1,
                lease=2.0, concurrency=1,
                mailers={"hung": make_mailer(hung.port, timeout=6)})
            made.append(processor)
        first, second = made
        first.start()
        # the first processor sends the relay's message and goes idle on
        # that relay (closing its connection: QUIT, never answered) while
        # it sends the queue's message, which takes 8 s
        wait_until(lambda: hung.messages and slow.data_started.is_set())
        second.start()
        wait_until(lambda: queue_is_empty(queue_path), timeout=60)
        for processor in made:
            processor.stop(timeout=60)
        assert hung.messages == ["<hung-0@mailoutbox.test>"]
        assert slow.messages == ["<main-0@mailoutbox.test>"]


def test_the_heartbeat_logs_errors_and_goes_on(caplog):
    class Job:
        renewed = 0
        maildir = type("Maildir", (), {"path": "/queue"})

        def renew_claims(self):
            self.renewed += 1
            raise PermissionError("cannot touch")

    heartbeat = Heartbeat(0.01, "test")
    job = Job()
    heartbeat.add(job)
    wait_until(lambda: job.renewed >= 2)
    heartbeat.close()
    heartbeat.close()  # once is enough
    assert "error while renewing the claims in /queue" in caplog.text
    assert heartbeat.thread is None


# -- 2. a processor closes only its own connections ---------------------------


def test_idle_passes_do_not_close_another_threads_connection(queue_path):
    with SMTPServer() as server:
        server.slow(0.3)  # MAIL and the end of the data take 0.3 s each
        mailer = make_mailer(server.port, timeout=10)
        processor = make_processor(queue_path, mailer, concurrency=1,
                                   adaptive=False)
        fill_queue(queue_path, 1, prefix="queued")
        assert processor.process_queue().sent == 1  # a connection is open
        errors = []

        def direct():
            try:
                for i in range(2):
                    mailer.send("app@example.org", ["jane@example.org"],
                                b"Message-Id: <direct-%d@example.org>\r\n"
                                b"Subject: direct\r\n\r\nHello\r\n" % i)
            except Exception as exc:
                errors.append(exc)

        other = threading.Thread(target=direct)
        other.start()
        wait_until(lambda: server.commands.count("MAIL") == 2)  # it is sending
        deadline = time.monotonic() + 30
        while other.is_alive() and time.monotonic() < deadline:
            processor.process_queue()  # idle passes while the other sends
            time.sleep(0.05)
        other.join(30)
        processor.stop(timeout=10)
        assert errors == []
        assert sorted(m.message_id for m in server.messages) == [
            "direct-0@example.org", "direct-1@example.org",
            "queued-0@mailoutbox.test"]
        mailer.close()


# -- 3. fork ------------------------------------------------------------------


def _child_exits(processor, queue_path, results):
    # what the child's interpreter runs at exit, and whether anything runs
    try:
        processor.stop()  # the atexit handler of the thread
        processors.stop_processor_threads()  # that of the registry
        assert processors.processor_threads() == {}
        assert processor._lanes.threads() == []
        assert processor.process_queue().total == 0  # stopped: sends nothing
        results.put("ok")
    except BaseException as exc:  # reported by the parent
        results.put(repr(exc))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs fork()")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_a_forked_child_exits_at_once_and_sends_nothing(queue_path):
    with Peer(data_delay=1.5) as slow:
        fill_queue(queue_path, 1, prefix="forked")
        processor = processors.start_processor_thread(
            queue_path, make_mailer(slow.port, timeout=10), interval=0.05)
        try:
            wait_until(lambda: slow.data_started.is_set())  # a pass in flight
            context = multiprocessing.get_context("fork")
            results = context.Queue()
            child = context.Process(target=_child_exits,
                                    args=(processor, queue_path, results))
            child.start()
            child.join(20)
            if child.is_alive():  # pragma: no cover - the bug
                child.kill()
                child.join()
                pytest.fail("the forked child hung")
            assert results.get(timeout=5) == "ok"
            assert child.exitcode == 0
            wait_until(lambda: queue_is_empty(queue_path))
        finally:
            processors.stop_processor_threads(timeout=20)
        assert slow.messages == ["<forked-0@mailoutbox.test>"]


def test_a_started_processor_is_stopped_in_a_child(queue_path, monkeypatch):
    # what fork() runs in the child, run here (coverage does not see the
    # child before multiprocessing starts it)
    processor = make_processor(queue_path, object(), interval=0.05)
    processor.start()
    monkeypatch.setattr(processors, "_threads", {queue_path: processor})
    processors._forget_after_fork()
    assert processors.processor_threads() == {}
    processor.stop(timeout=10)
    processor._after_fork_in_child()
    assert processor._stopping.is_set()
    processor.stop(timeout=1)


def test_a_processor_not_started_can_still_be_used_in_a_child(queue_path):
    processor = make_processor(queue_path, object())
    processor._after_fork_in_child()  # what fork() runs in the child
    assert not processor._stopping.is_set()
    assert processor.process_queue().total == 0


# -- 4. threads that cannot be started ----------------------------------------


class Refuse:
    """Of the threads whose name contains *marker*, only the first
    *allowed* start; the others raise as when the process has no room for
    another thread."""

    def __init__(self, monkeypatch, marker="-worker-", allowed=2):
        self.marker, self.allowed, self.started = marker, allowed, 0
        start = threading.Thread.start

        def limited(thread):
            if self.marker in thread.name:
                if self.started >= self.allowed:
                    raise RuntimeError("can't start new thread")
                self.started += 1
            start(thread)

        monkeypatch.setattr(threading.Thread, "start", limited)


@pytest.fixture
def refused(monkeypatch):
    return Refuse(monkeypatch)


def test_a_pass_whose_workers_cannot_start_fails_cleanly(queue_path, refused,
                                                        caplog):
    with SMTPServer() as server:
        fill_queue(queue_path, 2)
        processor = make_processor(queue_path, make_mailer(server.port),
                                   concurrency=4)
        with pytest.raises(WorkerStartError, match=r"thread 3 of 4.*can't start"):
            processor.process_queue()
        assert workers() == []  # those started were ended
        assert "could not start the worker thread 3 of 4" in caplog.text
        refused.allowed = 100
        assert processor.process_queue().sent == 2  # the next pass works
        processor.stop(timeout=10)
        assert workers() == []


def test_the_daemon_retries_a_pass_whose_workers_cannot_start(queue_path, refused,
                                                             caplog):
    refused.allowed = 0
    with SMTPServer() as server:
        fill_queue(queue_path, 2)
        processor = make_processor(queue_path, make_mailer(server.port),
                                   concurrency=2, interval=0.05)
        processor.start()
        wait_until(lambda: caplog.text.count("could not start the worker") >= 3)
        assert [t for t in workers() if "worker" in t.name] == []
        refused.allowed = 100
        wait_until(lambda: len(server.messages) == 2)
        processor.stop(timeout=10)
        assert not processor.is_alive()


def test_a_heartbeat_that_cannot_start_fails_the_pass(queue_path, monkeypatch):
    Refuse(monkeypatch, "-heartbeat", allowed=0)
    with SMTPServer() as server:
        fill_queue(queue_path, 1)
        processor = make_processor(queue_path, make_mailer(server.port))
        with pytest.raises(RuntimeError, match="can't start new thread"):
            processor.process_queue()
        processor.stop(timeout=10)  # does not hang
        assert server.messages == [] and workers() == []


# -- 5. numbers are checked ---------------------------------------------------


@pytest.mark.parametrize(("options", "error"), [
    ({"interval": 0}, ValueError), ({"interval": -1}, ValueError),
    ({"interval": math.nan}, ValueError), ({"interval": math.inf}, ValueError),
    ({"interval": "3"}, TypeError), ({"interval": True}, TypeError),
    ({"lease": math.nan}, ValueError), ({"lease": math.inf}, ValueError),
    ({"lease": -2}, ValueError), ({"lease": None}, TypeError),
    ({"concurrency": MAX_CONCURRENCY + 1}, ValueError),
    ({"concurrency": 1000}, ValueError), ({"concurrency": True}, ValueError),
    ({"concurrency": 0}, ValueError),
])
def test_numbers_are_checked(options, error):
    name = next(iter(options))
    with pytest.raises(error, match=name):
        QueueProcessorThread(**options)


def test_the_interval_is_checked_when_set():
    processor = QueueProcessorThread(concurrency=MAX_CONCURRENCY)
    for value in (0, -5, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"pollingInterval.*milliseconds"):
            processor.pollingInterval = value
        with pytest.raises(ValueError, match=r"interval.*seconds"):
            processor.interval = value
    assert processor.interval == 3.0
    processor.pollingInterval = 250
    assert processor.interval == 0.25


# -- 6. stop() within the mailer's timeout ------------------------------------


def test_stop_returns_while_a_relay_trickles_its_reply(queue_path):
    with Peer(trickle=0.2) as trickler:
        fill_queue(queue_path, 1)
        mailer = SMTPMailer("127.0.0.1", trickler.port, no_tls=True, timeout=2)
        processor = make_processor(queue_path, mailer, interval=0.05)
        processor.start()
        wait_until(lambda: trickler.data_started.is_set())
        processor.stop(timeout=10)
        assert not processor.is_alive() and workers() == []
        assert trickler.messages == []
        assert not queue_is_empty(queue_path)  # deferred, not lost


def test_worker_threads_close_their_connections_at_stop(queue_path, caplog):
    caplog.set_level(logging.DEBUG, "mailoutbox")
    with Peer(answer_quit=False) as hung:
        fill_queue(queue_path, 2)
        processor = make_processor(queue_path, make_mailer(hung.port, timeout=2),
                                   concurrency=2, adaptive=False)
        assert processor.process_queue().sent == 2
        processor.stop(timeout=10)  # QUIT is never answered: bounded by 2 s
        assert workers() == []
        assert hung.commands.count("QUIT") == 2


def test_every_processor_is_reset_in_a_child(queue_path, monkeypatch):
    processor = make_processor(queue_path, object())
    monkeypatch.setattr(queue, "_processors", weakref.WeakSet([processor]))
    processor._pass_lock.acquire()  # as a thread of the parent holds it
    queue._after_fork_in_child()  # what fork() runs in the child
    processor.stop(timeout=1)  # the lock is a new one


def test_renewal_does_not_wait_for_the_progress_callback(queue_path):
    # the pass's lock is held while the progress callback runs (it may
    # write to a stalled terminal): renewing the claims must not need it
    fill_queue(queue_path, 1)
    maildir = Maildir(queue_path)
    scan = maildir.scan()
    job = Pass(maildir, scan, time.time, threading.Event(), None, None, 1)
    claim = maildir.claim(scan.entries[0], 30.0)
    job.hold(claim)
    os.utime(claim.claim_path, (0, 0))
    with job._lock:  # as while a slow progress callback runs
        renewer = threading.Thread(target=job.renew_claims, daemon=True)
        renewer.start()
        renewer.join(10)
        assert not renewer.is_alive()
    assert os.stat(claim.claim_path).st_mtime > 0
    job.drop(claim)
    claim.release()


def test_stop_closes_the_connections_of_every_relay_at_once(queue_path):
    # eight relays that never answer QUIT, each a mailer with a 2 s
    # timeout: closing their connections one after the other would take
    # 16 s; the workers close theirs at the same time
    names = [f"r{i}" for i in range(8)]
    with Peer(answer_quit=False) as hung:
        for name in names:
            relays.open_relay(queue_path, name, create=True)
            fill_queue(relays.relay_path(queue_path, name), 1, prefix=name)
        processor = make_processor(
            queue_path, make_mailer(hung.port, timeout=2), interval=0.05,
            concurrency=1, max_relays=8,
            mailers={name: make_mailer(hung.port, timeout=2) for name in names})
        processor.start()
        wait_until(lambda: len(hung.messages) == 8)
        processor.stop(timeout=10)
        assert workers() == []
        assert sorted(hung.messages) == [f"<{n}-0@mailoutbox.test>" for n in names]
