"""A thinking model's <think> block comes back as the message's reasoning, apart from its content; and
chat_template_kwargs reach the template. On a model that thinks deterministically (tiny_models.
make_thinking_model: the same script, "<think> The cat big.</think>\\nYes, it", whatever it is asked)."""

from __future__ import annotations

import random

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from serving.api import reasoning
from serving.engine.grammar import Grammars, apply_masks, choice_spec
from serving.models.source import demo_model_dir
from tests.server_util import RunningServer
from tests.tiny_models import THINKING_SCRIPT, make_thinking_model

ASK = [{"role": "user", "content": "Is the cat big?"}]
THOUGHT, ANSWER = "The cat big.", "Yes, it"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_thinking_model(tmp_path_factory.mktemp("thinking"))


@pytest.fixture(scope="module")
def server(model_dir):
    with RunningServer(model_path=str(model_dir), max_batch_size=8) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def _chat(client, **extra):
    return client.chat.completions.create(model="thinking", messages=ASK, max_tokens=32, **extra)


def _streamed(client, **extra) -> tuple[list[str], list[str], list]:
    """The reasoning and content pieces of a stream, in order, and its chunks' choices."""
    thoughts, contents, choices = [], [], []
    for chunk in _chat(client, stream=True, **extra):
        for choice in chunk.choices:
            choices.append(choice)
            extra_fields = choice.delta.model_extra or {}
            if extra_fields.get("reasoning") is not None:
                assert extra_fields["reasoning_content"] == extra_fields["reasoning"]
                thoughts.append(extra_fields["reasoning"])
                assert not contents, "reasoning after content"
            if choice.delta.content:
                contents.append(choice.delta.content)
    return thoughts, contents, choices


@pytest.mark.parametrize("kwargs", [{}, {"opened": True}], ids=["the-output-opens-the-block", "the-prompt-opens-it"])
def test_the_think_block_is_the_reasoning_and_the_rest_the_content(client, kwargs):
    extra = {"extra_body": {"chat_template_kwargs": kwargs}} if kwargs else {}
    message = _chat(client, **extra).choices[0].message
    assert message.content == ANSWER
    assert message.model_extra["reasoning"] == message.model_extra["reasoning_content"] == THOUGHT
    thoughts, contents, choices = _streamed(client, **extra)
    assert "".join(thoughts) == THOUGHT and "".join(contents) == ANSWER
    assert choices[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    ("kwargs", "thought_tokens"),
    [({}, 7), ({"opened": True}, 6), ({"enable_thinking": False}, 0)],  # <think> . . . </think>: the tags count
    ids=["the-output-opens-the-block", "the-prompt-opens-it", "no-block"],
)
def test_usage_counts_the_reasoning_tokens(client, kwargs, thought_tokens):
    body = {"extra_body": {"chat_template_kwargs": kwargs}}
    whole = _chat(client, **body).usage
    assert whole.completion_tokens_details.reasoning_tokens == thought_tokens
    assert whole.completion_tokens == thought_tokens + len(THINKING_SCRIPT[THINKING_SCRIPT.index("</think>") + 1 :]) + 1  # + EOS
    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}, **body))
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == thought_tokens
    n2 = _chat(client, n=2, **body).usage  # each choice's count
    assert n2.completion_tokens_details.reasoning_tokens == 2 * thought_tokens


def test_with_tools_the_calls_are_looked_for_in_the_content_alone(client):
    tool = {"type": "function", "function": {"name": "look", "parameters": {"type": "object", "properties": {}}}}
    message = _chat(client, tools=[tool]).choices[0].message
    assert (message.model_extra["reasoning"], message.content, message.tool_calls) == (THOUGHT, ANSWER, None)
    thoughts, contents, _ = _streamed(client, tools=[tool])
    assert ("".join(thoughts), "".join(contents)) == (THOUGHT, ANSWER)


def test_logprobs_cover_every_shown_token_once_reasoning_included(client):
    whole = _chat(client, logprobs=True).choices[0].logprobs.content
    assert [e.token for e in whole][:2] == ["<think>", " The"] and len(whole) == len(THINKING_SCRIPT)  # EOS is not shown
    streamed = [e for c in _streamed(client, logprobs=True)[2] if c.logprobs for e in c.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole]


def test_enable_thinking_false_reaches_the_template(client, server):
    message = _chat(client, extra_body={"chat_template_kwargs": {"enable_thinking": False}}).choices[0].message
    assert message.model_extra.get("reasoning") is None and message.content.strip() == ANSWER
    tokens = httpx.post(
        server.base_url + "/tokenize", json={"messages": ASK, "chat_template_kwargs": {"enable_thinking": False}}
    ).json()["tokens"]
    tokenizer = AutoTokenizer.from_pretrained(server.config.model_path)
    assert tokenizer.decode(tokens).endswith("<|assistant|><think></think>")


