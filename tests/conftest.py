"""Fixtures shared by the test suite: real SMTP servers and queue folders."""
from __future__ import annotations

import pytest
import transaction
import zope.event

from mailoutbox.testing.smtpd import SMTPServer

from .certs import make_certificates


@pytest.fixture(scope="session")
def certificates(tmp_path_factory):
    """A private CA and a server certificate for 127.0.0.1/localhost."""
    return make_certificates(str(tmp_path_factory.mktemp("certs")))


@pytest.fixture
def smtp_server():
    """A plain SMTP server on 127.0.0.1 (no TLS, no AUTH)."""
    with SMTPServer() as server:
        yield server


@pytest.fixture
def tls_server(certificates):
    """An SMTP server offering STARTTLS with a certificate of the test CA,
    and AUTH (user ``alice``, password ``s3cret-pw``) after TLS."""
    with SMTPServer(
        tls_context=certificates.server_context(),
        users={"alice": "s3cret-pw"},
    ) as server:
        yield server


@pytest.fixture
def queue_path(tmp_path):
    """A path for a queue folder that does not exist yet."""
    return str(tmp_path / "queue")


@pytest.fixture
def smtp_sink(tmp_path):
    """A function starting Postfix's smtp-sink with the options given (see
    :mod:`tests.smtpsink`); every sink started is stopped after the test.
    The test is skipped when smtp-sink is not installed."""
    import os

    from .smtpsink import SMTP_SINK
    from .smtpsink import SMTPSink

    if not os.access(SMTP_SINK, os.X_OK):
        pytest.skip("Postfix's smtp-sink is not installed (apt-get install postfix)")
    sinks = []

    def start(*options):
        directory = tmp_path / f"smtp-sink-{len(sinks)}"
        directory.mkdir()
        sink = SMTPSink(*options, directory=str(directory))
        sinks.append(sink)
        return sink.start()

    yield start
    for sink in sinks:
        sink.stop()


@pytest.fixture
def tm():
    """A transaction manager of the test's own, aborted at the end."""
    manager = transaction.TransactionManager()
    yield manager
    manager.abort()


@pytest.fixture
def events():
    """The events notified during the test."""
    received = []
    zope.event.subscribers.append(received.append)
    yield received
    zope.event.subscribers.remove(received.append)
