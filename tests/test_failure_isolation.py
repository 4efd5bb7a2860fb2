"""A sequence whose own parameters make sampling fail fails alone: its batch-mates produce exactly
the tokens (and logprobs) they produce when run solo. And adding a request is all-or-nothing.

The failing parameter is real, not a mock: a logit_bias entry naming a token id past the
vocabulary, which the API refuses but the engine's sampler would index with. It goes straight to
the engine here, as a bug in validation would let it."""

from __future__ import annotations

import threading

import pytest
import torch

from serving.config import ServeConfig
from serving.engine.builder import build_engine
from serving.engine.llm_engine import DeviceLost
from serving.engine.protocol import RequestRejected
from serving.engine.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_model

PROMPTS = {"greedy": [1, 5, 9, 44, 2], "seeded": [1, 7, 7, 300], "penalised": [1, 12, 13, 14, 15, 16, 17]}
PARAMS = {
    "greedy": SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3),
    "seeded": SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True, logprobs=2),
    "penalised": SamplingParams(
        max_tokens=12, temperature=0.7, top_k=20, seed=99, repetition_penalty=1.3, ignore_eos=True
    ),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("iso"), "llama")
    return build_engine(ServeConfig(model_path=str(model_dir), device="cpu", max_batch_size=8)).engine


def _run(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    out: dict[str, list] = {rid: [] for rid in requests}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    while engine.has_work:
        for o in engine.step():
            out[o.request_id].append(o)
    return out


def _signature(outputs) -> tuple:
    """Everything a client sees of a sequence: tokens, logprobs, finish reason, error."""
    return tuple((o.token_ids, o.logprobs, o.finish_reason, o.error) for o in outputs)


def _tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.token_ids]


def test_a_sequence_whose_sampling_fails_leaves_its_batch_mates_identical_to_solo(engine):
    vocab = engine.runner.vocab_size
    mates = {rid: (PROMPTS[rid], PARAMS[rid]) for rid in PROMPTS}
    solo = {rid: _run(engine, {rid: mates[rid]})[rid] for rid in PROMPTS}
    # Control: the same batch, with a sequence in the bad one's place that simply ends after its
    # first token, so every step has the same shapes as in the failing run.
    ends = SamplingParams(max_tokens=1, temperature=0.8, ignore_eos=True)
    control = _run(engine, {"bad": ([1, 2, 3], ends), **mates})
    bad = SamplingParams(max_tokens=12, temperature=0.8, ignore_eos=True, logit_bias=((vocab + 7, 5.0),))
    together = _run(engine, {"bad": ([1, 2, 3], bad), **mates})

    failed = together.pop("bad")
    assert [o.finish_reason for o in failed] == ["error"], "the bad sequence fails once, at its first sample"
    assert "IndexError" in failed[0].error
    for rid, outputs in together.items():
        assert len(outputs) == 12 and outputs[-1].finish_reason == "length"
        # Byte for byte what the same batch gives when nobody fails...
        assert _signature(outputs) == _signature(control[rid]), f"{rid} changed because a batch-mate failed"
        # ...and the same tokens as alone (logprobs may differ in the last float bits between
        # batch shapes, as the matmuls' summation order does).
        assert _tokens(outputs) == _tokens(solo[rid]), rid
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_the_failure_happens_in_a_shared_batch(engine):
    """Guard for the test above: the bad sequence really sampled in the same step as the others."""
    vocab = engine.runner.vocab_size
    bad = SamplingParams(max_tokens=4, temperature=0.8, logit_bias=((vocab + 7, 5.0),))
    engine.add_request("bad", [1, 2, 3], bad)
    engine.add_request("good", PROMPTS["greedy"], PARAMS["greedy"])
    first = engine.step()
    assert engine.last_stats.batch_size == 2
    assert {o.request_id: o.finish_reason for o in first} == {"bad": "error", "good": None}
    while engine.has_work:
        engine.step()


def test_seeds_at_both_ends_of_the_64_bit_range_seed_every_choice(engine):
    # Choice i's generator seed mixes the seed with i (llm_engine.mixed_seed): seed + 1 once overflowed
    # the generator for choice 1 of seed 2**64 - 1, and the request was refused.
    for seed in (2**64 - 1, -(2**63)):
        engine.add_request(f"seed{seed}", [1, 2, 3], SamplingParams(max_tokens=3, seed=seed, ignore_eos=True), n=2)
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    assert outputs and all(o.finish_reason in (None, "length") for o in outputs)
    assert sum(o.finish_reason == "length" for o in outputs) == 4


