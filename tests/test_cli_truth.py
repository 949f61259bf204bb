"""The ``mailoutbox`` command tells the truth: about bad numbers, folders
that are not queues, permissions, a reader that goes away, and in the exit
statuses and claims of docs/cli.rst.  Everything runs the real command in a
subprocess."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import mailoutbox.cli.errors
from mailoutbox.cli import Console
from mailoutbox.cli import main
from mailoutbox.envelope import format_envelope
from mailoutbox.maildir import Maildir

DOCS = Path(__file__).resolve().parent.parent / "docs"
NOBODY = 65534


def python_m(*argv: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m mailoutbox ARGV``."""
    if "stdout" not in kw and "stderr" not in kw:
        kw["capture_output"] = True
    return subprocess.run(
        [sys.executable, "-m", "mailoutbox", *argv], timeout=timeout, **kw
    )


def fill(path: str, count: int = 1) -> Maildir:
    maildir = Maildir(path, create=True)
    for number in range(count):
        writer = maildir.newMessage()
        writer.write(format_envelope("app@example.org", ["jane@example.org"])
                     + f"Subject: Hello {number}\n\nHi!\n".encode())
        writer.commit()
    return maildir


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(path) -> dict[str, bytes | None]:
    """Every file and folder under *path*, with the files' contents."""
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), path)] = None
        for name in files:
            full = os.path.join(root, name)
            found[os.path.relpath(full, path)] = Path(full).read_bytes()
    return found


def stderr_lines(done: subprocess.CompletedProcess) -> list[str]:
    return done.stderr.decode().splitlines()


# -- numbers are checked --------------------------------------------------------


def in_process(*argv: str) -> subprocess.CompletedProcess:
    """Run the command in this process (faster, for the many cases of one
    check that a subprocess test also covers)."""
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), Console(out, err))
    return subprocess.CompletedProcess(
        argv, code, out.getvalue().encode(), err.getvalue().encode()
    )


@pytest.mark.parametrize(("option", "value", "run"), [
    ("--interval", "0", python_m), ("--interval", "-1", in_process),
    ("--interval", "nan", in_process),
    ("--timeout", "0", python_m), ("--timeout", "nan", in_process),
    ("--port", "70000", in_process), ("--port", "0", in_process),
    ("--port", "-25", in_process),
    ("--concurrency", "0", in_process), ("--concurrency", "-3", in_process),
])
def test_bad_numbers_on_the_command_line(tmp_path, option, value, run):
    queue = tmp_path / "queue"
    done = run("run", str(queue), f"{option}={value}")
    assert done.returncode == mailoutbox.cli.errors.EXIT_USAGE
    (error,) = stderr_lines(done)
    assert error.startswith(f"mailoutbox: error: argument {option}: invalid")
    assert repr(value) in error
    assert error.endswith("(see 'mailoutbox run --help')")
    assert not queue.exists()


@pytest.mark.parametrize(("section", "key", "value", "run"), [
    ("mailoutbox", "interval", "0", python_m),
    ("mailoutbox", "timeout", "0", in_process),
    ("mailoutbox", "port", "70000", in_process),
    ("mailoutbox", "concurrency", "0", in_process),
    ("app:zope-sendmail", "interval", "-1", in_process),
    ("mailoutbox:relay crm", "timeout", "nan", in_process),
])
def test_bad_numbers_in_the_config_file(tmp_path, section, key, value, run):
    ini = tmp_path / "mail.ini"
    first = "" if section == "mailoutbox" else "[mailoutbox]\n"
    ini.write_text(f"{first}[{section}]\n{key} = {value}\n")
    done = run("run", str(tmp_path / "queue"), "--config", str(ini))
    assert done.returncode == mailoutbox.cli.errors.EXIT_USAGE
    (error,) = stderr_lines(done)
    assert error.startswith(f"mailoutbox: error: {ini}: [{section}] {key}: invalid")
    assert not (tmp_path / "queue").exists()


# -- folders that are not queues ---------------------------------------------------


