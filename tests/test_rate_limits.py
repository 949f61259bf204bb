"""Rate limits of the relays (mailoutbox.ratelimit) and throttling replies.

Real SMTP servers on 127.0.0.1: aiosmtpd servers that count simultaneous
connections, or that answer like a provider throttling a sender too fast,
and Postfix's smtp-sink for the command line.  Timing assertions are lower
bounds only (they prove that limiting happens) or generous upper bounds
that prove nothing hangs.
"""
from __future__ import annotations

import logging
import math
import os
import smtplib
import subprocess
import sys
import threading
import time

import pytest
import transaction
from zope.configuration.exceptions import ConfigurationError

from mailoutbox import errors
from mailoutbox.cli.config import RelaySettings
from mailoutbox.cli.config import Settings
from mailoutbox.cli.config import rate as parse_rate
from mailoutbox.cli.run import make_mailer
from mailoutbox.delivery import QueuedMailDelivery
from mailoutbox.events import MailErrorEvent
from mailoutbox.maildir import Maildir
from mailoutbox.mailer import SMTPMailer
from mailoutbox.queue import QueueProcessorThread
from mailoutbox.ratelimit import FLOOR
from mailoutbox.ratelimit import RateLimiter
from mailoutbox.ratelimit import RateLimits
from mailoutbox.ratelimit import check_max_connections
from mailoutbox.ratelimit import check_rate
from mailoutbox.ratelimit import relay_limits
from mailoutbox.testing.smtpd import SMTPServer
from mailoutbox.testing.smtpd import _Handler
from mailoutbox.workers import PUT_BACK
from mailoutbox.workers import Pass

from .test_cli import cli
from .test_cli import write_ini
from .test_cli_run import fill
from .test_cli_run import to

BAD_NUMBERS = [0, -1, -0.5, math.nan, math.inf, -math.inf]


def queue_messages(path: str, count: int) -> list[str]:
    delivery = QueuedMailDelivery(path)
    ids = []
    with transaction.manager:
        for i in range(count):
            ids.append(delivery.send("app@example.org", [f"r{i}@example.org"],
                                     f"Subject: {i}\n\nbody\n".encode()))
    return ids


def processor_for(path: str, mailer, **options) -> QueueProcessorThread:
    processor = QueueProcessorThread(**options)
    processor.setMailer(mailer)
    processor.setQueuePath(path)
    return processor


def mailer_to(server, **options) -> SMTPMailer:
    return SMTPMailer(server.host, server.port, **options)


# -- checking the settings -------------------------------------------------------


@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_bad_rates_and_connection_limits_are_refused(value):
    with pytest.raises(ValueError, match="rate must be a finite number of"
                       " messages per second > 0"):
        check_rate(value)
    with pytest.raises(ValueError, match="max_connections must be a whole number"):
        check_max_connections(value)
    with pytest.raises(ValueError, match="rate"):
        SMTPMailer(rate=value)
    with pytest.raises(ValueError, match="max_connections"):
        SMTPMailer(max_connections=value)
    with pytest.raises(ValueError, match="rate"):
        QueueProcessorThread(rate=value)
    with pytest.raises(ValueError, match="max_connections"):
        QueueProcessorThread(max_connections=value)


@pytest.mark.parametrize("value", ["14", True, [1]])
def test_rates_and_connection_limits_must_be_numbers(value):
    with pytest.raises(TypeError, match="rate must be a number"):
        check_rate(value)
    with pytest.raises(TypeError, match="max_connections must be a whole number"):
        check_max_connections(value)
    mailer = SMTPMailer()
    with pytest.raises(TypeError):
        mailer.rate = value
    with pytest.raises(TypeError):
        mailer.max_connections = value


def test_good_settings_are_kept():
    assert check_rate(None) is None
    assert check_rate(14) == 14.0 and isinstance(check_rate(14), float)
    assert check_max_connections(None) is None
    assert check_max_connections(2) == 2
    with pytest.raises(ValueError):
        check_max_connections(1.5)  # not a whole number
    mailer = SMTPMailer(rate=0.5, max_connections=2)
    assert (mailer.rate, mailer.max_connections) == (0.5, 2)
    mailer.rate = None
    assert mailer.rate is None
    processor = QueueProcessorThread(rate=14, max_connections=3)
    assert (processor.rate, processor.max_connections) == (14.0, 3)
    assert (QueueProcessorThread().rate, QueueProcessorThread().max_connections) == (
        None, None)


