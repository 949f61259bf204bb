"""The retry policy and the retry state it computes."""
from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailoutbox.retry import RetryPolicy
from mailoutbox.retry import record_failure


def test_defaults():
    policy = RetryPolicy()
    assert (policy.initial, policy.factor, policy.cap, policy.max_age) == (
        60.0, 2.0, 3600.0, 5 * 24 * 3600.0)


def test_delay_grows_exponentially_up_to_the_cap():
    policy = RetryPolicy(initial=10, factor=3, cap=200)
    assert [policy.delay(n) for n in range(1, 6)] == [10.0, 30.0, 90.0, 200.0, 200.0]


def test_delay_counts_zero_and_negative_attempts_as_the_first():
    policy = RetryPolicy(initial=5)
    assert policy.delay(0) == policy.delay(-3) == policy.delay(1) == 5.0


def test_delay_of_a_huge_number_of_attempts_is_the_cap():
    assert RetryPolicy(cap=42).delay(10**6) == 42.0


def test_zero_delay_policy():
    policy = RetryPolicy(initial=0)
    assert policy.delay(1) == policy.delay(50) == 0.0


def test_expired():
    policy = RetryPolicy(max_age=100)
    assert not policy.expired(first_attempt=1000.0, now=1099.9)
    assert policy.expired(first_attempt=1000.0, now=1100.0)


def test_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RetryPolicy().initial = 1  # type: ignore[misc]


@pytest.mark.parametrize("kwargs", [
    {"initial": -1}, {"cap": math.inf}, {"max_age": math.nan}, {"initial": "60"},
    {"factor": 0.5}, {"factor": math.inf}, {"factor": None},
])
def test_invalid_values_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RetryPolicy(**kwargs)


@given(
    initial=st.floats(0, 1e6), factor=st.floats(1, 100), cap=st.floats(0, 1e7),
    attempts=st.integers(-5, 10_000),
)
def test_delay_is_bounded_and_never_decreases(initial, factor, cap, attempts):
    policy = RetryPolicy(initial=initial, factor=factor, cap=cap)
    delay = policy.delay(attempts)
    assert 0 <= delay <= cap
    assert policy.delay(attempts + 1) >= delay


def test_record_first_failure():
    policy = RetryPolicy(initial=60, max_age=1000)
    state = record_failure(policy, None, 500.0, code=451, error="greylisted")
    assert state == {
        "attempts": 1, "first_attempt": 500.0, "last_attempt": 500.0,
        "next_attempt": 560.0, "code": 451, "error": "greylisted",
        "expired": False,
    }


def test_record_later_failure_and_expiry():
    policy = RetryPolicy(initial=60, factor=2, max_age=1000)
    first = record_failure(policy, {}, 500.0, code=None, error="refused")
    second = record_failure(policy, first, 600.0, code=421, error="busy")
    assert (second["attempts"], second["first_attempt"], second["next_attempt"]) == (
        2, 500.0, 720.0)
    assert not second["expired"]
    last = record_failure(policy, second, 1500.0, code=421, error="busy")
    assert last["attempts"] == 3 and last["expired"]


@pytest.mark.parametrize("damaged", [
    {"attempts": "many", "first_attempt": "yesterday"},
    {"attempts": True, "first_attempt": math.nan},
    {"attempts": -7, "first_attempt": 10_000.0},  # from the future
])
def test_damaged_state_counts_as_first_failure(damaged):
    state = record_failure(RetryPolicy(), damaged, 100.0, code=None, error="x")
    assert state["attempts"] == 1
    assert state["first_attempt"] == 100.0
