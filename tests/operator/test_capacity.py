"""The fit check's arithmetic against figures worked out by hand."""

from __future__ import annotations

import pytest
from llm_operator.capacity import ModelFacts, fit, kv_bytes_per_token
from llm_operator.spec import parse_spec

from tests.operator.builders import llmd

# Llama-3.1-8B's config.json (the fields that matter) and its four safetensors shards, bf16.
LLAMA_8B = {
    "model_type": "llama",
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "torch_dtype": "bfloat16",
}
LLAMA_8B_BYTES = 16_060_522_496


def spec(**engine):
    resources = {"gpu": {"count": 1, "product": engine.pop("product", "NVIDIA-A100-SXM4-80GB")}}
    if "memory" in engine:
        resources["gpu"]["memory"] = engine.pop("memory")
    return parse_spec(llmd(engine=engine, resources=resources)["spec"])


def test_kv_bytes_per_token_of_llama_8b() -> None:
    # 2 (K and V) x 32 layers x 8 kv heads x 128 head dim x 2 bytes (bf16) = 131,072 bytes = 128 KiB.
    assert kv_bytes_per_token(LLAMA_8B, 2) == 131_072


def test_an_8b_model_on_an_80_gb_gpu() -> None:
    # 80 GB A100: 81,920 MiB = 85,899,345,920 bytes; 90% planned = 77,309,411,328; minus 1 GiB reserved
    # (1,073,741,824) and the weights (16,060,522,496) leaves 60,175,147,008 bytes of KV cache:
    # / 131,072 = 459,099 tokens; at 8,192 tokens a sequence, 56 sequences (459,099 // 8,192).
    got = fit(spec(maxSeqLen=8192, maxBatchSize=64), ModelFacts(LLAMA_8B, LLAMA_8B_BYTES))
    assert got is not None and got.fits
    assert got.gpu_memory_bytes == 85_899_345_920
    assert got.weight_bytes == 16_060_522_496
    assert got.max_context_tokens == 459_099
    assert got.max_concurrent_sequences == 56
    assert got.kv_cache_bytes == 459_099 * 131_072  # fewer tokens than 64 x 8,192 are wanted
    assert "56 sequences of 8192 tokens" in got.message and "maxBatchSize 64 is more than fits" in got.message
    # A batch that fits whole takes only what it needs.
    small = fit(spec(maxSeqLen=8192, maxBatchSize=16), ModelFacts(LLAMA_8B, LLAMA_8B_BYTES))
    assert small.max_concurrent_sequences == 16 and small.kv_cache_bytes == 16 * 8192 * 131_072


def test_what_does_not_fit_says_by_how_much() -> None:
    # A 24 GB L4 (23,034 MiB = 24,152,899,584 bytes): 90% = 21,737,609,625; minus 1 GiB and the 8B's
    # weights leaves 4,603,345,305 bytes = 35,120 tokens: not one 131,072-token sequence.
    got = fit(spec(product="NVIDIA-L4", maxSeqLen=131072), ModelFacts(LLAMA_8B, LLAMA_8B_BYTES))
    assert got is not None and not got.fits and got.max_concurrent_sequences == 0
    assert got.max_context_tokens == 35_120
    assert "less than one engine.maxSeqLen (131072) sequence" in got.message
    # float32 doubles the weights (32,121,044,992 bytes) past all the L4 plans to use (21,737,609,625).
    f32 = fit(spec(product="NVIDIA-L4", dtype="float32"), ModelFacts(LLAMA_8B, LLAMA_8B_BYTES))
    assert not f32.fits and f32.weight_bytes == 32_121_044_992 and "the weights alone exceed" in f32.message


def test_quantization_shrinks_the_weights_and_an_override_sets_the_memory() -> None:
    q4 = fit(spec(product="NVIDIA-L4", quantization="q4_0", maxSeqLen=8192), ModelFacts(LLAMA_8B, LLAMA_8B_BYTES))
    assert q4.weight_bytes == int(LLAMA_8B_BYTES * (18 / 32) / 2)  # 4.5 bits a weight
    assert q4.fits
    custom = fit(spec(product="Some-New-GPU", memory="48Gi"), ModelFacts(LLAMA_8B, LLAMA_8B_BYTES))
    assert custom.gpu_memory_bytes == 48 * 2**30
    assert fit(spec(product="Some-New-GPU"), ModelFacts(LLAMA_8B, LLAMA_8B_BYTES)) is None  # unknown: no claim
    cpu = parse_spec(llmd()["spec"])
    assert fit(cpu, ModelFacts(LLAMA_8B, LLAMA_8B_BYTES)) is None


@pytest.mark.parametrize(("config", "expected"), [
    ({"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}, 2 * 30 * 3 * 64 * 2),
    ({"n_layer": 12, "n_head": 12, "n_embd": 768}, 2 * 12 * 12 * 64 * 2),  # gpt2 names
    ({"text_config": {"num_hidden_layers": 4, "num_attention_heads": 8, "head_dim": 256, "hidden_size": 1024}}, 2 * 4 * 8 * 256 * 2),
])  # fmt: skip
def test_kv_bytes_from_other_config_shapes(config, expected) -> None:
    assert kv_bytes_per_token(config, 2) == expected


def test_the_operators_table_adds_products_and_the_chart_passes_it() -> None:
    import pytest as _pytest
    from llm_operator.config import parse_args

    from tests.operator.test_chart import operator_env, render

    config = parse_args(["--gpu-memory", "NVIDIA-GH200-480GB=96Gi, Some-New-GPU=48Gi"], env={})
    assert dict(config.gpu_memory) == {"NVIDIA-GH200-480GB": 96 * 2**30, "Some-New-GPU": 48 * 2**30}
    got = fit(spec(product="Some-New-GPU"), ModelFacts(LLAMA_8B, LLAMA_8B_BYTES), dict(config.gpu_memory))
    assert got is not None and got.gpu_memory_bytes == 48 * 2**30
    chart = parse_args([], env=operator_env(render({"gpuMemory": {"Some-New-GPU": "48Gi"}})))
    assert chart.gpu_memory == (("Some-New-GPU", 48 * 2**30),)
    with _pytest.raises(SystemExit):
        parse_args(["--gpu-memory", "NVIDIA-L4"], env={})


@pytest.mark.parametrize("config", [
    {"model_type": "llava", "text_config": {"model_type": "llama"}},  # the language model's fields left to defaults
    {"model_type": "mamba", "num_hidden_layers": 24, "hidden_size": 768},  # no attention heads: no KV cache of this shape
    {"num_hidden_layers": 0, "num_attention_heads": 8, "hidden_size": 512},
    {"num_hidden_layers": "32", "num_attention_heads": 32, "hidden_size": 4096},  # a string where a count belongs
    {"text_config": ["not", "a", "dict"], "num_hidden_layers": 2},
])  # fmt: skip
def test_a_config_without_the_kv_shape_plans_nothing(config) -> None:
    assert kv_bytes_per_token(config, 2) is None
    assert fit(spec(product="NVIDIA-L4"), ModelFacts(config, LLAMA_8B_BYTES)) is None
