"""The mailoutbox command with routed messages: status per relay, list,
show, retry and purge in relay folders, send --relay, and run with several
relays from the configuration file, against real SMTP servers."""
from __future__ import annotations

import json
import os
import socket
import textwrap
import time

import pytest
import transaction

from mailoutbox import relays
from mailoutbox.cli import EXIT_NOT_SENT
from mailoutbox.cli import EXIT_OK
from mailoutbox.cli import EXIT_USAGE
from mailoutbox.cli.config import RelaySettings
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.envelope import parse_queue_file
from mailoutbox.maildir import Maildir
from mailoutbox.testing.smtpd import SMTPServer

from .test_cli import cli
from .test_cli import python_m
from .test_cli import write_ini

NAMES = ("crm-1", "crm 2", "down")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def route(queue_path, relay, subject, to="jane@example.org"):
    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(queue_path, transaction_manager=manager,
                                  mailers=NAMES)
    with manager:
        return delivery.send_message(
            f"From: app@example.org\nTo: {to}\nSubject: {subject}\n\nx\n".encode(),
            mailer=relay)


@pytest.fixture
def queue(queue_path):
    """A queue with a message of its own and routed ones in every state."""
    ids = {
        "main": route(queue_path, None, "Main"),
        "crm-1": route(queue_path, "crm-1", "Routed"),
        "deferred": route(queue_path, "crm 2", "Deferred"),
        "failed": route(queue_path, "crm 2", "Failed"),
    }
    maildir = Maildir(relays.relay_path(queue_path, "crm 2"))
    deferred, failed = sorted(maildir.scan().entries, key=lambda e: e.name)
    maildir.claim(deferred).defer(time.time() + 3600, {"attempts": 1, "error": "451"})
    maildir.claim(failed).fail({"error": "550 no", "code": 550})
    ids["deferred_name"], ids["failed_name"] = deferred.name, failed.name
    return ids


# -- status, list, show -----------------------------------------------------------


def test_status_counts_every_relay(queue_path, queue):
    data = json.loads(cli("status", queue_path, "--json").out)
    assert (data["queued"], data["deferred"], data["sending"], data["failed"]) == (
        2, 1, 0, 1)
    assert set(data["relays"]) == {"crm-1", "crm 2"}
    crm2 = data["relays"]["crm 2"]
    assert (crm2["queued"], crm2["deferred"], crm2["failed"]) == (0, 1, 1)
    assert crm2["next_attempt"] == pytest.approx(time.time() + 3600, abs=60)
    assert crm2["oldest_age"] is not None and crm2["oldest_failed_age"] is not None
    assert data["relays"]["crm-1"]["queued"] == 1
    assert data["relays"]["crm-1"]["next_attempt"] is None
    text = cli("status", queue_path).out.splitlines()
    assert "relay     crm 2: queued 0, deferred 1, sending 0, failed 1" in text
    assert "relay     crm-1: queued 1, deferred 0, sending 0, failed 0" in text
    assert text[1] == "queued    2"


def test_status_without_relays_has_no_relays_key(queue_path):
    route(queue_path, None, "Main")
    data = json.loads(cli("status", queue_path, "--json").out)
    assert "relays" not in data
    assert "\nrelay " not in cli("status", queue_path).out


def test_list_and_show_routed_messages(queue_path, queue):
    lines = [line for line in cli("list", queue_path, "--all").out.splitlines()
             if not line[0].isspace()]  # not the lines under messages
    assert len(lines) == 4
    routed = [line for line in lines if "'Routed'" in line]
    assert "  via crm-1  jane@example.org  'Routed'" in routed[0]
    assert any("via crm 2" in line and "'Failed'" in line for line in lines)
    [main] = [line for line in lines if "'Main'" in line]
    assert "via" not in main
    data = json.loads(cli("list", queue_path, "--all", "--json").out)
    by_subject = {m["subject"]: m for m in data["messages"]}
    assert by_subject["Routed"]["relay"] == "crm-1"
    assert "relay" not in by_subject["Main"]
    shown = cli("show", queue_path, queue["failed"])
    assert shown.code == EXIT_OK
    assert "relay:    crm 2" in shown.out
    assert "code: 550" in shown.out
    assert os.path.join("relays", "crm%202", "failed") in shown.out
    shown = cli("show", queue_path, queue["deferred"]).out
    assert "attempts: 1" in shown and "state:    deferred" in shown
    raw = cli("show", queue_path, queue["crm-1"], "--raw").out
    assert "Subject: Routed" in raw


