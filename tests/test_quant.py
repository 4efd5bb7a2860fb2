import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import serving.models.quant as quant
from serving.models.quant import (
    Int4CpuLinear,
    QuantizedLinear,
    dequantize_q4_0,
    dequantize_q8_0,
    quantize_linears,
    quantize_q4_0,
    quantize_q8_0,
    weight_bytes,
)


def reference_block(block: np.ndarray, scheme: str) -> tuple[np.float16, np.ndarray]:
    """One block of 32 float32 weights as ggml's reference C quantizer defines it: (d, values)."""
    if scheme == "q8_0":
        d = np.float32(np.abs(block).max()) / np.float32(127)
        inverse = np.float32(1) / d if d else np.float32(0)
        scaled = block * inverse
        # roundf: halves away from zero
        q = np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))
        return np.float16(d), q.astype(np.int8)
    peak = block[np.argmax(np.abs(block))]
    d = peak / np.float32(-8)
    inverse = np.float32(1) / d if d else np.float32(0)
    q = np.minimum(15, (block * inverse + np.float32(8.5)).astype(np.int8))
    return np.float16(d), q.astype(np.int8) - 8


def awkward_weights(rows: int = 16, cols: int = 256) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * torch.logspace(-2, 1, rows).unsqueeze(1)
    w[0, :32] = 0  # an all-zero block: scale 0, no division by zero
    # Values that land exactly on halves after scaling (d = 1), where rounding rules differ.
    w[1, :32] = torch.tensor([127.0, -127.0] + [k + 0.5 for k in range(-15, 15)])
    w[3, :32] = torch.tensor([-8.0] + [k / 2 for k in range(-15, 16)])  # a negative peak
    w[2, 32:64] = -w[2, 32:64].abs()
    return w


@pytest.mark.parametrize("scheme", ["q8_0", "q4_0"])
def test_blocks_follow_the_gguf_definition(scheme):
    w = awkward_weights()
    if scheme == "q8_0":
        q, d = quantize_q8_0(w)
        values, dequantized = q.numpy(), dequantize_q8_0(q, d)
    else:
        q, d = quantize_q4_0(w)
        values, dequantized = quant.unpack_q4_0(q).numpy().astype(np.int8) - 8, dequantize_q4_0(q, d)
    blocks = w.numpy().reshape(-1, 32)
    for i, block in enumerate(blocks):
        ref_d, ref_q = reference_block(block, scheme)
        assert d.numpy().reshape(-1)[i] == ref_d
        np.testing.assert_array_equal(values.reshape(-1, 32)[i], ref_q)
    expected = d.float().unsqueeze(-1) * torch.from_numpy(values).float()
    torch.testing.assert_close(dequantized, expected.flatten(-2), rtol=0, atol=0)

    # Round-trip error: within half a step for q8_0 (a whole one for q4_0, whose +8 end is clamped
    # to 7), plus the float16 rounding of the scale; on the Gaussian rows, small for q8_0.
    step = d.float().abs().unsqueeze(-1)
    error = (dequantized - w).view(*step.shape[:-1], 32).abs()
    assert (error <= step * (0.57 if scheme == "q8_0" else 1.004)).all()
    relative = ((dequantized - w)[4:].norm() / w[4:].norm()).item()
    assert relative < (0.01 if scheme == "q8_0" else 0.12)


@pytest.mark.parametrize("scheme", ["q8_0", "q4_0"])
def test_bytes_equal_the_gguf_packages_quantizer(scheme):
    w = awkward_weights()
    if scheme == "q8_0":
        q, d = quantize_q8_0(w)
        qtype = GGMLQuantizationType.Q8_0
    else:
        q, d = quantize_q4_0(w)
        qtype = GGMLQuantizationType.Q4_0
    ours = torch.cat((d.unsqueeze(-1).view(torch.uint8), q.view(torch.uint8)), dim=-1).flatten(-2)
    np.testing.assert_array_equal(ours.numpy(), quants.quantize(w.numpy(), qtype))


@pytest.mark.parametrize("scheme", ["q8_0", "q4_0"])
def test_quantized_linear_computes_with_the_dequantized_weight(scheme, monkeypatch):
    # Small chunks, with a short last one, to exercise the chunked CPU path.
    monkeypatch.setattr(quant, "_CPU_CHUNK_ELEMENTS", 7 * 64)
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = QuantizedLinear(linear, scheme)
    weight = layer.dequantize()
    for shape in [(1, 64), (16, 64), (2, 5, 64)]:
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, weight, linear.bias), rtol=1e-5, atol=1e-5)
    bf16_layer = QuantizedLinear(nn.Linear(64, 48, dtype=torch.bfloat16), scheme)
    assert bf16_layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    layer(torch.randn(2, 64, requires_grad=True))  # outside no_grad too, as transformers' callers may be


@pytest.mark.skipif(not quant._has_int4_cpu_kernel(), reason="torch has no CPU int4 kernel")
def test_int4_kernel_error_is_small_next_to_q4_0s_own():
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    exact = QuantizedLinear(linear, "q4_0")
    fused = Int4CpuLinear(linear)
    x = torch.randn(2, 4, 256)
    with torch.no_grad():
        dense, reference, ours = linear(x), exact(x), fused(x)
    assert ours.dtype == torch.float32 and ours.shape == (2, 4, 64)
    assert (ours - reference).norm() < 0.1 * (reference - dense).norm()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def linear_bytes(model: nn.Module) -> int:
    layers = model.model.layers
    return sum(weight_bytes(m) for m in layers.modules() if m is not layers and not list(m.children()))


@pytest.mark.parametrize(
    ("scheme", "bytes_per_weight"),
    [("q8_0", 34 / 32), ("q4_0", 20 / 32 if quant._has_int4_cpu_kernel() else 18 / 32)],
)
def test_quantized_llama_keeps_its_predictions_in_less_memory(scheme, bytes_per_weight):
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 24))
    dense_bytes = linear_bytes(model)
    norm_bytes = 2 * 2 * 128 * 4  # two RMSNorm weights per layer stay float32
    with torch.no_grad():
        dense = model(ids).logits
        replaced = quantize_linears(model, scheme, skip=lambda name: name == "lm_head")
        quantized = model(ids).logits

    assert replaced == 2 * 7
    assert isinstance(model.lm_head, nn.Linear)
    assert (linear_bytes(model) - norm_bytes) / (dense_bytes - norm_bytes) == pytest.approx(
        bytes_per_weight / 4
    )
    assert (quantized.argmax(-1) == dense.argmax(-1)).float().mean() > 0.95
    assert (quantized - dense).norm() / dense.norm() < (0.02 if scheme == "q8_0" else 0.3)


def test_layers_without_whole_blocks_stay_dense():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 16))
    assert quantize_linears(model, "q8_0") == 2
    assert [type(m) for m in model] == [QuantizedLinear, QuantizedLinear, nn.Linear]


def test_unknown_scheme_is_rejected_and_none_changes_nothing():
    model = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="none, q8_0, q4_0"):
        quantize_linears(model, "q5_k")
    assert quantize_linears(model, "none") == 0
    assert type(model[0]) is nn.Linear
