"""Transaction-aware mail delivery with a durable Maildir queue."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    import datetime
    import email.message

__all__ = ["includeme", "send_message"]


def includeme(config: Any) -> None:
    """Pyramid's ``config.include('mailoutbox')``: see :mod:`mailoutbox.pyramid`."""
    config.include("mailoutbox.pyramid")


def send_message(
    message: email.message.Message | bytes | str,
    delivery: str = "Mail",
    *,
    fromaddr: str | None = None,
    toaddrs: Iterable[str] | None = None,
    mailer: str | None = None,
    not_before: datetime.datetime | datetime.timedelta | float | None = None,
    priority: str | int | None = None,
) -> str:
    """Send *message* through the :class:`~mailoutbox.interfaces.IMailDelivery`
    utility named *delivery*, in the current transaction of that delivery;
    return its Message-Id.

    See :meth:`mailoutbox.interfaces.IMailDelivery.send_message` for the
    other arguments.  *not_before* and *priority* are passed on only when
    given.  A delivery that has no ``send_message()`` (such as
    zope.sendmail's) is given the envelope taken from the headers through
    its ``send()``, without *mailer*, *not_before* or *priority*
    (:class:`TypeError` if one is given).  Raises
    :class:`zope.interface.interfaces.ComponentLookupError` (a
    :class:`LookupError`) when no delivery of that name is registered.

    .. versionadded:: 0.1
    """
    from zope.component import queryUtility
    from zope.interface.interfaces import ComponentLookupError

    from mailoutbox.interfaces import IMailDelivery

    utility = queryUtility(IMailDelivery, name=delivery)
    if utility is None:
        raise ComponentLookupError(
            f"no mail delivery named {delivery!r} is registered (an"
            " IMailDelivery utility, e.g. from the mail:queuedDelivery ZCML"
            " directive or config.include('mailoutbox'))"
        )
    options = {name: value for name, value in (("not_before", not_before),
                                               ("priority", priority))
               if value is not None}
    method = getattr(utility, "send_message", None)
    if method is not None:
        return str(method(message, fromaddr=fromaddr, toaddrs=toaddrs, mailer=mailer,
                          **options))
    if mailer is not None:
        raise TypeError(
            f"the mail delivery {delivery!r} ({utility!r}) cannot route"
            f" messages to the mailer {mailer!r}"
        )
    if options:
        raise TypeError(
            f"the mail delivery {delivery!r} ({utility!r}) cannot schedule"
            f" messages or give them a priority ({', '.join(options)})"
        )
    from mailoutbox.headers import prepare_send_message

    fromaddr, toaddrs, data = prepare_send_message(message, fromaddr, toaddrs)
    return str(utility.send(fromaddr, toaddrs, data))
