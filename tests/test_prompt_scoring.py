"""Echo + logprobs scores every prompt token; the rows it scores per step have a budget (each is a
[vocab] float32 row of logits), so a long prompt is scored over several steps: the scores are the
same as in one step, and no step asks the runner for more rows than the budget allows."""

from __future__ import annotations

import pytest

from serving.config import ServeConfig
from serving.engine.builder import build_engine
from serving.engine.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_model

PROMPT = [1] + [(7 * i) % 500 + 3 for i in range(45)]
PARAMS = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("scoring"), "llama")
    return build_engine(ServeConfig(model_path=str(model_dir), device="cpu", max_batch_size=4)).engine


def _score(engine, budget: int, monkeypatch) -> tuple[list, list[int]]:
    rows_asked: list[int] = []
    run = engine.runner.run

    def counting(chunks, logit_rows, hidden_rows):
        rows_asked.append(len(logit_rows))
        return run(chunks, logit_rows, hidden_rows)

    with monkeypatch.context() as patch:
        patch.setattr(engine.runner, "run", counting)
        patch.setattr(engine.scheduler, "max_scored_rows", budget)
        engine.add_request("echo", PROMPT, PARAMS)
        outputs = []
        while engine.has_work:
            outputs.extend(engine.step())
    first = next(o for o in outputs if o.prompt_logprobs is not None)
    return first.prompt_logprobs, rows_asked


def test_a_long_prompt_is_scored_over_several_steps_with_the_same_scores(engine, monkeypatch):
    whole, whole_rows = _score(engine, 1000, monkeypatch)
    chunked, chunked_rows = _score(engine, 8, monkeypatch)
    assert len(whole) == len(PROMPT) and whole[0] is None
    assert [s.token_id for s in whole[1:]] == PROMPT[1:]
    assert whole_rows[0] == len(PROMPT), "one step: every prompt row scored (the last one sampled)"
    assert max(chunked_rows) <= 8 + 1, chunked_rows  # the scored rows, and the row sampled at the prompt's end
    assert len(chunked_rows) >= len(PROMPT) // 8
    for a, b in zip(whole[1:], chunked[1:], strict=True):
        assert a.token_id == b.token_id
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
