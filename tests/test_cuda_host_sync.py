"""On a GPU the host never waits for the device inside a step except once, for the sampled ids (with
their logprobs in the same copy): step inputs, attention metadata, sampling parameters, logit biases
and grammar masks all go over by pinned, non-blocking copies, so nothing else in the step stalls the
host behind the GPU's queue. torch's sync debug mode warns at every synchronizing call; each step
must warn exactly once, through CUDA-graph decode steps and eager mixed steps, with every sampling
feature in the batch.

Runs where bench/device_check.sh runs the oracle tests (FLEETLM_TEST_DEVICE=cuda); skipped on CPU.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from serving.config import ServeConfig
from serving.engine.builder import build_engine
from serving.engine.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_model

DEVICE = os.environ.get("FLEETLM_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("FLEETLM_TEST_DTYPE", "float32")

pytestmark = pytest.mark.skipif(
    DEVICE != "cuda" or not torch.cuda.is_available(), reason="a GPU step's syncs: needs FLEETLM_TEST_DEVICE=cuda"
)


def _syncs_of_step(engine) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_a_step_waits_for_the_gpu_once_whatever_it_samples(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    engine = build_engine(
        ServeConfig(model_path=str(model_dir), device="cuda", dtype=DTYPE, max_batch_size=8, max_num_batched_tokens=64)
    ).engine
    assert engine.runner.graphs is not None and engine.runner.graphs.graphs, "decode steps should replay CUDA graphs"
    kinds = {
        "greedy": SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        "seeded": SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, top_k=40, seed=7, ignore_eos=True),
        "min_p": SamplingParams(max_tokens=12, temperature=1.0, min_p=0.1, ignore_eos=True),
        "penalised": SamplingParams(
            max_tokens=12, temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4, ignore_eos=True
        ),
        "biased": SamplingParams(max_tokens=12, temperature=0.0, logit_bias=((5, 3.0), (9, -100.0)), min_tokens=6, stop_token_ids=(7,)),
        "logprobs": SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True),
    }
    engine.add_request("warm-up", [1, 4, 9, 16], kinds["greedy"])  # Triton compiles outside the counted steps
    while engine.has_work:
        engine.step()
    graph_steps = engine.runner.graphs.steps
    counts: list[tuple[str, int]] = []
    for step in range(16):
        if step < len(kinds):  # one arrival per step: its prefill is mixed with the others' decodes
            name = list(kinds)[step]
            engine.add_request(name, [1] + [(7 * step + 3 * i) % 500 + 3 for i in range(20 + 9 * step)], kinds[name])
        pure_decode = all(s.is_decoding for s in engine.scheduler.running) and not engine.scheduler.waiting
        counts.append(("decode" if pure_decode else "mixed", _syncs_of_step(engine)))
    assert engine.runner.graphs.steps > graph_steps, "no decode step replayed a graph"
    assert {kind for kind, _ in counts} == {"decode", "mixed"}
    assert all(n == 1 for _, n in counts), f"synchronizing calls per step (want 1 each): {counts}"
