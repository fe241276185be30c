"""The soak's reading of a container's memory from the engine's stats (harness.memory)."""

from harness.memory import used_bytes

MIB = 2**20


def test_inactive_page_cache_is_not_counted_as_used() -> None:
    # Docker on cgroup v2, then v1: as `docker stats` counts it.
    v2 = {"usage": 300 * MIB, "limit": 512 * MIB, "stats": {"inactive_file": 100 * MIB}}
    v1 = {"usage": 300 * MIB, "stats": {"total_inactive_file": 40 * MIB, "inactive_file": 1}}
    assert used_bytes(v2) == 200 * MIB
    assert used_bytes(v1) == 260 * MIB


def test_an_engine_without_a_breakdown_gives_the_usage() -> None:
    assert used_bytes({"usage": 300 * MIB, "limit": 512 * MIB}) == 300 * MIB  # podman
    assert used_bytes({"usage": 300 * MIB, "stats": {}}) == 300 * MIB


def test_an_inconsistent_breakdown_is_ignored() -> None:
    assert used_bytes({"usage": 100 * MIB, "stats": {"inactive_file": 200 * MIB}}) == 100 * MIB
