"""Pyramid integration: ``config.include('mailoutbox')``.

:func:`includeme` reads the ``mail.*`` settings (pyramid_mailer's names,
see :class:`MailSettings`), registers an :class:`~mailoutbox.interfaces.IMailer`
and an :class:`~mailoutbox.interfaces.IMailDelivery` in the application
registry (a queued delivery when ``mail.queue_path`` is set, a direct one
otherwise), starts the queue's processor thread (``mail.processor``), and
does what :func:`integrate` does.

:func:`integrate` alone suits an application whose mailers and deliveries
come from ZCML (``mail:`` directives loaded through pyramid_zcml): it adds
``request.mail_delivery`` (the application's delivery, bound to
``request.tm`` when pyramid_tm is used), and forwards mailoutbox's events
(:class:`~mailoutbox.interfaces.IMailEvent`, sent through
:func:`zope.event.notify`) to the subscribers of the application registry,
so ``config.add_subscriber(handler, IMailSentEvent)`` works.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from dataclasses import fields
from typing import Any

import transaction
import zope.event
from pyramid.exceptions import ConfigurationError
from pyramid.settings import asbool
from zope.component import getSiteManager
from zope.interface import Attribute
from zope.interface import Interface
from zope.interface import implementer
from zope.interface.interfaces import ComponentLookupError

from mailoutbox.delivery import DirectMailDelivery
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.interfaces import IMailDelivery
from mailoutbox.interfaces import IMailer
from mailoutbox.interfaces import IMailEvent
from mailoutbox.mailer import SMTPMailer
from mailoutbox.processors import start_processor_thread
from mailoutbox.queue import DEFAULT_CONCURRENCY
from mailoutbox.retry import RetryPolicy
from mailoutbox.stores import is_url

__all__ = [
    "IMailSettings",
    "MailSettings",
    "bind",
    "get_delivery",
    "get_mail_settings",
    "get_mailer",
    "includeme",
    "integrate",
]

log = logging.getLogger(__name__)

#: Settings of pyramid_mailer that mailoutbox does not use.
_IGNORED = ("keyfile", "certfile", "debug", "sendmail_app", "sendmail_template")
_BOOLS = {"tls": "force_tls", "ssl": "implicit_tls", "no_tls": "no_tls"}
_TEXTS = ("host", "username", "password", "ca_file", "queue_path", "default_sender")
_NUMBERS = {"port": int, "timeout": float, "interval": float, "concurrency": int}
#: What each number must be: a test, and its description for the error.
_LIMITS = {
    "port": (lambda n: 1 <= n <= 65535, "a port number from 1 to 65535"),
    "timeout": (lambda n: math.isfinite(n) and n > 0, "a positive number of seconds"),
    "interval": (lambda n: math.isfinite(n) and n > 0, "a positive number of seconds"),
    "concurrency": (lambda n: n >= 1, "a whole number of at least 1"),
}
_RETRY = {"retry_initial": "initial", "retry_factor": "factor",
          "retry_cap": "cap", "retry_max_age": "max_age"}
_KNOWN = {*_BOOLS, *_TEXTS, *_NUMBERS, *_RETRY, "processor", "connection",
          *_IGNORED}


class IMailSettings(Interface):
    """The application's mail settings, parsed (a :class:`MailSettings`)."""

    default_sender = Attribute("The default sender address, or None.")
    queue_path = Attribute("The queue folder, or None for direct delivery.")


