"""GGUF model files: a Hugging Face-style config, Hugging Face-named tensors, and a tokenizer.

The header is parsed here rather than by `gguf.GGUFReader`, which builds a numpy view per element
of every metadata array (a 49k-token vocabulary costs seconds): arrays are skipped, only their
length is kept. Tensor data is read from a private memory map, one tensor at a time.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from serving.models.quant import FORMATS as BLOCK_FORMATS
from serving.models.quant import dequantize_q4_0, dequantize_q8_0

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types: struct format of the fixed-size ones; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6


@dataclass(frozen=True, slots=True)
class MetadataArray:
    """A metadata array left unread: its element type and length."""

    item_type: int
    length: int


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: outermost dimension first
    ggml_type: GGMLQuantizationType
    offset: int  # from the start of the file

    @property
    def nbytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return int(np.prod(self.shape)) // block_size * type_size


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]


class _Cursor:
    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer, self.offset = buffer, 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.buffer, self.offset)
        self.offset += struct.calcsize("<" + fmt)
        return values

    def scalar(self, fmt: str) -> Any:
        return self.unpack(fmt)[0]

    def string(self) -> str:
        length = self.scalar("Q")
        self.offset += length
        return self.buffer[self.offset - length : self.offset].decode("utf-8")

    def skip_strings(self, count: int) -> None:
        buffer, offset = self.buffer, self.offset
        for _ in range(count):
            offset += 8 + struct.unpack_from("<Q", buffer, offset)[0]
        self.offset = offset

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, length = self.unpack("IQ")
            if item_type == _STRING:
                self.skip_strings(length)
            elif item_type in _SCALARS:
                self.offset += length * struct.calcsize(_SCALARS[item_type])
            else:
                raise ValueError(f"GGUF arrays of type {item_type} are not supported")
            return MetadataArray(item_type, length)
        if value_type not in _SCALARS:
            raise ValueError(f"unknown GGUF metadata type {value_type}")
        value = self.scalar(_SCALARS[value_type])
        if value_type == _FLOAT32:
            # The shortest decimal that is this float32: 1e-05, not 9.999999747378752e-06.
            value = float(str(np.float32(value)))
        return value


def _open(path: Path) -> mmap.mmap:
    with open(path, "rb") as file:
        # Private (copy-on-write) mapping: writable for torch.frombuffer, never written back.
        return mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)


def _parse(buffer: mmap.mmap, path: Path) -> GGUFHeader:
    cursor = _Cursor(buffer)
    if buffer[:4] != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file")
    cursor.offset = 4
    version = cursor.scalar("I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (a big-endian file?)")
    tensor_count, kv_count = cursor.unpack("QQ")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("I"))
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = cursor.unpack(f"{cursor.scalar('I')}Q")
        ggml_type, offset = cursor.unpack("IQ")
        infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(ggml_type), offset))
    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = -(-cursor.offset // alignment) * alignment
    tensors = {
        name: TensorInfo(name, shape, kind, data_start + offset) for name, shape, kind, offset in infos
    }
    return GGUFHeader(metadata, tensors)


def read_gguf_header(path: str | Path) -> GGUFHeader:
    buffer = _open(Path(path))
    try:
        return _parse(buffer, Path(path))
    finally:
        buffer.close()


def find_gguf_file(path: str | Path) -> Path | None:
    """The GGUF file `path` is, or the only one in directory `path`; None when there is none."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise ValueError(f"{path} holds several GGUF files ({names}): name the one to serve")
    return found[0] if found else None


# GGUF architecture -> (model_type, Hugging Face class). llama.cpp writes Mistral as "llama".
_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),  # Qwen2's layout without Q/K/V biases, plus per-head Q and K norms
}
_TOKEN_IDS = {
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "padding_token_id",
}


def gguf_config(header: GGUFHeader) -> dict[str, Any]:
    metadata = header.metadata
    architecture = metadata.get("general.architecture")
    if architecture not in _ARCHITECTURES:
        supported = ", ".join(_ARCHITECTURES)
        raise ValueError(f"GGUF architecture {architecture!r} is not supported (supported: {supported})")
    model_type, hf_class = _ARCHITECTURES[architecture]

    def optional(key: str) -> Any:
        return metadata.get(f"{architecture}.{key}")

    def field(key: str) -> Any:
        value = optional(key)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {architecture}.{key}")
        return value

    hidden, heads = field("embedding_length"), field("attention.head_count")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": optional("rope.freq_base") or 10000.0}
    scaling = optional("rope.scaling.type") or ("linear" if optional("rope.scale_linear") else "none")
    if scaling != "none":
        rope |= {
            "rope_type": scaling,
            "factor": optional("rope.scaling.factor") or field("rope.scale_linear"),
        }
        if optional("rope.scaling.original_context_length"):
            rope["original_max_position_embeddings"] = optional("rope.scaling.original_context_length")
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_class],
        "hidden_size": hidden,
        "intermediate_size": field("feed_forward_length"),
        "num_hidden_layers": field("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": optional("attention.head_count_kv") or heads,
        "head_dim": optional("attention.key_length") or optional("rope.dimension_count") or hidden // heads,
        "max_position_embeddings": field("context_length"),
        "rms_norm_eps": field("attention.layer_norm_rms_epsilon"),
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        "vocab_size": optional("vocab_size") or header.tensors["token_embd.weight"].shape[0],
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in header.tensors,
    }
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in header.tensors
        config["mlp_bias"] = False
    for key, gguf_key in _TOKEN_IDS.items():
        if f"tokenizer.ggml.{gguf_key}" in metadata:
            config[key] = metadata[f"tokenizer.ggml.{gguf_key}"]
    return config


