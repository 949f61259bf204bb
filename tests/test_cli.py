"""The mailoutbox command: parser, exit codes, errors, logging, --config.

Helpers used by the other ``test_cli_*`` modules live here too.
"""
from __future__ import annotations

import io
import logging
import os
import runpy
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

import pytest

import mailoutbox.cli.status
from mailoutbox.cli import EXIT_ERROR
from mailoutbox.cli import EXIT_INTERRUPTED
from mailoutbox.cli import EXIT_OK
from mailoutbox.cli import EXIT_USAGE
from mailoutbox.cli import Console
from mailoutbox.cli import build_parser
from mailoutbox.cli import main
from mailoutbox.cli.config import Settings
from mailoutbox.cli.config import duration
from mailoutbox.cli.config import resolve
from mailoutbox.cli.reference import format_reference
from mailoutbox.envelope import format_envelope
from mailoutbox.maildir import Entry
from mailoutbox.maildir import Maildir

# -- helpers for all the CLI tests ---------------------------------------------


class TTY(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        return True


class TTYBytes(io.BytesIO):
    def isatty(self) -> bool:
        return True


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(*argv: str, stdin: bytes | io.BytesIO = b"", tty: bool = False) -> Result:
    """Run the command in-process with captured streams."""
    out = io.StringIO()
    err = TTY() if tty else io.StringIO()
    source = stdin if isinstance(stdin, io.BytesIO) else io.BytesIO(stdin)
    code = main(list(argv), Console(out, err, source))
    return Result(code, out.getvalue(), err.getvalue())


def python_m(*argv: str, stdin: bytes = b"", timeout: float = 60,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m mailoutbox ARGV`` in a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "mailoutbox", *argv],
        input=stdin, capture_output=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def add_message(maildir: Maildir, subject: str = "Hello", *,
                to: tuple[str, ...] = ("jane@example.org",),
                fromaddr: str = "app@example.org",
                message_id: str | None = None,
                extra: bytes = b"") -> Entry:
    """Queue a message the way a delivery does."""
    writer = maildir.newMessage()
    headers = f"From: {fromaddr}\nTo: {', '.join(to)}\nSubject: {subject}\n"
    if message_id is not None:
        headers += f"Message-Id: <{message_id}>\n"
    writer.write(format_envelope(fromaddr, to) + headers.encode() + extra
                 + b"\nThe body.\n")
    writer.commit()
    return Entry(maildir.new, writer.name)


def write_ini(tmp_path, text: str, name: str = "mail.ini") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# -- the parser and main() -----------------------------------------------------


def test_help_lists_every_command_and_exit_statuses():
    result = cli("--help")
    assert result.code == EXIT_OK
    for command in ("run", "status", "list", "show", "retry", "purge", "send",
                    "demo"):
        assert f"    {command} " in result.out
    assert "exit status" in result.out
    assert result.err == ""


def test_version():
    result = cli("--version")
    assert result.code == EXIT_OK
    assert result.out.startswith("mailoutbox ")


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["status", "--bogus"]])
def test_usage_errors_exit_2(argv):
    result = cli(*argv)
    assert result.code == EXIT_USAGE
    assert result.err.startswith("mailoutbox: error: ")
    assert result.err.count("\n") == 1
    assert result.err.endswith(" --help')\n")
    assert result.out == ""


def test_argparse_type_errors_name_the_option():
    result = cli("run", "/nonexistent", "--port", "99999")
    assert result.code == EXIT_USAGE
    assert "--port: invalid port '99999'" in result.err


def test_cli_error_is_one_line_on_stderr(tmp_path):
    result = cli("status", str(tmp_path / "missing"))
    assert result.code == EXIT_USAGE
    assert result.err == (
        f"mailoutbox: error: no queue at {tmp_path / 'missing'}: no such"
        " directory\n"
    )
    assert result.out == ""


def test_operating_system_error_is_one_line_exit_4(tmp_path):
    # A symbolic link loop where the queue should be.
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    result = cli("run", str(loop))
    assert result.code == EXIT_ERROR
    assert result.err == (
        f"mailoutbox: error: Too many levels of symbolic links: {loop}\n"
    )


def test_operating_system_error_without_filename():
    from mailoutbox.cli import _describe_os_error

    assert _describe_os_error(OSError("disk on fire")) == "disk on fire"


def test_unexpected_error_is_one_line_with_a_hint(monkeypatch, tmp_path):
    def broken(args, console):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(mailoutbox.cli.status, "status", broken)
    result = cli("status", str(tmp_path))
    assert result.code == EXIT_ERROR
    assert result.err == (
        "mailoutbox: error: unexpected error: ZeroDivisionError('oops') (run"
        " with -vv for the traceback)\n"
    )
    result = cli("status", "-vv", str(tmp_path))
    assert "Traceback" in result.err
    assert "ZeroDivisionError: oops" in result.err


