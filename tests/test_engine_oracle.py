"""Greedy token ids equal transformers' greedy generate, for every supported architecture, alone
and in mixed continuous batches (different prompt lengths, staggered arrivals, chunked prefill,
preemption under KV pressure)."""

from __future__ import annotations

import random

import pytest

from serving.config import ServeConfig
from serving.engine.sampling_params import SamplingParams
from serving.models.loader import load
from tests.tiny_models import hf_greedy, make_tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def _prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 512) for _ in range(rng.randrange(3, 40))] for _ in range(count)]


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _run_staggered(engine, prompts: list[list[int]], arrivals: list[int], max_tokens: list[int]) -> dict[str, list[int]]:
    """Add request i at step arrivals[i]; step until all finish; return token ids per request."""
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    step = 0
    max_batch = 0
    while step <= max(arrivals) or engine.has_work:
        for i, at in enumerate(arrivals):
            if at == step:
                engine.add_request(f"r{i}", prompts[i], _greedy(max_tokens[i]))
        for delta in engine.step():
            out[delta.request_id].extend(delta.token_ids)
        max_batch = max(max_batch, engine.last_stats.batch_size if engine.last_stats else 0)
        step += 1
    assert max_batch > 1, "requests never shared a batch"
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_single_request_matches_transformers(model_root, arch):
    model_dir = make_tiny_model(model_root, arch)
    loaded = load(ServeConfig(model_path=str(model_dir), device="cpu"))
    expected_arch = "transformers" if arch == "gpt2" else arch
    assert loaded.architecture == expected_arch
    prompt = _prompts(1, 1)[0]
    engine = loaded.engine
    engine.add_request("one", prompt, _greedy(NEW_TOKENS))
    got: list[int] = []
    while engine.has_work:
        for delta in engine.step():
            got.extend(delta.token_ids)
    assert got == hf_greedy(model_dir, prompt, NEW_TOKENS)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_staggered_batch_matches_transformers(model_root, arch):
    model_dir = model_root / arch
    if not model_dir.exists():
        make_tiny_model(model_root, arch)
    prompts = _prompts(2, 5)
    max_tokens = [NEW_TOKENS, 7, 19, 30, 12]
    # A small per-step token budget forces chunked prefill of the longer prompts.
    loaded = load(ServeConfig(model_path=str(model_dir), device="cpu", max_num_batched_tokens=24, max_batch_size=8))
    got = _run_staggered(loaded.engine, prompts, arrivals=[0, 0, 3, 5, 9], max_tokens=max_tokens)
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}"] == hf_greedy(model_dir, prompt, max_tokens[i]), f"request {i} diverged"


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_preemption_under_kv_pressure_keeps_outputs_exact(model_root, arch):
    model_dir = model_root / arch
    if not model_dir.exists():
        make_tiny_model(model_root, arch)
    prompts = _prompts(3, 6)
    max_tokens = [40] * 6
    # Room for about two full sequences: the rest must wait or be preempted and recomputed.
    loaded = load(ServeConfig(model_path=str(model_dir), device="cpu", kv_cache_tokens=128, max_seq_len=96))
    engine = loaded.engine
    preempted = 0
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, _greedy(max_tokens[i]))
    while engine.has_work:
        for delta in engine.step():
            out[delta.request_id].extend(delta.token_ids)
        preempted += engine.last_stats.num_preempted
    assert preempted > 0, "the test meant to exercise preemption"
    assert engine.blocks.usage == 0.0, "finished sequences must return every block"
    for i, prompt in enumerate(prompts):
        assert out[f"r{i}"] == hf_greedy(model_dir, prompt, max_tokens[i])


ROPE_VARIANTS = {
    "llama3": dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    ),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    "linear": dict(rope_type="linear", factor=2.0),
}


@pytest.mark.parametrize("rope", sorted(ROPE_VARIANTS))
def test_rope_scaling_variants_match_transformers(tmp_path, rope):
    params = {"rope_theta": 50000.0, **ROPE_VARIANTS[rope]}
    model_dir = make_tiny_model(tmp_path, "llama", rope_parameters=params)
    loaded = load(ServeConfig(model_path=str(model_dir), device="cpu"))
    assert loaded.architecture == "llama"
    prompts = _prompts(4, 3)
    got = _run_staggered(loaded.engine, prompts, arrivals=[0, 1, 2], max_tokens=[20, 20, 20])
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}"] == hf_greedy(model_dir, prompt, 20)
