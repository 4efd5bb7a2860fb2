"""Tiny random-weight checkpoints, built in-process, for oracle tests against transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from serving.models.source import demo_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

_COMMON = dict(
    vocab_size=512,  # the demo tokenizer's vocabulary, so text round-trips
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.3,  # peaked distributions, so greedy never hinges on float noise
    tie_word_embeddings=False,
)

ARCH_OVERRIDES: dict[str, dict] = {
    "llama": dict(rope_theta=10000.0),
    "mistral": dict(sliding_window=12),  # shorter than the tests' sequences: the window matters
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=16),
    "phi3": dict(partial_rotary_factor=0.5, pad_token_id=0),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),  # no native implementation
}


def make_tiny_model(root: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """Save a random `arch` model plus the demo tokenizer under root/arch; return the directory."""
    out = root / arch
    params = {**_COMMON, **ARCH_OVERRIDES[arch], **overrides}
    config = AutoConfig.for_model(arch, **params)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(demo_model_dir() / name, out / name)
    return out


def make_config_only_model(root: Path, arch: str) -> Path:
    """A model directory holding nothing but its config.json, as bench/configs does: no weights, no
    tokenizer (what --load-format dummy runs on)."""
    model_dir = make_tiny_model(root, arch)
    for file in model_dir.iterdir():
        if file.name != "config.json":
            file.unlink()
    return model_dir


def hf_greedy(
    model_dir: Path, prompt_ids: list[int], max_new_tokens: int, device: str = "cpu", dtype: str = "float32"
) -> list[int]:
    """transformers' own greedy generate, the oracle, ignoring EOS."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids], device=device), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False
        )
    return out[0, len(prompt_ids) :].tolist()


def hf_choice_gaps(
    model_dir: Path, prompt_ids: list[int], output_ids: list[int], device: str = "cpu", dtype: str = "float32"
) -> list[float]:
    """For each of our output tokens, how far its logit lies below the best one at that position when
    transformers scores the whole sequence (teacher-forced): 0 where it is transformers' argmax too."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    ids = torch.tensor([prompt_ids + output_ids[:-1]], device=device)
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt_ids) - 1 :].float()
    chosen = logits.gather(1, torch.tensor(output_ids, device=device).unsqueeze(1)).squeeze(1)
    return (logits.max(dim=-1).values - chosen).tolist()
