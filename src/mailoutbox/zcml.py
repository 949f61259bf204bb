"""The ``mail`` ZCML namespace (``http://namespaces.zope.org/mail``).

``meta.zcml`` registers three directives, with every attribute of
zope.sendmail's directives of the same names and a few more:

- ``mail:smtpMailer`` registers an :class:`~mailoutbox.mailer.SMTPMailer` as
  a named :class:`~mailoutbox.interfaces.IMailer` utility;
- ``mail:queuedDelivery`` registers a
  :class:`~mailoutbox.delivery.QueuedMailDelivery` as a named
  :class:`~mailoutbox.interfaces.IMailDelivery` utility and, unless
  ``processorThread="false"``, starts a
  :class:`~mailoutbox.queue.QueueProcessorThread` for its queue;
- ``mail:directDelivery`` registers a
  :class:`~mailoutbox.delivery.DirectMailDelivery` the same way.

Both delivery directives take ``mailers="NAME NAME..."``: the names of
``mail:smtpMailer`` registrations that ``send(..., mailer=NAME)`` may route
a message to.  A queued delivery's processor thread sends the messages of
each relay folder through the mailer of that name.

Utilities are registered when the configuration is executed, not while it is
parsed: deliveries after every mailer (so a delivery may name a mailer
defined further down), processor threads last of all, each looking its mailer
up by name at that moment.  One processor thread runs per queue folder and
process, whatever the number of directives naming it (see
:mod:`mailoutbox.processors`); the threads are stopped at interpreter exit,
and :func:`stop_processor_threads` stops them earlier (tests, application
shutdown).

The directives register into ``_context.registry`` when the configuration
machine has one (pyramid_zcml gives it the application registry), and into
:func:`zope.component.getSiteManager` otherwise.
"""
from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from typing import Any

from zope.component import getSiteManager
from zope.configuration.exceptions import ConfigurationError
from zope.configuration.fields import GlobalObject
from zope.configuration.fields import Path
from zope.configuration.fields import Tokens
from zope.interface import Interface
from zope.schema import Bool
from zope.schema import Float
from zope.schema import Int
from zope.schema import TextLine

from mailoutbox.delivery import DirectMailDelivery
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.interfaces import IDirectMailDelivery
from mailoutbox.interfaces import IMailDelivery
from mailoutbox.interfaces import IMailer
from mailoutbox.interfaces import IQueuedMailDelivery
from mailoutbox.maildir import DEFAULT_LEASE
from mailoutbox.mailer import SMTPMailer
from mailoutbox.processors import processor_threads
from mailoutbox.processors import start_processor_thread
from mailoutbox.processors import stop_processor_threads
from mailoutbox.queue import DEFAULT_CONCURRENCY
from mailoutbox.relays import check_names
from mailoutbox.retry import RetryPolicy
from mailoutbox.stores import is_url

try:
    from zope.security.zcml import Permission
except ImportError:  # pragma: no cover - zope.security is a test dependency;
    # without it the attribute is a plain identifier and the handlers raise
    # the ConfigurationError that the _load_proxify seam lets the tests see.
    from zope.schema import Id as Permission


__all__ = [
    "NAMESPACE",
    "IDirectDeliveryDirective",
    "IQueuedDeliveryDirective",
    "ISMTPMailerDirective",
    "directDelivery",
    "processor_threads",  # from mailoutbox.processors
    "queuedDelivery",
    "smtpMailer",
    "start_processor_thread",  # from mailoutbox.processors
    "stop_processor_threads",  # from mailoutbox.processors
]

log = logging.getLogger(__name__)

NAMESPACE = "http://namespaces.zope.org/mail"

#: Execution order of the delivery registrations: after the mailers
#: (registered at the default order, 0).
DELIVERY_ORDER = 1
#: Execution order of the processor threads' start: after everything else,
#: including zope.security's permission checks, so that a configuration that
#: fails leaves no thread running.
PROCESSOR_ORDER = 10_000_000


class IMailerDirective(Interface):
    """What every mailer directive has."""

    name = TextLine(
        title="Name",
        description="Name of the IMailer utility; deliveries refer to it.",
        required=True,
    )


class ISMTPMailerDirective(IMailerDirective):
    """Registers an SMTP mailer (see ISMTPMailer for the meanings)."""

    hostname = TextLine(title="Hostname", default="localhost", required=False)
    port = Int(title="Port", default=25, min=1, max=65535, required=False)
    username = TextLine(title="Username for SMTP AUTH", required=False)
    password = TextLine(title="Password for SMTP AUTH", required=False)
    implicit_tls = Bool(
        title="Implicit TLS (SMTPS, usually port 465)",
        default=False,
        required=False,
    )
    timeout = Float(
        title="Timeout in seconds (more than 0)", default=10.0, min=0.0,
        required=False,
    )
    no_tls = Bool(title="Never use TLS", default=False, required=False)
    force_tls = Bool(title="Require STARTTLS", default=False, required=False)
    ca_file = Path(title="PEM file of trusted authorities", required=False)
    rate = Float(
        title="Most messages per second sent through it by queue processors",
        required=False,
    )
    max_connections = Int(
        title="Most connections a queue processor opens to it at once",
        min=1,
        required=False,
    )


