"""Greedy token ids equal transformers' greedy generate, for every supported architecture, alone
and in mixed continuous batches (different prompt lengths, staggered arrivals, chunked prefill at
every awkward token budget, preemption under KV pressure), with and without the prefix cache.

The same tests run elsewhere by environment: on a GPU in bf16 and fp32 (bench/device_check.sh:
FLEETLM_TEST_DEVICE=cuda FLEETLM_TEST_DTYPE=bfloat16, CUDA graphs included), and with the Triton
attention kernels under Triton's interpreter on CPU (tests/test_triton_attention.py:
FLEETLM_TEST_ATTENTION=triton TRITON_INTERPRET=1). transformers computes the oracle on the same
device in the same dtype."""

from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import pytest
import torch

from serving.config import ServeConfig
from serving.engine.builder import BLOCK_SIZE, build_engine
from serving.engine.sampling_params import SamplingParams
from serving.models import cpu_ops
from tests.tiny_models import hf_choice_gaps, hf_greedy, make_tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2"]
NEW_TOKENS = 24
DEVICE = os.environ.get("FLEETLM_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("FLEETLM_TEST_DTYPE", "float32")
ATTENTION = os.environ.get("FLEETLM_TEST_ATTENTION", "auto")


def _cfg(model_dir: Path, **settings) -> ServeConfig:
    if DEVICE == "cuda":
        # A cache of its own size: on a GPU the cache otherwise takes most of the free memory, and an
        # engine of an earlier test not yet collected would leave the next one none. The profiled sizing
        # runs in tests/test_cuda_host_sync.py and bench/gpu_bench.py.
        settings.setdefault("kv_cache_tokens", 1 << 15)
    return ServeConfig(model_path=str(model_dir), device=DEVICE, dtype=DTYPE, attention_backend=ATTENTION, **settings)


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def _model(root: Path, arch: str) -> Path:
    return root / arch if (root / arch).exists() else make_tiny_model(root, arch)


@functools.cache
def _reference(model_dir: Path, prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    return hf_greedy(model_dir, list(prompt), max_tokens, DEVICE, DTYPE)


def _prompts(seed: int, count: int, lengths: tuple[int, int] = (3, 40)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 512) for _ in range(rng.randrange(*lengths))] for _ in range(count)]


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
        for output in engine.step():
            out[output.request_id].extend(output.token_ids)
        max_batch = max(max_batch, engine.last_stats.batch_size if engine.last_stats else 0)
        step += 1
    assert max_batch > 1, "requests never shared a batch"
    return out


def _assert_matches(model_dir: Path, prompts: list[list[int]], max_tokens: list[int], got: dict[str, list[int]]) -> None:
    for i, prompt in enumerate(prompts):
        _assert_one(model_dir, prompt, max_tokens[i], got[f"r{i}"], f"request {i}")


# In bfloat16 two correct implementations round differently (transformers' own generate disagrees with
# its full forward over the same tokens), so a greedy token may differ where two logits tie within a
# rounding step. There each of our tokens must be transformers' choice, or within a few bfloat16 steps
# of it (0.03 at the tiny models' logits of about 4 to 8), when transformers scores the whole sequence.
HALF_TOLERANCE = 0.125


def _assert_one(model_dir: Path, prompt: list[int], max_tokens: int, got: list[int], what: str) -> None:
    if DTYPE == "float32":
        assert got == _reference(model_dir, tuple(prompt), max_tokens), f"{what} diverged"
        return
    assert len(got) == max_tokens, what
    gaps = hf_choice_gaps(model_dir, prompt, got, DEVICE, DTYPE)
    assert max(gaps) <= HALF_TOLERANCE, f"{what}: a token {max(gaps):.3f} below transformers' best ({DTYPE})"


@pytest.mark.parametrize("arch", ARCHS)
def test_single_request_matches_transformers(model_root, arch):
    model_dir = _model(model_root, arch)
    built = build_engine(_cfg(model_dir))
    assert built.info.architecture == ("transformers" if arch == "gpt2" else arch)
    prompt = _prompts(1, 1)[0]
    engine = built.engine
    engine.add_request("one", prompt, _greedy(NEW_TOKENS))
    got: list[int] = []
    while engine.has_work:
        for output in engine.step():
            got.extend(output.token_ids)
    _assert_one(model_dir, prompt, NEW_TOKENS, got, arch)