def test_a_relay_uses_its_own_limits_else_the_processors():
    class Plain:  # e.g. zope.sendmail's mailer: no limits of its own
        pass

    assert relay_limits(Plain(), 5.0, 3) == (5.0, 3)
    assert relay_limits(SMTPMailer(rate=14, max_connections=2), 5.0, 3) == (14.0, 2)
    assert relay_limits(SMTPMailer(rate=14), None, 3) == (14.0, 3)
    odd = Plain()
    odd.rate = "fast"
    with pytest.raises(TypeError, match="rate"):
        relay_limits(odd, None, None)


# -- the token bucket, on a clock of its own ----------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Ticking(threading.Event):
    """A stop event whose waiting moves *clock* on instead of sleeping."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.waited = 0.0

    def wait(self, timeout=None):
        self.clock.now += timeout
        self.waited += timeout
        return self.is_set()


def test_the_bucket_allows_a_small_burst_then_the_rate():
    clock = Clock()
    limiter = RateLimiter(20, "bulk", clock=clock)
    stop = Ticking(clock)
    assert limiter.acquire(stop) and limiter.acquire(stop)  # 20 * 0.1 s
    assert stop.waited == 0
    for _ in range(20):
        assert limiter.acquire(stop)
    assert stop.waited == pytest.approx(1.0)
    assert limiter.rate == 20 and not limiter.slowed_down
    assert repr(limiter) == "<RateLimiter bulk rate=20.0>"
    assert "(default)" in repr(RateLimiter(None))


def test_a_throttled_relay_is_slowed_down_once_per_slow_down(caplog):
    clock = Clock()
    limiter = RateLimiter(8, "bulk", clock=clock)
    stop = Ticking(clock)
    assert limiter.acquire(stop)
    with caplog.at_level(logging.WARNING, "mailoutbox.ratelimit"):
        assert limiter.throttled()
    assert limiter.rate == 4 and limiter.slowed_down
    assert "relay bulk throttles: slowing down to 4 messages/s" in caplog.text
    # Sent before the slow-down (in this thread): tried again, no halving.
    assert limiter.throttled()
    assert limiter.rate == 4
    assert limiter.acquire(stop)
    assert stop.waited == pytest.approx(0.25)  # the bucket was emptied
    assert limiter.throttled()
    assert limiter.rate == 2


def test_throttling_stops_at_the_floor():
    clock = Clock()
    limiter = RateLimiter(0.3, clock=clock)
    stop = Ticking(clock)
    assert limiter.acquire(stop)
    assert limiter.throttled()
    assert limiter.rate == FLOOR
    assert limiter.acquire(stop)
    assert not limiter.throttled()  # at the floor: defer the message
    assert limiter.rate == FLOOR
    slow = RateLimiter(0.1, clock=clock)  # below the floor: its own rate
    assert slow.acquire(stop)
    assert not slow.throttled()
    assert slow.rate == 0.1


def test_the_rate_recovers_slowly_after_quiet_time(caplog):
    clock = Clock()
    limiter = RateLimiter(10, "bulk", clock=clock)
    stop = Ticking(clock)
    assert limiter.acquire(stop)
    assert limiter.throttled()
    assert limiter.rate == 5
    clock.now += limiter.recovery_period - 0.01
    assert limiter.rate == 5
    clock.now += 0.02
    assert limiter.rate == pytest.approx(6.0)
    with caplog.at_level(logging.INFO, "mailoutbox.ratelimit"):
        clock.now += 10 * limiter.recovery_period
        assert limiter.rate == 10 and not limiter.slowed_down
    assert "relay bulk: no more throttling, back to 10 messages/s" in caplog.text


def test_a_relay_without_a_limit_is_slowed_down_from_its_measured_rate(caplog):
    clock = Clock()
    limiter = RateLimiter(None, clock=clock)
    stop = Ticking(clock)
    for _ in range(10):
        assert limiter.acquire(stop)
        clock.now += 0.05
    assert stop.waited == 0  # no limit: never waits
    assert limiter.throttled()
    assert limiter.rate == pytest.approx(10.0)  # 10 in 0.5 s, halved
    assert limiter.acquire(stop)
    assert stop.waited == pytest.approx(0.1)
    with caplog.at_level(logging.INFO, "mailoutbox.ratelimit"):
        clock.now += 100 * limiter.recovery_period
        assert limiter.rate is None
    assert "back to no limit" in caplog.text


def test_a_first_throttling_without_a_measure_defers():
    clock = Clock()
    limiter = RateLimiter(None, clock=clock)
    assert not limiter.throttled()  # nothing sent lately: nothing to lower
    assert limiter.rate is None


def test_waiting_for_a_token_ends_when_stopping():
    limiter = RateLimiter(0.01)  # a token every 100 s
    stop = threading.Event()
    assert limiter.acquire(stop)
    stop.set()
    assert not limiter.acquire(stop)
    stop.clear()
    results = []
    waiter = threading.Thread(target=lambda: results.append(limiter.acquire(stop)))
    started = time.monotonic()
    waiter.start()
    time.sleep(0.1)
    stop.set()
    waiter.join(30)
    assert results == [False]
    assert time.monotonic() - started < 30  # did not wait for the token


def test_a_processor_keeps_one_limiter_per_mailer():
    limits = RateLimits()
    one, two = SMTPMailer(), SMTPMailer()
    limiter = limits.limiter(one, 5.0, "one")
    assert limits.limiter(one, 5.0) is limiter
    assert limits.limiter(two, 5.0) is not limiter
    changed = limits.limiter(one, 7.0)
    assert changed is not limiter and changed.ceiling == 7.0


# -- the pass: putting a throttled message back -------------------------------------


def make_pass(path: str, count: int, limiter=None) -> Pass:
    queue_messages(path, count)
    maildir = Maildir(path)
    return Pass(maildir, maildir.scan(), time.time, threading.Event(), None,
                None, 1, limiter=limiter)


def test_a_throttled_entry_is_put_back_once(queue_path):
    limiter = RateLimiter(100)
    job = make_pass(queue_path, 2, limiter)
    first = job.next_entry()
    assert job.take_token()
    assert job.throttled(first)  # put back, rate halved
    job.record(PUT_BACK)
    assert job.stats.total == 0
    assert job.next_entry() is first  # before the others
    assert job.take_token()
    assert not job.throttled(first)  # a second time in the pass: deferred
    assert limiter.rate == 25
    second = job.next_entry()
    assert second is not None and second is not first
    assert job.next_entry() is None


def test_without_a_limiter_nothing_is_put_back(queue_path):
    job = make_pass(queue_path, 1)
    assert job.take_token()
    assert not job.throttled(job.next_entry())


# -- throttling replies ----------------------------------------------------------------


@pytest.mark.parametrize(("code", "text"), [
    (421, "4.7.0 Too many messages, slow down"),
    (451, "4.7.1 rate limit exceeded"),
    (454, "Throttling failure: Maximum sending rate exceeded"),
    (454, "Throttling failure: Daily message quota exceeded"),
    (421, "4.7.0 mx.example.org Error: too many connections from 192.0.2.1"),
    (450, "4.7.1 Error: too much mail from 192.0.2.1"),
    (450, "4.7.1 Error: too many recipients from 192.0.2.1"),
    (421, "4.7.0 Try again later, closing connection."),
    (451, "4.7.500 Server busy. Please try again later"),
    (432, "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"),
    (450, "Ratelimited, slow down please"),
])
def test_throttling_replies(code, text):
    assert errors.is_throttling(code, text)
    error = errors.classify(smtplib.SMTPSenderRefused(code, text.encode(),
                                                      "a@example.org"))
    assert isinstance(error, errors.MailThrottledError)
    assert not error.permanent and error.code == code
    assert str(error).startswith("throttled by the server: ")


@pytest.mark.parametrize(("code", "text"), [
    (550, "5.7.1 rate limit exceeded"),  # permanent whatever it says
    (451, "4.7.1 Greylisted, try again later"),
    (450, "4.2.0 Recipient address rejected: Greylisted, see http://example"),
    (452, "4.5.3 Error: too many recipients"),  # for one message
    (452, "4.2.2 Mailbox full: message rate limit"),  # one mailbox
    (451, "4.3.0 Temporary failure, try again later"),  # not a policy
    (421, "4.4.2 Idle timeout"),
    (450, "Error: command failed"),
])
def test_other_replies_are_not_throttling(code, text):
    assert not errors.is_throttling(code, text)
    error = errors.classify(smtplib.SMTPDataError(code, text.encode()))
    assert not isinstance(error, errors.MailThrottledError)


def test_every_recipient_throttled():
    error = errors.classify(smtplib.SMTPRecipientsRefused({
        "a@example.org": (450, b"4.7.1 Error: too many recipients from 192.0.2.1"),
        "b@example.org": (451, b"4.7.1 rate limit exceeded"),
    }))
    assert isinstance(error, errors.RecipientsThrottled)
    assert isinstance(error, errors.MailThrottledError)
    assert isinstance(error, smtplib.SMTPRecipientsRefused)
    assert not error.permanent
    mixed = errors.classify(smtplib.SMTPRecipientsRefused({
        "a@example.org": (451, b"4.7.1 rate limit exceeded"),
        "b@example.org": (451, b"4.7.1 Greylisted, try again later"),
    }))
    assert type(mixed) is errors.RecipientsRefused


# -- servers -------------------------------------------------------------------------


class CountingServer(SMTPServer):
    """Counts the connections open at the same time."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.open = 0
        self.most_open = 0

    def _make_protocol(self):
        protocol = super()._make_protocol()
        made, lost = protocol.connection_made, protocol.connection_lost

        def connection_made(transport):
            with self.lock:
                self.open += 1
                self.most_open = max(self.most_open, self.open)
            made(transport)

        def connection_lost(exc):
            with self.lock:
                self.open -= 1
            lost(exc)

        protocol.connection_made = connection_made
        protocol.connection_lost = connection_lost
        return protocol


