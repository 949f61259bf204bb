"""Processes killed (SIGKILL) while draining the queue or committing.

Real processes (tests/_crash_helpers.py) are killed at random moments or at
chosen points of the two-phase commit; the in-process SMTP server counts
what it received by Message-Id.  The long version of the first test is
``reliability/crash_drain.py``.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from mailoutbox.maildir import TMP_MAX_AGE
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread

from ._crash_helpers import claims
from ._crash_helpers import crash_drain
from ._crash_helpers import is_complete
from ._crash_helpers import listing
from ._crash_helpers import queued
from ._crash_helpers import run_helper


def drain(queue, port):
    """Send what is queued, in this process; return the pass's Stats."""
    processor = QueueProcessorThread(concurrency=2)
    processor.setMailer(SMTPMailer("127.0.0.1", port, no_tls=True, timeout=5))
    processor.setQueuePath(queue)
    try:
        return processor.process_queue()
    finally:
        processor.stop(timeout=10)


@pytest.mark.slow
def test_processors_killed_mid_drain_lose_nothing(tmp_path):
    seed = random.randrange(2**32)
    result = crash_drain(str(tmp_path), messages=200, kills=5, concurrency=3,
                         lease=1.0, slow=0.02, run_for=(0.2, 1.0), seed=seed)
    summary = f"seed {seed}: {result}"
    assert result.lost == 0, summary
    assert result.delivered == 200, summary
    # The kills landed while messages were being sent...
    assert sum(result.claims_at_kills) > 0, summary
    # ...and only a message in flight at a kill may have been sent twice.
    assert result.duplicates <= sum(result.claims_at_kills) <= 5 * 3, summary
    # The final processor broke the dead ones' claims and emptied the queue.
    assert result.stranded_claims == 0, summary
    assert result.left_queued == 0, summary


def commit_and_die(queue, mode):
    """Run ``commit-crash``; return the Message-Ids and the queue's state
    at the kill."""
    process = run_helper("commit-crash", queue, mode)
    out, _err = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, out
    ids_line, state_line = out.strip().splitlines()
    return json.loads(ids_line), json.loads(state_line)


@pytest.mark.parametrize("mode", ["vote", "finish"])
def test_kill_between_vote_and_finish_leaves_only_tmp_files_never_sent(
        mode, queue_path, smtp_server):
    ids, state = commit_and_die(queue_path, mode)
    # Killed after the queue's tpc_vote (3 fsynced files in tmp/, and the
    # pending commit record), before its tpc_finish (nothing in new/).
    assert state["phase"] == mode
    assert len(state["tmp"]) == 4 and state["new"] == []
    assert state["tmp"][0].startswith(".pending-")
    assert listing(queue_path, "tmp") == state["tmp"]
    assert queued(queue_path) == []

    stats = drain(queue_path, smtp_server.port)
    assert stats.total == 0
    assert smtp_server.messages == []

    maildir = Maildir(queue_path)
    assert maildir.cleanup(maildir.scan()) == 0  # too young to be removed
    later = time.time() + TMP_MAX_AGE + 1
    assert maildir.cleanup(maildir.scan(), now=later) == 4
    assert listing(queue_path, "tmp") == []
    assert drain(queue_path, smtp_server.port).total == 0
    assert smtp_server.messages == []
    assert len(ids) == 3


def test_kill_right_after_commit_keeps_the_messages_queued(queue_path, smtp_server):
    ids, state = commit_and_die(queue_path, "after")
    assert state["phase"] == "after"
    assert state["tmp"] == [] and len(state["new"]) == 3

    stats = drain(queue_path, smtp_server.port)
    assert stats.sent == 3
    assert Counter(smtp_server.message_ids()) == Counter(ids)
    assert all(is_complete(m.data) for m in smtp_server.messages)
    assert queued(queue_path) == [] and claims(queue_path) == []


