"""The vocabulary of mail delivery names."""
from __future__ import annotations

import pytest
import zope.component.testing
from zope.component import getUtility
from zope.component import provideUtility
from zope.interface import implementer
from zope.interface.registry import Components
from zope.schema.interfaces import IVocabularyFactory
from zope.schema.interfaces import IVocabularyTokenized

from mailoutbox.interfaces import IMailDelivery
from mailoutbox.interfaces import IMailer
from mailoutbox.vocabulary import MailDeliveryNames


@implementer(IMailDelivery)
class StubDelivery:
    def send(self, fromaddr, toaddrs, message):
        raise AssertionError("not sent in these tests")


@pytest.fixture(autouse=True)
def registry():
    zope.component.testing.setUp()
    yield
    zope.component.testing.tearDown()


def test_is_a_vocabulary_factory():
    assert IVocabularyFactory.providedBy(MailDeliveryNames)


def test_empty_without_deliveries():
    assert list(MailDeliveryNames(None)) == []


def test_names_of_the_deliveries_sorted_and_nothing_else():
    for name in ["zeta", "Mail", "alpha"]:
        provideUtility(StubDelivery(), IMailDelivery, name)
    provideUtility(object(), IMailer, "not-a-delivery")
    vocabulary = MailDeliveryNames()
    assert IVocabularyTokenized.providedBy(vocabulary)
    assert [term.value for term in vocabulary] == ["Mail", "alpha", "zeta"]
    assert "Mail" in vocabulary
    assert "not-a-delivery" not in vocabulary
    assert vocabulary.getTermByToken("alpha").value == "alpha"


def test_context_selects_the_registry():
    local = Components("local")
    local.registerUtility(StubDelivery(), IMailDelivery, "local-only")
    provideUtility(StubDelivery(), IMailDelivery, "global")
    assert [t.value for t in MailDeliveryNames(local)] == ["local-only"]
    assert [t.value for t in MailDeliveryNames(None)] == ["global"]


def test_registered_by_configure_zcml():
    from zope.configuration import xmlconfig

    xmlconfig.string("""
    <configure xmlns="http://namespaces.zope.org/zope">
      <include package="zope.component" file="meta.zcml" />
      <include package="mailoutbox" />
    </configure>
    """)
    factory = getUtility(IVocabularyFactory, "Mail Delivery Names")
    assert factory is MailDeliveryNames