def read_gguf_config(gguf_path: str | Path) -> dict[str, Any]:
    """A Hugging Face-style config dict (as config.json would hold) from the file's metadata."""
    return gguf_config(read_gguf_header(gguf_path))


_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_tensor_name(name: str) -> str:
    """llama.cpp's tensor name -> Hugging Face's, e.g. blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    stem, _, kind = name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 1 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{kind}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face counterpart in a Llama-family model")


def _undo_rope_permutation(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    # llama.cpp's converter reorders each head's rows of Q and K from Hugging Face's rotate_half
    # layout (first half, second half) to interleaved pairs: row 2i is HF row i, row 2i+1 is HF
    # row i + head_dim/2. Undo it.
    rest = tensor.shape[1:]
    return tensor.reshape(heads, -1, 2, *rest).transpose(1, 2).reshape(tensor.shape)


def _dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # Block of 20 bytes: scale d and minimum m (float16), 16 bytes of nibbles laid out as Q4_0's.
    d, m = blocks[..., 0:2].view(torch.float16).float(), blocks[..., 2:4].view(torch.float16).float()
    q = torch.cat((blocks[..., 4:] & 0x0F, blocks[..., 4:] >> 4), dim=-1).float()
    return (q * d + m).flatten(-2)


_FLOATS = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
# Quantized tensors are dequantized this many weights at a time, straight into the output: the
# float32 intermediates stay small (a 128k-token embedding would otherwise need gigabytes of them).
_CHUNK_ELEMENTS = 1 << 22


def _dequantize_rows(rows: torch.Tensor, kind: GGMLQuantizationType) -> torch.Tensor:
    """Raw bytes (n, row bytes) of whole rows -> float32 (n, row length)."""
    block_size, type_size = GGML_QUANT_SIZES[kind]
    blocks = rows.view(rows.shape[0], -1, type_size)
    if kind == GGMLQuantizationType.Q8_0:
        return dequantize_q8_0(blocks[..., 2:].view(torch.int8), blocks[..., :2].view(torch.float16)[..., 0])
    if kind == GGMLQuantizationType.Q4_0:
        return dequantize_q4_0(blocks[..., 2:], blocks[..., :2].view(torch.float16)[..., 0])
    if kind == GGMLQuantizationType.Q4_1:
        return _dequantize_q4_1(blocks)
    # Everything else (K-quants, Q5_*, IQ*) through the gguf package's numpy dequantizers.
    return torch.from_numpy(gguf_dequantize(rows.numpy(), kind))


def _load(raw: torch.Tensor, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """One tensor's raw bytes -> a `dtype` tensor of its shape."""
    if info.ggml_type in _FLOATS:
        return raw.view(_FLOATS[info.ggml_type]).view(info.shape).to(dtype)
    out = torch.empty(info.shape, dtype=dtype)
    out_rows = out.view(-1, info.shape[-1])
    raw_rows = raw.view(out_rows.shape[0], -1)
    step = max(1, _CHUNK_ELEMENTS // info.shape[-1])
    for start in range(0, out_rows.shape[0], step):
        out_rows[start : start + step] = _dequantize_rows(raw_rows[start : start + step], info.ggml_type)
    return out


@dataclass(frozen=True, slots=True)
class BlockRows:
    """A quantized 2-D tensor kept as the file stores it: shape[0] rows of GGUF `fmt` blocks."""

    fmt: str  # "q4_0", "q4_1" or "q8_0"
    rows: torch.Tensor  # uint8 (shape[0], row bytes); a copy, so the file's map can close
    shape: tuple[int, int]


def block_format(info: TensorInfo) -> str | None:
    """The tensor's format if our block kernels compute with it as stored: "q4_0", "q4_1", "q8_0"."""
    fmt = info.ggml_type.name.lower()
    return fmt if fmt in BLOCK_FORMATS and len(info.shape) == 2 else None


def iter_gguf_tensors(
    gguf_path: str | Path, dtype: torch.dtype, keep: frozenset[str] = frozenset()
) -> Iterator[tuple[str, torch.Tensor | BlockRows]]:
    """(Hugging Face name, tensor) for each tensor in the file: those named in `keep` (which must
    have a block_format) as BlockRows, everything else dequantized to `dtype`.

    Tensors come from a private memory map, one at a time: a float tensor already in `dtype` is not
    copied at all, and nothing holds the whole file twice.
    """
    path = Path(gguf_path)
    buffer = _open(path)
    header = _parse(buffer, path)
    config = gguf_config(header)
    permuted_heads = (
        {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
        if config["model_type"] == "llama"
        else {}
    )
    for info in header.tensors.values():
        name = hf_tensor_name(info.name)
        raw = torch.frombuffer(buffer, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        kept = name in keep
        fmt = block_format(info)
        if kept and fmt is None:
            raise ValueError(f"GGUF tensor {info.name} is {info.ggml_type.name}, not a block format to keep")
        tensor = raw.view(info.shape[0], -1) if kept else _load(raw, info, dtype)
        heads = permuted_heads.get(info.name.split(".")[-2])
        if heads is not None:  # a reordering of whole rows, so it applies to block rows alike
            tensor = _undo_rope_permutation(tensor, heads)
        if kept:
            yield name, BlockRows(str(fmt), tensor.clone(), (info.shape[0], info.shape[1]))
        else:
            yield name, tensor


def load_gguf_tokenizer(gguf_path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer built from the file's metadata, for directories without tokenizer files.

    transformers does the building (seconds: it parses the whole vocabulary its own way); the chat
    template is the file's `tokenizer.chat_template` when it has one.
    """
    from transformers import AutoTokenizer  # a second and a half to import; only this needs it

    path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    template = read_gguf_header(path).metadata.get("tokenizer.chat_template")
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer
