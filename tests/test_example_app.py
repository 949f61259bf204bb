"""The example Pyramid application (examples/pyramid_app), end to end with
WebTest against a real SMTP server."""
from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from webtest import TestApp

from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.interfaces import IMailDelivery
from mailoutbox.interfaces import IMailer
from mailoutbox.zcml import processor_threads
from mailoutbox.zcml import stop_processor_threads

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "pyramid_app")


@pytest.fixture
def mailapp(monkeypatch, tmp_path):
    """The example's package, imported from a copy (its mail.zcml creates
    its queue next to the package)."""
    copy = tmp_path / "pyramid_app"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns(
        "*.egg-info", "mailqueue", "__pycache__"))
    for name in [n for n in sys.modules if n.split(".")[0] == "mailapp"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(copy))
    import mailapp
    import mailapp.subscribers

    assert mailapp.__file__.startswith(str(copy))

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


def test_default_configuration(mailapp, tmp_path):
    """The shipped mail.zcml: a queued delivery next to the package, whose
    processor thread sends through 127.0.0.1:8025 (the README's server)."""
    registry = mailapp.main({}).registry
    delivery = registry.getUtility(IMailDelivery, "Mail")
    assert isinstance(delivery, QueuedMailDelivery)
    queue = str(tmp_path / "pyramid_app" / "mailqueue")
    assert delivery.queuePath == queue
    mailer = registry.getUtility(IMailer, "relay")
    assert (mailer.hostname, mailer.port) == ("127.0.0.1", 8025)
    (thread,) = processor_threads().values()
    assert (thread.queuePath, thread.mailer, thread.interval) == (queue, mailer, 1.0)


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


# -- the example's README, followed step by step --------------------------------------


def readme_commands() -> list[str]:
    text = Path(EXAMPLE, "README.rst").read_text()
    blocks = re.findall(r"::\n\n((?:    .*\n)+)", text)
    return [line.strip() for block in blocks for line in block.splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port}")


def http(url: str, data: str | None = None) -> tuple[int, object]:
    body = None if data is None else data.encode()
    with urllib.request.urlopen(url, body, timeout=30) as response:  # noqa: S310
        return response.status, json.loads(response.read())


def stop(process: subprocess.Popen) -> bytes:
    process.send_signal(signal.SIGINT)
    try:
        out, _err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a hang
        process.kill()
        out, _err = process.communicate()
    return out or b""


@pytest.mark.slow
def test_the_readme_steps(tmp_path):
    """examples/pyramid_app/README.rst, followed as written: in a copy of the
    example (installing it writes into it), with other ports than 8025 and
    6543 (which may be taken), and in a virtual environment of its own that
    sees the packages of this one."""
    commands = readme_commands()
    assert commands == [
        "pip install -e examples/pyramid_app",
        "python -m aiosmtpd -n -l 127.0.0.1:8025",
        "pserve examples/pyramid_app/development.ini",
        "curl -d to=jane@example.org http://127.0.0.1:6543/welcome",
        "curl http://127.0.0.1:6543/outbox",
    ]
    smtp_port, http_port = free_port(), free_port()

    def ported(text: str) -> str:
        return text.replace(":8025", f":{smtp_port}").replace(
            '"8025"', f'"{smtp_port}"').replace("6543", str(http_port))

    checkout = tmp_path / "checkout"
    shutil.copytree(EXAMPLE, checkout / "examples" / "pyramid_app", ignore=(
        shutil.ignore_patterns("*.egg-info", "mailqueue", "__pycache__")))
    for name in ("mailapp/mail.zcml", "development.ini"):
        path = checkout / "examples" / "pyramid_app" / name
        path.write_text(ported(path.read_text()))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=120)
    python = str(venv / "bin" / "python")
    ours = sysconfig.get_paths()["purelib"]
    theirs = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    # An "import" line, so that the .pth files there (this checkout's
    # editable install among them) are read too.
    Path(theirs, "parent-environment.pth").write_text(
        f"import site; site.addsitedir({ours!r})\n")
    programs = {
        "pip": [python, "-m", "pip"],
        "python": [python],
        "pserve": [python, "-m", "pyramid.scripts.pserve"],
    }

    def argv(command: str) -> list[str]:
        program, *args = ported(command).split()
        return programs[program] + args

    installed = subprocess.run(
        [*argv(commands[0]), "--no-deps", "-q", "--retries", "1"],
        cwd=checkout, capture_output=True, timeout=600,
    )
    if installed.returncode and b"No matching distribution" in installed.stderr:
        pytest.skip("no package index to fetch the build tools from")
    assert installed.returncode == 0, installed.stderr
    server = subprocess.Popen(argv(commands[1]), cwd=checkout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    app = None
    try:
        wait_for_port(smtp_port, server)
        app = subprocess.Popen(argv(commands[2]), cwd=checkout,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_for_port(http_port, app)
        data = re.search(r"-d (\S+)", commands[3]).group(1)
        status, answer = http(ported(commands[3].split()[-1]), data)
        assert status == 200
        message_id = answer["message_id"]
        outbox = ported(commands[4].split()[-1])
        deadline = time.monotonic() + 30
        while http(outbox)[1] == [] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert http(outbox) == (200, [{"message_id": message_id, "sent": True}])
    finally:
        log = stop(app) if app is not None else b""
        received = stop(server)
    assert f"<{message_id}>".encode() in received, received
    assert b"Subject: Welcome" in received
    assert b"jane@example.org" in received
    assert f"mail {message_id} sent".encode() in log
    queue = checkout / "examples" / "pyramid_app" / "mailqueue"
    assert os.listdir(queue / "new") == []
