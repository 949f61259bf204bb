"""Pyramid integration: settings, registrations, request.mail_delivery,
events, and ZCML through pyramid_zcml; end to end with WebTest."""
from __future__ import annotations

import gc
import logging
import os
import time

import pytest
import transaction
import zope.component
import zope.event
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.registry import Registry
from pyramid.request import Request
from webtest import TestApp
from zope.interface.interfaces import ComponentLookupError

import mailoutbox.pyramid
from mailoutbox.delivery import DirectMailDelivery
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.events import MailSentEvent
from mailoutbox.interfaces import IMailDelivery
from mailoutbox.interfaces import IMailer
from mailoutbox.interfaces import IMailErrorEvent
from mailoutbox.interfaces import IMailSentEvent
from mailoutbox.mailer import SMTPMailer
from mailoutbox.pyramid import IMailSettings
from mailoutbox.pyramid import MailSettings
from mailoutbox.pyramid import bind
from mailoutbox.pyramid import get_delivery
from mailoutbox.pyramid import get_mail_settings
from mailoutbox.pyramid import get_mailer
from mailoutbox.retry import RetryPolicy
from mailoutbox.testing import RecordingDelivery
from mailoutbox.zcml import processor_threads
from mailoutbox.zcml import stop_processor_threads

MESSAGE = b"Subject: Hello\r\n\r\nHello there.\r\n"


@pytest.fixture(autouse=True)
def stop_threads():
    yield
    stop_processor_threads(timeout=10)


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


# -- settings ---------------------------------------------------------------------


def test_default_settings():
    settings = MailSettings.from_settings({})
    assert settings == MailSettings()
    assert (settings.host, settings.port, settings.timeout) == ("localhost", 25, 10.0)
    assert settings.queue_path is None and settings.processor is False
    assert IMailSettings.providedBy(settings)


def test_every_setting(tmp_path):
    settings = MailSettings.from_settings({
        "mail.host": " smtp.example.org ",
        "mail.port": "587",
        "mail.username": "alice",
        "mail.password": "s3cret-pw",
        "mail.tls": "true",
        "mail.ssl": "false",
        "mail.no_tls": "off",
        "mail.ca_file": "/etc/ssl/relay.pem",
        "mail.timeout": "2.5",
        "mail.queue_path": str(tmp_path),
        "mail.default_sender": "App <app@example.org>",
        "mail.processor": "no",
        "mail.interval": "0.5",
        "mail.concurrency": "2",
        "mail.retry_initial": "5",
        "mail.retry_factor": "3",
        "mail.retry_cap": "100",
        "mail.retry_max_age": "3600",
        "other.setting": "ignored",
    })
    assert settings == MailSettings(
        host="smtp.example.org", port=587, username="alice",
        password="s3cret-pw", force_tls=True, implicit_tls=False,
        no_tls=False, ca_file="/etc/ssl/relay.pem", timeout=2.5,
        queue_path=str(tmp_path), default_sender="App <app@example.org>",
        processor=False, interval=0.5, concurrency=2,
        retry=RetryPolicy(initial=5, factor=3, cap=100, max_age=3600),
    )
    assert "s3cret-pw" not in repr(settings)


def test_ssl_defaults_to_port_465():
    assert MailSettings.from_settings({"mail.ssl": "true"}).port == 465
    settings = {"mail.ssl": "1", "mail.port": "2465"}
    assert MailSettings.from_settings(settings).port == 2465


def test_processor_defaults_to_on_with_a_queue():
    assert MailSettings.from_settings({"mail.queue_path": "/q"}).processor is True
    assert MailSettings.from_settings({"mail.processor": "on"}).processor is True
    assert MailSettings.from_settings({"mail.queue_path": " "}).queue_path is None


def test_prefix():
    settings = MailSettings.from_settings(
        {"outbox.host": "relay", "mail.host": "other"}, prefix="outbox."
    )
    assert settings.host == "relay"


@pytest.mark.parametrize(("settings", "message"), [
    ({"mail.port": "smtp"}, "mail.port must be a number, not 'smtp'"),
    ({"mail.timeout": None}, "mail.timeout must be a number"),
    ({"mail.retry_factor": "0.5"}, "factor must be"),
    ({"mail.port": "70000"}, "mail.port must be a port number from 1 to 65535"),
    ({"mail.port": "0"}, "mail.port must be a port number"),
    ({"mail.port": "-25"}, "mail.port must be a port number"),
    ({"mail.timeout": "-1"}, "mail.timeout must be a positive number of seconds"),
    ({"mail.timeout": "0"}, "mail.timeout must be a positive number"),
    ({"mail.timeout": "nan"}, "mail.timeout must be a positive number"),
    ({"mail.interval": "-1"}, "mail.interval must be a positive number of seconds"),
    ({"mail.interval": "0"}, "mail.interval must be a positive number"),
    ({"mail.interval": "nan"}, "mail.interval must be a positive number"),
    ({"mail.interval": "inf"}, "mail.interval must be a positive number"),
    ({"mail.concurrency": "0"}, "mail.concurrency must be a whole number of at"),
    ({"mail.concurrency": "-3"}, "mail.concurrency must be a whole number"),
])
def test_invalid_settings(settings, message):
    with pytest.raises(ConfigurationError, match=message):
        MailSettings.from_settings(settings)