@pytest.mark.parametrize("bad_id", [-1, 512, 10**6])
def test_a_prompt_token_outside_the_vocabulary_is_refused_before_any_step(engine, bad_id):
    # The embedding lookup would fail the whole step it ran in (on a GPU, abort the process).
    with pytest.raises(RequestRejected, match="out of the vocabulary"):
        engine.add_request("oov", [1, bad_id, 3], SamplingParams(max_tokens=2), n=2)
    assert not engine.has_work
    engine.add_request("oov", [1, 511, 3], SamplingParams(max_tokens=2, temperature=0.0))  # the last id is fine
    while engine.has_work:
        assert all(o.finish_reason != "error" for o in engine.step())


# -- the accelerator failing -------------------------------------------------------------------
# A CUDA error cannot be made on a CPU: the runner's forward pass raises the exceptions torch and
# Triton raise for one, and everything around it is the real engine.


def _failing_forward(exc: Exception):
    def run(chunks, logit_rows, hidden_rows):
        raise exc

    return run


@pytest.fixture
def fresh_engine(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    return build_engine(ServeConfig(model_path=str(model_dir), device="cpu", max_batch_size=4)).engine


@pytest.mark.parametrize(
    "error",
    [
        torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
        RuntimeError("CUDA error: device-side assert triggered"),
    ],
    ids=["torch", "triton", "assert"],
)
def test_a_sticky_cuda_error_stops_the_engine(fresh_engine, monkeypatch, error):
    """After an illegal memory access the CUDA context fails every later kernel: failing only the step's
    sequences would fail every request from then on, behind a health check that still says ok."""
    fresh_engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=4))
    monkeypatch.setattr(fresh_engine.runner, "run", _failing_forward(error))
    with pytest.raises(DeviceLost) as info:
        fresh_engine.step()
    assert info.value.__cause__ is error


def test_out_of_memory_fails_the_step_and_the_engine_goes_on(fresh_engine, monkeypatch):
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    fresh_engine.add_request("big", [1, 2, 3], greedy)
    with monkeypatch.context() as patch:
        patch.setattr(fresh_engine.runner, "run", _failing_forward(torch.OutOfMemoryError("CUDA out of memory")))
        outputs = fresh_engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("big", "error")]
    assert "OutOfMemoryError" in outputs[0].error
    assert len(_tokens(_run(fresh_engine, {"next": ([1, 2, 3], greedy)})["next"])) == 4


def test_the_engine_loop_ends_on_a_lost_device(fresh_engine, monkeypatch):
    """The engine process's loop lets DeviceLost out (run_engine exits with EXIT_DEVICE_LOST; the API
    process sees the engine gone and exits non-zero: test_server_process)."""
    from multiprocessing import Pipe

    from serving.engine.engine_process import _serve
    from serving.engine.protocol import AddRequest, StepOutputs

    commands_recv, commands_send = Pipe(duplex=False)
    outputs_recv, outputs_send = Pipe(duplex=False)
    monkeypatch.setattr(fresh_engine.runner, "run", _failing_forward(torch.AcceleratorError("CUDA error: unspecified launch failure")))
    commands_send.send(AddRequest("r", [1, 2, 3], SamplingParams(max_tokens=4)))
    raised: list[BaseException] = []

    def serve() -> None:
        try:
            _serve(fresh_engine, commands_recv, outputs_send)
        except BaseException as exc:
            raised.append(exc)

    loop = threading.Thread(target=serve, daemon=True)
    loop.start()
    while loop.is_alive():
        if outputs_recv.poll(0.05) and isinstance(outputs_recv.recv(), StepOutputs):
            break  # the loop went on past the failed step
    commands_send.close()  # a loop that went on idles waiting for commands: EOF ends it
    loop.join(10)
    assert len(raised) == 1 and isinstance(raised[0], DeviceLost), raised


def test_a_sequence_whose_prompt_scoring_fails_fails_alone(engine):
    """Echo + logprobs with more alternatives than the vocabulary (the API caps them at 20; a bug in
    validation would let this through): scoring its prompt fails, its batch-mates are untouched."""
    vocab = engine.runner.vocab_size
    bad = SamplingParams(max_tokens=4, logprobs=vocab + 5, prompt_logprobs=True)
    mates = {rid: (PROMPTS[rid], PARAMS[rid]) for rid in PROMPTS}
    solo = {rid: _run(engine, {rid: mates[rid]})[rid] for rid in PROMPTS}
    together = _run(engine, {"bad": ([1, 2, 3, 4], bad), **mates})
    failed = together.pop("bad")
    assert [o.finish_reason for o in failed] == ["error"] and "RuntimeError" in failed[0].error
    for rid, outputs in together.items():
        assert _tokens(outputs) == _tokens(solo[rid]), rid
    assert engine.num_running == 0 and engine.num_waiting == 0
