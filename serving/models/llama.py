"""Native Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3) over the paged KV cache.

Runs packed batches: the tokens of all scheduled sequences are concatenated into one [T, hidden]
tensor, so every linear layer is one matmul per step whatever the mix of prefill and decode.
Parameter names follow Hugging Face's, so checkpoints load without renaming.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from serving.models import cpu_ops
from serving.models.attention import AttentionBatch, PagedAttention
from serving.models.lora import LoraStep, LoraWeights
from serving.models.quant import BlockQuantEmbedding

NATIVE_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
# RoPE variants whose frequencies change with the current length: HF recomputes them on the fly,
# which a shared paged cache cannot follow per sequence. Such models use the transformers runner.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


class UnsupportedModel(ValueError):
    """This checkpoint needs the transformers fallback runner."""


@dataclass(slots=True, frozen=True)
class ModelShape:
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    layer_windows: tuple[int | None, ...]

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelShape:
        model_type = config.model_type
        if model_type not in NATIVE_ARCHITECTURES:
            raise UnsupportedModel(f"no native implementation for model_type {model_type!r}")
        num_layers = config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            model_type=model_type,
            num_layers=num_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            hidden_act=config.hidden_act,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            qk_norm=model_type == "qwen3",
            layer_windows=_layer_windows(config, num_layers),
        )


def _layer_windows(config: PretrainedConfig, num_layers: int) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (window,) * num_layers


def rope_frequencies(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies over the rotary dims, cos/sin scale), as transformers computes them."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        raise UnsupportedModel(f"RoPE type {rope_type!r} varies with sequence length")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim)), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedModel(f"unknown RoPE type {rope_type!r}")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scale)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, triton: bool = False) -> torch.Tensor:
        if triton:
            return _triton_ops().rms_norm(x, self.weight, self.eps)
        return cpu_ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor, triton: bool = False) -> torch.Tensor:
        """residual += x (in place), then the norm of the sum: one pass over the rows (one kernel on CPU,
        or with `triton` on a GPU)."""
        if triton:
            return _triton_ops().rms_norm(x, self.weight, self.eps, residual=residual)
        return cpu_ops.add_rms_norm(x, residual, self.weight, self.eps)


@functools.cache
def _triton_ops():
    """The fused Triton kernels for a step on the Triton backend (triton comes with CUDA builds of torch
    only, so it is imported when first used; cached: the layers ask for it several times a step)."""
    from serving.models import triton_ops

    return triton_ops


class Rotary(nn.Module):
    """cos/sin tables for every position up to max_positions, applied with HF's rotate_half layout."""

    def __init__(self, inv_freq: torch.Tensor, scale: float, max_positions: int):
        super().__init__()
        self.inv_freq, self.scale, self.max_positions = inv_freq, scale, max_positions
        self.build_tables(torch.device("cpu"))

    def build_tables(self, device: torch.device) -> None:
        """(Re)compute the tables on `device`; the loader calls this after materialising a meta model."""
        with torch.device(device):
            freqs = torch.arange(self.max_positions, dtype=torch.float).unsqueeze(1) * self.inv_freq.to(device)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.register_buffer("cos", emb.cos() * self.scale, persistent=False)
            self.register_buffer("sin", emb.sin() * self.scale, persistent=False)

    def step(self, positions: torch.Tensor, dtype: torch.dtype, triton: bool = False) -> RopeStep:
        """What every layer of this step rotates with."""
        return RopeStep(self, positions, dtype, triton)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for this step's positions, [T, 1, rotary_dim]; shared by every layer."""
        cos = self.cos.index_select(0, positions).unsqueeze(1).to(dtype)
        sin = self.sin.index_select(0, positions).unsqueeze(1).to(dtype)
        return cos, sin

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]; only the first rotary_dim dims rotate (partial rotary)."""
        rot_dim = cos.shape[-1]
        if rot_dim == x.shape[-1]:
            half = rot_dim // 2
            return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
        x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
        half = rot_dim // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


class RopeStep:
    """One step's rotation. float32 on CPU a fused kernel reads the table rows of each position itself,
    and so does the Triton backend's, which Attention calls with the step's cache write
    (triton_ops.rotary_into_cache_); elsewhere the rows are looked up once here, for all layers."""

    __slots__ = ("rotary", "positions", "cos", "sin")

    def __init__(self, rotary: Rotary, positions: torch.Tensor, dtype: torch.dtype, triton: bool = False):
        self.rotary, self.positions = rotary, positions
        if triton or (cpu_ops.available() and dtype is torch.float32 and positions.is_cpu):
            self.cos = self.sin = None
        else:
            self.cos, self.sin = rotary.lookup(positions, dtype)

    def apply_(self, x: torch.Tensor, heads: int) -> None:
        """Rotate the first `heads` heads of x [T, >= heads, head_dim] in place."""
        if self.cos is None:
            cpu_ops.rotary_(x, heads, self.rotary.cos, self.rotary.sin, self.positions)
        else:
            x[:, :heads] = Rotary.apply(x[:, :heads], self.cos, self.sin)


class Attention(nn.Module):
    """q, k and v come from one fused projection (one matmul); checkpoints with separate
    q/k/v_proj tensors are stacked into it at load (see `stacked_params`)."""

    def __init__(self, shape: ModelShape, window: int | None):
        super().__init__()
        h, kvh, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.q_size, self.kv_size = h * d, kvh * d
        self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
        self.qkv_proj = nn.Linear(shape.hidden_size, self.q_size + 2 * self.kv_size, bias=shape.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, shape.hidden_size, bias=False)
        if shape.qk_norm:
            self.q_norm = RMSNorm(d, shape.rms_norm_eps)
            self.k_norm = RMSNorm(d, shape.rms_norm_eps)
        self.qk_norm = shape.qk_norm
        self.attn = PagedAttention(h, kvh, d, d**-0.5, window)
        self.lora = {"qkv_proj": LoraWeights(), "o_proj": LoraWeights()}  # LoRA adapters' pairs (lora.py)

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeStep,
        kv: tuple[torch.Tensor, torch.Tensor],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        h, kvh = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x)
        if batch.lora is not None:
            batch.lora.add_(qkv, x, self.lora["qkv_proj"])
        qkv = qkv.view(-1, h + 2 * kvh, self.head_dim)
        if self.qk_norm:
            qk = torch.cat((self.q_norm(qkv[:, :h]), self.k_norm(qkv[:, h : h + kvh])), dim=1)
        else:
            qk = qkv  # q and k are the first h + kvh heads: rotated in place, v left as it is
        v = qkv[:, h + kvh :]
        if batch.backend == "triton":  # one kernel: q rotated in place, k rotated into the cache, v copied there
            _triton_ops().rotary_into_cache_(qk, v, h, rope.rotary.cos, rope.rotary.sin, rope.positions, kv[0], kv[1],
                                             batch.slot_mapping)  # fmt: skip
            out = self.attn.forward(qk[:, :h], None, None, kv[0], kv[1], batch)
        else:
            rope.apply_(qk, h + kvh)  # q and k heads rotate together
            out = self.attn.forward(qk[:, :h], qk[:, h : h + kvh], v, kv[0], kv[1], batch)
        out = out.reshape(-1, self.q_size)
        projected = self.o_proj(out)
        if batch.lora is not None:
            batch.lora.add_(projected, out, self.lora["o_proj"])
        return projected


class MLP(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.gate_up_proj = nn.Linear(shape.hidden_size, 2 * shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)
        self.silu = shape.hidden_act == "silu"
        self.act = ACT2FN[shape.hidden_act]
        self.lora = {"gate_up_proj": LoraWeights(), "down_proj": LoraWeights()}  # LoRA adapters' pairs (lora.py)

    def forward(self, x: torch.Tensor, triton: bool = False, lora: LoraStep | None = None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if lora is not None:
            lora.add_(gate_up, x, self.lora["gate_up_proj"])
        if self.silu and triton:
            h = _triton_ops().silu_mul(gate_up)
        elif self.silu:  # one pass over the rows on CPU
            h = cpu_ops.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            h = self.act(gate) * up
        out = self.down_proj(h)
        if lora is not None:
            lora.add_(out, h, self.lora["down_proj"])
        return out


class DecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, window: int | None):
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.self_attn = Attention(shape, window)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.mlp = MLP(shape)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeStep,
        kv: tuple[torch.Tensor, torch.Tensor],
        batch: AttentionBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it is added). The sum is made by the
        next norm (add_forward), so each residual add rides on a norm's pass over the rows; the first
        layer gets residual None and x is the embeddings."""
        triton = batch.backend == "triton"  # the Triton backend's fused kernels, else the CPU's / torch's
        if residual is None:
            residual = x
            h = self.input_layernorm(x, triton)
        else:
            h = self.input_layernorm.add_forward(x, residual, triton)
        h = self.post_attention_layernorm.add_forward(self.self_attn(h, rope, kv, batch), residual, triton)
        return self.mlp(h, triton, batch.lora), residual


