"""LoRA adapters (--lora-modules): each served under its own name, sequences of several adapters and of
the base model in one batch, each generating what PEFT's own model generates (the oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from serving.config import ConfigError, ServeConfig
from serving.engine.builder import build_engine
from serving.engine.protocol import RequestRejected
from serving.engine.sampling_params import SamplingParams
from tests.server_util import RunningServer
from tests.tiny_models import make_tiny_model

peft = pytest.importorskip("peft")

PROMPTS = [[1, 5, 9, 44, 7, 300, 12, 18, 2, 99] * 4, [1, 17, 23, 200, 4, 61]]  # the first past two KV blocks
ADAPTERS = {
    # name: (target modules, r, alpha, rslora)
    "every-projection": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 8, 16, False),
    "attention-only": (["q_proj", "v_proj"], 4, 8, True),
}


def make_adapter(model_dir: Path, out: Path, targets: list[str] | str, r: int, alpha: int, rslora: bool, seed: int) -> Path:
    """A PEFT LoRA adapter of the model, with random A and B (a trained adapter's B is far from zero too)."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights=False)
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(out)
    return out


def peft_greedy(model_dir: Path, adapter_dir: Path | None, prompt: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        for _ in range(n):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("lora"), "llama")


@pytest.fixture(scope="module")
def adapters(model_dir) -> dict[str, Path]:
    root = model_dir.parent
    return {name: make_adapter(model_dir, root / name, *spec, seed=i) for i, (name, spec) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def server(model_dir, adapters):
    modules = [f"{name}={path}" for name, path in adapters.items()]
    with RunningServer(model_path=str(model_dir), served_model_name="tiny", lora_modules=modules, max_batch_size=8) as s:
        yield s


def peft_prompt_logprobs(model_dir: Path, adapter_dir: Path | None, prompt: list[int]) -> list[float]:
    """Each prompt token's logprob after the ones before it, under PEFT's model."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir)
    with torch.inference_mode():
        logprobs = model.eval()(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)
    return logprobs.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1).tolist()


def _engine(model_dir: Path, adapters: dict[str, Path], **settings):
    modules = tuple(f"{name}={path}" for name, path in adapters.items())
    settings.setdefault("kv_cache_tokens", 4096)
    built = build_engine(ServeConfig(model_path=str(model_dir), device="cpu", lora_modules=modules, **settings))
    return built.engine, {a.name: a.id for a in built.info.adapters}


def _greedy(engine, requests: dict[str, tuple[int, list[int]]], n: int, arrivals: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Greedy ids per request id, of (adapter id, prompt); request r added at step arrivals[r] (default 0)."""
    arrivals = arrivals or {}
    out: dict[str, list[int]] = {r: [] for r in requests}
    step = 0
    while step <= max(arrivals.values(), default=0) or engine.has_work:
        for r, (adapter, prompt) in requests.items():
            if arrivals.get(r, 0) == step:
                engine.add_request(r, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, adapter=adapter))
        for output in engine.step():
            out[output.request_id].extend(output.token_ids)
        step += 1
    return out


def test_each_adapter_generates_what_peft_generates_in_one_mixed_batch(model_dir, adapters):
    engine, ids = _engine(model_dir, adapters, max_num_batched_tokens=32)  # prompts prefill in chunks, beside decodes
    requests = {f"{name}/{i}": (ids.get(name, 0), prompt) for name in ("base", *adapters) for i, prompt in enumerate(PROMPTS)}
    arrivals = {r: k for k, r in enumerate(requests)}  # staggered: one adapter's prefill beside the others' decodes
    got = _greedy(engine, requests, 12, arrivals)
    expected = {r: peft_greedy(model_dir, adapters.get(r.split("/")[0]), prompt, 12) for r, (_, prompt) in requests.items()}
    assert expected["every-projection/0"] != expected["base/0"] != expected["attention-only/0"]
    assert got == expected
    assert engine.last_stats.adapters_loaded == 2 and engine.last_stats.running_adapters == ()


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "phi3"])
def test_each_architecture_serves_peft_adapters_of_all_its_linear_layers(tmp_path, arch):
    """PEFT's "all-linear": q/k/v separately where we fuse them (Qwen, Mistral), Phi-3's own fused qkv_proj
    and gate_up_proj as they are; Qwen3's q/k norms after the adapted projection."""
    model_dir = make_tiny_model(tmp_path, arch)
    adapter = make_adapter(model_dir, tmp_path / "adapter", "all-linear", 4, 8, False, seed=5)
    engine, ids = _engine(model_dir, {"a": adapter})
    got = _greedy(engine, {"a": (ids["a"], PROMPTS[0]), "base": (0, PROMPTS[0])}, 8)
    assert got == {"a": peft_greedy(model_dir, adapter, PROMPTS[0], 8), "base": peft_greedy(model_dir, None, PROMPTS[0], 8)}
    assert got["a"] != got["base"]


