"""The mail: ZCML directives, loaded from real ZCML and used end to end."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import transaction
import zope.component.testing
from zope.component import getUtility
from zope.component import provideHandler
from zope.component import queryUtility
from zope.configuration import xmlconfig
from zope.configuration.config import ConfigurationConflictError
from zope.configuration.exceptions import ConfigurationError
from zope.interface.verify import verifyObject
from zope.security.proxy import removeSecurityProxy

import mailoutbox.processors
import mailoutbox.zcml
from mailoutbox.delivery import DirectMailDelivery
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.interfaces import IMailDelivery
from mailoutbox.interfaces import IMailer
from mailoutbox.interfaces import IMailSentEvent
from mailoutbox.interfaces import IQueuedMailDelivery
from mailoutbox.interfaces import ISMTPMailer
from mailoutbox.mailer import SMTPMailer
from mailoutbox.retry import RetryPolicy
from mailoutbox.testing.smtpd import SMTPServer
from mailoutbox.zcml import processor_threads
from mailoutbox.zcml import start_processor_thread
from mailoutbox.zcml import stop_processor_threads

MESSAGE = b"Subject: Hello\r\n\r\nHello there.\r\n"

CONFIG = """\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:mail="http://namespaces.zope.org/mail"
           i18n_domain="mailoutbox.tests">
  <include package="zope.component" file="meta.zcml" />
  <include package="zope.security" file="meta.zcml" />
  <include package="{package}" file="meta.zcml" />
  {body}