@pytest.mark.parametrize("setting", [
    {"mail.port": "70000"}, {"mail.timeout": "0"}, {"mail.interval": "nan"},
    {"mail.concurrency": "0"},
])
def test_invalid_numbers_fail_the_include(setting, queue_path):
    """At config.include, naming the setting, and starting no thread."""
    config = Configurator(settings={"mail.queue_path": queue_path, **setting})
    with pytest.raises(ConfigurationError, match=next(iter(setting))):
        config.include("mailoutbox")
        config.commit()
    assert processor_threads() == {}


def test_unknown_and_unused_settings_are_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="mailoutbox.pyramid"):
        MailSettings.from_settings({"mail.hots": "x", "mail.debug": "1"})
    assert [r.getMessage() for r in caplog.records] == [
        "unknown setting mail.hots ignored",
        "setting mail.debug is not used by mailoutbox",
    ]


def test_invalid_mailer_settings():
    with pytest.raises(ConfigurationError, match="no_tls and force_tls"):
        MailSettings(no_tls=True, force_tls=True).make_mailer()


def test_missing_ca_file(tmp_path):
    with pytest.raises(ConfigurationError, match="mail"):
        MailSettings(ca_file=str(tmp_path / "missing.pem")).make_mailer()


def test_ca_file(certificates):
    mailer = MailSettings(ca_file=certificates.ca_file).make_mailer()
    assert mailer.ca_file == certificates.ca_file


# -- includeme --------------------------------------------------------------------


def send_view(request):
    return request.mail_delivery.send(
        get_mail_settings(request).default_sender,
        [request.params["to"]],
        MESSAGE,
    )


def fail_view(request):
    request.mail_delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
    raise RuntimeError("the view failed after sending")


def make_app(settings, include="mailoutbox"):
    with Configurator(settings=settings) as config:
        config.include("pyramid_tm")
        config.include(include)
        config.add_route("send", "/send")
        config.add_view(send_view, route_name="send", renderer="string")
        config.add_route("fail", "/fail")
        config.add_view(fail_view, route_name="fail", renderer="string")
        app = config.make_wsgi_app()
    return TestApp(app), config.registry


@pytest.mark.parametrize("include", ["mailoutbox", "mailoutbox.pyramid"])
def test_direct_delivery_app(smtp_server, include):
    app, registry = make_app({
        "mail.host": smtp_server.host,
        "mail.port": str(smtp_server.port),
        "mail.default_sender": "app@example.org",
    }, include)
    mailer = registry.getUtility(IMailer)
    assert isinstance(mailer, SMTPMailer)
    assert (mailer.hostname, mailer.port) == (smtp_server.host, smtp_server.port)
    delivery = registry.getUtility(IMailDelivery)
    assert isinstance(delivery, DirectMailDelivery) and delivery.mailer is mailer
    assert registry.getUtility(IMailSettings).default_sender == "app@example.org"
    assert processor_threads() == {}

    with pytest.raises(RuntimeError, match="failed after sending"):
        app.get("/fail")
    assert smtp_server.messages == []
    message_id = app.get("/send", {"to": "jane@example.org"}).text
    mailer.close()
    assert smtp_server.message_ids() == [message_id]
    assert smtp_server.messages[0].mail_from == "app@example.org"


def test_queued_delivery_app(smtp_server, queue_path):
    app, registry = make_app({
        "mail.host": smtp_server.host,
        "mail.port": str(smtp_server.port),
        "mail.queue_path": queue_path,
        "mail.interval": "0.05",
        "mail.concurrency": "2",
        "mail.default_sender": "app@example.org",
    })
    delivery = registry.getUtility(IMailDelivery)
    assert isinstance(delivery, QueuedMailDelivery)
    assert delivery.queuePath == queue_path
    (thread,) = processor_threads().values()
    assert thread.mailer is registry.getUtility(IMailer)
    assert (thread.interval, thread.concurrency) == (0.05, 2)

    with pytest.raises(RuntimeError):
        app.get("/fail")
    message_id = app.get("/send", {"to": "jane@example.org"}).text
    wait_for(lambda: smtp_server.messages)
    assert smtp_server.message_ids() == [message_id]