class IDeliveryDirective(Interface):
    """What every delivery directive has."""

    name = TextLine(
        title="Name",
        description='Name of the IMailDelivery utility; "Mail" by default.',
        default="Mail",
        required=False,
    )
    mailer = TextLine(
        title="Mailer",
        description="Name of the IMailer utility that sends the messages.",
        required=True,
    )
    permission = Permission(
        title="Permission",
        description="Permission needed to use the delivery (its utility is"
        " then security-proxied; needs zope.security).",
        required=False,
    )
    mailers = Tokens(
        title="Mailers to route to",
        description="Names of IMailer utilities (e.g. mail:smtpMailer) that"
        " send(..., mailer=NAME) may route a message to, separated by"
        " spaces.",
        value_type=TextLine(),
        required=False,
    )


class IDirectDeliveryDirective(IDeliveryDirective):
    """Registers a delivery that sends when the transaction commits."""


class QueuePath(Path):
    """A queue folder (relative to the ZCML file, as :class:`Path`) or a
    ``postgresql://`` URL (as it is)."""

    def fromUnicode(self, value: str) -> Any:
        if is_url(value.strip()):
            return value.strip()
        return super().fromUnicode(value)


class IQueuedDeliveryDirective(IDeliveryDirective):
    """Registers a delivery that queues messages in a Maildir folder or a
    PostgreSQL table."""

    queuePath = QueuePath(
        title="Path of the queue folder, or a postgresql:// URL",
        required=True)
    connection = GlobalObject(
        title="The application's connection (PostgreSQL queue only)",
        description="Dotted name of a callable returning the current"
        " transaction's connection (a SQLAlchemy Session or Connection, or a"
        " psycopg connection), through which the messages are inserted:"
        " they commit with the application's rows.",
        required=False,
    )
    processorThread = Bool(
        title="Run a queue processor thread in this process",
        default=True,
        required=False,
    )
    interval = Float(
        title="Seconds between two scans of an idle queue (more than 0)",
        default=3.0,
        min=0.0,
        required=False,
    )
    concurrency = Int(
        title="Messages sent at the same time (SMTP connections)",
        default=DEFAULT_CONCURRENCY,
        min=1,
        required=False,
    )
    lease = Float(
        title="Seconds after which another processor's claim is broken",
        default=DEFAULT_LEASE,
        min=1.0,
        required=False,
    )
    retry_initial = Float(title="First retry delay in seconds", required=False)
    retry_factor = Float(title="Retry delay multiplier", required=False)
    retry_cap = Float(title="Longest retry delay in seconds", required=False)
    retry_max_age = Float(
        title="Seconds after the first failure when retrying stops",
        required=False,
    )


# -- seams -------------------------------------------------------------------

#: The class the ``mail:smtpMailer`` directive instantiates.
mailer_factory: Callable[..., Any] = SMTPMailer


def _load_proxify() -> Callable[..., Any]:
    """Return zope.component's ``proxify``; raise ImportError without
    zope.security.  A seam: tests replace it to simulate the absence."""
    importlib.import_module("zope.security.checker")
    from zope.component.security import proxify

    return proxify


def _protect(permission: str | None) -> Callable[[Any, Any], Any]:
    """A function wrapping a delivery in a permission proxy (or not)."""
    if permission is None:
        return lambda delivery, provides: delivery
    try:
        proxify = _load_proxify()
    except ImportError as exc:
        raise ConfigurationError(
            "the permission attribute needs zope.security, which is not"
            f" installed: install it or remove permission={permission!r}"
        ) from exc

    def protect(delivery: Any, provides: Any) -> Any:
        return proxify(delivery, provides=provides, permission=permission)

    return protect


def _site_manager(context: Any) -> Any:
    registry = getattr(context, "registry", None)
    return registry if registry is not None else getSiteManager()


def _lookup_mailer(context: Any, name: str) -> Any:
    mailer = _site_manager(context).queryUtility(IMailer, name)
    if mailer is None:
        raise ConfigurationError(f"Mailer {name!r} is not defined")
    return mailer


def _register(context: Any, component: Any, provides: Any, name: str) -> None:
    _site_manager(context).registerUtility(component, provides, name)


def _check_seconds(directive: str, **given: float) -> None:
    """Refuse a duration that is not a positive, finite number of seconds
    (0 would make an idle processor spin, or every send time out)."""
    for attribute, value in given.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigurationError(
                f"{directive} {attribute}: must be a positive number of"
                f" seconds, not {value!r}"
            )


# -- directives --------------------------------------------------------------


