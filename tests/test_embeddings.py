"""/v1/embeddings: each input's last token's final hidden state, L2-normalized, against transformers' own
model on the same checkpoint, through the openai SDK (which asks for base64) and raw HTTP."""

from __future__ import annotations

import base64
import struct
import threading

import httpx
import openai
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from serving.config import ServeConfig
from serving.engine.builder import build_engine
from serving.engine.sampling_params import SamplingParams
from tests.server_util import RunningServer
from tests.tiny_models import make_tiny_model

TEXTS = ["Once upon a time there was a cat.", "The dog ran to the park and played with a big red ball all day."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("embed"), "qwen3")


@pytest.fixture(scope="module")
def server(model_dir):
    # Batched token budget below the longer text's length: its prompt is computed over several steps.
    with RunningServer(model_path=str(model_dir), max_batch_size=4, max_num_batched_tokens=8, queue_capacity=8) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def _expected(model_dir, ids: list[int]) -> torch.Tensor:
    """transformers' last hidden state (after the final norm) of the last token, normalized."""
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        last = model(torch.tensor([ids])).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(last, dim=-1)


def _ids(model_dir, text: str) -> list[int]:
    return AutoTokenizer.from_pretrained(model_dir)(text).input_ids


def test_embeddings_are_the_last_tokens_normalized_hidden_state(client, model_dir):
    result = client.embeddings.create(model="qwen3", input=TEXTS)  # the SDK asks for base64 and decodes it
    assert [d.index for d in result.data] == [0, 1]
    for text, item in zip(TEXTS, result.data, strict=True):
        ids = _ids(model_dir, text)
        torch.testing.assert_close(torch.tensor(item.embedding), _expected(model_dir, ids), atol=1e-4, rtol=1e-4)
    assert result.usage.prompt_tokens == result.usage.total_tokens == sum(len(_ids(model_dir, t)) for t in TEXTS)


def test_floats_base64_and_token_ids_agree(server, model_dir):
    def ask(**body):
        r = httpx.post(server.base_url + "/v1/embeddings", json={"model": "qwen3", **body}, timeout=30)
        assert r.status_code == 200, r.text
        return [d["embedding"] for d in r.json()["data"]]

    floats = ask(input=TEXTS[0], encoding_format="float")[0]
    raw = base64.b64decode(ask(input=TEXTS[0], encoding_format="base64")[0])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == floats
    assert ask(input=_ids(model_dir, TEXTS[0]), encoding_format="float") == [floats]  # one list of ids: one input
    batched = ask(input=[_ids(model_dir, t) for t in TEXTS], encoding_format="float")[0]  # computed beside another
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(floats), atol=1e-5, rtol=1e-5)
    assert len(floats) == 64 and abs(sum(x * x for x in floats) - 1) < 1e-5


def test_dimensions_keep_the_first_ones_normalized_again(client):
    whole = torch.tensor(client.embeddings.create(model="qwen3", input=TEXTS[1]).data[0].embedding)
    cut = torch.tensor(client.embeddings.create(model="qwen3", input=TEXTS[1], dimensions=16).data[0].embedding)
    torch.testing.assert_close(cut, torch.nn.functional.normalize(whole[:16], dim=-1), atol=1e-6, rtol=1e-5)


def test_more_inputs_than_a_batch_come_back_in_their_order(client, model_dir):
    inputs = [f"{TEXTS[0]} {'and again ' * k}" for k in range(10)]  # 10 inputs, batches of 4
    result = client.embeddings.create(model="qwen3", input=inputs)
    assert [d.index for d in result.data] == list(range(10))
    for k in (0, 9):
        expected = _expected(model_dir, _ids(model_dir, inputs[k]))
        torch.testing.assert_close(torch.tensor(result.data[k].embedding), expected, atol=1e-4, rtol=1e-4)