@pytest.mark.parametrize("kernels", ["c", "torch"])
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_staggered_batch_matches_transformers(model_root, arch, kernels, monkeypatch):
    """Both CPU code paths of the native model: the C kernels around the matmuls (norms, rotary,
    SiLU, decode attention) and their torch fallbacks, which other devices and installs without a
    C compiler run."""
    if kernels == "c" and not cpu_ops.available():
        pytest.skip("the C extension is not built")
    if kernels == "torch":
        monkeypatch.setattr(cpu_ops, "_FAST", False)
        assert not cpu_ops.available()
    model_dir = _model(model_root, arch)
    prompts = _prompts(2, 5)
    max_tokens = [NEW_TOKENS, 7, 19, 30, 12]
    # A small per-step token budget forces chunked prefill of the longer prompts.
    built = build_engine(_cfg(model_dir, max_num_batched_tokens=24, max_batch_size=8))
    got = _run_staggered(built.engine, prompts, arrivals=[0, 0, 3, 5, 9], max_tokens=max_tokens)
    _assert_matches(model_dir, prompts, max_tokens, got)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3"])
def test_decode_steps_over_static_padded_buffers_match_transformers(model_root, arch):
    """The CUDA-graph path's inputs (cuda_graphs.py): decode batches padded up to their bucket with
    rows on the scratch block, block tables of a fixed width, one static buffer set for every size.
    On CPU it runs eagerly; on CUDA the builder has captured the graphs and this replays them."""
    model_dir = _model(model_root, arch)
    built = build_engine(_cfg(model_dir, max_num_batched_tokens=24, max_batch_size=6))
    runner = built.engine.runner
    if runner.graphs is None:
        runner.use_decode_graphs(6, built.model.max_model_len, capture=False)
    assert runner.graphs.buckets == [1, 2, 4, 6]
    prompts = _prompts(9, 5)
    max_tokens = [30, 9, 21, 17, 26]
    got = _run_staggered(built.engine, prompts, arrivals=[0, 2, 4, 5, 11], max_tokens=max_tokens)
    _assert_matches(model_dir, prompts, max_tokens, got)
    assert runner.graphs.steps > 0 and runner.graphs.padded_steps > 0, "no padded decode step ran"


@pytest.mark.parametrize("left", [1, 2, BLOCK_SIZE - 1, BLOCK_SIZE + 1])
@pytest.mark.parametrize("arch", ARCHS)
def test_budgets_that_leave_a_sliver_for_the_next_prompt(model_root, arch, left):
    """A 7-token prompt takes its share of the step's budget and leaves `left` tokens for a 40-token
    prompt, whose first chunk is then that short (one token: the case that once fed the wrong token)."""
    model_dir = _model(model_root, arch)
    first, second = _prompts(5, 2, lengths=(6, 7))[0], _prompts(6, 1, lengths=(39, 40))[0]
    budget = len(first) + left
    cfg = _cfg(model_dir, max_num_batched_tokens=budget, max_batch_size=min(4, budget))
    engine = build_engine(cfg).engine
    engine.add_request("r0", first, _greedy(12))
    engine.add_request("r1", second, _greedy(12))
    got: dict[str, list[int]] = {"r0": [], "r1": []}
    steps = 0
    while engine.has_work:
        for output in engine.step():
            got[output.request_id].extend(output.token_ids)
        if steps == 0:
            assert (engine.last_stats.batch_size, engine.last_stats.num_tokens) == (2, budget), "not the sliver meant"
        steps += 1
    _assert_matches(model_dir, [first, second], [12, 12], got)


@pytest.mark.parametrize("arch", ARCHS)
def test_preemption_under_kv_pressure_keeps_outputs_exact(model_root, arch):
    model_dir = _model(model_root, arch)
    prompts = _prompts(3, 6)
    max_tokens = [40] * 6
    # Room for about two full sequences: the rest must wait or be preempted and recomputed, and a
    # small budget makes the recomputes prefill in chunks too.
    built = build_engine(
        _cfg(model_dir, kv_cache_tokens=128, max_seq_len=96, max_num_batched_tokens=17)
    )
    engine = built.engine
    preempted = 0
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, _greedy(max_tokens[i]))
    while engine.has_work:
        for output in engine.step():
            out[output.request_id].extend(output.token_ids)
        preempted += engine.last_stats.num_preempted
    assert preempted > 0, "the test meant to exercise preemption"
    assert engine.blocks.usage == 0.0, "finished sequences must return every block"
    _assert_matches(model_dir, prompts, max_tokens, out)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3", "phi3"])
