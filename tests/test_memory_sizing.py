"""CPU KV-cache sizing reads the memory the kernel can really hand out: MemAvailable, capped by a
container's cgroup limit (v2 memory.max, v1 limit_in_bytes), measured after the weights are loaded.
GPU sizing subtracts what a warm-up profile of the largest step measured."""

from __future__ import annotations

import torch

from serving.config import ServeConfig
from serving.engine.builder import available_memory, cgroup_memory_headroom, gpu_kv_budget
from serving.models.loader import load_model
from tests.tiny_models import make_tiny_model


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


GIB = 1 << 30


def test_the_gpu_kv_budget_leaves_room_for_what_the_profile_measured():
    """An 80 GiB GPU at 0.9: 16 GiB of weights, a 3 GiB activation peak, 1 GiB for the graphs, and
    0.5 GiB outside torch (the CUDA context) leave 51.5 GiB for the cache."""
    total, reserved = 80 * GIB, 20 * GIB
    free = total - reserved - GIB // 2
    budget = gpu_kv_budget(total, free, reserved, 16 * GIB, 3 * GIB, 0.9, graph_pool=GIB)
    assert budget == int(80 * GIB * 0.9) - 16 * GIB - 3 * GIB - GIB - GIB // 2
    # Another process holding 10 GiB of the GPU comes off the budget too; nothing is ever negative.
    assert gpu_kv_budget(total, free - 10 * GIB, reserved, 16 * GIB, 3 * GIB, 0.9, GIB) == budget - 10 * GIB
    assert gpu_kv_budget(total, free, reserved, 70 * GIB, 3 * GIB, 0.9) == 0


def test_the_profile_step_is_the_largest_the_scheduler_makes_and_leaves_no_cache(tmp_path):
    """The warm-up profile runs on any device: num_tokens prompt tokens over num_seqs sequences on a
    temporary cache, one logits row each, and the runner holds no cache afterwards."""
    model_dir = make_tiny_model(tmp_path, "llama")
    runner = load_model(ServeConfig(model_path=str(model_dir), device="cpu")).runner
    logits = runner.profile_run(100, 7, 16)
    assert logits.shape == (7, runner.vocab_size) and torch.isfinite(logits).all()
    assert runner.kv_cache == [] and runner.graphs is None
    # Its temporary cache, which the builder takes off the measured peak: 7 sequences of 14-15 tokens take
    # a block of 16 each, plus the scratch block.
    assert runner.profile_kv_bytes == (7 + 1) * 16 * runner.kv_bytes_per_token
    assert runner.profile_run(3, 8, 16).shape == (3, runner.vocab_size)  # never more sequences than tokens
    # With the prompt rows a step may score for echo + logprobs: those rows' logits first, as the engine
    # asks for them (the builder scores them, then samples the rest).
    scored = runner.profile_run(100, 7, 16, scored_rows=30)
    assert scored.shape == (30 + 7, runner.vocab_size)
    assert torch.allclose(scored[30:], logits, atol=1e-4)
    assert runner.profile_run(20, 2, 16, scored_rows=30).shape == (20 + 2, runner.vocab_size), "no more rows than tokens"
