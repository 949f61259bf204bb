"""The processor's metrics: in-process numbers, prometheus_client, --metrics."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mailoutbox import metrics as metrics_module
from mailoutbox.cli import EXIT_ERROR
from mailoutbox.cli import EXIT_OK
from mailoutbox.cli import EXIT_USAGE
from mailoutbox.maildir import Entry
from mailoutbox.maildir import Maildir
from mailoutbox.maildir import Scan
from mailoutbox.mailer import SMTPMailer
from mailoutbox.metrics import Histogram
from mailoutbox.metrics import Metrics
from mailoutbox.metrics import collector
from mailoutbox.metrics import parse_address
from mailoutbox.metrics import queued_time
from mailoutbox.metrics import register
from mailoutbox.queue import QueueProcessorThread
from mailoutbox.relays import open_relay

from .smtpsink import free_port
from .test_cli import add_message
from .test_cli import cli
from .test_cli import write_ini
from .test_cli_run import wait_for


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """The samples of an exposition text, parsed by prometheus_client:
    ``{(name, sorted labels): value}``."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found[name, tuple(sorted(labels.items()))]


def make_processor(queue_path: str, server, **kw) -> QueueProcessorThread:
    processor = QueueProcessorThread(0.1, concurrency=2, **kw)
    processor.setMailer(SMTPMailer("127.0.0.1", server.port, timeout=10))
    processor.setQueuePath(queue_path)
    return processor


@pytest.fixture
def processor(queue_path, smtp_server):
    processor = make_processor(queue_path, smtp_server)
    yield processor
    processor.stop(30)


# -- the numbers, in-process ---------------------------------------------------------


def test_a_pass_counts_sent_and_failed_messages_and_times_them(processor,
                                                               smtp_server):
    smtp_server.refuse("nobody@example.org")
    for i in range(3):
        add_message(processor.maildir, message_id=f"m{i}@example.org")
    add_message(processor.maildir, to=("nobody@example.org",))
    before = time.time()
    stats = processor.process_queue()
    assert (stats.sent, stats.failed) == (3, 1)
    data = processor.metrics.snapshot()
    assert data["up"] is False  # the thread was not started
    assert data["worker_threads"] == 2
    queue = data["relays"][""]
    assert (queue.sent, queue.deferred, queue.failed, queue.errors) == (3, 0, 1, 0)
    assert queue.messages == {"queued": 0, "deferred": 0, "sending": 0,
                              "failed": 1}
    assert queue.oldest is None  # nothing waits
    assert queue.passes == 1 and queue.pass_errors == 0
    assert before <= queue.last_pass <= time.time()
    assert queue.send_seconds.count == 4  # the refused one was sent too
    assert 0 < queue.send_seconds.sum < 60
    assert queue.queue_seconds.count == 3  # only the sent ones
    assert 0 <= queue.queue_seconds.sum < 3 * 60
    # The snapshot is a copy.
    queue.sent = 99
    assert processor.metrics.relays[""].sent == 3


def test_deferred_messages_are_counted_and_stay_in_the_gauges(processor,
                                                              smtp_server):
    smtp_server.greylist("jane@example.org", times=5)
    entry = add_message(processor.maildir)
    processor.process_queue()
    queue = processor.metrics.snapshot()["relays"][""]
    assert (queue.sent, queue.deferred, queue.failed) == (0, 1, 0)
    assert queue.messages == {"queued": 0, "deferred": 1, "sending": 0,
                              "failed": 0}
    assert queue.oldest == queued_time(entry)
    # The next pass lists the message as deferred, and leaves it alone.
    processor.process_queue()
    queue = processor.metrics.snapshot()["relays"][""]
    assert queue.deferred == 1 and queue.passes == 2
    assert queue.messages["deferred"] == 1
    assert queue.send_seconds.count == 1


def test_relay_folders_have_numbers_of_their_own(queue_path, smtp_server):
    processor = make_processor(queue_path, smtp_server, mailers={
        "crm": SMTPMailer("127.0.0.1", smtp_server.port, timeout=10)})
    try:
        add_message(processor.maildir)
        add_message(open_relay(queue_path, "crm", create=True))
        add_message(open_relay(queue_path, "crm", create=True))
        processor.process_queue()
        relays = processor.metrics.snapshot()["relays"]
    finally:
        processor.stop(30)
    assert sorted(relays) == ["", "crm"]
    assert relays[""].sent == 1 and relays["crm"].sent == 2
    assert relays["crm"].send_seconds.count == 2
    assert relays["crm"].messages["failed"] == 0


