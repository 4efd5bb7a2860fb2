"""One batched sampling call for a step: every sequence brings its own parameters.

Temperature, top-k, top-p, min-p, repetition/presence/frequency penalties and min_tokens are
applied as tensors over the whole batch. Draws use the exponential-race form of categorical
sampling (argmax of p / Exp(1) noise), which needs no CPU-GPU sync and lets a seeded sequence
take its noise from its own generator, so its samples do not depend on its batch neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.engine.protocol import TokenLogprob
from serving.engine.sampling_params import MIN_REPETITION_PENALTY
from serving.engine.sequence import Sequence
from serving.models.host_inputs import to_device


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


def _on(device: torch.device, values: list) -> torch.Tensor:
    """A host list as a tensor on `device` (to a GPU from pinned memory, without waiting for it)."""
    return to_device(torch.tensor(values), device)


def _padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Rows of token ids as one tensor, padded with -1."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return to_device(out, device)


def _token_counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    ids = _padded(rows, device)
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    counts.scatter_add_(1, torch.where(ids < 0, vocab, ids), torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    vocab, device = logits.shape[-1], logits.device
    params = [s.params for s in seqs]
    if any(p.repetition_penalty != 1.0 for p in params):
        rep = _on(device, [max(p.repetition_penalty, MIN_REPETITION_PENALTY) for p in params]).unsqueeze(1)
        # Like Hugging Face's RepetitionPenaltyLogitsProcessor: over prompt and output tokens (their last
        # repetition_window, where one is set, as llama.cpp's repeat_last_n).
        windows = [s.token_ids[-w:] if (w := s.params.repetition_window) else s.token_ids for s in seqs]
        seen = _token_counts(windows, vocab, device) > 0
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    if any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params):
        freq = _on(device, [p.frequency_penalty for p in params]).unsqueeze(1)
        pres = _on(device, [p.presence_penalty for p in params]).unsqueeze(1)
        # OpenAI's definition: over generated tokens only.
        counts = _token_counts([s.output_token_ids for s in seqs], vocab, device)
        logits = logits - freq * counts - pres * (counts > 0).to(logits.dtype)
    return logits


def _apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Every row's biases in one indexed add, indices and values sent like any step input: indexing
    with a Python list or assigning a Python number copies it from pageable memory, a wait for the GPU."""
    vocab = logits.shape[-1]
    rows: list[int] = []
    cols: list[int] = []
    biases: list[float] = []
    for i, s in enumerate(seqs):
        for token, bias in dict(s.params.logit_bias or ()).items():  # one bias per token: the last given
            if not 0 <= token < vocab:  # caught here: out of range on a GPU is a device-side assert
                raise IndexError(f"logit_bias token id {token} is outside the vocabulary (size {vocab})")
            rows.append(i)
            cols.append(token)
            biases.append(bias)
    device = logits.device
    at = (_on(device, rows), _on(device, cols))  # each (row, token) once: a plain indexed write adds right
    return logits.index_put_(at, logits[at] + _on(device, biases).to(logits.dtype))


