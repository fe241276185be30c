"""Dynamic batching of concurrent requests inside one worker.

Requests put their image on a bounded queue and await a future. One runner task takes whatever
is queued (up to `max_batch_size`) and runs it through the model on a dedicated inference
thread, so the event loop keeps accepting requests, and answering health checks, meanwhile.
Whatever arrives during one batch forms the next: under load batches grow by themselves; a lone
request is run at once. `max_wait` lets a partly filled batch wait for more, but only when other
requests are already queued, so it never delays a request on an idle server.

A full queue rejects at once (`Overloaded`, answered 503 with Retry-After): under overload,
latency stays bounded instead of growing with the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

Pixels = npt.NDArray[np.float32]
Predict = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


class Overloaded(Exception):
    """The queue is full, or the worker is shutting down: try again shortly. `reason` is the
    label the refusal is counted under."""

    def __init__(
        self, detail: str, retry_after: int = 1, reason: str = "inference_queue_full"
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        self.reason = reason


def shutting_down() -> Overloaded:
    return Overloaded("the worker is shutting down", reason="shutting_down")


class InferenceError(RuntimeError):
    """The model failed on a batch (a server fault, not the client's)."""


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """What one batch did, for telemetry (times: `time.perf_counter`)."""

    number: int  # this batcher's batches, counted from 1
    size: int
    started: float
    finished: float
    queue_waits: Sequence[float]  # per image, from enqueue to the start of its batch
    tags: Sequence[object]  # per image, the `tag` it was queued with
    error: str | None = None  # the exception's type when the batch failed

    @property
    def inference_seconds(self) -> float:
        return self.finished - self.started


@dataclass(slots=True)
class _Item:
    pixels: Pixels
    future: asyncio.Future[Pixels]
    enqueued: float
    tag: object


class Batcher:
    def __init__(
        self,
        predict: Predict,
        *,
        max_batch_size: int,
        max_queue: int,
        max_wait: float = 0.0,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait >= 0")
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_wait = max_wait
        self._on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._pending = asyncio.Event()  # the queue is not empty
        self._full = asyncio.Event()  # the queue holds a full batch
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._in_flight: list[_Item] = []
        self._batches = 0
        self._idle = asyncio.Event()  # nothing queued and nothing running
        self._idle.set()

    @property
    def depth(self) -> int:
        """Images waiting for inference (not counting the batch being run)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self, grace: float = 10.0) -> None:
        """Refuse new work, finish what is queued (for up to `grace` seconds), then stop."""
        self._closing = True
        if self.running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in [*self._in_flight, *self._queue]:
            if not item.future.done():
                item.future.set_exception(shutting_down())
        self._queue.clear()
        self._in_flight = []
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def predict(self, pixels: Pixels, tag: object = None) -> Pixels:
        """Class probabilities for one normalised 28x28 image. `tag` is handed back with the
        batch's record (the request's trace)."""
        (result,) = await self.predict_many([pixels], tag)
        return result

    def check_room(self, images: int) -> None:
        """Raise `Overloaded` unless the queue has room for `images` more."""
        if len(self._queue) + images > self.max_queue:
            raise Overloaded(
                f"the inference queue is full ({len(self._queue)}/{self.max_queue} images)"
            )

    async def predict_many(self, images: Sequence[Pixels], tag: object = None) -> list[Pixels]:
        """Class probabilities for each image; all are admitted to the queue, or none."""
        if self._closing or not self.running:
            raise shutting_down()
        self.check_room(len(images))
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures = []
        for pixels in images:
            future: asyncio.Future[Pixels] = loop.create_future()
            self._queue.append(_Item(pixels, future, now, tag))
            futures.append(future)
        self._idle.clear()
        self._pending.set()
        if len(self._queue) >= self.max_batch_size:
            self._full.set()
        if len(futures) == 1:
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._pending.clear()
                self._idle.set()
                await self._pending.wait()
                continue
            if self.max_wait > 0 and 1 < len(self._queue) < self.max_batch_size:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self.max_wait)
            batch: list[_Item] = []
            while self._queue and len(batch) < self.max_batch_size:
                item = self._queue.popleft()
                if not item.future.done():  # its client went away: skip it
                    batch.append(item)
            if not batch:
                continue
            self._in_flight = batch
            self._batches += 1
            started = time.perf_counter()
            try:
                probabilities = await loop.run_in_executor(
                    self._executor, self._infer, [item.pixels for item in batch]
                )
            except Exception as exc:
                log.exception("inference failed on a batch of %d", len(batch))
                error = InferenceError(f"inference failed: {type(exc).__name__}")
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                self._in_flight = []
                self._record(batch, started, time.perf_counter(), type(exc).__name__)
                continue
            finished = time.perf_counter()
            for item, row in zip(batch, probabilities, strict=True):
                if not item.future.done():
                    item.future.set_result(row)
            self._in_flight = []
            self._record(batch, started, finished, None)

    def _record(
        self, batch: list[_Item], started: float, finished: float, error: str | None
    ) -> None:
        """Tell the batch's telemetry what it did (its results are already handed out)."""
        if self._on_batch is None:
            return
        try:
            self._on_batch(
                BatchRecord(
                    number=self._batches,
                    size=len(batch),
                    started=started,
                    finished=finished,
                    queue_waits=[started - item.enqueued for item in batch],
                    tags=[item.tag for item in batch],
                    error=error,
                )
            )
        except Exception:  # telemetry must never break serving
            log.exception("on_batch callback failed")

    def _infer(self, images: list[Pixels]) -> npt.NDArray[np.float32]:
        batch = np.stack(images)[..., None]
        probabilities = self._predict(batch)
        if probabilities.shape != (len(images), 10):
            raise InferenceError(f"the model returned shape {probabilities.shape}")
        return probabilities
