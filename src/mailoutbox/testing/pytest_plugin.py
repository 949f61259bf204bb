"""pytest fixtures for applications that send mail with mailoutbox.

Installed with mailoutbox as the ``mailoutbox`` plugin (a ``pytest11`` entry
point), so the fixtures are available without configuration:

``smtpd``
    A started :class:`~mailoutbox.testing.smtpd.SMTPServer` on 127.0.0.1
    and a free port (``.host``, ``.port``); what it received is in
    ``.messages``.  Needs aiosmtpd, which this module imports only when the
    fixture is used.
``recording_mailer``
    A fresh :class:`~mailoutbox.testing.RecordingMailer`.
``mail_recorder``
    A fresh :class:`~mailoutbox.testing.RecordingDelivery` using the
    default transaction manager.

Disable the plugin with ``-p no:mailoutbox``.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from mailoutbox.testing.recording import RecordingDelivery
    from mailoutbox.testing.recording import RecordingMailer
    from mailoutbox.testing.smtpd import SMTPServer


__all__ = ["mail_recorder", "recording_mailer", "smtpd"]


@pytest.fixture
def smtpd() -> Iterator[SMTPServer]:
    """A real SMTP server on 127.0.0.1, stopped after the test."""
    try:
        importlib.import_module("aiosmtpd.smtp")
    except ImportError as exc:
        raise RuntimeError(
            "the smtpd fixture needs aiosmtpd: pip install 'mailoutbox[server]'"
        ) from exc
    from mailoutbox.testing.smtpd import SMTPServer

    with SMTPServer() as server:
        yield server


@pytest.fixture
def recording_mailer() -> RecordingMailer:
    """A mailer that records what it is given to send."""
    from mailoutbox.testing.recording import RecordingMailer

    return RecordingMailer()


@pytest.fixture
def mail_recorder() -> RecordingDelivery:
    """A delivery that records the messages of committed transactions."""
    from mailoutbox.testing.recording import RecordingDelivery

    return RecordingDelivery()
