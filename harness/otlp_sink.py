"""An OTLP/HTTP endpoint that accepts everything and keeps nothing: what the service exports to
while a benchmark prices its telemetry (the export's encoding and sending are paid in full, as
against a Collector, without a Collector's own CPU on the machine)."""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType


class OtlpSink:
    """`with OtlpSink() as sink:` listens on 127.0.0.1 at `sink.endpoint` (the value for
    OTEL_EXPORTER_OTLP_ENDPOINT); `sink.received` counts requests by path (/v1/traces, ...)."""

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.received[self.path] += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> OtlpSink:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
