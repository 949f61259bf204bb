"""The URL of a PostgreSQL queue: libpq's URL plus our ``table`` parameter.

``postgresql://user:secret@host:5432/db?sslmode=require&table=mail_queue``
names the queue table ``mail_queue`` (the default; ``schema.name`` works
too) in the database ``db``; ``keep_sent=N`` keeps sent messages N days
(see :mod:`mailoutbox.postgresql._conn`).  :func:`parse` splits such a URL
into what psycopg connects with (the URL without our parameters) and the
table name;
:func:`display` is the URL to show in messages and logs: without its
password, ever.
"""
from __future__ import annotations

import urllib.parse
from typing import Any

from mailoutbox.stores import is_url

__all__ = ["DEFAULT_TABLE", "display", "parse"]

#: The queue table of a URL without ``table=``.
DEFAULT_TABLE = "mail_queue"


def _split_userinfo(netloc: str) -> tuple[str, str]:
    """``(userinfo, hosts)`` of a libpq netloc (hosts may be several)."""
    userinfo, at, hosts = netloc.rpartition("@")
    return (userinfo, hosts) if at else ("", netloc)


def display(url: str) -> str:
    """*url* without its password (in the user part or a ``password``
    parameter): what messages, logs and ``store.path`` show."""
    parts = urllib.parse.urlsplit(str(url))
    userinfo, hosts = _split_userinfo(parts.netloc)
    if userinfo:
        hosts = userinfo.partition(":")[0] + "@" + hosts
    query = "&".join(
        item for item in parts.query.split("&")
        if item and item.partition("=")[0].lower() != "password")
    return urllib.parse.urlunsplit(
        (parts.scheme, hosts, parts.path, query, parts.fragment))


def parse(url: str) -> tuple[str, str, dict[str, Any]]:
    """``(conninfo, table, options)`` of the queue *url*.

    *conninfo* is *url* without our ``table`` parameter, for
    ``psycopg.connect()``; *table* the queue table (:data:`DEFAULT_TABLE`
    if not given); *options* libpq's connection parameters as a dict
    (``dbname``, ``host``...; the password too, if any: never show it).
    A URL that is not a ``postgresql://`` URL, that libpq cannot parse, or
    names an invalid table raises :class:`ValueError` naming the URL
    without its password; a missing psycopg raises :class:`ValueError`
    naming the extra to install.
    """
    if not is_url(url):
        raise ValueError(f"not a PostgreSQL URL: {display(str(url))!r}"
                         " (postgresql://[user@]host[:port]/database[?table=NAME])")
    try:
        from psycopg.conninfo import conninfo_to_dict

        from mailoutbox.postgresql._conn import parse_url
    except ImportError:  # pragma: no cover - psycopg is installed for tests
        raise ValueError(f"the PostgreSQL queue {display(url)} needs psycopg:"
                         " install mailoutbox[postgresql]") from None
    # One parser for the store and the delivery (our own parameters, such
    # as table= and keep_sent=, never reach libpq).
    parsed = parse_url(url)
    conninfo, table = parsed.conninfo, parsed.table
    options = conninfo_to_dict(conninfo)
    return conninfo, table, options
