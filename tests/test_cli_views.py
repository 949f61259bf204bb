"""Reading the queue as an operator: why a message waits, ``run --flush``,
and the progress bar.

Through the real command: ``python -m mailoutbox`` in subprocesses against
real SMTP servers (aiosmtpd, Postfix's smtp-sink, a closed port).
"""
from __future__ import annotations

import io
import json
import re
import signal
import time
from functools import partial
from pathlib import Path

import pytest

import mailoutbox.cli.run
from mailoutbox.cli.console import Console
from mailoutbox.cli.errors import EXIT_NOT_SENT
from mailoutbox.cli.errors import EXIT_OK
from mailoutbox.cli.progress import Progress
from mailoutbox.cli.run import Runner
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread
from mailoutbox.retry import RetryPolicy

from .test_cli import add_message
from .test_cli import cli
from .test_cli import python_m
from .test_cli import write_ini
from .test_cli_run import Clock
from .test_cli_run import catches
from .test_cli_run import closed_port
from .test_cli_run import fill
from .test_cli_run import start
from .test_cli_run import to
from .test_cli_run import wait_for

DOCS = Path(__file__).resolve().parent.parent / "docs"


def run(queue: str, port: int, *options: str):
    return python_m("run", queue, "--hostname", "127.0.0.1", "--port", str(port),
                    *options)


def listing(queue: str, *options: str) -> list[dict]:
    done = cli("list", queue, "--json", *options)
    assert done.code == EXIT_OK, done.err
    return json.loads(done.out)["messages"]


def retry_state(queue: str) -> dict:
    maildir = Maildir(queue)
    [entry] = maildir.scan().entries
    return maildir.retry_state(entry)


# -- list: why a message is still there -------------------------------------------


def test_list_tells_why_a_message_is_deferred_and_when_it_is_tried_next(
        queue_path):
    fill(queue_path, 1, to=("a@example.org", "b@example.org"))
    port = closed_port()
    assert run(queue_path, port).returncode == EXIT_NOT_SENT
    assert retry_state(queue_path)["server"] == f"127.0.0.1:{port}"
    done = python_m("list", queue_path)
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 2
    assert "deferred" in lines[0] and "a@example.org +1" in lines[0]
    assert re.fullmatch(
        rf"    last error: connection refused by 127\.0\.0\.1:{port} \(server"
        rf" 127\.0\.0\.1:{port}, attempt 1, next attempt in \d+s\)", lines[1])
    assert "None" not in done.stdout.decode()
    [message] = listing(queue_path)
    assert message["state"] == "deferred"
    assert message["error"] == f"connection refused by 127.0.0.1:{port}"
    assert message["code"] is None
    assert message["server"] == f"127.0.0.1:{port}"
    assert message["attempts"] == 1
    assert message["next_attempt"] == pytest.approx(time.time() + 60, abs=30)


@pytest.mark.smtpsink
def test_list_shows_the_smtp_code_and_server_of_a_421(queue_path, smtp_sink):
    sink = smtp_sink("-Q", "MAIL")
    fill(queue_path, 1)
    assert run(queue_path, sink.port).returncode == EXIT_NOT_SENT
    [message] = listing(queue_path)
    assert message["code"] == 421
    assert message["server"] == f"127.0.0.1:{sink.port}"
    line = cli("list", queue_path).out.splitlines()[1]
    assert (f"(code 421, server 127.0.0.1:{sink.port}, attempt 1, next attempt in"
            in line)


def test_list_tells_why_a_message_failed(queue_path, smtp_server):
    maildir = Maildir(queue_path, create=True)
    add_message(maildir, message_id="gone@example.org", to=("gone@example.org",))
    smtp_server.refuse("gone@example.org")
    sender = Maildir(queue_path)
    add_message(sender, message_id="mail@example.org", fromaddr="bad@example.org")
    smtp_server.reply("MAIL", "550 5.7.1 Sender rejected")
    assert run(queue_path, smtp_server.port).returncode == EXIT_NOT_SENT
    lines = cli("list", queue_path, "--failed").out.splitlines()
    assert len(lines) == 4
    reasons = "\n".join(lines[1::2])
    assert "    error: " in reasons and "(code 550" in reasons
    assert f"server 127.0.0.1:{smtp_server.port}" in reasons
    messages = listing(queue_path, "--failed")
    assert {m["code"] for m in messages} == {550}


