"""What queueing into PostgreSQL adds to a transaction, next to the Maildir.

Usage::

    python benchmarks/enqueue_postgresql.py [--messages 1000] [--runs 3] [--dir PATH]

Two throwaway PostgreSQL servers (``fsync=on``, data under ``--dir``, which
must be on a real disk) are started: one allowing prepared transactions,
one not.  Each contender runs ``--messages`` transactions of its own, one
message (2 KB) each, through a real ``transaction`` manager:

- ``app insert``: a business INSERT in the application's SQLAlchemy
  session (joined by zope.sqlalchemy), and nothing else;
- ``app insert+send``: the same INSERT plus ``send()`` through
  ``QueuedMailDelivery(url, connection=lambda: session)``: the row is
  written through the session, in the same database transaction;
- ``own 2PC``: ``send()`` alone, queued on the delivery's own connection
  with two-phase commit (``PREPARE TRANSACTION``/``COMMIT PREPARED``);
- ``own last resource``: the same on the server without prepared
  transactions (one commit in the vote);
- ``maildir``: ``send()`` alone into a Maildir queue under ``--dir``.

The two ``app`` contenders run interleaved, in blocks of 20 transactions.
It prints the median time per transaction, what ``send()`` adds to the
application's transaction (goal: 0.5 ms or less) and the ratios of the
own-connection modes to the Maildir.  Only the ratios of one run of this
script mean something: absolute times depend on the disk and the load.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import enqueue
from enqueue import filesystem_type
from enqueue import make_message
from enqueue import output


def _queue(server, table: str) -> str:
    import psycopg

    from mailoutbox.postgresql import schema
    with psycopg.connect(server.url) as conn:
        schema.init(conn, table)
    return f"{server.url}?table={table}"


def run_app(server, folder: str, count: int) -> tuple[list[float], list[float]]:
    """Per-transaction seconds of the business INSERT alone and of the
    INSERT plus ``send()``, interleaved in blocks of 20 transactions so
    that both see the same load."""
    import sqlalchemy
    import transaction
    from sqlalchemy.orm import Session
    from zope.sqlalchemy import mark_changed
    from zope.sqlalchemy import register

    from mailoutbox.delivery import QueuedMailDelivery
    engine = sqlalchemy.create_engine(
        server.url.replace("postgresql://", "postgresql+psycopg://"))
    table = "bench_" + os.path.basename(folder).replace("-", "_").replace(".", "")
    url = _queue(server, table)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE {table}_orders"
                             " (id serial PRIMARY KEY, email text)")
    manager = transaction.TransactionManager()
    session = Session(bind=engine)
    register(session, transaction_manager=manager)
    delivery = QueuedMailDelivery(url, manager, connection=lambda: session)
    insert = f"INSERT INTO {table}_orders (email) VALUES (%s)"  # noqa: S608
    data = make_message(0)

    def business() -> None:
        session.connection().exec_driver_sql(insert, ("rcpt@example.org",))
        mark_changed(session)  # as the ORM's flush does

    alone: list[float] = []
    with_send: list[float] = []
    for block in range(-1, count // 20):
        for timings, send in ((alone, False), (with_send, True))[::1 - 2 * (block % 2)]:
            for _n in range(20):
                start = time.perf_counter()
                with manager:
                    business()
                    if send:
                        delivery.send("bench@example.org", ["rcpt@example.org"], data)
                if block >= 0:  # block -1 warms up: connections, statements
                    timings.append(time.perf_counter() - start)
    session.close()
    engine.dispose()
    return alone, with_send


def own_contender(server):
    def run(folder: str, count: int) -> list[float]:
        import transaction

        from mailoutbox.delivery import QueuedMailDelivery
        table = "bench_" + os.path.basename(folder).replace("-", "_").replace(".", "")
        url = _queue(server, table)
        manager = transaction.TransactionManager()
        delivery = QueuedMailDelivery(url, manager)
        messages = [make_message(n) for n in range(count)]
        with manager:
            delivery.send("bench@example.org", ["rcpt@example.org"], messages[0])
        timings = timed_sends(delivery, manager, messages)
        delivery.postgresql.close()
        return timings
    return run


def maildir_contender(folder: str, count: int) -> list[float]:
    import transaction

    from mailoutbox.delivery import QueuedMailDelivery
    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(os.path.join(folder, "queue"), manager)
    messages = [make_message(n) for n in range(count)]
    return timed_sends(delivery, manager, messages)


def timed_sends(delivery, manager, messages: list[bytes]) -> list[float]:
    """Seconds of each transaction that sends one of *messages*."""
    timings = []
    for data in messages:
        start = time.perf_counter()
        delivery.send("bench@example.org", ["rcpt@example.org"], data)
        manager.commit()
        timings.append(time.perf_counter() - start)
    return timings


def build_parser() -> argparse.ArgumentParser:
    parser = enqueue.build_parser()
    parser.description = __doc__.splitlines()[0]
    parser.set_defaults(messages=1000)  # each in a transaction of its own
    return parser


def main(argv: list[str] | None = None) -> int:
    from mailoutbox.testing.postgresql import PostgreSQLServer
    args = build_parser().parse_args(argv)
    kind = filesystem_type(args.dir)
    output(f"{args.messages} transactions of one {len(make_message(0))}-byte"
           f" message, {args.runs} run(s), in {args.dir} ({kind}), fsync on")
    if kind in ("tmpfs", "ramfs"):
        output("warning: fsync does nothing on tmpfs; use --dir on a real disk")
    saved = tempfile.tempdir
    tempfile.tempdir = args.dir  # the servers' data folders
    try:
        with PostgreSQLServer({"max_prepared_transactions": 10}) as two, \
                PostgreSQLServer({"max_prepared_transactions": 0}) as one:
            tempfile.tempdir = saved
            contenders = {
                "own 2PC": own_contender(two),
                "own last resource": own_contender(one),
                "maildir": maildir_contender,
            }
            times: dict[str, list[float]] = {"app insert": [], "app insert+send": []}
            pooled: dict[str, list[float]] = {"app insert": [], "app insert+send": []}
            times.update({name: [] for name in contenders})
            for run in range(args.runs):
                folder = tempfile.mkdtemp(prefix=".enqueue-pg-", dir=args.dir)
                alone, with_send = run_app(two, folder, args.messages)
                shutil.rmtree(folder, ignore_errors=True)
                times["app insert"].append(statistics.median(alone))
                times["app insert+send"].append(statistics.median(with_send))
                pooled["app insert"].extend(alone)
                pooled["app insert+send"].extend(with_send)
                order = list(contenders.items())
                for name, contender in order if run % 2 == 0 else reversed(order):
                    folder = tempfile.mkdtemp(prefix=".enqueue-pg-", dir=args.dir)
                    try:
                        os.sync()
                        times[name].append(statistics.median(
                            contender(folder, args.messages)))
                    finally:
                        shutil.rmtree(folder, ignore_errors=True)
    finally:
        tempfile.tempdir = saved
    ms = {name: statistics.median(values) * 1000 for name, values in times.items()}
    output()
    output("median time of one transaction, in ms (median of the runs' medians)")
    output(f"{'contender':<18} {'ms/txn':>8} {'runs':>26}")
    for name, values in times.items():
        runs = " ".join(f"{v * 1000:.3f}" for v in values)
        output(f"{name:<18} {ms[name]:>8.3f} {runs:>26}")
    output()
    # The two app contenders ran interleaved: compare their medians over
    # every transaction, and run by run.
    alone = statistics.median(pooled["app insert"]) * 1000
    added = statistics.median(pooled["app insert+send"]) * 1000 - alone
    per_run = [b - a for a, b in zip(times["app insert"], times["app insert+send"],
                                     strict=True)]
    output(f"send() adds to the application's transaction: {added:.3f} ms"
           f" ({(alone + added) / alone:.2f}x the INSERT alone, medians of all"
           f" {len(pooled['app insert'])} transactions; run by run: "
           + " ".join(f"{d * 1000:.3f}" for d in per_run) + "; goal: <= 0.5 ms)")
    for name, other in [("own 2PC", "maildir"), ("own last resource", "maildir"),
                        ("own 2PC", "own last resource")]:
        output(f"{name} / {other}: {ms[name] / ms[other]:.2f}x the time")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