def test_ctrl_c_outside_run_exits_130(monkeypatch, tmp_path):
    def interrupted(args, console):
        raise KeyboardInterrupt

    monkeypatch.setattr(mailoutbox.cli.status, "status", interrupted)
    result = cli("status", str(tmp_path))
    assert result.code == EXIT_INTERRUPTED
    assert result.err == "mailoutbox: error: interrupted\n"


def test_logging_is_routed_to_the_console_and_removed_afterwards(tmp_path):
    logger = logging.getLogger("mailoutbox")
    handlers, level = list(logger.handlers), logger.level
    maildir = Maildir(str(tmp_path / "q"), create=True)
    add_message(maildir, message_id="log-1@example.org")
    # Port 9 (discard) on 127.0.0.1 is closed: the message is deferred.
    result = cli("run", maildir.path, "--hostname", "127.0.0.1", "--port", "9",
                 "-v")
    assert "INFO mailoutbox.queue: could not send log-1@example.org" in result.err
    assert logger.handlers == handlers
    assert logger.level == level
    quiet = cli("run", maildir.path, "--hostname", "127.0.0.1", "--port", "9",
                "--retry-initial", "1", "-q")
    assert quiet.out == ""


def test_console_defaults_to_the_process_streams(capsys):
    console = Console()
    console.out("to stdout")
    console.error("bad")
    console.note("fyi")
    captured = capsys.readouterr()
    assert captured.out == "to stdout\n"
    assert captured.err == "mailoutbox: error: bad\nmailoutbox: fyi\n"
    assert console.stdin is sys.stdin.buffer or console.stdin is not None


def test_console_is_terminal():
    assert Console(stderr=TTY()).is_terminal()
    assert not Console(stderr=io.StringIO()).is_terminal()
    closed = TTY()
    closed.close()
    assert not Console(stderr=closed).is_terminal()