def test_include_reasoning_false_leaves_it_out(client):
    message = _chat(client, extra_body={"include_reasoning": False}).choices[0].message
    assert message.content == ANSWER and "reasoning" not in (message.model_extra or {})
    thoughts, contents, _ = _streamed(client, extra_body={"include_reasoning": False})
    assert thoughts == [] and "".join(contents) == ANSWER


@pytest.mark.parametrize(
    ("kwargs", "thought"),
    [({}, THOUGHT), ({"opened": True}, THOUGHT), ({"enable_thinking": False}, None)],
    ids=["the-output-opens-the-block", "the-prompt-opens-it", "no-block"],
)
@pytest.mark.parametrize(
    "constraint",
    [
        {"guided_choice": ["yes", "no"]},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"enum": ["yes", "no"]}}}},
    ],
    ids=["choice", "json_schema"],
)
def test_a_constrained_reply_thinks_first_and_its_content_keeps_the_grammar(client, kwargs, thought, constraint):
    """The grammar holds after the think block: the model writes its script's block freely, then the
    content its grammar allows, where the script would have gone on otherwise. Without a block (its
    first token may open one, or be the grammar's), the grammar holds from the start."""
    body = {"temperature": 0, "extra_body": {**constraint, "chat_template_kwargs": kwargs}}  # greedy: ties alike
    message = _chat(client, **body).choices[0].message
    assert message.content.strip('"') in ("yes", "no") and message.model_extra.get("reasoning") == thought
    thoughts, contents, _ = _streamed(client, **body)
    assert ("".join(thoughts) or None, "".join(contents)) == (thought, message.content)


def test_reasoning_sent_back_in_the_history_reaches_the_template(server):
    for key in ("reasoning", "reasoning_content"):
        history = [*ASK, {"role": "assistant", "content": ANSWER, key: THOUGHT}, {"role": "user", "content": "Sure?"}]
        tokens = httpx.post(server.base_url + "/tokenize", json={"messages": history}).json()["tokens"]
        text = AutoTokenizer.from_pretrained(server.config.model_path).decode(tokens)
        assert f"<|assistant|>{ANSWER}[{THOUGHT}]" in text


@pytest.mark.parametrize("key", ["tokenize", "messages", "add_generation_prompt", "chat_template"])
def test_template_kwargs_may_not_replace_what_the_server_sets(server, key):
    for path, body in (("/v1/chat/completions", {"model": "thinking"}), ("/tokenize", {})):
        r = httpx.post(server.base_url + path, json={**body, "messages": ASK, "chat_template_kwargs": {key: True}})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "chat_template_kwargs" and key in r.json()["error"]["message"]


def test_auto_turns_on_for_tokenizers_with_the_tags(model_dir):
    thinking, demo = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(demo_model_dir())
    def enabled(setting, tokenizer):
        return reasoning.enabled(setting, tokenizer, reasoning.tag_ids(tokenizer))

    assert enabled("auto", thinking) and not enabled("auto", demo)
    assert enabled("qwen3", demo) and enabled("deepseek_r1", demo)
    assert not enabled("none", thinking)


@pytest.mark.parametrize(
    ("text", "inside", "thought", "content"),
    [
        ("<think>\nhmm, ok\n</think>\n\nAnswer.", False, "hmm, ok", "Answer."),
        ("  <think>a b</think>c", False, "a b", "c"),
        ("hmm\n</think>\n\nAnswer.", True, "hmm", "Answer."),
        ("<think>hmm</think>x", True, "hmm", "x"),  # a template that opened the block, and a model that opened it again
        ("Answer <think>", False, None, "Answer <think>"),  # a tag later on is the content's
        ("\nAnswer", False, None, "\nAnswer"),
        ("  <thi", False, None, "  <thi"),
        ("<think>cut short </thi", False, "cut short </thi", ""),  # a length cut inside the block
        ("all thought", True, "all thought", ""),
        ("<think></think>x", False, None, "x"),
        ("", True, None, ""),
    ],
)
def test_the_split_streamed_in_any_pieces_is_the_whole_one(text, inside, thought, content):
    assert reasoning.split(text, inside) == (thought, content)
    rng = random.Random(text)
    for _ in range(100):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        splitter, thoughts, contents = reasoning.ThinkSplitter(inside), [], []
        for k, piece in enumerate(pieces):
            t, c = splitter.feed(piece, final=k == len(pieces) - 1)
            thoughts.append(t)
            contents.append(c)
        assert ("".join(thoughts) or None, "".join(contents)) == (thought, content), pieces


