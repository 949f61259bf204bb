"""Drain rates of the PostgreSQL queue next to the Maildir queue, from
several ``mailoutbox run`` processes at once.

Usage::

    python benchmarks/drain_postgresql.py [--scenario sink tls big]
        [--messages 2000] [--processes 1 2 4] [--runs 3]
        [--tls-messages 300] [--tls-concurrency 1]
        [--rows 20000] [--slice N] [--big-processes 1]

Starts its own servers on 127.0.0.1: a durable PostgreSQL (``fsync``,
``synchronous_commit`` and ``full_page_writes`` on, as in production) in a
temporary folder, Postfix's ``smtp-sink``, and an aiosmtpd sink with
STARTTLS behind a proxy adding 5 ms of round-trip time.  Scenarios:

``sink``
    The same ``--messages`` 2 KB messages, queued in a PostgreSQL table
    (plain INSERTs in one transaction) and in a Maildir, drained into
    smtp-sink by 1, 2 and 4 processes of ``mailoutbox run QUEUE`` (one
    pass each, default ``--concurrency``) in parallel until the queue is
    empty: msg/s (median of ``--runs``) and the ratio PostgreSQL/Maildir.
``tls``
    The same against the STARTTLS relay 5 ms away, each process with
    ``--concurrency`` ``--tls-concurrency``: the rate of 4 processes over
    that of 1 (scaling out: more processors, on one or many hosts).
``big``
    A ``--rows`` PostgreSQL queue drained by ``--big-processes``
    processes: the time per message over successive slices of
    ``--slice`` messages (default a tenth of the queue), which should stay
    flat from the first slice to the last.

Every queue is on disk before it is drained, for both stores: the Maildir
and the database are synced (``CHECKPOINT``, ``os.sync()``), and the table
is vacuumed and analysed, as autovacuum does within a minute of the
INSERTs.  The processes import mailoutbox before the clock starts (they
wait for a go on stdin), so interpreter start-up is not counted; each
reports how many messages it sent, and the benchmark checks that no
message was sent twice and none is left.  Only ratios from one run are
meaningful: absolute rates depend on the machine and its load (the
database server and the SMTP sink run on the same cores).

psycopg 3 must be installed (``pip install 'mailoutbox[postgresql]'``),
and PostgreSQL's server programs (Debian's ``postgresql`` package).
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _servers import aiosmtpd_sink  # noqa: E402
from _servers import delaying_proxy  # noqa: E402
from _servers import postgresql_server  # noqa: E402
from _servers import server_cpu  # noqa: E402
from _servers import smtp_sink  # noqa: E402

BODY = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusm\r\n" * 28
FROM = "bench@example.org"


def messages(count: int, body: bytes = BODY):
    """(fromaddr, toaddrs, message) of *count* distinct messages."""
    for i in range(count):
        to = f"rcpt{i}@example.org"
        yield FROM, [to], (
            f"From: {FROM}\r\nTo: {to}\r\nSubject: benchmark {i}\r\n"
            f"Message-Id: <{i}.bench@example.org>\r\n\r\n").encode() + body


# -- the two queues -------------------------------------------------------------


class MaildirQueue:
    name = "Maildir"

    def __init__(self, root: str) -> None:
        self.root = root
        self.runs = 0

    def fill(self, count: int, body: bytes = BODY) -> str:
        self.runs += 1
        path = os.path.join(self.root, f"queue{self.runs}")
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path, sub))
        now = int(time.time())
        for i, (fromaddr, toaddrs, message) in enumerate(messages(count, body)):
            with open(os.path.join(path, "new", f"{now}.M{i:06d}P1Q{i}.bench"),
                      "wb") as f:
                f.write(b"X-Zope-From: %s\nX-Zope-To: %s\n%s" % (
                    fromaddr.encode(), ", ".join(toaddrs).encode(), message))
        os.sync()  # a real queue is on disk, not dirty in the page cache
        return path

    def left(self, queue: str) -> int:
        return sum(len([n for n in os.listdir(os.path.join(queue, sub))
                        if not n.startswith(".")]) for sub in ("new", "cur"))

    def drop(self, queue: str) -> None:
        shutil.rmtree(queue, ignore_errors=True)

    def server_cpu(self) -> float:
        return 0.0


class PostgreSQLQueue:
    name = "PostgreSQL"

    def __init__(self, server) -> None:
        import psycopg

        self.server = server
        self.url = server.url
        self.conn = psycopg.connect(self.url, autocommit=True)
        self.runs = 0

    def fill(self, count: int, body: bytes = BODY) -> str:
        from mailoutbox.postgresql.schema import init

        self.runs += 1
        table = f"bench_queue{self.runs}"
        init(self.conn, table)
        rows = [(f, t, m, f"<{i}.bench@example.org>")
                for i, (f, t, m) in enumerate(messages(count, body))]
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.executemany(self._sql(
                "INSERT INTO {} (fromaddr, toaddrs, message, message_id)"
                " VALUES (%s, %s, %s, %s)", table), rows)
        # What autovacuum does within a minute of the INSERTs, and on disk.
        self.conn.execute(self._sql("VACUUM ANALYZE {}", table))
        self.conn.execute("CHECKPOINT")
        os.sync()
        return f"{self.url}?table={table}"

    @staticmethod
    def _sql(query: str, *tables: str):
        from psycopg import sql

        return sql.SQL(query).format(*map(sql.Identifier, tables))

    def _table(self, queue: str) -> str:
        return queue.rsplit("table=", 1)[1]

    def left(self, queue: str) -> int:
        return self.conn.execute(self._sql(
            "SELECT count(*) FROM {}", self._table(queue))).fetchone()[0]

    def drop(self, queue: str) -> None:
        table = self._table(queue)
        self.conn.execute(self._sql("DROP TABLE {}, {}", table, table + "_schema"))

    def server_cpu(self) -> float:
        return server_cpu(self.server)

    def close(self) -> None:
        self.conn.close()


# -- the processes ---------------------------------------------------------------


class Drain:
    """*processes* ``mailoutbox run QUEUE`` processes, started and waiting
    for the go; :meth:`run` gives it and waits for them all."""

    def __init__(self, queue: str, processes: int, run_args: list[str],
                 tick: int = 0) -> None:
        argv = [sys.executable, __file__, "--_child", str(tick), "--", queue,
                *run_args]
        self.procs = [subprocess.Popen(argv, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
                      for _ in range(processes)]
        self.ticks: list[float] = []
        self.sent: list[int] = []
        self.cpu = 0.0  # CPU seconds of the processes after the go
        self.db_cpu = 0.0  # and of the database server meanwhile
        for proc in self.procs:
            if proc.stdout.readline().strip() != "ready":
                self.kill()
                raise RuntimeError("a processor process did not start")

    def _read(self, proc: subprocess.Popen, out: list[str]) -> None:
        out.extend(proc.stdout)

    def run(self, timeout: float = 1800.0) -> float:
        """Seconds from the go to the end of the last process."""
        outputs: list[list[str]] = [[] for _ in self.procs]
        readers = [threading.Thread(target=self._read, args=(p, o), daemon=True)
                   for p, o in zip(self.procs, outputs, strict=True)]
        for reader in readers:
            reader.start()
        started = time.monotonic()
        for proc in self.procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        try:
            for proc in self.procs:
                proc.wait(timeout)
        except BaseException:
            self.kill()
            raise
        elapsed = time.monotonic() - started
        for reader in readers:
            reader.join(10)
        for proc, lines in zip(self.procs, outputs, strict=True):
            if proc.returncode:
                raise RuntimeError(f"a processor exited with {proc.returncode}")
            for line in lines:
                if line.startswith("tick "):
                    self.ticks.append(float(line.split()[1]) - started)
                elif line.startswith("sent "):
                    self.sent.append(int(line.split()[1].rstrip(",")))
                elif line.startswith("cpu "):
                    self.cpu += float(line.split()[1])
        self.ticks.sort()
        return elapsed

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def child(tick: int, run_args: list[str]) -> int:
    """A ``mailoutbox run`` process whose imports are done before the go;
    with *tick*, it prints the monotonic time after every *tick* messages
    sent."""
    import psycopg  # noqa: F401
    import zope.event

    import mailoutbox.cli.run
    import mailoutbox.maildir
    import mailoutbox.postgresql.store  # noqa: F401
    from mailoutbox.cli import main
    from mailoutbox.interfaces import IMailSentEvent

    if tick:
        lock, count = threading.Lock(), [0]

        def on_event(event: object) -> None:
            if IMailSentEvent.providedBy(event):
                with lock:
                    count[0] += 1
                    if count[0] % tick == 0:
                        print(f"tick {time.monotonic():.6f}", flush=True)

        zope.event.subscribers.append(on_event)
    print("ready", flush=True)
    sys.stdin.readline()
    before = resource.getrusage(resource.RUSAGE_SELF)
    status = main(["run", *run_args])
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(f"cpu {after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}",
          flush=True)
    return status


def drain(store, port: int, count: int, processes: int, run_args: list[str],
          body: bytes = BODY, tick: int = 0) -> tuple[float, Drain]:
    """Fill *store* with *count* messages and drain them; msg/s."""
    queue = store.fill(count, body)
    try:
        runner = Drain(queue, processes, [
            "--hostname", "127.0.0.1", "--port", str(port), *run_args], tick)
        db_before = store.server_cpu()
        elapsed = runner.run()
        time.sleep(0.3)  # the backends of the processes end
        runner.db_cpu = store.server_cpu() - db_before
        left = store.left(queue)
        if left or sum(runner.sent) != count:
            raise RuntimeError(
                f"{store.name}, {processes} processes: {left} messages left,"
                f" {sum(runner.sent)} sent of {count}")
        return count / elapsed, runner
    finally:
        store.drop(queue)


def shares(runner: Drain) -> str:
    return "+".join(str(n) for n in sorted(runner.sent, reverse=True))


# -- scenarios ---------------------------------------------------------------------


def compare(stores, port: int, count: int, args, run_args: list[str],
            processes: list[int]):
    """The median rate (msg/s) and CPU time per message (ms, of the
    processes and of the database server) of each store and number of
    processes; the runs of the two stores alternate, so that a change of
    load hits both."""
    rates: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    for n in processes:
        for _ in range(args.runs):
            for store in stores:
                rate, runner = drain(store, port, count, n, run_args)
                ms = (runner.cpu + runner.db_cpu) / count * 1000
                rates.setdefault((store.name, n), []).append(rate)
                cpu.setdefault((store.name, n), []).append(ms)
                print(f"  {store.name:<10} {n} process(es): {rate:7.0f} msg/s,"
                      f" CPU {runner.cpu / count * 1000:.2f} ms/msg processes"
                      f" + {runner.db_cpu / count * 1000:.2f} database"
                      f" (sent {shares(runner)})", flush=True)
    return ({k: statistics.median(v) for k, v in rates.items()},
            {k: statistics.median(v) for k, v in cpu.items()})


def scenario_sink(args, stores) -> None:
    print(f"\n== smtp-sink: {args.messages} messages of 2 KB, default"
          f" --concurrency, median of {args.runs} runs", flush=True)
    with smtp_sink() as port:
        rates, cpu = compare(stores, port, args.messages, args, ["--no-tls"],
                             args.processes)
    print(f"\n{'':9} {'msg/s':^33} {'CPU ms/msg (with the database)':^32}")
    print(f"{'processes':>9} {'Maildir':>9} {'PostgreSQL':>11} {'PG/Maildir':>11}"
          f" {'Maildir':>9} {'PostgreSQL':>11} {'PG/Maildir':>11}")
    for n in args.processes:
        md, pg = rates[("Maildir", n)], rates[("PostgreSQL", n)]
        mdc, pgc = cpu[("Maildir", n)], cpu[("PostgreSQL", n)]
        print(f"{n:>9} {md:>9.0f} {pg:>11.0f} {pg / md:>10.2f}x"
              f" {mdc:>9.2f} {pgc:>11.2f} {pgc / mdc:>10.2f}x")


def scenario_tls(args, stores) -> None:
    from tests.certs import make_certificates

    processes = sorted({1, max(args.processes)})
    print(f"\n== STARTTLS relay 5 ms away (aiosmtpd): {args.tls_messages}"
          f" messages, --concurrency {args.tls_concurrency} per process,"
          f" median of {args.runs} runs", flush=True)
    certs_dir = tempfile.mkdtemp(prefix="mailoutbox-certs-")
    try:
        certs = make_certificates(certs_dir)
        with aiosmtpd_sink(certs_dir) as port, delaying_proxy(port, 0.0025) as proxy:
            rates, _ = compare(stores, proxy, args.tls_messages, args, [
                "--force-tls", "--ca-file", certs.ca_file,
                "--concurrency", str(args.tls_concurrency)], processes)
    finally:
        shutil.rmtree(certs_dir, ignore_errors=True)
    top = processes[-1]
    print(f"\n{'store':<11} {'1 process':>10} {f'{top} processes':>12} {'ratio':>7}")
    for store in stores:
        one, many = rates[(store.name, 1)], rates[(store.name, top)]
        print(f"{store.name:<11} {one:>10.0f} {many:>12.0f} {many / one:>6.2f}x")


def scenario_big(args, stores) -> None:
    store = next(s for s in stores if s.name == "PostgreSQL")
    size = args.slice or max(args.rows // 10, 1)
    tick = math.gcd(size, 100)  # a divisor of the slice
    print(f"\n== a {args.rows}-row PostgreSQL queue, {args.big_processes}"
          f" process(es), small messages, slices of {size}", flush=True)
    with smtp_sink() as port:
        rate, runner = drain(store, port, args.rows, args.big_processes,
                             ["--no-tls"], b"small body\r\n", tick)
    # The time at which each slice boundary was passed (every process
    # reports every *tick* messages it sent).
    times = [0.0] + [t for i, t in enumerate(runner.ticks, 1)
                     if (i * tick) % size == 0]
    per_message = [(b - a) / size * 1e6 for a, b in itertools.pairwise(times)]
    print(f"overall {rate:.0f} msg/s; microseconds per message in each slice:")
    for i, us in enumerate(per_message):
        print(f"  messages {i * size:>7}-{(i + 1) * size:<7} {us:8.0f} us")
    if len(per_message) > 1:
        print(f"last slice / first slice: {per_message[-1] / per_message[0]:.2f};"
              f" max / median: {max(per_message) / statistics.median(per_message):.2f}")


SCENARIOS = {"sink": scenario_sink, "tls": scenario_tls, "big": scenario_big}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", nargs="+", choices=list(SCENARIOS),
                        default=list(SCENARIOS))
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tls-messages", type=int, default=300)
    parser.add_argument("--tls-concurrency", type=int, default=1)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--slice", type=int, default=0)
    parser.add_argument("--big-processes", type=int, default=1)
    parser.add_argument("--_child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("run_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child is not None:
        return child(args._child, args.run_args)
    sys.path.insert(0, os.path.join(HERE, ".."))  # tests.certs
    print(f"{os.cpu_count()} CPUs, load average"
          f" {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    started = time.monotonic()
    with postgresql_server() as server, tempfile.TemporaryDirectory() as tmp:
        stores = [MaildirQueue(tmp), PostgreSQLQueue(server)]
        try:
            for name in args.scenario:
                SCENARIOS[name](args, stores)
        finally:
            stores[1].close()
    print(f"\n({time.monotonic() - started:.0f} s; load average now"
          f" {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
