"""The worker's write coalescing: one write per event-loop step, nothing lost on close."""

from __future__ import annotations

import asyncio

from app.worker import CoalescingTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_writes_of_one_step_leave_as_one() -> None:
    async def main() -> RecordingTransport:
        inner = RecordingTransport()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(bytearray(b"body"))
        assert inner.writes == []  # nothing sent within the step
        await asyncio.sleep(0)
        transport.write(b"next")
        await asyncio.sleep(0)
        assert transport.get_extra_info("peername") == "info:peername"  # delegated
        return inner

    inner = asyncio.run(main())
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"next"]


def test_close_sends_what_is_pending_first() -> None:
    async def main() -> RecordingTransport:
        inner = RecordingTransport()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"last response")
        transport.close()
        await asyncio.sleep(0)  # the scheduled flush finds nothing left to send
        return inner

    inner = asyncio.run(main())
    assert inner.writes == [b"last response"]
    assert inner.closed