def test_run_refuses_a_folder_that_is_not_a_queue(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (photos / "2019").mkdir()
    before = tree(photos)
    done = python_m("run", str(photos), "--port", str(closed_port()))
    assert done.returncode == mailoutbox.cli.errors.EXIT_USAGE
    (error,) = stderr_lines(done)
    assert error.startswith(f"mailoutbox: error: {photos} is not a Maildir folder")
    assert "nothing was created" in error
    assert tree(photos) == before


def test_read_commands_refuse_a_folder_that_is_not_a_queue(tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    for name in ("tmp", "new", "cur"):
        (odd / name).write_text("files, not folders")
    done = in_process("status", str(odd))
    assert done.returncode == mailoutbox.cli.errors.EXIT_USAGE
    assert done.stderr.decode() == (
        f"mailoutbox: error: {odd} is not a mail queue (a Maildir folder with"
        " tmp, new and cur)\n"
    )


def test_run_refuses_a_file(tmp_path):
    path = tmp_path / "queue"
    path.write_text("not a queue")
    done = python_m("run", str(path), "--port", str(closed_port()))
    assert done.returncode == mailoutbox.cli.errors.EXIT_USAGE
    (error,) = stderr_lines(done)
    assert error.startswith(f"mailoutbox: error: {path} is not a Maildir folder")
    assert path.read_text() == "not a queue"


@pytest.mark.parametrize("empty_folder", [False, True])
def test_run_says_when_it_creates_a_queue(tmp_path, empty_folder):
    queue = tmp_path / "queue"
    if empty_folder:
        queue.mkdir()  # systemd's StateDirectory=, say
    done = python_m("run", str(queue), "--port", str(closed_port()))
    assert done.returncode == mailoutbox.cli.errors.EXIT_OK
    assert stderr_lines(done) == [
        f"mailoutbox: created a new, empty queue at {queue}"
    ]
    assert sorted(os.listdir(queue)) == ["cur", "new", "tmp"]
    # The second time, it is an existing queue.
    done = python_m("run", str(queue), "--port", str(closed_port()))
    assert (done.returncode, done.stderr) == (0, b"")


def test_run_quiet_does_not_say_it_created_a_queue(tmp_path):
    done = python_m("run", str(tmp_path / "queue"), "-q", "--port",
                    str(closed_port()))
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    assert (tmp_path / "queue" / "new").is_dir()


# -- permissions ------------------------------------------------------------------

# The tests run as root; the commands below run as nobody.  Python lives
# under /root (0700) here, which nobody may not even execute, so the child
# starts as root, imports what the command needs, and then drops to nobody
# (real and effective ids) before running it.  It keeps root as its saved
# id only to take it back after the command, so that coverage can write its
# data file.
AS_NOBODY = textwrap.dedent(f"""
    import io, os, sys, json, linecache, traceback
    import mailoutbox.cli, mailoutbox.mailer, mailoutbox.queue, mailoutbox.retry
    mailoutbox.cli.build_parser()
    commands = json.loads(sys.argv[1])
    os.setgroups([])
    os.setresgid({NOBODY}, {NOBODY}, 0)
    os.setresuid({NOBODY}, {NOBODY}, 0)
    results = []
    try:
        if len(commands) == 1:  # on the process's own streams
            results.append(mailoutbox.cli.main(commands[0]))
        else:
            for argv in commands:
                out, err = io.StringIO(), io.StringIO()
                code = mailoutbox.cli.main(argv, mailoutbox.cli.Console(out, err))
                results.append([code, out.getvalue(), err.getvalue()])
    finally:
        os.setresuid(0, 0, 0)
        os.setresgid(0, 0, 0)
    if len(commands) == 1:
        sys.exit(results[0])
    print(json.dumps(results))
""")

needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root, to run the command as another user",
)


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    """Run the command as nobody in a process of its own."""
    return subprocess.run(
        [sys.executable, "-c", AS_NOBODY, json.dumps([list(argv)])],
        capture_output=True, timeout=60,
    )


def many_as_nobody(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run several commands, one after the other, in one process as nobody
    (each with its own streams)."""
    done = subprocess.run(
        [sys.executable, "-c", AS_NOBODY, json.dumps(commands)],
        capture_output=True, timeout=120, check=True,
    )
    return [
        subprocess.CompletedProcess(argv, code, out.encode(), err.encode())
        for argv, (code, out, err) in zip(commands, json.loads(done.stdout),
                                          strict=True)
    ]


@pytest.fixture
def public_dir():
    """A folder under /tmp that every user may enter (pytest's tmp_path is
    under a folder of mode 0700)."""
    path = tempfile.mkdtemp(prefix="mailoutbox-truth-", dir="/tmp")
    os.chmod(path, 0o755)  # noqa: S103 - the point of the fixture
    yield Path(path)
    shutil.rmtree(path)


@pytest.fixture
def private_queue(public_dir):
    """A queue owned by root with mode 0700 (as mailoutbox creates them),
    holding one message."""
    path = public_dir / "queue"
    maildir = fill(str(path), 1)
    (name,) = os.listdir(maildir.new)
    return path, name


@needs_root
def test_permission_denied_on_every_command(private_queue):
    queue, name = private_queue
    commands = [
        ["status", str(queue)], ["status", str(queue), "--json"],
        ["list", str(queue)], ["list", str(queue), "--failed"],
        ["show", str(queue), name], ["retry", str(queue), "--all"],
        ["retry", str(queue), name], ["purge", str(queue), "--failed", "--yes"],
        ["purge", str(queue), name], ["run", str(queue), "--port", "1"],
        ["run", str(queue), "--daemon", "--port", "1"],
    ]
    before = tree(queue)
    for done in many_as_nobody(commands):
        assert done.returncode == mailoutbox.cli.errors.EXIT_ERROR, done
        assert done.stderr.decode() == (
            f"mailoutbox: error: Permission denied: {queue}\n"
        ), done.args
        assert done.stdout == b""
    assert tree(queue) == before
    # The same, as a command of its own.
    done = as_nobody("list", str(queue))
    assert done.returncode == mailoutbox.cli.errors.EXIT_ERROR
    assert done.stderr.decode() == f"mailoutbox: error: Permission denied: {queue}\n"


@needs_root
def test_permission_denied_on_the_folder_holding_the_queue(public_dir):
    parent = public_dir / "private"
    parent.mkdir(mode=0o700)
    fill(str(parent / "queue"))
    done = as_nobody("status", str(parent / "queue"))
    assert done.returncode == mailoutbox.cli.errors.EXIT_ERROR
    assert done.stderr.decode() == (
        f"mailoutbox: error: Permission denied: {parent / 'queue'}\n"
    )


@needs_root
def test_run_on_a_queue_it_may_read_but_not_write(private_queue):
    queue, _name = private_queue
    for folder in (queue, queue / "tmp", queue / "new", queue / "cur"):
        os.chmod(folder, 0o755)  # noqa: S103 - readable, not writable
    before = tree(queue)
    done = as_nobody("run", str(queue), "--port", "1")
    assert done.returncode == mailoutbox.cli.errors.EXIT_ERROR
    assert done.stderr.decode() == f"mailoutbox: error: Permission denied: {queue}\n"
    assert tree(queue) == before
    # The read commands work.
    done = as_nobody("status", str(queue), "--json")
    assert done.returncode == 0
    assert b'"queued": 1' in done.stdout


@needs_root
def test_run_on_messages_it_may_not_touch(private_queue, smtp_server):
    """The folders are writable, a message file is not (it is root's): the
    processor moves it to the failed area with a reason that says how to
    fix it, in one log line, and run exits with status 1 (not 0 with
    "skipped 1")."""
    queue, name = private_queue
    for folder in (queue, queue / "tmp", queue / "new", queue / "cur"):
        os.chmod(folder, 0o777)  # noqa: S103 - writable by nobody
    port = str(smtp_server.port)
    done = as_nobody("run", str(queue), "--hostname", "127.0.0.1", "--port", port)
    assert done.returncode == mailoutbox.cli.errors.EXIT_NOT_SENT
    err = done.stderr.decode()
    assert "Traceback" not in err
    (line,) = err.splitlines()
    assert " ERROR mailoutbox." in line
    assert f"moved {name} to the failed area: cannot be claimed" in line
    assert "run 'mailoutbox retry'" in line
    assert os.listdir(queue / "new") == []
    assert name in os.listdir(queue / "failed")
    assert smtp_server.messages == []


@needs_root
def test_run_on_messages_it_may_neither_claim_nor_move(private_queue, smtp_server):
    """A message file that is root's in a sticky folder can be neither
    claimed nor moved: it is left in the queue, one line says why, and run
    exits with status 4."""
    queue, name = private_queue
    for folder in (queue, queue / "tmp", queue / "cur"):
        os.chmod(folder, 0o777)  # noqa: S103 - writable by nobody
    os.chmod(queue / "new", 0o1777)  # noqa: S103 - sticky, as /tmp is
    port = str(smtp_server.port)
    done = as_nobody("run", str(queue), "--hostname", "127.0.0.1", "--port", port)
    assert done.returncode == mailoutbox.cli.errors.EXIT_ERROR
    err = done.stderr.decode()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert " ERROR mailoutbox." in lines[0]
    assert f"cannot claim {queue / 'new' / name}, nor move it" in lines[0]
    assert "(Operation not permitted)" in lines[0]
    assert lines[1] == (
        "mailoutbox: error: 1 error(s) while processing the queue: some messages"
        " could not be handled and were left in it (see the log lines above;"
        " -vv shows the tracebacks)"
    )
    assert os.listdir(queue / "new") == [name]
    assert smtp_server.messages == []



# -- a reader that goes away ----------------------------------------------------------


@pytest.mark.parametrize("argv", [["list"], ["status"], ["show", "--raw"]])
def test_a_reader_that_goes_away(tmp_path, argv):
    """``mailoutbox list QUEUE | head -1``, with head gone before the first
    line: the command stops quietly."""
    queue = str(tmp_path / "queue")
    maildir = fill(queue, 3)
    if argv[0] == "show":
        argv = ["show", queue, sorted(os.listdir(maildir.new))[0], "--raw"]
    else:
        argv = [*argv, queue]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = python_m(*argv, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert done.returncode == mailoutbox.cli.errors.EXIT_BROKEN_PIPE
    assert done.stderr == b""


class GoneReader(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_that_goes_away_in_process(tmp_path):
    """main() called by a program, on a stream that is not a file."""
    queue = str(tmp_path / "queue")
    fill(queue, 1)
    err = io.StringIO()
    code = main(["list", queue], Console(GoneReader(), err))
    assert (code, err.getvalue()) == (mailoutbox.cli.errors.EXIT_BROKEN_PIPE, "")


def test_head_one_in_a_shell(tmp_path):
    """The pipe as people type it; whether the command still writes when
    head has gone depends on timing, so either way it must be quiet."""
    queue = str(tmp_path / "queue")
    fill(queue, 200)
    command = (
        f"{sys.executable} -m mailoutbox list {queue} | head -1;"
        ' echo "status=${PIPESTATUS[0]}" >&2'
    )
    done = subprocess.run(["bash", "-c", command], capture_output=True, timeout=60)
    assert done.stdout.count(b"\n") == 1
    assert done.stderr in (b"status=0\n", b"status=141\n")


# -- what docs/cli.rst says ---------------------------------------------------------


def documented_exit_statuses() -> dict[int, str]:
    text = (DOCS / "cli.rst").read_text()
    section = text.split("\nExit status\n", 1)[1]
    table = section.split("\n=====  =", 3)[2]  # between the 2nd and 3rd rule
    statuses: dict[int, str] = {}
    current = None
    for line in table.splitlines()[1:]:
        match = re.match(r"^(\d+)\s+(.*)$", line)
        if match:
            current = int(match.group(1))
            statuses[current] = match.group(2)
        elif current is not None:
            statuses[current] += " " + line.strip()
    return statuses


def test_the_exit_status_table_lists_every_status():
    constants = {
        value for name, value in vars(mailoutbox.cli.errors).items()
        if name.startswith("EXIT_")
    }
    assert set(documented_exit_statuses()) == constants


def wait_until_reading_stdin(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/wchan") as f:
            if "pipe_read" in f.read():
                return
        time.sleep(0.02)
    raise AssertionError("the command never read its standard input")


def provoke(status: int, tmp_path) -> subprocess.CompletedProcess:
    queue = str(tmp_path / "queue")
    fill(queue, 1)
    if status == 0:
        return python_m("status", queue)
    if status == 1:  # the relay cannot be reached: deferred
        return python_m("run", queue, "--hostname", "127.0.0.1", "--port",
                        str(closed_port()))
    if status == 2:
        return python_m("purge", queue, "--failed")  # without --yes
    if status == 3:
        return python_m("show", queue, "no-such-message")
    if status == 4:  # an operating system error
        loop = tmp_path / "loop"
        loop.symlink_to(loop)
        return python_m("run", str(loop))
    if status == 130:  # Ctrl-C while it waits for its --config on stdin
        process = subprocess.Popen(
            [sys.executable, "-m", "mailoutbox", "status", "--config", "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            wait_until_reading_stdin(process.pid)
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=30)
        finally:
            process.kill()
            process.wait(10)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)
    assert status == 141
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return python_m("list", queue, stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("status", sorted(documented_exit_statuses()))
def test_each_documented_exit_status_happens(status, tmp_path):
    done = provoke(status, tmp_path)
    assert done.returncode == status, done.stderr
    if status not in (0, 1, 141):
        (error,) = done.stderr.decode().splitlines()
        assert error.startswith("mailoutbox: error: ")


def test_the_help_epilog_lists_the_same_statuses():
    done = python_m("--help")
    epilog = done.stdout.decode().split("exit status:", 1)[1]
    assert {int(n) for n in re.findall(r"(?:^|[;:])\s*(\d+)\s", epilog)} == set(
        documented_exit_statuses()
    )


def test_the_config_sections_the_docs_name_are_those_read(tmp_path):
    """docs/cli.rst lists the sections read; each is read, and a misspelt
    mailoutbox: section is an error, as it says."""
    text = (DOCS / "cli.rst").read_text()
    section = text.split("\nConfiguration files\n", 1)[1]
    section = section.split("\nValues are read", 1)[0]
    named = re.findall(r"^``\[([^\]]+)\]``$", section, re.M)
    assert named == ["app:zope-sendmail", "mailoutbox", "mailoutbox:relay NAME"]
    assert "Three kinds of sections are read" in section
    ini = tmp_path / "mail.ini"
    for name, run in zip(named, (python_m, in_process, in_process), strict=True):
        first = "" if name == "mailoutbox" else "[mailoutbox]\n"
        ini.write_text(f"{first}[{name.replace('NAME', 'crm')}]\nport = 0\n")
        done = run("run", str(tmp_path / "queue"), "--config", str(ini))
        assert done.returncode == 2
        assert b"port: invalid port '0'" in done.stderr
    ini.write_text("[mailoutbox]\n[mailoutbox:relays crm]\n")
    done = in_process("run", str(tmp_path / "queue"), "--config", str(ini))
    assert done.returncode == 2
    assert b"unknown section [mailoutbox:relays crm]" in done.stderr
    ini.write_text("[mailoutbox]\n[app:main]\nuse = egg:shop\n")
    done = in_process("status", str(tmp_path / "missing"), "--config", str(ini))
    assert b"no queue at" in done.stderr  # the other section was ignored


def test_an_empty_value_or_none_leaves_a_setting_unset(tmp_path, smtp_server):
    """As docs/cli.rst says, for every kind of key: the value of the section
    below, or the default, stays."""
    text = (DOCS / "cli.rst").read_text()
    assert "* An empty value, or ``None``, leaves a setting unset." in text
    queue = tmp_path / "queue"
    fill(str(queue), 1)
    ini = tmp_path / "mail.ini"
    ini.write_text(textwrap.dedent(f"""\
        [app:zope-sendmail]
        hostname = {smtp_server.host}
        port = {smtp_server.port}
        queue_path = {queue}

        [mailoutbox]
        port =
        interval = None
        force_tls =
        timeout = None
        concurrency =
        username = None
        """))
    done = in_process("run", "--config", str(ini))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"sent 1, deferred 0, failed 0")


def test_the_json_keys_are_those_documented(tmp_path):
    text = (DOCS / "cli.rst").read_text()
    part = text.split("``status --json`` prints one JSON object", 1)[1]
    status_part, list_part = part.split("``list --json`` prints", 1)
    documented = set()
    for line in status_part.splitlines():
        if line.startswith("``"):
            documented.update(re.findall(r"``(\w+)``", line))
    list_part = list_part.split("\n\n", 1)[0]
    list_keys = set(re.findall(r"``(\w+)``", list_part))
    queue = str(tmp_path / "queue")
    fill(queue, 1)
    sent = in_process("send", queue, "--relay", "crm", "--from", "a@example.org",
                      "--to", "b@example.org", "--subject", "s", "--body", "b")
    assert sent.returncode == 0, sent.stderr
    data = json.loads(python_m("status", queue, "--json").stdout)
    postgresql_only = {"orphaned_transactions"}  # a database's
    assert set(data) == documented - postgresql_only
    assert set(data["relays"]["crm"]) == documented - {
        "version", "queue", "time", "relays", *postgresql_only}
    data = json.loads(in_process("list", queue, "--json").stdout)
    found = {"version", "queue", "time", "messages"}
    for message in data["messages"]:
        found.update(message)
    assert found == list_keys - {"null"}