def test_an_input_may_fill_the_context(server):
    limit = httpx.get(server.base_url + "/v1/models").json()["data"][0]["max_model_len"]
    body = {"model": "qwen3", "input": [5] * limit, "encoding_format": "float"}
    assert httpx.post(server.base_url + "/v1/embeddings", json=body, timeout=60).status_code == 200
    r = httpx.post(server.base_url + "/v1/embeddings", json={**body, "input": [5] * (limit + 1)}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": ""}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": ["a", ""]}, 400, "input"),
        ({"input": [[]]}, 400, "input"),
        ({"input": [10**6]}, 400, "input"),
        ({"input": "a", "dimensions": 65}, 400, "dimensions"),
        ({"input": "a", "dimensions": 0}, 400, "dimensions"),
        ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": ["a"] * 13}, 400, "input"),  # a full batch (4) plus a full queue (8) is 12
        ({"input": "a", "model": "gpt-4"}, 404, "model"),
        ({"input": "a", "frobnicate": 1}, 400, "frobnicate"),
    ],
)
def test_bad_embedding_requests_are_openai_errors(server, body, status, param):
    r = httpx.post(server.base_url + "/v1/embeddings", json={"model": "qwen3", **body}, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_embeddings_beside_generation_leave_it_as_it_was(client):
    """Embedding prompts share steps with generating sequences: the generated tokens do not change."""
    ask = {"model": "qwen3", "prompt": "Once upon", "max_tokens": 40, "temperature": 0, "extra_body": {"ignore_eos": True}}
    alone = client.completions.create(**ask).choices[0].text
    done = threading.Event()
    embedded: list[int] = []

    def embed_meanwhile() -> None:
        while not done.is_set():
            embedded.append(len(client.embeddings.create(model="qwen3", input=TEXTS).data))

    worker = threading.Thread(target=embed_meanwhile)
    worker.start()
    try:
        beside = [client.completions.create(**ask).choices[0].text for _ in range(3)]
    finally:
        done.set()
        worker.join()
    assert beside == [alone] * 3
    assert embedded and set(embedded) == {2}  # and the embeddings went on meanwhile


@pytest.mark.parametrize("arch", ["auto", "transformers"])
def test_both_runners_pool_the_same_state(model_dir, arch):
    engine = build_engine(ServeConfig(model_path=str(model_dir), device="cpu", model_arch=arch)).engine
    ids = _ids(model_dir, TEXTS[1])
    engine.add_request("e", ids, SamplingParams(max_tokens=1, embed=True))
    outputs = []
    while engine.has_work:
        outputs.extend(engine.step())
    (out,) = outputs
    assert out.finish_reason == "stop" and out.token_ids == []
    vector = torch.frombuffer(bytearray(out.embedding), dtype=torch.float32)
    torch.testing.assert_close(vector, _expected(model_dir, ids), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def base_model_dir(model_dir, tmp_path_factory):
    """An embedding model's checkpoint as Qwen3-Embedding's and e5-mistral's are: the base model alone
    (tensors without the `model.` prefix, no output projection), its embeddings untied."""
    out = tmp_path_factory.mktemp("base") / "qwen3-embed"
    AutoModel.from_pretrained(model_dir, dtype=torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((model_dir / name).read_bytes())
    return out


@pytest.mark.parametrize("arch", ["auto", "transformers"])
def test_a_base_models_checkpoint_serves_embeddings_and_refuses_generation(base_model_dir, model_dir, arch):
    with RunningServer(model_path=str(base_model_dir), model_arch=arch) as s:
        client = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0)
        vector = client.embeddings.create(model="qwen3-embed", input=TEXTS[0]).data[0].embedding
        torch.testing.assert_close(torch.tensor(vector), _expected(model_dir, _ids(model_dir, TEXTS[0])), atol=1e-4, rtol=1e-4)
        for path, body in (
            ("/v1/completions", {"prompt": "a"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}),
            ("/v1/responses", {"input": "a"}),
        ):
            r = httpx.post(s.base_url + path, json={"model": "qwen3-embed", **body}, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["code"] == "embeddings_only", r.text


def test_truncate_prompt_tokens_embeds_an_inputs_first_tokens(server, model_dir):
    def ask(**body):
        r = httpx.post(server.base_url + "/v1/embeddings", json={"model": "qwen3", "encoding_format": "float", **body}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    limit = httpx.get(server.base_url + "/v1/models").json()["data"][0]["max_model_len"]
    long_text = " ".join(TEXTS * 200)  # some 6,000 tokens: past the context
    first = AutoTokenizer.from_pretrained(model_dir)(long_text, truncation=True, max_length=12).input_ids
    cut = ask(input=long_text, truncate_prompt_tokens=12)
    assert cut["usage"]["prompt_tokens"] == 12
    torch.testing.assert_close(torch.tensor(cut["data"][0]["embedding"]), _expected(model_dir, first), atol=1e-4, rtol=1e-4)
    assert ask(input=long_text, truncate_prompt_tokens=-1)["usage"]["prompt_tokens"] == limit
    ids = [5] * (limit + 40)
    assert ask(input=ids, truncate_prompt_tokens=-1)["data"][0]["embedding"] == ask(input=ids[:limit])["data"][0]["embedding"]
    r = httpx.post(server.base_url + "/v1/embeddings", json={"model": "qwen3", "input": "a", "truncate_prompt_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"