@pytest.mark.parametrize("kv_tokens", [None, 160], ids=["roomy", "preempting"])
def test_prefix_cache_hits_keep_outputs_token_identical(model_root, arch, kv_tokens):
    """Requests sharing a 37-token prefix (two full blocks and five tokens into the third) with
    different continuations: later ones reuse the cached blocks, outputs stay exactly transformers'."""
    model_dir = _model(model_root, arch)
    rng = random.Random(11)
    shared = [1] + [rng.randrange(3, 512) for _ in range(36)]
    prompts = [shared + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 20))] for _ in range(5)]
    prompts.append(list(shared[:32]))  # the whole prompt is two cached blocks: its last one is recomputed
    max_tokens = [20, 9, 30, 14, 25, 10]
    outputs = {}
    for caching in (True, False):
        cfg = _cfg(model_dir, kv_cache_tokens=kv_tokens, max_seq_len=96, prefix_caching=caching)
        engine = build_engine(cfg).engine
        got = _run_staggered(engine, prompts, arrivals=[0, 3, 3, 4, 8, 9], max_tokens=max_tokens)
        outputs[caching] = got
        stats = engine.idle_stats()
        if caching:
            assert stats.prefix_hits_total >= 4 * 32, "later requests must reuse the shared blocks"
            if kv_tokens is not None:
                assert stats.preempted_total > 0, "the test meant to exercise preemption"
        else:
            assert stats.prefix_hits_total == 0
        assert engine.blocks.usage == 0.0
    if DTYPE == "float32":  # in half precision, a prefix computed in other chunks may round otherwise
        assert outputs[True] == outputs[False]
    for caching in (True, False):
        _assert_matches(model_dir, prompts, max_tokens, outputs[caching])


def test_the_n_choices_of_one_request_share_their_prompt_blocks(model_root):
    model_dir = _model(model_root, "llama")
    prompt = _prompts(8, 1, lengths=(50, 51))[0]
    engine = build_engine(_cfg(model_dir)).engine
    engine.add_request("n3", prompt, _greedy(10), n=3)
    got: dict[int, list[int]] = {i: [] for i in range(3)}
    for output in engine.step():
        got[output.index].extend(output.token_ids)
    held = {b for seq in engine._requests["n3"] for b in seq.block_table}
    assert len(held) == 4 + 2, "three full prompt blocks held once, plus each choice's own last block"
    assert engine.last_stats.prefix_hits == 2 * 48
    while engine.has_work:
        for output in engine.step():
            got[output.index].extend(output.token_ids)
    assert got[0] == got[1] == got[2]
    _assert_one(model_dir, prompt, 10, got[0], "n=3")


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
    built = build_engine(_cfg(model_dir))
    assert built.info.architecture == "llama"
    prompts = _prompts(4, 3)
    got = _run_staggered(built.engine, prompts, arrivals=[0, 1, 2], max_tokens=[20, 20, 20])
    _assert_matches(model_dir, prompts, [20] * 3, got)


def test_decode_graph_rows_come_back_in_the_order_asked(model_root):
    """The static-buffer path returns each decode row's logits; rows asked in another order (or fewer)
    are picked from them, as the eager path picks them."""
    from serving.models.runner import ForwardChunk

    model_dir = _model(model_root, "llama")
    built = build_engine(_cfg(model_dir, max_batch_size=4))
    runner = built.engine.runner
    if runner.graphs is None:
        runner.use_decode_graphs(4, built.model.max_model_len, capture=False)
    chunks = [ForwardChunk(i, [5 + i], 3, [i], decode=True) for i in range(3)]
    every = runner.execute(chunks, [0, 1, 2])
    assert torch.equal(runner.execute(chunks, [2, 0]), every[[2, 0]])
