import pytest

from serving.config import ConfigError, ServeConfig
from serving.engine.builder import build_engine
from serving.engine.sampling_params import SamplingParams
from serving.models.loader import load_tokenizer
from serving.models.quant import weight_bytes
from serving.models.source import demo_model_dir
from tests.tiny_models import make_tiny_model


def _greedy_text(built, prompt: str, n: int) -> str:
    tokenizer = load_tokenizer(ServeConfig(), demo_model_dir(), None)
    engine = built.engine
    engine.add_request("q", tokenizer(prompt).input_ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_work:
        tokens += [t for d in engine.step() for t in d.token_ids]
    return tokenizer.decode(tokens)


def test_quantization_shrinks_weights_and_q8_keeps_greedy_text():
    plain = build_engine(ServeConfig(device="cpu"))
    q8 = build_engine(ServeConfig(device="cpu", quantization="q8_0"))
    q4 = build_engine(ServeConfig(device="cpu", quantization="q4_0"))
    sizes = [weight_bytes(m.engine.runner.model) for m in (plain, q8, q4)]
    assert sizes[0] > sizes[1] > sizes[2]
    reference = _greedy_text(plain, "Once upon a time", 40)
    assert _greedy_text(q8, "Once upon a time", 40) == reference
    assert _greedy_text(q4, "Once upon a time", 40)[:40] == reference[:40]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied output projection; tied to the token table
def test_q8_0_halves_bf16_weights_with_the_token_table_and_output_in_blocks(tmp_path, arch):
    """Every weight matrix in q8_0 blocks (34 bytes per 32 weights against bf16's 64): the token table and
    output projection too, so a model's weights come to 0.53 of bf16 (an 8B model's table and lm_head
    alone are 2 GB, 0.59 if left in bf16); under q4_0 they stay 8-bit."""
    from torch import nn

    from serving.models.quant import BlockQuantEmbedding, BlockQuantLinear

    model_dir = make_tiny_model(tmp_path, arch)

    def load(scheme: str):
        cfg = ServeConfig(model_path=str(model_dir), device="cpu", dtype="bfloat16", quantization=scheme)
        return build_engine(cfg).engine.runner.model

    plain, q8, q4 = load("none"), load("q8_0"), load("q4_0")
    for model in (q8, q4):
        assert isinstance(model.model.embed_tokens, BlockQuantEmbedding) and model.model.embed_tokens.fmt == "q8_0"
        assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules()), "every matrix in blocks"
        if arch == "llama":
            assert isinstance(model.lm_head, BlockQuantLinear) and model.lm_head.formats == ["q8_0"]
    matrices = sum(p.numel() for p in plain.parameters() if p.ndim == 2)
    rest = weight_bytes(plain) - 2 * matrices  # norms, biases and the rotary tables stay as they are
    assert weight_bytes(q8) == matrices * 34 // 32 + rest, "every matrix at 34/64 of its bf16 bytes"


def test_model_arch_contradicting_config_is_an_error(tmp_path):
    model_dir = make_tiny_model(tmp_path, "qwen2")
    with pytest.raises(ConfigError, match="contradicts"):
        build_engine(ServeConfig(model_path=str(model_dir), model_arch="llama", device="cpu"))
    assert build_engine(ServeConfig(model_path=str(model_dir), model_arch="qwen2", device="cpu")).info.architecture == "qwen2"
    forced = build_engine(ServeConfig(model_path=str(model_dir), model_arch="transformers", device="cpu"))
    assert forced.info.architecture == "transformers"


def test_a_kv_cache_smaller_than_one_sequence_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="KV cache holds"):
        build_engine(ServeConfig(device="cpu", kv_cache_tokens=64, max_seq_len=512))


def test_max_seq_len_is_capped_by_the_model_and_names_follow_the_path(tmp_path):
    model_dir = make_tiny_model(tmp_path, "llama")
    loaded = build_engine(ServeConfig(model_path=str(model_dir), device="cpu", max_seq_len=4096))
    assert loaded.info.max_model_len == 256  # the tiny model's max_position_embeddings
    assert loaded.info.name == "llama"
    renamed = build_engine(ServeConfig(model_path=str(model_dir), device="cpu", served_model_name="my-model"))
    assert renamed.info.name == "my-model"


def test_a_directory_without_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="not a model directory"):
        build_engine(ServeConfig(model_path=str(tmp_path), device="cpu"))


def test_a_model_directory_without_weights_says_so(tmp_path):
    # A config and a tokenizer but no weight file: every parameter was reported "missing", as if the
    # checkpoint were of another architecture.
    model_dir = make_tiny_model(tmp_path / "m", "llama")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds no weights"):
        build_engine(ServeConfig(model_path=str(model_dir), device="cpu"))