def test_retry_and_purge_in_relay_folders(queue_path, queue):
    result = cli("retry", queue_path, "--all")
    assert result.code == EXIT_OK
    assert f"{queue['failed_name']}: failed -> queued" in result.out
    assert f"{queue['deferred_name']}: deferred -> queued" in result.out
    maildir = Maildir(relays.relay_path(queue_path, "crm 2"))
    assert len(maildir.scan().entries) == 2 and maildir.failed_entries() == []
    assert maildir.scan().retry_at == {}
    result = cli("purge", queue_path, queue["crm-1"])
    assert result.code == EXIT_OK and "deleted (queued)" in result.out
    assert Maildir(relays.relay_path(queue_path, "crm-1")).scan().entries == []
    maildir.claim(maildir.scan().entries[0]).fail({"error": "x"})
    result = cli("purge", queue_path, "--failed", "--yes")
    assert result.out.endswith("1 message(s) deleted\n")
    assert maildir.failed_entries() == []


def test_a_broken_relay_folder_is_not_shown(queue_path):
    route(queue_path, "crm-1", "Routed")
    os.mkdir(os.path.join(queue_path, "relays", "half"))
    data = json.loads(cli("status", queue_path, "--json").out)
    assert list(data["relays"]) == ["crm-1"]


# -- send --relay ------------------------------------------------------------------


def test_send_queues_for_a_relay_with_the_shared_envelope_rules(queue_path):
    message = (b"Resent-From: forwarder@example.org\nResent-To: new@example.org\n"
               b"Resent-Bcc: quiet@example.org\nFrom: a@example.org\n"
               b"To: old@example.org\nBcc: x@example.org\n\nbody\n")
    result = cli("send", queue_path, "--relay", "crm-1", stdin=message)
    assert result.code == EXIT_OK, result.err
    maildir = Maildir(relays.relay_path(queue_path, "crm-1"))
    [entry] = maildir.scan().entries
    with open(entry.path, "rb") as f:
        fromaddr, toaddrs, data = parse_queue_file(f.read())
    assert (fromaddr, toaddrs) == ("forwarder@example.org",
                                   ("new@example.org", "quiet@example.org"))
    assert b"quiet" not in data and b"Bcc" not in data
    assert result.out.strip() in data.decode()


def test_send_with_explicit_envelope_for_a_relay(queue_path):
    result = cli("send", queue_path, "--relay", "crm 2", "--from", "a@example.org",
                 "--to", "b@example.org", "--subject", "Hi", "--body", "x")
    assert result.code == EXIT_OK, result.err
    assert len(Maildir(relays.relay_path(queue_path, "crm 2")).scan().entries) == 1


@pytest.mark.parametrize(("argv", "stdin", "error"), [
    (["--relay", ""], b"From: a@example.org\nTo: b@example.org\n\n",
     "cannot queue the message: a mailer name cannot be empty"),
    ([], b"From: a@example.org, b@example.org\nTo: c@example.org\n\n",
     "cannot queue the message: the From header names 2 addresses"),
    ([], b"To: c@example.org\n\n",
     "cannot queue the message: no sender: the message has no Sender or From"),
])
def test_send_errors(queue_path, argv, stdin, error):
    result = cli("send", queue_path, *argv, stdin=stdin)
    assert result.code == EXIT_USAGE
    assert error in result.err
    assert not os.path.exists(os.path.join(queue_path, "relays"))


# -- run with relays from the configuration file --------------------------------------


@pytest.fixture
def servers():
    with SMTPServer() as main, SMTPServer() as one, SMTPServer() as two:
        yield main, one, two


def ini_with_relays(tmp_path, queue_path, main, one, two, auth=True):
    login = "username = alice\npassword_env = MAILOUTBOX_TEST_RELAY_PASSWORD\n"
    return write_ini(tmp_path, textwrap.dedent(f"""\
        [mailoutbox]
        queue_path = {queue_path}
        hostname = 127.0.0.1
        port = {main.port}
        no_tls = true
        timeout = 5

        [mailoutbox:relay crm-1]
        hostname = 127.0.0.1
        port = {one.port}
        no_tls = true

        [mailoutbox:relay crm 2]
        hostname = 127.0.0.1
        port = {two.port}
        no_tls = true
        """) + (login if auth else ""))