def _block_early_stop(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """min_tokens: a sequence short of it cannot sample its end-of-sequence or stop token ids. Unless
    nothing else is left to it: where a grammar has ended (a forced tool call complete) or a logit_bias
    of -100 took every other token, the end stands, as the grammar says; blocking it too left no token
    at all, and the sequence failed."""
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(seqs):
        if s.num_output_tokens < s.params.min_tokens:
            blocked = {t for t in (*s.params.extra_eos_ids, *s.params.stop_token_ids) if t < logits.shape[-1]}
            rows.extend([i] * len(blocked))
            cols.extend(blocked)
    if not rows:
        return logits
    device = logits.device
    kept = logits.index_put((_on(device, rows), _on(device, cols)), torch.full((), float("-inf"), device=device))
    nothing_left = torch.isneginf(kept).all(dim=-1, keepdim=True)  # on the device: no sync
    return torch.where(nothing_left, logits, kept)


def _filter(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Temperature, then top-k / top-p / min-p masks, all per row."""
    device = logits.device
    params = [s.params for s in seqs]
    vocab = logits.shape[-1]
    # Greedy rows' temperature (below GREEDY_BELOW) is not divided by: their draw is not used.
    logits = logits / _on(device, [1.0 if p.greedy else p.temperature for p in params]).unsqueeze(1)
    if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):
        top_k = _on(device, [p.top_k if p.top_k > 0 else vocab for p in params])
        top_p = _on(device, [p.top_p for p in params])
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[-1], device=device).unsqueeze(0)
        drop = ranks >= top_k.unsqueeze(1)
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p; the top token always stays (a top_p that is
        # zero in float32, 1e-46 say, would drop it too).
        drop |= ((probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)) & (ranks > 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(p.min_p > 0 for p in params):
        min_p = _on(device, [p.min_p for p in params])
        probs = logits.softmax(dim=-1)
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def _exponential_noise(seqs: list[Sequence], vocab: int, device: torch.device) -> torch.Tensor:
    noise = torch.empty(len(seqs), vocab, device=device).exponential_()
    for i, s in enumerate(seqs):
        if s.generator is not None:
            noise[i] = torch.empty(vocab, device=s.generator.device).exponential_(generator=s.generator).to(device)
    return noise


# The floor of a reported logprob (vLLM's): a token a grammar rules out has -inf, which JSON cannot hold
# (Python writes -Infinity, which JavaScript's JSON.parse and other strict parsers refuse).
MIN_LOGPROB = -9999.0


def _scored(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """(chosen id, its logprob, the k most likely (id, logprob)) of each row, read back in one copy:
    ids and float32 logprobs side by side in float64, which holds both exactly; at least MIN_LOGPROB."""
    logprobs = logprobs.clamp(min=MIN_LOGPROB)
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1))
    top_vals, top_ids = logprobs.topk(max(k, 1), dim=-1)
    table = torch.cat([chosen.unsqueeze(1).double(), chosen_lp.double(), top_ids[:, :k].double(), top_vals[:, :k].double()], 1)
    return [
        (int(row[0]), row[1], list(zip(map(int, row[2 : 2 + k]), row[2 + k :], strict=True))) for row in table.tolist()
    ]


def _with_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
    wanted = [s.params.logprobs for s in seqs]
    scored = _scored(logprobs, chosen, max(k or 0 for k in wanted))
    return SampleResult(
        [token for token, _, _ in scored],
        [None if k is None else TokenLogprob(token, lp, top[:k]) for k, (token, lp, top) in zip(wanted, scored, strict=True)],
    )


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
    """logits: [len(seqs), vocab], one row per sequence that samples this step."""
    logits = logits.float()
    wants_logprobs = any(s.params.logprobs is not None for s in seqs)
    # Reported logprobs are the model's own distribution, before penalties and filters.
    raw_logprobs = logits.log_softmax(dim=-1) if wants_logprobs else None
    if any(s.params.logit_bias for s in seqs):
        logits = _apply_logit_bias(logits.clone(), seqs)
    if any(s.params.uses_penalties for s in seqs):
        logits = apply_penalties(logits, seqs)
    if any(s.num_output_tokens < s.params.min_tokens for s in seqs):
        logits = _block_early_stop(logits, seqs)
    chosen = logits.argmax(dim=-1)
    if not all(s.params.greedy for s in seqs):
        greedy = _on(logits.device, [s.params.greedy for s in seqs])
        probs = _filter(logits, seqs).softmax(dim=-1)
        drawn = (probs / _exponential_noise(seqs, logits.shape[-1], logits.device)).argmax(dim=-1)
        chosen = torch.where(greedy, chosen, drawn)
    # The step's one read of the device: the sampled ids (with their logprobs, in the same copy).
    if raw_logprobs is None:
        return SampleResult(chosen.tolist(), [None] * len(seqs))
    return _with_logprobs(raw_logprobs, chosen, seqs)


def prompt_logprobs(logits: torch.Tensor, target_ids: list[int], k: int) -> list[TokenLogprob]:
    """Score each target token under the logits of the position before it (echo + logprobs)."""
    lp = logits.float().log_softmax(dim=-1)
    return [TokenLogprob(*entry) for entry in _scored(lp, _on(lp.device, target_ids), k)]