def test_a_directory_with_several_gguf_files_asks_for_one(tmp_path):
    for name in ("a.Q4_0.gguf", "a.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="a.Q4_0.gguf"):
        build_engine(ServeConfig(model_path=str(tmp_path), device="cpu"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loading_logs_progress_through_every_tensor(tmp_path, monkeypatch, caplog, arch):
    import logging

    from serving.models import weights
    from serving.models.loader import load_model

    monkeypatch.setattr(weights, "PROGRESS_INTERVAL_S", 0.0)  # a line per tensor, instead of every 5 s
    model_dir = make_tiny_model(tmp_path, arch)
    with caplog.at_level(logging.INFO, logger="fleetlm.loader"):
        load_model(ServeConfig(model_path=str(model_dir), device="cpu"))
    lines = [r for r in caplog.records if r.getMessage() == "loading weights"]
    total = weights.count_safetensors(weights.safetensors_files(model_dir))
    assert [r.tensors for r in lines] == list(range(1, total + 1))
    assert lines[-1].percent == 100 and all(r.of == total for r in lines)


def test_a_quick_load_stays_quiet(tmp_path, caplog):
    import logging

    from serving.models.loader import load_model

    with caplog.at_level(logging.INFO, logger="fleetlm.loader"):
        load_model(ServeConfig(model_path=str(make_tiny_model(tmp_path, "llama")), device="cpu"))
    assert not [r for r in caplog.records if r.getMessage() == "loading weights"]


def _greedy_ids(model_dir, prompt_ids: list[int], n: int) -> list[int]:
    engine = build_engine(ServeConfig(model_path=str(model_dir), device="cpu", dtype="float32")).engine
    engine.add_request("q", prompt_ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_work:
        tokens += [t for d in engine.step() for t in d.token_ids]
    return tokens


def test_a_pytorch_bin_checkpoint_serves_as_its_safetensors_do(tmp_path):
    """A repo with only pytorch_model.bin (the downloader takes it where there are no safetensors):
    the native runner read safetensors only, and failed with every weight "missing"."""
    import torch
    from safetensors.torch import load_file

    model_dir = make_tiny_model(tmp_path / "st", "llama")
    expected = _greedy_ids(model_dir, [1, 20, 30, 40], 8)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(load_file(model_dir / "model.safetensors"), bin_dir / "pytorch_model.bin")
    for other in model_dir.iterdir():
        if other.suffix != ".safetensors":
            (bin_dir / other.name).write_bytes(other.read_bytes())
    assert _greedy_ids(bin_dir, [1, 20, 30, 40], 8) == expected


def test_gguf_file_names_the_one_to_serve(tmp_path):
    for name in ("a.Q4_0.gguf", "a.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="--gguf-file b.gguf: no such file"):
        build_engine(ServeConfig(model_path=str(tmp_path), gguf_file="b.gguf", device="cpu"))
    from serving.models.source import resolve_source

    assert resolve_source(ServeConfig(model_path=str(tmp_path), gguf_file="a.Q8_0.gguf")).gguf_file == tmp_path / "a.Q8_0.gguf"


def test_a_tokenizer_path_is_a_directory_or_a_hub_id(tmp_path, fake_hub, monkeypatch):
    """The CRD's model.tokenizer may be a Hub id: it is fetched (it was looked for as a local directory)."""
    from serving.models.loader import preflight

    files = {p.name: p.read_bytes() for p in demo_model_dir().iterdir() if p.name.startswith(("tokenizer", "special_tokens"))}
    fake_hub.add_repo("org/tok", {**files, "config.json": b'{"model_type": "llama"}'})
    tokenizer = load_tokenizer(ServeConfig(tokenizer_path="org/tok", download_dir=str(tmp_path / "cache")), tmp_path, None)
    assert tokenizer("Once upon a time").input_ids == load_tokenizer(ServeConfig(), demo_model_dir(), None)("Once upon a time").input_ids
    # A restart while the Hub is out of reach uses the tokenizer fetched before (it crash-looped); one
    # never fetched whole is still an error.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    again = load_tokenizer(ServeConfig(tokenizer_path="org/tok", download_dir=str(tmp_path / "cache")), tmp_path, None)
    assert again("Once upon a time").input_ids == tokenizer("Once upon a time").input_ids
    with pytest.raises(ConfigError, match="cannot reach the Hub"):
        load_tokenizer(ServeConfig(tokenizer_path="org/tok", download_dir=str(tmp_path / "other")), tmp_path, None)
    with pytest.raises(ConfigError, match="--tokenizer-path ./no/such: no such directory"):
        preflight(ServeConfig(tokenizer_path="./no/such", device="cpu"))
    with pytest.raises(ConfigError, match="--tokenizer-path"):  # named, so a GGUF's own is not used instead
        load_tokenizer(ServeConfig(tokenizer_path=str(tmp_path)), tmp_path, tmp_path / "x.gguf")


def test_building_a_model_on_cpu_does_not_import_torch_dynamo(tmp_path):
    """Built on the meta device, torch's Linear and Embedding drew random weights through its reference
    ops, which import torch._dynamo and triton: 0.8 s of the engine's start, and triton's leak report as
    plain text in the JSON log at every exit. They are built without that draw (weights come after)."""
    import subprocess
    import sys

    model_dir = make_tiny_model(tmp_path / "m", "llama")
    code = (
        "import sys\n"
        "from serving.config import ServeConfig\n"
        "from serving.engine.builder import build_engine\n"
        f"build_engine(ServeConfig(model_path={str(model_dir)!r}, device='cpu'))\n"
        "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]
