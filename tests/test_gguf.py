import copy
import re
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import serving.models.gguf
from serving.models.gguf import (
    MetadataArray,
    find_gguf_file,
    iter_gguf_tensors,
    load_gguf_tokenizer,
    read_gguf_config,
    read_gguf_header,
)
from serving.models.quant import quantize_linears, weight_bytes

# llama.cpp's tensor names, spelled out here rather than borrowed from the module under test.
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
K_QUANT_SCALES = {Q.Q6_K: (208,), Q.Q4_K: (0, 2)}  # byte offsets of each block's float16 scales
LOSSLESS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    layer, part, kind = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name).groups()
    return f"blk.{layer}.{LAYER_NAMES[part]}.{kind}"


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q and K rows: rotate_half halves -> interleaved pairs."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def random_k_quant(shape: tuple[int, ...], kind: Q) -> np.ndarray:
    """K-quant blocks of random content with sane float16 scales (gguf-py cannot quantize to these)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (*shape[:-1], shape[-1] // block_size, type_size), dtype=np.uint8)
    for start in K_QUANT_SCALES[kind]:
        scale = (rng.random((*blocks.shape[:-1], 1)) * 1e-2).astype(np.float16)
        blocks[..., start : start + 2] = scale.view(np.uint8)
    return blocks.reshape(*shape[:-1], -1)


def tiny_model(architecture: str = "llama", hidden: int = 64, tie: bool = False):
    torch.manual_seed(0)
    common = dict(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(rope_theta=50000.0, **common))
    elif architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=50000.0, **common))
    else:  # qwen3: heads wider than hidden / heads, as Qwen3-0.6B's (128 against 64)
        model = Qwen3ForCausalLM(Qwen3Config(rope_theta=50000.0, head_dim=2 * hidden // 4, **common))
    # The default init (std 0.02) gives near-uniform logits; larger weights make them tell apart.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 if p.ndim == 2 else torch.rand_like(p) + 0.5)
    return model.eval()


def write_gguf(
    path: Path,
    model,
    kind: Q,
    architecture: str = "llama",
    extra_tensor: str | None = None,
    alignment: int | None = None,
) -> Path:
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(path, architecture)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        if architecture == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, heads)
        if architecture == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, kv_heads)
        array = np.ascontiguousarray(array)
        if array.ndim == 1 or kind == Q.F32:
            writer.add_tensor(gguf_name(name), array)
        elif kind == Q.F16:
            writer.add_tensor(gguf_name(name), array.astype(np.float16))
        elif kind in K_QUANT_SCALES:
            writer.add_tensor(gguf_name(name), random_k_quant(array.shape, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name(name), quants.quantize(array, kind), raw_dtype=kind)
    if extra_tensor is not None:
        writer.add_tensor(extra_tensor, np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def model_from(path: Path, dtype: torch.dtype = torch.float32):
    config = AutoConfig.for_model(**read_gguf_config(path))
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    result = model.load_state_dict(dict(iter_gguf_tensors(path, dtype)), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys == (["lm_head.weight"] if config.tie_word_embeddings else [])
    return model


def transformers_gguf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "kind", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q6_K, Q.Q4_K], ids=lambda kind: kind.name
)
def test_tensors_and_logits_equal_transformers_gguf_loading(kind, tmp_path):
    # K-quants need rows of 256 weights.
    original = tiny_model(hidden=256 if kind in K_QUANT_SCALES else 64)
    path = write_gguf(tmp_path / "tiny.gguf", original, kind)

    ours = dict(iter_gguf_tensors(path, torch.float32))
    reference_model = transformers_gguf_model(path)
    reference = reference_model.state_dict()
    assert ours.keys() == reference.keys()
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), name

    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        logits = model_from(path)(ids).logits
        torch.testing.assert_close(logits, reference_model(ids).logits, rtol=1e-5, atol=1e-5)
        if kind in LOSSLESS:
            # Up to the float format, the original model itself: an oracle independent of
            # transformers' GGUF code, the undone Q/K permutation included.
            expected = original.state_dict()
            for name, tensor in ours.items():
                stored_as = LOSSLESS[kind] if tensor.ndim == 2 else torch.float32  # norms stay float32
                assert torch.equal(tensor, expected[name].to(stored_as).float()), name
        if kind == Q.F32:
            torch.testing.assert_close(logits, original(ids).logits, rtol=1e-5, atol=1e-5)


def test_tensors_come_in_the_requested_dtype_whatever_the_chunking(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(), Q.Q4_1)
    whole = dict(iter_gguf_tensors(path, torch.float32))
    # Three rows of the 64-wide tensors at a time, one row of the 128-wide ones.
    monkeypatch.setattr(serving.models.gguf, "_CHUNK_ELEMENTS", 3 * 64)
    for name, tensor in iter_gguf_tensors(path, torch.bfloat16):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, whole[name].bfloat16()), name


def test_a_custom_alignment_is_honoured(tmp_path):
    original = tiny_model()
    path = write_gguf(tmp_path / "tiny.gguf", original, Q.F32, alignment=256)
    expected = original.state_dict()
    for name, tensor in iter_gguf_tensors(path, torch.float32):
        assert torch.equal(tensor, expected[name]), name


def test_tensors_are_private_to_the_reader(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(), Q.F32)
    before = path.read_bytes()
    for _, tensor in iter_gguf_tensors(path, torch.float32):
        tensor.zero_()
    assert path.read_bytes() == before


def test_config_describes_the_model(tmp_path):
    original = tiny_model()
    config = read_gguf_config(write_gguf(tmp_path / "tiny.gguf", original, Q.Q8_0))
    expected = original.config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "attention_bias",
    ]:
        assert config[key] == getattr(expected, key), key
    assert config["rope_theta"] == 50000.0
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 50000.0}
    assert type(AutoConfig.for_model(**config)) is LlamaConfig


def test_tied_embeddings_have_no_lm_head(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(tie=True), Q.F16)
    assert read_gguf_config(path)["tie_word_embeddings"] is True
    assert "lm_head.weight" not in dict(iter_gguf_tensors(path, torch.float32))
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model_from(path)(ids).logits, transformers_gguf_model(path)(ids).logits)


@pytest.mark.parametrize("kind", [Q.F32, Q.Q8_0], ids=lambda kind: kind.name)
def test_qwen2_keeps_its_biases_and_layout(kind, tmp_path):
    original = tiny_model("qwen2")
    path = write_gguf(tmp_path / "tiny.gguf", original, kind, architecture="qwen2")
    config = read_gguf_config(path)
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    ours = dict(iter_gguf_tensors(path, torch.float32))
    assert "model.layers.1.self_attn.k_proj.bias" in ours
    reference_model = transformers_gguf_model(path)
    for name, tensor in reference_model.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        logits = model_from(path)(ids).logits
        torch.testing.assert_close(logits, reference_model(ids).logits, rtol=1e-5, atol=1e-5)
        if kind == Q.F32:
            torch.testing.assert_close(logits, original(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])  # Qwen3-0.6B ties, Qwen3-8B does not
def test_qwen3_keeps_its_norms_and_head_size(tie, tmp_path):
    original = tiny_model("qwen3", tie=tie)
    path = write_gguf(tmp_path / "tiny.gguf", original, Q.F32, architecture="qwen3")
    config = read_gguf_config(path)
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["head_dim"] == original.config.head_dim != config["hidden_size"] // config["num_attention_heads"]
    ours = dict(iter_gguf_tensors(path, torch.float32))
    assert "model.layers.1.self_attn.q_norm.weight" in ours and "model.layers.0.self_attn.q_proj.bias" not in ours
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():  # the model written is the oracle (transformers' own GGUF loading ignores key_length)
        torch.testing.assert_close(model_from(path)(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("scaling", "expected"),
    [
        ({"type": gguf.RopeScalingType.LINEAR, "factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
        (
            {"type": gguf.RopeScalingType.YARN, "factor": 2.0, "original": 64},
            {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
        ),
    ],
)
def test_rope_scaling_reaches_the_config(scaling, expected, tmp_path):
    path = tmp_path / "scaled.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in [
        (writer.add_block_count, 1),
        (writer.add_context_length, 128),
        (writer.add_embedding_length, 32),
        (writer.add_feed_forward_length, 64),
        (writer.add_head_count, 2),
        (writer.add_layer_norm_rms_eps, 1e-5),
        (writer.add_rope_scaling_type, scaling["type"]),
        (writer.add_rope_scaling_factor, scaling["factor"]),
    ]:
        add(value)
    if "original" in scaling:
        writer.add_rope_scaling_orig_ctx_len(scaling["original"])
    writer.add_tensor("token_embd.weight", np.zeros((40, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = read_gguf_config(path)
    assert config["rope_parameters"] == {**expected, "rope_theta": 10000.0}
    assert config["vocab_size"] == 40 and config["num_key_value_heads"] == 2 and config["head_dim"] == 16


def test_unsupported_files_are_refused_clearly(tmp_path):
    with_extra = write_gguf(tmp_path / "extra.gguf", tiny_model(), Q.F32, extra_tensor="rope_freqs.weight")
    with pytest.raises(ValueError, match="rope_freqs.weight"):
        list(iter_gguf_tensors(with_extra, torch.float32))

    writer = gguf.GGUFWriter(tmp_path / "bert.gguf", "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'bert' is not supported"):
        read_gguf_config(tmp_path / "bert.gguf")

    (tmp_path / "fake.gguf").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_config(tmp_path / "fake.gguf")


def test_find_gguf_file(tmp_path):
    assert find_gguf_file(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    assert find_gguf_file(tmp_path / "config.json") is None
    first = tmp_path / "a.Q4_0.gguf"
    first.write_bytes(b"")
    assert find_gguf_file(tmp_path) == first
    assert find_gguf_file(first) == first
    (tmp_path / "b.Q8_0.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"a\.Q4_0\.gguf, b\.Q8_0\.gguf"):
        find_gguf_file(tmp_path)


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    spare = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(spare)) for b in range(256)]


def test_tokenizer_and_chat_template_from_metadata(tmp_path):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["h e", "l l", "he ll", "Ġ w", "o r"]
    tokens = specials + byte_level_alphabet() + ["he", "ll", "hell", "Ġw", "or"]
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    path = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(template)
    writer.add_uint32("llama.block_count", 7)  # a value after the arrays, read only if they are skipped right
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    metadata = read_gguf_header(path).metadata
    assert metadata["tokenizer.ggml.tokens"] == MetadataArray(item_type=8, length=len(tokens))
    assert metadata["tokenizer.ggml.merges"] == MetadataArray(item_type=8, length=5)
    assert metadata["llama.block_count"] == 7

    tokenizer = load_gguf_tokenizer(path)
    ids = tokenizer("hello world<|im_end|>", add_special_tokens=False).input_ids
    assert [tokens[i] for i in ids] == ["hell", "o", "Ġw", "or", "l", "d", "<|im_end|>"]
    assert tokenizer.decode(ids) == "hello world<|im_end|>"
    assert tokenizer.eos_token == "<|im_end|>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_config_is_read_fast_and_matches_config_json(smollm2_dir):
    import json

    started = time.perf_counter()
    config = read_gguf_config(smollm2_dir / SMOLLM2_FILE)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"{elapsed:.2f} s: the 49k-token vocabulary must not be materialised"
    expected = json.loads((smollm2_dir / "config.json").read_text())
    shared = sorted(set(config) & set(expected))
    assert len(shared) >= 18
    assert {key: config[key] for key in shared} == {key: expected[key] for key in shared}


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(model built from our config and tensors, tokenizer, chat prompt asking for France's capital)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    # With a system turn, as clients send one: without it this Q4_1 file's answer, here quantized
    # further and in llama.cpp's server alike, is "L'Étoile, la Cité" (see test_smollm2_chat).
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return model_from(smollm2_dir / SMOLLM2_FILE), tokenizer, prompt


def greedy(model, prompt, tokens: int = 20) -> list[int]:
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=tokens, do_sample=False)
    return generated[0, prompt["input_ids"].shape[1] :].tolist()


@pytest.mark.slow
def test_smollm2_loads_like_transformers_and_knows_paris(smollm2, smollm2_dir):
    ours, tokenizer, prompt = smollm2
    reference = transformers_gguf_model(smollm2_dir / SMOLLM2_FILE)
    reference_state = reference.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, reference_state[name]), name

    answer = greedy(ours, prompt)
    assert answer == greedy(reference, prompt)
    assert "Paris" in tokenizer.decode(answer)


@pytest.mark.slow
@pytest.mark.parametrize(("scheme", "min_ratio"), [("q8_0", 3.7), ("q4_0", 6.3)])
def test_smollm2_quantized_still_knows_paris(smollm2, scheme, min_ratio):
    model, tokenizer, prompt = smollm2
    model = copy.deepcopy(model)
    dense_bytes = weight_bytes(model.model.layers)
    assert quantize_linears(model, scheme, skip=lambda name: name == "lm_head") == 30 * 7
    assert dense_bytes / weight_bytes(model.model.layers) > min_ratio
    assert "Paris" in tokenizer.decode(greedy(model, prompt, tokens=10))


@pytest.mark.slow
def test_smollm2_tokenizer_from_metadata_matches_tokenizer_json(smollm2_dir, tmp_path):
    (tmp_path / SMOLLM2_FILE).symlink_to(smollm2_dir / SMOLLM2_FILE)
    ours = load_gguf_tokenizer(tmp_path / SMOLLM2_FILE)
    reference = AutoTokenizer.from_pretrained(smollm2_dir)
    for text in [
        "What is the capital of France?",
        "naïve café 12345\n\tindent",
        "<|im_start|>user\nhi<|im_end|>",
    ]:
        assert ours(text).input_ids == reference(text).input_ids
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )


def force_exact_block_path(monkeypatch) -> None:
    """Block-quantized layers built from now on multiply by their exactly dequantized weights."""
    from serving.models import cpu_qmm, quant

    monkeypatch.setattr(cpu_qmm, "available", lambda: False)
    monkeypatch.setattr(quant, "_has_int4_cpu_kernel", lambda: False)


@pytest.mark.parametrize(("kind", "tie"), [(Q.F32, False), (Q.Q8_0, False), (Q.Q4_0, True), (Q.Q4_1, False)], ids=["F32", "Q8_0", "Q4_0-tied", "Q4_1"])
def test_serving_a_gguf_file_natively_and_through_the_fallback_runner_agree(kind, tie, tmp_path, monkeypatch):
    """The native runner keeps the file's block tensors as they are (fused, unpermuted, tied) and,
    computing with the exact weights, gives transformers' own GGUF loading's greedy tokens."""
    from serving.config import ServeConfig
    from serving.engine.builder import build_engine
    from serving.engine.sampling_params import SamplingParams
    from serving.models.quant import BlockQuantEmbedding, BlockQuantLinear
    from serving.models.source import demo_model_dir

    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(tie=tie), kind)
    prompt = [1, 17, 42, 5, 88, 9, 63]
    force_exact_block_path(monkeypatch)

    def served(model_arch: str):
        cfg = ServeConfig(model_path=str(path), tokenizer_path=str(demo_model_dir()), model_arch=model_arch, device="cpu")
        built = build_engine(cfg)
        built.engine.add_request("q", prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        tokens: list[int] = []
        while built.engine.has_work:
            tokens += [t for out in built.engine.step() for t in out.token_ids]
        return built, tokens

    native, native_tokens = served("auto")
    fallback, fallback_tokens = served("transformers")
    assert (native.info.architecture, fallback.info.architecture) == ("llama", "transformers")
    assert len(native_tokens) == 16 and native_tokens == fallback_tokens
    kinds = {type(m) for m in native.engine.runner.model.modules()}
    assert (BlockQuantLinear in kinds) == (kind != Q.F32)
    assert (BlockQuantEmbedding in kinds) == (kind != Q.F32)


# A paragraph for perplexity: plain English the chat model has seen the like of.
PARAGRAPH = (
    "Paris is the capital and largest city of France. Situated on the river Seine, in the north of the "
    "country, it is at the heart of the Ile-de-France region. The city is known for its museums and "
    "architectural landmarks: the Louvre was the most visited art museum in the world, and the Eiffel "
    "Tower, built for the 1889 World's Fair, has become a global symbol of the country. Paris is also a "
    "major centre of finance, diplomacy, commerce, fashion and science, and it hosts the headquarters "
    "of several international organisations."
)


def _teacher_forced(built, tokens: list[int]) -> torch.Tensor:
    from serving.models.runner import ForwardChunk

    blocks = list(range(-(-len(tokens) // 16)))
    return built.engine.runner.execute([ForwardChunk(0, tokens, 0, blocks, decode=False)], list(range(len(tokens))))


@pytest.mark.slow
def test_smollm2_block_kernels_agree_with_the_exact_weights(smollm2_dir, monkeypatch):
    """The C kernels round activations to int8 per block (as llama.cpp does), so they are not the
    exact dequantized math: their greedy choices must agree with it on >= 95% of positions (teacher
    forced, over a paragraph and the model's own continuation) and the paragraph's perplexity must
    move by under 2%. The weights stay as the file stores them: the model is no bigger than the file."""
    from serving.config import ServeConfig
    from serving.engine.builder import build_engine
    from serving.engine.sampling_params import SamplingParams
    from serving.models import cpu_qmm
    from serving.models.quant import weight_bytes

    if not cpu_qmm.available():
        pytest.skip("the C kernels are not built here")
    cfg = ServeConfig(model_path=str(smollm2_dir), device="cpu", max_seq_len=1024, kv_cache_tokens=1024)
    fast = build_engine(cfg)
    assert weight_bytes(fast.engine.runner.model) < 1.02 * (smollm2_dir / SMOLLM2_FILE).stat().st_size
    force_exact_block_path(monkeypatch)
    exact = build_engine(cfg)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tokenizer(PARAGRAPH).input_ids
    messages = [{"role": "user", "content": "Tell me about Paris."}]
    chat = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)).input_ids
    exact.engine.add_request("answer", chat, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    continuation = list(chat)  # the exact model's own greedy answer
    while exact.engine.has_work:
        continuation += [t for out in exact.engine.step() for t in out.token_ids]
    with torch.no_grad():
        agree = []
        for tokens in (text, continuation):
            a, b = _teacher_forced(fast, tokens), _teacher_forced(exact, tokens)
            agree.append((a.argmax(-1) == b.argmax(-1)).float().mean().item())
        targets = torch.tensor(text[1:])
        nll = {
            name: -torch.log_softmax(_teacher_forced(m, text)[:-1], -1).gather(1, targets[:, None]).mean().item()
            for name, m in (("fast", fast), ("exact", exact))
        }
    perplexity = {name: float(np.exp(v)) for name, v in nll.items()}
    print(f"agreement {agree}, perplexity {perplexity}")
    assert min(agree) >= 0.95, agree
    assert abs(perplexity["fast"] / perplexity["exact"] - 1) < 0.02, perplexity


def test_loading_a_gguf_file_logs_progress_through_every_tensor(tmp_path, monkeypatch, caplog):
    import logging

    from serving.config import ServeConfig
    from serving.models import weights
    from serving.models.loader import load_model
    from serving.models.source import demo_model_dir

    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(tie=False), Q.Q8_0)
    monkeypatch.setattr(weights, "PROGRESS_INTERVAL_S", 0.0)
    with caplog.at_level(logging.INFO, logger="fleetlm.loader"):
        load_model(ServeConfig(model_path=str(path), tokenizer_path=str(demo_model_dir()), device="cpu"))
    lines = [r for r in caplog.records if r.getMessage() == "loading weights"]
    total = len(read_gguf_header(path).tensors)
    assert [r.tensors for r in lines] == list(range(1, total + 1)) and lines[-1].percent == 100


def test_a_gguf_model_runs_in_bfloat16_its_embedding_in_the_models_dtype(tmp_path, monkeypatch):
    """bf16 is the default on a GPU: the block-format token table must hand the layers bf16 rows (a
    float32 residual stream fails at the first KV-cache write), and agree with the float32 model."""
    from serving.config import ServeConfig
    from serving.engine.builder import build_engine
    from serving.models.quant import BlockQuantEmbedding
    from serving.models.source import demo_model_dir

    path = write_gguf(tmp_path / "tiny.gguf", tiny_model(tie=True), Q.Q8_0)
    force_exact_block_path(monkeypatch)
    prompt = [1, 17, 42, 5, 88, 9, 63]
    logits = {}
    for dtype in ("float32", "bfloat16"):
        built = build_engine(ServeConfig(model_path=str(path), tokenizer_path=str(demo_model_dir()), device="cpu", dtype=dtype))
        (table,) = [m for m in built.engine.runner.model.modules() if isinstance(m, BlockQuantEmbedding)]
        assert table(torch.tensor([3, 4])).dtype == getattr(torch, dtype)
        logits[dtype] = _teacher_forced(built, prompt).float()
    error = (logits["bfloat16"] - logits["float32"]).norm() / logits["float32"].norm()
    assert error < 0.05, error


@pytest.mark.parametrize("kind", [Q.F32, Q.Q8_0], ids=lambda kind: kind.name)
def test_serving_a_qwen3_gguf_file_natively(kind, tmp_path, monkeypatch):
    """Qwen3 GGUF files (Q and K norms, wider heads) serve natively, with their block tensors kept, and
    greedy tokens equal transformers' Qwen3 given the file's exact weights (transformers' own GGUF loading
    of Qwen3 ignores the file's head size, so it is no oracle here)."""
    from serving.config import ServeConfig
    from serving.engine.builder import build_engine
    from serving.engine.sampling_params import SamplingParams
    from serving.models.quant import BlockQuantLinear
    from serving.models.source import demo_model_dir

    path = write_gguf(tmp_path / "tiny.gguf", tiny_model("qwen3"), kind, architecture="qwen3")
    prompt = [1, 17, 42, 5, 88, 9, 63]
    force_exact_block_path(monkeypatch)
    built = build_engine(ServeConfig(model_path=str(path), tokenizer_path=str(demo_model_dir()), device="cpu"))
    built.engine.add_request("q", prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    tokens: list[int] = []
    while built.engine.has_work:
        tokens += [t for out in built.engine.step() for t in out.token_ids]
    assert built.info.architecture == "qwen3"
    assert any(isinstance(m, BlockQuantLinear) for m in built.engine.runner.model.modules()) == (kind != Q.F32)
    with torch.no_grad():
        expected = model_from(path).generate(
            torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert tokens == expected
