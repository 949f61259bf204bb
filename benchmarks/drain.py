"""Drain rates of mailoutbox next to zope.sendmail and raw smtplib.

Usage::

    python benchmarks/drain.py [--messages 2000] [--runs 3] [--only NAME ...]
        [--scenario smtp-sink aiosmtpd tls big direct] [--json FILE]

Starts its own servers on 127.0.0.1 (Postfix's smtp-sink, an aiosmtpd sink
in its own process, the same with STARTTLS behind a proxy adding 5 ms of
round-trip time), fills a queue with identical 2 KB messages for every
contender, and prints msg/s (the median of the runs) and the ratios the
project's targets are stated in.  Every queue is synced to disk
(``os.sync()``) before it is drained, for every contender: a real queue was
written minutes before it is drained, and unlinking files that are still
dirty in the page cache is far cheaper.  Only ratios from one run of this script are
meaningful: absolute rates depend on the machine's load.

zope.sendmail must be importable (``pip install zope.sendmail``).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _servers import aiosmtpd_sink  # noqa: E402
from _servers import delaying_proxy  # noqa: E402
from _servers import smtp_sink  # noqa: E402

BODY = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusm\r\n" * 28


def fill_queue(path: str, count: int, size_body: bytes = BODY) -> None:
    """Write *count* queue files in the format both libraries read."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    now = int(time.time())
    for i in range(count):
        data = (
            b"X-Zope-From: bench@example.org\n"
            b"X-Zope-To: rcpt%d@example.org\n" % i
            + b"From: bench@example.org\r\nTo: rcpt%d@example.org\r\n" % i
            + b"Subject: benchmark %d\r\nMessage-Id: <%d.bench@example.org>\r\n\r\n"
            % (i, i)
            + size_body
        )
        name = f"{now:d}.M{i:06d}P1Q{i:d}.bench"
        with open(os.path.join(path, "new", name), "wb") as f:
            f.write(data)


def left_in_queue(path: str) -> int:
    return sum(
        1
        for sub in ("new", "cur")
        for name in os.listdir(os.path.join(path, sub))
        if not name.startswith(".")
    )


# -- contenders ---------------------------------------------------------------


def drain_zope(path: str, port: int, tls: bool) -> None:
    from zope.sendmail.mailer import SMTPMailer
    from zope.sendmail.queue import QueueProcessorThread

    processor = QueueProcessorThread()
    processor.setMailer(SMTPMailer("127.0.0.1", port, no_tls=not tls))
    processor.setQueuePath(path)
    processor.run(forever=False)


def drain_raw(path: str, port: int, tls: bool) -> None:
    """smtplib over one reused connection, reading and unlinking files."""
    from mailoutbox.envelope import parse_queue_file

    connection = smtplib.SMTP("127.0.0.1", port)
    if tls:
        import ssl

        connection.starttls(context=ssl._create_unverified_context())  # noqa: S323
    new = os.path.join(path, "new")
    for name in sorted(os.listdir(new)):
        filename = os.path.join(new, name)
        with open(filename, "rb") as f:
            fromaddr, toaddrs, message = parse_queue_file(f.read())
        connection.sendmail(fromaddr, toaddrs, message)
        os.unlink(filename)
    connection.quit()


def drain_mailoutbox(concurrency: int, ca_file: str | None = None):
    def drain(path: str, port: int, tls: bool) -> None:
        from mailoutbox.mailer import SMTPMailer
        from mailoutbox.queue import QueueProcessorThread

        mailer = SMTPMailer("127.0.0.1", port, no_tls=not tls, ca_file=ca_file)
        processor = QueueProcessorThread(concurrency=concurrency)
        processor.setMailer(mailer)
        processor.setQueuePath(path)
        processor.run(forever=False)

    return drain


def measure(drain, port: int, count: int, runs: int, tls: bool = False) -> float:
    rates = []
    for _ in range(runs):
        path = tempfile.mkdtemp(prefix="mailoutbox-bench-")
        try:
            fill_queue(path, count)
            os.sync()  # a real queue is on disk, not dirty in the page cache
            start = time.perf_counter()
            drain(path, port, tls)
            elapsed = time.perf_counter() - start
            left = left_in_queue(path)
            if left:
                raise RuntimeError(f"{drain} left {left} messages in the queue")
            rates.append(count / elapsed)
        finally:
            shutil.rmtree(path, ignore_errors=True)
    return statistics.median(rates)


# -- scenarios ----------------------------------------------------------------


def scenario_smtp_sink(args, results):
    with smtp_sink() as port:
        for name, drain in contenders(args):
            results[("smtp-sink", name)] = measure(
                drain, port, args.messages, args.runs
            )


def scenario_aiosmtpd(args, results):
    with aiosmtpd_sink() as port:
        for name, drain in contenders(args):
            results[("aiosmtpd", name)] = measure(drain, port, args.messages, args.runs)