def test_main_uses_sys_argv_by_default(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mailoutbox", "--version"])
    assert main() == EXIT_OK
    assert capsys.readouterr().out.startswith("mailoutbox ")


def test_python_m_mailoutbox_in_process(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["mailoutbox", "--version"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(
            os.path.join(os.path.dirname(mailoutbox.cli.__file__), "..",
                         "__main__.py"),
            run_name="__main__",
        )
    assert exc.value.code == EXIT_OK


def test_python_m_mailoutbox_subprocess(tmp_path):
    done = python_m("status", str(tmp_path / "missing"))
    assert done.returncode == EXIT_USAGE
    assert done.stderr.decode().startswith("mailoutbox: error: no queue at")
    assert b"Traceback" not in done.stderr


# -- the reference in the docs -----------------------------------------------


def test_reference_documents_every_subcommand_and_option():
    text = format_reference()
    parser = build_parser()
    subparsers = next(
        a for a in parser._actions if hasattr(a, "choices") and a.choices
    ).choices
    for name, subparser in subparsers.items():
        assert f".. program:: mailoutbox {name}" in text
        for action in subparser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in text, (name, option)
    assert "exit status" in text


def test_reference_escapes_markup():
    import argparse

    parser = argparse.ArgumentParser(
        prog="x", description="a *b* `c` |d| --flag -f e-mail '-'"
    )
    parser.add_argument("--flag", help=None)
    text = format_reference(parser)
    assert r"a \*b\* \`c\` \|d\| ``--flag`` ``-f`` e-mail '-'" in text


# -- settings and --config -------------------------------------------------------


def settings_for(*argv: str, stdin: bytes = b"") -> Settings:
    args = build_parser().parse_args(["run", *argv])
    return resolve(args, Console(io.StringIO(), io.StringIO(), io.BytesIO(stdin)))


ZOPE_SENDMAIL_INI = """\
    [app:zope-sendmail]
    interval = 7
    hostname = smtp.example.org
    port = 2525
    username = mailer
    password = pw-from-ini
    force_tls = true
    no_tls = False
    queue_path = %(here)s/queue
    """


def test_zope_sendmail_section_is_read_as_zope_sendmail_reads_it(tmp_path):
    from zope.sendmail.queue import ConsoleApp

    path = write_ini(tmp_path, ZOPE_SENDMAIL_INI.replace("%(here)s", str(tmp_path)))
    theirs = ConsoleApp(["zope-sendmail", "--config", path], verbose=False)
    ours = settings_for("--config", path)
    for name in ("interval", "hostname", "port", "username", "password",
                 "force_tls", "no_tls", "queue_path"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_here_is_the_directory_of_the_ini_file(tmp_path):
    path = write_ini(tmp_path, ZOPE_SENDMAIL_INI)
    assert settings_for("--config", path).queue_path == f"{tmp_path}/queue"


def test_none_and_empty_values_are_unset(tmp_path):
    path = write_ini(tmp_path, """\
        [app:zope-sendmail]
        username = None
        password =
        queue_path = /q
        """)
    settings = settings_for("--config", path)
    assert settings.username is None and settings.password is None
    assert settings.queue_path == "/q"


def test_mailoutbox_section_overrides_and_command_line_wins(tmp_path):
    path = write_ini(tmp_path, """\
        [app:zope-sendmail]
        hostname = old.example.org
        port = 25
        queue_path = /old
        use = egg:something
        [mailoutbox]
        hostname = new.example.org
        implicit_tls = yes
        ca_file = /etc/ca.pem
        timeout = 1m
        concurrency = 8
        lease = 2m
        retry_initial = 30s
        retry_factor = 3
        retry_cap = 2h
        max_age = 2d
        """)
    settings = settings_for("--config", path, "--port", "465", "/cli-queue")
    assert settings == Settings(
        queue_path="/cli-queue", hostname="new.example.org", port=465,
        implicit_tls=True, ca_file="/etc/ca.pem", timeout=60.0, concurrency=8,
        lease=120.0, retry_initial=30.0, retry_factor=3.0, retry_cap=7200.0,
        max_age=2 * 86400.0,
    )


def test_config_from_stdin(tmp_path):
    settings = settings_for(
        "--config", "-",
        stdin=b"[mailoutbox]\nqueue_path = /from-stdin\nhostname = h\n",
    )
    assert (settings.queue_path, settings.hostname) == ("/from-stdin", "h")


@pytest.mark.parametrize(("text", "message"), [
    ("[mailoutbox]\nportt = 25\n", "unknown key 'portt' in [mailoutbox]"),
    ("[mailoutbox]\nport = smtp\n", "[mailoutbox] port: invalid port 'smtp'"),
    ("[app:zope-sendmail]\nforce_tls = maybe\n",
     "[app:zope-sendmail] force_tls: invalid boolean 'maybe'"),
    ("[mailoutbox]\nconcurrency = 0\n", "concurrency: invalid number '0'"),
    ("[mailoutbox]\nretry_factor = 0.5\n", "retry_factor: invalid factor '0.5'"),
    ("[mailoutbox]\ninterval = soon\n", "interval: invalid duration 'soon'"),
    ("[mailoutbox]\nhostname = %(nowhere)s\n", "hostname: Bad value substitution"),
    ("[other]\nx = 1\n", "has neither a [mailoutbox] nor an [app:zope-sendmail]"),
    ("no section\n", "invalid configuration file"),
])
def test_bad_config_files_are_usage_errors(tmp_path, text, message):
    path = write_ini(tmp_path, text)
    result = cli("run", "--config", path)
    assert result.code == EXIT_USAGE
    assert message in result.err
    assert result.err.count("\n") == 1


def test_missing_or_unreadable_config_file(tmp_path):
    result = cli("run", "--config", str(tmp_path / "nope.ini"))
    assert result.code == EXIT_USAGE
    assert "cannot read the configuration file" in result.err
    assert "No such file or directory" in result.err
    binary = tmp_path / "binary.ini"
    binary.write_bytes(b"\xff\xfe[mailoutbox]\n")
    assert "cannot read the configuration file" in cli(
        "run", "--config", str(binary)).err


def test_queue_is_required(tmp_path):
    result = cli("run")
    assert result.code == EXIT_USAGE
    assert "no queue: give the queue's directory" in result.err
    path = write_ini(tmp_path, "[mailoutbox]\nhostname = h\n")
    assert "no queue" in cli("status", "--config", path).err
    assert "no queue" in cli("status").err


def test_password_sources(tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.write_text("from-file\nsecond line\n")
    monkeypatch.setenv("MAILOUTBOX_TEST_PW", "from-env")
    base = ["/q", "--username", "u"]
    assert settings_for(*base, "--password", "p").password == "p"
    assert settings_for(*base, "--password-env", "MAILOUTBOX_TEST_PW").password == (
        "from-env"
    )
    assert settings_for(*base, "--password-file", str(secret)).password == (
        "from-file"
    )
    # A source in a higher layer replaces every source below it.
    path = write_ini(tmp_path, f"""\
        [app:zope-sendmail]
        username = u
        password = from-zope-section
        [mailoutbox]
        password_file = {secret}
        """)
    assert settings_for("/q", "--config", path).password == "from-file"
    assert settings_for("/q", "--config", path, "--password-env",
                        "MAILOUTBOX_TEST_PW").password == "from-env"


def test_password_source_errors(tmp_path):
    result = cli("run", "/q", "--username", "u", "--password-env",
                 "MAILOUTBOX_TEST_UNSET")
    assert result.code == EXIT_USAGE
    assert "environment variable MAILOUTBOX_TEST_UNSET" in result.err
    result = cli("run", "/q", "--username", "u", "--password-file",
                 str(tmp_path / "none"))
    assert "cannot read the password file" in result.err
    result = cli("run", "/q", "--password", "x", "--password-env", "Y")
    assert "not allowed with argument" in result.err


@pytest.mark.parametrize(("argv", "message"), [
    (["--username", "u"], "a username and a password must be given together"),
    (["--password", "p"], "a username and a password must be given together"),
    (["--implicit-tls", "--no-tls"], "implicit-tls and no-tls contradict"),
    (["--force-tls", "--no-tls"], "not allowed with argument"),
])
def test_contradictions(argv, message):
    result = cli("run", "/q", *argv)
    assert result.code == EXIT_USAGE
    assert message in result.err


def test_contradiction_between_config_and_command_line(tmp_path):
    path = write_ini(tmp_path, "[mailoutbox]\nno_tls = true\nqueue_path = /q\n")
    result = cli("run", "--config", path, "--force-tls")
    assert result.code == EXIT_USAGE
    assert "force-tls and no-tls contradict each other" in result.err


def test_settings_never_show_the_password():
    settings = Settings(username="u", password="hunter2-secret")
    assert "hunter2-secret" not in repr(settings)


def test_smtp_port_defaults():
    assert Settings().smtp_port == 25
    assert Settings(implicit_tls=True).smtp_port == 465
    assert Settings(implicit_tls=True, port=2465).smtp_port == 2465


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90.0), ("1.5", 1.5), (".5", 0.5), ("90s", 90.0), ("5m", 300.0),
    ("2h", 7200.0), ("5d", 432000.0), (" 3 M ", 180.0),
])
def test_durations(text, seconds):
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1", "1w", "soon", "1..2", "nan"])
def test_bad_durations(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="invalid duration"):
        duration(text)


def test_time_formats():
    from mailoutbox.cli.view import format_age
    from mailoutbox.cli.view import format_time

    assert [format_age(s) for s in (-5, 0, 59, 61, 599, 600, 3599, 3661,
                                    86399, 90000)] == [
        "0s", "0s", "59s", "1m 01s", "9m 59s", "10m", "59m", "1h 01m",
        "23h 59m", "1d 01h",
    ]
    assert format_time(time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))) == (
        "2026-01-02 03:04:05"
    )


