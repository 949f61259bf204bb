"""The URL of a PostgreSQL queue: libpq's URL plus our ``table`` parameter.

``postgresql://user:secret@host:5432/db?sslmode=require&table=mail_queue``
names the queue table ``mail_queue`` (the default; ``schema.name`` works
too) in the database ``db``.  :func:`parse` splits such a URL into what
psycopg connects with (the URL without ``table``) and the table name;
:func:`display` is the URL to show in messages and logs: without its
password, ever.
"""
from __future__ import annotations

import urllib.parse
from typing import Any

from mailoutbox.postgresql.schema import check_table_name
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

    *conninfo* is *url* without our ``table`` and ``keep_sent`` parameters, for
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
    shown = display(url)
    parts = urllib.parse.urlsplit(url)
    table = DEFAULT_TABLE
    kept = []
    for item in parts.query.split("&"):
        if not item:
            continue
        key, _eq, value = item.partition("=")
        if key == "table":
            table = urllib.parse.unquote(value)
        elif key != "keep_sent":  # ours too (read by the store)
            kept.append(item)
    try:
        check_table_name(table)
    except ValueError as exc:
        raise ValueError(f"{exc} (in {shown})") from None
    conninfo = urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc, parts.path, "&".join(kept), parts.fragment))
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # pragma: no cover - psycopg is installed for tests
        raise ValueError(f"the PostgreSQL queue {shown} needs psycopg: install"
                         " mailoutbox[postgresql]") from None
    try:
        options = conninfo_to_dict(conninfo)
    except Exception as exc:  # psycopg.ProgrammingError: libpq refused it
        reason = str(exc).replace(url, shown).replace(conninfo, shown)
        raise ValueError(f"invalid PostgreSQL URL {shown}: {reason}") from None
    return conninfo, table, options
