"""The batching queue: ordering, batch formation, bounds, overload, failures, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from app.inference.batcher import Batcher, BatchRecord, InferenceError, Overloaded


def image(value: float) -> np.ndarray:
    return np.full((28, 28), value, np.float32)


class Recorder:
    """A model whose answer encodes its input (class = round(10 * pixel value)), which can be
    held at a gate to let a queue build up."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.thread_names: set[str] = set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.gate.wait(5)
        self.thread_names.add(threading.current_thread().name)
        if self.delay:
            time.sleep(self.delay)
        classes = np.rint(batch[:, 0, 0, 0] * 10).astype(int)
        self.batches.append(classes.tolist())
        out = np.zeros((len(batch), 10), np.float32)
        out[np.arange(len(batch)), classes] = 1.0
        return out


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_each_request_gets_its_own_answer_in_order() -> None:
    async def main() -> None:
        model = Recorder()
        batcher = Batcher(model, max_batch_size=4, max_queue=100)
        batcher.start()
        values = [i % 10 / 10 for i in range(25)]
        results = await asyncio.gather(*(batcher.predict(image(v)) for v in values))
        assert [int(r.argmax()) for r in results] == [round(v * 10) for v in values]
        many = await batcher.predict_many([image(0.3), image(0.7), image(0.1)])
        assert [int(r.argmax()) for r in many] == [3, 7, 1]
        await batcher.stop()
        assert all(len(b) <= 4 for b in model.batches)
        assert model.thread_names == {"inference_0"}  # never the event loop's thread

    run(main())


def test_concurrent_requests_are_batched_while_the_model_is_busy() -> None:
    async def main() -> None:
        model = Recorder()
        records: list[BatchRecord] = []
        batcher = Batcher(model, max_batch_size=8, max_queue=100, on_batch=records.append)
        batcher.start()
        model.gate.clear()  # the first batch blocks: the rest queue up behind it
        tasks = [asyncio.create_task(batcher.predict(image(0.5)))]
        await asyncio.sleep(0.02)
        tasks += [asyncio.create_task(batcher.predict(image(0.5))) for _ in range(16)]
        await asyncio.sleep(0.05)
        model.gate.set()
        await asyncio.gather(*tasks)
        await batcher.stop()
        # The first request runs alone; the 16 that queued meanwhile go as two full batches.
        assert [len(b) for b in model.batches] == [1, 8, 8]
        assert [r.size for r in records] == [1, 8, 8]
        assert all(len(r.queue_waits) == r.size for r in records)
        assert max(records[1].queue_waits) >= 0.04

    run(main())


def test_a_lone_request_never_waits_for_a_batch_to_fill() -> None:
    async def main() -> None:
        batcher = Batcher(Recorder(), max_batch_size=32, max_queue=10, max_wait=0.5)
        batcher.start()
        start = time.perf_counter()
        await batcher.predict(image(0.2))
        elapsed = time.perf_counter() - start
        await batcher.stop()
        assert elapsed < 0.25  # far below max_wait

    run(main())


def test_max_wait_lets_a_queued_batch_fill_up() -> None:
    async def main() -> None:
        model = Recorder()
        batcher = Batcher(model, max_batch_size=4, max_queue=100, max_wait=0.2)
        batcher.start()
        model.gate.clear()
        first = asyncio.create_task(batcher.predict(image(0.1)))
        await asyncio.sleep(0.02)
        # Two queued behind the running batch: the next batch waits for two more.
        queued = [asyncio.create_task(batcher.predict(image(0.2))) for _ in range(2)]
        await asyncio.sleep(0.02)
        model.gate.set()
        await asyncio.sleep(0.05)
        late = [asyncio.create_task(batcher.predict(image(0.3))) for _ in range(2)]
        await asyncio.gather(first, *queued, *late)
        await batcher.stop()
        assert model.batches == [[1], [2, 2, 3, 3]]

    run(main())


def test_a_full_queue_rejects_at_once() -> None:
    async def main() -> None:
        model = Recorder()
        batcher = Batcher(model, max_batch_size=2, max_queue=4)
        batcher.start()
        model.gate.clear()
        running = asyncio.create_task(batcher.predict(image(0.1)))
        await asyncio.sleep(0.02)  # taken off the queue, blocked in the model
        queued = [asyncio.create_task(batcher.predict(image(0.2))) for _ in range(4)]
        await asyncio.sleep(0)
        assert batcher.depth == 4
        start = time.perf_counter()
        with pytest.raises(Overloaded) as info:
            await batcher.predict(image(0.3))
        assert time.perf_counter() - start < 0.05
        assert info.value.retry_after >= 1
        with pytest.raises(Overloaded):  # all or nothing for a multi-image request
            await batcher.predict_many([image(0.3)])
        model.gate.set()
        await asyncio.gather(running, *queued)
        assert batcher.depth == 0
        await batcher.predict(image(0.4))  # accepted again once drained
        await batcher.stop()

    run(main())


def test_a_failing_batch_fails_only_its_requests() -> None:
    async def main() -> None:
        calls = 0

        def flaky(batch: np.ndarray) -> np.ndarray:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("boom")
            return np.full((len(batch), 10), 0.1, np.float32)

        batcher = Batcher(flaky, max_batch_size=4, max_queue=10)
        batcher.start()
        with pytest.raises(InferenceError):
            await batcher.predict(image(0.1))
        assert (await batcher.predict(image(0.1))).shape == (10,)
        assert batcher.running
        await batcher.stop()

    run(main())


def test_a_wrong_output_shape_is_an_inference_error() -> None:
    async def main() -> None:
        batcher = Batcher(lambda b: np.zeros((1, 3), np.float32), max_batch_size=4, max_queue=4)
        batcher.start()
        with pytest.raises(InferenceError):
            await batcher.predict(image(0.1))
        await batcher.stop()

    run(main())


def test_cancelled_requests_are_skipped() -> None:
    async def main() -> None:
        model = Recorder()
        batcher = Batcher(model, max_batch_size=8, max_queue=10)
        batcher.start()
        model.gate.clear()
        first = asyncio.create_task(batcher.predict(image(0.1)))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(batcher.predict(image(0.9)))
        kept = asyncio.create_task(batcher.predict(image(0.5)))
        await asyncio.sleep(0)
        gone.cancel()  # the client disconnected
        model.gate.set()
        await asyncio.gather(first, kept)
        await batcher.stop()
        assert model.batches == [[1], [5]]

    run(main())


def test_stop_drains_the_queue_then_refuses_new_work() -> None:
    async def main() -> None:
        batcher = Batcher(Recorder(delay=0.01), max_batch_size=2, max_queue=10)
        batcher.start()
        tasks = [asyncio.create_task(batcher.predict(image(0.4))) for _ in range(6)]
        await asyncio.sleep(0)
        await batcher.stop()
        assert all(int(t.result().argmax()) == 4 for t in tasks)
        with pytest.raises(Overloaded, match="shutting down"):
            await batcher.predict(image(0.4))

    run(main())


def test_invalid_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(Recorder(), max_batch_size=0, max_queue=1)
    with pytest.raises(ValueError, match="max_queue"):
        Batcher(Recorder(), max_batch_size=1, max_queue=0)
