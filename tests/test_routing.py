"""Routing messages to named relays: the relay folders on disk, the
deliveries, and the processor draining several real SMTP servers at once
(one of them down, one of them slow)."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import pytest
import transaction
import zope.component
import zope.event
from hypothesis import given
from hypothesis import strategies as st

from mailoutbox import relays
from mailoutbox.delivery import DirectMailDelivery
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.envelope import parse_queue_file
from mailoutbox.errors import MailConnectionError
from mailoutbox.interfaces import IMailer
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread
from mailoutbox.testing.smtpd import SMTPServer
from mailoutbox.workers import Stats

RELAYS = ("fast", "slow", "dead")


# -- helpers --------------------------------------------------------------------


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mailer(port: int) -> SMTPMailer:
    return SMTPMailer("127.0.0.1", port, no_tls=True, timeout=5)


def route(queue_path, relay, count, *, prefix=None, names=RELAYS):
    """Queue *count* messages for *relay* (None: unrouted) through a real
    delivery and transaction, each with a Bcc; return their Message-Ids."""
    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager,
                                  mailers=names)
    prefix = prefix or relay or "main"
    ids = []
    with manager:
        for i in range(count):
            data = (
                f"From: app@example.org\r\nTo: {prefix}-{i}@example.org\r\n"
                f"Bcc: {prefix}-secret@example.org\r\n"
                f"Message-Id: <{prefix}-{i}@mailoutbox.test>\r\n"
                f"Subject: {prefix} {i}\r\n\r\nBody\r\n"
            ).encode()
            ids.append(delivery.send_message(data, mailer=relay))
    return ids


def folder(queue_path, relay=None):
    return queue_path if relay is None else relays.relay_path(queue_path, relay)


def names(queue_path, relay=None):
    path = folder(queue_path, relay)
    return [n for sub in ("new", "cur") for n in os.listdir(os.path.join(path, sub))]


def waiting(queue_path, relay=None):
    return sorted(n for n in names(queue_path, relay) if not n.startswith("."))


def dotfiles(queue_path, relay=None):
    return sorted(n for n in names(queue_path, relay) if n.startswith("."))


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def worker_threads():
    return [t for t in threading.enumerate() if "QueueProcessorThread-worker" in t.name]


@pytest.fixture
def servers():
    """A default server and the fast and slow relays; "dead" is a closed port."""
    with SMTPServer() as main, SMTPServer() as fast, SMTPServer() as slow:
        slow.slow(0.5)
        yield {"main": main, "fast": fast, "slow": slow, "dead": closed_port()}


@pytest.fixture
def make_processor(queue_path):
    made = []

    def make(servers=None, **options):
        processor = QueueProcessorThread(**options)
        if servers is not None:
            processor.setMailer(mailer(servers["main"].port))
            processor.setMailers({
                name: mailer(port if isinstance(port, int) else port.port)
                for name, port in servers.items() if name != "main"
            })
        processor.setQueuePath(queue_path)
        made.append(processor)
        return processor

    yield make
    for processor in made:
        processor.stop(timeout=10)
    assert worker_threads() == []


# -- names on disk ----------------------------------------------------------------


@pytest.mark.parametrize(("name", "folder_name"), [
    ("crm-1", "crm-1"),
    ("crm_2", "crm_2"),
    (".", "%2E"),
    ("..", "%2E%2E"),
    ("a/../b", "a%2F%2E%2E%2Fb"),
    ("mail relay", "mail%20relay"),
    ("zoë", "zo%C3%AB"),
    ("%41", "%2541"),
])
def test_relay_folder_names(name, folder_name):
    assert relays.encode_name(name) == folder_name
    assert relays.decode_name(folder_name) == name


@given(st.text(min_size=1, max_size=60).filter(
    lambda s: not any(c < " " or "\x7f" <= c <= "\x9f" or 0xD800 <= ord(c) < 0xE000
                      for c in s)))
def test_every_name_makes_a_safe_folder_name_and_back(name):
    encoded = relays.encode_name(name)
    assert set(encoded) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                               "0123456789_-%")
    assert not encoded.startswith(".") and "/" not in encoded
    if len(encoded) > relays.MAX_NAME_LENGTH:
        with pytest.raises(ValueError, match="too long"):
            relays.check_name(name)
        assert relays.decode_name(encoded) is None
    else:
        assert relays.check_name(name) == name
        assert relays.decode_name(encoded) == name


@pytest.mark.parametrize("folder_name", [
    ".", "..", "", "%41", "%2e", "a%2", "a%zz", "a b", "%FF", "%0A", ".hidden",
    "x" * 201,
])
def test_folder_names_no_name_encodes_to(folder_name):
    assert relays.decode_name(folder_name) is None


@pytest.mark.parametrize(("name", "error"), [
    ("", "cannot be empty"),
    ("a\nb", "control character"),
    ("\ud800", "not valid text"),
    ("x" * 201, "too long"),
])
def test_bad_names(name, error):
    with pytest.raises(ValueError, match=error):
        relays.check_name(name)


def test_names_must_be_strings():
    with pytest.raises(TypeError, match="must be a str"):
        relays.check_name(b"crm")
    with pytest.raises(TypeError, match="not one string"):
        relays.check_names("crm")
    assert relays.check_names(None) == frozenset()
    assert relays.check_names({"a": 1, "b": 2}) == {"a", "b"}


# -- the queued delivery -------------------------------------------------------------


def test_a_routed_message_is_queued_in_its_relay_folder(queue_path):
    [mid] = route(queue_path, "a/../b", 1, prefix="odd", names=["a/../b"])
    path = os.path.join(queue_path, "relays", "a%2F%2E%2E%2Fb")
    assert relays.relay_folders(queue_path) == [("a/../b", path)]
    assert waiting(queue_path) == []  # nothing in the queue's own folders
    [entry] = Maildir(path).scan().entries
    with open(entry.path, "rb") as f:
        fromaddr, toaddrs, message = parse_queue_file(f.read())
    assert (fromaddr, toaddrs) == ("app@example.org",
                                   ("odd-0@example.org", "odd-secret@example.org"))
    assert f"Message-Id: <{mid}>".encode() in message
    assert b"Bcc" not in message and b"a/../b" not in message
    for directory in (os.path.join(queue_path, "relays"), path):
        assert os.stat(directory).st_mode & 0o777 == 0o700


def test_messages_of_one_transaction_to_several_folders(queue_path):
    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager,
                                  mailers={"fast": object(), "slow": object()})
    with manager:
        for relay in (None, "fast", "slow", "fast"):
            delivery.send("a@example.org", ["b@example.org"], b"Subject: x\n\n",
                          mailer=relay)
    assert len(waiting(queue_path)) == 1
    assert len(waiting(queue_path, "fast")) == 2
    assert len(waiting(queue_path, "slow")) == 1
    # the folder is made again if removed meanwhile
    import shutil
    shutil.rmtree(os.path.join(queue_path, "relays"))
    with manager:
        delivery.send("a@example.org", ["b@example.org"], b"Subject: y\n\n",
                      mailer="slow")
    assert len(waiting(queue_path, "slow")) == 1


@pytest.mark.parametrize("name", ["other", "", "FAST", None])
def test_a_mailer_not_configured_is_refused_with_nothing_joined(queue_path, name):
    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager,
                                  mailers=["fast"])
    manager.begin()
    if name is None:
        with pytest.raises(TypeError, match="must be a str"):
            delivery.send("a@example.org", ["b@example.org"], b"S: x\n\n", mailer=7)
    else:
        with pytest.raises(ValueError) as info:
            delivery.send_message(b"From: a@example.org\nTo: b@example.org\n\n",
                                  mailer=name)
        message = str(info.value)
        assert (name == "" and "cannot be empty" in message) or (
            f"cannot route a message to the mailer {name!r}" in message
            and "(configured: 'fast')" in message)
    assert manager.get()._resources == []
    manager.commit()
    assert not os.path.exists(queue_path)
    bare = QueuedMailDelivery(queue_path)
    with pytest.raises(ValueError, match=r"\(configured: none\)"):
        bare.send("a@example.org", ["b@example.org"], b"S: x\n\n", mailer="fast")


def test_the_headers_cannot_choose_the_relay(queue_path):
    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager,
                                  mailers=["fast"])
    with manager:
        delivery.send_message(
            b"From: a@example.org\nTo: b@example.org\nX-Mailer: fast\n"
            b"X-Mailoutbox-Relay: fast\nX-Relay: fast\n\n")
    assert len(waiting(queue_path)) == 1
    assert relays.relay_folders(queue_path) == []


def test_mailers_must_be_names(queue_path):
    with pytest.raises(TypeError, match="not one string"):
        QueuedMailDelivery(queue_path, mailers="fast")
    with pytest.raises(ValueError, match="control character"):
        QueuedMailDelivery(queue_path, mailers=["a\tb"])
    with pytest.raises(TypeError, match="must map names to mailers"):
        DirectMailDelivery(object(), mailers=["fast"])


def test_open_relay_refuses_symbolic_links(queue_path, tmp_path):
    elsewhere = str(tmp_path / "elsewhere")
    Maildir(elsewhere, create=True)
    os.makedirs(os.path.join(queue_path, "relays"))
    os.symlink(elsewhere, relays.relay_path(queue_path, "crm"))
    with pytest.raises(ValueError, match="is a symbolic link"):
        relays.open_relay(queue_path, "crm", create=True)
    assert relays.relay_folders(queue_path) == []


# -- the processor ----------------------------------------------------------------


def test_each_message_reaches_its_server_with_its_envelope(
        queue_path, servers, make_processor, events):
    ids = {relay: route(queue_path, relay, 3) for relay in (None, *RELAYS)}
    processor = make_processor(servers, concurrency=2)
    stats = processor.process_queue()
    assert (stats.sent, stats.deferred, stats.failed) == (9, 3, 0)
    assert stats.relays == {
        "dead": Stats(deferred=3), "fast": Stats(sent=3), "slow": Stats(sent=3)}
    for relay, server in (("main", servers["main"]), ("fast", servers["fast"]),
                          ("slow", servers["slow"])):
        key = None if relay == "main" else relay
        assert sorted(server.message_ids()) == sorted(ids[key])
        for received in server.messages:
            assert received.mail_from == "app@example.org"
            number = received.message_id.split("@")[0].rsplit("-", 1)[1]
            assert received.rcpt_tos == [f"{relay}-{number}@example.org",
                                         f"{relay}-secret@example.org"]
            assert b"secret" not in received.data and b"Bcc" not in received.data
    # The dead relay's messages are deferred in its folder, intact.
    assert len(waiting(queue_path, "dead")) == 3
    assert len(dotfiles(queue_path, "dead")) == 3  # .retry- files
    deferred = [e for e in events if not getattr(e, "permanent", True)]
    assert {e.messageId for e in deferred} == set(ids["dead"])
    assert all("Connection refused" in e.errorMessage or "refused" in e.errorMessage
               for e in deferred)
    for relay in (None, "fast", "slow"):
        assert waiting(queue_path, relay) == []


def test_a_relay_without_a_mailer_is_deferred_not_failed(
        queue_path, servers, make_processor, events, caplog):
    route(queue_path, "fast", 1)
    route(queue_path, "unknown", 2, names=["unknown"])
    processor = make_processor(servers)
    stats = processor.process_queue()
    assert (stats.sent, stats.deferred, stats.failed) == (1, 2, 0)
    errors = [e for e in events if hasattr(e, "permanent")]
    assert len(errors) == 2 and not any(e.permanent for e in errors)
    assert "no mailer named 'unknown' is configured" in errors[0].errorMessage
    maildir = Maildir(relays.relay_path(queue_path, "unknown"))
    state = maildir.retry_state(maildir.scan().entries[0])
    assert "no mailer named 'unknown'" in state["error"]
    assert "no mailer named 'unknown'" in caplog.text
    # One line for the relay (each message has its own at INFO).
    assert "deferred 2 message(s) via relay 'unknown', e.g. unknown-0@" in caplog.text


def test_a_named_imailer_utility_is_used(queue_path, servers, make_processor,
                                        caplog):
    caplog.set_level(logging.INFO, logger="mailoutbox.queue")
    route(queue_path, "registered", 2, names=["registered"])
    registry = zope.component.getGlobalSiteManager()
    utility = mailer(servers["fast"].port)
    registry.registerUtility(utility, IMailer, "registered")
    try:
        assert make_processor(servers).process_queue().sent == 2
    finally:
        registry.unregisterUtility(utility, IMailer, "registered")
    assert len(servers["fast"].messages) == 2
    assert "sent registered-0@mailoutbox.test via relay 'registered'" in caplog.text


def test_a_routed_message_survives_a_processor_restart(queue_path, servers,
                                                      make_processor):
    [mid] = route(queue_path, "fast", 1)
    first = make_processor()
    first.setMailer(mailer(servers["main"].port))
    first.setMailers({"fast": mailer(servers["dead"])})  # down for now
    assert first.process_queue().deferred == 1
    first.stop(timeout=10)
    assert servers["fast"].messages == []
    second = make_processor(servers)  # a new processor: the relay is back
    assert second.process_queue().skipped == 1  # not due yet
    stats = second.process_queue(now=time.time() + 3600)
    assert stats.relays["fast"].sent == 1
    assert servers["fast"].message_ids() == [mid]
    assert waiting(queue_path, "fast") == [] and dotfiles(queue_path, "fast") == []


def test_a_processor_stopped_before_sending_leaves_the_message(queue_path, servers,
                                                              make_processor):
    first = make_processor(servers, interval=60)
    first.start()
    wait_until(lambda: first.is_alive())
    first.stop(timeout=10)  # before anything was queued
    [mid] = route(queue_path, "slow", 1)
    assert waiting(queue_path, "slow") != []
    second = make_processor(servers)
    assert second.process_queue().sent == 1
    assert servers["slow"].message_ids() == [mid]


def test_failures_claims_and_cleanup_inside_a_relay_folder(
        queue_path, servers, make_processor, caplog):
    servers["fast"].reply("DATA", "554 5.7.1 rejected")
    [mid] = route(queue_path, "fast", 1)
    maildir = Maildir(relays.relay_path(queue_path, "fast"))
    # a stale claim left by a dead processor, and leftovers of crashes
    [entry] = maildir.scan().entries
    os.link(entry.path, entry.sidecar(".sending-"))
    os.utime(entry.sidecar(".sending-"), (time.time() - 3600,) * 2)
    with open(os.path.join(maildir.new, ".retry-gone"), "w") as f:
        f.write("{}")
    old = os.path.join(maildir.tmp, "crashed")
    with open(old, "w") as f:
        f.write("x")
    os.utime(old, (time.time() - 40 * 3600,) * 2)
    stats = make_processor(servers, lease=5).process_queue()
    assert stats.relays["fast"].failed == 1
    [failed] = maildir.failed_entries()
    assert maildir.reason(failed)["code"] == 554
    assert maildir.reason(failed)["message_id"] == mid
    assert f"moved {mid} via relay 'fast' ({failed.name}) to the failed" in caplog.text
    assert os.listdir(maildir.tmp) == [] and dotfiles(queue_path, "fast") == []
    assert not os.path.exists(os.path.join(queue_path, "failed"))


def test_foreign_entries_in_the_relays_folder_are_left_alone(
        queue_path, servers, make_processor, tmp_path, caplog):
    elsewhere = str(tmp_path / "elsewhere")
    route(elsewhere, None, 1)  # a queue that must not be drained
    route(queue_path, "fast", 1)
    base = os.path.join(queue_path, "relays")
    os.symlink(elsewhere, os.path.join(base, "linked"))
    Maildir(os.path.join(base, "%41"), create=True)  # "A", not canonical
    os.mkdir(os.path.join(base, "not-a-maildir"))
    with open(os.path.join(base, "a-file"), "w") as f:
        f.write("x")
    processor = make_processor(servers)
    assert processor.process_queue().sent == 1
    assert processor.process_queue().sent == 0
    assert len(waiting(elsewhere)) == 1
    assert caplog.text.count("ignoring the relay 'not-a-maildir'") == 1
    assert servers["main"].messages == []


def test_a_file_or_a_link_called_relays(queue_path, servers, make_processor, tmp_path):
    route(queue_path, None, 1)
    with open(os.path.join(queue_path, "relays"), "w") as f:
        f.write("x")
    assert relays.relay_folders(queue_path) == []
    assert make_processor(servers).process_queue().sent == 1
    os.unlink(os.path.join(queue_path, "relays"))
    elsewhere = str(tmp_path / "elsewhere")
    route(elsewhere, "fast", 1)
    os.symlink(os.path.join(elsewhere, "relays"), os.path.join(queue_path, "relays"))
    assert relays.relay_folders(queue_path) == []


def test_a_relay_folder_removed_meanwhile_is_forgotten(queue_path, servers,
                                                      make_processor):
    route(queue_path, "fast", 1)
    processor = make_processor(servers)
    assert processor.process_queue().sent == 1
    import shutil
    shutil.rmtree(relays.relay_path(queue_path, "fast"))
    assert processor.process_queue().total == 0
    assert list(processor._lanes.lanes) == [None]


def test_the_queue_and_relays_in_parallel_with_a_cap(queue_path, servers,
                                                    make_processor):
    names = [f"r{i}" for i in range(5)]
    for name in names:
        route(queue_path, name, 2, names=names)
    processor = make_processor(concurrency=2, max_relays=2)
    processor.setMailer(mailer(servers["main"].port))
    processor.setMailers({name: mailer(servers["fast"].port) for name in names})
    most = []

    def count(done, total):
        most.append((len(worker_threads()), done, total))

    stats = processor.process_queue(on_progress=count)
    assert stats.sent == 10 and sorted(stats.relays) == names
    assert len(servers["fast"].messages) == 10
    assert max(n for n, _d, _t in most) <= 2 * (1 + 2)
    assert [d for _n, d, _t in most] == list(range(1, 11))
    assert most[-1][1:] == (10, 10)


def test_the_fast_relay_is_not_held_up_by_the_slow_and_the_dead(
        queue_path, servers, make_processor, tmp_path):
    """The figures are printed (run with -s); see docs/routing.rst."""
    count = 20

    def deliver_fast(path, load):
        route(path, "fast", count)
        if load:
            route(path, "slow", count)
            route(path, "dead", count)
        processor = QueueProcessorThread(0.05, concurrency=2)
        processor.setMailer(mailer(servers["main"].port))
        processor.setMailers({"fast": mailer(servers["fast"].port),
                              "slow": mailer(servers["slow"].port),
                              "dead": mailer(servers["dead"])})
        processor.setQueuePath(path)
        servers["fast"].reset()
        started = time.monotonic()
        processor.start()
        try:
            wait_until(lambda: len(servers["fast"].messages) == count, timeout=20)
            elapsed = time.monotonic() - started
            slow_done = len(servers["slow"].messages)
        finally:
            processor.stop(timeout=10)
        return elapsed, slow_done

    alone, _ = deliver_fast(str(tmp_path / "alone"), load=False)
    loaded, slow_done = deliver_fast(queue_path, load=True)
    print(f"\n{count} messages to the fast relay: {alone:.3f} s alone,"
          f" {loaded:.3f} s with {count} to a slow relay (0.5 s per reply) and"
          f" {count} to a dead one; the slow relay had {slow_done} by then")
    assert slow_done < count  # the slow relay was still busy
    assert loaded < alone + 1.0, (alone, loaded)
    dead = Maildir(relays.relay_path(queue_path, "dead"))
    assert len(dead.scan().retry_at) == count  # all deferred, none failed


def test_a_busy_slow_relay_does_not_delay_the_next_pass_of_the_others(
        queue_path, servers, make_processor):
    route(queue_path, "slow", 4)
    processor = make_processor(servers, interval=0.05, concurrency=1)
    processor.start()
    wait_until(lambda: dotfiles(queue_path, "slow"))  # the slow pass is on
    started = time.monotonic()
    route(queue_path, "fast", 1)
    route(queue_path, None, 1)
    wait_until(lambda: servers["fast"].messages and servers["main"].messages)
    elapsed = time.monotonic() - started
    assert len(servers["slow"].messages) < 4  # still busy: 1 s per message
    assert elapsed < 1.0, elapsed
    processor.stop(timeout=10)
    assert dotfiles(queue_path, "slow") == []  # the claim in flight was ended


def test_a_busy_relay_waits_for_a_free_slot_in_the_thread(queue_path, servers,
                                                         make_processor):
    route(queue_path, "slow", 2)
    processor = make_processor(servers, interval=0.05, concurrency=1, max_relays=1)
    processor.start()
    wait_until(lambda: dotfiles(queue_path, "slow"))
    route(queue_path, "fast", 1)
    time.sleep(0.3)
    assert servers["fast"].messages == []  # the only slot is taken
    wait_until(lambda: len(servers["fast"].messages) == 1)
    assert len(servers["slow"].messages) == 2


def test_stop_from_a_subscriber_in_a_relay_worker(queue_path, servers,
                                                 make_processor):
    route(queue_path, "fast", 3)
    processor = make_processor(servers, concurrency=1)

    def stop(event):
        processor.stop()

    zope.event.subscribers.append(stop)
    try:
        assert processor.process_queue().sent == 1
    finally:
        zope.event.subscribers.remove(stop)
    assert len(waiting(queue_path, "fast")) == 2


def test_relay_errors_in_the_thread_are_logged(queue_path, servers, make_processor,
                                               caplog):
    route(queue_path, "fast", 1)

    class Flaky(Maildir):
        failures = 2

        def scan(self):
            if self.failures:
                Flaky.failures -= 1
                raise PermissionError("flaky relay folder")
            return super().scan()

    processor = make_processor(servers, interval=0.01)
    processor.maildir_factory = Flaky
    processor.setQueuePath(queue_path)  # its relays are opened by it too
    processor.start()
    wait_until(lambda: servers["fast"].messages)
    assert caplog.text.count("error while processing the queue") == 2
    assert "flaky relay folder" in caplog.text


def test_relay_errors_in_one_pass_are_logged_and_the_others_go_on(
        queue_path, servers, make_processor, caplog, monkeypatch):
    route(queue_path, "fast", 1)
    route(queue_path, "slow", 1)
    processor = make_processor(servers)

    class Broken(Maildir):
        def scan(self):
            if "slow" in self.path:
                raise PermissionError("unreadable")
            return super().scan()

    processor.maildir_factory = Broken
    processor.setQueuePath(queue_path)  # its relays are opened by it too
    stats = processor.process_queue()
    assert stats.sent == 1 and list(stats.relays) == ["fast"]
    assert "error while processing the queue" in caplog.text


def test_the_refresh_errors_of_the_thread_are_logged(queue_path, servers,
                                                    make_processor, caplog,
                                                    monkeypatch):

    calls = []

    real = Maildir.relays

    def broken(self):
        calls.append(self.path)
        if len(calls) == 1:
            raise PermissionError("cannot list relays/")
        return real(self)

    monkeypatch.setattr(Maildir, "relays", broken)
    route(queue_path, "fast", 1)
    processor = make_processor(servers, interval=0.01)
    processor.start()
    wait_until(lambda: servers["fast"].messages)
    assert "cannot list relays/" in caplog.text


def test_limited_passes_of_a_relay_follow_each_other(queue_path, servers,
                                                    make_processor):
    route(queue_path, "fast", 5)
    processor = make_processor(servers, interval=60, max_messages_per_pass=2,
                               concurrency=1)
    processor.start()
    wait_until(lambda: len(servers["fast"].messages) == 5, timeout=5)


def test_a_shared_mailer_is_closed_by_each_worker_not_while_in_use(
        queue_path, servers, make_processor):
    class Counting(SMTPMailer):
        closed = 0  # close_connection() calls; close() must not be called

        def close_connection(self):
            with lock:
                Counting.closed += 1
            super().close_connection()

        def close(self):  # pragma: no cover - the processor never calls it
            raise AssertionError("the processor closed every thread's connections")

    lock = threading.Lock()
    shared = Counting("127.0.0.1", servers["fast"].port, no_tls=True, timeout=5)
    route(queue_path, "a", 1, names=["a", "b"])
    route(queue_path, "b", 1, names=["a", "b"])
    processor = make_processor(concurrency=1)
    processor.setMailer(shared)
    processor.setMailers({"a": shared, "b": shared})
    assert processor.process_queue().sent == 2
    assert Counting.closed == 0
    processor.process_queue()  # idle: each relay's worker closes its own
    processor.stop()
    assert Counting.closed == 2
    assert servers["fast"].commands.count("QUIT") == 2


def test_processor_settings_are_checked():
    with pytest.raises(ValueError, match="max_relays"):
        QueueProcessorThread(max_relays=0)
    processor = QueueProcessorThread()
    with pytest.raises(TypeError, match="must map names"):
        processor.setMailers(["fast"])
    with pytest.raises(ValueError, match="cannot be empty"):
        processor.setMailers({"": object()})
    assert processor.mailers == {}


def test_stats_add_up():
    total = Stats(sent=1)
    total.add(Stats(sent=2, skipped=1, limited=True), "r")
    total.add(Stats(failed=1))
    assert total == Stats(sent=3, failed=1, skipped=1, limited=True)
    assert total.relays == {"r": Stats(sent=2, skipped=1, limited=True)}
    assert "relays" not in repr(total)


# -- zope.sendmail never sees a routed message ---------------------------------------


def test_a_zope_sendmail_processor_sends_only_the_unrouted_messages(
        queue_path, servers):
    from zope.sendmail.mailer import SMTPMailer as ZopeMailer
    from zope.sendmail.queue import QueueProcessorThread as ZopeProcessor

    unrouted = route(queue_path, None, 2)
    route(queue_path, "fast", 2)
    route(queue_path, "dead", 1)
    processor = ZopeProcessor()
    processor.setMailer(ZopeMailer("127.0.0.1", servers["main"].port, no_tls=True))
    processor.setQueuePath(queue_path)
    processor.run(forever=False)
    assert sorted(servers["main"].message_ids()) == sorted(unrouted)
    assert servers["fast"].messages == []
    assert len(waiting(queue_path, "fast")) == 2  # untouched
    assert dotfiles(queue_path, "fast") == []
    assert len(waiting(queue_path, "dead")) == 1


# -- the direct delivery -------------------------------------------------------------


def test_direct_delivery_sends_each_message_through_its_mailer(servers, events):
    manager = transaction.TransactionManager()
    fast, slow = mailer(servers["fast"].port), mailer(servers["slow"].port)
    delivery = DirectMailDelivery(mailer(servers["main"].port),
                                  transaction_manager=manager,
                                  mailers={"fast": fast, "slow": slow})
    data = b"From: a@example.org\nTo: b@example.org\nBcc: c@example.org\n\nx\n"
    with manager:
        main_id = delivery.send_message(data)
        fast_ids = [delivery.send_message(data, mailer="fast") for _ in range(2)]
        slow_id = delivery.send("a@example.org", ["d@example.org"], data,
                                mailer="slow")
    assert servers["main"].message_ids() == [main_id]
    assert servers["fast"].message_ids() == fast_ids
    assert servers["slow"].message_ids() == [slow_id]
    assert servers["fast"].connections == 1  # voted once, sent twice
    received = servers["fast"].messages[0]
    assert received.rcpt_tos == ["b@example.org", "c@example.org"]
    assert b"Bcc" not in received.data
    assert servers["slow"].messages[0].rcpt_tos == ["d@example.org"]
    for m in (fast, slow, delivery.mailer):
        m.close()


def test_direct_delivery_a_dead_relay_aborts_the_whole_transaction(servers):
    manager = transaction.TransactionManager()

    class Aborting(SMTPMailer):
        aborted = 0

        def abort(self):
            Aborting.aborted += 1
            super().abort()

    fast = Aborting("127.0.0.1", servers["fast"].port, no_tls=True, timeout=5)
    dead = Aborting("127.0.0.1", servers["dead"], no_tls=True, timeout=5)
    delivery = DirectMailDelivery(fast, transaction_manager=manager,
                                  mailers={"dead": dead})
    manager.begin()
    delivery.send("a@example.org", ["b@example.org"], b"S: x\n\n")
    delivery.send("a@example.org", ["b@example.org"], b"S: y\n\n", mailer="dead")
    with pytest.raises(MailConnectionError):
        manager.commit()
    manager.abort()
    assert Aborting.aborted == 2  # both voted mailers were told
    assert servers["fast"].messages == []


def test_direct_delivery_logs_a_mailer_failing_to_abort(servers, caplog):
    manager = transaction.TransactionManager()

    class Broken(SMTPMailer):
        def abort(self):
            raise OSError("cannot abort")

    delivery = DirectMailDelivery(
        Broken("127.0.0.1", servers["fast"].port, no_tls=True, timeout=5),
        transaction_manager=manager)
    manager.begin()
    delivery.send("a@example.org", ["b@example.org"], b"S: x\n\n")
    manager.get().join(_FailingVote())
    with pytest.raises(RuntimeError, match="vote failed"), \
            caplog.at_level(logging.ERROR):
        manager.commit()
    manager.abort()
    assert "failed to abort" in caplog.text
    assert servers["fast"].messages == []


class _FailingVote:
    """A data manager whose vote fails after the mail delivery's."""

    def __init__(self):
        self.transaction_manager = None

    def sortKey(self):
        return "~zzz-failing"

    def abort(self, txn):
        pass

    tpc_abort = tpc_begin = commit = tpc_finish = abort

    def tpc_vote(self, txn):
        raise RuntimeError("vote failed")


