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


# A chat template in the manner of Qwen3's and DeepSeek-R1's: `enable_thinking: false` renders an empty
# think block into the prompt; `opened` ends the prompt inside one, as thinking-only models' templates do.
# A message's reasoning_content (sent back from an earlier reply) is shown in brackets.
THINKING_TEMPLATE = (
    "{%- for m in messages %}<|{{ m.role }}|>{{ m.content }}"
    "{% if m.reasoning_content is defined %}[{{ m.reasoning_content }}]{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>"
    "{% if opened is defined and opened %}<think>{% elif enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{%- endif %}"
)
# What the thinking model writes after a chat prompt, token by token: a think block, a line break, an answer.
THINKING_SCRIPT = ("<think>", "▁The", "▁c", "at", "▁big", ".", "</think>", "<0x0A>", "Y", "es", ",", "▁it")


def make_thinking_model(root: Path) -> Path:
    """A Llama model that thinks, deterministically: the demo tokenizer plus <think> and </think> tokens
    and THINKING_TEMPLATE, and weights that make each token of THINKING_SCRIPT follow the one before it
    (after the prompt's last token, `<|assistant|>`'s ">"), then EOS; any other token is followed by EOS.

    Its blocks add nothing to the residual stream (zero output projections), so the last hidden state is
    the current token's embedding, a one-hot vector per scripted token, and the output projection maps
    each to its successor with a logit of 80 against 0: greedy or sampled, the script comes out."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    out = root / "thinking"
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    tokenizer.add_tokens([AddedToken(tag, normalized=False, special=False) for tag in ("<think>", "</think>")])
    tokenizer.chat_template = THINKING_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids([">", *THINKING_SCRIPT])
    assert len(set(ids)) == len(ids) and tokenizer.unk_token_id not in ids, "the script's tokens must be distinct"
    params = {**_COMMON, **ARCH_OVERRIDES["llama"], "vocab_size": len(tokenizer), "num_hidden_layers": 1}
    config = AutoConfig.for_model("llama", **params)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hidden, eos = config.hidden_size, config.eos_token_id
    with torch.no_grad():
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        head.zero_()
        embed[:, hidden - 1] = 1.0  # every other token: the last slot, whose successor is EOS
        head[eos, hidden - 1] = 10.0
        for slot, (token, successor) in enumerate(zip(ids, [*ids[1:], eos], strict=True)):
            embed[token] = 0.0
            embed[token, slot] = 1.0
            head[successor, slot] = 10.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
