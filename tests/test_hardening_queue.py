"""Hardening of the queue: state files that are not regular files, queue
files the processor may not claim, configuration problems of a relay, and
recipients refused with 4xx while others were accepted.

Real parts throughout: FIFOs and symbolic links in a real queue, a real
privilege drop to ``nobody`` (as root), the real SMTPMailer against the
in-process aiosmtpd server and Postfix's smtp-sink, and zope.sendmail's own
processor draining what mailoutbox left in the queue.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import zope.event

from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread

from ._crash_helpers import queue_messages

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


@pytest.fixture
def events():
    received = []
    zope.event.subscribers.append(received.append)
    yield received
    zope.event.subscribers.remove(received.append)


def make_processor(path, port, **options):
    options.setdefault("concurrency", 1)
    processor = QueueProcessorThread(**options)
    processor.setMailer(SMTPMailer("127.0.0.1", port, no_tls=True, timeout=5))
    processor.setQueuePath(path)
    return processor


@pytest.fixture
def processor(queue_path, smtp_server):
    made = make_processor(queue_path, smtp_server.port)
    yield made
    made.stop(timeout=10)


def in_thread(function, timeout=10.0):
    """Run *function* in a thread; fail (instead of hanging) if it does not
    return within *timeout* seconds."""
    results = []
    thread = threading.Thread(target=lambda: results.append(function()),
                              daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{function} blocked"
    return results[0]


# -- 4. state files that are not regular files ----------------------------------


def _entry(queue_path):
    queue_messages(queue_path, 1)
    maildir = Maildir(queue_path)
    [entry] = maildir.scan().entries
    return maildir, entry


@pytest.mark.parametrize("prefix", [".retry-", ".reason-"])
def test_a_fifo_as_state_file_is_damaged_state_not_a_hang(queue_path, prefix):
    maildir, entry = _entry(queue_path)
    os.mkfifo(entry.sidecar(prefix))
    read = maildir.retry_state if prefix == ".retry-" else maildir.reason
    assert in_thread(lambda: read(entry)) == {}


@pytest.mark.parametrize("prefix", [".retry-", ".reason-"])
def test_a_symlink_as_state_file_is_not_followed(queue_path, tmp_path, prefix):
    maildir, entry = _entry(queue_path)
    target = tmp_path / "elsewhere.json"
    target.write_text('{"attempts": 7, "error": "from outside"}')
    os.symlink(target, entry.sidecar(prefix))
    read = maildir.retry_state if prefix == ".retry-" else maildir.reason
    assert read(entry) == {}
    os.unlink(entry.sidecar(prefix))
    os.symlink(tmp_path / "missing", entry.sidecar(prefix))  # dangling
    assert read(entry) == {}


def test_a_directory_as_state_file_is_damaged_state(queue_path):
    maildir, entry = _entry(queue_path)
    os.mkdir(entry.sidecar(".reason-"))
    assert maildir.reason(entry) == {}


def test_a_pass_is_not_held_up_by_a_fifo_retry_state(processor, queue_path,
                                                     smtp_server, tmp_path):
    ids = queue_messages(queue_path, 2)
    maildir = Maildir(queue_path)
    first, second = maildir.scan().entries
    os.mkfifo(first.sidecar(".retry-"))
    os.utime(first.sidecar(".retry-"), (0, 0))  # due long ago
    target = tmp_path / "state.json"
    target.write_text('{"attempts": 1}')
    os.symlink(target, second.sidecar(".retry-"))
    os.utime(second.sidecar(".retry-"), (0, 0), follow_symlinks=False)
    stats = in_thread(processor.process_queue)
    assert stats.sent == 2
    assert sorted(smtp_server.message_ids()) == sorted(ids)
    assert os.listdir(maildir.new) == []
    assert target.read_text() == '{"attempts": 1}'  # never written through


def test_a_fifo_retry_state_is_replaced_when_the_message_is_deferred(
        processor, queue_path, smtp_server):
    maildir, entry = _entry(queue_path)
    os.mkfifo(entry.sidecar(".retry-"))
    os.utime(entry.sidecar(".retry-"), (0, 0))
    smtp_server.reply("MAIL", "451 4.3.0 Try later")
    stats = in_thread(processor.process_queue)
    assert stats.deferred == 1
    assert os.path.isfile(entry.sidecar(".retry-"))
    assert maildir.retry_state(entry)["attempts"] == 1


def test_show_does_not_hang_on_fifo_state_files(queue_path):
    maildir, entry = _entry(queue_path)
    os.mkfifo(entry.sidecar(".retry-"))
    queue_messages(queue_path, 1, prefix="f")
    other = next(e for e in maildir.scan().entries if e != entry)
    failed = maildir.move_to_failed(other, {"error": "x"})
    os.unlink(failed.sidecar(".reason-"))
    os.mkfifo(failed.sidecar(".reason-"))
    env = dict(os.environ, PYTHONPATH=SRC)
    for name in (entry.name, failed.name):
        result = subprocess.run(
            [sys.executable, "-m", "mailoutbox", "show", queue_path, name],
            capture_output=True, text=True, timeout=20, env=env, check=False)
        assert result.returncode == 0, result.stderr
        assert f"id:       {name}" in result.stdout
