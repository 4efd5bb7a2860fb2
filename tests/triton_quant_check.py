"""`python -m tests.triton_quant_check`, run under TRITON_INTERPRET=1 by tests/test_triton_quant.py (and
compiled on a GPU with FLEETLM_CHECK_DEVICE=cuda): the Triton block-quantized matmul against dequantize-then-F.linear.

- the kernel alone, Q8_0 / Q4_0 / Q4_1, row counts below, at and over a tile (1, 5, 33), K and N that
  are no multiple of the tiles (96, 40), float32 (to float32 rounding) and bfloat16 (to one bfloat16
  rounding of the output) activations;
- BlockQuantLinear's "triton" path: its kernel layout holds the GGUF bytes (no more memory, and
  `dequantize()` gives the exact weight back), bias, 3-D inputs, parts of different formats; a
  BlockQuantEmbedding on it keeps its table once;
- a tiny native Llama quantized to q8_0 and q4_0, teacher-forced prefill and a decode step: the
  triton path's logits are the dequantizing path's;
- the same of a tiny GGUF file (Q8_0 blocks kept, tied block embedding), loaded onto the device in the
  model's dtype (bfloat16 on a GPU, the default there): every block layer's bytes on the device.
"""

import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from serving.config import ServeConfig
from serving.models import triton_quant
from serving.models.loader import load_model
from serving.models.quant import (
    BlockQuantEmbedding,
    BlockQuantLinear,
    dequantize_blocks,
    quantize_blocks,
    weight_bytes,
)
from serving.models.runner import ForwardChunk
from tests.test_quant import q4_1_rows
from tests.tiny_models import make_tiny_model

DEVICE = torch.device(os.environ.get("FLEETLM_CHECK_DEVICE", "cpu"))  # cuda: compiled, on a GPU
BF16_ULP = 2**-7  # the interpreter's float32 -> bfloat16 store may round a whole unit off, a GPU half
torch.manual_seed(0)


