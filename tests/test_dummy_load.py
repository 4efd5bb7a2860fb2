"""--load-format dummy: real architectures' shapes with random weights (no weights can be downloaded
where the GPU benchmarks run), and the shipped configs of the benchmark's models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from serving.config import ServeConfig
from serving.engine.builder import build_engine
from serving.engine.sampling_params import SamplingParams
from serving.models.llama import LlamaForCausalLM
from serving.models.loader import preflight
from tests.tiny_models import make_tiny_model

CONFIGS = Path(__file__).resolve().parent.parent / "bench" / "configs"


def _generate(model_dir: Path, arch: str = "auto") -> tuple[list[int], str]:
    built = build_engine(ServeConfig(model_path=str(model_dir), device="cpu", load_format="dummy", model_arch=arch))
    built.engine.add_request("r", [1, 5, 9, 2], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    tokens: list[int] = []
    while built.engine.has_work:
        tokens += [t for o in built.engine.step() for t in o.token_ids]
    return tokens, built.info.architecture


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_config_without_weights_serves_random_weights(tmp_path, arch):
    model_dir = make_tiny_model(tmp_path, arch)
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    cfg = ServeConfig(model_path=str(model_dir), device="cpu", load_format="dummy")
    preflight(cfg)  # a config alone is a servable model directory here
    tokens, architecture = _generate(model_dir)
    assert architecture == arch and len(tokens) == 8
    assert _generate(model_dir)[0] == tokens  # seeded: the same weights every time
    assert len(set(tokens)) > 1 or tokens[0] != 0  # varied logits, not an all-zero model
    fallback, _ = _generate(model_dir, arch="transformers")
    assert len(fallback) == 8


@pytest.mark.parametrize(("name", "billions"), [("llama-3.1-8b", 8.030), ("qwen2.5-7b", 7.616), ("mistral-7b", 7.248)])
def test_the_benchmark_configs_have_the_published_sizes(name, billions):
    config = AutoConfig.from_pretrained(CONFIGS / name)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, max_positions=4096)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 3) == billions
