"""Enqueue rate of QueuedMailDelivery next to the raw cost of a durable write.

Usage::

    python benchmarks/enqueue.py [--messages 2000] [--runs 3] [--dir PATH]

Each message (2 KB) is sent in a transaction of its own through
:class:`mailoutbox.delivery.QueuedMailDelivery` and a real transaction
manager, so each commit writes, fsyncs and renames one file and fsyncs
``new/``.  The "raw" contender does exactly those system calls and nothing
else: open in ``tmp/``, write, fsync, close, rename into ``new/``, fsync
``new/``.  Their ratio is what the transaction machinery, the checks of
``send()`` and the queue protocol cost on top of the disk.

The queue is made in a temporary folder under ``--dir`` (default: the
current working folder), which must be on a real disk: on tmpfs, fsync does
nothing and the figures mean nothing (the script says so).  Rates are the
median of ``--runs`` runs; only ratios from one run of this script are
meaningful, since absolute rates depend on the disk and the machine's load.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

BODY = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusm\r\n" * 28


def make_message(n: int) -> bytes:
    return (b"From: bench@example.org\r\nTo: rcpt@example.org\r\n"
            b"Subject: benchmark %d\r\n\r\n" % n) + BODY


def filesystem_type(path: str) -> str:
    """The type of the file system holding *path* (from /proc/self/mounts)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) > len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def run_mailoutbox(folder: str, count: int) -> float:
    """Messages per second, one transaction each."""
    import transaction

    from mailoutbox.delivery import QueuedMailDelivery

    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(os.path.join(folder, "queue"), manager)
    messages = [make_message(n) for n in range(count)]
    start = time.perf_counter()
    for data in messages:
        delivery.send("bench@example.org", ["rcpt@example.org"], data)
        manager.commit()
    elapsed = time.perf_counter() - start
    assert len(os.listdir(os.path.join(folder, "queue", "new"))) == count
    return count / elapsed


def run_raw(folder: str, count: int) -> float:
    """Messages per second for write + fsync + rename + fsync(new/)."""
    tmp, new = os.path.join(folder, "raw", "tmp"), os.path.join(folder, "raw", "new")
    os.makedirs(tmp)
    os.makedirs(new)
    envelope = b"X-Zope-From: bench@example.org\nX-Zope-To: rcpt@example.org\n"
    messages = [envelope + b"Message-Id: <%d@bench>\r\n" % n + make_message(n)
                for n in range(count)]
    start = time.perf_counter()
    for n, data in enumerate(messages):
        name = f"{n}.bench"
        fd = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(os.path.join(tmp, name), os.path.join(new, name))
        dir_fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    elapsed = time.perf_counter() - start
    return count / elapsed


CONTENDERS = {"mailoutbox": run_mailoutbox, "raw": run_raw}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000,
                        help="messages per run (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3,
                        help="runs per contender; the median is shown"
                             " (default: %(default)s)")
    parser.add_argument("--dir", default=os.getcwd(),
                        help="folder on the disk to measure, not tmpfs"
                             " (default: the current folder)")
    return parser


def output(line: str = "") -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kind = filesystem_type(args.dir)
    output(f"{args.messages} messages of {len(make_message(0))} bytes, one"
           f" transaction each, {args.runs} run(s), in {args.dir} ({kind})")
    if kind in ("tmpfs", "ramfs"):
        output("warning: fsync does nothing on tmpfs; use --dir on a real disk")
    rates: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for run in range(args.runs):
        # Interleaved, in alternating order, each starting after the disk
        # has written out everything pending (such as the last clean-up).
        order = list(CONTENDERS.items())
        for name, contender in order if run % 2 == 0 else reversed(order):
            folder = tempfile.mkdtemp(prefix=".enqueue-bench-", dir=args.dir)
            try:
                os.sync()
                rates[name].append(contender(folder, args.messages))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    output()
    output(f"{'contender':<12} {'msg/s (median)':>15} {'runs':>30}")
    for name, values in rates.items():
        runs = " ".join(f"{v:.0f}" for v in values)
        output(f"{name:<12} {medians[name]:>15.0f} {runs:>30}")
    output()
    output(f"ratio mailoutbox / raw: {medians['mailoutbox'] / medians['raw']:.2f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