def test_the_oldest_message_is_as_of_the_listing(queue_path):
    maildir = Maildir(queue_path, create=True)
    metrics = Metrics()
    old = add_message(maildir)
    os.rename(old.path, os.path.join(maildir.new, "1000000000.M250000P1Q1Rab.h"))
    add_message(maildir)
    scan = maildir.scan()
    metrics.listed(None, maildir, scan, now=2e9)
    numbers = metrics.relay("")
    assert numbers.oldest == 1000000000.25
    assert numbers.messages == {"queued": 2, "deferred": 0, "sending": 0}
    assert numbers.listed == 2e9


def test_the_states_of_a_listing():
    scan = Scan(entries=[Entry("/q/new", n) for n in ("1.a", "2.b", "3.c", "x")],
                retry_at={"1.a": 200.0, "2.b": 50.0}, claimed={"3.c"})
    metrics = Metrics()
    metrics.listed("r", object(), scan, now=100.0)
    numbers = metrics.relay("r")
    assert numbers.messages == {"queued": 2, "deferred": 1, "sending": 1}
    assert numbers.oldest == 1.0
    # A message taken over from a claim that expired leaves "sending".
    job = type("Job", (), {"scan": scan, "relay": "r"})()
    metrics.handled(job, scan.entries[2], "sent", now=103.5)
    assert numbers.messages["sending"] == 0
    assert numbers.queue_seconds.sum == 100.5
    metrics.handled(job, scan.entries[1], "skipped")
    assert numbers.messages["queued"] == 2
    # A deferred message whose time came during the pass.
    metrics.handled(job, scan.entries[0], "deferred", now=201.0)
    assert numbers.messages == {"queued": 2, "deferred": 1, "sending": 0}
    assert numbers.deferred == 1
    metrics.handled(job, scan.entries[3], "failed")
    assert numbers.messages == {"queued": 1, "deferred": 1, "sending": 0}


def test_names_without_a_time_have_no_queue_time():
    assert queued_time(Entry("/q/new", "1700000000.M000001P2Q3R4.h")) \
        == 1700000000.000001
    assert queued_time(Entry("/q/new", "1700000000.123.zope")) == 1700000000.0
    assert queued_time(Entry("/q/new", "hand-made")) is None
    scan = Scan(entries=[Entry("/q/new", "hand-made")])
    metrics = Metrics()
    metrics.listed(None, object(), scan)
    assert metrics.relay(None).oldest is None
    # A store may say when a message was queued.
    record = type("Record", (), {"name": "row-7", "queued_at": 12})()
    assert queued_time(record) == 12.0