</configure>
"""


def load(body: str, package: str = "mailoutbox"):
    return xmlconfig.string(CONFIG.format(package=package, body=body))


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def clean_registry():
    zope.component.testing.setUp()
    yield
    stop_processor_threads(timeout=10)
    zope.component.testing.tearDown()


def mailer_zcml(server: SMTPServer, name: str = "smtp", extra: str = "") -> str:
    return (
        f'<mail:smtpMailer name="{name}" hostname="{server.host}"'
        f' port="{server.port}" {extra} />'
    )


def test_module_names():
    for name in mailoutbox.zcml.__all__:
        assert hasattr(mailoutbox.zcml, name), name
    for name in mailoutbox.processors.__all__:
        assert getattr(mailoutbox.zcml, name) is getattr(mailoutbox.processors, name)


# -- mail:smtpMailer ----------------------------------------------------------


def test_smtp_mailer_with_every_attribute(tmp_path, certificates):
    load(
        '<mail:smtpMailer name="relay" hostname="relay.example.org" port="587"'
        ' username="alice" password="s3cret-pw" force_tls="true" timeout="2.5"'
        f' ca_file="{certificates.ca_file}" />'
        '<mail:smtpMailer name="direct" no_tls="true" />'
    )
    mailer = getUtility(IMailer, "relay")
    assert isinstance(mailer, SMTPMailer)
    verifyObject(ISMTPMailer, mailer)
    assert (mailer.hostname, mailer.port) == ("relay.example.org", 587)
    assert (mailer.username, mailer.password) == ("alice", "s3cret-pw")
    assert (mailer.force_tls, mailer.no_tls, mailer.implicit_tls) == (
        True, False, False)
    assert mailer.timeout == 2.5
    assert mailer.ca_file == certificates.ca_file
    other = getUtility(IMailer, "direct")
    assert (other.hostname, other.port, other.timeout) == ("localhost", 25, 10.0)
    assert (other.no_tls, other.force_tls, other.implicit_tls) == (True, False, False)
    assert other.username is other.password is None


def test_implicit_tls_speaks_smtps(certificates):
    """implicit_tls="true" means TLS from the first byte (zope.sendmail 7.3
    passes it as no_tls).  The server below speaks nothing but TLS."""
    with SMTPServer(
        implicit_tls=True, tls_context=certificates.server_context()
    ) as server:
        load(
            mailer_zcml(
                server,
                extra=f'implicit_tls="true" ca_file="{certificates.ca_file}"',
            )
            + '<mail:directDelivery mailer="smtp" />'
        )
        mailer = getUtility(IMailer, "smtp")
        assert (mailer.implicit_tls, mailer.no_tls) == (True, False)
        with transaction.manager:
            message_id = getUtility(IMailDelivery, "Mail").send(
                "app@example.org", ["jane@example.org"], MESSAGE
            )
        mailer.close()
        assert server.message_ids() == [message_id]
        assert server.messages[0].tls is True


def test_implicit_tls_is_misplaced_by_zope_sendmail():
    """The fact the test above guards against: zope.sendmail's directive
    turns implicit_tls into no_tls."""
    load('<mail:smtpMailer name="smtp" implicit_tls="true" />',
         package="zope.sendmail")
    from zope.sendmail.interfaces import IMailer as IZopeMailer

    mailer = getUtility(IZopeMailer, "smtp")
    assert (mailer.implicit_tls, mailer.no_tls) == (False, True)


def test_invalid_mailer_settings_are_configuration_errors(tmp_path):
    with pytest.raises(ConfigurationError, match=r"'smtp'.*no_tls and force_tls"):
        load('<mail:smtpMailer name="smtp" no_tls="true" force_tls="true" />')
    with pytest.raises(ConfigurationError, match="'smtp'"):
        load(f'<mail:smtpMailer name="smtp" ca_file="{tmp_path}/missing.pem" />')
    with pytest.raises(ConfigurationError):
        load('<mail:smtpMailer name="smtp" port="0" />')


# -- mail:directDelivery ------------------------------------------------------


def test_direct_delivery_sends_on_commit_only(smtp_server):
    load(mailer_zcml(smtp_server) + '<mail:directDelivery mailer="smtp" />')
    delivery = getUtility(IMailDelivery, "Mail")
    assert isinstance(delivery, DirectMailDelivery)
    assert delivery.mailer is getUtility(IMailer, "smtp")
    sent = []
    provideHandler(lambda event: sent.append(event.messageId), [IMailSentEvent])

    transaction.begin()
    delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
    transaction.abort()
    assert smtp_server.messages == []

    with transaction.manager:
        message_id = delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
    delivery.mailer.close()
    assert smtp_server.message_ids() == [message_id]
    assert sent == [message_id]


def test_delivery_may_name_a_mailer_defined_after_it(smtp_server):
    load(
        '<mail:directDelivery name="Later" mailer="smtp" />'
        + mailer_zcml(smtp_server)
    )
    assert getUtility(IMailDelivery, "Later").mailer is getUtility(IMailer, "smtp")


@pytest.mark.parametrize("directive", [
    '<mail:directDelivery mailer="nosuchmailer" />',
    '<mail:queuedDelivery mailer="nosuchmailer" queuePath="{queue}" />',
    '<mail:queuedDelivery mailer="nosuchmailer" queuePath="{queue}"'
    ' processorThread="false" />',
])
def test_unknown_mailer_is_named(directive, queue_path):
    with pytest.raises(ConfigurationError, match="'nosuchmailer' is not defined"):
        load(directive.format(queue=queue_path))
    assert queryUtility(IMailDelivery, "Mail") is None
    assert processor_threads() == {}


@pytest.mark.parametrize("body", [
    '<mail:smtpMailer name="smtp" /><mail:smtpMailer name="smtp" port="26" />',
    '<mail:smtpMailer name="smtp" />'
    '<mail:directDelivery mailer="smtp" />'
    '<mail:directDelivery mailer="smtp" name="Mail" />',
    '<mail:smtpMailer name="smtp" />'
    '<mail:directDelivery mailer="smtp" name="X" />'
    '<mail:queuedDelivery mailer="smtp" name="X" queuePath="{queue}" />',
])
def test_conflicts_are_reported(body, queue_path):
    with pytest.raises(ConfigurationConflictError):
        load(body.format(queue=queue_path))
    assert processor_threads() == {}


# -- mail:queuedDelivery ------------------------------------------------------


def test_queued_delivery_and_its_thread_drain_the_queue(smtp_server, queue_path):
    load(
        mailer_zcml(smtp_server)
        + f'<mail:queuedDelivery mailer="smtp" queuePath="{queue_path}"'
        ' interval="0.05" />'
    )
    delivery = getUtility(IMailDelivery, "Mail")
    assert isinstance(delivery, QueuedMailDelivery)
    assert delivery.queuePath == queue_path
    threads = processor_threads()
    assert list(threads) == [os.path.realpath(queue_path)]
    thread = threads[os.path.realpath(queue_path)]
    assert thread.is_alive()
    assert thread.mailer is getUtility(IMailer, "smtp")

    transaction.begin()
    delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
    transaction.abort()
    with transaction.manager:
        message_id = delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
    wait_for(lambda: smtp_server.messages)
    assert smtp_server.message_ids() == [message_id]

    stop_processor_threads(timeout=10)
    assert not thread.is_alive()
    assert processor_threads() == {}


def test_processor_options(queue_path):
    load(
        '<mail:smtpMailer name="smtp" />'
        f'<mail:queuedDelivery mailer="smtp" queuePath="{queue_path}"'
        ' interval="0.5" concurrency="2" lease="60" retry_initial="5"'
        ' retry_factor="3" retry_cap="100" retry_max_age="3600" />'
    )
    (thread,) = processor_threads().values()
    assert (thread.interval, thread.concurrency, thread.lease) == (0.5, 2, 60.0)
    assert thread.retry == RetryPolicy(initial=5, factor=3, cap=100, max_age=3600)


def test_default_processor_options(queue_path):
    load(
        '<mail:smtpMailer name="smtp" />'
        f'<mail:queuedDelivery mailer="smtp" queuePath="{queue_path}" />'
    )
    (thread,) = processor_threads().values()
    assert (thread.interval, thread.concurrency, thread.lease) == (3.0, 8, 30.0)
    assert thread.retry == RetryPolicy()


def test_invalid_retry_policy(queue_path):
    with pytest.raises(ConfigurationError, match="factor must be"):
        load(
            '<mail:smtpMailer name="smtp" />'
            f'<mail:queuedDelivery mailer="smtp" queuePath="{queue_path}"'
            ' retry_factor="0.5" />'
        )


@pytest.mark.parametrize(("attributes", "message"), [
    ('interval="0"', "mail:queuedDelivery interval: must be a positive number"),
    ('interval="nan"', "mail:queuedDelivery interval: must be a positive number"),
    ('lease="nan"', "mail:queuedDelivery lease: must be a positive number"),
    ('interval="-1"', "interval"),  # refused by the schema
])
def test_invalid_processor_durations(queue_path, attributes, message):
    """Refused when the configuration is read, naming the attribute; no
    thread is started."""
    with pytest.raises(ConfigurationError, match=message):
        load(
            '<mail:smtpMailer name="smtp" />'
            f'<mail:queuedDelivery mailer="smtp" queuePath="{queue_path}"'
            f" {attributes} />"
        )
    assert processor_threads() == {}


def test_invalid_relay_names(queue_path):
    with pytest.raises(ConfigurationError, match="mail:queuedDelivery mailers:"):
        load(
            '<mail:smtpMailer name="smtp" />'
            f'<mail:queuedDelivery mailer="smtp" queuePath="{queue_path}"'
            f' mailers="{"x" * 300}" />'
        )


@pytest.mark.parametrize("value", ["0", "nan", "inf"])
def test_invalid_mailer_timeout(value):
    with pytest.raises(ConfigurationError, match=(
        "mail:smtpMailer 'smtp' timeout: must be a positive number of seconds"
    )):
        load(f'<mail:smtpMailer name="smtp" timeout="{value}" />')


def test_without_processor_thread_the_message_stays_queued(smtp_server, queue_path):
    load(
        mailer_zcml(smtp_server)
        + f'<mail:queuedDelivery mailer="smtp" queuePath="{queue_path}"'
        ' processorThread="false" interval="0.01" />'
    )
    assert processor_threads() == {}
    with transaction.manager:
        getUtility(IMailDelivery, "Mail").send(
            "app@example.org", ["jane@example.org"], MESSAGE
        )
    assert len(os.listdir(os.path.join(queue_path, "new"))) == 1
    time.sleep(0.1)
    assert smtp_server.messages == []


def test_one_thread_per_queue_folder(tmp_path, caplog):
    real = tmp_path / "queue"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with caplog.at_level(logging.WARNING, logger="mailoutbox.zcml"):
        load(
            '<mail:smtpMailer name="one" /><mail:smtpMailer name="two" />'
            f'<mail:queuedDelivery name="A" mailer="one" queuePath="{real}" />'
            f'<mail:queuedDelivery name="B" mailer="one" queuePath="{link}" />'
        )
        assert caplog.records == []
        (thread,) = processor_threads().values()
        load(
            f'<mail:queuedDelivery name="C" mailer="two" queuePath="{link}/" />'
            '<mail:smtpMailer name="two" />'
        )
    assert list(processor_threads().values()) == [thread]
    assert thread.mailer is getUtility(IMailer, "one")
    assert "already serves" in caplog.text
    for name in "ABC":
        assert IQueuedMailDelivery.providedBy(getUtility(IMailDelivery, name))


def test_a_stopped_thread_is_replaced(queue_path):
    mailer = SMTPMailer()
    first = start_processor_thread(queue_path, mailer, interval=0.05)
    assert start_processor_thread(queue_path, mailer) is first
    first.stop(10)
    second = start_processor_thread(queue_path, mailer, interval=0.05)
    assert second is not first and second.is_alive()
    assert processor_threads() == {os.path.realpath(queue_path): second}


def test_a_thread_that_does_not_stop_in_time_stays_registered(smtp_server, tmp_path):
    def mailer():
        return SMTPMailer(smtp_server.host, smtp_server.port)

    slow = start_processor_thread(str(tmp_path / "slow"), mailer(), interval=0.01)
    idle = start_processor_thread(str(tmp_path / "idle"), mailer(), interval=0.01)
    smtp_server.slow(0.3)
    with transaction.manager:
        QueuedMailDelivery(str(tmp_path / "slow")).send(
            "app@example.org", ["jane@example.org"], MESSAGE
        )
    wait_for(lambda: smtp_server.connections)
    with pytest.raises(TimeoutError):
        stop_processor_threads(timeout=0.05)
    assert not idle.is_alive()
    assert processor_threads() == {os.path.realpath(tmp_path / "slow"): slow}
    stop_processor_threads(timeout=10)
    assert not slow.is_alive()
    assert processor_threads() == {}
    assert len(smtp_server.messages) == 1


def test_threads_start_only_when_the_whole_configuration_succeeds(queue_path):
    with pytest.raises(ConfigurationError, match="Undefined permission"):
        load(
            '<mail:smtpMailer name="smtp" />'
            f'<mail:queuedDelivery mailer="smtp" queuePath="{queue_path}"'
            ' permission="no.such.Permission" />'
        )
    assert processor_threads() == {}


def test_threads_are_stopped_at_exit(tmp_path):
    """A process that configured a processor thread and never stopped it
    exits promptly, its thread stopped by the atexit handler."""
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(f"""
        import logging, sys, time
        import transaction
        from zope.component import getUtility
        from zope.configuration import xmlconfig
        from mailoutbox.interfaces import IMailDelivery
        from mailoutbox.testing.smtpd import SMTPServer

        logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                            format="%(name)s: %(message)s")
        server = SMTPServer().start()
        xmlconfig.string('''
        <configure xmlns="http://namespaces.zope.org/zope"
                   xmlns:mail="http://namespaces.zope.org/mail">
          <include package="mailoutbox" file="meta.zcml" />
          <mail:smtpMailer name="smtp" hostname="127.0.0.1"
                           port="%d" />
          <mail:queuedDelivery mailer="smtp" queuePath="{tmp_path}/queue"
                               interval="0.05" />
        </configure>''' % server.port)
        with transaction.manager:
            getUtility(IMailDelivery, "Mail").send(
                "app@example.org", ["jane@example.org"], b"Subject: x\\n\\nx\\n")
        deadline = time.monotonic() + 10
        while not server.messages and time.monotonic() < deadline:
            time.sleep(0.02)
        print("received", len(server.messages), flush=True)
    """))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "received 1" in result.stdout
    assert "mailoutbox.zcml: stopped the processor thread for" in result.stdout


# -- permissions ----------------------------------------------------------------


PERMISSION = (
    '<permission id="mailoutbox.test.Send" title="Send test mail" />'
    '<mail:smtpMailer name="smtp" hostname="127.0.0.1" port="{port}" />'
)


def test_permission_protects_the_direct_delivery(smtp_server):
    from zope.component.security import PermissionProxy
    from zope.security.checker import ProxyFactory
    from zope.security.interfaces import ForbiddenAttribute
    from zope.security.interfaces import Unauthorized
    from zope.security.management import endInteraction
    from zope.security.management import newInteraction
    from zope.security.testing import interaction

    load(
        PERMISSION.format(port=smtp_server.port)
        + '<mail:directDelivery mailer="smtp" permission="mailoutbox.test.Send" />'
    )
    delivery = getUtility(IMailDelivery, "Mail")
    assert type(delivery) is PermissionProxy
    proxied = ProxyFactory(delivery)
    with interaction("bob"), pytest.raises(Unauthorized):
        proxied.send  # noqa: B018
    newInteraction()
    try:
        with pytest.raises(ForbiddenAttribute):
            proxied.transaction_manager  # noqa: B018
        assert proxied.mailer is not None
        with transaction.manager:
            message_id = proxied.send("app@example.org", ["jane@example.org"], MESSAGE)
    finally:
        endInteraction()
    getUtility(IMailer, "smtp").close()
    assert smtp_server.message_ids() == [message_id]


def test_permission_protects_the_queued_delivery(queue_path):
    from zope.security.checker import ProxyFactory
    from zope.security.checker import canAccess
    from zope.security.interfaces import ForbiddenAttribute

    load(
        PERMISSION.format(port=25)
        + f'<mail:queuedDelivery mailer="smtp" queuePath="{queue_path}"'
        ' permission="mailoutbox.test.Send" processorThread="false" />'
    )
    proxied = ProxyFactory(getUtility(IMailDelivery, "Mail"))
    from zope.security.management import endInteraction
    from zope.security.management import newInteraction

    newInteraction()
    try:
        assert canAccess(proxied, "send")
        assert canAccess(proxied, "queuePath")
        with pytest.raises(ForbiddenAttribute):
            canAccess(proxied, "newMessageId")
    finally:
        endInteraction()


def test_public_permission(queue_path):
    load(
        '<mail:smtpMailer name="smtp" />'
        '<mail:directDelivery mailer="smtp" permission="zope.Public" />'
    )
    from zope.security.checker import ProxyFactory
    from zope.security.checker import canAccess
    from zope.security.testing import interaction

    with interaction("bob"):
        assert canAccess(ProxyFactory(getUtility(IMailDelivery, "Mail")), "send")


def test_permission_without_zope_security(monkeypatch):
    def missing():
        raise ImportError("No module named 'zope.security'")

    monkeypatch.setattr(mailoutbox.zcml, "_load_proxify", missing)
    with pytest.raises(ConfigurationError, match=r"needs zope\.security"):
        load(
            '<mail:smtpMailer name="smtp" />'
            '<mail:directDelivery mailer="smtp" permission="zope.Public" />'
        )
    load('<mail:smtpMailer name="smtp" /><mail:directDelivery mailer="smtp" />')
    assert isinstance(getUtility(IMailDelivery, "Mail"), DirectMailDelivery)


# -- compatibility ------------------------------------------------------------------


ZOPE_SENDMAIL_CONFIG = """
<permission id="zope.SendMail" title="Send mail" />
<mail:smtpMailer name="smtp" hostname="mail.example.org" port="2525"
                 username="app" password="pw" implicit_tls="false" timeout="5" />