def test_json_reason_in_a_relay_folder_is_plain(queue_path, servers, make_processor):
    servers["slow"].reply("DATA", "550 no")
    servers["slow"].slow(0)
    route(queue_path, "slow", 1)
    make_processor(servers).process_queue()
    failed = os.path.join(relays.relay_path(queue_path, "slow"), "failed")
    [reason] = [n for n in os.listdir(failed) if n.startswith(".reason-")]
    with open(os.path.join(failed, reason)) as f:
        assert json.load(f)["code"] == 550


# -- corners ---------------------------------------------------------------------


def test_an_empty_relay_folder_gets_no_threads(queue_path, servers, make_processor):
    relays.open_relay(queue_path, "fast", create=True)
    processor = make_processor(servers)
    assert processor.process_queue().total == 0
    assert worker_threads() == []
    assert relays.open_relay(queue_path, "fast").path == relays.relay_path(
        queue_path, "fast")
    with pytest.raises(ValueError, match="is not a Maildir folder"):
        relays.open_relay(queue_path, "other")


def test_an_error_listing_the_queue_itself_is_raised_by_process_queue(
        queue_path, servers, make_processor, caplog):
    class Unreadable(Maildir):
        def scan(self):
            raise PermissionError("unreadable queue")

    route(queue_path, "fast", 1)
    processor = make_processor(servers)
    processor.setMaildir(Unreadable(queue_path))
    with pytest.raises(PermissionError, match="unreadable queue"):
        processor.process_queue()
    processor.run(forever=False)  # logs it instead
    assert "error while processing the queue" in caplog.text
    assert servers["fast"].messages == []