def test_importing_main_module_runs_nothing():
    import mailoutbox.__main__  # noqa: F401


def test_log_records_of_other_commands_have_no_traceback_below_vv(tmp_path):
    parent = tmp_path / "file"
    parent.write_text("")
    argv = ["send", str(parent / "queue"), "--from", "a@example.org", "--to",
            "b@example.org", "--subject", "s", "--body", "b"]
    result = cli(*argv, "-v")
    assert "ERROR mailoutbox.delivery: could not queue message" in result.err
    assert "Traceback" not in result.err
    assert "Traceback" in cli(*argv, "-vv").err


def test_a_lower_level_set_by_the_application_is_kept(tmp_path):
    logger = logging.getLogger("mailoutbox")
    saved = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        cli("status", str(tmp_path))
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(saved)


def test_options_may_come_between_message_ids(tmp_path):
    Maildir(str(tmp_path), create=True)
    result = cli("retry", str(tmp_path), "a", "-q", "b")
    assert result.code == 3
    assert "no message 'a'" in result.err and "no message 'b'" in result.err
    result = cli("status", str(tmp_path), "extra")
    assert result.code == EXIT_USAGE
    assert "unrecognized arguments: extra" in result.err
    result = cli("retry", str(tmp_path), "a", "--bogus")
    assert result.code == EXIT_USAGE
    assert "unrecognized arguments: --bogus" in result.err


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--concurrency", "many", "invalid number 'many'"),
    ("--concurrency", "0", "invalid number '0'"),
    ("--retry-factor", "fast", "invalid factor 'fast'"),
    ("--retry-factor", "inf", "invalid factor 'inf'"),
    ("--max-age", "9" * 400, "invalid duration"),
    ("--port", "0", "invalid port '0'"),
])
def test_bad_option_values(option, value, message):
    result = cli("run", "/q", option, value)
    assert result.code == EXIT_USAGE
    assert message in result.err


def test_reference_of_a_parser_without_description():
    import argparse

    text = format_reference(argparse.ArgumentParser(prog="bare"))
    assert text.startswith("bare\n----\n\n.. program:: bare\n\n.. code-block::")


def test_the_age_of_a_vanished_message_is_now(tmp_path):
    before = time.time()
    queue = Maildir(str(tmp_path / "q"), create=True)
    assert queue.queued_at(Entry(str(tmp_path), "oddname")) >= before
