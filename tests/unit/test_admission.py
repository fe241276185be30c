"""Admission by time: the stamp, the clocks, the queue, the refusals (app/admission.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from app.admission import (
    BUDGET,
    QUEUE_FULL,
    RATE_WINDOW,
    REENTRY_WINDOW,
    STANDING_SHARE,
    Admission,
    AdmissionMiddleware,
    EdgeClock,
    Refused,
    parse_request_start,
)
from app.config import Settings
from app.main import create_app
from tests.helpers import FakeModel, digit_image, png_bytes

# -- the stamp ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"t=1700000000.123", 1700000000.123),  # nginx: "t=${msec}"
        (b"1700000000.123", 1700000000.123),
        (b"t=1700000000123", 1700000000.123),  # milliseconds
        (b"t=1700000000123456", 1700000000.123456),  # microseconds
        (b"  t=1700000000.5 ", 1700000000.5),
    ],
)
def test_request_start_formats(value: bytes, seconds: float) -> None:
    assert parse_request_start(value) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize(
    "value", [b"", b"t=", b"t=soon", b"t=-5", b"t=0", b"t=inf", b"t=nan", b"t=1e400", b"1,5"]
)
def test_unreadable_stamps_are_ignored(value: bytes) -> None:
    assert parse_request_start(value) is None


# -- the clocks -----------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_age_with_synchronised_clocks() -> None:
    clock = Clock()
    edge = EdgeClock(clock=clock)
    assert edge.age(clock.now) == 0.0  # forwarded just now
    assert edge.age(clock.now - 0.25) == pytest.approx(0.25)
    assert edge.offset == 0.0


def test_a_clock_running_ahead_of_the_edge_is_corrected() -> None:
    clock = Clock()
    edge = EdgeClock(clock=clock)
    skew = 5.0  # this host's clock is 5 s ahead of the edge's
    assert edge.age(clock.now - skew - 0.001) == pytest.approx(0.0)  # a request seen at once
    assert edge.age(clock.now - skew - 0.3) == pytest.approx(0.299)  # one that waited 300 ms
    assert edge.offset == pytest.approx(skew + 0.001)


def test_a_clock_running_behind_the_edge_reads_as_no_wait() -> None:
    clock = Clock()
    edge = EdgeClock(clock=clock)
    assert edge.age(clock.now + 2.0) == 0.0  # the stamp is "in the future"
    assert edge.offset == 0.0
    assert edge.age(clock.now - 0.1) == pytest.approx(0.1)  # and nothing else is shifted


def test_a_forged_stamp_ages_no_other_request() -> None:
    clock = Clock()
    edge = EdgeClock(clock=clock)
    edge.age(clock.now - 1.0)  # this host runs 1 s ahead
    assert edge.age(clock.now - 3600) == pytest.approx(3599)  # only itself is old
    assert edge.age(clock.now - 1.05) == pytest.approx(0.05)
    # From the future: read as no wait; at worst it takes the correction away for a while,
    # and no request reads older than this host's clock says.
    assert edge.age(clock.now + 3600) == 0.0
    assert edge.offset == 0.0
    assert edge.age(clock.now - 1.05) == pytest.approx(1.05)


def test_the_offset_follows_a_clock_change_within_the_window() -> None:
    clock = Clock()
    edge = EdgeClock(bucket_seconds=60, buckets=10, clock=clock)
    edge.age(clock.now - 2.0)  # 2 s of skew
    assert edge.offset == pytest.approx(2.0)
    clock.now += 60  # a minute later the skew is corrected (NTP) to 0.5 s
    edge.age(clock.now - 0.5)
    assert edge.offset == pytest.approx(0.5)
    clock.now += 30
    assert edge.age(clock.now - 0.7) == pytest.approx(0.2)
    # Ten minutes on, both earlier minima have left the window.
    clock.now += 600
    edge.age(clock.now - 1.0)
    assert edge.offset == pytest.approx(1.0)


# -- the queue ------------------------------------------------------------------------------


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def admission(**overrides: Any) -> Admission:
    options: dict[str, Any] = {"budget": 0.5, "max_concurrency": 2, "max_queued": 8}
    return Admission(**{**options, **overrides})


async def queue_up(gate: Admission, n: int) -> tuple[list[int], list[asyncio.Task[None]]]:
    """n requests queued at a full `gate`, numbered in arrival order, and the list that records
    the order in which they are given places."""
    order: list[int] = []

    async def wait(number: int) -> None:
        await gate.enter(0.0)
        order.append(number)

    before = gate.waiting
    tasks = [asyncio.create_task(wait(number)) for number in range(n)]
    await asyncio.sleep(0)
    assert gate.waiting == before + n
    return order, tasks


async def standing(gate: Admission, n: int) -> list[asyncio.Task[float]]:
    """n requests waiting at a full `gate` until their queue is a standing one: an overload."""
    waiters = [asyncio.create_task(gate.enter(0.0)) for _ in range(n)]
    await asyncio.sleep(STANDING)
    assert gate.overloaded
    return waiters


async def serve(gate: Admission, tasks: list[asyncio.Task[None]], service: float) -> None:
    """One answer, of `service` seconds, for each of `tasks`: each frees a place for the next."""
    for _ in tasks:
        gate.leave(service)
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)


async def all_refused(tasks: list[asyncio.Task[float]]) -> None:
    """Each of `tasks`, requests that waited, was refused."""
    for task in tasks:
        with pytest.raises(Refused):
            await task


def test_free_places_admit_at_once() -> None:
    async def scenario() -> None:
        gate = admission(budget=0.1)
        assert await gate.enter(0.09) == 0.0
        assert await gate.enter(0.0) == 0.0
        assert gate.active == 2

    run(scenario)


def test_soon_after_an_overload_a_request_too_old_is_refused_at_a_free_place() -> None:
    async def scenario() -> None:
        # At a free place with nobody waiting a request too old to be answered in time delays
        # nobody (nginx's retry after a dead replica's timeout). Soon after an overload the
        # worker's sockets may hold newer requests unread: it is refused.
        gate = admission(budget=0.1, max_concurrency=4)
        gate.service_time = 0.01
        await gate.enter(0.0)
        assert await gate.enter(5.0) == 0.0  # no overload yet: served
        gate._overload_ended = asyncio.get_running_loop().time()  # one has just ended
        with pytest.raises(Refused):
            await gate.enter(0.095)  # 0.095 s old + 0.01 s of service: past the budget
        with pytest.raises(Refused):
            await gate.enter(5.0)
        assert await gate.enter(0.085) == 0.0  # still in time
        assert (gate.active, gate.waiting) == (3, 0)
        gate._overload_ended -= REENTRY_WINDOW  # long ago
        assert await gate.enter(5.0) == 0.0

    run(scenario)


def test_waiters_get_places_in_arrival_order() -> None:
    async def scenario() -> None:
        gate = admission(max_concurrency=1)
        await gate.enter(0.0)
        order, tasks = await queue_up(gate, 4)
        await serve(gate, tasks, 0.001)
        assert order == [0, 1, 2, 3]
        assert gate.active == 1  # the last one holds the place
        assert gate.waiting == 0
        gate.leave(0.001)
        assert gate.active == 0

    run(scenario)


# An overload begins at a standing queue: the requests waiting, at the rate answered per second
# busy (from a round of answers over a tenth of RATE_WINDOW at least), would keep a new one
# waiting most of the budget. With no answer at all, requests that have waited that much of the
# 500-ms budget, the worker busy throughout, are such a queue.
STANDING = STANDING_SHARE * 0.5 + 0.03


def test_a_standing_queue_is_an_overload() -> None:
    async def scenario() -> None:
        gate = admission(budget=0.5, max_concurrency=1)
        await gate.enter(0.0)
        _, tasks = await queue_up(gate, 3)
        assert not gate.overloaded  # a queue, not yet a standing one
        await asyncio.sleep(STANDING)
        assert gate.overloaded
        assert gate.overloads == 1
        gate.leave(0.001)
        await asyncio.gather(*tasks, return_exceptions=True)

    run(scenario)


def test_a_slow_start_short_of_a_round_of_answers_is_no_overload_until_it_stands() -> None:
    async def scenario() -> None:
        # A closed loop's connections reach an idle worker at once: its first answers wait on
        # the batches and on the new connections. One answer in ~0.2 s is no rate to forecast
        # from; the same queue still standing at 80 % of the budget is an overload.
        gate = admission(budget=0.5, max_concurrency=4, max_queued=100)
        for _ in range(4):
            await gate.enter(0.0)
        _, tasks = await queue_up(gate, 6)
        await asyncio.sleep(0.2)
        gate.leave(0.2)  # one answer; its place goes to the first waiter
        assert not gate.overloaded  # under the old forecast: 5 x 0.2 s >= 0.4 s x 1 answer
        await asyncio.sleep(STANDING - 0.2)
        assert gate.overloaded
        for _ in range(9):
            gate.leave(0.001)
        await asyncio.gather(*tasks, return_exceptions=True)

    run(scenario)


def test_idle_moments_between_batches_do_not_cut_the_rate_short() -> None:
    async def scenario() -> None:
        # A closed loop's worker goes idle for moments between batches. The rate is what it
        # answered per second busy over the last second, so a stall just after such a moment
        # is judged against the second's answers, not against the few since.
        gate = admission(budget=0.5, max_concurrency=2, max_queued=100)
        loop = asyncio.get_running_loop()
        started = loop.time()
        while loop.time() - started < 0.5:  # ~40 answers in batches of 2, idle in between
            for _ in range(2):
                await gate.enter(0.0)
            await asyncio.sleep(0.01)
            for _ in range(2):
                gate.leave(0.01)
            await asyncio.sleep(0.002)
        assert len(gate._answered) >= 2 * gate.max_concurrency
        for _ in range(2):
            await gate.enter(0.0)
        _, tasks = await queue_up(gate, 5)
        await asyncio.sleep(0.15)  # a stall: nothing answered, five waiting
        # The old window began with this busy period: five waiting, none answered in 0.15 s.
        assert not gate.overloaded
        for _ in range(7):
            gate.leave(0.001)
        await asyncio.gather(*tasks)
        assert gate.overloads == 0
        assert gate._busy_time(loop.time()) <= RATE_WINDOW

    run(scenario)


def test_a_missed_budget_alone_is_no_overload() -> None:
    async def scenario() -> None:
        # A closed loop's connections keep a short queue standing; a stall makes one request
        # miss the budget. The others are still served in arrival order, none refused for
        # having waited: serving the newest first would starve the oldest past the budget.
        gate = admission(budget=0.2, max_concurrency=1)
        gate.service_time = 0.01
        await gate.enter(0.0)
        with pytest.raises(Refused):
            await gate.enter(0.15)  # 40 ms of patience: it misses its deadline
        order, tasks = await queue_up(gate, 3)
        assert not gate.overloaded
        await serve(gate, tasks, 0.01)
        assert order == [0, 1, 2]
        assert (gate.overloads, gate.overload_arrivals) == (0, 0)

    run(scenario)


def test_in_an_overload_the_long_waiting_are_refused_and_the_newest_served_first() -> None:
    async def scenario() -> None:
        gate = admission(budget=0.5, max_concurrency=1, max_queued=100)  # waits of 50 ms
        await gate.enter(0.0)
        oldest = await standing(gate, 8)  # 130 ms waited, each within its 500-ms deadline
        order, newest = await queue_up(gate, 3)
        assert gate.overload_arrivals == 3
        loop = asyncio.get_running_loop()
        started = loop.time()
        await serve(gate, newest, 0.001)
        # At the first place freed, not at their deadlines, those that have waited longer
        # than an overload allows are refused; the places go to the newest first.
        for task in oldest:
            with pytest.raises(Refused) as refused:
                await task
            assert refused.value.reason == BUDGET
        assert loop.time() - started < 0.05
        assert order == [2, 1, 0]
        assert len(gate._queue) == 0  # the refused are dropped from the far end too

    run(scenario)


def test_in_an_overload_a_request_waits_a_tenth_of_the_budget_at_most() -> None:
    async def scenario() -> None:
        gate = admission(budget=0.5, max_concurrency=1)
        await gate.enter(0.0)
        oldest = await standing(gate, 3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Refused) as refused:
            await gate.enter(0.0)  # no place frees: refused after 50 ms, not after 500
        assert refused.value.reason == BUDGET
        assert 0.04 <= loop.time() - started < 0.3
        gate.leave(0.001)
        await all_refused(oldest)

    run(scenario)


def test_in_an_overload_a_new_request_is_not_refused_for_the_queue_ahead_of_it() -> None:
    async def scenario() -> None:
        # Newest first, a new request is next in line whatever the queue: a forecast from its
        # place in arrival order would refuse the newest and serve the oldest, at the edge of
        # the budget.
        gate = admission(budget=0.5, max_concurrency=2, max_queued=100)
        for _ in range(2):
            await gate.enter(0.0)
        oldest = await standing(gate, 20)
        gate.service_time = 0.1  # in arrival order, 20 x 100 ms / 2 ahead of a new request
        newest = asyncio.create_task(gate.enter(0.0))
        await asyncio.sleep(0)
        assert not newest.done()
        gate.leave(0.1)
        assert await newest == pytest.approx(0.0, abs=0.03)
        await all_refused(oldest)

    run(scenario)


def test_an_overload_ends_when_the_worker_catches_up() -> None:
    async def scenario() -> None:
        gate = admission(budget=0.5, max_concurrency=1)
        await gate.enter(0.0)
        oldest = await standing(gate, 2)
        gate.leave(0.001)  # the two have waited too long; nobody is left to take the place
        assert not gate._in_overload  # that place, given to nobody, ended it
        await all_refused(oldest)
        assert (gate.active, gate.waiting) == (0, 0)
        assert not gate.overloaded
        assert gate.overloads == 1
        # A request in time takes the free place; one too old for the budget is refused
        # there, so soon after the overload.
        with pytest.raises(Refused):
            await gate.enter(5.0)
        assert await gate.enter(0.0) == 0.0
        gate.leave(0.001)
        # Once the stall's busy time has left the rate's window, arrival order and whole
        # deadlines again (within it, one answer in 0.43 s busy makes three waiting a
        # standing queue).
        await asyncio.sleep(RATE_WINDOW)
        await gate.enter(0.0)
        order, tasks = await queue_up(gate, 3)
        await serve(gate, tasks, 0.001)
        assert order == [0, 1, 2]
        assert gate.overloads == 1

    run(scenario)


async def queue_at_rate(
    gate: Admission, oldest_age: float = 0.0
) -> tuple[bool, list[asyncio.Task[float]]]:
    """With one of `gate`'s two places held: ten answers, then 25 requests waiting for 0.12 s,
    the first of them `oldest_age` old on arrival. At the rate answered (ten in the last
    second's 0.12 s busy), a queue of ~0.3 s: over half of a 500-ms budget, under 80 % of it.
    Whether that is an overload, and the waiters."""
    await gate.enter(0.0)  # held throughout: the busy period begins
    for _ in range(10):
        await gate.enter(0.0)
        gate.leave(0.001)
    ages = [0.0, oldest_age] + [0.0] * 24  # the first is served
    tasks = [asyncio.create_task(gate.enter(age)) for age in ages]
    await asyncio.sleep(0.12)
    assert gate.waiting == 25
    return gate.overloaded, tasks


def test_soon_after_an_overload_ends_a_short_standing_queue_begins_the_next() -> None:
    async def scenario() -> None:
        gate = admission(budget=0.5, max_concurrency=2, max_queued=100)
        for _ in range(2):
            await gate.enter(0.0)
        (oldest,) = await standing(gate, 1)
        gate.leave(0.001)  # the waiter is refused; a place is free: the overload ends
        with pytest.raises(Refused):
            await oldest
        gate.leave(0.001)
        assert not gate.overloaded
        await asyncio.sleep(RATE_WINDOW)  # the stall's busy time leaves the rate's window
        overloaded, tasks = await queue_at_rate(gate)
        assert overloaded  # within REENTRY_WINDOW of the end: a shorter queue will do
        assert gate.overloads == 2
        for _ in range(2):  # the first refuses the 25, who have waited too long
            gate.leave(0.001)
        await asyncio.gather(*tasks, return_exceptions=True)
        assert (gate.active, gate.waiting) == (0, 0)
        assert not gate.overloaded
        await asyncio.sleep(REENTRY_WINDOW)
        overloaded, tasks = await queue_at_rate(gate)
        assert not overloaded  # later, most of the budget again
        for _ in range(27):  # the 25 are served, then the two places freed
            gate.leave(0.001)
        await asyncio.gather(*tasks)
        assert (gate.active, gate.waiting, gate.overloads) == (0, 0, 2)

    run(scenario)


def test_an_old_waiter_does_not_lower_the_onset() -> None:
    async def scenario() -> None:
        # A stall ages the oldest waiter as a load step does. Its age does not lower the onset:
        # a queue under 80 % of the budget by the forecast is served in arrival order, whether
        # its oldest is 0.12 or 0.42 s old (the lower onset set off overloads below the
        # saturation, docs/admission.md, run 9).
        for oldest_age in (0.0, 0.3):
            gate = admission(budget=0.5, max_concurrency=2, max_queued=100)
            overloaded, tasks = await queue_at_rate(gate, oldest_age)
            assert not overloaded, oldest_age
            while gate.active:  # the 25 served, then the two places freed
                gate.leave(0.001)
            await asyncio.gather(*tasks)
            assert (gate.waiting, gate.overloads) == (0, 0)

    run(scenario)


def test_a_waiter_whose_timer_is_late_is_not_given_a_place_past_its_deadline() -> None:
    async def scenario() -> None:
        gate = admission(budget=0.2, max_concurrency=1)
        gate.service_time = 0.1
        await gate.enter(0.0)
        waiter = asyncio.create_task(gate.enter(0.05))  # 50 ms of patience
        await asyncio.sleep(0)
        time.sleep(0.08)  # noqa: ASYNC251 (the event loop busy past the waiter's deadline)
        gate.leave(0.1)  # and a place frees before its timer could run
        with pytest.raises(Refused):
            await waiter
        assert (gate.active, gate.waiting) == (0, 0)

    run(scenario)


def test_a_waiter_is_refused_when_it_can_no_longer_be_answered_in_time() -> None:
    async def scenario() -> None:
        gate = admission(budget=0.2, max_concurrency=1)
        await gate.enter(0.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Refused) as refused:
            await gate.enter(0.05)  # 50 ms old on arrival: 150 ms of patience left
        waited = loop.time() - started
        assert refused.value.reason == BUDGET
        assert 0.14 <= waited < 1.0
        assert gate.waiting == 0
        gate.leave(0.001)
        assert gate.active == 0  # the expired waiter was never given the place

    run(scenario)


def test_the_expected_service_time_is_part_of_the_deadline() -> None:
    async def scenario() -> None:
        gate = admission(budget=0.3, max_concurrency=1)
        await gate.enter(0.0)
        gate.leave(0.2)  # the first answer took 200 ms
        assert gate.service_time == pytest.approx(0.2)
        await gate.enter(0.0)
        gate.leave(0.04)
        assert gate.service_time == pytest.approx(0.2 + (0.04 - 0.2) / 8)
        await gate.enter(0.0)
        gate.service_time = 0.1
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Refused):
            # 300 ms budget - 100 ms of service, first in line (100 ms): 100 ms to wait at most
            await gate.enter(0.0)
        assert 0.09 <= loop.time() - started < 0.25

    run(scenario)


def test_a_request_already_too_old_to_wait_is_refused_at_once() -> None:
    async def scenario() -> None:
        gate = admission(budget=0.5, max_concurrency=1)
        await gate.enter(0.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Refused) as refused:
            await gate.enter(0.6)
        assert refused.value.reason == BUDGET
        assert loop.time() - started < 0.05
        assert gate.waiting == 0

    run(scenario)


def test_the_safety_bound_refuses_at_once() -> None:
    async def scenario() -> None:
        gate = admission(max_concurrency=1, max_queued=2)
        await gate.enter(0.0)
        waiters = [asyncio.create_task(gate.enter(0.0)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Refused) as refused:
            await gate.enter(0.0)
        assert refused.value.reason == QUEUE_FULL
        for _ in range(3):
            gate.leave(0.0)
        await asyncio.gather(*waiters)
        assert (gate.active, gate.waiting) == (0, 0)

    run(scenario)


def test_a_cancelled_waiter_leaves_the_queue_and_loses_no_place() -> None:
    async def scenario() -> None:
        gate = admission(max_concurrency=1)
        await gate.enter(0.0)
        gone = asyncio.create_task(gate.enter(0.0))
        kept = asyncio.create_task(gate.enter(0.0))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        assert gate.waiting == 1
        gate.leave(0.0)  # skips the cancelled waiter
        assert await kept == pytest.approx(0.0, abs=0.5)
        assert gate.active == 1
        # Given a place, then cancelled before it could use it: the place is given back.
        late = asyncio.create_task(gate.enter(0.0))
        await asyncio.sleep(0)
        gate.leave(0.0)  # the place goes to `late`...
        late.cancel()  # ...which is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await late
        assert (gate.active, gate.waiting) == (0, 0)

    run(scenario)


def test_a_waiter_cancelled_before_its_task_resumes_loses_no_place() -> None:
    async def scenario() -> None:
        gate = admission(max_concurrency=1)
        await gate.enter(0.0)
        gone = asyncio.create_task(gate.enter(0.0))
        await asyncio.sleep(0)
        gone.cancel()  # its future is cancelled at once; its task resumes later
        gate.leave(0.0)  # and a place frees in between
        assert (gate.active, gate.waiting) == (0, 0)
        assert await gate.enter(0.0) == 0.0  # the next request takes the free place
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert (gate.active, gate.waiting) == (1, 0)

    run(scenario)


def test_invalid_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="budget must be > 0"):
        Admission(budget=0, max_concurrency=1, max_queued=1)
    with pytest.raises(ValueError, match="max_concurrency >= 1"):
        Admission(budget=1, max_concurrency=0, max_queued=1)


# -- the middleware -------------------------------------------------------------------------


class Held:
    """An ASGI app that answers 200 once released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(
    app: AdmissionMiddleware,
    path: str = "/predict",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, dict[bytes, bytes], bytes, int]:
    sent: list[Message] = []
    read = 0

    async def receive() -> Message:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST", "headers": headers or []}
    await app(scope, receive, send)
    body = b"".join(m["body"] for m in sent[1:])
    return sent[0]["status"], dict(sent[0]["headers"]), body, read


def stamp(age: float) -> list[tuple[bytes, bytes]]:
    return [(b"x-request-start", f"t={time.time() - age:.3f}".encode())]


def test_refusals_are_json_503_with_retry_after_and_the_body_unread() -> None:
    async def scenario() -> None:
        inner = Held()
        refused: list[str] = []
        admitted: list[tuple[float | None, float]] = []
        gate = admission(budget=0.3, max_concurrency=1, max_queued=1)
        gate.edge_clock.age(time.time())  # a request seen at once: the clocks agree
        app = AdmissionMiddleware(
            inner,
            gate,
            on_refuse=refused.append,
            on_admit=lambda edge, wait: admitted.append((edge, wait)),
        )
        held = asyncio.create_task(call(app, headers=stamp(0.02)))
        await asyncio.sleep(0.01)
        waiting = asyncio.create_task(call(app))  # no stamp: its age counts from here
        await asyncio.sleep(0.01)

        status, headers, body, read = await call(app)  # the queue's one place is taken
        assert (status, read) == (503, 0)
        assert headers[b"retry-after"] == b"1"
        assert headers[b"content-type"] == b"application/json"
        assert "already waiting" in json.loads(body)["detail"]

        status, _, body, read = await waiting  # its deadline passes
        assert (status, read) == (503, 0)
        assert "300 ms latency budget" in json.loads(body)["detail"]
        assert refused == [QUEUE_FULL, BUDGET]

        inner.release.set()
        assert (await held)[0] == 200
        ((edge, wait),) = admitted
        assert edge == pytest.approx(0.02, abs=0.015)  # from the stamp (ms resolution)
        assert wait == 0.0
        assert (gate.active, gate.waiting) == (0, 0)

    run(scenario)


def test_only_prediction_paths_are_admitted() -> None:
    async def scenario() -> None:
        inner = Held()
        inner.release.set()
        gate = admission(max_concurrency=1, max_queued=0)
        gate.active = 1  # as if a prediction were being served, nothing may wait
        app = AdmissionMiddleware(inner, gate)
        assert (await call(app, "/readyz"))[0] == 200
        assert (await call(app, "/healthz"))[0] == 200
        assert (await call(app, "/predict/batch"))[0] == 503

    run(scenario)


def test_a_failing_request_gives_its_place_back() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    async def scenario() -> None:
        gate = admission(max_concurrency=1)
        app = AdmissionMiddleware(broken, gate)
        for _ in range(3):
            with pytest.raises(RuntimeError):
                await call(app)
        assert gate.active == 0

    run(scenario)


# -- through the app ------------------------------------------------------------------------


def test_the_app_queues_then_refuses_past_its_budget(settings: Settings) -> None:
    gate = threading.Event()

    class SlowModel(FakeModel):
        def predict(self, batch: np.ndarray) -> np.ndarray:
            gate.wait(5)  # held closed while the test sends a second request
            return super().predict(batch)

    tight = settings.model_copy(update={"max_concurrency": 1, "latency_budget_ms": 200.0})
    app = create_app(tight, model_loader=lambda _s: SlowModel())
    files = {"file": ("d.png", png_bytes(digit_image()), "image/png")}
    gate.set()
    with TestClient(app) as client:
        gate.clear()
        first: list[int] = []
        holder = threading.Thread(
            target=lambda: first.append(client.post("/predict", files=files).status_code)
        )
        holder.start()
        while app.state.admission.active == 0:
            time.sleep(0.005)
        started = time.monotonic()
        refused = client.post("/predict", files=files)
        waited = time.monotonic() - started
        gate.set()
        holder.join(10)
        assert first == [200]
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "200 ms latency budget" in refused.json()["detail"]
        assert refused.headers["x-served-by"]  # which worker refused it
        assert waited >= 0.15  # it waited for a place before being refused
        assert client.post("/predict", files=files).status_code == 200