def test_what_is_unknown_is_left_out(queue_path):
    maildir = Maildir(queue_path, create=True)
    now = time.time()
    never = add_message(maildir, "Never tried")
    bare = add_message(maildir, "Bare")
    maildir.claim(bare).defer(now + 3600, {})
    damaged = add_message(maildir, "Damaged")
    maildir.claim(damaged).defer(now + 3600, {
        "attempts": True, "code": "421", "error": ["x"], "server": 25})
    overdue = add_message(maildir, "Overdue")
    maildir.claim(overdue).defer(now - 5, {"attempts": 1, "error": "timed out"})
    out = cli("list", queue_path).out
    assert "None" not in out
    lines = out.splitlines()
    assert lines[0].startswith(never.name) and lines[1].startswith(bare.name)
    assert re.fullmatch(r"    next attempt in (\d+m|1h 00m)", lines[2])
    assert lines[3].startswith(damaged.name)
    assert re.fullmatch(r"    next attempt in (\d+m|1h 00m)", lines[4])
    assert lines[5].startswith(overdue.name)
    assert lines[6] == "    last error: timed out (attempt 1, next attempt due)"
    data = json.loads(cli("list", queue_path, "--json").out)["messages"]
    assert [{k: m[k] for k in ("attempts", "code", "error", "server")}
            for m in data[:3]] == [dict.fromkeys(("attempts", "code", "error",
                                                  "server"))] * 3


# -- show ---------------------------------------------------------------------


def test_show_never_prints_none(queue_path):
    fill(queue_path, 1)
    port = closed_port()
    run(queue_path, port)
    done = cli("show", queue_path, "m0@example.org")
    out = done.out
    assert done.code == EXIT_OK
    assert "None" not in out and "code:" not in out
    assert f"  server: 127.0.0.1:{port}\n" in out


def test_show_json(queue_path, smtp_server):
    fill(queue_path, 1)
    port = closed_port()
    run(queue_path, port)
    done = python_m("show", queue_path, "m0@example.org", "--json")
    assert done.returncode == EXIT_OK, done.stderr
    data = json.loads(done.stdout)
    [listed] = listing(queue_path)
    assert {k: v for k, v in data.items() if k in listed and k != "age"} == {
        k: v for k, v in listed.items() if k != "age"}
    assert data["version"] == 1
    assert data["file"].endswith(listed["id"])
    assert data["retry_state"]["server"] == f"127.0.0.1:{port}"
    assert data["failure"] is None
    assert ["Message-Id", "<m0@example.org>"] in data["headers"]
    # Its keys are those documented: those of list --json, and these.
    text = (DOCS / "cli.rst").read_text()
    part = text.split("``show --json`` prints", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"``(\w+)``", part)) - {"list", "json", "null"}
    assert set(data) - set(listed) == documented

    smtp_server.reply("MAIL", "550 5.7.1 Sender rejected")
    cli("retry", queue_path, "--all")
    run(queue_path, smtp_server.port)
    data = json.loads(cli("show", queue_path, "m0@example.org", "--json").out)
    assert data["state"] == "failed" and data["retry_state"] is None
    assert data["failure"]["code"] == 550 == data["code"]


def test_show_json_of_an_unreadable_file(queue_path):
    maildir = Maildir(queue_path, create=True)
    with open(f"{maildir.new}/1700000000.broken", "wb") as f:
        f.write(b"not a queue file")
    data = json.loads(cli("show", queue_path, "1700000000.broken", "--json").out)
    assert data["headers"] is None and data["problem"]
    assert data["retry_state"] is None


# -- run --flush -------------------------------------------------------------------


def routed(tmp_path, queue: str, smtp_port: int, relay_port: int) -> str:
    sent = cli("send", queue, "--relay", "crm", "--from", "a@example.org",
               "--to", "b@example.org", "--subject", "routed", "--body", "b")
    assert sent.code == EXIT_OK, sent.err
    return write_ini(tmp_path, f"""\
        [mailoutbox]
        hostname = 127.0.0.1
        port = {smtp_port}
        queue_path = {queue}

        [mailoutbox:relay crm]
        hostname = 127.0.0.1
        port = {relay_port}
        """, name=f"mail-{relay_port}.ini")


def test_run_flush_tries_every_deferred_message_now(tmp_path, smtp_server):
    queue = str(tmp_path / "queue")
    fill(queue, 2)
    down = routed(tmp_path, queue, closed_port(), closed_port())
    assert python_m("run", "--config", down).stdout.startswith(
        b"sent 0, deferred 3")
    up = routed(tmp_path, queue, smtp_server.port, smtp_server.port)
    # Not due yet: a pass leaves them (and the new routed message is sent).
    done = python_m("run", "--config", up)
    assert done.stdout.startswith(b"sent 1, deferred 0, failed 0, skipped 3")
    done = python_m("run", "--config", up, "--flush")
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout.startswith(b"sent 3, deferred 0, failed 0, skipped 0")
    assert b"relay crm: sent 1" in done.stdout
    assert len(smtp_server.messages) == 4


def test_a_flush_counts_the_attempts_of_a_message_failing_again(queue_path):
    fill(queue_path, 1)
    port = closed_port()
    run(queue_path, port)
    done = run(queue_path, port, "--flush")
    assert done.stdout.startswith(b"sent 0, deferred 1, failed 0, skipped 0")
    state = retry_state(queue_path)
    assert state["attempts"] == 2
    assert state["next_attempt"] - state["last_attempt"] == 120