class DecoderModel(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape, w) for w in shape.layer_windows)
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: PretrainedConfig, max_positions: int):
        super().__init__()
        self.shape = ModelShape.from_config(config)
        with torch.device("cpu"):  # real values even when the model itself is built on "meta"
            inv_freq, scale = rope_frequencies(config, self.shape.head_dim)
        self.rotary = Rotary(inv_freq, scale, max_positions)
        self.model = DecoderModel(self.shape)
        if not self.shape.tie_word_embeddings:
            self.lm_head = nn.Linear(self.shape.hidden_size, self.shape.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        """Final hidden states [T, hidden] (logits are computed only for the rows that need them)."""
        x = self.model.embed_tokens(input_ids)  # a new tensor: the residual stream, added to in place
        triton = batch.backend == "triton"
        rope = self.rotary.step(positions, x.dtype, triton)
        residual = None
        for layer, kv in zip(self.model.layers, kv_cache, strict=True):
            x, residual = layer.forward(x, residual, rope, kv, batch)  # no module hooks: skip __call__
        if residual is None:
            return self.model.norm(x, triton)
        return self.model.norm.add_forward(x, residual, triton)

    def stacked_params(self) -> dict[str, tuple[str, int, int]]:
        """Checkpoint projections that live inside a fused parameter here:
        name fragment -> (fused fragment, first row, rows)."""
        s = self.shape
        q, kv, inter = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.intermediate_size
        return {
            "q_proj": ("qkv_proj", 0, q),
            "k_proj": ("qkv_proj", q, kv),
            "v_proj": ("qkv_proj", q + kv, kv),
            "gate_proj": ("gate_up_proj", 0, inter),
            "up_proj": ("gate_up_proj", inter, inter),
        }

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.shape.tie_word_embeddings:
            return self.lm_head(hidden)
        embed = self.model.embed_tokens
        if isinstance(embed, BlockQuantEmbedding):  # a GGUF file's quantized table, used as it is
            return embed.project(hidden)
        return hidden @ embed.weight.t()