def test_step_stats_name_the_adapters_running_and_waiting(model_dir, adapters):
    engine, ids = _engine(model_dir, adapters, max_batch_size=1)
    for name in ("attention-only", "every-projection"):
        engine.add_request(name, PROMPTS[1], SamplingParams(max_tokens=4, temperature=0.0, adapter=ids[name]))
    engine.add_request("base", PROMPTS[1], SamplingParams(max_tokens=4, temperature=0.0))
    engine.step()
    stats = engine.last_stats
    assert (stats.running_adapters, stats.waiting_adapters) == (("attention-only",), ("every-projection",))


def test_adapters_sequences_preempted_for_kv_room_resume_with_their_adapter(model_dir, adapters):
    """A KV cache of one full context: six streams do not fit, the newest are preempted and recomputed later,
    each with its own adapter (its recomputed blocks, and any it finds cached, are its adapter's)."""
    engine, ids = _engine(model_dir, adapters, kv_cache_tokens=256)
    names = ["base", *adapters]
    requests = {f"{names[i % 3]}/{i}": (ids.get(names[i % 3], 0), PROMPTS[i % 2]) for i in range(6)}
    got = _greedy(engine, requests, 24)
    assert engine.last_stats.preempted_total > 0
    expected = {r: peft_greedy(model_dir, adapters.get(r.split("/")[0]), prompt, 24) for r, (_, prompt) in requests.items()}
    assert got == expected


