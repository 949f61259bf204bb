"""A small Pyramid application that sends mail with mailoutbox.

Its mailer and delivery are configured in ZCML (``mail:`` directives loaded
through pyramid_zcml), its transactions are managed by pyramid_tm, and it
records what became of every message from mailoutbox's events.
"""
from __future__ import annotations

from typing import Any

from pyramid.config import Configurator

__all__ = ["main"]


def main(global_config: dict[str, Any] | None = None, **settings: Any) -> Any:
    """The WSGI application (a PasteDeploy ``app`` factory).

    ``mailapp.zcml`` names the ZCML file to load (an asset spec or a
    path), ``mailapp:configure.zcml`` by default; ``mailapp.sender`` is the
    sender of the mail it sends.
    """
    settings.setdefault("mailapp.sender", "app@example.org")
    with Configurator(settings=settings) as config:
        config.include("pyramid_tm")
        config.include("pyramid_zcml")
        config.include("mailoutbox.pyramid.integrate")
        config.load_zcml(settings.get("mailapp.zcml", "mailapp:configure.zcml"))
    return config.make_wsgi_app()
