"""Helpers for testing applications that send mail with mailoutbox.

- :class:`RecordingMailer` and :class:`RecordingDelivery` record messages
  instead of sending them (the delivery only those of committed
  transactions);
- :class:`SMTPServer` is a real SMTP server on 127.0.0.1 in a thread (it
  needs aiosmtpd: ``pip install mailoutbox[server]``);
- :mod:`mailoutbox.testing.pytest_plugin` offers them as pytest fixtures.

The names are imported from their modules on first use, so that importing
one helper (say :mod:`mailoutbox.testing.smtpd`) does not import the others.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ReceivedMessage",
    "RecordingDelivery",
    "RecordingMailer",
    "SMTPServer",
    "SentMessage",
]

_MODULES = {
    "ReceivedMessage": "mailoutbox.testing.smtpd",
    "SMTPServer": "mailoutbox.testing.smtpd",
    "RecordingDelivery": "mailoutbox.testing.recording",
    "RecordingMailer": "mailoutbox.testing.recording",
    "SentMessage": "mailoutbox.testing.recording",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
