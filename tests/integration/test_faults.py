"""Faults under continuous load, on the real stack: the Collector stopped, Prometheus restarted, a
replica frozen, a worker killed by its replica's memory limit, nginx restarted. Each says what it
costs the clients, and the stack recovers by itself. (A replica killed outright, and replicas
scaled away, are in test_nginx_cluster.py.)"""

from __future__ import annotations

import json
import subprocess
import time

from tests.integration.stack import (
    REPLICAS,
    Load,
    Stack,
    predict,
    settled_total,
    wait_for,
)

# nginx's proxy_read_timeout (nginx/proxy.conf): what a frozen replica may cost a request.
READ_TIMEOUT = 10.0


def firing(stack: Stack) -> set[str]:
    alerts = stack.prometheus_api("alerts")["alerts"]
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def test_a_collector_outage_fails_no_request_and_loses_no_count(stack: Stack) -> None:
    stack.ensure_replicas(REPLICAS)
    before = settled_total(stack)
    with Load(stack) as load:
        time.sleep(2)
        with stack.stopped("otel-collector"):
            time.sleep(8)  # longer than an export interval: every worker's export fails
        time.sleep(3)
    assert load.failures == {}, load.failures
    wait_for(
        lambda: stack.scalar('up{job="otel-collector"}') == 1,
        timeout=60,
        what="the collector to be scraped again",
    )
    after = settled_total(stack)
    print(f"\ncollector outage: {load.total} requests, none failed; counted {after - before:.0f}")
    # The SDK's counters are cumulative: the next export after the outage carries all of them.
    assert round(after - before) == load.statuses[200]


def test_a_prometheus_restart_keeps_its_history_and_fires_nothing(stack: Stack) -> None:
    def history(at: float) -> str:  # the scrapes of the Collector in the 30 min up to `at`
        return f'count_over_time(up{{job="otel-collector"}}[30m] @ {at:.3f})'

    wait_for(
        lambda: (stack.scalar(history(time.time())) or 0) >= 4, timeout=90, what="four scrapes"
    )
    # A moment safely past: every scrape stamped before it has been stored.
    then = time.time() - 5
    before = stack.scalar(history(then))
    already = firing(stack)
    with Load(stack, clients=4) as load:  # serving does not depend on Prometheus
        time.sleep(2)
        stack.restart("prometheus")
        wait_for(lambda: stack.scalar(history(then)), timeout=120, what="Prometheus to answer")
        time.sleep(2)
    print(f"\nPrometheus restart: {load.total} requests, failures {load.failures}")
    assert load.total > 100, load.statuses
    assert load.failures == {}, load.failures
    after = stack.scalar(history(then))
    assert after == before, (before, after)  # every sample from before the restart is there

    def scraped_lately() -> bool:
        age = stack.scalar('time() - timestamp(up{job="otel-collector"})')
        return age is not None and age < 15

    wait_for(scraped_lately, timeout=60, what="scraping to resume")
    # For longer than the rules' evaluation and the alerts' shortest `for`: nothing new fires.
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        assert firing(stack) <= already, firing(stack) - already
        time.sleep(4)


def test_a_frozen_replica_costs_no_request_and_at_most_the_read_timeout(stack: Stack) -> None:
    stack.ensure_replicas(REPLICAS)
    victim = stack.replicas()[0]
    with Load(stack, clients=6) as load:
        time.sleep(2)
        stack.docker("pause", victim)
        try:
            time.sleep(READ_TIMEOUT + 5)
        finally:
            stack.docker("unpause", victim)
        time.sleep(3)
    print(
        f"\nfrozen replica: {load.total} requests, failures {load.failures}, "
        f"slowest {load.slowest:.1f} s"
    )
    assert load.total > 200, load.statuses
    assert load.failures == {}, load.failures
    # Requests the frozen replica held were retried elsewhere after the read timeout.
    assert load.slowest < READ_TIMEOUT + 3
    wait_for(
        lambda: stack.healthy_replicas() == REPLICAS,
        timeout=120,
        what="the unfrozen replica to be healthy again",
    )


# Run in a replica as its own user. OOM_KILLS prints its cgroup's count of the kernel's kills (v2,
# then v1; None if it has none). OOM_SETUP (argv: a gunicorn worker) makes that worker the
# memory-limit OOM killer's first choice (raising a process's oom_score_adj needs no privilege)
# and prints the replica's memory limit and that count.
OOM_KILLS = r"""
import json, os, sys
def read(path):
    with open(path) as f:
        return f.read()
def oom_kills():
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            for line in read(path).splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except OSError:
            pass
    return None
if __name__ == "__main__":
    print(json.dumps(oom_kills()))
"""
OOM_SETUP = (
    OOM_KILLS.split("if __name__")[0]
    + r"""
def limit():
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        if os.path.exists(path) and read(path).strip().isdigit():
            return int(read(path))
    sys.exit("no memory limit in this container's cgroup")
with open(f"/proc/{int(sys.argv[1])}/oom_score_adj", "w") as f:
    f.write("1000")
print(json.dumps({"limit": limit(), "kills": oom_kills()}))
"""
)