def gguf_rows(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    return (q4_1_rows(weight) if fmt == "q4_1" else quantize_blocks(weight, fmt)).to(DEVICE)


def check_close(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, what) -> None:
    assert got.dtype == dtype and got.shape == exact.shape, (what, got.dtype, got.shape)
    tolerance = exact.abs() * (BF16_ULP if dtype == torch.bfloat16 else 1e-5) + 1e-5
    error = ((got.float() - exact).abs() - tolerance).max().item()
    assert error <= 0, (what, error)


# The kernel alone.
for fmt in ("q8_0", "q4_0", "q4_1"):
    for m, k, n in ((1, 64, 48), (5, 96, 40), (33, 96, 40)):
        rows = gguf_rows(torch.randn(n, k), fmt)
        packed = triton_quant.pack(rows, fmt)
        assert torch.equal(triton_quant.gguf_rows(*packed, fmt), rows), fmt
        assert sum(t.nbytes for t in packed if t is not None) == rows.nbytes, fmt
        x = torch.randn(m, k, device=DEVICE)
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            # What the dequantizing path computes: the weight rounded to the activations' dtype, products
            # summed in float32.
            exact = F.linear(xd.float(), dequantize_blocks(rows, fmt, dtype).float())
            check_close(triton_quant.matmul(xd, fmt, *packed), exact, dtype, (fmt, m, k, n, dtype))

# BlockQuantLinear on the triton path.
os.environ["FLEETLM_QUANT_PATH"] = "triton"
weight, bias = torch.randn(80, 64), torch.nn.Parameter(torch.randn(80, device=DEVICE), requires_grad=False)
parts = [("q4_0", gguf_rows(weight[:48], "q4_0")), ("q8_0", gguf_rows(weight[48:], "q8_0"))]
layer = BlockQuantLinear(64, parts, bias)
assert layer.path == "triton"
exact_weight = torch.cat([dequantize_blocks(rows, fmt) for fmt, rows in parts])
assert torch.equal(layer.dequantize(), exact_weight)
assert weight_bytes(layer) == sum(rows.nbytes for _, rows in parts) + bias.nbytes  # the GGUF bytes, once
x = torch.randn(2, 3, 64, device=DEVICE)
check_close(layer(x), F.linear(x, exact_weight, bias), torch.float32, "parts")

table = gguf_rows(torch.randn(40, 64), "q8_0")
embedding = BlockQuantEmbedding("q8_0", table, 64)
assert embedding.projection.path == "triton" and weight_bytes(embedding) == table.nbytes
ids = torch.tensor([[3, 0, 39], [7, 7, 1]], device=DEVICE)
assert torch.equal(embedding(ids), dequantize_blocks(table, "q8_0")[ids.reshape(-1)].view(2, 3, 64))
hidden = torch.randn(4, 64, device=DEVICE)
check_close(embedding.project(hidden), hidden @ dequantize_blocks(table, "q8_0").t(), torch.float32, "embedding")

# A tiny native model end to end: the triton path against the dequantizing one.
with tempfile.TemporaryDirectory() as tmp:
    model_dir = make_tiny_model(Path(tmp), "llama")
    prompt = torch.randint(3, 512, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    for scheme in ("q8_0", "q4_0"):
        logits = {}
        for path in ("triton", "dequantize"):
            os.environ["FLEETLM_QUANT_PATH"] = path
            cfg = ServeConfig(model_path=str(model_dir), device=DEVICE.type, dtype="float32", quantization=scheme)
            runner = load_model(cfg).runner
            layers = [m for m in runner.model.modules() if isinstance(m, BlockQuantLinear)]
            # Two layers' four projections, the output projection and the token table's (all in blocks).
            assert len(layers) == 2 * 4 + 2 and all(m.path == path for m in layers), (scheme, path)
            runner.allocate_kv_cache(4, 16)
            prefill = runner.execute([ForwardChunk(0, prompt, 0, [0, 1], decode=False)], list(range(len(prompt))))
            decode = runner.execute([ForwardChunk(0, [5], len(prompt), [0, 1], decode=True)], [0])
            logits[path] = torch.cat((prefill, decode)).cpu()
        error = ((logits["triton"] - logits["dequantize"]).norm() / logits["dequantize"].norm()).item()
        assert error < 1e-5, (scheme, error)
        assert torch.equal(logits["triton"].argmax(-1), logits["dequantize"].argmax(-1)), scheme

    # A GGUF file's blocks, kept as they are.
    from gguf import GGMLQuantizationType

    from serving.models.source import demo_model_dir
    from tests.test_gguf import tiny_model, write_gguf

    gguf_path = write_gguf(Path(tmp) / "tiny.gguf", tiny_model(tie=True), GGMLQuantizationType.Q8_0)
    dtype = "bfloat16" if DEVICE.type == "cuda" else "float32"
    logits = {}
    for path in ("triton", "dequantize"):
        os.environ["FLEETLM_QUANT_PATH"] = path
        cfg = ServeConfig(model_path=str(gguf_path), tokenizer_path=str(demo_model_dir()), device=DEVICE.type, dtype=dtype)
        runner = load_model(cfg).runner
        blocks = [m for m in runner.model.modules() if isinstance(m, BlockQuantLinear)]
        assert blocks and all(m.path == path for m in blocks), path
        assert all(t.device.type == DEVICE.type for m in blocks for t in m.buffers()), path
        runner.allocate_kv_cache(4, 16)
        ids = [t % 96 for t in prompt[:12]]  # the tiny GGUF model's vocabulary
        prefill = runner.execute([ForwardChunk(0, ids, 0, [0], decode=False)], list(range(12)))
        decode = runner.execute([ForwardChunk(0, [5], 12, [0], decode=True)], [0])
        logits[path] = torch.cat((prefill, decode)).float().cpu()
    error = ((logits["triton"] - logits["dequantize"]).norm() / logits["dequantize"].norm()).item()
    assert error < (2e-2 if dtype == "bfloat16" else 1e-5), ("gguf", error)
print("ok")
