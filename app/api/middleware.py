"""Pure ASGI middleware (no BaseHTTPMiddleware: it costs a task and a copy per request)."""

from __future__ import annotations

import asyncio
import json
import os
import socket

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def json_response(status: int, detail: str, *headers: tuple[bytes, bytes]) -> tuple[Message, ...]:
    """The ASGI messages of a complete JSON error response `{"detail": ...}`, built once at
    start-up; send them with `send_copies` (servers may alter what they are given)."""
    body = json.dumps({"detail": detail}).encode()
    return (
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        },
        {"type": "http.response.body", "body": body},
    )


async def send_copies(send: Send, messages: tuple[Message, ...]) -> None:
    for message in messages:
        copy = dict(message)
        if "headers" in copy:
            copy["headers"] = list(copy["headers"])
        await send(copy)


class ServedByMiddleware:
    """Adds `X-Served-By: <hostname>/<pid>` to every response, so that load balancing across
    replicas and workers can be seen from the client side."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._header: tuple[bytes, bytes] | None = None

    def _value(self) -> tuple[bytes, bytes]:
        # Computed on first use, in the worker: the pid must be the worker's, not the master's.
        if self._header is None:
            self._header = (b"x-served-by", f"{socket.gethostname()}/{os.getpid()}".encode())
        return self._header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = self._value()

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_header)


class _BodyTooLarge(Exception):
    pass


# How much of a refused body is read and dropped before the 413, so that a client that sends
# the whole body before reading (curl, http.client) gets the answer rather than a reset; and
# for how long. A larger or slower body is cut off, as nginx's lingering close does.
DISCARD_MAX_BYTES = 64 * 1024 * 1024
DISCARD_SECONDS = 5.0


async def discard_body(receive: Receive, limit: int = DISCARD_MAX_BYTES) -> None:
    """Read and drop the rest of the request body: at most `limit` bytes, within
    DISCARD_SECONDS."""
    discarded = 0
    try:
        async with asyncio.timeout(DISCARD_SECONDS):
            while discarded <= limit:
                message = await receive()
                if message["type"] != "http.request":
                    return
                discarded += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return


class BodySizeLimitMiddleware:
    """Answers 413, in JSON, to a request body larger than `max_bytes`: at once when
    Content-Length says so, otherwise as soon as a streamed (chunked) body passes the limit.

    (FastAPI's own `max_body_size` answers the Content-Length case in plain text.) nginx
    enforces the same limit at the edge; this protects a replica that is reached directly. The
    rest of the body is read and dropped first (bounded), so that the client sees the 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self._response = json_response(
            413,
            f"request body too large: the limit is {max_bytes:,} bytes",
            (b"connection", b"close"),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        # A client that asked to be told before it sends (Expect: 100-continue) is answered
        # without reading: reading would tell it to go on.
        waiting = headers.get(b"expect", b"").lower() == b"100-continue"
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            if not waiting and int(length) <= DISCARD_MAX_BYTES:
                await discard_body(receive)
            await send_copies(send, self._response)
            return

        received = 0
        too_large = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:
                # The app may have caught the error and answered (FastAPI turns any failure
                # while parsing a form into a 400): answer 413 instead.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    if not waiting:
                        await discard_body(receive)
                    await send_copies(send, self._response)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if started:
                raise
            started = True
            if not waiting:
                await discard_body(receive)
            await send_copies(send, self._response)
