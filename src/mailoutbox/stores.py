"""Opening a queue store by its path or URL.

A queue is a Maildir folder (:class:`~mailoutbox.maildir.Maildir`) or, for
a ``postgresql://`` URL, a table in a PostgreSQL database
(:mod:`mailoutbox.postgresql`, which needs the extra
``mailoutbox[postgresql]``).  Both are :class:`~mailoutbox.interfaces.IQueueStore`.
"""
from __future__ import annotations

from typing import Any

from mailoutbox.maildir import Maildir

__all__ = ["URL_SCHEMES", "is_url", "open_store"]

#: The URL schemes of the PostgreSQL store (libpq's).
URL_SCHEMES = ("postgresql://", "postgres://")


def is_url(path: object) -> bool:
    """Whether *path* names a database queue rather than a folder."""
    return isinstance(path, str) and path.lower().startswith(URL_SCHEMES)


def open_store(path: str, create: bool = False) -> Any:
    """The :class:`~mailoutbox.interfaces.IQueueStore` of the queue at
    *path* (a folder, created with *create*) or URL.

    A folder that is not a queue raises :class:`ValueError`; so does a URL
    when psycopg is not installed, or the queue's schema is missing.
    """
    if is_url(path):
        from mailoutbox.postgresql import open_queue
        return open_queue(path)
    return Maildir(path, create=create)