# OOM_PROBE (argv: the victim, the limit) allocates past the limit a MiB at a time until the
# victim is gone, then frees it all and prints what it allocated. The victim's death is watched
# through a pidfd, polled without reading a file (at the limit, the kernel's own allocations for
# a read are what invoke the OOM killer: gfp_mask GFP_KERNEL in its report). The victim frees
# only its private pages and a replacement boots at once, so the kernel may kill the probe too
# before it has freed: the test accepts that (the probe is the test's, not the replica's).
OOM_PROBE = r"""
import json, os, select, sys, time
victim, limit = int(sys.argv[1]), int(sys.argv[2])
watch = select.poll()
watch.register(os.pidfd_open(victim), select.POLLIN)
def dead():  # a killed worker is readable as soon as it has exited (a zombie)
    return bool(watch.poll(0))
held, chunk, started = [], 2**20, time.monotonic()
while not dead() and len(held) * chunk < 2 * limit:
    held.append(bytearray(b"\x01") * chunk)
allocated = len(held) * chunk
del held
killed = bool(watch.poll(10_000))
print(json.dumps({"allocated": allocated, "killed": killed,
                  "seconds": round(time.monotonic() - started, 2)}))
"""


def test_a_worker_killed_by_the_memory_limit_costs_no_request_and_is_replaced(
    stack: Stack,
) -> None:
    stack.ensure_replicas(REPLICAS)
    replica = stack.replicas()[0]
    before = stack.gunicorn_workers(replica)
    victim = before[0]
    with Load(stack, clients=6) as load:
        time.sleep(2)
        setup = json.loads(stack.docker("exec", replica, "python3", "-c", OOM_SETUP, str(victim)))
        limit = setup["limit"]
        probe = subprocess.run(
            ["docker", "exec", replica, "python3", "-c", OOM_PROBE, str(victim), str(limit)],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        wait_for(
            lambda: len(stack.gunicorn_workers(replica)) == len(before),
            timeout=120,
            what="gunicorn to replace the killed worker",
        )
        time.sleep(3)
    kills = json.loads(stack.docker("exec", replica, "python3", "-c", OOM_KILLS))
    found = (victim, setup, probe.returncode, probe.stdout, kills)
    # 137 (SIGKILL): the kernel killed the probe as well, as it held the memory (one kill more).
    assert probe.returncode in (0, 137), (found, probe.stderr)
    print(f"\nOOM kill: {found}; {load.total} requests, failures {load.failures}")
    if probe.returncode == 0:
        outcome = json.loads(probe.stdout)
        assert outcome["killed"], found
        assert outcome["allocated"] < 2 * limit, found  # the limit, not the loop's end, stopped it
    if setup["kills"] is not None:
        assert kills is not None, found
        assert kills >= setup["kills"] + (1 if probe.returncode == 0 else 2), found
    after = stack.gunicorn_workers(replica)
    assert victim not in after, (found, after)
    assert len(after) == len(before), (found, before, after)
    # The kernel's kill, as gunicorn's master saw it.
    logs = stack.compose("logs", "--no-log-prefix", "--since", "5m", "api")
    assert f"Worker (pid:{victim}) was sent SIGKILL! Perhaps out of memory?" in logs
    assert load.total > 200, load.statuses
    # What the killed worker held is retried on another by nginx (proxy_next_upstream).
    assert load.failures == {}, f"{load.failures} of {load.total} requests failed"
    assert stack.healthy_replicas() == REPLICAS
    # The stack as found for the tests after this one: the replacement's series exported, the
    # killed worker's expired from the Collector (metric_expiration, 30 s).
    stack.wait_for_worker_series()


def test_an_nginx_restart_costs_a_bounded_outage_and_recovers(stack: Stack) -> None:
    with Load(stack) as load:
        time.sleep(2)
        restarted = time.monotonic()
        stack.restart("nginx")
        wait_for(
            lambda: stack.request("GET", "/healthz")[0] == 200,
            timeout=60,
            what="nginx to answer again",
        )
        answered_after = load.statuses[200]
        # Serving again, by itself: every client, once its connection to the old nginx has
        # failed, reaches the new one.
        wait_for(
            lambda: load.statuses[200] > answered_after + 50,
            timeout=30,
            what="the clients to be answered through the restarted nginx",
        )
        recovered = time.monotonic() - restarted
    failed = load.failures
    sent = [t - restarted for t in load.failed_at]
    print(
        f"\nnginx restart: {load.total} requests, {sum(failed.values())} failed, sent "
        f"{min(sent, default=0):.1f}-{max(sent, default=0):.1f} s after the restart began "
        f"({sorted(failed)}); answering again {recovered:.1f} s after"
    )
    # Only connection failures (a refusal, a reset, or a client's own timeout for a request
    # sent as the old nginx went away), all of requests sent during the restart.
    assert all(isinstance(outcome, str) for outcome in failed), failed
    assert all(0 <= t < 15 for t in sent), sent
    # Bounded in time: the failures fall in one short spell as the old nginx goes (each
    # client fails fast, a refused connection, and tries again, so their count is the spell's
    # length times the clients' pace, not a figure of its own).
    assert max(sent, default=0) - min(sent, default=0) < 3, sent
    assert predict(stack)[0] == 200
