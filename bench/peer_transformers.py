"""The peer: the same workload through transformers' `generate` on the same model, one request at a
time and in static batches (each batch runs until its longest request is done)."""

from __future__ import annotations

import time

import torch
from transformers import AutoModelForCausalLM

from bench.loadgen import RequestResult, RunSummary
from bench.workload import Request


def load_peer(model_dir: str) -> AutoModelForCausalLM:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: every request gets exactly its max_tokens
    model.generation_config.pad_token_id = 0
    return model


@torch.inference_mode()
def run_one_at_a_time(model, workload: list[Request]) -> RunSummary:
    results = []
    started = time.perf_counter()
    for req in workload:
        t0 = time.perf_counter()
        ids = torch.tensor([req.prompt_ids])
        model.generate(ids, max_new_tokens=req.max_tokens, min_new_tokens=req.max_tokens, do_sample=False)
        latency = time.perf_counter() - t0
        results.append(RequestResult(len(req.prompt_ids), req.max_tokens, None, latency))
    return RunSummary.from_results("transformers, one at a time", 1, results, time.perf_counter() - started)


@torch.inference_mode()
def run_static_batches(model, workload: list[Request], batch_size: int) -> RunSummary:
    """Left-padded batches in arrival order; output tok/s counts only the tokens each request asked for."""
    results = []
    started = time.perf_counter()
    for i in range(0, len(workload), batch_size):
        batch = workload[i : i + batch_size]
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids) :] = 1
        longest = max(r.max_tokens for r in batch)
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False)
        latency = time.perf_counter() - t0
        results.extend(RequestResult(len(r.prompt_ids), r.max_tokens, None, latency) for r in batch)
    return RunSummary.from_results(f"transformers, static batch {batch_size}", batch_size, results, time.perf_counter() - started)
