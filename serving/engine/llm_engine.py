"""The engine core: one synchronous `step()` = schedule, run the model once, sample, detokenize."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace

import torch

from serving.engine.block_manager import BlockManager
from serving.engine.detokenizer import Decoder, IncrementalDetokenizer
from serving.engine.sampler import prompt_logprobs, sample
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import Sequence, SequenceStatus, TokenLogprob
from serving.models.runner import ModelRunner

log = logging.getLogger("fleetlm.engine")


@dataclass(slots=True)
class SequenceDelta:
    """What one sequence produced in one step: the unit streamed to the client."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None  # stop | length | error
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, with the first delta
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_deltas(a: SequenceDelta, b: SequenceDelta) -> SequenceDelta:
    """Two consecutive deltas of one sequence as one."""
    return replace(
        b,
        text=a.text + b.text,
        token_ids=a.token_ids + b.token_ids,
        logprobs=a.logprobs + b.logprobs,
        prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
    )


def coalesce(deltas: list[SequenceDelta]) -> list[SequenceDelta]:
    """Merge deltas of the same sequence, keeping each sequence's order."""
    merged: dict[tuple[str, int], SequenceDelta] = {}
    for d in deltas:
        key = (d.request_id, d.index)
        merged[key] = merge_deltas(merged[key], d) if key in merged else d
    return list(merged.values())


@dataclass(slots=True)
class StepStats:
    batch_size: int
    num_tokens: int
    num_waiting: int
    num_running: int
    kv_usage: float
    num_preempted: int
    duration: float


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Decoder,
        blocks: BlockManager,
        max_batch_size: int,
        max_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
    ):
        self.runner = runner
        self.tokenizer = tokenizer
        self.blocks = blocks
        self.scheduler = Scheduler(blocks, max_batch_size, max_batched_tokens)
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self._requests: dict[str, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self.last_stats: StepStats | None = None

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def idle_stats(self) -> StepStats:
        return StepStats(0, 0, self.num_waiting, self.num_running, self.blocks.usage, 0, 0.0)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, n: int = 1) -> None:
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id}")
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        params = replace(params, extra_eos_ids=self.eos_token_ids)
        seqs = []
        for index in range(n):
            generator = None
            if params.seed is not None:
                # Each choice of a seeded request gets its own reproducible stream.
                generator = torch.Generator(device=self.runner.device).manual_seed(params.seed + index)
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                index=index,
                prompt_token_ids=list(prompt_token_ids),
                params=params,
                detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop),
                generator=generator,
                prompt_logprobs=[None] if params.prompt_logprobs else None,
            )
            seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[request_id] = seqs

    def abort_request(self, request_id: str) -> None:
        for seq in list(self._requests.get(request_id, [])):
            if not seq.is_finished:
                self._retire(seq, "abort")

    def _retire(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        self.runner.release(seq)
        siblings = self._requests.get(seq.request_id, [])
        if all(s.is_finished for s in siblings):
            self._requests.pop(seq.request_id, None)

    def step(self) -> list[SequenceDelta]:
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        for seq in batch.preempted:
            self.runner.release(seq)
        if batch.preempted:
            log.info("preempted sequences: KV cache full", extra={"preempted": len(batch.preempted)})
        deltas: list[SequenceDelta] = []
        if batch.items:
            try:
                deltas = self._run(batch.items)
            except Exception as exc:  # a failed forward pass fails its requests, not the server
                log.exception("model step failed")
                deltas = [self._fail(seq, exc) for seq, _ in batch.items]
        self.last_stats = StepStats(
            batch_size=len(batch.items),
            num_tokens=batch.num_tokens,
            num_waiting=self.num_waiting,
            num_running=self.num_running,
            kv_usage=self.blocks.usage,
            num_preempted=len(batch.preempted),
            duration=time.perf_counter() - started,
        )
        return deltas

    def _run(self, items: list[tuple[Sequence, int]]) -> list[SequenceDelta]:
        score_rows: list[tuple[Sequence, list[int], list[int]]] = []  # (seq, rows, target ids)
        sample_rows: list[int] = []
        samplers: list[Sequence] = []
        row = 0
        for seq, n in items:
            start, end = seq.num_cached, seq.num_cached + n
            if seq.prompt_logprobs is not None:
                first = max(start, len(seq.prompt_logprobs) - 1)
                last = min(end, len(seq.prompt_token_ids) - 1)
                if first < last:
                    targets = seq.prompt_token_ids[first + 1 : last + 1]
                    score_rows.append((seq, list(range(row + first - start, row + last - start)), targets))
            if end == seq.num_tokens:
                sample_rows.append(row + n - 1)
                samplers.append(seq)
            row += n
        all_score_rows = [r for _, rows, _ in score_rows for r in rows]
        logits = self.runner.execute(items, all_score_rows + sample_rows)
        for seq, n in items:
            seq.num_cached += n
        offset = 0
        for seq, rows, targets in score_rows:
            k = seq.params.logprobs or 0
            assert seq.prompt_logprobs is not None
            seq.prompt_logprobs.extend(prompt_logprobs(logits[offset : offset + len(rows)], targets, k))
            offset += len(rows)
        if not samplers:
            return []
        result = sample(logits[offset:], samplers)
        now = time.monotonic()
        return [
            self._append(seq, token, lp, now)
            for seq, token, lp in zip(samplers, result.token_ids, result.logprobs, strict=True)
        ]

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None, now: float) -> SequenceDelta:
        params = seq.params
        first = seq.first_token_time is None
        if first:
            seq.first_token_time = now
        seq.output_token_ids.append(token)
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        reason = None
        text = ""
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        else:
            text = seq.detokenizer.add_token(token)
            if seq.detokenizer.stopped:
                reason = "stop"
        if reason is None and (len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            text += seq.detokenizer.flush()
            self._retire(seq, reason)
        return SequenceDelta(
            request_id=seq.request_id,
            index=seq.index,
            text=text,
            token_ids=[token],
            logprobs=[logprob] if logprob is not None else [],
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_token_ids),
            completion_tokens=len(seq.output_token_ids),
            prompt_logprobs=seq.prompt_logprobs if first else None,
        )

    def _fail(self, seq: Sequence, exc: Exception) -> SequenceDelta:
        self._retire(seq, "error")
        return SequenceDelta(
            request_id=seq.request_id,
            index=seq.index,
            text="",
            token_ids=[],
            logprobs=[],
            finish_reason="error",
            prompt_tokens=len(seq.prompt_token_ids),
            completion_tokens=len(seq.output_token_ids),
            error=f"{type(exc).__name__}: {exc}",
        )
