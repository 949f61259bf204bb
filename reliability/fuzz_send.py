"""Fuzz ``send()``: the property of ``tests/test_properties.py``, many times.

Every case is a generated sender, recipient list and message (see the
strategies in ``tests/test_properties.py``) sent through a
:class:`~mailoutbox.delivery.QueuedMailDelivery` (then the real queue
processor) or a :class:`~mailoutbox.delivery.DirectMailDelivery`, both with
the real SMTPMailer, into the real in-process SMTP server (a fresh harness
per case).  Each case must
either be refused by ``send()`` with ValueError/TypeError and nothing queued,
or arrive with exactly the intended envelope and data (see
``SendHarness.check``).

Usage (from the top of the repository)::

    python reliability/fuzz_send.py [--cases 10000] [--seed 20240501]

Prints the cases run, the refusals at ``send()`` by reason, the deliveries,
and the failures; exits with status 1 if there was a failure.  Hypothesis
stops at the first failing case and shrinks it; the smallest failing input
is printed, ready to become an ``@example`` in the test module.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hypothesis import HealthCheck  # noqa: E402
from hypothesis import Phase  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import seed  # noqa: E402
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tests.test_properties import cases as send_cases  # noqa: E402
from tests.test_properties import fresh_harness  # noqa: E402


def run(cases: int, seed_value: int) -> tuple[collections.Counter, list[str]]:
    """Run *cases* cases; return the outcomes counted and the failures."""
    counts: collections.Counter = collections.Counter()
    failures: list[str] = []

    @seed(seed_value)
    @settings(max_examples=cases, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=send_cases(), direct=st.booleans())
    def run_case(case, direct):
        # A harness per case: a late delivery (after a timeout on a loaded
        # machine) must not be counted in another case or a replay.
        try:
            with fresh_harness() as harness:
                outcome = harness.check(*case, direct=direct)
        except BaseException:
            counts["failing runs (incl. shrinking)"] += 1
            raise
        path = "direct" if direct else "queued"
        if outcome.startswith("rejected: "):
            counts[outcome] += 1
        else:
            valid = "valid input" if case[3] else "hostile input"
            counts[f"{outcome} ({path}, {valid})"] += 1

    try:
        run_case()
    except Exception:
        failures.append(traceback.format_exc())
    return counts, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=20240501)
    args = parser.parse_args(argv)
    # Refusals by the server are part of the run; their log lines are noise.
    logging.disable(logging.CRITICAL)
    started = time.monotonic()
    counts, failures = run(args.cases, args.seed)
    elapsed = time.monotonic() - started
    ran = sum(counts.values())
    rejected = {k: v for k, v in counts.items() if k.startswith("rejected: ")}
    delivered = {k: v for k, v in counts.items() if not k.startswith("rejected: ")}
    print(f"cases run: {ran} in {elapsed:.0f} s (seed {args.seed})")
    print(f"rejected at send(): {sum(rejected.values())}")
    for reason, count in sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {count:6d}  {reason[len('rejected: '):]}")
    print("accepted by send():")
    for outcome, count in sorted(delivered.items()):
        print(f"  {count:6d}  {outcome}")
    print(f"failures: {len(failures)}")
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