def test_process_queue_flush(queue_path, smtp_server):
    fill(queue_path, 1)
    processor = QueueProcessorThread(retry=RetryPolicy(initial=60))
    processor.setMailer(SMTPMailer("127.0.0.1", closed_port()))
    processor.setQueuePath(queue_path)
    try:
        now = time.time()
        assert processor.process_queue(now=now).deferred == 1
        processor.setMailer(SMTPMailer("127.0.0.1", smtp_server.port))
        assert processor.process_queue(now=now + 1).skipped == 1
        assert processor.process_queue(now=now + 1, flush=True).sent == 1
    finally:
        processor.stop()
    assert smtp_server.message_ids() == ["m0@example.org"]


def test_the_daemon_flushes_in_its_first_pass_only(queue_path):
    fill(queue_path, 1)
    port = closed_port()
    run(queue_path, port)
    process = start("run", queue_path, "--hostname", "127.0.0.1", "--port",
                    str(port), "--daemon", "--flush", "--interval", "0.1")
    try:
        assert wait_for(lambda: retry_state(queue_path)["attempts"] == 2)
        time.sleep(1.0)  # ten more passes: the message is not due
        assert retry_state(queue_path)["attempts"] == 2
        assert wait_for(lambda: catches(process.pid, signal.SIGTERM))
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait(10)
    assert process.returncode == EXIT_OK, err
    assert err.count(b"WARNING") == 1 and b"deferred 1 message(s)" in err


def test_the_daemon_flush_sends(queue_path, smtp_server):
    fill(queue_path, 2)
    run(queue_path, closed_port())
    process = start("run", queue_path, *to(smtp_server), "--daemon", "--flush",
                    "--interval", "3600")
    try:
        assert wait_for(lambda: len(smtp_server.messages) == 2)
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait(10)
    assert process.returncode == EXIT_OK, err


def processor_for(queue_path: str) -> QueueProcessorThread:
    processor = QueueProcessorThread()
    processor.setMailer(SMTPMailer("127.0.0.1", closed_port()))
    processor.setQueuePath(queue_path)
    return processor


def test_a_stop_during_the_daemons_flush_ends_it(queue_path):
    fill(queue_path, 1)
    processor = processor_for(queue_path)
    runner = Runner(processor, Console(io.StringIO(), io.StringIO()))
    runner.stop_requested.set()
    runner.forever(poll=0.01, flush=True)
    assert not processor.is_alive() and processor.ident is None


def test_an_error_in_the_daemons_flush_is_raised(queue_path, monkeypatch):
    def broken(self, now=None, on_progress=None, flush=False):
        raise RuntimeError("the pass broke")

    monkeypatch.setattr(QueueProcessorThread, "process_queue", broken)
    processor = processor_for(queue_path)
    runner = Runner(processor, Console(io.StringIO(), io.StringIO()))
    with pytest.raises(RuntimeError, match="the pass broke"):
        runner.forever(poll=0.01, flush=True)
    assert processor.ident is None


# -- the progress bar --------------------------------------------------------------


def test_the_progress_bar_shows_the_rate_and_the_time_left():
    err = io.StringIO()
    clock = Clock()
    progress = Progress(Console(io.StringIO(), err), delay=0.0, every=0.0,
                        clock=clock)
    clock.now += 10
    progress(0, 1000)
    assert err.getvalue() == "\rsending [" + "." * 30 + "] 0/1000  0.0 msg/s"
    clock.now += 10
    progress(250, 1000)  # 12.5 msg/s over 20 s: 750 left take 60 s
    assert err.getvalue().endswith(
        "\rsending [#######.......................] 250/1000  12.5 msg/s  1m 00s left")
    clock.now += 20
    progress(500, 1000)
    assert err.getvalue().endswith("] 500/1000  12.5 msg/s  40s left   ")
    assert progress.render(10, 10_000, 1.0).endswith(
        "10/10000  10.0 msg/s  16m left")
    assert progress.render(1, 100_000, 1.0).endswith("1.0 msg/s  1d 03h left")
    # Totals grow as relay folders start: never more than a full bar.
    assert progress.render(7, 5, 1.0) == f"sending [{'#' * 30}] 7/5  7.0 msg/s"


def test_the_progress_bar_is_shown_on_a_terminal_only(queue_path, smtp_server,
                                                      monkeypatch):
    monkeypatch.setattr(mailoutbox.cli.run, "Progress",
                        partial(Progress, delay=0.0, every=0.0))
    fill(queue_path, 2)
    on_terminal = cli("run", queue_path, *to(smtp_server), tty=True)
    assert on_terminal.code == EXIT_OK
    assert "\rsending [###############...............] 1/2  " in on_terminal.err
    assert " msg/s  " in on_terminal.err and "left" in on_terminal.err
    fill(queue_path, 2)
    assert "\r" not in cli("run", queue_path, *to(smtp_server)).err
    fill(queue_path, 2)
    done = python_m("run", queue_path, *to(smtp_server))  # stderr is a pipe
    assert done.returncode == EXIT_OK and done.stderr == b""
