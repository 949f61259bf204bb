"""The helpers for testing applications: recorders and the pytest plugin."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
import transaction
import zope.event
from zope.interface.verify import verifyObject

import mailoutbox.testing
from mailoutbox.errors import MailConnectionError
from mailoutbox.interfaces import IDirectMailDelivery
from mailoutbox.interfaces import IMailer
from mailoutbox.interfaces import IMailSentEvent
from mailoutbox.testing import RecordingDelivery
from mailoutbox.testing import RecordingMailer
from mailoutbox.testing import SentMessage

pytest_plugins = ["pytester"]

MESSAGE = b"From: app@example.org\r\nSubject: Welcome\r\n\r\nHello!\r\n"


# -- RecordingMailer ------------------------------------------------------------


def test_recording_mailer_records():
    mailer = RecordingMailer()
    verifyObject(IMailer, mailer)
    mailer.vote("app@example.org", ["jane@example.org"], MESSAGE)
    assert mailer.send("app@example.org", ["jane@example.org"], MESSAGE) == {}
    mailer.send("app@example.org", ("Bob <BOB@example.org>",), "Subject: Hi\n\nx\n")
    mailer.abort()
    mailer.close()
    first, second = mailer.sent
    assert first == SentMessage("app@example.org", ("jane@example.org",), MESSAGE)
    assert second.data == b"Subject: Hi\n\nx\n"
    assert second.recipients == ("bob@example.org",)
    assert [m["Subject"] for m in mailer.messages] == ["Welcome", "Hi"]


def test_find_by_recipient_subject_and_sender():
    mailer = RecordingMailer()
    mailer.send("App <app@example.org>", ["jane@example.org", "bob@example.org"],
                MESSAGE)
    mailer.send("other@example.org", ["bob@example.org"],
                b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\nx\r\n")
    assert len(mailer.find()) == 2
    assert mailer.find(to="Jane Doe <JANE@example.org>") == mailer.sent[:1]
    assert len(mailer.find(to="bob@example.org")) == 2
    assert mailer.find(to="nobody@example.org") == []
    assert mailer.find(subject="Grüße") == mailer.sent[1:]
    assert mailer.find(subject="Welcome", to="bob@example.org") == mailer.sent[:1]
    assert mailer.find(fromaddr="app@example.org") == mailer.sent[:1]
    assert mailer.find(fromaddr="x@example.org") == []
    mailer.clear()
    assert mailer.sent == [] and mailer.find() == []


def test_sent_message_headers():
    sent = SentMessage("a@example.org", ("b@example.org",),
                       b"Message-Id: <abc@example.org>\r\n\r\nno subject\r\n")
    assert sent.subject is None
    assert sent.message_id == "abc@example.org"
    assert SentMessage("a@example.org", ("b@example.org",), b"\r\nx").message_id is None


def test_recording_mailer_error():
    mailer = RecordingMailer()
    mailer.error = MailConnectionError("the server is down")
    with pytest.raises(MailConnectionError):
        mailer.vote("app@example.org", ["jane@example.org"], MESSAGE)
    with pytest.raises(MailConnectionError):
        mailer.send("app@example.org", ["jane@example.org"], MESSAGE)
    assert mailer.sent == []


# -- RecordingDelivery ----------------------------------------------------------


@pytest.fixture
def sent_events():
    events: list = []

    def subscriber(event):
        if IMailSentEvent.providedBy(event):
            events.append(event)

    zope.event.subscribers.append(subscriber)
    yield events
    zope.event.subscribers.remove(subscriber)


def test_recording_delivery_records_committed_messages_only(sent_events):
    delivery = RecordingDelivery()
    verifyObject(IDirectMailDelivery, delivery)
    transaction.begin()
    delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
    assert delivery.sent == []
    transaction.abort()
    assert delivery.sent == []
    with transaction.manager:
        message_id = delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
    assert [sent.message_id for sent in delivery.sent] == [message_id]
    assert delivery.find(to="jane@example.org", subject="Welcome") == delivery.sent
    assert delivery.messages[0]["Message-Id"] == f"<{message_id}>"
    assert [event.messageId for event in sent_events] == [message_id]
    delivery.clear()
    assert delivery.sent == []


def test_recording_delivery_with_its_own_manager_and_mailer():
    manager = transaction.TransactionManager(explicit=True)
    mailer = RecordingMailer()
    delivery = RecordingDelivery(mailer, transaction_manager=manager)
    assert delivery.mailer is mailer
    with manager:
        delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
    assert len(mailer.sent) == 1


def test_recording_delivery_failing_vote_aborts():
    delivery = RecordingDelivery()
    delivery.mailer.error = MailConnectionError("down")
    with pytest.raises(MailConnectionError), transaction.manager:
        delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
    assert delivery.sent == []


# -- the package ------------------------------------------------------------------


def test_package_exports():
    from mailoutbox.testing.smtpd import SMTPServer

    assert mailoutbox.testing.SMTPServer is SMTPServer
    assert set(mailoutbox.testing.__all__) <= set(dir(mailoutbox.testing))
    for name in mailoutbox.testing.__all__:
        assert getattr(mailoutbox.testing, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        mailoutbox.testing.nothing  # noqa: B018


def test_nothing_needs_aiosmtpd_until_a_server_starts():
    script = (
        "import sys; sys.modules['aiosmtpd'] = None\n"
        "import mailoutbox.testing, mailoutbox.testing.pytest_plugin\n"
        "import mailoutbox.zcml, mailoutbox.pyramid, mailoutbox.vocabulary\n"
        "from mailoutbox.testing import SMTPServer, RecordingDelivery\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"


# -- the pytest plugin -------------------------------------------------------------


def plugin_args() -> list[str]:
    """Load the plugin by hand if the entry point is not installed."""
    if _entry_point() is None:  # pragma: no cover - not installed editable
        return ["-p", "mailoutbox.testing.pytest_plugin"]
    return []


def _entry_point():
    for entry_point in importlib.metadata.entry_points(group="pytest11"):
        if entry_point.name == "mailoutbox":
            return entry_point
    return None  # pragma: no cover - not installed editable


def test_the_plugin_is_an_entry_point():
    entry_point = _entry_point()
    assert entry_point is not None, "pip install -e . to register the plugin"
    assert entry_point.value == "mailoutbox.testing.pytest_plugin"


def test_plugin_fixtures(pytester):
    pytester.makepyfile(test_app="""
        import smtplib
        import transaction

        def test_smtpd(smtpd):
            with smtplib.SMTP(smtpd.host, smtpd.port, timeout=5) as client:
                client.sendmail("app@example.org", ["jane@example.org"],
                                b"Subject: Hi\\r\\n\\r\\nHello\\r\\n")
            (received,) = smtpd.messages
            assert received.rcpt_tos == ["jane@example.org"]
            assert received.message["Subject"] == "Hi"

        def test_recording_mailer(recording_mailer):
            recording_mailer.send("a@example.org", ["b@example.org"],
                                  b"Subject: x\\r\\n\\r\\n")
            assert recording_mailer.find(to="b@example.org", subject="x")

        def test_mail_recorder(mail_recorder):
            with transaction.manager:
                mail_recorder.send("a@example.org", ["b@example.org"],
                                   b"Subject: x\\r\\n\\r\\n")
            assert len(mail_recorder.sent) == 1

        def test_fresh_recorders(recording_mailer, mail_recorder):
            assert recording_mailer.sent == [] and mail_recorder.sent == []
    """)
    result = pytester.runpytest_inprocess(*plugin_args())
    result.assert_outcomes(passed=4)


def test_smtpd_fixture_without_aiosmtpd(pytester):
    pytester.makeconftest("""
        import sys
        import pytest

        @pytest.fixture(autouse=True)
        def no_aiosmtpd(monkeypatch):
            monkeypatch.setitem(sys.modules, "aiosmtpd.smtp", None)
    """)
    pytester.makepyfile(test_app="""
        def test_smtpd(smtpd):
            pass
    """)
    result = pytester.runpytest_inprocess(*plugin_args())
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*the smtpd fixture needs aiosmtpd*"])