def test_a_relay_folder_moved_away_while_it_is_sent(queue_path, servers,
                                                   make_processor):
    route(queue_path, "slow", 1)
    processor = make_processor(servers, interval=0.02, concurrency=1)
    processor.start()
    wait_until(lambda: dotfiles(queue_path, "slow"))
    base = os.path.join(queue_path, "relays")
    os.rename(os.path.join(base, "slow"), os.path.join(base, ".moved"))
    time.sleep(0.1)  # passes of the others go on; the busy lane is kept
    assert "slow" in processor._lanes.lanes
    wait_until(lambda: "slow" not in processor._lanes.lanes)
    assert len(servers["slow"].messages) == 1


# -- ZCML --------------------------------------------------------------------------


@pytest.fixture
def zcml():
    import zope.component.testing
    from zope.configuration import xmlconfig

    from mailoutbox.zcml import stop_processor_threads

    zope.component.testing.setUp()

    def load(body):
        return xmlconfig.string(
            '<configure xmlns="http://namespaces.zope.org/zope"'
            ' xmlns:mail="http://namespaces.zope.org/mail">'
            '<include package="zope.component" file="meta.zcml" />'
            '<include package="mailoutbox" file="meta.zcml" />'
            f"{body}</configure>")

    yield load
    stop_processor_threads(timeout=10)
    zope.component.testing.tearDown()


