"""The per-worker in-flight limit: beyond it, 503 at once, without reading the body."""

from __future__ import annotations

import asyncio
import contextlib
import json

from starlette.types import Message, Receive, Scope, Send

from app.api.middleware import InFlightLimitMiddleware


class Held:
    """An ASGI app that answers 200 once released; counts the requests it saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.seen += 1
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app: InFlightLimitMiddleware, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[Message] = []
    read = 0

    async def receive() -> Message:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "http", "path": path, "method": "POST", "headers": []}, receive, send)
    assert read == 0, "the body must not be read"
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m["body"] for m in sent[1:])


def test_requests_beyond_the_limit_are_shed_and_counted() -> None:
    async def scenario() -> None:
        inner = Held()
        rejected: list[int] = []
        app = InFlightLimitMiddleware(inner, limit=2, on_reject=lambda: rejected.append(1))
        held = [asyncio.create_task(call(app, "/predict")) for _ in range(2)]
        await asyncio.sleep(0)
        assert app.in_flight == 2

        status, headers, body = await call(app, "/predict/batch")
        assert status == 503
        assert headers[b"retry-after"] == b"1"
        assert "overloaded" in json.loads(body)["detail"]
        assert rejected == [1]
        assert inner.seen == 2

        inner.release.set()
        assert [(await task)[0] for task in held] == [200, 200]
        assert app.in_flight == 0
        # Capacity is back once the held requests are done.
        assert (await call(app, "/predict"))[0] == 200

    asyncio.run(scenario())


def test_other_paths_are_never_shed() -> None:
    async def scenario() -> None:
        inner = Held()
        inner.release.set()
        app = InFlightLimitMiddleware(inner, limit=1)
        app.in_flight = 1  # as if a prediction were being served
        assert (await call(app, "/readyz"))[0] == 200
        assert (await call(app, "/healthz"))[0] == 200

    asyncio.run(scenario())


def test_a_failing_request_gives_its_place_back() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    async def scenario() -> None:
        app = InFlightLimitMiddleware(broken, limit=1)
        for _ in range(3):
            with contextlib.suppress(RuntimeError):
                await call(app, "/predict")
        assert app.in_flight == 0

    asyncio.run(scenario())