@implementer(IMailSettings)
@dataclass(frozen=True)
class MailSettings:
    """The ``mail.*`` settings of a Pyramid application, parsed.

    Each attribute is the setting of the same name (``mail.host`` is
    :attr:`host`), except ``mail.tls`` (:attr:`force_tls`), ``mail.ssl``
    (:attr:`implicit_tls`) and ``mail.retry_*`` (:attr:`retry`, a
    :class:`~mailoutbox.retry.RetryPolicy`).  ``mail.queue_path`` may be a
    ``postgresql://`` URL, and ``mail.connection`` then the dotted name of
    a callable returning the current transaction's connection
    (:attr:`connection`; see :class:`~mailoutbox.delivery.QueuedMailDelivery`).
    The passwords (``mail.password``, and one in a URL) are not shown in
    the ``repr()``.
    """

    host: str = "localhost"
    port: int = 25
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    force_tls: bool = False
    implicit_tls: bool = False
    no_tls: bool = False
    ca_file: str | None = None
    timeout: float = 10.0
    queue_path: str | None = None
    default_sender: str | None = None
    processor: bool = False
    interval: float = 3.0
    concurrency: int = DEFAULT_CONCURRENCY
    retry: RetryPolicy | None = None
    connection: Any = None

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        if is_url(self.queue_path):
            from mailoutbox.postgresql.url import display
            shown["queue_path"] = display(str(self.queue_path))
        return "MailSettings(" + ", ".join(
            f"{key}={value!r}" for key, value in shown.items()) + ")"

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, Any], prefix: str = "mail."
    ) -> MailSettings:
        """Parse the settings whose names start with *prefix*.

        Raises :class:`pyramid.exceptions.ConfigurationError`, naming the
        setting, for a value that is not valid: a port outside 1-65535, a
        ``timeout`` or ``interval`` that is not a positive number of
        seconds, a ``concurrency`` below 1; logs a warning for a setting it
        does not use.
        """
        given = {
            key[len(prefix):]: value
            for key, value in settings.items()
            if key.startswith(prefix)
        }
        for key in sorted(set(given) - _KNOWN):
            log.warning("unknown setting %s%s ignored", prefix, key)
        for key in sorted(set(given) & set(_IGNORED)):
            log.warning("setting %s%s is not used by mailoutbox", prefix, key)
        values: dict[str, Any] = {}
        for key, name in _BOOLS.items():
            if key in given:
                values[name] = asbool(given[key])
        for key in _TEXTS:
            text = given.get(key)
            if text is not None and str(text).strip():
                values[key] = str(text).strip()
        retry = {}
        for key, kind in [*_NUMBERS.items(), *((k, float) for k in _RETRY)]:
            if key in given:
                try:
                    number = kind(given[key])
                except (TypeError, ValueError):
                    raise ConfigurationError(
                        f"{prefix}{key} must be a number, not {given[key]!r}"
                    ) from None
                if key in _RETRY:
                    retry[_RETRY[key]] = number
                    continue
                valid, what = _LIMITS[key]
                if not valid(number):
                    raise ConfigurationError(
                        f"{prefix}{key} must be {what}, not {given[key]!r}"
                    )
                values[key] = number
        if "port" not in values and values.get("implicit_tls"):
            values["port"] = 465
        if retry:
            try:
                values["retry"] = RetryPolicy(**retry)
            except ValueError as exc:
                raise ConfigurationError(f"{prefix}retry_*: {exc}") from exc
        values["processor"] = asbool(
            given.get("processor", "queue_path" in values)
        )
        connection = given.get("connection")
        if connection is not None and str(connection).strip():
            values["connection"] = _resolve_connection(
                connection, values.get("queue_path"), prefix)
        return cls(**values)

    def make_mailer(self) -> SMTPMailer:
        """An :class:`~mailoutbox.mailer.SMTPMailer` as configured."""
        try:
            mailer = SMTPMailer(
                self.host,
                self.port,
                self.username,
                self.password,
                no_tls=self.no_tls,
                force_tls=self.force_tls,
                implicit_tls=self.implicit_tls,
                timeout=self.timeout,
                ca_file=self.ca_file,
            )
            if self.ca_file is not None:
                mailer.ssl_context  # noqa: B018 - loads and checks ca_file now
        except (ValueError, OSError) as exc:
            raise ConfigurationError(f"mail.* settings: {exc}") from exc
        return mailer

    def make_delivery(self, mailer: Any, transaction_manager: Any = None) -> Any:
        """A queued delivery into :attr:`queue_path`, or a direct delivery
        through *mailer* when it is not set."""
        if self.queue_path:
            return QueuedMailDelivery(
                self.queue_path, transaction_manager=transaction_manager,
                connection=self.connection,
            )
        return DirectMailDelivery(mailer, transaction_manager=transaction_manager)


def _resolve_connection(value: Any, queue_path: str | None, prefix: str) -> Any:
    """The callable that ``mail.connection`` names (or is)."""
    if not is_url(queue_path):
        raise ConfigurationError(
            f"{prefix}connection needs a postgresql:// {prefix}queue_path")
    if not isinstance(value, str):
        resolved = value
    else:
        from pyramid.path import DottedNameResolver
        try:
            resolved = DottedNameResolver().resolve(value.strip())
        except (ImportError, ValueError) as exc:
            raise ConfigurationError(
                f"{prefix}connection {value!r} cannot be imported: {exc}") from exc
    if not callable(resolved):
        raise ConfigurationError(
            f"{prefix}connection must name a callable, not {value!r}")
    return resolved