def scenario_tls_rtt(args, results):
    sys.path.insert(0, os.path.join(HERE, ".."))
    from tests.certs import make_certificates

    certs_dir = tempfile.mkdtemp(prefix="mailoutbox-certs-")
    certs = make_certificates(certs_dir)
    count = args.tls_messages
    try:
        with aiosmtpd_sink(certs_dir) as port, delaying_proxy(port, 0.0025) as proxy:
            for name, drain in contenders(args, ca_file=certs.ca_file):
                results[("STARTTLS +5ms RTT", name)] = measure(
                    drain, proxy, count, args.runs, tls=True
                )
    finally:
        shutil.rmtree(certs_dir, ignore_errors=True)


def contenders(args, ca_file=None):
    chosen = [
        ("zope.sendmail", drain_zope),
        ("raw smtplib (1 connection)", drain_raw),
    ] + [
        (f"mailoutbox c={c}", drain_mailoutbox(c, ca_file))
        for c in args.concurrency
    ]
    return [
        (n, d) for n, d in chosen if not args.only or any(o in n for o in args.only)
    ]


def _direct_rate(delivery, manager, count: int) -> float:
    message = (
        b"From: bench@example.org\r\nTo: rcpt@example.org\r\n"
        b"Subject: direct\r\n\r\n" + BODY
    )
    start = time.perf_counter()
    for i in range(count):
        with manager:
            delivery.send("bench@example.org", [f"rcpt{i}@example.org"], message)
    return count / (time.perf_counter() - start)


def scenario_direct(args, results):
    """Direct delivery: one message per transaction, sent at commit."""
    import transaction
    from zope.sendmail.delivery import DirectMailDelivery as ZopeDirect
    from zope.sendmail.mailer import SMTPMailer as ZopeMailer

    from mailoutbox.delivery import DirectMailDelivery
    from mailoutbox.mailer import SMTPMailer

    count = args.direct_messages
    with smtp_sink() as port:
        contenders = [
            ("zope.sendmail", lambda: ZopeDirect(ZopeMailer("127.0.0.1", port))),
            ("mailoutbox", lambda: DirectMailDelivery(SMTPMailer("127.0.0.1", port))),
        ]
        for name, make in contenders:
            rates = []
            for _ in range(args.runs):
                delivery = make()
                rates.append(_direct_rate(delivery, transaction.manager, count))
            results[("direct (smtp-sink)", name)] = statistics.median(rates)


def scenario_big_queue(args, results):
    """Per-message time and peak RSS for growing queues, in a subprocess."""
    with smtp_sink() as port:
        for count in args.big:
            out = subprocess.run(
                [sys.executable, __file__, "--_child-big", str(count), str(port)],
                check=True, capture_output=True, text=True,
            ).stdout.split()
            rate, rss_mb = float(out[0]), float(out[1])
            results[("big queue", f"{count} msgs: us/msg")] = 1e6 / rate
            results[("big queue", f"{count} msgs: peak RSS MB")] = rss_mb


def child_big(count: int, port: int) -> None:
    path = tempfile.mkdtemp(prefix="mailoutbox-big-")
    try:
        fill_queue(path, count, b"small body\r\n")
        os.sync()
        start = time.perf_counter()
        drain_mailoutbox(4)(path, port, False)
        elapsed = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(count / elapsed, rss)
    finally:
        shutil.rmtree(path, ignore_errors=True)


SCENARIOS = {
    "smtp-sink": scenario_smtp_sink,
    "aiosmtpd": scenario_aiosmtpd,
    "tls": scenario_tls_rtt,
    "big": scenario_big_queue,
    "direct": scenario_direct,
}


def print_table(results) -> None:
    print(f"{'server':<20} {'contender':<30} {'value':>12}")
    for (server, name), value in results.items():
        print(f"{server:<20} {name:<30} {value:>12.1f}")
    print()
    for server in sorted({s for s, _ in results}):
        zope = results.get((server, "zope.sendmail"))
        raw = results.get((server, "raw smtplib (1 connection)"))
        for (s, name), value in results.items():
            if s != server or not name.startswith("mailoutbox"):
                continue
            parts = []
            if zope:
                parts.append(f"{value / zope:.2f}x zope.sendmail")
            if raw:
                parts.append(f"{value / raw:.2f}x raw smtplib")
            print(f"{server:<20} {name:<30} {', '.join(parts)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--tls-messages", type=int, default=300)
    parser.add_argument("--direct-messages", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--big", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--scenario", nargs="+", choices=sorted(SCENARIOS),
                        default=["smtp-sink", "aiosmtpd", "tls", "direct"])
    parser.add_argument("--only", nargs="+", help="contenders whose name contains")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results to FILE (for plot.py)")
    parser.add_argument("--_child-big", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child_big:
        child_big(*args._child_big)
        return 0
    results: dict = {}
    for name in args.scenario:
        SCENARIOS[name](args, results)
    print_table(results)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump([[s, n, v] for (s, n), v in results.items()], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
