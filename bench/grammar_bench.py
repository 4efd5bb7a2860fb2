"""Constrained decoding: two grammar libraries on our tokenizers, and what constraints cost the engine.

1. xgrammar and llguidance (the candidates vLLM and SGLang use), on each tokenizer given: building the
   tokenizer data, compiling a JSON schema (first time, and again from cache), and the per-token mask
   (fill + apply on one row) while decoding a schema-valid output.
2. The engine at batch 16: decode throughput with every sequence unconstrained, half and all under the
   schema (xgrammar, as served).

Prints a table and writes JSON (bench/results/grammar_bench.json).

    python -m bench.grammar_bench [--tokenizer DIR ...] [--model-path MODEL]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}}, "required": ["city"]},
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}  # fmt: skip
STEPS = 48


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _mask_us(vocab: int, mask, advance) -> float:
    """Median microseconds of `mask(logits)` (fill and apply one row) while decoding greedily from random
    logits under the grammar; `advance(token)` is False once the grammar stops."""
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(STEPS):
        logits = torch.randn(1, vocab, generator=gen)
        start = time.perf_counter()
        mask(logits)
        times.append(time.perf_counter() - start)
        if not advance(int(logits.argmax())):
            break
    return 1e6 * statistics.median(times)


def bench_xgrammar(tokenizer, vocab: int) -> dict:
    import xgrammar as xgr

    info, t_info = _timed(lambda: xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab))
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    text = json.dumps(SCHEMA)
    compiled, t_first = _timed(lambda: compiler.compile_json_schema(text, any_whitespace=False))
    _, t_cached = _timed(lambda: compiler.compile_json_schema(text, any_whitespace=False))
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)

    def mask(logits):
        matcher.fill_next_token_bitmask(bitmask, 0)
        xgr.apply_token_bitmask_inplace(logits, bitmask)

    mask_us = _mask_us(vocab, mask, lambda t: matcher.accept_token(t) and not matcher.is_terminated())
    return {"tokenizer_s": t_info, "compile_s": t_first, "compile_cached_s": t_cached, "mask_us": mask_us}


def bench_llguidance(tokenizer, vocab: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    tok, t_info = _timed(lambda: llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab))
    text = json.dumps(SCHEMA)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(text)
    matcher, t_first = _timed(lambda: llguidance.LLMatcher(tok, grammar))
    _, t_cached = _timed(lambda: llguidance.LLMatcher(tok, grammar))  # llguidance compiles lazily, per matcher
    bitmask = lt.allocate_token_bitmask(1, vocab)

    def mask(logits):
        lt.fill_next_token_bitmask(matcher, bitmask, 0)
        lt.apply_token_bitmask_inplace(logits, bitmask)

    mask_us = _mask_us(vocab, mask, lambda t: matcher.consume_token(t) and not matcher.is_stopped())
    return {"tokenizer_s": t_info, "compile_s": t_first, "compile_cached_s": t_cached, "mask_us": mask_us}


def bench_engine(model_path: str | None, batch: int = 16, tokens: int = 64) -> dict:
    from serving.config import ServeConfig
    from serving.engine.builder import build_engine
    from serving.engine.grammar import json_schema_spec
    from serving.engine.sampling_params import SamplingParams

    cfg = ServeConfig(device="cpu", max_batch_size=batch, **({"model_path": model_path} if model_path else {}))
    engine = build_engine(cfg).engine
    spec = json_schema_spec(SCHEMA)
    engine.grammars.compile(spec)  # compiled ahead: this measures decoding, not compilation
    results = {}
    for constrained in (0, batch // 2, batch):
        for i in range(batch):
            grammar = spec if i < constrained else None
            params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True, grammar=grammar)
            engine.add_request(f"{constrained}-{i}", [1, 2, 3, 4 + i], params)
        engine.step()  # prefill
        # Decode steps while all of the batch is still generating (a finished JSON would shrink it).
        durations = []
        while engine.has_work and len(durations) < STEPS // 2:
            start = time.perf_counter()
            engine.step()
            if engine.last_stats.batch_size == batch:
                durations.append(time.perf_counter() - start)
        while engine.has_work:
            engine.step()
        results[f"{constrained}_of_{batch}"] = batch / statistics.median(durations)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", action="append", default=[], help="tokenizer directories (default: the demo's)")
    parser.add_argument("--model-path", default=None, help="the engine's model (default: the demo)")
    parser.add_argument("--out", default="bench/results/grammar_bench.json")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from serving.models.source import demo_model_dir

    tokenizers = args.tokenizer or [str(demo_model_dir())]
    libraries = {}
    for path in tokenizers:
        tok = AutoTokenizer.from_pretrained(path)
        vocab = len(tok)
        libraries[Path(path).name] = {"vocab": vocab, "xgrammar": bench_xgrammar(tok, vocab), "llguidance": bench_llguidance(tok, vocab)}
    engine = bench_engine(args.model_path)
    print(f"{'tokenizer':<28} {'library':<11} {'tokenizer s':>11} {'compile ms':>10} {'cached ms':>9} {'mask us':>8}")
    for name, entry in libraries.items():
        for lib in ("xgrammar", "llguidance"):
            r = entry[lib]
            print(f"{name:<28} {lib:<11} {r['tokenizer_s']:>11.3f} {1e3 * r['compile_s']:>10.2f} "
                  f"{1e3 * r['compile_cached_s']:>9.3f} {r['mask_us']:>8.1f}")  # fmt: skip
    base = engine["0_of_16"]
    print("\nengine decode at batch 16 (tok/s from the median step, all 16 generating):")
    for key, value in engine.items():
        print(f"  {key.replace('_', ' '):<12} constrained: {value:8.1f}  ({value / base:.2f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "libraries": libraries, "engine_tok_s": engine}, indent=1) + "\n")


if __name__ == "__main__":
    main()
