"""The example Pyramid application (examples/pyramid_app), end to end with
WebTest against a real SMTP server."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from webtest import TestApp

from mailoutbox.delivery import DirectMailDelivery
from mailoutbox.interfaces import IMailDelivery
from mailoutbox.interfaces import IMailer
from mailoutbox.zcml import processor_threads
from mailoutbox.zcml import stop_processor_threads

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "pyramid_app")


@pytest.fixture
def mailapp(monkeypatch):
    monkeypatch.syspath_prepend(os.path.abspath(EXAMPLE))
    import mailapp
    import mailapp.subscribers

    mailapp.subscribers.clear()
    yield mailapp
    stop_processor_threads(timeout=10)
    mailapp.subscribers.clear()


@pytest.fixture
def app(mailapp, smtp_server, tmp_path):
    # Mail events go to every live application of the process: let those of
    # the previous tests go first.
    gc.collect()
    site = tmp_path / "site.zcml"
    site.write_text(f"""
    <configure xmlns="http://pylonshq.com/pyramid"
               xmlns:mail="http://namespaces.zope.org/mail">
      <include package="mailapp" file="views.zcml" />
      <include package="mailoutbox" file="meta.zcml" />
      <mail:smtpMailer name="relay" hostname="{smtp_server.host}"
                       port="{smtp_server.port}" />
      <mail:queuedDelivery mailer="relay" queuePath="{tmp_path}/queue"
                           interval="0.05" />
    </configure>
    """)
    return TestApp(mailapp.main({}, **{"mailapp.zcml": str(site)}))


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def test_welcome_mail_is_sent_and_reported(app, smtp_server):
    message_id = app.post("/welcome", {"to": "jane@example.org"}).json["message_id"]
    wait_for(lambda: app.get("/outbox").json)
    assert app.get("/outbox").json == [{"message_id": message_id, "sent": True}]
    (received,) = smtp_server.messages
    assert received.message_id == message_id
    assert received.mail_from == "app@example.org"
    assert received.rcpt_tos == ["jane@example.org"]
    assert received.message["Subject"] == "Welcome"


def test_a_failing_view_sends_nothing(app, smtp_server, tmp_path):
    response = app.post("/fail", {"to": "jane@example.org"}, status=500)
    assert response.json == {"error": "the account could not be created"}
    assert os.listdir(tmp_path / "queue" / "new") == []
    app.post("/welcome", {"to": "bob@example.org"})
    wait_for(lambda: smtp_server.messages)
    time.sleep(0.1)  # a few more passes of the processor
    assert [m.rcpt_tos for m in smtp_server.messages] == [["bob@example.org"]]


def test_a_refused_message_is_reported(app, smtp_server):
    smtp_server.refuse("nobody@example.org")
    message_id = app.post("/welcome", {"to": "nobody@example.org"}).json["message_id"]
    wait_for(lambda: app.get("/outbox").json)
    (outcome,) = app.get("/outbox").json
    assert outcome["message_id"] == message_id
    assert (outcome["sent"], outcome["permanent"]) == (False, True)
    assert "550" in outcome["error"]
    assert smtp_server.messages == []


def test_default_configuration(mailapp):
    """The shipped mail.zcml: direct delivery through localhost:25."""
    registry = mailapp.main({}).registry
    delivery = registry.getUtility(IMailDelivery, "Mail")
    assert isinstance(delivery, DirectMailDelivery)
    assert delivery.mailer is registry.getUtility(IMailer, "relay")
    assert (delivery.mailer.hostname, delivery.mailer.port) == ("localhost", 25)
    assert processor_threads() == {}


# -- the README's "Using it" snippet ---------------------------------------------


def readme_snippet() -> str:
    readme = Path(__file__).resolve().parent.parent / "README.rst"
    section = readme.read_text().split("\nUsing it\n", 1)[1]
    block = section.split(".. code-block:: python\n", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return textwrap.dedent("\n".join(lines))


def test_the_readme_snippet_runs_as_a_script(tls_server, certificates, tmp_path):
    """Run as it is, but for the queue's path and the relay's address (and
    the authority of the test relay's certificate): the message arrives
    before the script ends."""
    code = readme_snippet()
    code = code.replace("/var/spool/myapp/mailqueue", str(tmp_path / "queue"))
    relay = 'SMTPMailer("smtp.example.org", 587, force_tls=True)'
    assert relay in code
    code = code.replace(relay, (
        f'SMTPMailer("{tls_server.host}", {tls_server.port}, force_tls=True,'
        f' ca_file={certificates.ca_file!r})'
    ))
    script = tmp_path / "using_it.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"sent 1, deferred 0, failed 0\n"
    (received,) = tls_server.messages
    assert received.rcpt_tos == ["jane@example.org"]
    assert received.message["Subject"] == "Welcome"
