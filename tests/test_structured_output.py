"""response_format through the official openai SDK on the demo model: decoding is constrained by a
grammar (xgrammar), so every finished output parses and validates, at any temperature, for every choice,
streamed or not; a schema the library refuses is a 400; constrained and unconstrained sequences share
batches without changing the unconstrained ones."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from pydantic import BaseModel

from serving.config import ServeConfig
from serving.engine.builder import build_engine
from serving.engine.grammar import json_schema_spec
from serving.engine.sampling_params import SamplingParams

MODEL = "stories260k"
# Nested objects, arrays, enums, required fields; bounded so the tiny model finishes in max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["happy", "sad", "angry"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 2},
        "hero": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                                  "brave": {"type": "boolean"}}, "required": ["name", "brave"],
                 "additionalProperties": False},
    },
    "required": ["mood", "count", "tags", "hero"],
    "additionalProperties": False,
}  # fmt: skip
FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA, "strict": True}}


def _valid(text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    assert list(value) == list(SCHEMA["properties"])  # written in the schema's order
    return value


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_chat_output_validates_for_every_choice(client, temperature):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], response_format=FORMAT,
        temperature=temperature, n=3, seed=7, max_tokens=200,
    )  # fmt: skip
    assert len(r.choices) == 3
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        _valid(choice.message.content)


def test_json_schema_streamed_and_on_completions(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Once"}], response_format=FORMAT, stream=True,
        temperature=1.0, seed=3, max_tokens=200,
    )  # fmt: skip
    text, reasons = "", []
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reasons.append(choice.finish_reason)
    assert "stop" in reasons
    _valid(text)
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=200, temperature=0.8, seed=1,
                                  extra_body={"response_format": FORMAT})  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    _valid(r.choices[0].text)


def test_parse_with_a_pydantic_model(client):
    class Hero(BaseModel):
        name: str
        brave: bool

    r = client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": "A hero"}], response_format=Hero, max_tokens=100, temperature=0
    )  # fmt: skip
    hero = r.choices[0].message.parsed
    assert isinstance(hero, Hero)


def test_json_object_starts_an_object_and_logprobs_are_of_the_masked_distribution(server):
    r = httpx.post(server.base_url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"},
        "max_tokens": 5, "logprobs": True, "top_logprobs": 3, "temperature": 0,
    }, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"].startswith("{")
    first = choice["logprobs"]["content"][0]
    # Only "{" (or whitespace-free variants starting an object) may start: its probability is ~1.
    assert first["token"].strip().startswith("{") and first["logprob"] > -1e-3


@pytest.mark.parametrize(
    ("fmt", "needle"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "nowhere"),
        ({"type": "json_schema"}, "json_schema"),
        ({"type": "yaml"}, "response_format"),
    ],
)
def test_a_schema_that_cannot_be_used_is_a_400(server, fmt, needle):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": fmt}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["param"] == "response_format"


def test_unconstrained_batch_mates_are_token_identical_to_their_solo_runs(tmp_path):
    engine = build_engine(ServeConfig(device="cpu", max_batch_size=8)).engine
    prompt = [1, 403, 407, 261, 1301 % 512]
    plain = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    def run(requests):
        out = {rid: [] for rid in requests}
        for rid, params in requests.items():
            engine.add_request(rid, prompt, params)
        while engine.has_work:
            for o in engine.step():
                out[o.request_id].extend(o.token_ids)
        return out

    solo = run({"plain": plain})["plain"]
    mixed = run({"plain": plain, "json": SamplingParams(max_tokens=60, temperature=1.0, seed=5,
                                                        grammar=json_schema_spec(SCHEMA))})  # fmt: skip
    assert mixed["plain"] == solo
    assert mixed["json"]


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"guided_choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
        ({"structured_outputs": {"choice": ["red", "blue"]}}, lambda t: t in ("red", "blue")),
        ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, lambda t: __import__("re").fullmatch("[0-9]{3}-[a-z]{2}", t)),
        ({"structured_outputs": {"regex": "(cat|dog)s?"}}, lambda t: __import__("re").fullmatch("(cat|dog)s?", t)),
        ({"guided_json": SCHEMA}, _valid),
        ({"structured_outputs": {"json": SCHEMA}}, _valid),
    ],
)
def test_vllms_guided_extensions(client, extra, check):
    for seed in range(3):
        r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=200, temperature=1.0,
                                      seed=seed, extra_body=extra)  # fmt: skip
        assert r.choices[0].finish_reason == "stop", r.choices[0].text
        assert check(r.choices[0].text), r.choices[0].text


def test_one_constraint_at_a_time_and_bad_regexes_are_400s(server):
    base = {"model": MODEL, "prompt": "x", "max_tokens": 5}
    both = httpx.post(server.base_url + "/v1/completions", json={**base, "guided_regex": "a+", "guided_choice": ["b"]})
    assert both.status_code == 400 and "one output constraint" in both.json()["error"]["message"]
    bad = httpx.post(server.base_url + "/v1/completions", json={**base, "guided_regex": "(unclosed"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_regex", bad.text
    mixed = httpx.post(server.base_url + "/v1/completions", json={**base, "guided_choice": ["a"], "min_tokens": 2})
    assert mixed.status_code == 400 and "min_tokens" in mixed.json()["error"]["message"]
