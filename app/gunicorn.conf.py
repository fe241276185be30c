"""gunicorn settings for one API replica: `gunicorn -c app/gunicorn.conf.py app.main:app`.

Everything is read from the environment (https://docs.gunicorn.org/en/stable/settings.html).
Workers per replica come from WEB_CONCURRENCY, not from the host's core count: replicas
multiply them, and TensorFlow/LiteRT would otherwise size thread pools from the host's cores.
"""

from __future__ import annotations

import os

from app import logs


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not an integer") from None


# Thread pools are sized when the numeric libraries load, so these must be set before any
# worker imports them: this file runs in the master, before the fork, and workers inherit the
# environment. One thread per worker: parallelism comes from workers and replicas.
for _var in (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
    "TF_NUM_INTEROP_THREADS",
):
    os.environ.setdefault(_var, os.environ.get("INFERENCE_THREADS", "1"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

bind = os.environ.get("BIND", "0.0.0.0:8000")
workers = _int("WEB_CONCURRENCY", 2)
worker_class = "app.worker.Worker"
# Never load the app (and so the model) in the master: each worker loads its own after the
# fork. A model or TF runtime inherited across fork() can hang (tensorflow#8220).
preload_app = False
backlog = _int("BACKLOG", 2048)

# A worker silent for this long is killed and replaced (it heartbeats from its event loop).
timeout = _int("TIMEOUT", 30)
graceful_timeout = _int("GRACEFUL_TIMEOUT", 20)
# Idle keep-alive connections are kept this long. It must exceed the upstream keepalive_timeout
# of the proxy in front (nginx: 60 s), or the app may close a connection just as nginx reuses
# it, and nginx answers 502.
keepalive = _int("KEEP_ALIVE", 75)

# No control socket (gunicorn >= 25: a Unix socket through which `gunicornc` can reload, resize
# or stop the server). Replicas are managed by the engine, and in the read-only container its
# default path ($HOME/.gunicorn) cannot be created: every start logged an error.
control_socket_disable = True
# Worker heartbeat files in memory, not on a container's overlay filesystem.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# nginx logs every request at the edge; the app logs errors only.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
# JSON lines with the request's trace_id and span_id (app/logs.py).
logconfig_dict = logs.config(loglevel)
proc_name = "mnist-api"
