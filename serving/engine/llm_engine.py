"""The engine core: one synchronous `step()` = schedule, run the model once, sample, token-level stops.

The engine works in token ids only. It stops a sequence on EOS, a stop token id, max_tokens or the
context length; text, and with it stop strings, is the API process's business (output_processor.py),
which aborts a sequence whose text hit a stop string.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from serving.engine.block_manager import BlockManager
from serving.engine.grammar import Grammars, apply_masks
from serving.engine.protocol import FinishReason, RequestRejected, SequenceOutput, StepStats, TokenLogprob
from serving.engine.sampler import SampleResult, prompt_logprobs, sample
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import ScheduledBatch, ScheduledChunk, Scheduler
from serving.engine.sequence import Sequence, SequenceStatus
from serving.models.lora import AdapterError
from serving.models.native import NativeRunner
from serving.models.runner import ForwardChunk, ModelRunner

log = logging.getLogger("fleetlm.engine")


class DeviceLost(RuntimeError):
    """The accelerator failed in a way no later step recovers from: the engine process must exit
    (the API process then exits non-zero, and Kubernetes restarts the container)."""


def check_device(exc: BaseException) -> None:
    """Raise DeviceLost if `exc` is a CUDA error other than out-of-memory. After an illegal memory
    access or a device-side assert the CUDA context is unusable: every later kernel fails with the
    same error, so failing only the step's sequences would fail every request from then on while
    the pod still looked alive. Out of memory is not sticky: the step's sequences fail, the engine
    lives."""
    if isinstance(exc, torch.OutOfMemoryError):
        return
    text = str(exc)
    if "out of memory" in text:
        return
    # torch raises AcceleratorError for CUDA errors; Triton's launcher a RuntimeError of its own.
    if isinstance(exc, torch.AcceleratorError) or "Triton Error [CUDA]" in text or "CUDA error" in text:
        raise DeviceLost(f"{type(exc).__name__}: {text}") from exc


def _unfinished(rows: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, list[Sequence]]:
    """The rows (one per sequence) and sequences of those not finished (failed) in this step so far."""
    if not any(s.is_finished for s in seqs):
        return rows, seqs
    keep = [i for i, s in enumerate(seqs) if not s.is_finished]
    return rows[keep], [seqs[i] for i in keep]


_U64 = (1 << 64) - 1


def mixed_seed(seed: int, index: int) -> int:
    """The generator seed of choice `index` of a request seeded `seed` (any 64-bit integer): every bit of
    both mixed into every bit (splitmix64). torch's CPU generator keeps only the low 32 bits of a seed,
    so seeds 0 and 2**32, or -1 and 2**63 - 1, drew the same numbers; and seed + index overflowed."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        blocks: BlockManager,
        max_batch_size: int,
        max_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        grammars: Grammars | None = None,
    ):
        self.runner = runner
        self.blocks = blocks
        self.scheduler = Scheduler(blocks, max_batch_size, max_batched_tokens)
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self._requests: dict[str, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self.last_stats: StepStats | None = None
        self._totals = [0, 0, 0]  # preempted, prefix queries, prefix hits
        self.grammars = grammars
        # Sequences whose grammar is being compiled (in a worker thread): scheduled once it is ready.
        self._compiling: list[tuple[Future, list[Sequence]]] = []
        self._unloading: set[int] = set()  # LoRA adapters to drop once no sequence of theirs is left
        self.adapter_names: dict[int, str] = {}  # the LoRA adapters served, by id

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._compiling)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def idle_stats(self) -> StepStats:
        preempted, queries, hits = self._totals
        return StepStats(
            0, 0, self.num_waiting, self.num_running, self.blocks.usage, 0, 0.0,
            preempted_total=preempted, prefix_queries_total=queries, prefix_hits_total=hits, **self._adapter_stats(),
        )  # fmt: skip

    def _adapter_stats(self) -> dict[str, Any]:
        """StepStats' LoRA fields: nothing to compute where no adapter is served."""
        if not self.adapter_names:
            return {}

        def names(seqs: Iterable[Sequence]) -> tuple[str, ...]:
            return tuple(sorted({self.adapter_names[s.params.adapter] for s in seqs if s.params.adapter in self.adapter_names}))

        return {
            "running_adapters": names(self.scheduler.running),
            "waiting_adapters": names(self.scheduler.waiting),
            "adapters_loaded": len(self.adapter_names) - len(self._unloading),
        }

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, n: int = 1) -> None:
        """Queue n sequences for the prompt, or none of them (RequestRejected)."""
        if request_id in self._requests:
            raise RequestRejected(f"duplicate request id {request_id}")
        if not prompt_token_ids:
            raise RequestRejected("the prompt must contain at least one token")
        if len(prompt_token_ids) > self.max_model_len - (0 if params.embed else 1):  # an embedding generates nothing
            raise RequestRejected(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's maximum context length is {self.max_model_len}"
            )
        if n < 1:
            raise RequestRejected("n must be at least 1")
        if params.adapter and params.adapter not in self.adapter_names:
            # Unloaded between the API's lookup of its name and now: never generated without it.
            raise RequestRejected("the LoRA adapter this request names was unloaded")
        vocab = self.runner.vocab_size
        if not 0 <= min(prompt_token_ids) <= max(prompt_token_ids) < vocab:
            # The API checks too; here it keeps one bad id from failing a whole step (on a GPU, from a
            # device-side assert that ends the process).
            bad = next(t for t in prompt_token_ids if not 0 <= t < vocab)
            raise RequestRejected(f"token id {bad} is out of the vocabulary (size {vocab})")
        params = replace(params, extra_eos_ids=self.eos_token_ids)
        seqs = [
            Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                index=index,
                token_ids=list(prompt_token_ids),
                prompt_len=len(prompt_token_ids),
                params=params,
                generator=self._generator(params, index),
                prompt_logprobs=[None] if params.prompt_logprobs else None,
                thinking=params.think is not None and params.think[2],
            )
            for index in range(n)
        ]
        if params.grammar is not None:
            if self.grammars is None:
                raise RequestRejected("this engine was built without grammar support")
            self._requests[request_id] = seqs
            self._compiling.append((self.grammars.submit(params.grammar), seqs))
            return
        self._requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.seed is None:
            return None
        # Each choice of a seeded request gets its own reproducible stream.
        return torch.Generator(device=self.runner.device).manual_seed(mixed_seed(params.seed, index))

    def abort_request(self, request_id: str, indices: tuple[int, ...] | None = None) -> None:
        """Stop the request's sequences (those with the given choice indices) and free their blocks."""
        for seq in list(self._requests.get(request_id, [])):
            if not seq.is_finished and (indices is None or seq.index in indices):
                self._retire(seq, "abort")
        self._compiling = [(f, seqs) for f, seqs in self._compiling if not all(s.is_finished for s in seqs)]

    def load_adapter(self, adapter_id: int, directory: str, name: str) -> int:
        """Serve the PEFT LoRA adapter in `directory` to requests of this id; its rank (AdapterError: why not)."""
        if not isinstance(self.runner, NativeRunner):
            raise AdapterError("LoRA adapters are served by the native runner only, not by the transformers runner")
        rank = self.runner.add_adapter(adapter_id, Path(directory))
        self.adapter_names[adapter_id] = name
        return rank

    def unload_adapter(self, adapter_id: int) -> None:
        """Drop an adapter's weights once its sequences in flight have finished (no new ones come: the API
        no longer knows its name). Its prefix-cache blocks age out: ids are never reused."""
        self._unloading.add(adapter_id)
        self._drop_unloaded()

    def _drop_unloaded(self) -> None:
        assert isinstance(self.runner, NativeRunner)
        in_use = {seq.params.adapter for seqs in self._requests.values() for seq in seqs if not seq.is_finished}
        for adapter_id in self._unloading - in_use:
            self.runner.remove_adapter(adapter_id)
            self.adapter_names.pop(adapter_id, None)
        self._unloading &= in_use

    def _admit_compiled(self) -> list[SequenceOutput]:
        """Schedule the sequences whose grammar is ready; fail those whose grammar failed. With nothing
        else to do, wait a moment for a compilation rather than spin."""
        if not self._compiling:
            return []
        if not self.scheduler.has_work:
            concurrent.futures.wait([f for f, _ in self._compiling], timeout=0.05, return_when="FIRST_COMPLETED")
        outputs: list[SequenceOutput] = []
        pending = []
        for future, seqs in self._compiling:
            if not future.done():
                pending.append((future, seqs))
                continue
            error = future.exception()
            for seq in seqs:
                if seq.is_finished:
                    continue
                if error is not None:
                    outputs.append(self._fail(seq, error))
                else:
                    seq.grammar = Grammars.matcher(future.result())
                    self.scheduler.add(seq)
        self._compiling = pending
        return outputs

    def _retire(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        self.runner.release(seq.seq_id)
        siblings = self._requests.get(seq.request_id, [])
        if all(s.is_finished for s in siblings):
            self._requests.pop(seq.request_id, None)

    # -- the step --------------------------------------------------------------------------

    def step(self) -> list[SequenceOutput]:
        started = time.perf_counter()
        failed = self._admit_compiled()
        batch = self.scheduler.schedule()
        for seq in batch.preempted:
            self.runner.release(seq.seq_id)
        if batch.preempted:
            log.info("preempted sequences: KV cache full", extra={"preempted": len(batch.preempted)})
        outputs: list[SequenceOutput] = []
        if batch.chunks:
            try:
                logits, score_rows, samplers, hidden, embedders = self._forward(batch.chunks)
            except Exception as exc:  # the shared forward pass failed: its sequences fail, the server lives
                check_device(exc)
                log.exception("model step failed")
                self.blocks.discard_step()
                outputs = [self._fail(c.seq, exc) for c in batch.chunks]
            else:
                self.blocks.confirm_step()
                outputs = self._embedded(hidden, embedders) + self._outputs(logits, score_rows, samplers)
        if self._unloading:
            self._drop_unloaded()
        self.last_stats = self._stats(batch, time.perf_counter() - started)
        return failed + outputs

    def _stats(self, batch: ScheduledBatch, duration: float) -> StepStats:
        totals = self._totals
        totals[0] += len(batch.preempted)
        totals[1] += batch.prefix_queries
        totals[2] += batch.prefix_hits
        return StepStats(
            batch_size=len(batch.chunks),
            num_tokens=batch.num_tokens,
            num_waiting=self.num_waiting,
            num_running=self.num_running,
            kv_usage=self.blocks.usage,
            num_preempted=len(batch.preempted),
            duration=duration,
            prefix_queries=batch.prefix_queries,
            prefix_hits=batch.prefix_hits,
            preempted_total=totals[0],
            prefix_queries_total=totals[1],
            prefix_hits_total=totals[2],
            **self._adapter_stats(),
        )

    def _forward(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, list[tuple[Sequence, int, list[int]]], list[Sequence], torch.Tensor, list[Sequence]]:
        """One forward pass. Returns the logits of the rows asked for: first the prompt rows scored
        for echo+logprobs ((seq, row count, target ids) each), then one row per sampling sequence;
        and the last hidden state of each embedding sequence whose prompt is done."""
        score_rows: list[tuple[Sequence, list[int], list[int]]] = []
        sample_rows: list[int] = []
        samplers: list[Sequence] = []
        hidden_rows: list[int] = []
        embedders: list[Sequence] = []
        forward: list[ForwardChunk] = []
        row = 0
        if self.adapter_names:  # each LoRA adapter's rows side by side (decodes still first): its matmuls take slices
            chunks = sorted(chunks, key=lambda c: (not c.decode, c.seq.params.adapter))
        for c in chunks:
            seq, n = c.seq, c.num_tokens
            start, end = seq.num_cached, seq.num_cached + n
            forward.append(ForwardChunk(seq.seq_id, seq.token_ids[start:end], start, seq.block_table, c.decode, seq.params.adapter))
            scored = seq.scored_positions(start, end)
            if scored:
                targets = seq.token_ids[scored.start + 1 : scored.stop + 1]
                score_rows.append((seq, [row + p - start for p in scored], targets))
            if end == seq.num_tokens and seq.params.embed:
                hidden_rows.append(row + n - 1)
                embedders.append(seq)
            elif end == seq.num_tokens:
                sample_rows.append(row + n - 1)
                samplers.append(seq)
            row += n
        all_score_rows = [r for _, rows, _ in score_rows for r in rows]
        logits, hidden = self.runner.run(forward, all_score_rows + sample_rows, hidden_rows)
        for c in chunks:
            c.seq.num_cached += c.num_tokens
        return logits, [(seq, len(rows), targets) for seq, rows, targets in score_rows], samplers, hidden, embedders

    def _embedded(self, hidden: torch.Tensor, embedders: list[Sequence]) -> list[SequenceOutput]:
        """Embedding sequences whose prompt is computed: the last token's hidden state, L2-normalized
        (last-token pooling, as Qwen3-Embedding and e5-mistral are trained for); they end here."""
        if not embedders:
            return []
        vectors = torch.nn.functional.normalize(hidden, dim=-1).cpu()
        return [self._ended(seq, "stop", embedding=vector.numpy().tobytes()) for seq, vector in zip(embedders, vectors, strict=True)]

    def _outputs(
        self, logits: torch.Tensor, score_rows: list[tuple[Sequence, int, list[int]]], samplers: list[Sequence]
    ) -> list[SequenceOutput]:
        offset = 0
        outputs: list[SequenceOutput] = []
        for seq, count, targets in score_rows:
            assert seq.prompt_logprobs is not None
            try:
                seq.prompt_logprobs.extend(prompt_logprobs(logits[offset : offset + count], targets, seq.params.logprobs or 0))
            except Exception as exc:  # out of memory, say: this sequence fails, its batch-mates go on
                check_device(exc)
                log.exception("scoring the prompt failed", extra={"request_id": seq.request_id})
                outputs.append(self._fail(seq, exc))
            offset += count
        rows, samplers = _unfinished(logits[offset:], samplers)
        if any(s.grammar is not None for s in samplers):
            # Constrained rows keep only what their grammar allows; the logprobs reported are then of
            # that masked distribution, the one the token is drawn from.
            try:
                rows = apply_masks(rows, [s.constrained for s in samplers], [s.may_open_thought for s in samplers])
            except Exception as exc:
                check_device(exc)
                log.exception("masking the step's constrained rows failed")
                outputs.extend(self._fail(s, exc) for s in samplers if s.grammar is not None)
                rows, samplers = _unfinished(rows, samplers)
        if not samplers:
            return outputs
        results = self._sample(rows, samplers)
        for seq, result in zip(samplers, results, strict=True):
            if isinstance(result, Exception):
                outputs.append(self._fail(seq, result))
            else:
                outputs.append(self._append(seq, *result))
        return outputs

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> list[tuple[int, TokenLogprob | None] | Exception]:
        """Sample every row in one batched call. Should that fail, a sequence's own parameters are
        to blame: each row is sampled alone, and only the rows that fail again fail their sequence."""
        try:
            batched: SampleResult = sample(logits, seqs)
            return list(zip(batched.token_ids, batched.logprobs, strict=True))
        except Exception as exc:
            check_device(exc)
            log.warning("batched sampling failed: sampling each sequence alone", exc_info=True)
        results: list[tuple[int, TokenLogprob | None] | Exception] = []
        for i, seq in enumerate(seqs):
            try:
                alone = sample(logits[i : i + 1], [seq])
                results.append((alone.token_ids[0], alone.logprobs[0]))
            except Exception as exc:
                check_device(exc)
                log.exception("sampling failed", extra={"request_id": seq.request_id})
                results.append(exc)
        return results

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> SequenceOutput:
        params = seq.params
        first = seq.num_output_tokens == 0
        seq.token_ids.append(token)
        reason: FinishReason | None = None
        think = params.think
        if seq.thinking:
            assert think is not None
            seq.thinking = token != think[1]  # its grammar holds from the token after the block's end
        elif seq.grammar is not None:
            if think is not None and first and not think[2] and token == think[0]:
                seq.thinking = True  # it opened a think block: the grammar waits for its end
            elif not seq.grammar.accept_token(token):
                return self._fail(seq, RuntimeError(f"token {token} was sampled outside the grammar"))
            elif seq.grammar.is_terminated():
                reason = "stop"  # the grammar is complete and its stop token sampled
        if reason is None and (token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)):
            reason = "stop"
        if reason is None and (seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        out = SequenceOutput(
            request_id=seq.request_id,
            index=seq.index,
            token_ids=[token],
            logprobs=[logprob] if logprob is not None else [],
            finish_reason=reason,
            cached_tokens=seq.cached_prompt_tokens or 0,
            prompt_logprobs=seq.prompt_logprobs if first else None,
        )
        if reason is not None:
            self._retire(seq, reason)
        return out

    def _fail(self, seq: Sequence, exc: Exception) -> SequenceOutput:
        return self._ended(seq, "error", error=f"{type(exc).__name__}: {exc}")

    def _ended(self, seq: Sequence, reason: FinishReason, **extra: Any) -> SequenceOutput:
        """Retire the sequence; its last output, without a token (an error, an embedding)."""
        self._retire(seq, reason)
        return SequenceOutput(
            request_id=seq.request_id,
            index=seq.index,
            token_ids=[],
            logprobs=[],
            finish_reason=reason,
            cached_tokens=seq.cached_prompt_tokens or 0,
            **extra,
        )