@pytest.mark.slow
def test_producers_killed_at_random_moments_queue_only_whole_messages(
        queue_path, smtp_server):
    rng = random.Random()
    rounds = 4
    reported = []
    for round_ in range(rounds):
        process = run_helper("produce", queue_path, f"p{round_}", "100000",
                             "--size", "20000")
        first = process.stdout.readline()  # it commits: kill it soon
        time.sleep(rng.uniform(0.05, 0.3))
        process.send_signal(signal.SIGKILL)
        out, _err = process.communicate(timeout=30)
        assert process.returncode == -signal.SIGKILL
        out = first + out
        # A last line without its newline may have been cut short.
        reported.extend(out.splitlines(keepends=True)[:-1])
        reported.append(out.splitlines(keepends=True)[-1])
        if not reported[-1].endswith("\n"):
            reported.pop()
    reported = [line.strip() for line in reported]

    maildir = Maildir(queue_path)
    ids = {}
    for entry in maildir.scan().entries:
        with open(entry.path, "rb") as f:
            data = f.read()
        assert is_complete(data), entry.name  # never a truncated message
        message = data.split(b"\n", 2)[2]
        message_id = message.split(b"Message-Id: <", 1)[1].split(b">", 1)[0]
        ids[message_id.decode()] = entry.name
    # Every transaction that said it committed is queued; at most one per
    # kill committed without saying so.
    assert set(reported) <= set(ids)
    assert len(ids) - len(reported) <= rounds
    # At most one message per kill was being written.
    assert len(listing(queue_path, "tmp")) <= rounds

    stats = drain(queue_path, smtp_server.port)
    assert stats.sent == len(ids)
    assert Counter(smtp_server.message_ids()) == Counter(set(ids))
    assert all(is_complete(m.data) for m in smtp_server.messages)


# A transaction of three messages, one of them routed to a relay, killed in
# its tpc_finish: after the commit record was made "committed" and AFTER
# renames of message files into new/.
_KILLED_IN_FINISH = r"""
import json, os, signal, sys
import transaction
from mailoutbox import _writer
from mailoutbox.delivery import QueuedMailDelivery
sys.path.insert(0, sys.argv[3])
from _crash_helpers import RECIPIENT, SENDER, make_message

queue, after = sys.argv[1], int(sys.argv[2])
renames = []
commit = _writer.MaildirMessageWriter.commit

def dying_commit(self, fsync_dir=True):
    if len(renames) == after:
        os.kill(os.getpid(), signal.SIGKILL)
    commit(self, fsync_dir)
    renames.append(self.name)

_writer.MaildirMessageWriter.commit = dying_commit
manager = transaction.TransactionManager()
delivery = QueuedMailDelivery(queue, manager, mailers=["crm"])
ids = [delivery.send(SENDER, [RECIPIENT], make_message(f"split-{i}@x.test"),
                     mailer="crm" if i == 1 else None) for i in range(3)]
print(json.dumps(ids), flush=True)
manager.commit()
"""


@pytest.mark.parametrize("after", [0, 1, 2])
def test_kill_between_the_renames_of_finish_queues_all_or_nothing(
        after, queue_path, smtp_server):
    helpers = os.path.dirname(os.path.abspath(__file__))
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_IN_FINISH, queue_path, str(after), helpers],
        stdout=subprocess.PIPE, text=True)
    out, _err = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, out
    ids = json.loads(out)
    relay = os.path.join(queue_path, "relays", "crm")
    moved = len(queued(queue_path)) + len(queued(relay))
    assert moved == after  # the crash split the transaction...
    [record] = [n for n in listing(queue_path, "tmp") if n.startswith(".")]
    assert record.startswith(".committed-")

    processor = QueueProcessorThread(concurrency=2, mailers={
        "crm": SMTPMailer("127.0.0.1", smtp_server.port, no_tls=True, timeout=5)})
    processor.setMailer(SMTPMailer("127.0.0.1", smtp_server.port, no_tls=True,
                                   timeout=5))
    processor.setQueuePath(queue_path)
    try:
        stats = processor.process_queue()
    finally:
        processor.stop(timeout=10)
    # ...and the processor's clean-up joined it together again
    assert stats.sent == 3
    assert Counter(smtp_server.message_ids()) == Counter(ids)
    assert all(is_complete(m.data) for m in smtp_server.messages)
    assert listing(queue_path, "tmp") == [] and listing(relay, "tmp") == []
    assert queued(queue_path) == [] and queued(relay) == []
