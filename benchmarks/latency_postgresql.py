"""Pickup latency of the PostgreSQL queue: from commit to the SMTP server,
with a ``mailoutbox run URL --daemon`` woken by LISTEN/NOTIFY.

Usage::

    python benchmarks/latency_postgresql.py [--messages 100] [--spacing 0.25]
        [--interval 3] [--idle 10] [--via auto|delivery|sql] [--two-phase]
        [--only postgresql maildir idle]

Starts a durable PostgreSQL server (fsync on) in a temporary folder, creates
the queue's table, and an aiosmtpd server in its own process that prints
the time it received each message.  Then it commits ``--messages``
messages one at a time, ``--spacing`` seconds apart, each in its own
transaction, and prints the median and 95th percentile of the time from the
start of the commit to the end of DATA at the server (as
``benchmarks/latency.py`` does for the Maildir queue):

- ``postgresql``: ``mailoutbox run URL --daemon`` in its own process,
  LISTENing on the queue's channel.  The messages are committed through
  ``QueuedMailDelivery(url)`` (its own connection) when it accepts a URL
  (``--via delivery``), else (``--via sql``) by an INSERT and
  ``SELECT pg_notify(table, '')`` in one transaction of a psycopg
  connection -- what the delivery writes.  With ``--two-phase`` the
  server allows prepared transactions, and the delivery commits by
  two-phase commit (else as the last resource);
- ``maildir``: the same daemon draining a Maildir queue, through
  ``QueuedMailDelivery(path)``, for comparison;
- ``idle``: the CPU time the idle PostgreSQL daemon uses over ``--idle``
  seconds, as a share of one core.

``--interval`` is the daemon's polling interval: a message it was not
woken for waits up to that long.  Figures depend on the load of the machine.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _servers import postgresql_server  # noqa: E402
from latency import Recorder  # noqa: E402
from latency import daemon  # noqa: E402
from latency import measure  # noqa: E402
from latency import report  # noqa: E402
from latency import report_idle  # noqa: E402

TABLE = "mail_queue"


def delivery_takes_urls() -> bool:
    """Whether this mailoutbox's QueuedMailDelivery writes to PostgreSQL
    (it then has the ``connection`` argument of that mode)."""
    from mailoutbox.delivery import QueuedMailDelivery

    return "connection" in inspect.signature(QueuedMailDelivery).parameters


def measure_sql(url: str, recorder: Recorder, label: str, count: int,
                spacing: float) -> list[float]:
    """As :func:`latency.measure`, committing each message by an INSERT and
    a NOTIFY in one transaction of a connection of our own."""
    import psycopg
    from psycopg import sql

    insert = sql.SQL(
        "INSERT INTO {} (fromaddr, toaddrs, message, message_id)"
        " VALUES (%s, %s, %s, %s)").format(sql.Identifier(TABLE))
    latencies = []
    with psycopg.connect(url) as conn:
        for i in range(count):
            rcpt = f"{label}-{i}@example.org"
            message_id = f"<{label}-{i}@example.org>"
            conn.execute(insert, ("bench@example.org", [rcpt], (
                f"From: bench@example.org\r\nTo: {rcpt}\r\n"
                f"Message-Id: {message_id}\r\n"
                f"Subject: latency {i}\r\n\r\nBody\r\n").encode(), message_id))
            conn.execute("SELECT pg_notify(%s, '')", (TABLE,))
            started = time.time()
            conn.commit()
            latencies.append(recorder.wait(rcpt) - started)
            time.sleep(spacing)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--spacing", type=float, default=0.25)
    parser.add_argument("--interval", type=float, default=3.0)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--via", choices=["auto", "delivery", "sql"],
                        default="auto")
    parser.add_argument("--two-phase", action="store_true",
                        help="max_prepared_transactions = 10 on the server")
    parser.add_argument("--only", nargs="+", default=["postgresql", "maildir", "idle"],
                        choices=["postgresql", "maildir", "idle"])
    args = parser.parse_args()

    import psycopg

    from mailoutbox.maildir import Maildir
    from mailoutbox.postgresql.schema import init

    via = args.via
    if via == "auto":
        via = "delivery" if delivery_takes_urls() else "sql"
    print(f"{os.cpu_count()} CPUs, load average"
          f" {' '.join(f'{x:.2f}' for x in os.getloadavg())};"
          f" interval {args.interval} s, {args.messages} messages"
          f" {args.spacing} s apart; PostgreSQL messages committed via {via}"
          f"{' (two-phase commit allowed)' if args.two_phase else ''}", flush=True)
    settings = {"max_prepared_transactions": 10} if args.two_phase else None
    with postgresql_server(settings) as server, Recorder() as recorder, \
            tempfile.TemporaryDirectory() as tmp:
        url = f"{server.url}?table={TABLE}"
        with psycopg.connect(server.url) as conn:
            init(conn, TABLE)

        def commit(label: str, count: int, spacing: float) -> list[float]:
            if via == "delivery":
                return measure(url, recorder, label, count, spacing)
            return measure_sql(server.url, recorder, label, count, spacing)

        if "postgresql" in args.only or "idle" in args.only:
            with daemon(url, recorder.port, args.interval) as proc:
                # Its first pass, over an empty queue (not measured).
                commit("pg-warm-up", 1, 0.5)
                if "postgresql" in args.only:
                    report("pg", commit("pg", args.messages, args.spacing))
                if "idle" in args.only:
                    report_idle("pg daemon", proc.pid, args.idle)
        if "maildir" in args.only:
            queue = os.path.join(tmp, "maildir")
            Maildir(queue, create=True)
            with daemon(queue, recorder.port, args.interval):
                measure(queue, recorder, "md-warm-up", 1, 0.5)
                report("maildir", measure(queue, recorder, "md", args.messages,
                                          args.spacing))


if __name__ == "__main__":
    main()
