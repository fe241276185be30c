"""Admission by time: a prediction request is refused only when it can no longer be answered
within the latency budget (`LATENCY_BUDGET_MS`); every other request is queued and served.

Each worker serves at most `max_concurrency` prediction requests at once. The others wait, in
arrival order, for a free place: a waiting request is a future on a queue and costs no CPU. Its
age counts from the moment the edge forwarded it (nginx stamps `X-Request-Start: t=<epoch
seconds>`), so the time it spent in sockets and in this worker's event loop before it was seen
here is part of it. It is refused with 503 and Retry-After, before its body is read:

* while it waits, at the moment it could no longer be answered in time (its deadline);
* on arrival, when it would have to wait and is already too old to be answered in time;
* on arrival, in an overload: when it is expected to miss it too (the requests ahead of it,
  served `max_concurrency` at a time in the smoothed service time, would take it past the
  budget), or is past the budget already, even with a place free. Refused at once, it holds no
  connection and its client does not wait;
* on arrival, when `max_queued` requests already wait: a bound on memory, set far above what
  the budget lets wait.

An overload begins when the requests waiting, served at the rate this worker answered over the
last second, would keep a new arrival waiting half the budget (a standing queue no closed loop
of a healthy cluster forms), and lasts while requests keep missing the budget in arrival order.
In it the newest waiter gets the next free place (adaptive LIFO), so that those answered are
answered well within the budget and the oldest reach their deadlines, and the deadlines allow
for a slow answer, not an average one. A waiter that LIFO passed over and that then reaches its
deadline does not prolong the overload: in arrival order it would have been served.

Outside an overload nothing is refused on a forecast, waiters are served in arrival order, and
a request that finds a place free is served whatever its age: serving it delays nobody (a
request that nginx retried after a dead replica's connect timeout is such a request).

This is HAProxy's `maxconn` + queue + `timeout queue`, with the timeout derived from one
budget, and "Fail at Scale"'s adaptive LIFO in an overload; docs/admission.md says why, and
why not CoDel's short timeouts or an adaptive concurrency limit.
"""

from __future__ import annotations

import asyncio
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
    future: asyncio.Future[bool]  # True: a place was given; False: the deadline passed
    number: int  # its place in arrival order
    timer: asyncio.TimerHandle | None = field(default=None)


class Refused(Exception):
    """The request was refused; `reason` is the label it is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# An overload begins at a standing queue of STANDING_SHARE of the budget (the requests waiting,
# drained at the rate answered over the last RATE_WINDOW s of the busy period) and ends
# OVERLOAD_WINDOW s after the last request that missed the budget in arrival order, once the
# queue is below that share. docs/admission.md has the measurements behind them.
STANDING_SHARE = 0.5
RATE_WINDOW = 1.0
OVERLOAD_WINDOW = 1.0

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
        self._in_overload = False
        self._missed_at = -OVERLOAD_WINDOW  # when a request last missed the budget in order
        self._answered: deque[float] = deque()  # when each answer of the last RATE_WINDOW ended
        self._busy_since = 0.0  # when the worker last went from idle to busy
        self._arrivals = 0  # waiters numbered in arrival order
        self._highest_admitted = 0  # the highest arrival number given a place
        self._queue: deque[_Waiter] = deque()

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
        # deviations, as TCP's retransmission timeout covers a slow round trip).
        service = self.service_time
        if overloaded:
            service += 4 * self.service_deviation
        patience = self.budget - edge_age - service
        if self.active < self.max_concurrency and not self.waiting:
            if overloaded and edge_age >= self.budget:  # already late
                raise self._missed(started)
            self.active += 1
            return 0.0
        if self.waiting >= self.max_queued:
            raise Refused(QUEUE_FULL)
        if patience <= 0:
            raise self._missed(started)
        if overloaded:
            # A request expected to miss the budget too (the requests ahead of it, served
            # `max_concurrency` at a time) is refused now, not at its deadline: it holds no
            # connection, and its client does not wait for the refusal.
            expected = (self.waiting + 1) * self.service_time / self.max_concurrency
            if expected >= patience:
                raise self._missed(started)
        self._arrivals += 1
        waiter = _Waiter(loop.create_future(), self._arrivals)
        waiter.timer = loop.call_at(started + patience, self._expire, waiter)
        self._queue.append(waiter)
        self.waiting += 1
        try:
            admitted = await waiter.future
        except asyncio.CancelledError:
            if waiter.future.cancelled():  # cancelled while it waited
                self._forget(waiter)
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
        # In arrival order; in an overload, newest first (adaptive LIFO, "Fail at Scale"): the
        # oldest would wait out most of the budget before being served, if at all, while the
        # newest can still be answered well within it. The oldest then reach their deadlines.
        queue = self._queue
        newest_first = queue and self._update_overload(now)
        take = queue.pop if newest_first else queue.popleft
        while queue:
            waiter = take()
            if waiter.future.done():  # expired or cancelled: already counted out
                continue
            # Under LIFO the oldest expire at the far end; drop them there too, so that a long
            # overload does not keep every expired waiter until arrival order resumes.
            while newest_first and queue and queue[0].future.done():
                queue.popleft()
            self._highest_admitted = max(self._highest_admitted, waiter.number)
            self._settle(waiter, admitted=True)
            return  # the place goes straight to the waiter: `active` is unchanged
        self.active -= 1

    @property
    def overloaded(self) -> bool:
        """Whether this worker is in an overload now (bringing that state up to date)."""
        return self._update_overload(asyncio.get_running_loop().time())

    def _update_overload(self, now: float) -> bool:
        if self._standing(now):
            if not self._in_overload:
                self._in_overload = True
                self.overloads += 1
        elif self._in_overload and now - self._missed_at >= OVERLOAD_WINDOW:
            self._in_overload = False
        return self._in_overload

    def _standing(self, now: float) -> bool:
        """Whether the requests waiting, served at the rate answered over the last RATE_WINDOW
        of this busy period, would keep a new arrival waiting STANDING_SHARE of the budget. A
        closed loop holds its connections' requests standing by design; one within the budget's
        reach stays below this, as a burst does. The rate is read over a tenth of the window
        at least, so a burst after an idle spell is no overload, and no answer at all in that
        time while requests wait is one."""
        start = max(now - RATE_WINDOW, self._busy_since)
        answered = self._answered
        while answered and answered[0] <= start:
            answered.popleft()
        window = now - start
        if not self.waiting or window < RATE_WINDOW / 10:
            return False
        # waiting / (answers / window) >= share x budget
        return self.waiting * window >= STANDING_SHARE * self.budget * len(answered)

    def _missed(self, now: float) -> Refused:
        self._missed_at = now
        return Refused(BUDGET)

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            if waiter.number > self._highest_admitted:  # nobody after it was served first
                self._missed_at = waiter.future.get_loop().time()
            self._settle(waiter, admitted=False)

    def _settle(self, waiter: _Waiter, *, admitted: bool) -> None:
        self.waiting -= 1
        if waiter.timer is not None:
            waiter.timer.cancel()
        waiter.future.set_result(admitted)

    def _forget(self, waiter: _Waiter) -> None:
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
        if self.on_admit is not None:
            self.on_admit(edge_age, waited)
        started = time.perf_counter()
        trace_step(arrived, edge_age, None, started)
        try:
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