def test_run_sends_each_relay_through_its_section(queue_path, tmp_path, servers,
                                                  monkeypatch):
    main, one, two = servers
    monkeypatch.setenv("MAILOUTBOX_TEST_RELAY_PASSWORD", "s3cret")
    ids = [route(queue_path, relay, relay or "main")
           for relay in (None, "crm-1", "crm 2", "down")]
    ini = ini_with_relays(tmp_path, queue_path, main, one, two)
    result = cli("run", "--config", ini)
    # crm 2 logs in: the plain server offers no AUTH, so it is deferred, and
    # "down" has no section: deferred too, naming the mailer.
    assert result.code == EXIT_NOT_SENT, result.err
    assert main.message_ids() == [ids[0]]
    assert one.message_ids() == [ids[1]]
    assert two.messages == []
    assert "sent 2, deferred 2, failed 0, skipped 0" in result.out
    assert "  relay crm-1: sent 1, deferred 0, failed 0, skipped 0" in result.out
    assert "  relay down: sent 0, deferred 1" in result.out
    assert "no mailer named 'down' is configured" in result.err
    assert "s3cret" not in result.out + result.err
    data = json.loads(cli("status", queue_path, "--json").out)
    assert data["relays"]["down"]["deferred"] == 1


def test_run_as_a_process_with_relays(queue_path, tmp_path, servers):
    main, one, two = servers
    route(queue_path, "crm-1", "one")
    route(queue_path, "crm 2", "two")
    ini = ini_with_relays(tmp_path, queue_path, main, one, two, auth=False)
    done = python_m("run", "--config", ini)
    assert done.returncode == EXIT_OK, done.stderr
    assert len(one.messages) == len(two.messages) == 1


def test_relay_settings_are_read_and_checked(tmp_path, queue_path):
    from mailoutbox.cli.config import resolve
    from mailoutbox.cli.console import Console

    class Args:
        config = write_ini(tmp_path, f"""\
            [mailoutbox]
            queue_path = {queue_path}
            timeout = 3

            [mailoutbox:relay crm-1]
            hostname = smtp.example.org
            implicit_tls = true
            username = bob
            password_file = {tmp_path}/pw

            [mailoutbox:relay  other ]
            """)
        queue = None

    (tmp_path / "pw").write_text("from-file\n")
    settings = resolve(Args(), Console())
    assert settings.relays == {
        "crm-1": RelaySettings(hostname="smtp.example.org", implicit_tls=True,
                               username="bob", password="from-file"),
        "other": RelaySettings(),
    }
    assert settings.relays["crm-1"].smtp_port == 465
    assert settings.relays["other"].smtp_port == 25
    assert settings.relays["other"].timeout == 10.0  # not [mailoutbox]'s 3
    assert "from-file" not in repr(settings)


@pytest.mark.parametrize(("section", "error"), [
    ("[mailoutbox:relay crm-1]\nqueue_path = /x\n",
     "unknown key 'queue_path' in [mailoutbox:relay crm-1]"),
    ("[mailoutbox:relay crm-1]\nport = seventy\n",
     "[mailoutbox:relay crm-1] port: invalid port"),
    ("[mailoutbox:relay]\nport = 25\n",
     "[mailoutbox:relay]: a mailer name cannot be empty"),
    ("[mailoutbox:relays crm-1]\n", "unknown section [mailoutbox:relays crm-1]"),
    ("[mailoutbox:relay crm-1]\nusername = bob\n",
     "relay 'crm-1': a username and a password must be given together"),
    ("[mailoutbox:relay crm-1]\nno_tls = true\nforce_tls = true\n",
     "relay 'crm-1': force-tls and no-tls contradict each other"),
])
def test_bad_relay_sections(tmp_path, queue_path, section, error):
    ini = write_ini(tmp_path, f"[mailoutbox]\nqueue_path = {queue_path}\n\n{section}")
    result = cli("run", "--config", ini)
    assert result.code == EXIT_USAGE
    assert error in result.err


def test_the_port_of_a_closed_relay_defers(queue_path, tmp_path, servers):
    main, one, _two = servers
    route(queue_path, "crm-1", "x")
    ini = write_ini(tmp_path, f"""\
        [mailoutbox]
        queue_path = {queue_path}
        hostname = 127.0.0.1
        port = {main.port}

        [mailoutbox:relay crm-1]
        hostname = 127.0.0.1
        port = {closed_port()}
        timeout = 2
        """)
    result = cli("run", "--config", ini, "-q")
    assert result.code == EXIT_NOT_SENT
    assert result.out == ""
    assert one.messages == []
