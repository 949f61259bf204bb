"""The vocabulary of the names of the registered mail deliveries.

``configure.zcml`` registers :func:`MailDeliveryNames` as the
:class:`~zope.schema.interfaces.IVocabularyFactory` named
``"Mail Delivery Names"``, as zope.sendmail does, so a form field can offer
a choice of deliveries::

    Choice(title="Delivery", vocabulary="Mail Delivery Names")
"""
from __future__ import annotations

from typing import Any

from zope.component import getUtilitiesFor
from zope.interface import provider
from zope.schema.interfaces import IVocabularyFactory
from zope.schema.vocabulary import SimpleTerm
from zope.schema.vocabulary import SimpleVocabulary

from mailoutbox.interfaces import IMailDelivery

__all__ = ["MailDeliveryNames"]


@provider(IVocabularyFactory)
def MailDeliveryNames(context: Any = None) -> SimpleVocabulary:
    """A vocabulary of the names of the :class:`IMailDelivery` utilities
    visible from *context* (the global registry for ``None``), sorted."""
    names = sorted(name for name, _utility in getUtilitiesFor(IMailDelivery, context))
    return SimpleVocabulary([SimpleTerm(name) for name in names])