class _ThrottlingHandler(_Handler):
    async def handle_MAIL(self, server, session, envelope, address, options):
        reply = self.server.judge()
        if reply is not None:
            self._record("MAIL")
            return reply
        return await super().handle_MAIL(server, session, envelope, address,
                                         options)


class ThrottlingServer(CountingServer):
    """Answers MAIL with a throttling reply above *rate* messages per
    second (a bucket of *burst*), or for the MAIL commands numbered in
    *throttle* (1 is the first), or from the MAIL command *from_number*
    on."""

    def __init__(self, *, rate: float | None = None, burst: float = 1.0,
                 throttle: tuple[int, ...] = (), from_number: int | None = None,
                 reply: str = "421 4.7.0 Too many messages, slow down") -> None:
        super().__init__()
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.updated = time.monotonic()
        self.throttle = set(throttle)
        self.from_number = from_number
        self.throttle_reply = reply
        self.number = 0
        self.throttled = 0

    def judge(self) -> str | None:
        with self.lock:
            self.number += 1
            now = time.monotonic()
            refuse = self.number in self.throttle or (
                self.from_number is not None and self.number >= self.from_number)
            if self.rate is not None:
                self.tokens = min(self.burst,
                                  self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                else:
                    refuse = True
            if refuse:
                self.throttled += 1
                return self.throttle_reply
            return None

    def _make_protocol(self):
        protocol = super()._make_protocol()
        handler = _ThrottlingHandler(self)
        protocol.event_handler = handler
        protocol._handle_hooks["MAIL"] = handler.handle_MAIL  # aiosmtpd's
        return protocol


# -- the processor against real servers -------------------------------------------


def test_a_rate_slows_the_processor_down(queue_path):
    ids = queue_messages(queue_path, 30)
    with SMTPServer() as server:
        processor = processor_for(queue_path, mailer_to(server, rate=20))
        started = time.monotonic()
        stats = processor.process_queue()
        elapsed = time.monotonic() - started
        processor.stop(timeout=30)
    assert stats.sent == 30
    assert sorted(server.message_ids()) == sorted(ids)
    # 2 at once, then 28 at 20 per second: 1.4 s (without a limit: ~0.1 s).
    assert elapsed >= 1.0


def test_the_processors_rate_applies_to_mailers_without_one(queue_path):
    queue_messages(queue_path, 7)
    with SMTPServer() as server:
        processor = processor_for(queue_path, mailer_to(server), rate=10)
        started = time.monotonic()
        assert processor.process_queue().sent == 7
        elapsed = time.monotonic() - started
        processor.stop(timeout=30)
    assert elapsed >= 0.4  # 1 at once, then 6 at 10 per second: 0.6 s


def test_max_connections_caps_the_simultaneous_connections(queue_path):
    queue_messages(queue_path, 16)
    with CountingServer() as server:
        server.slow(0.05)  # so that sends overlap
        processor = processor_for(queue_path, mailer_to(server, max_connections=2),
                                  concurrency=8, adaptive=False)
        assert processor.process_queue().sent == 16
        lane = processor._lanes.lanes[None]
        assert len(lane.pool.threads) == 2
        processor.stop(timeout=30)
    assert 1 <= server.most_open <= 2
    assert server.connections <= 2


def test_a_changed_connection_limit_applies_from_the_next_pass(queue_path):
    with SMTPServer() as server:
        mailer = mailer_to(server, max_connections=2)
        processor = processor_for(queue_path, mailer, concurrency=4,
                                  adaptive=False)
        queue_messages(queue_path, 2)
        assert processor.process_queue().sent == 2
        assert len(processor._lanes.lanes[None].pool.threads) == 2
        mailer.max_connections = 1
        queue_messages(queue_path, 2)
        assert processor.process_queue().sent == 2
        assert len(processor._lanes.lanes[None].pool.threads) == 1
        processor.stop(timeout=30)


def test_stop_is_prompt_while_waiting_for_a_token_and_no_claim_is_held(queue_path):
    queue_messages(queue_path, 5)
    with SMTPServer() as server:
        processor = processor_for(queue_path, mailer_to(server, rate=0.1),
                                  concurrency=2, interval=0.1)
        processor.start()
        try:
            deadline = time.monotonic() + 30
            while not server.messages and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(server.messages) == 1
            time.sleep(0.3)  # the next token comes 10 s after the first
            names = os.listdir(os.path.join(queue_path, "new")) + os.listdir(
                os.path.join(queue_path, "cur"))
            assert not [n for n in names if n.startswith(".sending-")]
        finally:
            started = time.monotonic()
            processor.stop(timeout=30)
        assert time.monotonic() - started < 8  # not the 10 s to the next token
    assert len(server.messages) == 1
    assert len(Maildir(queue_path).scan().entries) == 4  # still queued


def test_a_throttled_message_is_put_back_and_the_pass_goes_on_slower(
        queue_path, caplog):
    ids = queue_messages(queue_path, 8)
    events = []
    import zope.event
    zope.event.subscribers.append(events.append)
    try:
        with ThrottlingServer(throttle=(3, 4),
                              reply="451 4.7.1 rate limit exceeded") as server:
            processor = processor_for(queue_path, mailer_to(server, rate=100),
                                      max_connections=1)
            with caplog.at_level(logging.WARNING):
                stats = processor.process_queue()
            limiter = processor.rate_limits.limiter(processor.mailer, 100.0)
            processor.stop(timeout=30)
    finally:
        zope.event.subscribers.remove(events.append)
    # The 3rd message was put back when throttled (MAIL 3), and tried again
    # at once at the lower rate (MAIL 4): throttled again in the same pass,
    # it was deferred, its attempt counted once, and the rate halved again.
    assert (stats.sent, stats.deferred, stats.failed) == (7, 1, 0)
    assert sorted(server.message_ids()) == sorted(ids[:2] + ids[3:])
    assert limiter.rate == 25  # 100, halved twice
    assert "trying it again later in this pass" in caplog.text
    assert "relay (default) throttles: slowing down to 50 messages/s" in caplog.text
    [error] = [e for e in events if isinstance(e, MailErrorEvent)]
    assert error.code == 451 and not error.permanent
    [entry] = Maildir(queue_path).scan().entries
    assert Maildir(queue_path).retry_state(entry)["attempts"] == 1


def test_throttled_messages_sent_together_are_put_back_together(queue_path):
    queue_messages(queue_path, 6)
    with ThrottlingServer(throttle=(2, 3)) as server:
        processor = processor_for(queue_path, mailer_to(server, rate=100),
                                  max_connections=1)
        stats = processor.process_queue()
        processor.stop(timeout=30)
    # MAIL 2 (message 2) and 3 (message 2 again, after a halving) throttled.
    assert (stats.sent, stats.deferred) == (5, 1)
    assert server.throttled == 2


def test_persistent_throttling_ends_in_deferrals(queue_path):
    queue_messages(queue_path, 5)
    with ThrottlingServer(from_number=3) as server:
        processor = processor_for(queue_path, mailer_to(server, rate=50),
                                  max_connections=1)
        stats = processor.process_queue()
        processor.stop(timeout=30)
    assert (stats.sent, stats.deferred, stats.failed) == (2, 3, 0)
    assert server.throttled == 6  # each of the last three: put back once
    maildir = Maildir(queue_path)
    for entry in maildir.scan().entries:
        state = maildir.retry_state(entry)
        assert state["attempts"] == 1 and state["code"] == 421


def test_a_server_limiting_the_rate_gets_most_messages_in_one_pass(queue_path):
    queue_messages(queue_path, 30)
    with ThrottlingServer(rate=40, burst=4) as server:
        processor = processor_for(queue_path, mailer_to(server))  # no limit
        stats = processor.process_queue()
        processor.stop(timeout=30)
    assert stats.sent + stats.deferred == 30
    # A message is deferred only when throttled a second time in the pass:
    # the others were put back and sent at the lower rate.
    assert 2 * stats.deferred <= server.throttled
    assert stats.sent >= 1


# -- ZCML ---------------------------------------------------------------------------


ZCML = """\
<configure xmlns="http://namespaces.zope.org/zope"
           xmlns:mail="http://namespaces.zope.org/mail">
  <include package="zope.component" file="meta.zcml" />
  <include package="mailoutbox" file="meta.zcml" />
  {body}
</configure>
"""


def load(body: str) -> None:
    from zope.configuration import xmlconfig

    xmlconfig.string(ZCML.format(body=body))


@pytest.fixture
def registry():
    import zope.component.testing

    zope.component.testing.setUp()
    yield
    zope.component.testing.tearDown()


def test_zcml_rate_and_max_connections(registry):
    from zope.component import getUtility

    from mailoutbox.interfaces import IMailer

    load('<mail:smtpMailer name="ses" rate="14" max_connections="2" />'
         '<mail:smtpMailer name="plain" />')
    ses = getUtility(IMailer, "ses")
    assert (ses.rate, ses.max_connections) == (14.0, 2)
    plain = getUtility(IMailer, "plain")
    assert (plain.rate, plain.max_connections) == (None, None)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_zcml_bad_rates(registry, value):
    with pytest.raises(ConfigurationError, match=(
            "mail:smtpMailer 'ses' rate: must be a positive number of messages"
            " per second")):
        load(f'<mail:smtpMailer name="ses" rate="{value}" />')


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "many"])
def test_zcml_bad_connection_limits(registry, value):
    with pytest.raises(ConfigurationError, match="max_connections"):
        load(f'<mail:smtpMailer name="ses" max_connections="{value}" />')


