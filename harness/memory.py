"""Memory of the running cluster's processes, read from the host where the engine runs here:
every gunicorn process of every replica, the Collector, Prometheus and Jaeger (the soak samples
it; the trace tests watch the workers')."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from harness.cluster import Cluster, engine_get

# Stores that fill by design, whose containers' memory limits are read as well: Jaeger's traces
# (up to jaeger/config.yaml's max_traces) and Prometheus' TSDB head block (the last 2-3 hours of
# samples, cut into a block on disk every 2 hours).
FILLING_STORES = ("jaeger", "prometheus")

# Run in each replica: "<pid> <RSS kB> <command>" of its gunicorn processes.
RSS_PROBE = (
    "import glob, os\n"
    "for status in glob.glob('/proc/[0-9]*/status'):\n"
    "    pid = status.split('/')[2]\n"
    "    try:\n"
    "        fields = dict(l.split(':', 1) for l in open(status) if ':' in l)\n"
    "        cmd = open(f'/proc/{pid}/cmdline').read().split('\\0')\n"
    "    except OSError:\n"
    "        continue\n"
    "    if pid != str(os.getpid()) and any('gunicorn' in part for part in cmd[:2]):\n"
    "        print(pid, fields['VmRSS'].split()[0])\n"
)


def host_rss(root_pid: int) -> dict[str, float] | None:
    """MiB of the process `root_pid` (a replica's gunicorn master, seen from the host) and its
    children, from the host's /proc; None where the engine's processes are not on this host."""

    def status(pid: str) -> dict[str, str]:
        with open(f"/proc/{pid}/status") as lines:
            return dict(line.split(":", 1) for line in lines if ":" in line)

    try:
        found = {str(root_pid): status(str(root_pid))}
    except OSError:
        return None
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = status(entry)
            except OSError:
                continue
            if fields.get("PPid", "").strip() == str(root_pid):
                found[entry] = fields
    return {
        pid: int(fields["VmRSS"].split()[0]) / 1024
        for pid, fields in found.items()
        if "VmRSS" in fields
    }


def used_bytes(memory_stats: dict[str, Any]) -> int:
    """A container's memory in use from the engine's `memory_stats`, as `docker stats` counts
    it: the cgroup's usage less its inactive page cache (files read or written, such as
    Prometheus' WAL, that the kernel reclaims before it would kill anything). Engines that
    report no breakdown (podman) give the usage."""
    detail = memory_stats.get("stats") or {}
    usage = int(memory_stats["usage"])
    # cgroup v1 reports both keys, and its total_ one is the cgroup's own; v2 has inactive_file.
    for key in ("total_inactive_file", "inactive_file"):
        if key in detail and 0 <= int(detail[key]) < usage:
            return usage - int(detail[key])
    return usage


def memory_sample(cluster: Cluster) -> dict[str, float]:
    """MiB by process: every gunicorn process of every replica ("<replica>/<pid>"), the
    Collector, Prometheus and Jaeger (and the limits of the last two). Read from the host's /proc
    where the engine runs here (nothing runs in the replicas: a sample must not load what it
    measures), else from inside them."""
    sample: dict[str, float] = {}
    for container in cluster.replicas():
        info = engine_get(cluster.env, f"/containers/{container}/json")
        on_host = host_rss(int(info["State"]["Pid"])) if info["State"].get("Pid") else None
        if on_host:
            for pid, mib in on_host.items():
                sample[f"api {container[:8]}/{pid}"] = mib
            continue
        probe = subprocess.run(
            ["docker", "exec", container, "python3", "-c", RSS_PROBE],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        for line in probe.stdout.splitlines():
            pid, rss_kb = line.split()
            sample[f"api {container[:8]}/{pid}"] = int(rss_kb) / 1024
    for service in ("otel-collector", *FILLING_STORES):
        for container in cluster.compose("ps", "-q", service).split():
            stats = engine_get(
                cluster.env, f"/containers/{container}/stats?stream=false&one-shot=true"
            )
            memory = stats.get("memory_stats", {})
            if memory.get("usage"):
                sample[service] = used_bytes(memory) / 2**20
            if service in FILLING_STORES and memory.get("limit"):
                sample[f"{service} limit"] = memory["limit"] / 2**20
    return sample
