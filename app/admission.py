"""Admission by time: a prediction request is refused when it can no longer be answered within
the latency budget (`LATENCY_BUDGET_MS`), or in an overload, when newer requests take the places
it waited for; every other request is queued and served.

Each worker serves at most `max_concurrency` prediction requests at once. The others wait, in
arrival order, for a free place: a waiting request is a future on a queue and costs no CPU. Its
age counts from the moment the edge forwarded it (nginx stamps `X-Request-Start: t=<epoch
seconds>`), so the time it spent in sockets and in this worker's event loop before it was seen
here is part of it. It is refused with 503 and Retry-After, before its body is read:

* while it waits, at the moment it could no longer be answered in time (its deadline);
* on arrival, when it is already too old to be answered in time and would have to wait
  (soon after an overload, even at a free place);
* on arrival, when `max_queued` requests already wait: a bound on memory, set far above what
  the budget lets wait;
* in an overload, when more arrive than can be answered in time: after waiting a tenth of the
  budget, so that those answered are the newest.

An overload begins when the requests waiting, served at the rate this worker answered while
busy over the last second, would keep a new arrival waiting most of the budget (a standing
queue no closed loop of a healthy cluster forms), and ends when the worker has caught up: a
place is free and nobody waits. For a while after that, half the budget begins the next. In
it, as in "Fail at Scale" (CoDel's short queue timeout with adaptive LIFO):

* a request waits a tenth of the budget at most (`OVERLOAD_WAIT_SHARE`); those waiting longer
  when the overload begins are refused at the first place freed. So the answered are answered
  well within the budget, the refused are refused quickly, and enough still wait to fill the
  places that free;
* the newest waiter gets the next free place (adaptive LIFO);
* deadlines allow for a slow answer, not an average one, as a starved event loop answers late.

Outside an overload waiters are served in arrival order. A request already too old to be
answered in time that finds a place free and nobody waiting is served: it delays nobody (a
request that nginx retried after a dead replica's timeout is such a request). Soon after an
overload it is refused even so: an event loop that fell behind in the overload leaves newer
requests unread in its sockets, where nobody is seen to wait, and would spend its places on
the old ones first.

This is HAProxy's `maxconn` + queue + `timeout queue`, with the timeout derived from one
budget, and "Fail at Scale"'s controlled delay with adaptive LIFO in an overload;
docs/admission.md says why, and why not an adaptive concurrency limit.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Receive, Scope, Send

from app import tracing
from app.api.middleware import json_response, send_copies

REQUEST_START = b"x-request-start"


def parse_request_start(value: bytes) -> float | None:
    """Epoch seconds from an `X-Request-Start` value: `t=1700000000.123` (nginx's `$msec`),
    or integer milliseconds or microseconds, with or without `t=`. None if unreadable."""
    text = value.strip()
    if text.startswith(b"t="):
        text = text[2:]
    try:
        stamp = float(text)
    except ValueError:
        return None
    if not stamp > 0 or stamp == float("inf"):
        return None
    if stamp > 1e14:  # microseconds
        return stamp / 1e6
    if stamp > 1e11:  # milliseconds
        return stamp / 1e3
    return stamp


class EdgeClock:
    """How long ago the edge forwarded a request, from its stamp, with the edge's and this
    host's clocks reconciled.

    The raw age (this host's time minus the stamp) carries the offset between the two clocks.
    The offset is estimated as the smallest raw age seen over the last ten minutes (the "base
    delay" of LEDBAT, RFC 6817: some request always gets through at once) and subtracted, but
    only where it is positive. So a skewed clock shifts nothing; a stamp from a clock that runs
    ahead of this one reads as age 0; and no stamp can make any request but its own look older
    than this host's clock says. (nginx replaces any stamp a client sends; the replicas are
    reachable through it only.)
    """

    def __init__(
        self,
        *,
        bucket_seconds: float = 60.0,
        buckets: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bucket_seconds = bucket_seconds
        self.buckets = buckets
        self.clock = clock
        self._minima: deque[tuple[int, float]] = deque()  # (bucket, smallest raw age in it)
        self._offset = 0.0

    @property
    def offset(self) -> float:
        """The clock offset being subtracted (s, >= 0)."""
        return self._offset

    def age(self, stamp: float) -> float:
        """Seconds since the edge forwarded the request stamped `stamp` (>= 0)."""
        now = self.clock()
        raw = now - stamp
        bucket = int(now // self.bucket_seconds)
        if self._minima and self._minima[-1][0] == bucket:
            if raw < self._minima[-1][1]:
                self._minima[-1] = (bucket, raw)
                self._offset = max(0.0, min(self._offset, raw))
        else:
            self._minima.append((bucket, raw))
            while self._minima[0][0] <= bucket - self.buckets:
                self._minima.popleft()
            self._offset = max(0.0, min(m for _, m in self._minima))
        return max(0.0, raw - self._offset)


@dataclass(slots=True, eq=False)
class _Waiter:
    future: asyncio.Future[bool]  # True: a place was given; False: refused
    arrived: float  # the event loop's time when it began to wait
    deadline: float  # and the last moment at which it can be given a place
    timer: asyncio.TimerHandle | None = field(default=None)
    out: bool = False  # counted out of `waiting`: given a place, refused or cancelled


class Refused(Exception):
    """The request was refused; `reason` is the label it is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# An overload begins at a standing queue of STANDING_SHARE of the budget (the requests waiting,
# drained at the rate answered per second busy over the last RATE_WINDOW s), or of
# REENTRY_SHARE within REENTRY_WINDOW s of the last one's end, and ends when the worker catches
# up; in it a request waits OVERLOAD_WAIT_SHARE of the budget at most, and within REENTRY_WINDOW
# of its end a request too old to be answered in time is refused at a free place too.
# docs/admission.md has the measurements behind them.
STANDING_SHARE = 0.8
REENTRY_SHARE = 0.5
REENTRY_WINDOW = 2.0
RATE_WINDOW = 1.0
OVERLOAD_WAIT_SHARE = 0.1

# The labels refusals are counted under (mnist.rejected's mnist.reason).
BUDGET = "budget"
QUEUE_FULL = "queue_full"


class Admission:
    """One worker's admission queue. All methods run on the worker's event loop."""

    def __init__(
        self,
        *,
        budget: float,
        max_concurrency: int,
        max_queued: int,
        edge_clock: EdgeClock | None = None,
    ) -> None:
        if budget <= 0 or max_concurrency < 1 or max_queued < 0:
            raise ValueError("budget must be > 0, max_concurrency >= 1, max_queued >= 0")
        self.budget = budget
        self.max_concurrency = max_concurrency
        self.max_queued = max_queued
        self.edge_clock = edge_clock or EdgeClock()
        self.active = 0  # requests being served
        self.waiting = 0  # requests waiting for a place (live entries of _queue)
        # Time from admission to the answer, smoothed, and its mean deviation (gains 1/8 and
        # 1/4, as TCP smooths a round trip, RFC 6298).
        self.service_time = 0.0
        self.service_deviation = 0.0
        self.overloads = 0  # overloads begun
        self.overload_arrivals = 0  # requests that arrived in an overload
        self.overload_wait = OVERLOAD_WAIT_SHARE * budget  # the longest wait in an overload
        self._in_overload = False
        self._overload_ended = -math.inf  # when the last overload ended
        self._answered: deque[float] = deque()  # when each answer of the last RATE_WINDOW ended
        self._busy_since: float | None = None  # when the worker went from idle to busy, if busy
        # The busy periods (start, end) that ended within the last RATE_WINDOW, and their total.
        self._busy_periods: deque[tuple[float, float]] = deque()
        self._busy_periods_total = 0.0
        self._queue: deque[_Waiter] = deque()  # in arrival order

    async def enter(self, edge_age: float) -> float:
        """Wait for a place for a request `edge_age` seconds old on arrival. Returns the time
        it waited here; raises `Refused` if it cannot be answered within the budget."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        if not self.active and not self.waiting:
            self._busy_since = started
        overloaded = self._update_overload(started)
        self.overload_arrivals += overloaded
        # How long it can wait and still be answered in time: after the average service, or in
        # an overload (a starved event loop, slow answers) after a slow one (mean + 4 mean
        # deviations, as TCP's retransmission timeout covers a slow round trip), and there no
        # longer than the overload's short wait. None at all: too old to be answered in time.
        patience = self.budget - edge_age - self.service_time
        if self.active < self.max_concurrency and not self.waiting:  # never in an overload
            if patience <= 0 and started - self._overload_ended < REENTRY_WINDOW:
                raise Refused(BUDGET)
            self.active += 1
            return 0.0
        if self.waiting >= self.max_queued:
            raise Refused(QUEUE_FULL)
        if overloaded:
            service = self.service_time + 4 * self.service_deviation
            patience = min(self.budget - edge_age - service, self.overload_wait)
        if patience <= 0:
            raise Refused(BUDGET)
        waiter = _Waiter(loop.create_future(), started, started + patience)
        waiter.timer = loop.call_at(waiter.deadline, self._expire, waiter)
        self._queue.append(waiter)
        self.waiting += 1
        try:
            admitted = await waiter.future
        except asyncio.CancelledError:
            if waiter.future.cancelled():  # cancelled while it waited
                self._count_out(waiter)
            elif waiter.future.result():  # given a place, then cancelled: give it back
                self.leave(0.0, record=False)
            raise
        if not admitted:
            raise Refused(BUDGET)
        return loop.time() - started

    def leave(self, service_seconds: float, *, record: bool = True) -> None:
        """A request admitted by `enter` is done, after `service_seconds` of service."""
        now = asyncio.get_running_loop().time()
        if record:
            self._answered.append(now)
            if self.service_time == 0.0:  # the first measurement
                self.service_time = service_seconds
            else:
                error = service_seconds - self.service_time
                self.service_deviation += (abs(error) - self.service_deviation) / 4
                self.service_time += error / 8
        queue = self._queue
        if self.waiting:
            # In arrival order; in an overload, newest first (adaptive LIFO, "Fail at Scale"),
            # after refusing those that have waited longer than the overload allows: the
            # oldest, who would otherwise hold their connections to their deadlines and,
            # served, be answered at the edge of the budget.
            newest_first = self._update_overload(now)
            if newest_first:
                self._refuse_long_waiting(now)
            take = queue.pop if newest_first else queue.popleft
            while queue:
                waiter = take()
                if waiter.future.done():  # refused, or cancelled (its task may not know yet)
                    self._count_out(waiter)
                    continue
                if waiter.deadline <= now:  # its timer is late (a busy event loop)
                    self._settle(waiter, admitted=False)
                    continue
                self._settle(waiter, admitted=True)
                return  # the place goes straight to the waiter: `active` is unchanged
        queue.clear()  # nobody waits: what is left is counted out
        self.active -= 1
        if not self.active and self._busy_since is not None:  # idle: the busy period ends
            self._busy_periods.append((self._busy_since, now))
            self._busy_periods_total += now - self._busy_since
            self._busy_since = None
            self._busy_time(now)  # drops the periods that ended before the window
        self._update_overload(now)  # a place free and nobody waiting: caught up

    @property
    def overloaded(self) -> bool:
        """Whether this worker is in an overload now (bringing that state up to date)."""
        return self._update_overload(asyncio.get_running_loop().time())

    def _update_overload(self, now: float) -> bool:
        if self._standing(now):
            if not self._in_overload:
                self._in_overload = True
                self.overloads += 1
        elif self._in_overload and not self.waiting and self.active < self.max_concurrency:
            self._in_overload = False  # caught up, as CoDel leaves its dropping state
            self._overload_ended = now
        return self._in_overload

    def _standing(self, now: float) -> bool:
        """Whether the requests waiting, served at the rate answered per second busy over the
        last RATE_WINDOW, would keep a new arrival waiting STANDING_SHARE of the budget. A
        closed loop holds its connections' requests standing by design; one within the budget's
        reach stays below this, as a burst does.

        The rate counts busy time only: an idle spell does not lower it, and the moments a
        closed loop's worker goes idle between batches do not cut its window short. It is read
        from a round of answers (one per place) over a tenth of the window at least. Fewer
        answers say little of the rate: the first of a busy period wait on its first batches
        and on the connections opened with it, tenths of a second on a busy host. Short of a
        round, only a queue that has stood busy for the onset's share of the budget is one (as
        is no answer at all in that time while requests wait).

        Within REENTRY_WINDOW of an overload's end the share is REENTRY_SHARE: under a load
        that goes on exceeding what it answers, a worker still catches up now and then, and
        would otherwise serve a whole standing queue in arrival order, at the edge of the
        budget, before the next overload began. REENTRY_SHARE is still above the queue a closed
        loop holds at the loads the budget is set for (docs/admission.md), so that loop's own
        standing requests do not renew an overload that a stall set off.

        The oldest waiter's age does not lower the share: a stall ages it as a load step does,
        and cuts the second's rate, so that a closed loop's or a steady load's queue after a
        stall would read as an overload (docs/admission.md, run 9)."""
        answered, since = self._answered, now - RATE_WINDOW
        while answered and answered[0] <= since:
            answered.popleft()
        if not self.waiting:
            return False
        share = STANDING_SHARE
        if now - self._overload_ended < REENTRY_WINDOW:
            share = REENTRY_SHARE
        busy = self._busy_time(now)
        a_round = len(answered) >= self.max_concurrency
        least = RATE_WINDOW / 10 if a_round else share * self.budget
        # waiting / (answers / busy) >= share x budget
        return busy >= least and self.waiting * busy >= share * self.budget * len(answered)

    def _busy_time(self, now: float) -> float:
        """The time this worker was busy (a request in progress) in the last RATE_WINDOW."""
        periods, since = self._busy_periods, now - RATE_WINDOW
        while periods and periods[0][1] <= since:
            start, end = periods.popleft()
            self._busy_periods_total -= end - start
        if not periods:
            self._busy_periods_total = 0.0  # no rounding error carried over
        busy = self._busy_periods_total
        if periods and periods[0][0] < since:
            busy -= since - periods[0][0]
        if self._busy_since is not None:
            busy += now - max(self._busy_since, since)
        return busy

    def _refuse_long_waiting(self, now: float) -> None:
        """Refuse the waiters that have waited longer than an overload allows (the oldest, at
        the queue's left end), and drop the entries done among them."""
        queue, since = self._queue, now - self.overload_wait
        while queue and (queue[0].future.done() or queue[0].arrived < since):
            waiter = queue.popleft()
            if waiter.future.done():
                self._count_out(waiter)
            else:
                self._settle(waiter, admitted=False)

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            self._settle(waiter, admitted=False)
        queue = self._queue  # the refused are mostly the oldest: drop them from the left
        while queue and queue[0].future.done():
            self._count_out(queue.popleft())

    def _settle(self, waiter: _Waiter, *, admitted: bool) -> None:
        self._count_out(waiter)
        waiter.future.set_result(admitted)

    def _count_out(self, waiter: _Waiter) -> None:
        """Take `waiter` out of `waiting`, once, and cancel its timer."""
        if not waiter.out:
            waiter.out = True
            self.waiting -= 1
            if waiter.timer is not None:
                waiter.timer.cancel()


class AdmissionMiddleware:
    """Runs every request for a path under `prefix` through `Admission`; answers a refused one
    with 503, Retry-After and a JSON body that says why, without reading its body."""

    def __init__(
        self,
        app: ASGIApp,
        admission: Admission,
        *,
        prefix: str = "/predict",
        on_admit: Callable[[float | None, float], None] | None = None,
        on_refuse: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.admission = admission
        self.prefix = prefix
        self.on_admit = on_admit
        self.on_refuse = on_refuse
        budget_ms = round(admission.budget * 1000)
        retry = (b"retry-after", b"1")
        self._responses = {
            BUDGET: json_response(
                503,
                f"overloaded: this request could not be answered within the {budget_ms} ms "
                "latency budget; retry shortly",
                retry,
            ),
            QUEUE_FULL: json_response(
                503,
                f"overloaded: {admission.max_queued} requests are already waiting on this "
                "worker; retry shortly",
                retry,
            ),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        edge_age: float | None = None
        for name, value in scope["headers"]:
            if name == REQUEST_START:
                stamp = parse_request_start(value)
                if stamp is not None:
                    edge_age = self.admission.edge_clock.age(stamp)
                break
        arrived = time.perf_counter()
        try:
            waited = await self.admission.enter(edge_age or 0.0)
        except Refused as refused:
            if self.on_refuse is not None:
                self.on_refuse(refused.reason)
            trace_step(arrived, edge_age, refused.reason)
            await send_copies(send, self._responses[refused.reason])
            return
        started = time.perf_counter()
        try:
            if self.on_admit is not None:
                self.on_admit(edge_age, waited)
            trace_step(arrived, edge_age, None, started)
            await self.app(scope, receive, send)
        finally:
            self.admission.leave(time.perf_counter() - started)


def trace_step(
    arrived: float, edge_age: float | None, refused: str | None, admitted: float | None = None
) -> None:
    """The request's `mnist.admission.wait` span: its wait here, its age on arrival (the time
    since the edge forwarded it), and why it was refused, if it was."""
    trace = tracing.current()
    if trace is None:
        return
    attributes: dict[str, float | str] = {}
    if edge_age is not None:
        attributes["mnist.edge.wait"] = edge_age
    if refused is not None:
        attributes["mnist.rejected.reason"] = refused
    trace.step("mnist.admission.wait", arrived, admitted or time.perf_counter(), attributes)