def test_histogram_buckets_hold_values_up_to_their_bound():
    histogram = Histogram((1.0, 5.0))
    for seconds in (0.5, 1.0, 1.5, 5.0, 7.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [(1.0, 2), (5.0, 4), (float("inf"), 5)]
    assert (histogram.count, histogram.sum) == (5, 15.0)


def test_unexpected_errors_are_counted(processor, caplog):
    class Broken(Maildir):
        def claim(self, entry, lease=30.0):
            raise RuntimeError("a bug")

    add_message(processor.maildir)
    processor.setMaildir(Broken(processor.maildir.path))
    with caplog.at_level(logging.CRITICAL, "mailoutbox"):
        stats = processor.process_queue()
    assert stats.skipped == 1
    numbers = processor.metrics.relays[""]
    assert numbers.errors == 1 and numbers.sent == 0
    assert numbers.messages["queued"] == 1


def test_a_queue_that_cannot_be_listed_counts_failed_passes(processor, caplog):
    new = processor.maildir.new
    os.rmdir(new)
    with open(new, "w"):
        pass  # new/ is a file: listing the queue fails
    with pytest.raises(NotADirectoryError):
        processor.process_queue()
    assert processor.metrics.relays[""].pass_errors == 1
    assert processor.metrics.relays[""].passes == 0


def test_a_relay_folder_that_cannot_be_listed_counts_failed_passes(
        queue_path, smtp_server, caplog):
    processor = make_processor(queue_path, smtp_server, mailers={
        "crm": SMTPMailer("127.0.0.1", smtp_server.port, timeout=10)})
    try:
        relay = open_relay(queue_path, "crm", create=True)
        add_message(relay)
        processor.process_queue()  # the relay folder has a lane now
        os.rmdir(relay.new)
        with open(relay.new, "w"):
            pass
        with caplog.at_level(logging.CRITICAL, "mailoutbox"):
            processor.process_queue()
        numbers = processor.metrics.relays
        assert numbers["crm"].pass_errors == 1
        assert numbers[""].pass_errors == 0
    finally:
        processor.stop(30)


def test_the_thread_counts_failed_passes_and_is_up_while_it_runs(
        queue_path, smtp_server, caplog):
    processor = make_processor(queue_path, smtp_server)
    open_relay(queue_path, "crm", create=True)

    def relay(name, create=False):
        raise RuntimeError("cannot open relay folders")

    processor.maildir.relay = relay
    os.rmdir(processor.maildir.new)
    with open(processor.maildir.new, "w"):
        pass
    with caplog.at_level(logging.CRITICAL, "mailoutbox"):
        processor.start()
        try:
            # Failed refreshes and failed passes of the queue, each counted.
            assert wait_for(lambda: processor.metrics.relays[""].pass_errors >= 3)
            assert processor.metrics.snapshot()["up"] is True
        finally:
            processor.stop(30)
    assert processor.metrics.snapshot()["up"] is False


def test_a_failed_area_that_cannot_be_read_is_left_out(queue_path, caplog):
    maildir = Maildir(queue_path, create=True)
    with open(maildir.failed, "w"):
        pass  # failed/ is a file
    metrics = Metrics()
    metrics.listed(None, maildir, maildir.scan())
    with caplog.at_level(logging.WARNING, "mailoutbox.metrics"):
        numbers = metrics.snapshot()["relays"][""]
    assert "failed" not in numbers.messages
    assert "cannot count the failed messages" in caplog.text


def test_numbers_before_the_first_pass():
    data = Metrics().snapshot()
    assert data["up"] is False and data["worker_threads"] == 0
    numbers = data["relays"][""]
    assert numbers.sent == 0 and numbers.last_pass is None
    assert numbers.messages == {"queued": 0, "deferred": 0, "sending": 0}


def test_the_lock_is_new_in_a_forked_child():
    processor = QueueProcessorThread()
    lock = processor.metrics._lock
    processor._after_fork_in_child()  # as os.fork() calls it in the child
    assert processor.metrics._lock is not lock
    assert processor.metrics.snapshot()["up"] is False


# -- prometheus_client ------------------------------------------------------------


def test_register_exposes_the_numbers(processor, smtp_server):
    smtp_server.refuse("nobody@example.org")
    add_message(processor.maildir)
    add_message(processor.maildir, to=("nobody@example.org",))
    registry = CollectorRegistry()
    found = register(processor, registry=registry)
    processor.process_queue()
    text = generate_latest(registry).decode()
    got = samples(text)
    assert value(got, "mailoutbox_up") == 0
    assert value(got, "mailoutbox_worker_threads") == 2
    assert value(got, "mailoutbox_sent_total", relay="") == 1
    assert value(got, "mailoutbox_failed_total", relay="") == 1
    assert value(got, "mailoutbox_deferred_total", relay="") == 0
    assert value(got, "mailoutbox_message_errors_total", relay="") == 0
    assert value(got, "mailoutbox_passes_total", relay="") == 1
    assert value(got, "mailoutbox_pass_errors_total", relay="") == 0
    assert value(got, "mailoutbox_messages", relay="", state="failed") == 1
    assert value(got, "mailoutbox_messages", relay="", state="queued") == 0
    assert value(got, "mailoutbox_oldest_message_age_seconds", relay="") == 0
    assert abs(value(got, "mailoutbox_last_pass_timestamp_seconds", relay="")
               - time.time()) < 600
    assert value(got, "mailoutbox_send_duration_seconds_count", relay="") == 2
    assert value(got, "mailoutbox_send_duration_seconds_bucket", relay="",
                 le="+Inf") == 2
    assert value(got, "mailoutbox_time_in_queue_seconds_count", relay="") == 1
    assert value(got, "mailoutbox_time_in_queue_seconds_bucket", relay="",
                 le="432000.0") == 1
    # One registry, one processor.
    with pytest.raises(ValueError, match="Duplicated"):
        register(processor, registry=registry)
    registry.unregister(found)
    assert "mailoutbox_up" not in generate_latest(registry).decode()


def test_register_in_the_global_registry():
    from prometheus_client import REGISTRY

    metrics = Metrics()
    found = register(metrics)
    try:
        assert REGISTRY.get_sample_value("mailoutbox_sent_total",
                                         {"relay": ""}) == 0
        # The oldest message's age grows between passes.
        metrics.relay("").oldest = time.time() - 1000
        age = REGISTRY.get_sample_value("mailoutbox_oldest_message_age_seconds",
                                        {"relay": ""})
        assert 1000 <= age < 2000
    finally:
        REGISTRY.unregister(found)
    assert isinstance(collector(metrics), type(found))


def test_without_prometheus_client(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"pip install 'mailoutbox\[metrics\]'"):
        register(Metrics(), registry=object())
    server = metrics_module.MetricsServer(None, "127.0.0.1", 1)
    with pytest.raises(ImportError, match="prometheus_client"):
        server.start()
    server.stop()  # not started: nothing to do


# -- --metrics HOST:PORT -------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9101", ("127.0.0.1", 9101)),
    ("[::1]:80", ("::1", 80)),
    ("localhost:65535", ("localhost", 65535)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(("text", "error"), [
    ("9101", "is not HOST:PORT"),
    (":9101", "is not HOST:PORT"),
    ("[]:9101", "is not HOST:PORT"),
    ("host:0", "is not a port number"),
    ("host:65536", "is not a port number"),
    ("host:http", "is not a port number"),
    ("host:", "is not a port number"),
])
def test_parse_address_refuses(text, error):
    with pytest.raises(ValueError, match=error):
        parse_address(text)


def test_cli_bad_address_is_a_usage_error(queue_path):
    result = cli("run", queue_path, "--daemon", "--metrics", "localhost")
    assert result.code == EXIT_USAGE
    assert "argument --metrics: 'localhost' is not HOST:PORT" in result.err


def test_cli_metrics_needs_daemon(queue_path):
    result = cli("run", queue_path, "--metrics", "127.0.0.1:9101")
    assert result.code == EXIT_USAGE
    assert result.err == ("mailoutbox: error: --metrics needs --daemon (a single"
                          " pass has nothing to serve metrics for)\n")
    assert not os.path.exists(queue_path)  # said before anything was done


def test_cli_address_in_use(queue_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("run", queue_path, "--daemon", "--port", "1", "--metrics",
                     f"127.0.0.1:{port}")
    assert result.code == EXIT_USAGE
    assert result.err.splitlines()[-1] == (
        f"mailoutbox: error: cannot serve metrics at 127.0.0.1:{port}: Address"
        " already in use")


def test_cli_without_prometheus_client(queue_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    result = cli("run", queue_path, "--daemon", "--port", "1", "--metrics",
                 f"127.0.0.1:{free_port()}")
    assert result.code == EXIT_ERROR
    assert result.err.splitlines()[-1].startswith(
        "mailoutbox: error: serving metrics needs prometheus_client: pip install"
        " 'mailoutbox[metrics]'")


def scrape(port: int) -> dict:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return samples(response.read().decode())


def test_process_daemon_serves_metrics(smtp_server, queue_path, tmp_path):
    smtp_server.refuse("nobody@example.org")
    maildir = Maildir(queue_path, create=True)
    for i in range(3):
        add_message(maildir, message_id=f"m{i}@example.org")
    add_message(maildir, to=("nobody@example.org",))
    add_message(open_relay(queue_path, "crm", create=True))
    ini = write_ini(tmp_path, f"""
        [mailoutbox]
        interval = 0.2

        [mailoutbox:relay crm]
        hostname = 127.0.0.1
        port = {smtp_server.port}
    """)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mailoutbox", "run", queue_path, "--daemon",
         "--hostname", "127.0.0.1", "--port", str(smtp_server.port),
         "--config", ini, "--interval", "0.2", "--metrics", f"127.0.0.1:{port}",
         "-v"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        got: dict = {}

        def settled() -> bool:
            nonlocal got
            assert process.poll() is None, process.communicate()
            try:
                got = scrape(port)
            except OSError:  # not listening yet
                return False
            return (got.get(("mailoutbox_sent_total", (("relay", ""),))) == 3
                    and got.get(("mailoutbox_sent_total", (("relay", "crm"),))) == 1
                    and got.get(("mailoutbox_failed_total", (("relay", ""),))) == 1
                    # the pass is counted when it ends, after its sends
                    and got.get(("mailoutbox_passes_total", (("relay", ""),)),
                                0) >= 1)

        assert wait_for(settled, 60), got
        assert value(got, "mailoutbox_up") == 1
        assert value(got, "mailoutbox_worker_threads") >= 1
        assert value(got, "mailoutbox_deferred_total", relay="") == 0
        assert value(got, "mailoutbox_messages", relay="", state="failed") == 1
        assert value(got, "mailoutbox_messages", relay="crm", state="failed") == 0
        for state in ("queued", "deferred", "sending"):
            assert value(got, "mailoutbox_messages", relay="", state=state) == 0
        assert value(got, "mailoutbox_oldest_message_age_seconds", relay="") == 0
        assert value(got, "mailoutbox_passes_total", relay="") >= 1
        assert value(got, "mailoutbox_pass_errors_total", relay="") == 0
        assert value(got, "mailoutbox_send_duration_seconds_count", relay="") == 4
        assert value(got, "mailoutbox_send_duration_seconds_count",
                     relay="crm") == 1
        assert value(got, "mailoutbox_time_in_queue_seconds_count", relay="") == 3
        assert 0 < value(got, "mailoutbox_time_in_queue_seconds_sum",
                         relay="") < 3 * 60
        # The process's own numbers come along (where /proc tells them).
        if sys.platform.startswith("linux"):
            assert value(got, "process_open_fds") > 0
        # Passes go on; the scrape shows them.
        passes = value(got, "mailoutbox_passes_total", relay="")
        assert wait_for(lambda: value(scrape(port), "mailoutbox_passes_total",
                                      relay="") > passes, 30)
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait(10)
    assert process.returncode == EXIT_OK, err
    assert f"serving metrics at http://127.0.0.1:{port}/metrics".encode() in err
    with pytest.raises(OSError):
        scrape(port)  # the server stopped with the process
    assert len(smtp_server.messages) == 4
    assert {"m0@example.org", "m1@example.org", "m2@example.org"} \
        < set(smtp_server.message_ids())


# -- in a Pyramid application (the example of docs/operations.rst) -----------------


def test_pyramid_application_exposes_its_processor(smtp_server, queue_path):
    # As in the documentation:
    from prometheus_client import CONTENT_TYPE_LATEST
    from pyramid.config import Configurator
    from pyramid.response import Response
    from webtest import TestApp

    from mailoutbox.zcml import processor_threads
    from mailoutbox.zcml import stop_processor_threads

    metrics_registry = CollectorRegistry()

    def metrics_view(request):
        return Response(generate_latest(metrics_registry),
                        content_type=CONTENT_TYPE_LATEST)

    def main(global_config, **settings):
        with Configurator(settings=settings) as config:
            config.include("pyramid_tm")
            config.include("mailoutbox.pyramid")
            config.add_route("metrics", "/metrics")
            config.add_view(metrics_view, route_name="metrics")
            app = config.make_wsgi_app()  # starts the processor thread
        for processor in processor_threads().values():
            register(processor, registry=metrics_registry)
        return app

    app = TestApp(main({}, **{
        "mail.host": smtp_server.host, "mail.port": str(smtp_server.port),
        "mail.queue_path": queue_path, "mail.interval": "0.05",
    }))
    try:
        add_message(Maildir(queue_path))
        assert wait_for(lambda: smtp_server.messages)
        got: dict = {}

        def sent() -> bool:
            nonlocal got
            response = app.get("/metrics")
            assert response.content_type == "text/plain"
            got = samples(response.text)
            return value(got, "mailoutbox_sent_total", relay="") == 1

        assert wait_for(sent), got
        assert value(got, "mailoutbox_up") == 1
    finally:
        stop_processor_threads(30)
