"""mailoutbox run: against real SMTP servers, in-process and as a process."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from mailoutbox.cli import EXIT_ERROR
from mailoutbox.cli import EXIT_INTERRUPTED
from mailoutbox.cli import EXIT_NOT_SENT
from mailoutbox.cli import EXIT_OK
from mailoutbox.cli import EXIT_USAGE
from mailoutbox.cli.console import Console
from mailoutbox.cli.progress import Progress
from mailoutbox.maildir import Maildir
from mailoutbox.testing.smtpd import SMTPServer

from .test_cli import add_message
from .test_cli import cli
from .test_cli import write_ini

PASSWORD = "s3cret-pw"  # the tls_server fixture's


def fill(path: str, count: int, **kw) -> list[str]:
    maildir = Maildir(path, create=True)
    ids = [f"m{i}@example.org" for i in range(count)]
    for message_id in ids:
        add_message(maildir, message_id=message_id, **kw)
    return ids


def to(server: SMTPServer) -> list[str]:
    return ["--hostname", "127.0.0.1", "--port", str(server.port)]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(path: str) -> dict:
    return json.loads(cli("status", path, "--json").out)


def wait_for(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


# -- one pass -----------------------------------------------------------------------


def test_run_once_sends_the_queue(smtp_server, queue_path):
    ids = fill(queue_path, 3)
    result = cli("run", queue_path, *to(smtp_server))
    assert result.code == EXIT_OK, result.err
    assert result.out.startswith("sent 3, deferred 0, failed 0, skipped 0 (")
    assert sorted(smtp_server.message_ids()) == ids
    assert status(queue_path)["queued"] == 0
    assert result.err == ""


def test_a_failure_makes_run_exit_1(smtp_server, queue_path):
    fill(queue_path, 1)
    fill(queue_path, 1, to=("nobody@example.org",))
    smtp_server.refuse("nobody@example.org")
    result = cli("run", queue_path, *to(smtp_server))
    assert result.code == EXIT_NOT_SENT
    assert result.out.startswith("sent 1, deferred 0, failed 1")
    assert "ERROR mailoutbox.queue: moved m0@example.org" in result.err
    assert status(queue_path)["failed"] == 1


def test_a_deferral_makes_run_exit_1_and_retry_options_apply(queue_path):
    fill(queue_path, 1)
    before = time.time()
    result = cli("run", queue_path, "--hostname", "127.0.0.1", "--port",
                 str(closed_port()), "--retry-initial", "30m", "--timeout", "5")
    assert result.code == EXIT_NOT_SENT
    assert result.out.startswith("sent 0, deferred 1, failed 0")
    data = status(queue_path)
    assert data["deferred"] == 1
    assert before + 1800 <= data["next_attempt"] <= time.time() + 1800
    again = cli("run", queue_path, "--port", "1")
    assert again.code == EXIT_OK  # not due yet: nothing attempted
    assert again.out.startswith("sent 0, deferred 0, failed 0, skipped 1")


def test_run_with_only_a_zope_sendmail_config_file(smtp_server, tmp_path):
    ini = write_ini(tmp_path, f"""\
        [app:zope-sendmail]
        interval = 3
        hostname = 127.0.0.1
        port = {smtp_server.port}
        username = None
        password = None
        force_tls = False
        no_tls = True
        queue_path = %(here)s/queue
        """)
    ids = fill(str(tmp_path / "queue"), 2)
    result = cli("run", "--config", ini)
    assert result.code == EXIT_OK, result.err
    assert sorted(smtp_server.message_ids()) == ids


def test_starttls_and_login_never_show_the_password(tls_server, certificates,
                                                    queue_path, monkeypatch):
    monkeypatch.setenv("MAILOUTBOX_TEST_PW", PASSWORD)
    fill(queue_path, 2)
    result = cli("run", queue_path, *to(tls_server), "--force-tls",
                 "--ca-file", certificates.ca_file, "--username", "alice",
                 "--password-env", "MAILOUTBOX_TEST_PW", "-vv")
    assert result.code == EXIT_OK, result.err
    assert [(m.tls, m.login) for m in tls_server.messages] == [
        (True, "alice"), (True, "alice")
    ]
    assert "INFO mailoutbox.queue: sent m0@example.org" in result.err
    assert PASSWORD not in result.out + result.err


def test_a_wrong_password_is_never_shown_either(tls_server, certificates,
                                                 queue_path, tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("wrong-Pa55word\n")
    fill(queue_path, 1)
    for how in (["--password-file", str(secret)],
                ["--password", "wrong-Pa55word"]):
        result = cli("run", queue_path, *to(tls_server), "--ca-file",
                     certificates.ca_file, "--username", "alice", *how, "-vv",
                     "--retry-initial", "0.01")
        assert result.code == EXIT_NOT_SENT
        assert "authentication" in result.err.lower()
        assert "wrong-Pa55word" not in result.out + result.err
        time.sleep(0.02)  # the next attempt is due


def test_implicit_tls(certificates, queue_path):
    fill(queue_path, 1)
    with SMTPServer(tls_context=certificates.server_context(),
                    implicit_tls=True) as server:
        result = cli("run", queue_path, *to(server), "--implicit-tls",
                     "--ca-file", certificates.ca_file)
        assert result.code == EXIT_OK, result.err
        assert [m.tls for m in server.messages] == [True]


def test_bad_ca_file(queue_path, tmp_path):
    result = cli("run", queue_path, "--ca-file", str(tmp_path / "none.pem"))
    assert result.code == EXIT_USAGE
    assert "cannot use the CA file" in result.err
    assert "No such file or directory" in result.err
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    result = cli("run", queue_path, "--ca-file", str(garbage))
    assert result.code == EXIT_USAGE
    assert f"cannot use the CA file {garbage}:" in result.err


def test_the_queue_is_created_if_missing(smtp_server, queue_path):
    result = cli("run", queue_path, *to(smtp_server))
    assert result.code == EXIT_OK
    assert os.path.isdir(os.path.join(queue_path, "new"))


def test_a_queue_that_cannot_be_a_maildir(tmp_path):
    (tmp_path / "tmp").write_text("")  # a file where tmp/ should be
    result = cli("run", str(tmp_path))
    assert result.code == EXIT_USAGE
    assert "is not a Maildir folder" in result.err
    afile = tmp_path / "afile"
    afile.write_text("")
    result = cli("run", str(afile))
    assert result.code == EXIT_USAGE
    assert "is not a Maildir folder: it is a file" in result.err


def test_a_terminal_gets_a_progress_bar_unless_told_not_to(smtp_server,
                                                           queue_path):
    fill(queue_path, 2)
    result = cli("run", queue_path, *to(smtp_server), tty=True)
    assert result.code == EXIT_OK
    # a short pass draws nothing, and the bar never stays on the screen
    assert "sending [" not in result.err
    result = cli("run", queue_path, *to(smtp_server), "--no-progress", tty=True)
    assert result.code == EXIT_OK


def test_run_from_another_thread_installs_no_signal_handler(smtp_server,
                                                            queue_path):
    fill(queue_path, 1)
    results = []
    thread = threading.Thread(
        target=lambda: results.append(cli("run", queue_path, *to(smtp_server)))
    )
    thread.start()
    thread.join(30)
    assert results[0].code == EXIT_OK


# -- the progress bar ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_bar_draws_after_a_delay_and_is_erased():
    err = io.StringIO()
    clock = Clock()
    progress = Progress(Console(io.StringIO(), err), delay=0.5, every=0.1,
                        clock=clock)
    progress(1, 10)
    assert err.getvalue() == ""  # too early
    clock.now += 1.0
    progress(2, 10)
    assert err.getvalue() == (
        "\rsending [######........................] 2/10  2.0 msg/s  4s left")
    clock.now += 0.05
    progress(3, 10)  # too soon after the last drawing
    assert err.getvalue().count("\r") == 1
    progress(10, 10)  # the end is always drawn
    assert err.getvalue().endswith(  # padded over the longer line before
        "\rsending [" + "#" * 30 + "] 10/10  9.5 msg/s" + " " * 8)
    progress.close()
    width = len("sending [" + "#" * 30 + "] 10/10  9.5 msg/s")  # the last one
    assert err.getvalue().endswith("\r" + " " * width + "\r")
    before = err.getvalue()
    progress.close()  # erased once only
    assert err.getvalue() == before


def test_progress_bar_that_was_never_drawn_writes_nothing():
    err = io.StringIO()
    progress = Progress(Console(io.StringIO(), err))
    progress(1, 1)
    progress.close()
    assert err.getvalue() == ""


# -- signals ------------------------------------------------------------------------


def signal_when(condition, signum: int, timeout: float = 10.0,
                always: bool = False) -> threading.Thread:
    """Send *signum* to this process once *condition* holds; after
    *timeout*, send it anyway if *always* (to end a daemon, so that the
    test cannot hang), else not (the command has ended by itself)."""
    def wait_and_signal() -> None:
        if wait_for(condition, timeout) or always:
            os.kill(os.getpid(), signum)

    thread = threading.Thread(target=wait_and_signal, daemon=True)
    thread.start()
    return thread


def test_sigterm_stops_the_daemon_gracefully(smtp_server, queue_path):
    ids = fill(queue_path, 3)
    handler = signal.getsignal(signal.SIGTERM)
    signaller = signal_when(lambda: len(smtp_server.messages) == 3,
                            signal.SIGTERM, always=True)
    result = cli("run", queue_path, *to(smtp_server), "--daemon", "--interval",
                 "0.1")
    signaller.join(10)
    assert result.code == EXIT_OK
    assert result.err == (
        "mailoutbox: stopping after the messages in flight (SIGTERM)\n"
    )
    assert sorted(smtp_server.message_ids()) == ids
    assert signal.getsignal(signal.SIGTERM) is handler
    assert not [t for t in threading.enumerate()
                if t.name.startswith("mailoutbox.queue")]


def test_sigint_stops_a_single_pass_after_the_message_in_flight(smtp_server,
                                                                queue_path):
    fill(queue_path, 4)
    smtp_server.slow(0.2)
    signaller = signal_when(lambda: len(smtp_server.messages) >= 1,
                            signal.SIGINT)
    result = cli("run", queue_path, *to(smtp_server), "--concurrency", "1")
    signaller.join(10)
    assert result.code == EXIT_OK
    assert "stopping after the messages in flight (SIGINT)" in result.err
    sent = len(smtp_server.messages)
    assert 1 <= sent < 4
    assert result.out.startswith(f"sent {sent}, deferred 0, failed 0")
    data = status(queue_path)
    assert (data["queued"], data["sending"]) == (4 - sent, 0)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_error_in_the_pass_is_reported(queue_path, monkeypatch):
    from mailoutbox.queue import QueueProcessorThread

    def broken(self, now=None, on_progress=None, flush=False):
        raise RuntimeError("the pass broke")

    monkeypatch.setattr(QueueProcessorThread, "process_queue", broken)
    fill(queue_path, 1)
    result = cli("run", queue_path, "--port", "1")
    assert result.code == EXIT_ERROR
    assert "unexpected error: RuntimeError('the pass broke')" in result.err


# -- as a real process ----------------------------------------------------------


def start(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mailoutbox", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def catches(pid: int, signum: int) -> bool:
    """Whether process *pid* has a handler for *signum* (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    return False  # pragma: no cover - every Linux has the line


def test_process_run_once(smtp_server, queue_path):
    ids = fill(queue_path, 3)
    done = subprocess.run(
        [sys.executable, "-m", "mailoutbox", "run", queue_path, *to(smtp_server)],
        capture_output=True, timeout=60,
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert done.stdout.startswith(b"sent 3, deferred 0, failed 0")
    assert sorted(smtp_server.message_ids()) == ids


def test_process_daemon_stops_on_sigterm_after_the_message_in_flight(
        smtp_server, queue_path):
    fill(queue_path, 1)
    smtp_server.slow(1.0)  # the message is in flight for about 2 s
    process = start("run", queue_path, *to(smtp_server), "--daemon",
                    "--interval", "0.1", "-v")
    try:
        assert wait_for(lambda: smtp_server.connections > 0)
        time.sleep(0.3)
        assert not smtp_server.messages  # still in flight
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait(10)
    assert process.returncode == EXIT_OK, err
    assert b"stopping after the messages in flight (SIGTERM)" in err
    assert len(smtp_server.messages) == 1
    assert status(queue_path)["queued"] == 0
    assert not [n for n in os.listdir(os.path.join(queue_path, "new"))
                if n.startswith(".sending-")]


def test_process_second_ctrl_c_stops_at_once(smtp_server, queue_path):
    fill(queue_path, 1)
    smtp_server.slow(5.0)
    process = start("run", queue_path, *to(smtp_server), "--daemon")
    try:
        assert wait_for(lambda: smtp_server.connections > 0)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        _out, err = process.communicate(timeout=30)
        assert time.monotonic() - started < 4
    finally:
        process.kill()
        process.wait(10)
    assert process.returncode == EXIT_INTERRUPTED
    assert err.endswith(b"mailoutbox: error: interrupted\n")


def test_process_password_from_the_environment_is_never_shown(
        tls_server, certificates, queue_path):
    fill(queue_path, 1)
    process = start("run", queue_path, *to(tls_server), "--ca-file",
                    certificates.ca_file, "--username", "alice",
                    "--password-env", "SMTP_PASSWORD", "-vv",
                    env={"SMTP_PASSWORD": PASSWORD})
    out, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_OK, err
    assert tls_server.messages[0].login == "alice"
    assert PASSWORD.encode() not in out + err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_process_idle_daemon_stops_at_once(queue_path, signum):
    Maildir(queue_path, create=True)
    process = start("run", queue_path, "--daemon", "--port", "1")
    try:
        # SIGINT is caught by Python from the start; wait for SIGTERM's.
        assert wait_for(lambda: catches(process.pid, signal.SIGTERM), 30)
        process.send_signal(signum)
        _out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait(10)
    assert process.returncode == EXIT_OK, err
    assert err == (
        "mailoutbox: stopping after the messages in flight"
        f" ({signal.Signals(signum).name})\n"
    ).encode()


def test_a_second_signal_only_asks_again():
    from mailoutbox.cli.run import Runner

    err = io.StringIO()
    runner = Runner(processor=None, console=Console(io.StringIO(), err))
    saved = signal.getsignal(signal.SIGINT)
    try:
        runner._on_signal(signal.SIGTERM, None)
        runner._on_signal(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGINT, saved)
    assert runner.stop_requested.is_set()
    assert err.getvalue() == (
        "mailoutbox: stopping after the messages in flight (SIGTERM)\n"
    )
