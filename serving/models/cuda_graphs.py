"""CUDA graphs for pure-decode steps: at a decode step of a large model on a GPU, launching some 400
kernels one by one from Python takes longer than running them. Each bucketed batch size gets a graph
captured once over static input buffers; a step copies its inputs into them and replays the graph
of the smallest bucket that holds it.

- Static buffers: token ids, positions, cache slots, context lengths, and block tables of a fixed
  width (the blocks of a full-length sequence). A step writes only the table columns it uses; the
  kernels read a row only below its length, so stale columns are never read.
- Padded rows (a batch of 5 replays the graph of 8) compute a token at position 0 whose K/V go to a
  scratch cache block of their own (the runner allocates one past the block manager's), with
  length 1: they read and write nothing of a real sequence, and their logits are dropped.
- Mixed steps (any prefill chunk), and batches above the largest bucket, run eagerly.

Capture needs the Triton attention backend (the torch path sizes tensors from host values). On CPU the
same static-buffer path runs eagerly (`capture=False`): tests check that padding and the scratch
block change no sequence's tokens, which is what a replay computes too.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from serving.models.attention import AttentionBatch
from serving.models.host_inputs import HostInts, cache_slot
from serving.models.runner import ForwardChunk

if TYPE_CHECKING:
    from serving.models.native import NativeRunner

log = logging.getLogger("fleetlm.engine")


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to 256 and every 32 above, ending at max_batch: padding wastes at
    most a few rows of a step whose cost, at these sizes, is reading the weights."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(288, max_batch + 1, 32)]
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


class DecodeGraphs:
    def __init__(self, runner: NativeRunner, max_batch: int, max_model_len: int, capture: bool):
        self.runner = runner
        self.buckets = batch_buckets(max_batch)
        self.width = -(-max_model_len // runner.block_size)
        n, dev = self.buckets[-1], runner.device
        scratch = runner.scratch_block
        self.scratch_slot = scratch * runner.block_size
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=dev)
        self.lens = torch.ones(n, dtype=torch.long, device=dev)
        self.tables = torch.full((n, self.width), scratch, dtype=torch.long, device=dev)
        self.rows = torch.arange(n, dtype=torch.long, device=dev)
        self.logits = torch.zeros(n, runner.vocab_size, dtype=torch.float32, device=dev)  # the graphs' output
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.steps = 0  # steps run over the static buffers (replayed, or eagerly without capture)
        self.padded_steps = 0  # of which with padded rows
        if capture:
            self._capture()

    def fits(self, chunks: list[ForwardChunk]) -> bool:
        # LoRA adapters' rows are grouped by adapter anew each step: such steps run eagerly.
        return 0 < len(chunks) <= self.buckets[-1] and all(c.decode and not c.adapter for c in chunks)

    def _batch(self, b: int) -> AttentionBatch:
        return AttentionBatch(
            slot_mapping=self.slots[:b],
            block_size=self.runner.block_size,
            decode_rows=self.rows[:b],
            decode_blocks=self.tables[:b],
            decode_lens=self.lens[:b],
            decodes_first=True,
            backend=self.runner.backend,
        )

    def _forward(self, b: int) -> None:
        model = self.runner.model
        hidden = model(self.ids[:b], self.positions[:b], self.runner.kv_cache, self._batch(b))
        self.logits[:b].copy_(model.logits(hidden))

    @torch.inference_mode()
    def _capture(self) -> None:
        """Largest bucket first, all in one memory pool: each smaller graph's activations fit in what the
        larger ones already hold."""
        started = time.perf_counter()
        pool = None
        side = torch.cuda.Stream(self.runner.device)
        for b in reversed(self.buckets):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside capture: Triton compiles, cuBLAS picks kernels
                self._forward(b)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.runner.device)
        log.info(
            "CUDA graphs captured",
            extra={"batch_sizes": self.buckets, "seconds": round(time.perf_counter() - started, 2)},
        )

    def run(self, chunks: list[ForwardChunk]) -> torch.Tensor:
        """float32 logits [len(chunks), vocab] of a pure-decode step."""
        count = len(chunks)
        b = next(size for size in self.buckets if size >= count)
        bs = self.runner.block_size
        lengths = [c.start + 1 for c in chunks]
        width = max(-(-n // bs) for n in lengths)
        pad = b - count
        self.steps += 1
        self.padded_steps += pad > 0
        ints = HostInts()
        parts = (
            ints.add([c.token_ids[0] for c in chunks] + [0] * pad),
            ints.add([c.start for c in chunks] + [0] * pad),
            ints.add([cache_slot(c.block_table, c.start, bs) for c in chunks] + [self.scratch_slot] * pad),
            ints.add(lengths + [1] * pad),
        )
        tables = ints.add_rows([c.block_table for c in chunks] + [[self.runner.scratch_block] * width] * pad, width)
        on = ints.to(self.runner.device)
        for static, part in zip((self.ids, self.positions, self.slots, self.lens), parts, strict=True):
            static[:b].copy_(on(part))
        self.tables[:b, :width].copy_(on(tables))
        graph = self.graphs.get(b)
        if graph is not None:
            graph.replay()
        else:
            self._forward(b)
        # A copy: the next replay overwrites the graph's output while the engine may still hold these.
        return self.logits[:count].clone()