<mail:queuedDelivery name="Mail" mailer="smtp" queuePath="{queue}"
                     permission="zope.SendMail" processorThread="false" />
<mail:directDelivery name="Direct" mailer="smtp" permission="zope.SendMail" />
"""


@pytest.mark.parametrize("package", ["zope.sendmail", "mailoutbox"])
def test_a_zope_sendmail_configuration_works_unchanged(package, queue_path):
    load(ZOPE_SENDMAIL_CONFIG.format(queue=queue_path), package=package)
    if package == "mailoutbox":
        assert isinstance(getUtility(IMailDelivery, "Mail"), QueuedMailDelivery)
        assert isinstance(getUtility(IMailDelivery, "Direct"), DirectMailDelivery)
        mailer = getUtility(IMailer, "smtp")
        assert (mailer.hostname, mailer.port, mailer.timeout) == (
            "mail.example.org", 2525, 5.0)


def test_configure_zcml_offers_what_zope_sendmail_does():
    from zope.security.interfaces import IPermission

    xmlconfig.string("""
    <configure xmlns="http://namespaces.zope.org/zope">
      <include package="zope.component" file="meta.zcml" />
      <include package="mailoutbox" />
    </configure>
    """)
    assert getUtility(IPermission, "zope.SendMail") is not None
    mailer = getUtility(IMailer, "smtp")
    assert (mailer.hostname, mailer.port) == ("localhost", 25)


def test_the_first_example_of_the_docs_loads(tmp_path, smtp_server):
    """docs/zcml.rst's first example, as it is (but for the queue's path and
    the relay's address), with its permission="zope.SendMail"."""
    docs = Path(__file__).resolve().parent.parent / "docs" / "zcml.rst"
    text = docs.read_text()
    block = text.split(".. code-block:: xml\n", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    zcml = "\n".join(lines)
    assert 'permission="zope.SendMail"' in zcml
    zcml = zcml.replace("/var/spool/myapp/mailqueue", str(tmp_path / "queue"))
    zcml, count = re.subn(
        r'hostname="smtp.example.org"\s+port="587"',
        f'hostname="{smtp_server.host}" port="{smtp_server.port}"', zcml,
    )
    assert count == 1
    xmlconfig.string(zcml)
    delivery = getUtility(IMailDelivery, "Mail")
    assert isinstance(removeSecurityProxy(delivery), QueuedMailDelivery)
    assert getUtility(IMailer, "relay").force_tls
    assert set(processor_threads()) == {os.path.realpath(tmp_path / "queue")}
