"""``mailoutbox move`` killed (SIGKILL) at a chosen point of its work.

Usage::

    python tests/_move_killer.py PHASE N SOURCE DEST

Runs ``mailoutbox move SOURCE DEST`` in this process, and kills the
process when the *N*-th message (counting from 1) reaches PHASE:

``claimed``
    claimed in SOURCE and read, nothing queued in DEST yet;
``committed``
    committed in DEST, still claimed in SOURCE (the window a resumed move
    recognises by envelope and bytes);
``removed``
    removed from SOURCE.
"""
from __future__ import annotations

import os
import signal
import sys

__all__ = ["main"]


def main(argv: list[str]) -> int:
    phase, count, source, dest = argv
    target = int(count)
    seen = {"claimed": 0, "committed": 0, "removed": 0}

    def reached(name: str) -> None:
        seen[name] += 1
        if name == phase and seen[name] == target:
            os.kill(os.getpid(), signal.SIGKILL)

    from mailoutbox.cli import main as cli_main
    from mailoutbox.cli import move
    from mailoutbox.maildir import Claim
    from mailoutbox.postgresql.store import PostgreSQLClaim

    parse = move.parse_queue_file

    def parse_and_report(data: bytes):  # type: ignore[no-untyped-def]
        reached("claimed")
        return parse(data)

    move.parse_queue_file = parse_and_report
    for cls in (Claim, PostgreSQLClaim):
        for method in ("complete", "discard"):
            real = getattr(cls, method, None)
            if real is None:
                continue

            def wrapped(self, _real=real):  # type: ignore[no-untyped-def]
                reached("committed")
                _real(self)
                reached("removed")
            setattr(cls, method, wrapped)
    return cli_main(["move", source, dest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