def smtp_mailers(servers):
    return "".join(
        f'<mail:smtpMailer name="{name}" hostname="127.0.0.1" port="{port}"'
        ' no_tls="true" timeout="5" />'
        for name, port in (("default", servers["main"].port),
                           ("crm-1", servers["fast"].port),
                           ("crm-2", servers["slow"].port))
    )


def test_zcml_queued_delivery_routes_and_its_thread_sends(zcml, servers,
                                                         queue_path):
    from zope.component import getUtility

    from mailoutbox.interfaces import IMailDelivery
    from mailoutbox.zcml import processor_threads

    servers["slow"].slow(0)
    zcml(smtp_mailers(servers)
         + f'<mail:queuedDelivery queuePath="{queue_path}" mailer="default"'
           ' mailers="crm-1 crm-2 crm-1" interval="0.02" />')
    delivery = getUtility(IMailDelivery, "Mail")
    assert delivery.mailer_names == {"crm-1", "crm-2"}
    [thread] = processor_threads().values()
    assert thread.mailers == {"crm-1": getUtility(IMailer, "crm-1"),
                              "crm-2": getUtility(IMailer, "crm-2")}
    data = b"From: a@example.org\nTo: b@example.org\nBcc: c@example.org\n\n"
    with transaction.manager:
        ids = [delivery.send_message(data, mailer=name)
               for name in (None, "crm-1", "crm-2")]
    wait_until(lambda: all(s.messages for s in
                           (servers["main"], servers["fast"], servers["slow"])))
    assert [servers[k].message_ids() for k in ("main", "fast", "slow")] == [
        [i] for i in ids]
    # a second directive on the same queue adds its relays to the thread
    zcml(smtp_mailers(servers)
         + '<mail:smtpMailer name="crm-3" hostname="127.0.0.1" port="25" />'
         + f'<mail:queuedDelivery queuePath="{queue_path}" mailer="default"'
           ' mailers="crm-1 crm-3" name="Other" />')
    [same] = processor_threads().values()
    assert same is thread and set(thread.mailers) == {"crm-1", "crm-2", "crm-3"}


