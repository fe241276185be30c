"""The gunicorn worker class: uvicorn's, with two changes.

* No per-request access log: nginx logs every request at the edge with its upstream and
  timings; formatting a second line per request in each worker would only cost CPU.
* Each response leaves in one write. uvicorn writes the status line and headers, then the body,
  as two writes; nginx passes headers on as soon as they arrive, and from then on can no longer
  retry the request on another replica. A replica killed between the two writes would cut that
  response short. Coalescing the writes of one event-loop step closes that window (nginx either
  gets the whole response or nothing, and retries) and saves a syscall per response.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker


class CoalescingTransport:
    """Wraps a transport so that the writes made in one event-loop step go out as one.

    Everything but `write` and `close` is delegated; `close` sends what is pending first.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._pending.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(cast(asyncio.Transport, CoalescingTransport(transport, self.loop)))


class Worker(UvicornWorker):
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        **UvicornWorker.CONFIG_KWARGS,
        "http": CoalescingHttpToolsProtocol,
        "access_log": False,
    }
