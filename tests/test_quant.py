import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import serving.models.quant as quant
from serving.models import cpu_qmm
from serving.models.quant import (
    BlockQuantLinear,
    dequantize_blocks,
    dequantize_q4_0,
    dequantize_q8_0,
    quantize_linears,
    quantize_q4_0,
    quantize_q8_0,
    to_blocks,
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


def q4_1_rows(weight: torch.Tensor) -> torch.Tensor:
    """Q4_1 blocks of a float weight as llama.cpp's reference quantizer makes them (d = (max-min)/15,
    m = min, q = round((w - m) / d)), in GGUF bytes."""
    blocks = weight.float().reshape(weight.shape[0], -1, 32)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.where(d == 0, 0, (blocks - lo) / torch.where(d == 0, 1, d)).add(0.5).floor().clamp(0, 15).to(torch.uint8)
    head = torch.cat((d.half().view(torch.uint8), lo.half().view(torch.uint8)), -1)
    return torch.cat((head, q[..., :16] | (q[..., 16:] << 4)), -1).flatten(-2)


def _rows(fmt: str, weight: torch.Tensor) -> torch.Tensor:
    if fmt == "q4_1":
        return q4_1_rows(weight)
    return to_blocks(*(quantize_q8_0(weight) if fmt == "q8_0" else quantize_q4_0(weight)))


def _force_path(monkeypatch, path: str) -> None:
    monkeypatch.setattr(cpu_qmm, "available", lambda: path == "kernel")
    monkeypatch.setattr(quant, "_has_int4_cpu_kernel", lambda: path == "int4" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_block_rows_dequantize_exactly_as_the_gguf_package_does(fmt):
    weight = awkward_weights(16, 256)
    rows = _rows(fmt, weight)
    reference = quants.dequantize(rows.numpy(), GGMLQuantizationType[fmt.upper()])
    np.testing.assert_array_equal(dequantize_blocks(rows, fmt).numpy(), reference)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_the_dequantizing_path_computes_with_the_exact_weight(fmt, monkeypatch):
    _force_path(monkeypatch, "dequantize")
    monkeypatch.setattr(quant, "_CPU_CHUNK_ELEMENTS", 7 * 64)  # chunks, with a short last one
    torch.manual_seed(0)
    rows = _rows(fmt, torch.randn(48, 64))
    layer = BlockQuantLinear(64, [(fmt, rows)], bias=torch.randn(48))
    assert layer.path == "dequantize"
    weight = dequantize_blocks(rows, fmt)
    for shape in [(1, 64), (16, 64), (2, 5, 64)]:
        x = torch.randn(shape)
        torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    layer(torch.randn(2, 64, requires_grad=True))  # outside no_grad too, as transformers' callers may be


@pytest.mark.parametrize("path", ["kernel", "int4"])
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_fast_paths_stay_within_a_percent_of_the_exact_weights(fmt, path, monkeypatch):
    if path == "kernel" and cpu_qmm.simd() in ("none", "scalar"):
        pytest.skip("the C kernels are not built here")
    if path == "int4" and (fmt == "q8_0" or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")):
        pytest.skip("torch's int4 kernel is for 4-bit formats")
    _force_path(monkeypatch, path)
    torch.manual_seed(0)
    dense = nn.Linear(256, 64)
    rows = _rows(fmt, dense.weight.detach())
    layer = BlockQuantLinear(256, [(fmt, rows)], dense.bias)
    assert layer.path == path
    x = torch.randn(2, 4, 256)
    with torch.no_grad():
        reference = F.linear(x, dequantize_blocks(rows, fmt), dense.bias)
        ours, full = layer(x), dense(x)
    assert ours.dtype == torch.float32 and ours.shape == (2, 4, 64)
    # Rounding activations to int8 (or bfloat16) per block costs about half a percent; next to 4-bit
    # weights' own error that is a tenth or less.
    assert (ours - reference).norm() < 0.01 * reference.norm()
    if fmt != "q8_0":
        assert (ours - reference).norm() < 0.15 * (reference - full).norm()


def test_parts_of_different_formats_stack_by_rows(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(80, 64)
    parts = [("q4_0", _rows("q4_0", w[:48])), ("q8_0", _rows("q8_0", w[48:]))]
    for path in ("dequantize", "kernel") if cpu_qmm.available() else ("dequantize",):
        _force_path(monkeypatch, path)
        layer = BlockQuantLinear(64, parts)
        x = torch.randn(3, 64)
        expected = torch.cat((dequantize_blocks(parts[0][1], "q4_0"), dequantize_blocks(parts[1][1], "q8_0")))
        got, want = layer(x), x @ expected.t()
        assert got.shape == (3, 80) and layer.out_features == 80
        assert (got - want).norm() < (1e-5 if path == "dequantize" else 0.01) * want.norm()


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
    [("q8_0", 34 / 32), ("q4_0", 18 / 32 if cpu_qmm.available() or not quant._has_int4_cpu_kernel() else 20 / 32)],
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
    assert [type(m) for m in model] == [BlockQuantLinear, BlockQuantLinear, nn.Linear]


def test_unknown_scheme_is_rejected_and_none_changes_nothing():
    model = nn.Sequential(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="none, q8_0, q4_0"):
        quantize_linears(model, "q5_k")
    assert quantize_linears(model, "none") == 0
    assert type(model[0]) is nn.Linear
