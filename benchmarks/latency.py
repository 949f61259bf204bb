"""Pickup latency: from commit to the SMTP server, and the idle daemon's CPU.

Usage::

    python benchmarks/latency.py [--messages 100] [--spacing 0.25]
        [--idle 20] [--interval 3] [--only thread daemon idle] [--poll-only]

Starts an aiosmtpd server in its own process that prints the time it
received each message.  Then, for each contender, commits ``--messages``
messages one at a time, ``--spacing`` seconds apart (each in its own
transaction, through a real :class:`~mailoutbox.delivery.QueuedMailDelivery`),
and prints the median and 95th percentile of the time from the start of
``commit()`` to the end of DATA at the server:

- ``thread``: a processor thread in the committing process;
- ``daemon``: ``mailoutbox run --daemon`` in its own process.

``idle`` measures the CPU time the idle daemon uses over ``--idle``
seconds (from ``/proc/PID/stat``, all its threads), as a share of one core.
``--poll-only`` turns the wake-ups off in the committing process (the
thread then finds a message at its next poll, as before they existed;
the daemon is not affected).  Figures depend on the load of the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _servers import free_port  # noqa: E402
from _servers import wait_for_port  # noqa: E402


class Recorder:
    """The recording server, and the times it received each recipient."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: dict[str, float] = {}
        self.arrived = threading.Condition()

    def __enter__(self) -> Recorder:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_recording_server.py"),
             str(self.port)], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        wait_for_port(self.port)
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            when, rcpt = line.split()
            with self.arrived:
                self.received[rcpt] = float(when)
                self.arrived.notify_all()

    def wait(self, rcpt: str, timeout: float = 30.0) -> float:
        with self.arrived:
            if not self.arrived.wait_for(lambda: rcpt in self.received, timeout):
                raise TimeoutError(f"{rcpt} did not arrive within {timeout} s")
            return self.received[rcpt]

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def measure(queue: str, recorder: Recorder, label: str, count: int,
            spacing: float) -> list[float]:
    """Commit *count* messages, *spacing* seconds apart; the latency of
    each, in seconds."""
    import transaction

    from mailoutbox.delivery import QueuedMailDelivery

    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(queue, transaction_manager=manager)
    latencies = []
    for i in range(count):
        rcpt = f"{label}-{i}@example.org"
        manager.begin()
        delivery.send("bench@example.org", [rcpt], (
            f"From: bench@example.org\r\nTo: {rcpt}\r\n"
            f"Subject: latency {i}\r\n\r\nBody\r\n").encode())
        started = time.time()
        manager.commit()
        latencies.append(recorder.wait(rcpt) - started)
        time.sleep(spacing)
    return latencies


def report(name: str, latencies: list[float]) -> None:
    ms = sorted(x * 1000 for x in latencies)
    p95 = statistics.quantiles(ms, n=100, method="inclusive")[94]
    print(f"{name:8} n={len(ms)}  p50 {statistics.median(ms):7.1f} ms"
          f"  p95 {p95:7.1f} ms  max {ms[-1]:7.1f} ms", flush=True)


def report_idle(label: str, pid: int, seconds: float) -> None:
    """Print the share of a core the idle process *pid* uses over
    *seconds* (after a second to settle)."""
    time.sleep(1.0)
    before, started = cpu_ticks(pid), time.monotonic()
    time.sleep(seconds)
    used = (cpu_ticks(pid) - before) / os.sysconf("SC_CLK_TCK")
    share = used / (time.monotonic() - started) * 100
    print(f"idle     {label} CPU {share:.2f} % of a core over"
          f" {seconds:.0f} s ({used:.2f} s)", flush=True)


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (all threads)


@contextlib.contextmanager
def daemon(queue: str, port: int, interval: float):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailoutbox", "run", queue, "--daemon",
         "--hostname", "127.0.0.1", "--port", str(port), "--no-tls",
         "--interval", str(interval)])
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--spacing", type=float, default=0.25)
    parser.add_argument("--idle", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=3.0)
    parser.add_argument("--only", nargs="+", default=["thread", "daemon", "idle"],
                        choices=["thread", "daemon", "idle"])
    parser.add_argument("--poll-only", action="store_true")
    args = parser.parse_args()

    from mailoutbox import wakeup
    from mailoutbox.maildir import Maildir
    from mailoutbox.mailer import SMTPMailer
    from mailoutbox.queue import QueueProcessorThread

    if args.poll_only:
        wakeup.Wakeup.watcher_factory = None
        wakeup.committed = lambda path, names: None
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f};"
          f" interval {args.interval} s, {args.messages} messages"
          f" {args.spacing} s apart", flush=True)
    with Recorder() as recorder, tempfile.TemporaryDirectory() as tmp:
        if "thread" in args.only:
            queue = os.path.join(tmp, "thread")
            processor = QueueProcessorThread(args.interval)
            processor.setMailer(SMTPMailer("127.0.0.1", recorder.port,
                                           no_tls=True))
            processor.setQueuePath(queue)
            processor.start()
            try:
                report("thread", measure(queue, recorder, "thread",
                                         args.messages, args.spacing))
            finally:
                processor.stop(30)
        if "daemon" in args.only or "idle" in args.only:
            queue = os.path.join(tmp, "daemon")
            Maildir(queue, create=True)
            with daemon(queue, recorder.port, args.interval) as proc:
                # Its first pass, over an empty queue (not measured).
                measure(queue, recorder, "warm-up", 1, 0.5)
                if "daemon" in args.only:
                    report("daemon", measure(queue, recorder, "daemon",
                                             args.messages, args.spacing))
                if "idle" in args.only:
                    report_idle("daemon", proc.pid, args.idle)


if __name__ == "__main__":
    main()
