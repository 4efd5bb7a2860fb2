"""CPU KV-cache sizing reads the memory the kernel can really hand out: MemAvailable, capped by a
container's cgroup limit (v2 memory.max, v1 limit_in_bytes), measured after the weights are loaded."""

from __future__ import annotations

from serving.engine.builder import available_memory, cgroup_memory_headroom


def test_cgroup_v2_limit_minus_usage(tmp_path):
    assert cgroup_memory_headroom(tmp_path) is None  # no cgroup files: no limit
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("1000\n")
    assert cgroup_memory_headroom(tmp_path) is None
    (tmp_path / "memory.max").write_text(f"{2 << 30}\n")  # limits.memory: 2Gi
    (tmp_path / "memory.current").write_text(f"{512 << 20}\n")  # the loaded weights and runtime
    assert cgroup_memory_headroom(tmp_path) == (2 << 30) - (512 << 20)
    (tmp_path / "memory.current").write_text(f"{3 << 30}\n")
    assert cgroup_memory_headroom(tmp_path) == 0


def test_cgroup_v1_limit_and_its_no_limit_value(tmp_path):
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    (v1 / "memory.usage_in_bytes").write_text("1000\n")
    assert cgroup_memory_headroom(tmp_path) is None
    (v1 / "memory.limit_in_bytes").write_text(f"{1 << 30}\n")
    assert cgroup_memory_headroom(tmp_path) == (1 << 30) - 1000


def test_available_memory_is_capped_by_the_container_limit(tmp_path):
    unlimited, source = available_memory(tmp_path)
    assert unlimited > 0 and source == "MemAvailable"
    (tmp_path / "memory.max").write_text(f"{256 << 20}\n")
    (tmp_path / "memory.current").write_text(f"{56 << 20}\n")
    assert available_memory(tmp_path) == (200 << 20, "the cgroup memory limit")
