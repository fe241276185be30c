"""The gunicorn worker class: uvicorn's, with its per-request access log turned off.

nginx logs every request at the edge with its upstream and timings; formatting a second log
line per request in each worker would only cost CPU.
"""

from __future__ import annotations

from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker


class Worker(UvicornWorker):
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {**UvicornWorker.CONFIG_KWARGS, "access_log": False}