def smtpMailer(
    _context: Any,
    name: str,
    hostname: str = "localhost",
    port: int = 25,
    username: str | None = None,
    password: str | None = None,
    implicit_tls: bool = False,
    timeout: float = 10.0,
    no_tls: bool = False,
    force_tls: bool = False,
    ca_file: str | None = None,
    rate: float | None = None,
    max_connections: int | None = None,
) -> None:
    """Handler of ``mail:smtpMailer``; see :class:`ISMTPMailerDirective`."""
    _check_seconds(f"mail:smtpMailer {name!r}", timeout=timeout)
    limits: dict[str, Any] = {}
    if rate is not None:
        if not (math.isfinite(rate) and rate > 0):
            raise ConfigurationError(
                f"mail:smtpMailer {name!r} rate: must be a positive number of"
                f" messages per second, not {rate!r}"
            )
        limits["rate"] = rate
    if max_connections is not None:
        limits["max_connections"] = max_connections
    try:
        mailer = mailer_factory(
            hostname,
            int(port),
            username,
            password,
            no_tls=no_tls,
            force_tls=force_tls,
            implicit_tls=implicit_tls,
            timeout=timeout,
            ca_file=ca_file,
            **limits,
        )
        if ca_file is not None:
            mailer.ssl_context  # noqa: B018 - loads and checks ca_file now
    except (ValueError, OSError) as exc:
        raise ConfigurationError(f"mail:smtpMailer {name!r}: {exc}") from exc
    _context.action(
        discriminator=("utility", IMailer, name),
        callable=_register,
        args=(_context, mailer, IMailer, name),
    )


def _route_names(directive: str, names: list[str] | None) -> list[str]:
    """The names given to a delivery directive's ``mailers`` attribute."""
    names = list(dict.fromkeys(names or ()))
    try:
        check_names(names)
    except ValueError as exc:
        raise ConfigurationError(f"{directive} mailers: {exc}") from exc
    return names


def _lookup_mailers(context: Any, names: list[str]) -> dict[str, Any]:
    return {name: _lookup_mailer(context, name) for name in names}


def directDelivery(
    _context: Any,
    mailer: str,
    permission: str | None = None,
    name: str = "Mail",
    mailers: list[str] | None = None,
) -> None:
    """Handler of ``mail:directDelivery``; see
    :class:`IDirectDeliveryDirective`."""
    protect = _protect(permission)
    routes = _route_names("mail:directDelivery", mailers)

    def register() -> None:
        delivery = DirectMailDelivery(
            _lookup_mailer(_context, mailer),
            mailers=_lookup_mailers(_context, routes),
        )
        delivery = protect(delivery, IDirectMailDelivery)
        _register(_context, delivery, IMailDelivery, name)

    _context.action(
        discriminator=("utility", IMailDelivery, name),
        callable=register,
        order=DELIVERY_ORDER,
    )


def _retry_policy(**given: float | None) -> RetryPolicy | None:
    values = {key: value for key, value in given.items() if value is not None}
    if not values:
        return None
    try:
        return RetryPolicy(**values)
    except ValueError as exc:
        raise ConfigurationError(f"mail:queuedDelivery retry policy: {exc}") from exc


def queuedDelivery(
    _context: Any,
    queuePath: str,
    mailer: str,
    permission: str | None = None,
    name: str = "Mail",
    processorThread: bool = True,
    interval: float = 3.0,
    concurrency: int = DEFAULT_CONCURRENCY,
    lease: float = DEFAULT_LEASE,
    retry_initial: float | None = None,
    retry_factor: float | None = None,
    retry_cap: float | None = None,
    retry_max_age: float | None = None,
    mailers: list[str] | None = None,
    connection: Callable[[], Any] | None = None,
) -> None:
    """Handler of ``mail:queuedDelivery``; see
    :class:`IQueuedDeliveryDirective`."""
    _check_seconds("mail:queuedDelivery", interval=interval, lease=lease)
    if connection is not None and not is_url(queuePath):
        raise ConfigurationError(
            "mail:queuedDelivery: connection needs a postgresql:// queuePath")
    protect = _protect(permission)
    routes = _route_names("mail:queuedDelivery", mailers)
    retry = _retry_policy(
        initial=retry_initial, factor=retry_factor, cap=retry_cap,
        max_age=retry_max_age,
    )

    def register() -> None:
        _lookup_mailer(_context, mailer)
        _lookup_mailers(_context, routes)
        delivery = protect(QueuedMailDelivery(queuePath, mailers=routes,
                                              connection=connection),
                           IQueuedMailDelivery)
        _register(_context, delivery, IMailDelivery, name)

    def start() -> None:
        start_processor_thread(
            queuePath,
            _lookup_mailer(_context, mailer),
            interval=interval,
            concurrency=concurrency,
            retry=retry,
            lease=lease,
            mailers=_lookup_mailers(_context, routes),
        )

    _context.action(
        discriminator=("utility", IMailDelivery, name),
        callable=register,
        order=DELIVERY_ORDER,
    )
    if processorThread:
        _context.action(discriminator=None, callable=start, order=PROCESSOR_ORDER)