def test_queued_delivery_without_processor(queue_path):
    _app, registry = make_app(
        {"mail.queue_path": queue_path, "mail.processor": "off"}
    )
    assert isinstance(registry.getUtility(IMailDelivery), QueuedMailDelivery)
    assert processor_threads() == {}


def test_processor_needs_a_queue():
    with pytest.raises(ConfigurationError, match=r"mail\.queue_path"):
        make_app({"mail.processor": "true"})


def test_a_failing_configuration_starts_no_thread(queue_path):
    config = Configurator(settings={"mail.queue_path": queue_path})
    config.include("mailoutbox")
    config.add_route("r", "/a")
    config.add_route("r", "/b")
    config.add_view(lambda request: "a", route_name="r")
    config.add_view(lambda request: "b", route_name="r")
    with pytest.raises(ConfigurationError):
        config.commit()
    assert processor_threads() == {}


# -- request.mail_delivery and the helpers ----------------------------------------


def make_request(registry, **attributes):
    request = Request.blank("/")
    request.registry = registry
    for name, value in attributes.items():
        setattr(request, name, value)
    return request


def test_delivery_bound_to_request_tm(smtp_server):
    settings = {
        "mail.host": smtp_server.host,
        "mail.port": str(smtp_server.port),
        "tm.manager_hook": "pyramid_tm.explicit_manager",
    }
    with Configurator(settings=settings) as config:
        config.include("pyramid_tm")
        config.include("mailoutbox")

        def view(request):
            delivery = request.mail_delivery
            assert delivery is request.mail_delivery  # reified
            assert delivery.transaction_manager is request.tm
            assert delivery is not request.registry.getUtility(IMailDelivery)
            assert delivery.mailer is request.registry.getUtility(IMailer)
            return delivery.send("app@example.org", ["jane@example.org"], MESSAGE)

        config.add_view(view, renderer="string")
        app = TestApp(config.make_wsgi_app())
    message_id = app.get("/").text
    get_mailer(config.registry).close()
    assert smtp_server.message_ids() == [message_id]


def test_get_delivery_without_pyramid_tm():
    registry = Registry()
    delivery = DirectMailDelivery(SMTPMailer())
    registry.registerUtility(delivery, IMailDelivery)
    assert get_delivery(make_request(registry)) is delivery
    same_manager = make_request(registry, tm=transaction.manager)
    assert get_delivery(same_manager) is delivery


def test_get_delivery_names():
    registry = Registry()
    request = make_request(registry)
    with pytest.raises(ComponentLookupError):
        get_delivery(request)
    zcml_default = DirectMailDelivery(SMTPMailer())
    registry.registerUtility(zcml_default, IMailDelivery, "Mail")
    assert get_delivery(request) is zcml_default
    other = DirectMailDelivery(SMTPMailer())
    registry.registerUtility(other, IMailDelivery, "Other")
    assert get_delivery(request, "Other") is other
    with pytest.raises(ComponentLookupError):
        get_delivery(request, "Missing")
    assert get_mail_settings(request) is None
    assert get_mail_settings(registry) is None


def test_bind():
    manager = transaction.TransactionManager()
    queued = QueuedMailDelivery("/var/spool/q")
    bound = bind(queued, manager)
    assert type(bound) is QueuedMailDelivery
    assert (bound.queuePath, bound.transaction_manager) == ("/var/spool/q", manager)
    assert bind(bound, manager) is bound
    assert bind(queued, None) is queued
    recording = RecordingDelivery()
    bound = bind(recording, manager)
    assert type(bound) is RecordingDelivery and bound.mailer is recording.mailer
    assert bound.transaction_manager is manager
    other = object()
    assert bind(other, manager) is other


def test_bind_keeps_the_relays():
    manager = transaction.TransactionManager()
    queued = QueuedMailDelivery("/var/spool/q", mailers=["crm-1"])
    assert bind(queued, manager).mailer_names == {"crm-1"}
    relay = SMTPMailer()
    direct = DirectMailDelivery(SMTPMailer(), mailers={"crm-1": relay})
    bound = bind(direct, manager)
    assert bound.mailers == {"crm-1": relay}
    assert bound.transaction_manager is manager
    assert direct.transaction_manager is None


# -- events -------------------------------------------------------------------


def test_mail_events_reach_the_application_subscribers(caplog):
    with Configurator() as config:
        config.include("mailoutbox.pyramid.integrate")
        config.include("mailoutbox.pyramid.integrate")
        received = []
        config.add_subscriber(received.append, IMailSentEvent)

        def broken(event):
            raise RuntimeError("broken subscriber")

        config.add_subscriber(broken, IMailErrorEvent)
        config.commit()
    assert zope.event.subscribers.count(mailoutbox.pyramid._forwarder) == 1
    event = MailSentEvent("abc@example.org")
    zope.event.notify(event)
    zope.event.notify(object())
    assert received == [event]
    from mailoutbox.events import MailErrorEvent

    with caplog.at_level(logging.ERROR, logger="mailoutbox.pyramid"):
        zope.event.notify(MailErrorEvent("abc@example.org", "failed"))
    assert "failed on" in caplog.text