def test_zcml_direct_delivery_routes(zcml, servers):
    from zope.component import getUtility

    from mailoutbox.interfaces import IMailDelivery

    zcml(smtp_mailers(servers)
         + '<mail:directDelivery mailer="default" mailers="crm-1" />')
    delivery = getUtility(IMailDelivery, "Mail")
    with transaction.manager:
        mid = delivery.send("a@example.org", ["b@example.org"], b"S: x\n\n",
                            mailer="crm-1")
    assert servers["fast"].message_ids() == [mid]
    getUtility(IMailer, "crm-1").close()


@pytest.mark.parametrize(("body", "error"), [
    ('<mail:queuedDelivery queuePath="{q}" mailer="default" mailers="nope" />',
     "Mailer 'nope' is not defined"),
    ('<mail:directDelivery mailer="default" mailers="crm-1 nope" />',
     "Mailer 'nope' is not defined"),
    ('<mail:queuedDelivery queuePath="{q}" mailer="default" mailers="'
     + "x" * 201 + '" />', "mail:queuedDelivery mailers: .* too long"),
])
def test_zcml_unknown_mailers_are_configuration_errors(zcml, servers, queue_path,
                                                      body, error):
    from zope.configuration.exceptions import ConfigurationError

    from mailoutbox.zcml import processor_threads

    with pytest.raises(ConfigurationError, match=error):
        zcml(smtp_mailers(servers) + body.format(q=queue_path))
    assert processor_threads() == {}


@pytest.mark.parametrize("module", ["headers", "relays", "lanes"])
def test_all_names_the_public_globals(module):
    import importlib

    mod = importlib.import_module(f"mailoutbox.{module}")
    public = {name for name, value in vars(mod).items()
              if not name.startswith("_") and getattr(value, "__module__", None)
              == mod.__name__}
    assert public <= set(mod.__all__)
    assert all(hasattr(mod, name) for name in mod.__all__)