# -- the command line -----------------------------------------------------------------


def test_rate_values():
    assert parse_rate("14") == 14.0
    assert parse_rate("0.5") == 0.5
    assert parse_rate("30/m") == 0.5
    assert parse_rate("3600 / H") == 1.0
    assert parse_rate("2/s") == 2.0


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "fast", "1/d", "",
                                   "0/m"])
def test_bad_rate_options_are_refused(queue_path, value):
    result = cli("run", queue_path, "--rate", value)
    assert result.code == 2
    assert "invalid rate" in result.err


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "nan"])
def test_bad_max_connections_options_are_refused(queue_path, value):
    result = cli("run", queue_path, "--max-connections", value)
    assert result.code == 2
    assert "invalid number" in result.err


def test_config_sections_set_the_limits_of_each_relay(tmp_path, queue_path):
    from mailoutbox.cli import build_parser
    from mailoutbox.cli.config import resolve
    from mailoutbox.cli.console import Console

    ini = write_ini(tmp_path, f"""\
        [mailoutbox]
        queue_path = {queue_path}
        rate = 14
        max_connections = 2

        [mailoutbox:relay bulk]
        hostname = bulk.example.org
        rate = 30/m
        """)
    args = build_parser().parse_args(["run", "--config", ini])
    settings = resolve(args, Console())
    assert (settings.rate, settings.max_connections) == (14.0, 2)
    bulk = settings.relays["bulk"]
    assert (bulk.rate, bulk.max_connections) == (0.5, None)
    mailer = make_mailer(bulk)
    assert (mailer.rate, mailer.max_connections) == (0.5, None)
    args = build_parser().parse_args(["run", "--config", ini, "--rate", "5",
                                      "--max-connections", "1"])
    settings = resolve(args, Console())
    assert (settings.rate, settings.max_connections) == (5.0, 1)