@pytest.fixture
def zope_component_dispatch():
    import zope.component.event  # installs its dispatch
    import zope.component.testing

    assert zope.component.event.dispatch in zope.event.subscribers
    zope.component.testing.setUp()
    yield
    zope.component.testing.tearDown()


def test_global_registry_is_not_notified_twice(zope_component_dispatch):
    """An application using the global registry (Pyramid's "ZCA global API"
    set-up) gets each event once, from zope.component's dispatch."""
    config = Configurator(registry=zope.component.getGlobalSiteManager())
    config.setup_registry()
    config.include("mailoutbox.pyramid.integrate")
    received = []
    config.add_subscriber(received.append, IMailSentEvent)
    config.commit()
    event = MailSentEvent("abc@example.org")
    zope.event.notify(event)
    assert received == [event]


def test_hooked_registry_is_not_notified_twice(zope_component_dispatch):
    """After config.hook_zca(), zope.component's dispatch reaches the current
    application in its own threads, the forwarder elsewhere."""
    config = Configurator()
    config.hook_zca()
    try:
        config.include("mailoutbox.pyramid.integrate")
        received = []
        config.add_subscriber(received.append, IMailSentEvent)
        config.commit()
        inside, outside = MailSentEvent("in@x.org"), MailSentEvent("out@x.org")
        config.begin()
        try:
            zope.event.notify(inside)
        finally:
            config.end()
        zope.event.notify(outside)
        assert received == [inside, outside]
    finally:
        config.unhook_zca()


def test_events_without_zope_component_dispatch(monkeypatch):
    """Without zope.component's dispatch among zope.event's subscribers, the
    forwarder alone notifies the registries, global one included."""
    monkeypatch.setattr(zope.event, "subscribers", [])
    forwarder = mailoutbox.pyramid._EventForwarder()
    registry = zope.component.getGlobalSiteManager()
    received = []
    registry.registerHandler(received.append, [IMailSentEvent])
    try:
        forwarder.add(registry)
        assert zope.event.subscribers == [forwarder]
        event = MailSentEvent("abc@example.org")
        zope.event.notify(event)
        assert received == [event]
    finally:
        registry.unregisterHandler(received.append, [IMailSentEvent])


def test_registries_are_held_weakly():
    forwarder = mailoutbox.pyramid._EventForwarder()
    registry = Registry()
    forwarder.add(registry)
    forwarder.add(registry)
    assert forwarder.registries() == [registry]
    del registry
    gc.collect()
    assert forwarder.registries() == []


# -- ZCML through pyramid_zcml ------------------------------------------------


def test_zcml_through_pyramid_zcml(smtp_server, tmp_path):
    queue = tmp_path / "queue"
    zcml = tmp_path / "mail.zcml"
    zcml.write_text(f"""
    <configure xmlns="http://pylonshq.com/pyramid"
               xmlns:mail="http://namespaces.zope.org/mail">
      <include package="mailoutbox" file="meta.zcml" />
      <mail:smtpMailer name="smtp" hostname="{smtp_server.host}"
                       port="{smtp_server.port}" />
      <mail:queuedDelivery mailer="smtp" queuePath="{queue}" interval="0.05" />
      <mail:directDelivery name="Direct" mailer="smtp" />
    </configure>
    """)
    with Configurator() as config:
        config.include("pyramid_zcml")
        config.include("pyramid_tm")
        config.include("mailoutbox.pyramid.integrate")
        config.load_zcml(str(zcml))

        def view(request):
            return request.mail_delivery.send(
                "app@example.org", [request.params["to"]], MESSAGE
            )

        config.add_view(view, renderer="string")
        app = TestApp(config.make_wsgi_app())
    registry = config.registry
    mailer = registry.getUtility(IMailer, "smtp")
    assert registry.getUtility(IMailDelivery, "Direct").mailer is mailer
    assert zope.component.queryUtility(IMailer, "smtp") is None  # not global
    (thread,) = processor_threads().values()
    assert thread.mailer is mailer
    assert list(processor_threads()) == [os.path.realpath(queue)]
    sent = []
    config.add_subscriber(sent.append, IMailSentEvent)
    config.commit()

    message_id = app.get("/", {"to": "jane@example.org"}).text
    wait_for(lambda: smtp_server.messages and sent)
    assert smtp_server.message_ids() == [message_id]
    assert [event.messageId for event in sent] == [message_id]

