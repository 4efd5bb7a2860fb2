"""Benchmark workloads: token-id prompts with fixed or random lengths, reproducible from a seed."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Request:
    prompt_ids: list[int]
    max_tokens: int


def parse_length(spec: str) -> tuple[int, int]:
    """'64' -> (64, 64); '16-256' -> (16, 256)."""
    lo, _, hi = spec.partition("-")
    low, high = int(lo), int(hi or lo)
    if not 1 <= low <= high:
        raise ValueError(f"bad length spec {spec!r}: want N or LOW-HIGH with 1 <= LOW <= HIGH")
    return low, high


def make_workload(
    count: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int, seed: int, first_id: int = 3
) -> list[Request]:
    """Prompts are random token ids (so their lengths are exact) from first_id up, skipping special tokens."""
    rng = random.Random(seed)
    return [
        Request(
            prompt_ids=[rng.randrange(first_id, vocab_size) for _ in range(rng.randint(*input_len))],
            max_tokens=rng.randint(*output_len),
        )
        for _ in range(count)
    ]
