"""Log lines as JSON, one object per line, each carrying the trace of the request it was
written in (`trace_id`, `span_id`: the ids its trace in Jaeger, nginx's access log line and the
latency histogram's exemplars carry). Installed for every logger by app/gunicorn.conf.py."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from app import tracing


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        trace = tracing.current()
        if trace is not None:
            entry["trace_id"] = f"{trace.trace_id:032x}"
            entry["span_id"] = f"{trace.span_id:016x}"
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def config(level: str) -> dict[str, Any]:
    """A logging.config.dictConfig: every logger (gunicorn's, uvicorn's, the app's) to stderr,
    as JSON."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "app.logs.JsonFormatter"}},
        "handlers": {"stderr": handler},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": ["stderr"], "propagate": False},
            # nginx logs every request; no access log here (app/worker.py).
            "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
        },
    }
