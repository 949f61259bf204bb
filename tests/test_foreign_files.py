"""Files the queue did not write, in ``new/``, ``cur/`` and ``tmp/``.

Junk, empty files, files without the envelope lines, directories, symbolic
links (to a message outside the queue, which must never be read), fifos and
dot-files are put in a real queue next to real messages; a real processor
drains it into the in-process SMTP server.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter

import pytest

from mailoutbox.envelope import format_envelope
from mailoutbox.maildir import TMP_MAX_AGE
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread

from ._crash_helpers import RECIPIENT
from ._crash_helpers import SENDER
from ._crash_helpers import listing
from ._crash_helpers import make_message
from ._crash_helpers import queue_messages
from ._crash_helpers import queued

ENVELOPE = format_envelope(SENDER, [RECIPIENT])


@pytest.fixture
def processor(queue_path, smtp_server):
    made = QueueProcessorThread(concurrency=2)
    made.setMailer(SMTPMailer("127.0.0.1", smtp_server.port, no_tls=True, timeout=5))
    made.setQueuePath(queue_path)
    yield made
    made.stop(timeout=10)


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def plant(queue, folder, outside):
    """Put one of each kind of foreign file in *folder* of *queue*; return
    the names that are not dot-files (they must end in failed/).  Each is
    made aside and renamed into place, whole, as a running processor may
    pick it up at once."""
    target = os.path.join(queue, folder)
    where = os.path.join(queue, f"staging-{folder}")
    os.mkdir(where)
    write(os.path.join(where, f"junk-{folder}"), os.urandom(4096))
    write(os.path.join(where, f"empty-{folder}"), b"")
    write(os.path.join(where, f"no-envelope-{folder}"),
          make_message(f"no-envelope-{folder}@mailoutbox.test"))
    write(os.path.join(where, f"no-recipient-{folder}"),
          b"X-Zope-From: a@example.org\nX-Zope-To: \n"
          + make_message(f"no-recipient-{folder}@mailoutbox.test"))
    write(os.path.join(where, f"one-line-{folder}"), b"X-Zope-From: a@example.org\n")
    write(os.path.join(where, f"latin1-{folder}"),
          b"X-Zope-From: \xe9@example.org\nX-Zope-To: b@example.org\n\r\n")
    os.mkdir(os.path.join(where, f"directory-{folder}"))
    write(os.path.join(where, f"directory-{folder}", "inside"), ENVELOPE + b"\r\n")
    # A well-formed message outside the queue, reached through a link.
    os.symlink(outside, os.path.join(where, f"symlink-{folder}"))
    os.symlink("/nonexistent/file", os.path.join(where, f"dangling-{folder}"))
    os.mkfifo(os.path.join(where, f"fifo-{folder}"))
    # Dot-files are not messages: they are left alone.
    write(os.path.join(where, f".hidden-{folder}"), ENVELOPE + b"\r\nhidden\r\n")
    for name in os.listdir(where):
        os.rename(os.path.join(where, name), os.path.join(target, name))
    os.rmdir(where)
    return sorted(
        f"{kind}-{folder}" for kind in (
            "junk", "empty", "no-envelope", "no-recipient", "one-line", "latin1",
            "directory", "symlink", "dangling", "fifo",
        )
    )


def test_foreign_files_end_in_failed_and_are_never_sent(
        processor, queue_path, smtp_server, tmp_path):
    outside = str(tmp_path / "outside-message")
    secret = make_message("outside@mailoutbox.test")
    write(outside, ENVELOPE + secret)
    ids = queue_messages(queue_path, 20)
    foreign = plant(queue_path, "new", outside) + plant(queue_path, "cur", outside)
    # Messages in cur/ are queued too (zope.sendmail's Maildir reads both).
    real_in_cur = os.path.join(queue_path, "cur", "0000.real-in-cur")
    write(real_in_cur, ENVELOPE + make_message("in-cur@mailoutbox.test"))

    stats = processor.process_queue()

    expected = [*ids, "in-cur@mailoutbox.test"]
    assert Counter(smtp_server.message_ids()) == Counter(expected)
    assert stats.sent == 21
    assert stats.failed == len(foreign)
    maildir = Maildir(queue_path)
    failed = {e.name: maildir.reason(e) for e in maildir.failed_entries()}
    assert sorted(failed) == sorted(foreign)
    for name, reason in failed.items():
        assert reason["permanent"] is True
        assert reason["error"], name
    assert "not a regular file" in failed["symlink-new"]["error"]
    assert "not a regular file" in failed["fifo-cur"]["error"]
    assert "malformed queue file" in failed["junk-new"]["error"]
    # The link was moved, never followed: its target is untouched, unsent.
    assert os.path.islink(os.path.join(queue_path, "failed", "symlink-new"))
    with open(outside, "rb") as f:
        assert f.read() == ENVELOPE + secret
    assert "outside@mailoutbox.test" not in smtp_server.message_ids()
    # Only the dot-files are left, untouched.
    assert queued(queue_path) == []
    assert listing(queue_path, "new") == [".hidden-new"]
    assert listing(queue_path, "cur") == [".hidden-cur"]

    # The next pass has nothing to do, and sends nothing more.
    again = processor.process_queue()
    assert again.total == 0
    assert len(smtp_server.messages) == 21


def test_a_running_processor_keeps_going_past_foreign_files(
        processor, queue_path, smtp_server, tmp_path):
    outside = str(tmp_path / "outside-message")
    write(outside, ENVELOPE + make_message("outside@mailoutbox.test"))
    processor.interval = 0.05
    queue_messages(queue_path, 1, prefix="first")
    processor.start()
    deadline = time.monotonic() + 10
    while not smtp_server.messages and time.monotonic() < deadline:
        time.sleep(0.01)
    plant(queue_path, "new", outside)
    ids = queue_messages(queue_path, 10, prefix="after")
    while ((len(smtp_server.messages) < 11 or queued(queue_path))
           and time.monotonic() < deadline):
        time.sleep(0.01)
    assert processor.is_alive()
    processor.stop(timeout=10)
    expected = ["first-0@mailoutbox.test", *ids]
    assert sorted(smtp_server.message_ids()) == sorted(expected)
    assert queued(queue_path) == []
    assert len(Maildir(queue_path).failed_entries()) == 10


def test_dot_files_of_the_protocol_left_behind_are_tidied(processor, queue_path,
                                                          smtp_server):
    ids = queue_messages(queue_path, 2)
    new = os.path.join(queue_path, "new")
    # Claims and retry states whose message is gone (a crash between the
    # steps of ending a claim), and a foreign dot-file.
    write(os.path.join(new, ".sending-gone"), b"")
    write(os.path.join(new, ".retry-gone"), b"{}")
    write(os.path.join(new, ".retry-damaged"), b"not json")
    write(os.path.join(new, ".DS_Store"), b"junk")
    # A damaged retry state of a real message: the message is still sent.
    (first, _second) = sorted(n for n in os.listdir(new) if not n.startswith("."))
    write(os.path.join(new, f".retry-{first}"), b"\x00garbage")
    os.utime(os.path.join(new, f".retry-{first}"), (0, 0))  # due long ago

    stats = processor.process_queue()

    assert stats.sent == 2
    assert sorted(smtp_server.message_ids()) == sorted(ids)
    assert listing(queue_path, "new") == [".DS_Store"]


def test_foreign_files_in_tmp_are_removed_when_old_never_followed(tmp_path,
                                                                  queue_path):
    maildir = Maildir(queue_path, create=True)
    outside = tmp_path / "keep-me"
    outside.write_bytes(b"precious")
    tmp = os.path.join(queue_path, "tmp")
    os.symlink(str(outside), os.path.join(tmp, "link"))
    os.mkdir(os.path.join(tmp, "folder"))
    os.mkfifo(os.path.join(tmp, "fifo"))
    write(os.path.join(tmp, "junk"), os.urandom(100))
    assert maildir.cleanup(maildir.scan()) == 0  # young: maybe being written
    later = time.time() + TMP_MAX_AGE + 1
    assert maildir.cleanup(maildir.scan(), now=later) == 3
    assert listing(queue_path, "tmp") == ["folder"]
    assert outside.read_bytes() == b"precious"


def test_a_fifo_is_never_opened(processor, queue_path, smtp_server):
    """Opening a fifo for reading blocks until a writer comes: the processor
    must not open it, or it would hang for ever."""
    queue_messages(queue_path, 1)
    os.mkfifo(os.path.join(queue_path, "new", "0000.fifo"))
    done = threading.Event()

    def run():
        processor.process_queue()
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert done.wait(10), "the processor blocked on the fifo"
    assert len(smtp_server.messages) == 1
    assert [e.name for e in Maildir(queue_path).failed_entries()] == ["0000.fifo"]


def test_folders_named_like_state_files_do_not_stop_the_tidy_up(
        processor, queue_path, smtp_server):
    ids = queue_messages(queue_path, 2)
    new = os.path.join(queue_path, "new")
    tmp = os.path.join(queue_path, "tmp")
    os.mkdir(os.path.join(new, ".sending-folder"))
    os.mkdir(os.path.join(new, ".retry-folder"))
    # What the tidy-up is for: a claim whose message is gone, a file a
    # crashed writer left in tmp/ two days ago, a message zope.sendmail
    # rejected.
    write(os.path.join(new, ".sending-gone"), b"")
    write(os.path.join(tmp, "crashed-writer"), b"X-Zope-From: ")
    os.utime(os.path.join(tmp, "crashed-writer"), (0, 0))
    write(os.path.join(new, ".rejected-old"), ENVELOPE + b"\r\n")

    stats = processor.process_queue()

    assert stats.sent == 2
    assert sorted(smtp_server.message_ids()) == sorted(ids)
    assert listing(queue_path, "new") == [".retry-folder", ".sending-folder"]
    assert listing(queue_path, "tmp") == []
    assert [e.name for e in Maildir(queue_path).failed_entries()] == ["old"]


def test_a_fifo_swapped_in_after_the_listing_is_not_waited_on(
        queue_path, smtp_server):
    """An entry that was a regular file when the queue was listed and is a
    fifo when claimed: reading it must not wait for a writer."""

    class Racy(Maildir):
        def scan(self):
            scan = super().scan()
            for entry in scan.entries:
                os.unlink(entry.path)
                os.mkfifo(entry.path)
            return scan

    queue_messages(queue_path, 1)
    processor = QueueProcessorThread(concurrency=1)
    processor.setMailer(SMTPMailer("127.0.0.1", smtp_server.port, no_tls=True,
                                   timeout=5))
    processor.setMaildir(Racy(queue_path))
    done = threading.Event()
    results = []

    def run():
        results.append(processor.process_queue())
        done.set()

    threading.Thread(target=run, daemon=True).start()
    finished = done.wait(5)
    if not finished:  # unblock the reader, so that the thread can end
        for name in os.listdir(os.path.join(queue_path, "new")):
            with contextlib.suppress(OSError):
                os.close(os.open(os.path.join(queue_path, "new", name),
                                 os.O_WRONLY | os.O_NONBLOCK))
        done.wait(5)
    processor.stop(timeout=10)
    assert finished, "the processor waited on a fifo"
    assert results[0].failed == 1
    assert smtp_server.messages == []
    (entry,) = Maildir(queue_path).failed_entries()
    assert "malformed queue file" in Maildir(queue_path).reason(entry)["error"]
