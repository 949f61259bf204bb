"""Transaction-aware mail delivery with a durable Maildir queue."""
from typing import Any

__all__ = ["includeme"]


def includeme(config: Any) -> None:
    """Pyramid's ``config.include('mailoutbox')``: see :mod:`mailoutbox.pyramid`."""
    config.include("mailoutbox.pyramid")