def test_a_response_gives_the_reasoning_as_an_item_of_its_own(client, server):
    whole = client.responses.create(model="thinking", input="Is the cat big?", max_output_tokens=32)
    assert [item.type for item in whole.output] == ["reasoning", "message"]
    assert [part.text for part in whole.output[0].content] == [THOUGHT] and whole.output_text == ANSWER
    assert whole.usage.output_tokens_details.reasoning_tokens == 7  # <think> through </think>

    events = list(client.responses.create(model="thinking", input="Is the cat big?", max_output_tokens=32, stream=True))
    thought = [e for e in events if e.type == "response.reasoning_text.delta"]
    text = [e for e in events if e.type == "response.output_text.delta"]
    assert "".join(e.delta for e in thought) == THOUGHT and "".join(e.delta for e in text) == ANSWER
    assert {e.output_index for e in thought} == {0} and {e.output_index for e in text} == {1}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = [e.item.type for e in events if e.type == "response.output_item.done"]
    assert done == ["reasoning", "message"] and events[-1].type == "response.completed"
    final = events[-1].response.output
    assert events[-1].response.usage.output_tokens_details.reasoning_tokens == 7
    assert [part.text for part in final[0].content] == [THOUGHT] and final[1].content[0].text == ANSWER

    # The next turn replays the output: the reasoning reaches the template with the reply it led to.
    replayed = [item.model_dump(exclude_none=True) for item in whole.output]
    turn = client.responses.create(model="thinking", input=[*ASK, *replayed, {"role": "user", "content": "Sure?"}])
    history = [*ASK, {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT}, {"role": "user", "content": "Sure?"}]
    assert turn.usage.input_tokens == httpx.post(server.base_url + "/tokenize", json={"messages": history}).json()["count"]


def test_a_response_cut_inside_the_block_is_incomplete_reasoning(client):
    whole = client.responses.create(model="thinking", input="Is the cat big?", max_output_tokens=3)
    assert whole.status == "incomplete" and [item.type for item in whole.output] == ["reasoning"]
    assert whole.output[0].status == "incomplete" and whole.output[0].content[0].text == "The c"  # <think>, " The", " c"


@pytest.mark.parametrize("extra", [0, 31, 32, 480, 511])  # bit 31 is an int32 word's sign
def test_a_grammar_mask_lets_the_opening_tag_through_too(extra):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    grammars = Grammars(lambda: tokenizer, 512, (tokenizer.eos_token_id,))
    logits = torch.zeros(2, 512)

    def allowed(masked: torch.Tensor) -> set[int]:
        return set(torch.isfinite(masked).nonzero().flatten().tolist())

    matcher = Grammars.matcher(grammars.compile(choice_spec(["yes"])))
    plain = apply_masks(logits, [matcher, None])
    more = apply_masks(logits, [matcher, None], [extra, None])
    assert extra not in allowed(plain[0]) and allowed(more[0]) == allowed(plain[0]) | {extra}
    assert torch.equal(more[1], logits[1])


def test_reasoning_effort_reaches_a_template_that_reads_it(client):
    """The thinking model's template reads enable_thinking (Qwen3's way): none turns thinking off, any other
    effort on; /v1/responses takes it as reasoning.effort."""
    off = _chat(client, reasoning_effort="none").choices[0].message
    assert off.model_extra.get("reasoning") is None and off.content.strip() == ANSWER
    assert _chat(client, reasoning_effort="low").choices[0].message.model_extra["reasoning"] == THOUGHT
    response = client.responses.create(model="thinking", input="Is the cat big?", reasoning={"effort": "none"})
    assert [item.type for item in response.output] == ["message"]


def test_effort_variables_follow_what_the_template_reads():
    from types import SimpleNamespace

    from serving.api.generation import effort_variables

    gpt_oss = SimpleNamespace(chat_template="Reasoning: {{ reasoning_effort | default('medium') }}")
    qwen3 = SimpleNamespace(chat_template="{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
    both = SimpleNamespace(chat_template={"default": gpt_oss.chat_template, "tool_use": qwen3.chat_template})
    plain = SimpleNamespace(chat_template="{{ messages }}")
    assert effort_variables(gpt_oss, "high") == {"reasoning_effort": "high"}
    assert effort_variables(qwen3, "none") == {"enable_thinking": False} and effort_variables(qwen3, "low") == {"enable_thinking": True}
    assert effort_variables(both, "max") == {"reasoning_effort": "max", "enable_thinking": True}
    assert effort_variables(plain, "high") == {} and effort_variables(gpt_oss, None) == {}


def test_special_tags_are_not_split_on(model_dir):
    """Where the tags are special tokens generated text leaves them out: no split, whatever the setting."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    tags = reasoning.tag_ids(tokenizer)
    assert not reasoning.enabled("auto", tokenizer, tags) and not reasoning.enabled("deepseek_r1", tokenizer, tags)
