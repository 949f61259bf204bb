"""Kill queue processors at random moments while they drain a queue.

The long version of ``tests/test_crash.py``'s first test: *messages* are
queued, then processor processes (a real ``QueueProcessorThread`` each,
*concurrency* workers, a lease of *lease* seconds) drain them into the
in-process SMTP server, which waits *slow* seconds before answering MAIL
and the end of the data so that the kills land while messages are being
sent.  Each processor is killed with SIGKILL after a random time and a new
one started, *kills* times; a last one then runs until the queue is empty.
The server counts what it received by Message-Id.

Usage (from the top of the repository)::

    python reliability/crash_drain.py [--messages 1000] [--kills 20]
        [--concurrency 3] [--lease 1] [--slow 0.02] [--seed N] [--json]

Prints the kills, how many claims the killed processors held, the messages
delivered, duplicated and lost, and the claims left stranded; exits with
status 1 if a message was lost, a claim was stranded, or there were more
duplicates than messages in flight at the kills.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests._crash_helpers import crash_drain  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--slow", type=float, default=0.02,
                        help="seconds the server waits before answering MAIL"
                             " and the end of the data")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    seed = random.randrange(2**32) if args.seed is None else args.seed
    say = (lambda text: None) if args.json else print
    say(f"{args.messages} messages, {args.kills} kills, concurrency"
        f" {args.concurrency}, lease {args.lease:g} s, seed {seed}")
    with tempfile.TemporaryDirectory(prefix="crash-drain-") as workdir:
        result = crash_drain(
            workdir, messages=args.messages, kills=args.kills,
            concurrency=args.concurrency, lease=args.lease, slow=args.slow,
            seed=seed, progress=say,
        )
    in_flight = sum(result.claims_at_kills)
    ok = (result.lost == 0 and result.stranded_claims == 0
          and result.left_queued == 0 and result.duplicates <= in_flight)
    if args.json:
        print(json.dumps({**result.as_dict(), "seed": seed, "ok": ok}))
    else:
        print(f"kills:              {result.kills}"
              f" ({sum(1 for c in result.claims_at_kills if c)} while sending)")
        print(f"claims at the kills: {in_flight}"
              f" (at most {result.kills * result.concurrency})")
        print(f"delivered:          {result.delivered} of {result.messages}")
        print(f"duplicates:         {result.duplicates}")
        print(f"lost:               {result.lost}")
        print(f"stranded claims:    {result.stranded_claims}")
        print(f"left queued:        {result.left_queued}")
        print(f"time:               {result.seconds:.1f} s")
        print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