def test_the_prefix_cache_keeps_each_adapters_kv_apart(model_dir, adapters):
    """The same prompt under the base model, then each adapter: an adapter's K/V differ, so blocks the base
    model cached must not serve it (nor the other way round); its own are reused."""
    engine, ids = _engine(model_dir, adapters)
    prompt = PROMPTS[0]
    for name in ("base", "every-projection", "base", "attention-only", "every-projection"):
        got = _greedy(engine, {"r": (ids.get(name, 0), prompt)}, 6)["r"]
        assert got == peft_greedy(model_dir, adapters.get(name), prompt, 6), name
    assert engine.blocks.num_cached_blocks == 3 * (len(prompt) // 16)  # one set per model, each reused


def test_each_model_name_scores_a_prompt_as_its_peft_model(server, model_dir, adapters):
    """echo + logprobs through the API: the adapter a request names is the one that computes it."""
    prompt = PROMPTS[0]
    for name in ("tiny", *adapters):
        body = {"model": name, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0}
        r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name
        scored = r.json()["choices"][0]["logprobs"]["token_logprobs"][1 : len(prompt)]
        assert scored == pytest.approx(peft_prompt_logprobs(model_dir, adapters.get(name), prompt), abs=1e-3), name


def test_models_lists_the_adapters_with_their_parent(server, adapters):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == ["tiny", *adapters]
    assert cards["attention-only"].parent == "tiny" and cards["attention-only"].root == str(adapters["attention-only"])
    assert getattr(cards["tiny"], "parent", None) is None
    assert client.models.retrieve("every-projection").id == "every-projection"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-adapter")
    r = httpx.post(server.base_url + "/v1/chat/completions", json={"model": "no-such-adapter", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    doc = httpx.get(server.base_url + "/openapi.json").json()
    model = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "every-projection" in json.dumps(doc) and model


def test_an_adapters_embeddings_are_its_own(server):
    def embed(model: str) -> list[float]:
        r = httpx.post(server.base_url + "/v1/embeddings", json={"model": model, "input": "Once upon a time"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == model
        return r.json()["data"][0]["embedding"]

    base, adapted = embed("tiny"), embed("every-projection")
    assert len(base) == len(adapted) and base != pytest.approx(adapted, abs=1e-3)
    assert embed("attention-only") != pytest.approx(adapted, abs=1e-3)


def _text(server, model: str, prompt: list[int]) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_an_adapter_on_a_quantized_base_changes_its_output(model_dir, adapters):
    """q8_0 weights keep their blocks; the adapter's matrices add to their output in floats."""
    modules = [f"a={adapters['every-projection']}"]
    with RunningServer(model_path=str(model_dir), served_model_name="tiny", lora_modules=modules, quantization="q8_0") as s:
        base, adapted = (_text(s, name, PROMPTS[1]) for name in ("tiny", "a"))
    assert adapted != base


def _build(model_dir: Path, *modules: str, **settings) -> None:
    build_engine(ServeConfig(model_path=str(model_dir), device="cpu", lora_modules=modules, kv_cache_tokens=4096, **settings))


def test_adapters_that_cannot_be_served_stop_the_start_with_the_reason(model_dir, adapters, tmp_path):
    other = make_tiny_model(tmp_path, "llama", hidden_size=32, intermediate_size=48)
    foreign = make_adapter(other, tmp_path / "foreign", ["q_proj"], 4, 8, False, seed=3)
    with pytest.raises(ConfigError, match="another base model"):
        _build(model_dir, f"x={foreign}")
    with pytest.raises(ConfigError, match="neither a directory nor a Hub id"):
        _build(model_dir, f"x={tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="served model's name"):
        _build(model_dir, f"llama={adapters['attention-only']}")
    dora = tmp_path / "dora"
    dora.mkdir()
    config = json.loads((adapters["attention-only"] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ConfigError, match="DoRA"):
        _build(model_dir, f"x={dora}")
    gpt2 = make_tiny_model(tmp_path, "gpt2")
    with pytest.raises(ConfigError, match="native runner"):
        _build(gpt2, f"x={adapters['attention-only']}")
    with pytest.raises(ValueError, match="given twice"):
        ServeConfig(lora_modules=["a=/x", "a=/y"])


def test_an_adapter_is_fetched_from_the_hub(fake_hub, model_dir, adapters, tmp_path):
    adapter = adapters["attention-only"]
    fake_hub.add_repo("acme/tiny-lora", {p.name: p.read_bytes() for p in adapter.iterdir() if p.is_file()}, refs=("v1",))
    cache = tmp_path / "cache"
    modules = ['{"name": "hub-lora", "path": "acme/tiny-lora", "revision": "v1"}']
    with RunningServer(model_path=str(model_dir), served_model_name="tiny", lora_modules=modules, download_dir=str(cache)) as s:
        assert _text(s, "hub-lora", PROMPTS[1]) != _text(s, "tiny", PROMPTS[1])
    fetched = {p.name for p in (cache / "acme--tiny-lora" / "v1").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= fetched


@pytest.fixture(scope="module")
def updatable(model_dir):
    with RunningServer(model_path=str(model_dir), served_model_name="tiny", allow_runtime_lora_updating=True) as s:
        yield s


def _post(server, path: str, **body) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=60)


def _scores(server, model: str) -> list[float]:
    r = _post(server, "/v1/completions", model=model, prompt=PROMPTS[0], max_tokens=1, echo=True, logprobs=0)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["token_logprobs"][1 : len(PROMPTS[0])]


def test_adapters_load_and_unload_at_run_time(updatable, model_dir, adapters, tmp_path):
    every, attention = adapters["every-projection"], adapters["attention-only"]
    r = _post(updatable, "/v1/load_lora_adapter", lora_name="live", lora_path=str(every))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "live" and r.json()["parent"] == "tiny"
    assert [m["id"] for m in httpx.get(updatable.base_url + "/v1/models").json()["data"]] == ["tiny", "live"]
    assert _scores(updatable, "live") == pytest.approx(peft_prompt_logprobs(model_dir, every, PROMPTS[0]), abs=1e-3)

    again = _post(updatable, "/v1/load_lora_adapter", lora_name="live", lora_path=str(attention))
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    replaced = _post(updatable, "/v1/load_lora_adapter", lora_name="live", lora_path=str(attention), load_inplace=True)
    assert replaced.status_code == 200, replaced.text
    assert _scores(updatable, "live") == pytest.approx(peft_prompt_logprobs(model_dir, attention, PROMPTS[0]), abs=1e-3)

    assert _post(updatable, "/v1/unload_lora_adapter", lora_name="live").status_code == 200
    gone = _post(updatable, "/v1/completions", model="live", prompt="Once", max_tokens=2)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert _post(updatable, "/v1/unload_lora_adapter", lora_name="live").status_code == 404
    assert _scores(updatable, "tiny") == pytest.approx(peft_prompt_logprobs(model_dir, None, PROMPTS[0]), abs=1e-3)


def test_a_bad_adapter_is_a_400_and_the_server_goes_on(updatable, model_dir, tmp_path):
    other = make_tiny_model(tmp_path, "llama", hidden_size=32, intermediate_size=48)
    foreign = make_adapter(other, tmp_path / "foreign", ["q_proj"], 4, 8, False, seed=3)
    for path, words in ((foreign, "another base model"), (tmp_path / "missing", "neither a directory"), (other, "adapter_config.json")):
        r = _post(updatable, "/v1/load_lora_adapter", lora_name="bad", lora_path=str(path))
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "lora_path"
    assert _post(updatable, "/v1/load_lora_adapter", lora_name="tiny", lora_path=str(foreign)).status_code == 400
    assert _post(updatable, "/v1/load_lora_adapter", lora_name="x").status_code == 400  # no lora_path
    assert [m["id"] for m in httpx.get(updatable.base_url + "/v1/models").json()["data"]] == ["tiny"]
    assert _post(updatable, "/v1/completions", model="tiny", prompt="Once", max_tokens=2).status_code == 200


def test_an_adapter_unloaded_mid_generation_finishes_it_then_goes(model_dir, adapters):
    engine, _ = _engine(model_dir, {})
    assert engine.load_adapter(7, str(adapters["every-projection"]), "late") == 8
    expected = peft_greedy(model_dir, adapters["every-projection"], PROMPTS[1], 12)
    engine.add_request("r", PROMPTS[1], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, adapter=7))
    got = [t for out in engine.step() + engine.step() for t in out.token_ids]
    assert got and engine.has_work
    engine.unload_adapter(7)
    qkv = engine.runner.model.model.layers[0].self_attn.lora["qkv_proj"]
    assert 7 in qkv.pairs  # still running with it
    while engine.has_work:
        got += [t for out in engine.step() for t in out.token_ids]
    assert got == expected
    assert 7 not in qkv.pairs
    # A request the API sent under that id before it learnt of the unload is refused, never run without it.
    with pytest.raises(RequestRejected, match="unloaded"):
        engine.add_request("late", PROMPTS[1], SamplingParams(max_tokens=2, adapter=7))


def test_run_time_updates_are_off_unless_allowed(server, adapters):
    r = _post(server, "/v1/load_lora_adapter", lora_name="x", lora_path=str(adapters["every-projection"]))
    assert r.status_code == 404 and "--allow-runtime-lora-updating" in r.json()["error"]["message"]
    assert _post(server, "/v1/unload_lora_adapter", lora_name="every-projection").status_code == 404
    assert "every-projection" in [m["id"] for m in httpx.get(server.base_url + "/v1/models").json()["data"]]


def test_max_loras_bounds_the_adapters_served(model_dir, adapters):
    every, attention = str(adapters["every-projection"]), str(adapters["attention-only"])
    with pytest.raises(ValueError, match="more than --max-loras 1"):
        ServeConfig(lora_modules=[f"a={every}", f"b={attention}"], max_loras=1)
    with RunningServer(model_path=str(model_dir), served_model_name="tiny", allow_runtime_lora_updating=True, max_loras=1) as s:
        assert _post(s, "/v1/load_lora_adapter", lora_name="a", lora_path=every).status_code == 200
        full = _post(s, "/v1/load_lora_adapter", lora_name="b", lora_path=attention)
        assert full.status_code == 400 and "--max-loras 1" in full.json()["error"]["message"]
        assert _post(s, "/v1/load_lora_adapter", lora_name="a", lora_path=attention, load_inplace=True).status_code == 200
        assert _post(s, "/v1/unload_lora_adapter", lora_name="a").status_code == 200
        assert _post(s, "/v1/load_lora_adapter", lora_name="b", lora_path=attention).status_code == 200
