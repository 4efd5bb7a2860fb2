"""Host-built step inputs on their way to the device: one pinned, non-blocking copy to a GPU.

A plain torch.tensor(..., device="cuda") (or .to("cuda") of pageable memory) makes the host wait
until the device has drained its queue, which serialises building the next inputs behind the GPU's
work. From pinned memory the copy is queued like a kernel; torch's caching host allocator keeps the
pinned block alive until the copy has run. The runner, its CUDA-graph path and the sampler all send
their inputs this way.
"""

from __future__ import annotations

from array import array

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def cache_slot(table: list[int], position: int, block_size: int) -> int:
    """The cache slot of one position of a stream whose blocks are `table` (a decode step's token)."""
    return table[position // block_size] * block_size + position % block_size


def cache_slots(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions start .. end - 1 of a stream whose blocks are `table`."""
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


class HostInts:
    """Integer lists laid end to end in one int64 host tensor, moved to the device with one copy.

    The ints gather in a list and become the tensor through an array('q') and its buffer: four times
    faster than torch.tensor(list), which had been a step's largest piece of host work at batch 256
    (its block tables are some 10k ints)."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def _align(self) -> int:
        """Start the next part on 16 bytes (an even int64 index): Triton specialises a kernel on whether
        each pointer is 16-byte aligned, so parts at odd offsets would compile a second variant of every
        kernel they reach, depending on the lengths of the parts before them, in the middle of traffic."""
        if len(self.values) % 2:
            self.values.append(0)
        return len(self.values)

    def add(self, values: list[int]) -> tuple[int, int]:
        first = self._align()
        self.values.extend(values)
        return first, len(values)

    def add_rows(self, rows: list[list[int]], width: int) -> tuple[int, int, int]:
        """Rows padded with 0 to `width` (block tables: padding points at block 0, masked by length)."""
        first = self._align()
        for row in rows:
            self.values.extend(row)
            self.values.extend([0] * (width - len(row)))
        return first, len(rows) * width, width

    def to(self, device: torch.device):
        """Copy everything added to `device`; returns a function from what add/add_rows returned to that
        part's tensor there (a view of the one copy)."""
        packed = array("q")
        packed.fromlist(self.values)
        # frombuffer shares the array's memory and keeps it alive; it refuses an empty buffer.
        host = torch.frombuffer(packed, dtype=torch.long) if packed else torch.empty(0, dtype=torch.long)
        on_device = to_device(host, device)

        def view(part: tuple[int, ...]) -> torch.Tensor:
            first, count, *width = part
            piece = on_device[first : first + count]
            return piece.view(-1, width[0]) if width else piece

        return view
