"""Host-built step inputs on their way to the device: one pinned, non-blocking copy to a GPU.

A plain torch.tensor(..., device="cuda") (or .to("cuda") of pageable memory) makes the host wait
until the device has drained its queue, which serialises building the next inputs behind the GPU's
work. From pinned memory the copy is queued like a kernel; torch's caching host allocator keeps the
pinned block alive until the copy has run. The runner, its CUDA-graph path and the sampler all send
their inputs this way.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def cache_slot(table: Sequence[int], position: int, block_size: int) -> int:
    """The cache slot of one position of a stream whose blocks are `table` (a decode step's token)."""
    return table[position // block_size] * block_size + position % block_size


def cache_slots(table: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions start .. end - 1 of a stream whose blocks are `table`."""
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


class HostInts:
    """Integer lists laid end to end in one int64 host buffer, moved to the device with one copy.

    The buffer is an array('q') the tensor is made from without a copy: a list is converted once,
    as it is added; a block table (an array('q') itself, sequence.py) is copied in as raw memory.
    At batch 256 and a 32k context a decode step's tables are half a million ints: element by
    element through a Python list that took some 30 ms a step, more than the step's GPU work."""

    def __init__(self) -> None:
        self.values = array("q")

    def _align(self) -> int:
        """Start the next part on 16 bytes (an even int64 index): Triton specialises a kernel on whether
        each pointer is 16-byte aligned, so parts at odd offsets would compile a second variant of every
        kernel they reach, depending on the lengths of the parts before them, in the middle of traffic."""
        if len(self.values) % 2:
            self.values.append(0)
        return len(self.values)

    def _put(self, values: Sequence[int]) -> None:
        if isinstance(values, array):
            self.values.extend(values)
        else:
            self.values.fromlist(values if isinstance(values, list) else list(values))

    def add(self, values: Sequence[int]) -> tuple[int, int]:
        first = self._align()
        self._put(values)
        return first, len(values)

    def add_rows(self, rows: list[Sequence[int]], width: int) -> tuple[int, int, int]:
        """Each row's first `width` entries, padded with 0 to `width` (block tables: padding points at
        block 0, masked by length)."""
        first = self._align()
        for row in rows:
            if len(row) > width:
                row = row[:width]  # (slicing an array copies it: only when it must)
            self._put(row)
            if len(row) < width:
                self.values.frombytes(bytes(8 * (width - len(row))))
        return first, len(rows) * width, width

    def to(self, device: torch.device):
        """Copy everything added to `device`; returns a function from what add/add_rows returned to that
        part's tensor there (a view of the one copy)."""
        # frombuffer shares the array's memory and keeps it alive; it refuses an empty buffer.
        host = torch.frombuffer(self.values, dtype=torch.long) if self.values else torch.empty(0, dtype=torch.long)
        on_device = to_device(host, device)

        def view(part: tuple[int, ...]) -> torch.Tensor:
            first, count, *width = part
            piece = on_device[first : first + count]
            return piece.view(-1, width[0]) if width else piece

        return view