def includeme(config: Any) -> None:
    """Configure mail from the ``mail.*`` settings; see the module."""
    settings = MailSettings.from_settings(config.get_settings())
    mailer = settings.make_mailer()
    delivery = settings.make_delivery(mailer)
    registry = config.registry
    registry.registerUtility(settings, IMailSettings)
    registry.registerUtility(mailer, IMailer)
    registry.registerUtility(delivery, IMailDelivery)
    if settings.processor:
        if not settings.queue_path:
            raise ConfigurationError("mail.processor needs mail.queue_path")
        config.action(
            ("mailoutbox.processor", settings.queue_path),
            start_processor_thread,
            args=(settings.queue_path, mailer),
            kw={
                "interval": settings.interval,
                "concurrency": settings.concurrency,
                "retry": settings.retry,
            },
            order=10_000,
        )
    config.include(integrate)


def integrate(config: Any) -> None:
    """Add ``request.mail_delivery`` and forward mail events to the
    application registry's subscribers; see the module."""
    config.add_request_method(get_delivery, "mail_delivery", reify=True)
    _forwarder.add(config.registry)


def get_mail_settings(request: Any) -> MailSettings | None:
    """The :class:`MailSettings` of the application of *request* (or of a
    registry), or ``None`` when its mail is configured otherwise."""
    registry = getattr(request, "registry", request)
    return registry.queryUtility(IMailSettings)


def get_mailer(request: Any, name: str = "") -> Any:
    """The :class:`~mailoutbox.interfaces.IMailer` named *name* of the
    application of *request* (or of a registry)."""
    registry = getattr(request, "registry", request)
    return registry.getUtility(IMailer, name)


def get_delivery(request: Any, name: str | None = None) -> Any:
    """The application's :class:`~mailoutbox.interfaces.IMailDelivery`,
    bound to ``request.tm`` when the request has one (pyramid_tm).

    Without *name*: the unnamed delivery (from the ``mail.*`` settings) or
    else the one named ``"Mail"`` (the default name of the ZCML
    directives).  Raises :class:`ComponentLookupError` when there is none.
    """
    registry = request.registry
    if name is None:
        delivery = registry.queryUtility(IMailDelivery, "")
        if delivery is None:
            delivery = registry.queryUtility(IMailDelivery, "Mail")
        if delivery is None:
            raise ComponentLookupError(IMailDelivery, "")
    else:
        delivery = registry.getUtility(IMailDelivery, name)
    return bind(delivery, getattr(request, "tm", None))


def bind(delivery: Any, transaction_manager: Any) -> Any:
    """*delivery*, or a copy of it that joins the transactions of
    *transaction_manager* when it uses another manager.

    Deliveries of other classes than mailoutbox's (and of their subclasses)
    are returned unchanged.
    """
    if transaction_manager is None:
        return delivery
    current = getattr(delivery, "transaction_manager", None) or transaction.manager
    if current is transaction_manager:
        return delivery
    if isinstance(delivery, (QueuedMailDelivery, DirectMailDelivery)):
        # A shallow copy keeps everything else, the relays it may route to
        # among them.
        bound = copy.copy(delivery)
        bound.transaction_manager = transaction_manager
        return bound
    return delivery


class _EventForwarder:
    """A :mod:`zope.event` subscriber that notifies Pyramid registries of
    mailoutbox's events.  Holds the registries weakly."""

    def __init__(self) -> None:
        self._refs: list[weakref.ref[Any]] = []
        self._lock = threading.Lock()

    def registries(self) -> list[Any]:
        with self._lock:
            alive = [(ref, ref()) for ref in self._refs]
            self._refs = [ref for ref, registry in alive if registry is not None]
            return [registry for _ref, registry in alive if registry is not None]

    def add(self, registry: Any) -> None:
        with self._lock:
            if not any(ref() is registry for ref in self._refs):
                self._refs.append(weakref.ref(registry))
            if self not in zope.event.subscribers:
                zope.event.subscribers.append(self)

    def __call__(self, event: Any) -> None:
        if not IMailEvent.providedBy(event):
            return
        reached = _reached_by_zope_component()
        for registry in self.registries():
            if registry is reached:
                continue  # zope.component's own dispatch notifies it
            try:
                registry.subscribers((event,), None)
            except Exception:
                log.exception("a subscriber of %s failed on %r", registry, event)


def _reached_by_zope_component() -> Any:
    """The registry that zope.component's event dispatch notifies now (the
    global one, or the current Pyramid one after ``config.hook_zca()``), or
    None when that dispatch is not installed."""
    module = sys.modules.get("zope.component.event")
    if module is None or module.dispatch not in zope.event.subscribers:
        return None
    return getSiteManager()


_forwarder = _EventForwarder()
