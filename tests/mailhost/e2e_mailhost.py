"""Products.MailHost on mailoutbox, through the zope.sendmail alias
(compat/zope.sendmail-alias), end to end with real SMTP servers.

Run by tests/mailhost/run.sh, in its own virtualenv holding Zope,
Products.MailHost, mailoutbox and the alias but not zope.sendmail.  The name
of this file keeps it out of the main test suite.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import smtplib
import socket
import ssl
import subprocess
import sys
import time

import pytest
import transaction
import zope.sendmail
from Products.MailHost import MailHost as mailhost_module
from Products.MailHost.MailHost import MailHost
from zope.component import getUtility
from zope.configuration import xmlconfig
from zope.schema.interfaces import IVocabularyFactory
from zope.testing.cleanup import cleanUp

import mailoutbox.delivery
from mailoutbox.errors import MailError
from mailoutbox.testing.smtpd import SMTPServer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SENDER = "shop@example.org"
RECIPIENT = "jane@example.org"
TEXT = (
    f"From: {SENDER}\nTo: {RECIPIENT}\nSubject: Your order\n\n"
    "Thanks for your order.\n"
)
WAIT = 30.0  # generous bound for the queue processor thread on a slow box


def _load_certs_module():
    """tests/certs.py of the checkout, loaded by path (``tests`` is not on
    sys.path here, and may name another package)."""
    spec = importlib.util.spec_from_file_location(
        "mailoutbox_test_certs", os.path.join(REPO, "tests", "certs.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for its dataclass
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def certificates(tmp_path_factory):
    """A private CA and a server certificate for 127.0.0.1 signed by it."""
    certs = _load_certs_module()
    return certs.make_certificates(str(tmp_path_factory.mktemp("certs")))


@pytest.fixture(scope="session")
def ca_bundle(certificates, tmp_path_factory):
    """What a site points SSL_CERT_FILE at: the system's authorities plus
    the private CA (SSL_CERT_FILE replaces the system's bundle)."""
    path = tmp_path_factory.mktemp("bundle") / "ca-bundle.pem"
    with open(path, "wb") as bundle:
        system = ssl.get_default_verify_paths().cafile
        if system and os.path.exists(system):
            with open(system, "rb") as f:
                bundle.write(f.read() + b"\n")
        with open(certificates.ca_file, "rb") as f:
            bundle.write(f.read())
    return str(path)


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    """No SSL_CERT_FILE unless a test sets it; no transaction, queue thread
    or component registration left behind."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("MAILHOST_QUEUE_ONLY", raising=False)
    transaction.abort()
    yield
    transaction.abort()
    for key, thread in list(mailhost_module.queue_threads.items()):
        thread.stop()
        thread.join(WAIT)
        del mailhost_module.queue_threads[key]
    cleanUp()


@pytest.fixture
def server():
    with SMTPServer() as smtp_server:
        yield smtp_server


@pytest.fixture
def server_with_auth():
    with SMTPServer(users={"alice": "s3cret-pw"}) as smtp_server:
        yield smtp_server


@pytest.fixture
def starttls_server(certificates):
    with SMTPServer(tls_context=certificates.server_context()) as smtp_server:
        yield smtp_server


@pytest.fixture
def smtps_server(certificates):
    with SMTPServer(
        tls_context=certificates.server_context(), implicit_tls=True
    ) as smtp_server:
        yield smtp_server


def make_mailhost(server, **kw):
    return MailHost("MailHost", smtp_host=server.host, smtp_port=server.port, **kw)


def wait_for(predicate, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_received(server, tls=False):
    assert len(server.messages) == 1
    received = server.messages[0]
    assert received.mail_from == SENDER
    assert received.rcpt_tos == [RECIPIENT]
    assert received.message["Subject"] == "Your order"
    assert received.tls is tls
    return received


# -- the alias -------------------------------------------------------------


def test_zope_sendmail_modules_are_mailoutbox_modules():
    for name, target in zope.sendmail.MODULES.items():
        alias = importlib.import_module(f"zope.sendmail.{name}")
        assert alias is importlib.import_module(target)
        assert getattr(zope.sendmail, name) is alias
    assert mailhost_module.QueuedMailDelivery is mailoutbox.delivery.QueuedMailDelivery
    assert mailhost_module.DirectMailDelivery is mailoutbox.delivery.DirectMailDelivery


def test_the_real_zope_sendmail_is_not_installed():
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("zope.sendmail")
    assert importlib.metadata.distribution("mailoutbox-zope-sendmail")


def test_the_alias_refuses_to_work_beside_zope_sendmail(tmp_path):
    """What a site sees when zope.sendmail was installed again (a
    zope.sendmail dist-info is found beside the alias's files)."""
    info = tmp_path / "zope.sendmail-7.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: zope.sendmail\nVersion: 7.3\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", "import zope.sendmail"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode != 0
    assert "zope.sendmail 7.3 is installed beside" in result.stderr
    assert "pip uninstall zope.sendmail" in result.stderr


def test_zope_sendmail_script_drains_a_queue(server, tmp_path):
    queue = str(tmp_path / "queue")
    mailoutbox.delivery.QueuedMailDelivery(queue).send(
        SENDER, [RECIPIENT], TEXT.encode()
    )
    transaction.commit()
    script = os.path.join(os.path.dirname(sys.executable), "zope-sendmail")
    result = subprocess.run(
        [script, "--hostname", server.host, "--port", str(server.port),
         "--no-tls", queue],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert_received(server)


# -- ZCML -------------------------------------------------------------------

ZCML = """\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:mail="http://namespaces.zope.org/mail">
  <include package="zope.component" file="meta.zcml" />
  <include package="zope.security" file="meta.zcml" />
  <include package="zope.sendmail" file="meta.zcml" />
  <include package="mailoutbox" file="meta.zcml" />
  <include package="zope.sendmail" />
  <mail:smtpMailer name="relay" hostname="127.0.0.1" port="{port}" />
  <mail:directDelivery name="direct" mailer="relay"
                       permission="zope.SendMail" />
  <mail:queuedDelivery name="queued" mailer="relay" queuePath="{queue}"
                       permission="zope.SendMail" processorThread="false" />
</configure>
"""


def test_zcml_of_zope_sendmail_configures_mailoutbox(server, tmp_path):
    from zope.sendmail.interfaces import IMailDelivery
    from zope.sendmail.interfaces import IQueuedMailDelivery

    queue = str(tmp_path / "queue")
    xmlconfig.string(ZCML.format(port=server.port, queue=queue))
    names = getUtility(IVocabularyFactory, "Mail Delivery Names")(None)
    assert sorted(term.value for term in names) == ["direct", "queued"]
    assert IQueuedMailDelivery.providedBy(getUtility(IMailDelivery, "queued"))
    getUtility(IMailDelivery, "direct").send(SENDER, [RECIPIENT], TEXT.encode())
    transaction.commit()
    assert_received(server)


# -- MailHost's three ways of sending -------------------------------------


def test_immediate_send(server):
    make_mailhost(server).send(TEXT, immediate=True)
    assert_received(server)


def test_direct_send_on_commit(server):
    mailhost = make_mailhost(server)
    mailhost.send(TEXT)
    assert server.messages == []
    transaction.commit()
    assert_received(server)


def test_direct_send_aborted(server):
    make_mailhost(server).send(TEXT)
    transaction.abort()
    assert server.messages == []


def test_simple_send_with_non_ascii_text(server):
    make_mailhost(server).send(
        "Grüße aus Köln", mto=RECIPIENT, mfrom=SENDER, subject="Café ☕",
        charset="utf-8", immediate=True,
    )
    received = server.messages[0]
    assert received.message["Subject"] == "Café ☕"
    assert received.message.get_content().strip() == "Grüße aus Köln"


def test_addresses_with_display_names(server):
    make_mailhost(server).send(
        "Subject: Hello\n\nHi",
        mto='"Doe, Jane" <jane@example.org>, Bob Smith <bob@example.org>',
        mfrom="Jörg Müller <joerg@example.org>", charset="utf-8",
    )
    transaction.commit()
    received = server.messages[0]
    assert received.mail_from == "joerg@example.org"
    assert received.rcpt_tos == ["jane@example.org", "bob@example.org"]


def test_recipients_from_to_cc_and_bcc_headers(server):
    make_mailhost(server).send(
        f"From: {SENDER}\nTo: {RECIPIENT}\nCc: bob@example.org\n"
        "Bcc: carol@example.org\nSubject: Hello\n\nHi"
    )
    transaction.commit()
    received = server.messages[0]
    assert received.rcpt_tos == [RECIPIENT, "bob@example.org", "carol@example.org"]
    assert received.message["Bcc"] is None


@pytest.mark.parametrize("queued", [False, True], ids=["direct", "queued"])
def test_folded_from_header(server, tmp_path, queued):
    """The sender is taken from the From header as it is, folded."""
    mailhost = make_mailhost(server, smtp_queue=queued,
                             smtp_queue_directory=str(tmp_path / "queue"))
    mailhost.send(
        "From: The customer service department of the example shop\n"
        f" <{SENDER}>\nTo: {RECIPIENT}\nSubject: Your order\n\nThanks"
    )
    transaction.commit()
    assert wait_for(lambda: server.messages)
    assert server.messages[0].mail_from == SENDER


@pytest.mark.parametrize("queued", [False, True], ids=["direct", "queued"])
def test_local_recipient_without_domain(server, tmp_path, queued):
    """mto='root' is the local mailbox of the relay, as with zope.sendmail."""
    mailhost = make_mailhost(server, smtp_queue=queued,
                             smtp_queue_directory=str(tmp_path / "queue"))
    mailhost.send("Subject: cron\n\nDone", mto="root", mfrom=SENDER)
    transaction.commit()
    assert wait_for(lambda: server.messages)
    assert server.messages[0].rcpt_tos == ["root"]


def test_queued_send(server, tmp_path):
    queue = str(tmp_path / "queue")
    mailhost = make_mailhost(server, smtp_queue=True, smtp_queue_directory=queue)
    mailhost.send(TEXT)
    assert mailhost.queueThreadAlive()
    transaction.commit()
    assert wait_for(lambda: server.messages)
    assert_received(server)
    assert wait_for(lambda: mailhost.queueLength() == 0)
    mailhost.manage_restartQueueThread("stop")
    assert not mailhost.queueThreadAlive()


def test_queued_send_to_a_single_string_and_several_messages(server, tmp_path):
    queue = str(tmp_path / "queue")
    mailhost = make_mailhost(server, smtp_queue=True, smtp_queue_directory=queue)
    for n in range(3):
        mailhost.simple_send(RECIPIENT, SENDER, f"order {n}", "Thanks")
    transaction.commit()
    assert wait_for(lambda: len(server.messages) == 3)
    assert sorted(m.message["Subject"] for m in server.messages) == [
        "order 0", "order 1", "order 2"
    ]


def test_queue_only_mode_keeps_the_messages(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MAILHOST_QUEUE_ONLY", "1")
    queue = str(tmp_path / "queue")
    mailhost = make_mailhost(server, smtp_queue=True, smtp_queue_directory=queue)
    mailhost.send(TEXT)
    transaction.commit()
    assert mailhost.queueNonDeliveryMode()
    assert not mailhost.queueThreadAlive()
    assert mailhost.queueLength() == 1
    # the site's operator starts the processor from the ZMI
    monkeypatch.delenv("MAILHOST_QUEUE_ONLY")
    mailhost.manage_restartQueueThread("start")
    assert wait_for(lambda: server.messages)
    assert_received(server)


def test_queue_length_of_a_folder_that_is_not_a_queue(tmp_path):
    mailhost = MailHost("MailHost", smtp_queue=True,
                        smtp_queue_directory=str(tmp_path / "nothing-here"))
    assert mailhost.queueLength().startswith("n/a")


# -- errors a site's code catches (immediate sends) ------------------------


def test_all_recipients_refused_raises_smtp_recipients_refused(server):
    server.refuse(RECIPIENT)
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        make_mailhost(server).send(TEXT, immediate=True)


def test_a_refused_recipient_among_others_is_not_an_error(server):
    server.refuse("nobody@example.org")
    make_mailhost(server).send(
        TEXT, mto=[RECIPIENT, "nobody@example.org"], immediate=True
    )
    assert server.messages[0].rcpt_tos == [RECIPIENT]


def test_login(server_with_auth):
    make_mailhost(server_with_auth, smtp_uid="alice",
                  smtp_pwd="s3cret-pw").send(TEXT, immediate=True)
    assert assert_received(server_with_auth).login == "alice"


def test_wrong_password_raises_smtp_authentication_error(server_with_auth):
    mailhost = make_mailhost(server_with_auth, smtp_uid="alice", smtp_pwd="wrong")
    with pytest.raises(smtplib.SMTPAuthenticationError):
        mailhost.send(TEXT, immediate=True)
    assert server_with_auth.messages == []


def test_sender_refused_raises_an_smtp_exception(server):
    server.reply("MAIL", "553 5.7.1 Sender not allowed")
    with pytest.raises(smtplib.SMTPException):
        make_mailhost(server).send(TEXT, immediate=True)


def test_message_refused_raises_smtp_data_error(server):
    server.reply("DATA", "554 5.7.1 Message refused")
    with pytest.raises(smtplib.SMTPDataError):
        make_mailhost(server).send(TEXT, immediate=True)


def test_no_server_raises_socket_error():
    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mailhost = MailHost("MailHost", smtp_host="127.0.0.1", smtp_port=port)
    with pytest.raises(OSError):
        mailhost.send(TEXT, immediate=True)


def test_force_tls_without_starttls_raises_runtime_error(server):
    with pytest.raises(RuntimeError):
        make_mailhost(server, force_tls=True).send(TEXT, immediate=True)
    assert server.messages == []


# -- a relay with a private CA, trusted through SSL_CERT_FILE --------------


def test_private_ca_is_not_trusted_by_default(starttls_server):
    with pytest.raises((OSError, smtplib.SMTPException, RuntimeError, MailError)):
        make_mailhost(starttls_server, force_tls=True).send(TEXT, immediate=True)
    assert starttls_server.messages == []


def test_starttls_with_ssl_cert_file(starttls_server, ca_bundle, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", ca_bundle)
    make_mailhost(starttls_server, force_tls=True).send(TEXT, immediate=True)
    assert_received(starttls_server, tls=True)


def test_opportunistic_starttls_with_ssl_cert_file(
    starttls_server, ca_bundle, monkeypatch
):
    monkeypatch.setenv("SSL_CERT_FILE", ca_bundle)
    make_mailhost(starttls_server).send(TEXT)
    transaction.commit()
    assert_received(starttls_server, tls=True)


def test_smtps_with_ssl_cert_file(smtps_server, ca_bundle, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", ca_bundle)
    make_mailhost(smtps_server, implicit_tls=True).send(TEXT, immediate=True)
    assert_received(smtps_server, tls=True)


def test_queued_send_over_starttls_with_ssl_cert_file(
    starttls_server, ca_bundle, monkeypatch, tmp_path
):
    monkeypatch.setenv("SSL_CERT_FILE", ca_bundle)
    queue = str(tmp_path / "queue")
    mailhost = make_mailhost(starttls_server, force_tls=True, smtp_queue=True,
                             smtp_queue_directory=queue)
    mailhost.send(TEXT)
    transaction.commit()
    assert wait_for(lambda: starttls_server.messages)
    assert_received(starttls_server, tls=True)