@pytest.mark.parametrize(("key", "value"), [
    ("rate", "0"), ("rate", "nan"), ("rate", "-2"), ("rate", "inf"),
    ("max_connections", "0"), ("max_connections", "-1"),
])
@pytest.mark.parametrize("section", ["mailoutbox", "mailoutbox:relay bulk"])
def test_config_bad_limits_are_refused(tmp_path, queue_path, section, key, value):
    relay = section != "mailoutbox"
    ini = write_ini(tmp_path, f"""\
        [mailoutbox]
        queue_path = {queue_path}
        {"" if relay else f"{key} = {value}"}
        {f"[{section}]" if relay else ""}
        {f"{key} = {value}" if relay else ""}
        """)
    result = cli("run", "--config", ini)
    assert result.code != 0
    assert f"[{section}] {key}: invalid" in result.err


def test_settings_default_to_no_limit():
    assert (Settings().rate, Settings().max_connections) == (None, None)
    assert (RelaySettings().rate, RelaySettings().max_connections) == (None, None)


def test_run_rate_limits_against_smtp_sink(smtp_sink, queue_path):
    sink = smtp_sink()
    fill(queue_path, 30)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "mailoutbox", "run", queue_path, "--hostname",
         "127.0.0.1", "--port", str(sink.port), "--rate", "20", "--no-tls"],
        capture_output=True, timeout=120,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(b"sent 30, deferred 0, failed 0")
    assert elapsed >= 1.0  # 2 at once, then 28 at 20 per second: 1.4 s


def test_run_max_connections(queue_path):
    fill(queue_path, 10)
    with CountingServer() as server:
        server.slow(0.05)
        result = cli("run", queue_path, *to(server), "--max-connections", "2",
                     "--concurrency", "8")
        assert result.code == 0, result.err
    assert server.most_open <= 2


def test_a_throttling_421_is_not_taken_for_a_dropped_idle_connection():
    """A 421 on a reused connection normally makes the mailer reconnect and
    try again at once; not a 421 that says the sender is too fast."""
    with ThrottlingServer(throttle=(2,)) as server:
        mailer = mailer_to(server)
        mailer.send("a@example.org", ["b@example.org"], b"Subject: 1\n\nx\n")
        with pytest.raises(errors.MailThrottledError, match=r"421 4\.7\.0 Too many"):
            mailer.send("a@example.org", ["b@example.org"], b"Subject: 2\n\nx\n")
        mailer.close()
    assert server.number == 2  # no second MAIL on a new connection
